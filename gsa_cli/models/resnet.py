"""One ResNet (v1.5 bottlenecks, as torchvision's) whose spatial operator is injected.

A convolutional ResNet and a GSA-ResNet differ only in the module built for each bottleneck's middle
layer: a 3x3 convolution, or a :class:`~gsa_cli.models.gsa.GlobalSelfAttention2d` whose span is the
feature size of the map it sees. Module names follow torchvision's ``resnet.py`` (``conv1``, ``bn1``,
``layer1``..``layer4``, ``fc``; in each block ``conv1``..``conv3``, ``bn1``..``bn3``, ``downsample``) so
that a conv ResNet-50 loads torchvision's weights key for key; ``conv2`` is the spatial operator,
whatever its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

EXPANSION = 4

# Builds a block's spatial operator from (channels, stride, input feature size).
SpatialFactory = Callable[[int, int, int], nn.Module]


def conv3x3(channels: int, stride: int, feature_size: int) -> nn.Module:
    """The convolutional spatial operator: a 3x3 convolution without bias."""
    del feature_size  # a convolution's extent does not depend on the map
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)


def strided_size(size: int, stride: int) -> int:
    """Output size of a 3x3/padding-1 convolution (or a ceil-mode 2x2 pool) at ``stride``."""
    return (size - 1) // stride + 1


class Bottleneck(nn.Module):
    """1x1 conv, BN, ReLU; spatial operator, BN, ReLU; 1x1 conv (x4), BN; residual add, ReLU.

    The modules are registered in the order ``forward`` calls them (the shortcut's projection runs after
    the main branch, as in torchvision); the state-dict keys are torchvision's, in torchvision's order.
    """

    def __init__(self, in_channels: int, width: int, *, stride: int, spatial: nn.Module) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = spatial
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


POOL_TYPES = ("avg", "max", "")


class GlobalPool(nn.Module):
    """Global pooling to a ``(B, C)`` vector: ``"avg"``, ``"max"``, or ``""`` (none: the map unchanged).

    ``pool_type`` names it, as timm's ``SelectAdaptivePool2d`` does (timm reads it back).
    """

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            choices = ", ".join(repr(kind) for kind in POOL_TYPES)
            raise ValueError(f"unknown global pool {pool_type!r}: expected one of {choices}")
        self.pool_type = pool_type
        self.flatten = bool(pool_type)
        self.pool: nn.Module = nn.Identity()
        if pool_type == "avg":
            self.pool = nn.AdaptiveAvgPool2d(1)
        elif pool_type == "max":
            self.pool = nn.AdaptiveMaxPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)  # (B, C, 1, 1), or the map itself
        return x.flatten(1) if self.flatten else x


def _stem(stem: str, in_channels: int, width: int) -> tuple[nn.Conv2d, nn.Module, int, int]:
    """The stem's convolution and pooling, and the stride each of them applies."""
    if stem == "imagenet":
        return nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, 2, 1), 2, 2
    if stem == "cifar":
        return nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.Identity(), 1, 1
    if stem == "stride2":
        return nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.Identity(), 2, 1
    raise ValueError(f"unknown stem {stem!r}: expected 'imagenet', 'cifar' or 'stride2'")


def stem_output_size(stem: str, img_size: int) -> int:
    """Height and width of the stem's output (the first stage's input) for ``img_size`` inputs."""
    _, _, conv_stride, pool_stride = _stem(stem, 1, 1)
    return strided_size(strided_size(img_size, conv_stride), pool_stride)


class ResNet(nn.Module):
    """A bottleneck ResNet; ``spatial[i]`` builds the spatial operators of stage ``i + 1``.

    Its modules are registered in the order ``forward`` calls them (stem conv, BN, ReLU, pool, the
    stages, global pool, classifier), so that timm's feature extractor, which replays the top-level
    modules in order, computes the same maps. It has timm's model API: ``forward_features``,
    ``forward_head``, ``get_classifier``, ``reset_classifier``, ``no_weight_decay``, ``feature_info``
    (the stem and each stage's output), ``group_matcher`` and ``set_grad_checkpointing``.

    Args:
        blocks: Bottlenecks per stage (1 to 4 stages).
        spatial: One spatial-operator factory per stage.
        width: Bottleneck width of the first stage; doubled at each later stage.
        stem: ``"imagenet"`` (7x7 stride-2 conv and 3x3 stride-2 max pool), ``"cifar"`` (3x3 conv) or
            ``"stride2"`` (3x3 stride-2 conv: small images halved once, e.g. 28 px to 14).
        in_channels: Image channels.
        num_classes: Outputs of the classifier; 0 for none (the model returns pooled features).
        img_size: Input height and width the network is built for; sets each stage's feature size,
            which a GSA factory takes as its global span.
        zero_init_residual: Start the last BN of every block at zero, so each block starts as the
            identity (Goyal et al.).
        drop_rate: Dropout before the classifier (timm's ``drop_rate``).
        global_pool: ``"avg"``, ``"max"``, or ``""`` (no pooling; only without a classifier).
    """

    def __init__(
        self,
        *,
        blocks: Sequence[int],
        spatial: Sequence[SpatialFactory],
        width: int,
        stem: str,
        in_channels: int,
        num_classes: int,
        img_size: int,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(spatial) != len(blocks):
            raise ValueError(f"need one spatial factory per stage, got {len(spatial)} for {len(blocks)}")
        conv, pool, conv_stride, pool_stride = _stem(stem, in_channels, width)
        self.conv1 = conv
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = pool
        size = stem_output_size(stem, img_size)
        reduction = conv_stride
        self.feature_info = [{"num_chs": width, "reduction": reduction, "module": "relu"}]
        reduction *= pool_stride

        channels = width
        self.feature_sizes: list[int] = []  # input size of each stage
        for index, (count, factory) in enumerate(zip(blocks, spatial, strict=True)):
            stage_width = width * 2**index
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                if block == 0:
                    self.feature_sizes.append(size)
                    reduction *= stride
                spatial_op = factory(stage_width, stride, size)
                layers.append(Bottleneck(channels, stage_width, stride=stride, spatial=spatial_op))
                channels = stage_width * EXPANSION
                size = strided_size(size, stride)
            # Named layer1..layer4, as torchvision's.
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
            self.feature_info.append(
                {"num_chs": channels, "reduction": reduction, "module": f"layer{index + 1}"}
            )
        self.num_stages = len(blocks)
        self.num_features = self.head_hidden_size = channels
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_classes = num_classes
        self.global_pool, self.fc = self._head(num_classes, global_pool)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def _head(self, num_classes: int, global_pool: str) -> tuple[GlobalPool, nn.Module]:
        if num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no classifier) or more, got {num_classes}")
        if not global_pool and num_classes:
            raise ValueError("global_pool '' (no pooling) needs num_classes 0: a classifier takes a vector")
        pool = GlobalPool(global_pool)
        fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        return pool, fc

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters a recipe keeps out of weight decay besides norms and biases: those
        each submodule names in its own ``no_weight_decay()`` (GSA's relative tables), as in timm."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
        return names

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups by name for timm's layer-wise learning-rate decay: the stem, then blocks."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier (freshly initialised) for ``num_classes`` outputs (0: none); the pooling
        kept unless ``global_pool`` is given."""
        device = self.conv1.weight.device
        dtype = self.conv1.weight.dtype
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, fc = self._head(num_classes, pool_type)
        self.fc = fc.to(device=device, dtype=dtype)
        self.num_classes = num_classes

    def stage(self, index: int) -> nn.Sequential:
        """Stage ``index`` (1-based)."""
        stage = getattr(self, f"layer{index}")
        assert isinstance(stage, nn.Sequential)
        return stage

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map ``(B, num_features, H/r, W/r)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.num_stages + 1):
            stage = self.stage(index)
            if self.grad_checkpointing and torch.is_grad_enabled():
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout and classify a feature map; ``pre_logits``: stop before the classifier."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

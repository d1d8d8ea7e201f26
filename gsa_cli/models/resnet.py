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

from torch import Tensor, nn

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
    """1x1 conv, BN, ReLU; spatial operator, BN, ReLU; 1x1 conv (x4), BN; residual add, ReLU."""

    def __init__(self, in_channels: int, width: int, *, stride: int, spatial: nn.Module) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = spatial
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A bottleneck ResNet; ``spatial[i]`` builds the spatial operators of stage ``i + 1``.

    Args:
        blocks: Bottlenecks per stage (1 to 4 stages).
        spatial: One spatial-operator factory per stage.
        width: Bottleneck width of the first stage; doubled at each later stage.
        stem: ``"imagenet"`` (7x7 stride-2 conv and 3x3 stride-2 max pool) or ``"cifar"`` (3x3 conv).
        in_channels: Image channels.
        num_classes: Outputs of the classifier.
        img_size: Input height and width the network is built for; sets each stage's feature size,
            which a GSA factory takes as its global span.
        zero_init_residual: Start the last BN of every block at zero, so each block starts as the
            identity (Goyal et al.).
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
    ) -> None:
        super().__init__()
        if len(spatial) != len(blocks):
            raise ValueError(f"need one spatial factory per stage, got {len(spatial)} for {len(blocks)}")
        self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
            size = strided_size(strided_size(img_size, 2), 2)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
            size = img_size
        else:
            raise ValueError(f"unknown stem {stem!r}: expected 'imagenet' or 'cifar'")
        self.bn1 = nn.BatchNorm2d(width)

        channels = width
        self.feature_sizes: list[int] = []  # input size of each stage
        stages: list[nn.Sequential] = []
        for index, (count, factory) in enumerate(zip(blocks, spatial, strict=True)):
            stage_width = width * 2**index
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                if block == 0:
                    self.feature_sizes.append(size)
                layers.append(
                    Bottleneck(
                        channels,
                        stage_width,
                        stride=stride,
                        spatial=factory(stage_width, stride, size),
                    )
                )
                channels = stage_width * EXPANSION
                size = strided_size(size, stride)
            stages.append(nn.Sequential(*layers))
        # Named layer1..layer4, as torchvision's.
        for index, stage in enumerate(stages, start=1):
            self.add_module(f"layer{index}", stage)
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
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

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters a recipe keeps out of weight decay besides norms and biases: those
        each submodule names in its own ``no_weight_decay()`` (GSA's relative tables), as in timm."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
        return names

    def stage(self, index: int) -> nn.Sequential:
        """Stage ``index`` (1-based)."""
        stage = getattr(self, f"layer{index}")
        assert isinstance(stage, nn.Sequential)
        return stage

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.num_stages + 1):
            x = self.stage(index)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)
        return self.fc(x)

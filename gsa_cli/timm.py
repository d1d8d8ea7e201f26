"""The GSA-ResNets in timm's model registry: ``import gsa_cli.timm``, then ``timm.create_model``.

timm has no plugin entry points: its registry holds the models of the modules imported so far, so
importing this module is what registers ``gsa_resnet26``, ``gsa_resnet38``, ``gsa_resnet50`` and
``gsa_resnet101`` (the networks of the ``imagenet26`` .. ``imagenet101`` presets) and their
convolutional twins ``gsa_twin_resnet26`` .. ``gsa_twin_resnet101`` (the same layout with 3x3
convolutions; the 50 and 101 twins are torchvision's ResNets, key for key)::

    import timm
    import gsa_cli.timm  # registers the models

    model = timm.create_model("gsa_resnet26", num_classes=100, img_size=64)

timm's scripts (``train.py``, ``validate.py``, ``benchmark.py`` in its repository) do not import this
module: ``python -m gsa_cli.timm SCRIPT ARGS...`` registers the models, then runs the script.

The entry points take timm's arguments: ``num_classes`` (0: no classifier), ``in_chans``,
``img_size`` (a GSA net's spans are built for it and it is global at that size only, so its
pretrained config says ``fixed_input_size`` and its ``input_size`` is that size), ``drop_rate``,
``global_pool`` (``avg``, ``max``, ``''``), ``features_only`` with ``out_indices`` (the stem's map,
then each stage's: ``feature_info``), ``device``, ``dtype``, and every key of
:class:`~gsa_cli.config.ModelConfig` but ``kind``, ``depth`` and ``layers``, which the name fixes
(``heads=4``, ``gsa_impl="reference"``, ``attention_stages=(3, 4)``). No pretrained weights exist:
``pretrained=True`` needs a source of your own (``pretrained_cfg_overlay=dict(file=PATH)``);
``checkpoint_path`` loads weights after building, a ``gsa train`` checkpoint included (timm reads
its ``model`` entry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import runpy
import sys
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gsa_cli.config import Config, Dataset, ModelConfig, ModelKind, config_from_mapping, config_to_dict
from gsa_cli.data import EVAL_CROP_RATIO, NORMALIZATION
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.models import ResNet, build_resnet
from gsa_cli.models.resnet import POOL_TYPES, stem_output_size, strided_size
from gsa_cli.presets import load_preset

try:
    from timm.models import (
        build_model_with_cfg,
        generate_default_cfgs,
        register_model,
        resolve_pretrained_cfg,
    )
except ModuleNotFoundError as error:
    if error.name is None or error.name.partition(".")[0] != "timm":
        raise  # timm is there but something it needs is not: its own message says what
    raise ImportError('gsa_cli.timm needs timm, an optional extra: pip install "gsa-cli[timm]"') from None

PAPER = "Global Self-Attention Networks for Image Recognition"
PAPER_ID = "arXiv:2010.03019"
# Each registered name: the model kind and the depth of its imagenet{depth} preset.
VARIANTS: dict[str, tuple[ModelKind, int]] = {
    **{f"gsa_resnet{depth}": (ModelKind.GSA, depth) for depth in (26, 38, 50, 101)},
    **{f"gsa_twin_resnet{depth}": (ModelKind.CONV, depth) for depth in (26, 38, 50, 101)},
}
# The model-config keys an entry point takes as keyword arguments: all but those its name fixes.
MODEL_KEYS = frozenset(field.name for field in dataclasses.fields(ModelConfig)) - {"kind", "depth", "layers"}
# timm's arguments that pass through to its builder untouched.
PASSED_ON = frozenset(
    {"features_only", "out_indices", "feature_cls", "output_fmt", "cache_dir", "pretrained_model_args"}
)
TAKEN = frozenset({"num_classes", "in_chans", "img_size", "drop_rate", "global_pool", "device", "dtype"})


@cache
def _preset(kind: ModelKind, depth: int) -> Config:
    return load_preset(f"imagenet{depth}", model=kind)


def _output_size(model: ModelConfig, img_size: int) -> int:
    """Height and width of the last stage's map (what the global pool sees) for ``img_size`` inputs."""
    size = stem_output_size(model.stem.value, img_size)
    for _ in model.stage_blocks[1:]:
        size = strided_size(size, 2)
    return size


def _default_cfg(variant: str) -> dict[str, Any]:
    kind, depth = VARIANTS[variant]
    config = _preset(kind, depth)
    size = config.data.img_size
    mean, std = NORMALIZATION[Dataset.IMAGENET]
    pool = _output_size(config.model, size)
    what = "global self-attention in every bottleneck" if kind is ModelKind.GSA else "3x3 convolutions"
    return {
        "url": "",  # no pretrained weights
        "num_classes": config.data.num_classes,
        "input_size": (config.data.channels, size, size),
        "pool_size": (pool, pool),
        "fixed_input_size": kind is ModelKind.GSA,  # the spans are the feature sizes at input_size
        "crop_pct": EVAL_CROP_RATIO,  # as `gsa eval`: resize to size / 0.875, centre crop
        "interpolation": "bilinear",
        "mean": mean,
        "std": std,
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_name": PAPER,
        "paper_ids": PAPER_ID,
        "description": f"ResNet-{depth} with {what} (gsa-cli preset imagenet{depth}); no pretrained weights",
    }


default_cfgs = generate_default_cfgs({variant: _default_cfg(variant) for variant in VARIANTS})


def _model_config(variant: str, overrides: dict[str, Any]) -> ModelConfig:
    """The preset's model config with ``overrides`` applied and checked as a preset's keys are."""
    kind, depth = VARIANTS[variant]
    preset = _preset(kind, depth)
    if not overrides:
        return preset.model
    raw = config_to_dict(preset)
    raw["model"].update(overrides)
    return config_from_mapping(raw, name=preset.name, source=f"timm.create_model({variant!r})").model


def _count(variant: str, name: str, value: Any, *, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{variant}: {name} must be an integer of at least {least}, got {value!r}")
    return value


def _square(variant: str, img_size: int | Sequence[int]) -> int:
    """``img_size`` as one side: an integer, or a (height, width) pair of equal sides."""
    sides = [img_size] if isinstance(img_size, int) else list(img_size)
    if len(sides) == 2 and sides[0] == sides[1]:
        sides = sides[:1]
    if len(sides) != 1:
        raise ConfigError(
            f"{variant}: img_size must be one side or a square (height, width), got {img_size!r}"
        )
    return _count(variant, "img_size", sides[0], least=1)


def _check_head(variant: str, drop_rate: Any, global_pool: Any, num_classes: int) -> None:
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float) or not 0 <= drop_rate < 1:
        raise ConfigError(f"{variant}: drop_rate must be a number from 0 to below 1, got {drop_rate!r}")
    if global_pool not in POOL_TYPES:
        choices = ", ".join(repr(kind) for kind in POOL_TYPES)
        raise ConfigError(f"{variant}: global_pool must be one of {choices}, got {global_pool!r}")
    if not global_pool and num_classes:
        raise ConfigError(f"{variant}: global_pool '' (no pooling) needs num_classes=0 (no classifier)")


def _network(
    model: ModelConfig,
    *,
    in_chans: int,
    num_classes: int,
    img_size: int,
    drop_rate: float = 0.0,
    global_pool: str = "avg",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ResNet:
    """The network under timm's argument names (what ``build_model_with_cfg`` instantiates)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        network = build_resnet(
            model,
            in_channels=in_chans,
            num_classes=num_classes,
            img_size=img_size,
            drop_rate=drop_rate,
            global_pool=global_pool,
        )
    return network if dtype is None else network.to(dtype)


def _split(variant: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``kwargs`` as model-config overrides, the network's arguments and timm's own, or one line
    naming an argument the entry point does not take."""
    overrides, taken, passed = {}, {}, {}
    for name, value in kwargs.items():
        if name in MODEL_KEYS:
            overrides[name] = value
        elif name in TAKEN:
            taken[name] = value
        elif name in PASSED_ON:
            passed[name] = value
        else:
            known = ", ".join(sorted(TAKEN | PASSED_ON | MODEL_KEYS))
            raise ConfigError(f"{variant} takes no argument {name!r} (it takes: {known})")
    return overrides, taken, passed


def create(
    variant: str,
    pretrained: bool = False,
    *,
    pretrained_cfg: str | dict[str, Any] | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered variant as ``timm.create_model(variant, ...)`` does (see the module's note).

    Raises:
        ConfigError: for an argument the variant does not take or cannot accept, and for
            ``pretrained=True`` without a weight source.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown model {variant!r}: choose one of {', '.join(VARIANTS)}")
    overrides, taken, passed = _split(variant, kwargs)
    model = _model_config(variant, overrides)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
    has_weights = bool(cfg.has_weights or cfg.state_dict)
    if pretrained and not has_weights:
        raise ConfigError(
            f"{variant}: no pretrained weights exist for the gsa-cli models: use pretrained=False, or give "
            "weights of your own (pretrained_cfg_overlay=dict(file=PATH), or checkpoint_path=PATH)"
        )
    in_chans = _count(variant, "in_chans", taken.pop("in_chans", cfg.input_size[0]), least=1)
    num_classes = _count(variant, "num_classes", taken.pop("num_classes", cfg.num_classes), least=0)
    size = _square(variant, taken.pop("img_size", cfg.input_size[-1]))
    _check_head(variant, taken.get("drop_rate", 0.0), taken.get("global_pool", "avg"), num_classes)
    pool = _output_size(model, size)
    # The config describes this network (no weights exist), unless it names weights of the user's.
    described: dict[str, Any] = {
        **cfg.to_dict(),
        "input_size": (in_chans, size, size),
        "pool_size": (pool, pool),
    }
    if not has_weights:
        described["num_classes"] = num_classes
    return build_model_with_cfg(
        lambda **arguments: _network(model, **arguments),
        variant,
        pretrained,
        pretrained_cfg=described,
        feature_cfg={"out_indices": tuple(range(len(model.stage_blocks) + 1))},
        in_chans=in_chans,
        num_classes=num_classes,
        img_size=size,
        **taken,
        **passed,
    )


def gsa_resnet26(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GSA-ResNet-26 (preset ``imagenet26``): GSA in every bottleneck, blocks (1, 2, 4, 1)."""
    return create("gsa_resnet26", pretrained, **kwargs)


def gsa_resnet38(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GSA-ResNet-38 (preset ``imagenet38``): GSA in every bottleneck, blocks (2, 3, 5, 2)."""
    return create("gsa_resnet38", pretrained, **kwargs)


def gsa_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GSA-ResNet-50 (preset ``imagenet50``): GSA in every bottleneck, blocks (3, 4, 6, 3)."""
    return create("gsa_resnet50", pretrained, **kwargs)


def gsa_resnet101(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """GSA-ResNet-101 (preset ``imagenet101``): GSA in every bottleneck, blocks (3, 4, 23, 3)."""
    return create("gsa_resnet101", pretrained, **kwargs)


def gsa_twin_resnet26(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The convolutional twin of ``gsa_resnet26``: 3x3 convolutions, blocks (1, 2, 4, 1)."""
    return create("gsa_twin_resnet26", pretrained, **kwargs)


def gsa_twin_resnet38(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The convolutional twin of ``gsa_resnet38``: 3x3 convolutions, blocks (2, 3, 5, 2)."""
    return create("gsa_twin_resnet38", pretrained, **kwargs)


def gsa_twin_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The convolutional twin of ``gsa_resnet50``: torchvision's ResNet-50, key for key."""
    return create("gsa_twin_resnet50", pretrained, **kwargs)


def gsa_twin_resnet101(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The convolutional twin of ``gsa_resnet101``: torchvision's ResNet-101, key for key."""
    return create("gsa_twin_resnet101", pretrained, **kwargs)


ENTRY_POINTS: tuple[Callable[..., nn.Module], ...] = (
    gsa_resnet26,
    gsa_resnet38,
    gsa_resnet50,
    gsa_resnet101,
    gsa_twin_resnet26,
    gsa_twin_resnet38,
    gsa_twin_resnet50,
    gsa_twin_resnet101,
)


def run_script(argv: Sequence[str]) -> None:
    """Run a Python script (timm's ``train.py``, say) with ``argv[1:]`` as its arguments, as
    ``python SCRIPT ARGS...`` would, in this process where the models are registered."""
    if not argv or argv[0] in ("-h", "--help"):
        raise ConfigError(
            "usage: python -m gsa_cli.timm SCRIPT [ARGS...]: registers the gsa-cli models with timm, "
            "then runs SCRIPT (timm's train.py, validate.py, benchmark.py) with ARGS"
        )
    script = Path(argv[0])
    if not script.is_file():
        raise ConfigError(f"{script}: no such script (give the path to timm's train.py, for one)")
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    # Run as `python -m gsa_cli.timm`: this file is __main__, not gsa_cli.timm; importing the module
    # registers the entry points under their own module's name.
    from gsa_cli.timm import run_script as run

    try:
        run(sys.argv[1:])
    except GsaError as failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(failure.exit_code)
else:
    for entry_point in ENTRY_POINTS:
        register_model(entry_point)

"""Run configuration as frozen dataclasses, with strict loading from plain mappings.

A preset is YAML data with the sections ``data``, ``model`` and ``recipe`` (plus a ``description``).
:func:`config_from_mapping` turns such a mapping into a :class:`Config`, refusing unknown keys, wrong
types and impossible values with the dotted key named; :func:`apply_overrides` applies
``section.key=value`` strings from the command line with the same checks. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gsa_cli.errors import ConfigError, DeprecatedKeyWarning
from gsa_cli.yamlio import dump_yaml, load_yaml_text, shown

# Blocks per stage for each named depth [ours, SASA's].
DEPTHS: dict[int, tuple[int, ...]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}


class ModelKind(str, Enum):
    """The spatial operator of every bottleneck in the GSA stages."""

    GSA = "gsa"
    CONV = "conv"
    FULL = "full"  # dense global multi-head self-attention, the quadratic baseline [ours]


class GsaImplementation(str, Enum):
    """How each GSA module computes its branches (``GlobalSelfAttention2d(implementation=...)``)."""

    AUTO = "auto"  # the fastest for the device: native on the CPU where it builds, else gemm
    REFERENCE = "reference"  # the plain einsums of models/gsa.py, the definition
    GEMM = "gemm"  # the batched-GEMM autograd functions of models/gsa_kernels.py
    NATIVE = "native"  # the fused C++ axial kernel of models/gsa_native.py (gemm where it cannot run)


class Stem(str, Enum):
    IMAGENET = "imagenet"  # 7x7 conv stride 2, BN, ReLU, 3x3 max pool stride 2
    CIFAR = "cifar"  # 3x3 conv stride 1, BN, ReLU
    STRIDE2 = "stride2"  # 3x3 conv stride 2, BN, ReLU: small images (28 px) halved once


class Dataset(str, Enum):
    IMAGENET = "imagenet"
    CIFAR100 = "cifar100"
    DIGITS = "digits"
    FASHION_MNIST = "fashion-mnist"  # the four IDX files of Zalando's Fashion-MNIST (gsa_cli.fashion)
    SYNTHETIC = "synthetic"
    LONGRANGE = "longrange"  # two glyphs a set distance apart: same shape or not (gsa_cli.longrange)


class Optimizer(str, Enum):
    SGD = "sgd"
    ADAMW = "adamw"


@dataclass(frozen=True)
class DataConfig:
    dataset: Dataset
    img_size: int
    num_classes: int
    channels: int = 3
    train_samples: int | None = None  # synthetic and longrange data only
    val_samples: int | None = None  # synthetic and longrange data only
    distance: tuple[int, ...] | None = None  # longrange only: [min, max] glyph distance in pixels
    shapes: int | None = None  # longrange only: how many glyph shapes
    noise: float | None = None  # longrange only: standard deviation of the background noise


@dataclass(frozen=True)
class ModelConfig:
    kind: ModelKind = ModelKind.GSA
    depth: int | None = 50
    layers: tuple[int, ...] | None = None  # blocks per stage; replaces depth when given
    width: int = 64  # bottleneck width of the first stage, doubled at each later stage
    stem: Stem = Stem.IMAGENET
    attention_stages: tuple[int, ...] = (1, 2, 3, 4)  # 1-based stages whose spatial operator is attention
    zero_init_residual: bool = False
    heads: int = 8
    key_ratio: float = 1.0  # d_k = key_ratio * C_out [ours: 1.0, the SASA choice]
    span: int | None = None  # None: global, each module's span is its input feature-map size
    content: bool = True
    positional: bool = True
    query_softmax: bool = False
    gsa_impl: GsaImplementation = GsaImplementation.AUTO  # every implementation computes the same

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        """Blocks per stage, from ``layers`` or the ``depth`` table."""
        if self.layers is not None:
            return self.layers
        assert self.depth is not None  # guaranteed by validation
        return DEPTHS[self.depth]

    def stage_width(self, stage: int) -> int:
        """Bottleneck width (the spatial operator's channels) of a 1-based stage."""
        return self.width * 2 ** (stage - 1)


@dataclass(frozen=True)
class RecipeConfig:
    epochs: int = 90
    batch_size: int = 256
    optimizer: Optimizer = Optimizer.SGD
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    randaugment: bool = False
    ema_decay: float | None = None
    precise_bn_batches: int = 0  # before each evaluation, recompute BN statistics from N batches (0: off)
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """A resolved, validated run configuration."""

    name: str
    description: str
    data: DataConfig
    model: ModelConfig
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


class _InvalidKeyError(Exception):
    """A problem at a dotted key; the caller adds where the value came from."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class _BadValueError(_InvalidKeyError):
    """A value of the right type that no key of that type takes (a union does not try its next arm)."""


MAX_SEED = 2**63 - 1  # torch.manual_seed takes [-2**63, 2**64 - 1]; a run adds its rank and epoch


# ---------------------------------------------------------------------------------------------------
# Building dataclasses from mappings, strictly.


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(member.value) for member in tp)
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise :class:`_InvalidKeyError` naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _BadValueError:
                raise
            except _InvalidKeyError:
                continue
        raise _InvalidKeyError(key, f"expected {_type_name(tp)}, got {shown(value)}")
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise _InvalidKeyError(key, f"expected {_type_name(tp)}, got {shown(value)}")
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp):
        assert isinstance(tp, type)
        return _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise _InvalidKeyError(key, f"expected {_type_name(tp)}, got {shown(value)}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _finite(value, key)
    elif tp is str and isinstance(value, str):
        return value
    raise _InvalidKeyError(key, f"expected {_type_name(tp)}, got {shown(value)}")


def _finite(value: int | float, key: str) -> float:
    try:
        number = float(value)
    except OverflowError:  # an integer past the largest float
        number = math.inf
    if not math.isfinite(number):
        raise _BadValueError(key, f"must be a finite number, got {shown(value)}")
    return number


def _key_name(name: Any) -> str:
    """A key as a message shows it: plain if it is a short name, else its bounded repr."""
    plain = isinstance(name, str) and name.isidentifier() and len(name) <= 40
    return name if plain else shown(name, 40)


def _build(cls: type, data: Any, prefix: str) -> Any:
    section = prefix or "the top level"
    if not isinstance(data, Mapping):
        raise _InvalidKeyError(section, f"expected a mapping of keys to values, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{_key_name(name)}" if prefix else _key_name(name)
        if name not in known:
            raise _InvalidKeyError(key, f"unknown key (known keys: {', '.join(sorted(known))})")
        values[name] = _coerce(value, hints[name], key)
    for name, spec in known.items():
        no_default = spec.default is dataclasses.MISSING
        if name not in values and no_default and spec.default_factory is dataclasses.MISSING:
            key = f"{prefix}.{name}" if prefix else name
            raise _InvalidKeyError(key, f"missing (expected {_type_name(hints[name])})")
    return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Values that are well-typed but impossible.


def _validate_longrange(data: DataConfig) -> None:
    options = {"distance": data.distance, "shapes": data.shapes, "noise": data.noise}
    if data.dataset is not Dataset.LONGRANGE:
        for name, value in options.items():
            if value is not None:
                raise _InvalidKeyError(
                    f"data.{name}", "only the longrange data set takes it (set it to null)"
                )
        return
    if data.distance is None or data.shapes is None or data.noise is None:
        missing = next(name for name, value in options.items() if value is None)
        raise _InvalidKeyError(f"data.{missing}", "the longrange data set needs it")
    # The glyph-specific checks (distance, shapes, noise) live with the generator: gsa_cli.longrange.


def _validate(cfg: Config) -> None:
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_recipe(cfg.recipe)


def _validate_data(data: DataConfig) -> None:
    if data.img_size < 1:
        raise _InvalidKeyError("data.img_size", f"must be at least 1, got {data.img_size}")
    if data.num_classes < 2:
        raise _InvalidKeyError("data.num_classes", f"must be at least 2, got {data.num_classes}")
    if data.channels < 1:
        raise _InvalidKeyError("data.channels", f"must be at least 1, got {data.channels}")
    generated = data.dataset in (Dataset.SYNTHETIC, Dataset.LONGRANGE)
    for name in ("train_samples", "val_samples"):
        count = getattr(data, name)
        if generated and (count is None or count < 1):
            raise _InvalidKeyError(
                f"data.{name}", f"{data.dataset.value} data needs a sample count of at least 1"
            )
    _validate_longrange(data)


def _validate_model(model: ModelConfig) -> None:
    if model.layers is not None:
        if model.depth is not None:
            raise _InvalidKeyError("model.depth", "give either depth or layers, not both (set depth: null)")
        if not 1 <= len(model.layers) <= 4 or min(model.layers) < 1:
            raise _InvalidKeyError("model.layers", "must list 1 to 4 stages of at least one block each")
    elif model.depth not in DEPTHS:
        depths = ", ".join(str(d) for d in DEPTHS)
        raise _InvalidKeyError(
            "model.depth", f"must be one of {depths} (or give model.layers), got {model.depth}"
        )
    if model.width < 1:
        raise _InvalidKeyError("model.width", f"must be at least 1, got {model.width}")
    stages = len(model.stage_blocks)
    if not model.attention_stages and model.kind is not ModelKind.CONV:
        raise _InvalidKeyError(
            "model.attention_stages",
            f"a {model.kind.value} model needs at least one attention stage: list some, or build a "
            "convolutional net with model.kind conv (--model conv)",
        )
    if len(set(model.attention_stages)) != len(model.attention_stages) or any(
        not 1 <= s <= stages for s in model.attention_stages
    ):
        raise _InvalidKeyError("model.attention_stages", f"must be distinct stage numbers from 1 to {stages}")
    if model.heads < 1:
        raise _InvalidKeyError("model.heads", f"must be at least 1, got {model.heads}")
    if model.key_ratio <= 0:
        raise _InvalidKeyError("model.key_ratio", f"must be positive, got {model.key_ratio}")
    for stage in model.attention_stages:
        channels = model.stage_width(stage)
        if channels % model.heads:
            raise _InvalidKeyError(
                "model.heads",
                f"{model.heads} heads do not divide the {channels} channels of stage {stage}",
            )
        keys = channels * model.key_ratio
        if keys != int(keys) or int(keys) % model.heads or keys < model.heads:
            raise _InvalidKeyError(
                "model.key_ratio",
                f"gives {keys:g} key channels in stage {stage}, not a multiple of {model.heads} heads",
            )
    if model.span is not None and model.span < 1:
        raise _InvalidKeyError("model.span", f"must be at least 1 (or null for global), got {model.span}")
    if not (model.content or model.positional):
        raise _InvalidKeyError("model.content", "content and positional cannot both be false")


def _validate_recipe(recipe: RecipeConfig) -> None:
    if recipe.epochs < 1:
        raise _InvalidKeyError("recipe.epochs", f"must be at least 1, got {recipe.epochs}")
    if recipe.batch_size < 1:
        raise _InvalidKeyError("recipe.batch_size", f"must be at least 1, got {recipe.batch_size}")
    if recipe.lr <= 0:
        raise _InvalidKeyError("recipe.lr", f"must be positive, got {recipe.lr}")
    if not 0 <= recipe.momentum < 1:
        raise _InvalidKeyError("recipe.momentum", f"must be in [0, 1), got {recipe.momentum}")
    if recipe.weight_decay < 0:
        raise _InvalidKeyError("recipe.weight_decay", f"must not be negative, got {recipe.weight_decay}")
    if recipe.warmup_epochs < 0:
        raise _InvalidKeyError("recipe.warmup_epochs", f"must not be negative, got {recipe.warmup_epochs}")
    if not 0 <= recipe.label_smoothing < 1:
        raise _InvalidKeyError("recipe.label_smoothing", f"must be in [0, 1), got {recipe.label_smoothing}")
    if recipe.grad_clip is not None and recipe.grad_clip <= 0:
        raise _InvalidKeyError("recipe.grad_clip", f"must be positive or null, got {recipe.grad_clip}")
    for name in ("mixup_alpha", "cutmix_alpha"):
        if getattr(recipe, name) < 0:
            raise _InvalidKeyError(f"recipe.{name}", f"must not be negative, got {getattr(recipe, name)}")
    if recipe.precise_bn_batches < 0:
        raise _InvalidKeyError(
            "recipe.precise_bn_batches",
            f"must be 0 (off) or a number of batches, got {recipe.precise_bn_batches}",
        )
    if recipe.ema_decay is not None and not 0 < recipe.ema_decay < 1:
        raise _InvalidKeyError("recipe.ema_decay", f"must be in (0, 1) or null, got {recipe.ema_decay}")
    if not 0 <= recipe.seed <= MAX_SEED:
        raise _InvalidKeyError(
            "recipe.seed", f"must be an integer from 0 to {MAX_SEED}, got {shown(recipe.seed)}"
        )


# ---------------------------------------------------------------------------------------------------
# Public entry points.


# Keys renamed since a release: (section, old name, new name). The old name is still read, with a note.
RENAMED_KEYS = (("model", "gsa_stages", "attention_stages"),)


def _renamed_keys(document: dict[str, Any], source: str) -> dict[str, Any]:
    """``document`` with each renamed key under its new name, and one deprecation note per old key."""
    for section, old, new in RENAMED_KEYS:
        values = document.get(section)
        if not isinstance(values, Mapping) or old not in values:
            continue
        if new in values:
            raise _InvalidKeyError(f"{section}.{old}", f"give {section}.{new} only ({old} is its old name)")
        _warn_renamed(source, section, old, new, stacklevel=5)
        document[section] = {(new if key == old else key): value for key, value in values.items()}
    return document


def _renamed_path(path: list[str], source: str) -> list[str]:
    """An override's dotted path with a renamed key under its new name (and the deprecation note)."""
    for section, old, new in RENAMED_KEYS:
        if path == [section, old]:
            _warn_renamed(source, section, old, new, stacklevel=4)
            return [section, new]
    return path


def _warn_renamed(source: str, section: str, old: str, new: str, *, stacklevel: int) -> None:
    message = f"{source}: {section}.{old} is deprecated; call it {section}.{new}"
    warnings.warn(message, DeprecatedKeyWarning, stacklevel=stacklevel)


def config_from_mapping(raw: Any, *, name: str, source: str) -> Config:
    """Build and validate a :class:`Config` from a preset mapping.

    Args:
        raw: The parsed YAML document: ``description``, ``data``, ``model``, ``recipe``.
        name: The preset's name (the file's stem).
        source: Where ``raw`` came from, for error messages (a path, or ``--set KEY=VALUE``).

    Raises:
        ConfigError: naming ``source`` and the dotted key at fault.
    """
    try:
        if not isinstance(raw, Mapping):
            raise _InvalidKeyError(
                "the top level", f"expected a mapping with data, model, recipe, got {shown(raw)}"
            )
        document = _renamed_keys(dict(raw), source)
        document.setdefault("description", "")
        if "name" in document:
            raise _InvalidKeyError("name", "unknown key (a preset's name is its file name)")
        cfg = _build(Config, {"name": name, **document}, "")
        _validate(cfg)
    except _InvalidKeyError as err:
        raise ConfigError(f"{source}: {err.key}: {err.message}") from None
    return cfg


def override_source(text: str) -> str:
    """How a message names the override ``text``: ``--set KEY=VALUE``, cut short if long."""
    return "--set " + (text if len(text) <= 100 else text[:97] + "...")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its dotted path and its value, read as YAML 1.2 with bounds."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(
            f"{override_source(text)}: expected KEY=VALUE with a dotted key, e.g. model.heads=4"
        )
    return path, load_yaml_text(value, override_source(text)) if value.strip() else None


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override set into it."""
    document = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        path = _renamed_path(path, override_source(text))
        node = document
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(path[: i + 1])
                raise ConfigError(f"{override_source(text)}: {dotted} is a value, not a section")
            node = child
        node[path[-1]] = value
    return document


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML-ready data (enums as their values, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    document = plain(dataclasses.asdict(cfg))
    document.pop("name")
    return {"description": document.pop("description"), **document}


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as a YAML document that loads back to the same config."""
    return f"# preset: {cfg.name}\n" + dump_yaml(config_to_dict(cfg))

"""Warm starts: a new run's model begins from pretrained weights instead of its random initialisation.

``--init`` (``TrainOptions.init``) names where the weights come from:

- ``torchvision``: torchvision's ImageNet weights (its ``DEFAULT``) of the ResNet with the model's
  blocks per stage (ResNet-50, -101 or -152), through torchvision's weights API, which downloads them
  once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``).
- ``timm``: timm's pretrained ResNet of that layout (``resnet26`` for 2-2-2-2 blocks, ``resnet50``,
  ``resnet101``, ``resnet152``) through ``timm.create_model(pretrained=True)`` (the ``timm`` extra).
- a path: a gsa checkpoint (a run's ``best.pt`` or ``last.pt``, read by :mod:`gsa_cli.train.checkpoint`
  with its checks; a run directory means its ``best.pt``; its EMA weights when the run kept them), or
  a plain state-dict file (a dict of tensors, or one under ``state_dict`` or ``model``).

The ResNet's module names are torchvision's, so a conv ResNet-50 loads torchvision's and timm's
weights key for key. Loading is by name and shape (:func:`apply_weights`): a tensor is loaded where
the model has the same name with the same shape, and every other is reported: *missing* (the model's,
not in the weights; they keep their initialisation: a GSA twin's attention layers, which replace the
conv's 3x3 kernels), *unexpected* (the weights', not the model's: those 3x3 kernels), *shape mismatch*
(in both with other shapes; initialised: a classifier for another number of classes, a stem for
other channels or another kernel). The report (:class:`WarmStart`) is shown as a table at the start
and kept in the run directory as ``init.json``; the summary names its source (``init``).

The weights' loaders (:func:`torchvision_weights`, :func:`timm_weights`) are module attributes, so
that tests can feed them weights without a network.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gsa_cli.config import ModelConfig
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.results import BEST_CHECKPOINT, atomic_write_text
from gsa_cli.train.checkpoint import CHECKPOINT_FORMAT, Checkpoint

SOURCES = ("torchvision", "timm")
INIT_FILE = "init.json"  # the report, in the run directory

# The pretrained ResNets of each layout (blocks per stage); ours are all width 64 at the first stage.
TORCHVISION_RESNETS: dict[tuple[int, ...], str] = {
    (3, 4, 6, 3): "resnet50",
    (3, 4, 23, 3): "resnet101",
    (3, 8, 36, 3): "resnet152",
}
TIMM_RESNETS: dict[tuple[int, ...], str] = {(2, 2, 2, 2): "resnet26", **TORCHVISION_RESNETS}
PRETRAINED_WIDTH = 64

StateDict = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------------
# The report.


@dataclass(frozen=True)
class WarmStart:
    """What a warm start loaded into a model, and what it did not.

    Args (fields):
        source: Where the weights came from, in words (``torchvision ResNet50_Weights.IMAGENET1K_V2``).
        loaded: Tensor names loaded.
        missing: The model's tensors the weights lack (initialised as usual).
        unexpected: The weights' tensors the model lacks (ignored).
        mismatched: Tensors in both with other shapes: ``(name, the model's shape, the weights')``.
        notes: Lines that explain what was skipped (the classifier).
    """

    source: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    notes: tuple[str, ...] = field(default=())

    def rows(self) -> list[tuple[str, int, list[str]]]:
        """The table's rows: what, how many tensors, their names grouped by module."""
        mismatched = [name for name, _, _ in self.mismatched]
        return [
            ("loaded", len(self.loaded), group_names(self.loaded)),
            ("missing (initialised)", len(self.missing), group_names(self.missing)),
            ("unexpected (ignored)", len(self.unexpected), group_names(self.unexpected)),
            ("shape mismatch (initialised)", len(mismatched), group_names(mismatched)),
        ]

    def tell(self, message: Callable[[str], None]) -> None:
        """Pass the report to ``message`` as plain lines (for a reporter without tables)."""
        message(f"warm start from {self.source}:")
        for what, count, groups in self.rows():
            message(f"  {what}: {count}  {', '.join(groups)}".rstrip())
        for note in self.notes:
            message(note)


def group_names(names: Iterable[str]) -> list[str]:
    """Tensor names grouped by the module that holds them, with block numbers as ``*`` and stages
    merged, and a count each: ``layer{1,2,3,4}.*.conv2 (48)``, ``fc (2)``."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        module: list[str] = []
        for part in parts[:-1] or parts:  # the tensor's own name dropped
            module.append("*" if part.isdigit() else part)
            if not part.isdigit() and len(module) > 1 and module[-2] == "*":
                break  # a block's own module (conv2, downsample)
        key = ".".join(module)
        counts[key] = counts.get(key, 0) + 1
    merged: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for key, count in counts.items():
        first, dot, rest = key.partition(".")
        numbered = re.fullmatch(r"(.*?)(\d+)", first) if dot else None  # layer1 of layer1.*.conv2
        stem, number = (numbered.group(1), numbered.group(2)) if numbered else (first, "")
        merged.setdefault((stem, dot + rest), []).append((number, count))
    groups = []
    for (stem, rest), members in merged.items():
        numbers = [number for number, _ in members]
        label = numbers[0] if len(numbers) == 1 else "{" + ",".join(numbers) + "}"
        groups.append(f"{stem}{label}{rest} ({sum(count for _, count in members)})")
    return groups


# ---------------------------------------------------------------------------------------------------
# Loading by name and shape.


def _classifier_prefix(model: nn.Module) -> str | None:
    """The classifier's module name (``fc``), from the model's ``get_classifier()``."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return None
    classifier = get()
    return next((name for name, module in model.named_modules() if module is classifier and name), None)


def apply_weights(model: nn.Module, weights: Mapping[str, Tensor], source: str) -> WarmStart:
    """Load every tensor of ``weights`` that ``model`` has under the same name with the same shape.

    Raises:
        ConfigError: when no tensor fits (weights of another architecture or width).
    """
    own = model.state_dict()
    fits = {
        name: tensor for name, tensor in weights.items() if name in own and own[name].shape == tensor.shape
    }
    mismatched = tuple(
        (name, tuple(own[name].shape), tuple(tensor.shape))
        for name, tensor in weights.items()
        if name in own and own[name].shape != tensor.shape
    )
    if not fits:
        raise ConfigError(
            f"--init {source}: none of its {len(weights)} tensors fits this model "
            f"({len(mismatched)} of another shape, the others of other names); it holds weights of "
            "another architecture: start from weights of this model's layout and width"
        )
    model.load_state_dict(fits, strict=False)
    notes = []
    prefix = _classifier_prefix(model)
    weight = f"{prefix}.weight"
    skipped = [item for item in mismatched if item[0] == weight]
    if skipped:
        _, ours, theirs = skipped[0]
        notes.append(
            f"the classifier ({prefix}) starts fresh: the weights have {theirs[0]} classes, this model "
            f"{ours[0]}"
        )
    return WarmStart(
        source=source,
        loaded=tuple(fits),
        missing=tuple(name for name in own if name not in weights),
        unexpected=tuple(name for name in weights if name not in own),
        mismatched=mismatched,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------------
# The sources.


def _pretrained_name(table: Mapping[tuple[int, ...], str], model: ModelConfig, source: str) -> str:
    """The pretrained ResNet of ``model``'s layout in ``table``.

    Raises:
        ConfigError: for a layout or width without pretrained weights there.
    """
    blocks = model.stage_blocks
    known = ", ".join(f"{name} ({'-'.join(map(str, layout))})" for layout, name in table.items())
    if blocks not in table:
        raise ConfigError(
            f"--init {source}: {source} has ImageNet ResNets of these blocks per stage: {known}; this "
            f"model has {'-'.join(map(str, blocks))}: use a preset of one of those depths, or a checkpoint"
        )
    if model.width != PRETRAINED_WIDTH:
        raise ConfigError(
            f"--init {source}: {table[blocks]} has width {PRETRAINED_WIDTH}, this model model.width "
            f"{model.width}: set model.width={PRETRAINED_WIDTH}, or start from a checkpoint"
        )
    return table[blocks]


def torchvision_weights(model: ModelConfig) -> tuple[StateDict, str]:
    """torchvision's ImageNet weights (its DEFAULT) of ``model``'s layout, and their name.

    Raises:
        ConfigError: for a layout without torchvision weights.
        GsaError: when they cannot be downloaded (and are not in torch's hub cache yet).
    """
    from torch.hub import get_dir, load_state_dict_from_url
    from torchvision.models import get_model_weights

    weights = get_model_weights(_pretrained_name(TORCHVISION_RESNETS, model, "torchvision")).DEFAULT
    try:
        state = load_state_dict_from_url(weights.url, map_location="cpu", weights_only=True)
    except OSError as err:  # no network (URLError), a refused download, a cache that cannot be written
        raise GsaError(
            f"--init torchvision: could not download {weights} from {weights.url} ({err}); put that file "
            f"in {Path(get_dir()) / 'checkpoints'} to use it offline"
        ) from None
    return state, f"torchvision {weights}"


def timm_weights(model: ModelConfig) -> tuple[StateDict, str]:
    """timm's pretrained weights (its default tag) of ``model``'s layout, and their name.

    Raises:
        ConfigError: for a layout without timm weights, or without timm installed.
        GsaError: when they cannot be downloaded (and are not in the Hugging Face cache yet).
    """
    timm = _import_timm()
    name = _pretrained_name(TIMM_RESNETS, model, "timm")
    try:
        network = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError) as err:  # a failed download from the Hugging Face hub
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GsaError(f"--init timm: could not get timm's {name} weights ({reason})") from None
    tag = network.pretrained_cfg.get("tag")
    return network.state_dict(), f"timm {name}.{tag}" if tag else f"timm {name}"


def _import_timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise ConfigError("--init timm needs the timm package: pip install 'gsa-cli[timm]'") from None


def _tensors(value: Any) -> StateDict | None:
    """``value`` as a state dict (a DDP ``module.`` prefix dropped), if it is a dict of tensors."""
    if not isinstance(value, Mapping) or not value:
        return None
    if not all(isinstance(key, str) and isinstance(item, Tensor) for key, item in value.items()):
        return None
    return {key.removeprefix("module."): item for key, item in value.items()}


def _read(path: Path) -> Any:
    """A torch file read as plain tensors and data (``weights_only``), never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():
            raise GsaError(
                f"--init {path}: refused: the file carries Python objects or code, and weights are only "
                "loaded as plain tensors and data (weights_only); do not load files you do not trust"
            ) from None
        raise GsaError(f"--init {path}: not a readable weights file (corrupt or not a torch file)") from None
    except Exception as err:  # torch.load's many ways to fail on a file that is not one of its own
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GsaError(f"--init {path}: not a readable weights file ({reason})") from None


def file_weights(path: Path) -> tuple[StateDict, str]:
    """The weights of a gsa checkpoint (its EMA's when it has them) or of a plain state-dict file.

    Raises:
        GsaError: for a path that is not there, a file that is not a readable torch file, or one
            without a state dict.
    """
    path = checkpoint_path(path)
    payload = _read(path)
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        checkpoint = Checkpoint.load(path)  # with the checkpoint's own checks (keys, checksum)
        if checkpoint.ema is not None:
            return dict(checkpoint.ema), f"{path} (EMA weights, epoch {checkpoint.epoch})"
        return dict(checkpoint.model), f"{path} (epoch {checkpoint.epoch})"
    nested = [payload.get(key) for key in ("state_dict", "model")] if isinstance(payload, dict) else []
    for candidate in (payload, *nested):
        state = _tensors(candidate)
        if state is not None:
            return state, str(path)
    raise GsaError(
        f"--init {path}: holds no state dict (a dict of tensors, or one under 'state_dict' or 'model'), "
        "nor is it a gsa checkpoint"
    )


def checkpoint_path(path: Path) -> Path:
    """The file ``--init PATH`` reads: the path, or a run directory's ``best.pt``.

    Raises:
        GsaError: for a path that does not exist, or a folder without ``best.pt``.
    """
    if path.is_dir():
        if not (path / BEST_CHECKPOINT).is_file():
            raise GsaError(f"--init {path}: a folder without {BEST_CHECKPOINT}; give a checkpoint file")
        return path / BEST_CHECKPOINT
    if not path.is_file():
        raise GsaError(
            f"--init {path}: no such file; give torchvision, timm, a checkpoint or a run directory"
        )
    return path


def check_init(init: str | None) -> None:
    """Refuse, before anything starts, an ``--init`` that cannot work: a missing timm or path.

    Raises:
        ConfigError: for ``timm`` without the timm package.
        GsaError: for a path that is not there.
    """
    if init == "timm":
        _import_timm()
    elif init is not None and init not in SOURCES:
        checkpoint_path(Path(init))


def warm_start(model: nn.Module, init: str, config: ModelConfig) -> WarmStart:
    """Load the weights ``init`` names into ``model`` (see the module); what loaded and what did not.

    Raises:
        ConfigError: for a source without weights of this layout, or weights that fit nothing.
        GsaError: for weights that cannot be had (a download, a file).
    """
    if init == "torchvision":
        weights, source = torchvision_weights(config)
    elif init == "timm":
        weights, source = timm_weights(config)
    else:
        weights, source = file_weights(Path(init))
    return apply_weights(model, weights, source)


# ---------------------------------------------------------------------------------------------------
# The record in the run directory.


def write_record(run_dir: Path, report: WarmStart) -> None:
    """Write ``init.json``: the source and every tensor name, by what happened to it."""
    record = asdict(report)
    record["mismatched"] = [
        {"name": name, "model": list(ours), "weights": list(theirs)}
        for name, ours, theirs in report.mismatched
    ]
    atomic_write_text(run_dir / INIT_FILE, json.dumps(record, indent=2) + "\n")


def recorded_source(run_dir: Path) -> str | None:
    """The source of a run's warm start, from its ``init.json``; None for a run without one."""
    try:
        source = json.loads((run_dir / INIT_FILE).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None

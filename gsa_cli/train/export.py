"""Exporting a trained run's model with a dynamic batch, checked against eager: what ``gsa export`` calls.

The checkpoint is resolved as ``gsa eval`` resolves it (a run directory's ``best.pt``, else its
``last.pt``, or a checkpoint file), its model rebuilt on the CPU in float32 and eval mode with the EMA
weights when it has them (``ema=False``: the trained ones) and GSA's batched-GEMM kernels (plain aten
operators; the native kernel is a custom operator that ONNX cannot translate), and exported for images
of one size (the run's by default; GSA's relative index is built for it) and any batch:

- ``pt2``: ``torch.export.export`` with the batch a ``Dim``, saved by ``torch.export.save``; load it with
  ``torch.export.load(path).module()``.
- ``onnx``: the dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``), one file with its weights,
  input ``images`` of shape ``(batch, C, H, W)``, output ``logits``. It needs the optional extra
  ``gsa-cli[onnx]`` (onnx, onnxscript, onnxruntime), imported only here.

Where it came from (the checkpoint, its epoch, which weights, the preset, the image size, torch's
version) is recorded inside the file: the ONNX model's metadata, the ``.pt2`` archive's ``gsa.json``.

The file is checked before it is put in place: written to a temporary file beside its path, loaded back
(``torch.export.load``; an ONNX Runtime session on the CPU), run on random images in batches of 1 and 32,
and compared with the eager model on the same images. Only when both are within tolerance is it renamed
into place (atomically, as the run's files are); otherwise nothing is written. An existing file is
replaced only with ``force``.

The tolerance bounds the largest difference relative to the largest logit:
``max |exported - eager| <= tolerance * max(1, max |eager|)``. The exported graph computes the same
float32 operations in other orders (ONNX Runtime's kernels and fusions), so its logits differ from eager
by rounding that grows with the net's depth and the size of its activations. Measured (CPU, batches 1
and 32): the ``.pt2`` equal to eager at the run's size; ONNX 3e-8 (of the floor of 1) on the digits
and fashion nets as built, 1e-6 to 4e-6 of the largest logit on the smoke net as built and 8e-6 to 9e-6
once trained an epoch (whose activations are large: logits up to 1e12). The default
:data:`TOLERANCE`, 1e-3, is two orders of magnitude above the largest of these, while a wrong operator,
a dropped branch or other weights differ by the order of the logits themselves. The floor of 1 keeps
logits near zero from asking for more than float32's absolute precision.
"""

from __future__ import annotations

import importlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from gsa_cli.choices import ExportFormat
from gsa_cli.config import Config, GsaImplementation
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.models import build_model
from gsa_cli.results import atomic_write
from gsa_cli.train.checkpoint import Checkpoint, config_from_checkpoint, resolve_checkpoint
from gsa_cli.train.integrity import load_weights

TOLERANCE = 1e-3  # of the largest logit (at least 1): see the module's note
CHECK_BATCHES = (1, 32)  # the batches an export is checked on
EXAMPLE_BATCH = 2  # the batch traced: 1 would be specialised (a size of 1 is never symbolic)
SUFFIXES = {ExportFormat.PT2: ".pt2", ExportFormat.ONNX: ".onnx"}
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
SEED = 0  # of the random images the export is checked on


@dataclass(frozen=True)
class ExportOptions:
    format: ExportFormat
    out: Path | None = None  # default: beside the checkpoint, its name with the format's suffix
    ema: bool = True  # export the EMA weights when the checkpoint has them
    img_size: int | None = None  # default: the run's
    tolerance: float | None = None  # default: TOLERANCE
    force: bool = False  # replace an existing file


@dataclass(frozen=True)
class BatchCheck:
    """The exported program against the eager model on one batch of random images."""

    batch: int
    max_diff: float  # max |exported - eager| over the logits
    max_eager: float  # max |eager|: the scale the tolerance is relative to
    limit: float  # tolerance * max(1, max_eager)

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.limit


@dataclass(frozen=True)
class ExportReport:
    checkpoint: Path
    path: Path
    format: ExportFormat
    weights: str  # "ema" or "model"
    epoch: int
    input_shape: tuple[int | str, ...]  # the batch by name: ("batch", C, H, W)
    opset: int | None  # ONNX's default-domain opset
    size_bytes: int
    tolerance: float
    checks: tuple[BatchCheck, ...]


class ExportCheckError(GsaError):
    """An exported program whose logits differ from the eager model's beyond the tolerance."""


Progress = Callable[[str], None]


def export_checkpoint(
    target: Path, options: ExportOptions, *, progress: Progress | None = None
) -> ExportReport:
    """Export a run's (or a checkpoint file's) model, check it against eager, and write it.

    Args:
        target: A run directory or a checkpoint file.
        progress: Called with a line before each slow step.

    Raises:
        GsaError: for a missing or unreadable checkpoint, the ONNX extra missing, an export torch
            refuses, or a check beyond the tolerance (:class:`ExportCheckError`); nothing is written.
        ConfigError: for a file already there (without ``force``), the checkpoint itself as the output,
            or a tolerance or image size out of range.
        WriteError: if the file cannot be written.
    """
    say = progress or (lambda line: None)
    tolerance = _tolerance(options)
    source = resolve_checkpoint(target)
    out = _output_path(source, options)
    if options.format is ExportFormat.ONNX:
        _require_onnx()
    checkpoint = Checkpoint.load(source)
    config = _gemm(config_from_checkpoint(checkpoint, source))
    weights = checkpoint.ema if options.ema and checkpoint.ema is not None else checkpoint.model
    weights_name = "ema" if weights is checkpoint.ema else "model"
    model = build_model(config)
    load_weights(model, weights, source, weights_name)  # weights that do not fit: one line, not a traceback
    model.eval()
    size = options.img_size or config.data.img_size
    images = _images(config.data.channels, size)
    say(f"running {source} eagerly")
    with torch.inference_mode():
        eager = {batch: model(images[batch]) for batch in CHECK_BATCHES}
    _check_finite(eager, source)
    about = _provenance(source, checkpoint, config, weights_name, size)
    say(f"exporting {source} ({options.format.value})")
    export = _pt2 if options.format is ExportFormat.PT2 else _onnx
    save, load, opset = export(model, images[EXAMPLE_BATCH], about)
    checks: list[BatchCheck] = []

    def write_checked(file: IO[bytes]) -> None:
        save(file)
        file.flush()
        say(f"checking {out.name} against eager on batches of {' and '.join(map(str, CHECK_BATCHES))}")
        checks.extend(_compare(load(Path(file.name)), images, eager, tolerance, out))
        _refuse_failed(checks, tolerance, out)  # raising here removes the temporary file

    atomic_write(out, write_checked)
    return ExportReport(
        checkpoint=source,
        path=out,
        format=options.format,
        weights=weights_name,
        epoch=checkpoint.epoch,
        input_shape=("batch", config.data.channels, size, size),
        opset=opset,
        size_bytes=out.stat().st_size,
        tolerance=tolerance,
        checks=tuple(checks),
    )


# ---------------------------------------------------------------------------------------------------
# Before the slow work: where the file goes, what it needs.


def _tolerance(options: ExportOptions) -> float:
    """The tolerance asked for, or :data:`TOLERANCE`; checks the image size too."""
    if options.img_size is not None and options.img_size < 1:
        raise ConfigError(f"--img-size {options.img_size}: must be at least 1")
    tolerance = TOLERANCE if options.tolerance is None else options.tolerance
    if not tolerance > 0:  # NaN included
        raise ConfigError(f"--tolerance {tolerance}: must be above 0")
    return tolerance


def _output_path(source: Path, options: ExportOptions) -> Path:
    """``options.out``, or the checkpoint's name with the format's suffix beside it; refused when it
    would replace the checkpoint itself, or an existing file without ``force``."""
    out = options.out or source.with_suffix(SUFFIXES[options.format])
    if out.exists() and out.resolve() == source.resolve():
        raise ConfigError(f"--out {out}: that is the checkpoint being exported; name another file")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; name the file to write")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: no folder {out.parent}; make it first, or name another --out")
    if out.exists() and not options.force:
        raise ConfigError(f"{out}: already exists; add --force to replace it, or name another --out")
    return out


def _require_onnx() -> None:
    """Import the ONNX extra's packages, or say in one line how to install them."""
    for name in ONNX_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            raise GsaError(
                f"--format onnx needs {name} (with {', '.join(n for n in ONNX_EXTRA if n != name)}): "
                "pip install 'gsa-cli[onnx]'"
            ) from None


def _gemm(config: Config) -> Config:
    """The config with GSA's batched-GEMM kernels: aten operators only, which the ONNX exporter
    translates and a ``.pt2`` runs without this package (the native kernel is a custom operator of
    ours). Every implementation computes the same."""
    return replace(config, model=replace(config.model, gsa_impl=GsaImplementation.GEMM))


def _images(channels: int, size: int) -> dict[int, Tensor]:
    """Random images (standard normal, as normalised ones are about), for the example and each check."""
    generator = torch.Generator().manual_seed(SEED)
    return {
        batch: torch.randn(batch, channels, size, size, generator=generator)
        for batch in (EXAMPLE_BATCH, *CHECK_BATCHES)
    }


def _check_finite(eager: dict[int, Tensor], source: Path) -> None:
    for batch, logits in eager.items():
        if not torch.isfinite(logits).all():
            raise GsaError(
                f"{source}: the model's logits on random images (batch {batch}) are not finite; "
                "there is nothing to check an export against"
            )


def _provenance(
    source: Path, checkpoint: Checkpoint, config: Config, weights: str, size: int
) -> dict[str, str]:
    """What the exported file records of where it came from."""
    return {
        "gsa.checkpoint": str(source),
        "gsa.epoch": str(checkpoint.epoch),
        "gsa.weights": weights,
        "gsa.preset": config.name,
        "gsa.model_kind": config.model.kind.value,
        "gsa.img_size": str(size),
        "gsa.torch_version": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------------
# The two formats: export, save to a file, and run the saved file.

Saver = Callable[[IO[bytes]], None]
Runner = Callable[[Tensor], Tensor]


def _dynamic_batch() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for ``forward(x)``: the batch (dimension 0) any size from 1."""
    return ({0: torch.export.Dim("batch", min=1)},)


def _exported(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    except Exception as err:  # torch's many export errors, each of them a refusal of this model
        raise GsaError(f"torch.export refused the model: {_first_line(err)}") from err


def _pt2(
    model: nn.Module, example: Tensor, about: dict[str, str]
) -> tuple[Saver, Callable[[Path], Runner], int | None]:
    program = _exported(model, example)

    def save(file: IO[bytes]) -> None:
        torch.export.save(program, file, extra_files={"gsa.json": json.dumps(about, indent=2)})

    def load(path: Path) -> Runner:
        # From its bytes: torch.export.load takes a path only by a name ending .pt2 (a temporary has not).
        module = torch.export.load(io.BytesIO(path.read_bytes())).module()
        return lambda images: module(images)

    return save, load, None


def _onnx(
    model: nn.Module, example: Tensor, about: dict[str, str]
) -> tuple[Saver, Callable[[Path], Runner], int | None]:
    import onnx

    onnxruntime = importlib.import_module("onnxruntime")  # untyped

    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_dynamic_batch(),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            verbose=False,
        )
    except Exception as err:  # the exporter's errors, each of them a refusal of this model
        raise GsaError(f"the ONNX exporter refused the model: {_first_line(err)}") from err
    assert program is not None  # dynamo=True returns the program
    proto = program.model_proto
    onnx.helper.set_model_props(proto, about)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    data = proto.SerializeToString()

    def load(path: Path) -> Runner:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(images: Tensor) -> Tensor:
            (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})
            return torch.from_numpy(np.asarray(logits))

        return run

    def save(file: IO[bytes]) -> None:
        file.write(data)

    return save, load, opset


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------------
# The check.


def _compare(
    run: Runner, images: dict[int, Tensor], eager: dict[int, Tensor], tolerance: float, out: Path
) -> list[BatchCheck]:
    """Run the exported program on each check's images, and measure it against eager."""
    checks = []
    for batch in CHECK_BATCHES:
        with torch.inference_mode():
            exported = run(images[batch])
        reference = eager[batch]
        if exported.shape != reference.shape:
            raise ExportCheckError(
                f"{out}: not written: for a batch of {batch} the export gives logits of shape "
                f"{tuple(exported.shape)}, eager {tuple(reference.shape)}"
            )
        scale = reference.abs().max().item()
        diff = (exported.double() - reference.double()).abs().max().item()
        checks.append(BatchCheck(batch, diff, scale, tolerance * max(1.0, scale)))
    return checks


def _refuse_failed(checks: list[BatchCheck], tolerance: float, out: Path) -> None:
    for check in checks:
        if not check.ok:  # a NaN difference fails too
            raise ExportCheckError(
                f"{out}: not written: at batch {check.batch} the export's logits differ from eager by up "
                f"to {check.max_diff:.3g}, more than {check.limit:.3g} (--tolerance {tolerance:g} of "
                f"{max(1.0, check.max_eager):.3g}, the largest logit)"
            )

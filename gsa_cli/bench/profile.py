"""What a model costs on this machine: parameters, multiply-adds, throughput, memory, achieved rate.

:func:`profile` measures one config at every (image size, batch size) pair of a
:class:`ProfileSettings` and returns one :class:`ProfileRow` per pair, each recording how its numbers
were obtained (device, torch version, precision, layout, compile, counter). How it measures:

* **MACs**: :func:`gsa_cli.bench.macs.count_macs`, batch 1, eval mode, on the uncompiled model built for
  that image size (so that a GSA model stays global at every size).
* **Throughput**: inference under ``torch.inference_mode`` in eval mode; a training step is forward,
  cross-entropy, backward and an SGD step (a gradient scaler under fp16). Each gets warm-up iterations,
  then timed ones; each timed iteration ends with a device synchronisation and is timed with CUDA
  events on a GPU, ``time.perf_counter`` on the CPU. Reported: the median latency per batch and its
  interquartile range, and images/s = batch / median latency. Inputs are random normal, never zeros.
  Each mode gets a freshly built model, so that one mode's state (weights, caches) cannot leak into
  the other's.
* **Peak memory** of each mode (:func:`gsa_cli.bench.timers.peak_memory`), above a baseline taken
  before its model is built: what the model, its inputs and its steps held at most (weights and
  activations; gradients and momentum too for a training step). ``torch.cuda.max_memory_allocated``
  less the allocation before, on a GPU; on the CPU the peak resident set during the mode less the
  resident set without the model (the larger of before and after: one-time library set-up its first
  step triggers stays in the baseline). The baseline and, on the CPU, the whole process's peak are
  columns of their own.
* **Achieved rate**: TFLOP/s = 2 FLOPs per counted MAC x MACs per image x images/s, times 3 for a
  training step (backward taken as twice the forward); on GPUs of known dense peak
  (:data:`gsa_cli.bench.timers.DENSE_PEAKS`) also the percentage of that peak.
* **CPU wait**: the share of each mode's wall time during which some task on the machine waited for a
  CPU (:func:`gsa_cli.bench.timers.cpu_wait`, Linux PSI): high values flag timings taken on a busy machine.
* An out-of-memory error is recorded in its row (``status``) and the sweep goes on.

:func:`profile_kinds` profiles several configs (model kinds) one after another, for ``gsa compare``.
The rows are data: :mod:`gsa_cli.report.profile` and :mod:`gsa_cli.report.compare` make the tables, and
:mod:`gsa_cli.bench.breakdown` breaks a count down by module and operator.
"""

from __future__ import annotations

import dataclasses
import gc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gsa_cli.bench.macs import MacCount, count_macs
from gsa_cli.bench.timers import (
    Timing,
    cpu_wait,
    dense_peak,
    is_out_of_memory,
    memory_label,
    peak_memory,
    time_steps,
)
from gsa_cli.choices import MacCounter, Mode
from gsa_cli.config import Config, ModelKind
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.models import build_model
from gsa_cli.models.gsa_native import implementation_that_runs
from gsa_cli.runtime import (
    Precision,
    autocast,
    device_name,
    resolve_device,
    seed_everything,
    too_small_for_batch_norm,
)

# Defaults that keep `gsa profile` under two minutes on a 2-core CPU (GSA-ResNet-50 at 224 px).
CPU_DEFAULTS = {"batch": 4, "warmup": 2, "iters": 5}
CUDA_DEFAULTS = {"batch": 64, "warmup": 10, "iters": 40}  # timm benchmark.py's iterations


@dataclass(frozen=True)
class ProfileSettings:
    """How to profile; ``None`` picks a default for the device (:data:`CPU_DEFAULTS`, :data:`CUDA_DEFAULTS`).

    Attributes:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: fp32, or bf16/fp16 autocast.
        batch_sizes: One row per batch size (and image size).
        img_sizes: Image sizes; ``None``: the preset's.
        mode: Time inference, a training step, or both.
        channels_last: Inputs and model in channels-last memory format.
        compile: Time a ``torch.compile``d model (warm-up includes the compilation).
        warmup: Untimed iterations before the timed ones.
        iters: Timed iterations.
        counter: The MAC counter.
        seed: Seeds the model's initialisation and the random inputs.
    """

    device: str = "auto"
    precision: Precision = Precision.FP32
    batch_sizes: tuple[int, ...] | None = None
    img_sizes: tuple[int, ...] | None = None
    mode: Mode = Mode.BOTH
    channels_last: bool = False
    compile: bool = False
    warmup: int | None = None
    iters: int | None = None
    counter: MacCounter = MacCounter.FVCORE
    seed: int = 0


@dataclass
class ProfileRow:
    """One measured (model, image size, batch size); ``None`` where not measured."""

    preset: str
    model: str
    img_size: int
    batch: int
    params: int
    trainable_params: int
    gmacs: float  # per image, batch 1, eval mode
    gmacs_products: float  # of which products (conv, linear, matmul-like, attention)
    g_elementwise: float | None  # elementwise ops per image, not in gmacs (fvcore only)
    gmacs_spatial: float  # of gmacs, in the blocks' spatial operators (conv 3x3, GSA or dense attention)
    infer_img_s: float | None = None
    infer_ms: float | None = None  # median latency per batch
    infer_ms_iqr: float | None = None  # interquartile range of the latency
    infer_peak_mib: float | None = None  # above the baseline: the model's weights, inputs, activations
    infer_baseline_mib: float | None = None  # the process without the model (CPU RSS, GPU allocated)
    infer_process_mib: float | None = None  # the whole process's peak RSS (CPU only)
    infer_tflops: float | None = None
    infer_peak_pct: float | None = None
    infer_cpu_wait_pct: float | None = None  # share of the time some task waited for a CPU (PSI)
    train_img_s: float | None = None
    train_ms: float | None = None
    train_ms_iqr: float | None = None
    train_peak_mib: float | None = None  # also gradients and optimizer state
    train_baseline_mib: float | None = None
    train_process_mib: float | None = None
    train_tflops: float | None = None
    train_peak_pct: float | None = None
    train_cpu_wait_pct: float | None = None
    status: str = "ok"
    device: str = ""
    torch: str = torch.__version__
    precision: str = "fp32"
    layout: str = "nchw"
    compile: bool = False
    counter: str = "fvcore"
    memory: str = ""  # what the peak memory columns measure
    dense_peak_tflops: float | None = None  # the peak behind *_peak_pct, and its math mode below
    peak_math: str | None = None
    warmup: int = 0
    iters: int = 0
    uncounted: str = ""  # operators the counter left out
    gsa_impl: str | None = None  # what the GSA modules ran: "native", "gemm" or "reference"; None: none


@dataclass
class ProfileResult:
    """The rows of a profile, and the MAC counts behind them (by image size) for breakdowns."""

    rows: list[ProfileRow]
    counts: dict[int, MacCount] = field(default_factory=dict)
    module_params: dict[int, dict[str, int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# One row.


@dataclass(frozen=True)
class _Run:
    """Everything fixed for the rows of one profile."""

    device: torch.device
    precision: Precision
    channels_last: bool
    compile: bool
    warmup: int
    iters: int
    seed: int

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def _fresh_model(config: Config, run: _Run) -> nn.Module:
    seed_everything(run.seed)
    return build_model(config).to(run.device).to(memory_format=run.memory_format)


def _inputs(config: Config, batch: int, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(run.seed)
    size, channels = config.data.img_size, config.data.channels
    images = torch.randn(batch, channels, size, size, generator=generator)
    labels = torch.randint(config.data.num_classes, (batch,), generator=generator)
    images = images.to(run.device).contiguous(memory_format=run.memory_format)
    return images, labels.to(run.device)


def _compiled(model: nn.Module, run: _Run) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(model) if run.compile else model


def _infer_steps(config: Config, batch: int, run: _Run) -> tuple[list[float], float | None]:
    """Build a model and time inference; return the latencies and the CPU wait. The model, its inputs
    and their memory are gone when this returns (the baseline of :func:`_time_inference`)."""
    model = _fresh_model(config, run).eval()
    forward = _compiled(model, run)
    images, _ = _inputs(config, batch, run)

    def step() -> None:
        with torch.inference_mode(), autocast(run.device, run.precision):
            forward(images)

    with cpu_wait() as waited:
        latencies = time_steps(step, device=run.device, warmup=run.warmup, iters=run.iters)
    return latencies, waited[0] if waited else None


def _train_steps(config: Config, batch: int, run: _Run) -> tuple[list[float], float | None]:
    """Build a model and time training steps (forward, cross-entropy, backward, SGD with momentum);
    return the latencies and the CPU wait, the model and its optimizer gone."""
    model = _fresh_model(config, run).train()
    forward = _compiled(model, run)
    images, labels = _inputs(config, batch, run)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision is Precision.FP16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(run.device, run.precision):
            loss = F.cross_entropy(forward(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    with cpu_wait() as waited:
        latencies = time_steps(step, device=run.device, warmup=run.warmup, iters=run.iters)
    return latencies, waited[0] if waited else None


def _time_inference(config: Config, batch: int, run: _Run) -> Timing:
    """Inference timed, with the memory its model costs above the process without it."""
    with peak_memory(run.device) as memory:
        latencies, waited = _infer_steps(config, batch, run)
    return Timing(latencies, memory[0], waited)


def _time_training(config: Config, batch: int, run: _Run) -> Timing:
    """Training steps timed, with the memory their model, gradients and optimizer cost."""
    with peak_memory(run.device) as memory:
        latencies, waited = _train_steps(config, batch, run)
    return Timing(latencies, memory[0], waited)


def _record(row: ProfileRow, prefix: str, timing: Timing, macs: int, flops_per_mac: int) -> None:
    """Fill ``row``'s ``{prefix}_*`` columns from a timing."""
    img_s = row.batch / (timing.median_ms / 1e3)
    tflops = flops_per_mac * macs * img_s / 1e12
    setattr(row, f"{prefix}_img_s", img_s)
    setattr(row, f"{prefix}_ms", timing.median_ms)
    setattr(row, f"{prefix}_ms_iqr", timing.iqr_ms)
    setattr(row, f"{prefix}_peak_mib", timing.memory.peak_mib)
    setattr(row, f"{prefix}_baseline_mib", timing.memory.baseline_mib)
    setattr(row, f"{prefix}_process_mib", timing.memory.process_mib)
    setattr(row, f"{prefix}_tflops", tflops)
    setattr(row, f"{prefix}_cpu_wait_pct", timing.cpu_wait_pct)
    if row.dense_peak_tflops is not None:
        setattr(row, f"{prefix}_peak_pct", 100 * tflops / row.dense_peak_tflops)


def _measure(
    row: ProfileRow, config: Config, run: _Run, mode: Mode, macs: int, say: Callable[[str], None]
) -> None:
    """Time the modes asked for into ``row``; an out-of-memory error ends the row, not the sweep, and
    so does a training step that batch norm cannot take (one value per channel)."""
    timers = [("infer", _time_inference, 2), ("train", _time_training, 6)]
    for prefix, timer, flops_per_mac in timers:
        if not getattr(mode, prefix):
            continue
        say(f"{row.model} {row.img_size} px, batch {row.batch}: timing {prefix}")
        try:
            timing = timer(config, row.batch, run)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not is_out_of_memory(err):
                raise
            row.status = f"out of memory ({prefix})"
            break
        except ValueError as err:
            if not too_small_for_batch_norm(err):
                raise
            row.status = f"batch too small for batch norm ({prefix})"
            break
        finally:
            gc.collect()
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
        _record(row, prefix, timing, macs, flops_per_mac)


# ---------------------------------------------------------------------------------------------------
# The sweep.


def at_image_size(config: Config, img_size: int) -> Config:
    """``config`` with ``data.img_size`` set, so that the model is built for that size (GSA stays global)."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, img_size=img_size))


def _check(settings: ProfileSettings) -> None:
    for name, values in (("batch size", settings.batch_sizes), ("image size", settings.img_sizes)):
        if values is not None and (not values or min(values) < 1):
            raise ConfigError(f"every {name} must be at least 1, got {', '.join(map(str, values or ()))}")
    if settings.warmup is not None and settings.warmup < 0:
        raise ConfigError(f"warm-up iterations must not be negative, got {settings.warmup}")
    if settings.iters is not None and settings.iters < 1:
        raise ConfigError(f"timed iterations must be at least 1, got {settings.iters}")


def _module_params(model: nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_modules()}


SPATIAL_OPERATOR = re.compile(r"layer\d+\.\d+\.conv2")  # a bottleneck's middle layer (resnet.py)


def spatial_macs(count: MacCount) -> int:
    """MACs in the bottlenecks' spatial operators: what GSA, dense attention and the 3x3 conv differ in."""
    return sum(macs for name, macs in count.by_module.items() if SPATIAL_OPERATOR.fullmatch(name))


def _uncounted_text(count: MacCount) -> str:
    return ", ".join(f"{op.removeprefix('aten::')} x{n}" for op, n in sorted(count.uncounted.items()))


def _run_for(settings: ProfileSettings, device: torch.device) -> _Run:
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    return _Run(
        device=device,
        precision=settings.precision,
        channels_last=settings.channels_last,
        compile=settings.compile,
        warmup=defaults["warmup"] if settings.warmup is None else settings.warmup,
        iters=defaults["iters"] if settings.iters is None else settings.iters,
        seed=settings.seed,
    )


@dataclass(frozen=True)
class _Counted:
    """A model built for one image size: its MACs and parameters."""

    count: MacCount
    module_params: dict[str, int]
    params: int
    trainable: int


def _count(config: Config, settings: ProfileSettings) -> _Counted:
    seed_everything(settings.seed)
    model = build_model(config)
    size = config.data.img_size
    count = count_macs(model, img_size=size, channels=config.data.channels, counter=settings.counter)
    return _Counted(
        count=count,
        module_params=_module_params(model),
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def _fixed_columns(settings: ProfileSettings, run: _Run) -> dict[str, Any]:
    """The columns every row of a profile shares: how its numbers were obtained."""
    name = device_name(run.device)
    tf32 = bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    peak = dense_peak(name, settings.precision, tf32=tf32) if run.device.type == "cuda" else None
    return {
        "device": name,
        "precision": settings.precision.value,
        "layout": "channels_last" if settings.channels_last else "nchw",
        "compile": settings.compile,
        "counter": settings.counter.value,
        "memory": memory_label(run.device),
        "dense_peak_tflops": None if peak is None else peak[0],
        "peak_math": None if peak is None else peak[1],
        "warmup": run.warmup,
        "iters": run.iters,
    }


def _new_row(config: Config, batch: int, counted: _Counted, fixed: dict[str, Any]) -> ProfileRow:
    """A row of what is known before timing: the model's size and count, and how it is measured."""
    count = counted.count
    return ProfileRow(
        preset=config.name,
        model=config.model.kind.value,
        img_size=config.data.img_size,
        batch=batch,
        params=counted.params,
        trainable_params=counted.trainable,
        gmacs=count.total / 1e9,
        gmacs_products=count.products / 1e9,
        g_elementwise=None if count.elementwise is None else count.elementwise / 1e9,
        gmacs_spatial=spatial_macs(count) / 1e9,
        uncounted=_uncounted_text(count),
        **fixed,
    )


def _measure_row(
    row: ProfileRow, config: Config, run: _Run, mode: Mode, macs: int, say: Callable[[str], None]
) -> None:
    """:func:`_measure`, with a failure of ``torch.compile`` turned into one line that says so."""
    try:
        _measure(row, config, run, mode, macs, say)
    except GsaError:
        raise
    except Exception as err:
        if not run.compile:
            raise
        raise GsaError(
            f"torch.compile failed ({type(err).__name__}: {err}); retry without --compile"
        ) from err


def profile(
    config: Config, settings: ProfileSettings, *, progress: Callable[[str], None] | None = None
) -> ProfileResult:
    """Profile the model ``config`` describes at each image size and batch size of ``settings``.

    Args:
        config: A resolved config; its ``model.kind`` picks the model.
        settings: What to measure and how.
        progress: Called with a short line before each measurement.

    Raises:
        ConfigError: for impossible settings or a device that is not here.
        GsaError: when the model cannot be counted or compiled.
    """
    _check(settings)
    run = _run_for(settings, resolve_device(settings.device))
    say = progress or (lambda line: None)
    fixed = _fixed_columns(settings, run)
    if config.model.kind is ModelKind.GSA:
        fixed["gsa_impl"] = implementation_that_runs(config.model.gsa_impl.value, run.device)
    defaults = CUDA_DEFAULTS if run.device.type == "cuda" else CPU_DEFAULTS
    batches = settings.batch_sizes or (defaults["batch"],)
    result = ProfileResult(rows=[])
    benchmark_mode = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for img_size in settings.img_sizes or (config.data.img_size,):
            sized = at_image_size(config, img_size)
            say(f"{config.model.kind.value} {img_size} px: counting multiply-adds ({settings.counter.value})")
            counted = _count(sized, settings)
            result.counts[img_size] = counted.count
            result.module_params[img_size] = counted.module_params
            for batch in batches:
                row = _new_row(sized, batch, counted, fixed)
                _measure_row(row, sized, run, settings.mode, counted.count.total, say)
                result.rows.append(row)
    finally:
        torch.backends.cudnn.benchmark = benchmark_mode
    return result


def profile_kinds(
    configs: Sequence[Config], settings: ProfileSettings, *, progress: Callable[[str], None] | None = None
) -> list[ProfileRow]:
    """Profile each config (one per model kind, say) under the same settings, one after another.

    The rows of every config, in order; :func:`gsa_cli.report.compare.compare_kinds` sets them side
    by side. Raises as :func:`profile` does.
    """
    rows: list[ProfileRow] = []
    for config in configs:
        rows += profile(config, settings, progress=progress).rows
    return rows

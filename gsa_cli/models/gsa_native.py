"""GSA's native implementation: the axial pass as one fused C++ kernel (``csrc/axial.cpp``), built once
(with the content branch's, ``csrc/content.cpp``: :mod:`gsa_cli.models.gsa_native_content`).

:func:`axial_attention_native` has the signature of :func:`gsa_cli.models.gsa.axial_attention` and computes
the same thing (tests hold them equal in float64, forward and backward). Where the batched GEMMs of
:mod:`gsa_cli.models.gsa_kernels` write each head's logits to memory and read them back, the kernel forms
the logits of a few queries at a time in cache and consumes them at once (backward forms them again),
vectorised over the lines of the map. It runs on the CPU in float32 (float64 inputs in float64;
bfloat16 and float16 inputs, as autocast makes them, computed in float32 and returned in their dtype).

The pass is one ``torch.library`` custom op, ``gsa::axial_attention`` (:data:`AXIAL_OP`), with a fake
implementation and an autograd formula whose backward is a second op, ``gsa::axial_attention_backward``:
``torch.compile`` and ``torch.export`` see one node each way, and the MAC counters count it by name as
they count the other implementations (fvcore by the op's name, ``FlopCounterMode`` by the formula
registered here). A backward run with ``create_graph`` (a gradient penalty) goes
through the gemm implementation's backward, which is itself differentiable.

Building: ``torch.utils.cpp_extension`` (a C++ compiler and ninja, what any PyTorch extension needs)
compiles the sources once into a cache folder, ``$GSA_KERNEL_CACHE``, else ``$TORCH_EXTENSIONS_DIR/gsa_cli``,
else ``$XDG_CACHE_HOME/gsa_cli/kernels`` (``~/.cache``), one sub-folder per source, flags, torch, Python,
machine and compiler. A build holds an exclusive lock (``flock``, released by the system if its process
dies) and is marked finished by ``build.json``: concurrent first builds (the workers of a distributed
run) compile once, the others wait and load it. No ``-march=native``: the source compiles its loops for
AVX-512, AVX2 and the baseline instruction set and picks the best the CPU (and ATen's capability
setting) allows at run time, so one cache may serve machines of different CPUs. ``gsa kernels`` builds
ahead of time and reports :func:`kernel_state`.

Where the kernel cannot run (another device, no compiler, a failed build), ``"native"`` and ``"auto"``
run the gemm implementation instead; a failed build, or ``"native"`` asked for on another device, says
so once per process in one :class:`NativeKernelWarning` line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from gsa_cli.errors import GsaError, GsaWarning
from gsa_cli.models.gsa_kernels import MAP_DIMS, AxialRelativeAttention, axial_attention_gemm

if TYPE_CHECKING:
    from torch import nn

    from gsa_cli.models.gsa import Axis

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "axial.cpp", CSRC / "content.cpp")  # compiled into one library
HEADERS = (CSRC / "simd.h", CSRC / "axial_copies.h")
LIBRARY = "gsa_native_axial"  # the shared library's name; its operators are torch.ops.gsa_native.*
# -ffp-contract=fast: a * b + c as one FMA (off under the ISO -std= torch passes). Loops and functions
# aligned: short copy loops moved by 15-20% with where the code fell. No -march=native (see axial.cpp).
CFLAGS = ("-O3", "-ffp-contract=fast", "-Wno-psabi", "-falign-loops=32", "-falign-functions=64")
AXIAL_OP = "gsa::axial_attention"  # the public operators, as the MAC counters know them
AXIAL_BACKWARD_OP = "gsa::axial_attention_backward"


class NativeKernelWarning(GsaWarning):
    """The native kernel does not run where it was asked for: the gemm implementation runs instead."""


# ---------------------------------------------------------------------------------------------------
# The cache, the build, and this process's state.


def cache_root() -> Path:
    """The folder builds go in (see the module's note)."""
    if os.environ.get("GSA_KERNEL_CACHE"):
        return Path(os.environ["GSA_KERNEL_CACHE"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "gsa_cli"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gsa_cli" / "kernels"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with


@functools.cache
def openmp_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Compile and link flags for OpenMP, without which ``at::parallel_for`` runs on one thread.

    Linked to the OpenMP runtime this process's torch loaded (``/proc/self/maps``), so that the
    kernel's parallel regions share torch's thread pool and follow ``torch.set_num_threads``; where
    torch has no OpenMP (its native thread pool needs no flags) or the platform is not Linux, none.
    """
    if not torch.backends.openmp.is_available() or not sys.platform.startswith("linux"):
        return (), ()
    loaded: list[Path] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = Path(line.split()[-1])
            if path.name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in path.name:
                loaded.append(path)
    # Torch's own runtime first: another package's copy (scikit-learn ships one, loaded by the digits
    # set) would put two OpenMP runtimes in one process, which can abort it at exit.
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    if not loaded:
        return ("-fopenmp",), ("-fopenmp",)
    path = min(loaded, key=lambda path: path.parent.resolve() != torch_lib)  # torch's, else the first
    return ("-fopenmp",), (str(path), f"-Wl,-rpath,{path.parent}")


def build_directory() -> Path:
    """This build's folder: named by torch, Python and a hash of everything that changes the library."""
    key = hashlib.sha256()
    parts: tuple[bytes | str, ...] = (
        *(path.read_bytes() for path in (*SOURCES, *HEADERS)),
        " ".join((*CFLAGS, *openmp_flags()[0], *openmp_flags()[1])),
        torch.__version__,
        sys.version,
        platform.machine(),
        _compiler(),
    )
    for part in parts:
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"{LIBRARY}-torch{torch.__version__}-{python}-{key.hexdigest()[:12]}"


def compiler_version() -> str:
    """The C++ compiler a build uses, with the first line of its ``--version``."""
    command = _compiler()
    path = shutil.which(command)
    if path is None:
        return f"{command}: not found"
    try:
        lines = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
        first = lines.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        first = "version unknown"
    return f"{command} ({first})"


@functools.cache
def requested_isa() -> str:
    """The widest instruction set the kernels may use: ATen's capability (``ATEN_CPU_CAPABILITY`` caps it)."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "baseline")


class _Process:
    """What this process knows: the library it loaded, or why it could not."""

    lock = threading.Lock()
    library: Path | None = None
    error: str | None = None
    built_here_s: float | None = None  # the time of a build this process ran


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes, released by the system if the holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file in the build folder serialises builds
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(directory: Path) -> None:
    """Compile and link the library into ``directory`` (torch's JIT extension builder, ninja)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import logs that no CUDA runtime is found: not ours to say
    try:
        from torch.utils.cpp_extension import load

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compiler-version notes: a failure raises with the output
            load(
                name=LIBRARY,
                sources=[str(path) for path in SOURCES],
                extra_cflags=[*CFLAGS, *openmp_flags()[0]],
                extra_ldflags=list(openmp_flags()[1]),
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
    finally:
        logger.setLevel(level)


def _library_path(directory: Path) -> Path:
    return directory / f"{LIBRARY}{'.pyd' if sys.platform == 'win32' else '.so'}"


def build_into(directory: Path, compile: Callable[[Path], None] | None = None) -> Path:
    """Build the library into ``directory`` unless a finished build is there, then load it.

    Concurrent callers (processes) build once: the first holds the lock while it compiles (with
    ``compile``, default :func:`_compile`), the others wait for it and find ``build.json``. Returns the
    library's path.
    """
    record, library = directory / "build.json", _library_path(directory)
    if not (record.is_file() and library.is_file()):
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory.parent / f"{directory.name}.lock"):
            # A concurrent first build may have finished while this one waited.
            if not (record.is_file() and library.is_file()):
                # torch's own lock file: before torch 2.14 its mere existence blocks, so a builder that
                # died left it stale; no other builder is inside it while this lock is held.
                (directory / "lock").unlink(missing_ok=True)
                start = time.perf_counter()
                (compile or _compile)(directory)
                _Process.built_here_s = time.perf_counter() - start
                facts = {"seconds": round(_Process.built_here_s, 1), "compiler": compiler_version()}
                partial = record.with_suffix(f".{os.getpid()}.tmp")
                partial.write_text(json.dumps({**facts, "torch": torch.__version__}) + "\n")
                partial.replace(record)
    if str(library) not in torch.ops.loaded_libraries:
        torch.ops.load_library(str(library))
    return library


def _one_line(err: BaseException) -> str:
    """A build failure in one line: the compiler's first error, or the exception's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or "not found" in line or "No such file" in line:
            return line[:240]
    return (lines[0] if lines else type(err).__name__)[:240]


def native_error() -> str | None:
    """Load the kernel into this process (building it first where the cache lacks it); why it could not,
    or None. Tried once per process."""
    with _Process.lock:
        if _Process.library is None and _Process.error is None:
            directory = build_directory()
            try:
                _Process.library = build_into(directory)
            except Exception as err:  # any failure to build or load: the gemm implementation runs
                _Process.error = _one_line(err)
                with contextlib.suppress(OSError):
                    directory.mkdir(parents=True, exist_ok=True)
                    (directory / "build.log").write_text(f"{type(err).__name__}: {err}\n")
        return _Process.error


@dataclass(frozen=True)
class KernelState:
    """The native kernel's state, as ``gsa kernels`` reports it.

    Attributes:
        status: ``loaded`` (in this process), ``cached`` (a finished build waits in the cache),
            ``not built``, or ``failed``.
        directory: The build's folder.
        compiler: The C++ compiler, with its version.
        variant: The instruction set the kernels run with (``avx512``, ``avx2``, ``baseline``), once loaded.
        build_seconds: How long the cached build took.
        built_here: Whether this process compiled it.
        error: Why it did not build or load.
        log: The full build output of a failure.
    """

    status: str
    directory: Path
    compiler: str
    variant: str | None
    build_seconds: float | None
    built_here: bool
    error: str | None
    log: Path | None


def kernel_state() -> KernelState:
    """The kernel's state, without building it."""
    directory = build_directory()
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((directory / "build.json").read_text())
    if _Process.library is not None:
        status = "loaded"
    elif _Process.error is not None:
        status = "failed"
    else:
        status = "cached" if record else "not built"
    log = directory / "build.log"
    return KernelState(
        status=status,
        directory=directory,
        compiler=compiler_version(),
        variant=torch.ops.gsa_native.variant(requested_isa()) if _Process.library is not None else None,
        build_seconds=record.get("seconds"),
        built_here=_Process.built_here_s is not None,
        error=_Process.error,
        log=log if _Process.error is not None and log.is_file() else None,
    )


def build() -> KernelState:
    """Build the kernel (or load it from the cache) in this process, and report its state."""
    native_error()
    return kernel_state()


# ---------------------------------------------------------------------------------------------------
# The operators.


def loaded_or_raise() -> None:
    """Load the kernel (building it first where needed), or raise a GsaError saying why it cannot."""
    error = native_error()
    if error is not None:
        raise GsaError(f"the native GSA kernel is not built: {error}")


@torch.library.custom_op(AXIAL_OP, mutates_args=(), device_types="cpu")
def axial_attention_op(queries: Tensor, values: Tensor, pairs: Tensor, dim: int) -> Tensor:
    """One axial pass along the map dimension ``dim`` (3: the column pass, 4: the row pass) with the
    shapes of :func:`gsa_cli.models.gsa.axial_attention`; ``(B, h, c, H, W)`` in the queries' dtype."""
    loaded_or_raise()
    out: Tensor = torch.ops.gsa_native.axial_forward(queries, values, pairs, dim, requested_isa())
    return out


@axial_attention_op.register_fake
def _axial_attention_fake(queries: Tensor, values: Tensor, pairs: Tensor, dim: int) -> Tensor:
    batch, heads, _, height, width = queries.shape
    return queries.new_empty((batch, heads, values.shape[2], height, width))


@torch.library.custom_op(AXIAL_BACKWARD_OP, mutates_args=(), device_types="cpu")
def axial_attention_backward_op(
    grad: Tensor,
    queries: Tensor,
    values: Tensor,
    pairs: Tensor,
    dim: int,
    need_queries: bool,
    need_values: bool,
    need_pairs: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`axial_attention_op`'s queries, values and pairs (empty where not needed),
    each in its input's dtype; the logits formed again."""
    loaded_or_raise()
    needs = (need_queries, need_values, need_pairs)
    grads = torch.ops.gsa_native.axial_backward(grad, queries, values, pairs, dim, *needs, requested_isa())
    return grads[0], grads[1], grads[2]


@axial_attention_backward_op.register_fake
def _axial_attention_backward_fake(
    grad: Tensor,
    queries: Tensor,
    values: Tensor,
    pairs: Tensor,
    dim: int,
    need_queries: bool,
    need_values: bool,
    need_pairs: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        queries.new_empty(queries.shape if need_queries else (0,)),
        values.new_empty(values.shape if need_values else (0,)),
        pairs.new_empty(pairs.shape if need_pairs else (0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    queries, values, pairs, dim = inputs
    ctx.save_for_backward(queries, values, pairs)
    ctx.dim = dim


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    queries, values, pairs = ctx.saved_tensors
    needs: tuple[bool, bool, bool] = tuple(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():  # backward(create_graph=True): the gemm form, differentiable again
        inputs = [t for t, need in zip((queries, values, pairs), needs, strict=True) if need]
        with torch.enable_grad():
            out = AxialRelativeAttention.apply(queries, values, pairs, ctx.dim)
        found = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
        return (*(next(found) if need else None for need in needs), None)
    grads = torch.ops.gsa.axial_attention_backward(grad, queries, values, pairs, ctx.dim, *needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None)


axial_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.gsa.axial_attention)
def _axial_attention_flops(queries: Any, values: Any, pairs: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs (2 per multiply-add) from the operands' shapes, for ``FlopCounterMode``: the logits
    ``B h H W A d`` and their product with the values ``B h H W A c``, as the other implementations."""
    batch, heads, keys, height, width = queries
    return 2 * batch * heads * height * width * pairs[1] * (keys + values[2])


@register_flop_formula(torch.ops.gsa.axial_attention_backward)
def _axial_attention_backward_flops(
    grad: Any, queries: Any, values: Any, pairs: Any, dim: int, *needs: bool, **kwargs: Any
) -> int:
    """FLOPs of the backward, as far as its gradients are needed: the logits again and the values'
    gradient (``d + c`` per pair of positions), the logits' gradient (``c``), then the queries' and the
    table's gradients (``d`` each)."""
    batch, heads, keys, height, width = queries
    need_queries, need_values, need_pairs = needs[:3]
    per_pair = (keys + values[2]) * need_values + values[2] * (need_queries or need_pairs)
    per_pair += keys * need_queries + keys * need_pairs
    return 2 * batch * heads * height * width * pairs[1] * per_pair


# ---------------------------------------------------------------------------------------------------
# Which implementation runs.

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, NativeKernelWarning, stacklevel=4)


def _refusal_now(device_type: str, asked: str) -> str | None:
    """Why the kernel does not run on ``device_type`` for implementation ``asked``; None when it runs.

    A failed build warns once; so does ``"native"`` asked for on another device (``"auto"`` runs gemm
    there silently).
    """
    if device_type != "cpu":
        if asked == "native":
            _warn_once(f"implementation 'native' has no {device_type} kernel: the 'gemm' implementation runs")
        return f"no {device_type} kernel"
    error = native_error()
    if error is not None:
        _warn_once(
            f"the native GSA kernel could not be built ({error}): implementation '{asked}' runs 'gemm' "
            "instead; `gsa kernels` reports the build"
        )
    return error


# Decided outside the traced graph: torch.compile and torch.export take the answer as a constant.
refusal: Callable[[str, str], str | None] = torch.compiler.assume_constant_result(_refusal_now)


def implementation_that_runs(implementation: str, device: torch.device | str) -> str:
    """What a GSA module set to ``implementation`` runs on ``device``: ``reference``, ``gemm`` or
    ``native`` (the axial passes and the content branch fused). Builds the kernel if needed."""
    if implementation not in ("auto", "native"):
        return implementation
    if torch.device(device).type != "cpu" or native_error() is not None:
        return "gemm"
    return "native"


def model_implementation(model: nn.Module, device: torch.device | str) -> str | None:
    """What the GSA modules of ``model`` run on ``device`` (names joined by ``+`` when they differ);
    None for a model without GSA modules."""
    from gsa_cli.models.gsa import GlobalSelfAttention2d  # gsa.py imports this module

    asked = {m.implementation for m in model.modules() if isinstance(m, GlobalSelfAttention2d)}
    return "+".join(sorted({implementation_that_runs(a, device) for a in asked})) or None


def axial_attention_native(queries: Tensor, values: Tensor, pairs: Tensor, *, axis: Axis) -> Tensor:
    """:func:`gsa_cli.models.gsa.axial_attention` as the fused kernel; as gemm, saying why once, where it
    cannot run."""
    if refusal(queries.device.type, "native") is not None:
        return axial_attention_gemm(queries, values, pairs, axis=axis)
    out: Tensor = torch.ops.gsa.axial_attention(queries, values, pairs, MAP_DIMS[axis])
    return out


def axial_attention_auto(queries: Tensor, values: Tensor, pairs: Tensor, *, axis: Axis) -> Tensor:
    """The fastest axial pass for the device: the fused kernel on the CPU, gemm elsewhere (and where the
    kernel does not build, saying why once)."""
    if refusal(queries.device.type, "auto") is not None:
        return axial_attention_gemm(queries, values, pairs, axis=axis)
    out: Tensor = torch.ops.gsa.axial_attention(queries, values, pairs, MAP_DIMS[axis])
    return out

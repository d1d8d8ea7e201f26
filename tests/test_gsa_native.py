"""The native GSA kernel (``gsa_cli/models/gsa_native.py``, ``csrc/axial.cpp``): equal to the reference
axial pass in float64, forward and backward, on odd shapes and in every instruction-set variant; close in
float32 and from half-precision inputs; one node in compiled and exported graphs; its build cached,
safe to start from two processes at once, and replaced by gemm, saying why, where it does not build.

The kernel is built once per test session (or found in the cache); where it cannot be built here the
tests that need it are skipped with the reason, and the fallback tests still run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from graph_helpers import compiled_call_targets

from gsa_cli.models import gsa_native
from gsa_cli.models.gsa import GlobalSelfAttention2d, axial_attention, relative_index
from gsa_cli.models.gsa_kernels import HEIGHT, WIDTH, axial_attention_gemm

ROOT = Path(__file__).resolve().parent.parent
AXES = {HEIGHT: "height", WIDTH: "width"}
VARIANTS = ["avx512", "avx2", "baseline"]  # asked for; a CPU without AVX-512 runs AVX2 for the first
# (batch, heads, channels per head of queries d and values c, height, width, span)
SHAPES = {
    "odd non-square map, span smaller": (2, 3, 3, 2, 5, 7, 3),
    "one head, batch 1, global": (1, 1, 8, 8, 9, 4, 9),
    "channels past a register tile": (3, 2, 5, 6, 7, 7, 7),
    "many lines, a short axis": (2, 1, 16, 4, 3, 37, 2),
    # Axes of 24 and more are copied by vectors (runs of lanes, blocks transposed in registers).
    "long axes, copied by vectors": (2, 2, 3, 4, 35, 26, 30),
}


def pass_inputs(
    shape: tuple[int, ...], dim: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and values as strided views of one projection (as the module passes them), and the
    pairs of a relative table, zero beyond the span."""
    batch, heads, dk, dv, height, width, span = shape
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(batch, heads * (dk + dv + 1), height, width, generator=generator, dtype=dtype)
    queries = projection[:, : heads * dk].unflatten(1, (heads, dk))
    values = projection[:, heads * dk : heads * (dk + dv)].unflatten(1, (heads, dv))
    length = (height, width)[dim - HEIGHT]
    table = torch.randn(2 * span - 1, heads * dk, generator=generator, dtype=dtype)
    pairs = F.pad(table, (0, 0, 0, 1))[relative_index(length, span, device=table.device)]  # (a, i, h d)
    return queries, values, pairs.unflatten(-1, (heads, dk)).permute(2, 0, 3, 1).contiguous()


def reference(
    queries: torch.Tensor, values: torch.Tensor, pairs: torch.Tensor, dim: int, grad: torch.Tensor
) -> list[torch.Tensor]:
    """The einsum reference's output and gradients of queries, values and pairs."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (queries, values, pairs)]
    out = axial_attention(*inputs, axis=AXES[dim])  # type: ignore[arg-type]
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


def relative_error(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((mine.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------
# Equal to the reference.


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dim", [HEIGHT, WIDTH], ids=["column pass", "row pass"])
def test_every_variant_equals_the_reference_in_float64(
    variant: str, shape: tuple[int, ...], dim: int
) -> None:
    queries, values, pairs = pass_inputs(shape, dim)
    grad = torch.randn(values.shape, dtype=torch.float64)
    expected = reference(queries, values, pairs, dim, grad)
    out = torch.ops.gsa_native.axial_forward(queries, values, pairs, dim, variant)
    grads = torch.ops.gsa_native.axial_backward(grad, queries, values, pairs, dim, True, True, True, variant)
    for mine, theirs in zip([out, *grads], expected, strict=True):
        assert mine.dtype == torch.float64
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_each_gradient_alone_is_the_same_and_the_others_are_empty(needs: tuple[bool, bool, bool]) -> None:
    queries, values, pairs = pass_inputs(SHAPES["odd non-square map, span smaller"], WIDTH)
    grad = torch.randn(values.shape, dtype=torch.float64)
    full = torch.ops.gsa_native.axial_backward(
        grad, queries, values, pairs, WIDTH, True, True, True, "avx512"
    )
    alone = torch.ops.gsa_native.axial_backward(grad, queries, values, pairs, WIDTH, *needs, "avx512")
    for need, mine, theirs in zip(needs, alone, full, strict=True):
        if need:
            torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-13)
        else:
            assert mine.numel() == 0


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("dim", [HEIGHT, WIDTH], ids=["column pass", "row pass"])
def test_op_passes_gradcheck_and_gradgradcheck(dim: int) -> None:
    queries, values, pairs = (
        t.detach().requires_grad_(True) for t in pass_inputs((2, 2, 3, 2, 4, 5, 3), dim, seed=1)
    )

    def op(q: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.ops.gsa.axial_attention(q, v, p, dim)

    assert torch.autograd.gradcheck(op, (queries, values, pairs))
    # A gradient penalty differentiates the backward (create_graph): through gemm's backward.
    assert torch.autograd.gradgradcheck(op, (queries, values, pairs))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("dim", [HEIGHT, WIDTH], ids=["column pass", "row pass"])
@pytest.mark.parametrize(
    "shape", [(3, 2, 8, 8, 13, 11, 13), (2, 2, 16, 4, 40, 35, 40)], ids=["short axes", "long axes"]
)
def test_float32_is_within_tolerance_of_float64(dim: int, shape: tuple[int, ...]) -> None:
    queries, values, pairs = pass_inputs(shape, dim)
    grad = torch.randn(values.shape, dtype=torch.float64)
    expected = reference(queries, values, pairs, dim, grad)
    single = [t.float() for t in (queries, values, pairs)]
    out = torch.ops.gsa.axial_attention(*single, dim)
    grads = torch.ops.gsa.axial_attention_backward(grad.float(), *single, dim, True, True, True)
    for mine, theirs in zip([out, *grads], expected, strict=True):
        assert mine.dtype == torch.float32
        assert relative_error(mine, theirs) < 1e-5


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    # What autocast hands over: half-precision queries and values, a float32 table.
    queries, values, pairs = pass_inputs((2, 2, 8, 8, 6, 9, 6), HEIGHT, torch.float32)
    queries, values = queries.to(dtype), values.to(dtype)
    grad = torch.randn(values.shape).to(dtype)
    out = torch.ops.gsa.axial_attention(queries, values, pairs, HEIGHT)
    grads = torch.ops.gsa.axial_attention_backward(grad, queries, values, pairs, HEIGHT, True, True, True)
    assert [t.dtype for t in (out, *grads)] == [dtype, dtype, dtype, torch.float32]
    # Against float32 from the same rounded inputs: only the results' own rounding differs.
    expected = reference(queries.float(), values.float(), pairs, HEIGHT, grad.float())
    for mine, theirs in zip([out, *grads], expected, strict=True):
        assert relative_error(mine, theirs) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.usefixtures("kernel")
def test_expanded_and_permuted_gradients_give_the_same_result() -> None:
    queries, values, pairs = pass_inputs(SHAPES["channels past a register tile"], HEIGHT)
    ones = torch.ones((), dtype=torch.float64).expand(values.shape)  # what sum() hands back: stride 0
    permuted = torch.randn(values.shape, dtype=torch.float64).permute(0, 1, 3, 4, 2).contiguous()
    for grad in (ones, permuted.permute(0, 1, 4, 2, 3)):
        mine = torch.ops.gsa.axial_attention_backward(grad, queries, values, pairs, HEIGHT, True, True, True)
        theirs = reference(queries, values, pairs, HEIGHT, grad.contiguous())[1:]
        for m, t in zip(mine, theirs, strict=True):
            torch.testing.assert_close(m, t, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("kernel")
def test_the_table_gradient_is_the_same_on_every_call() -> None:
    # Summed over the threads' chunks in their order, whichever thread ends first.
    queries, values, pairs = pass_inputs((4, 3, 8, 8, 16, 12, 16), HEIGHT, torch.float32)
    grad = torch.randn(values.shape)
    first = torch.ops.gsa.axial_attention_backward(grad, queries, values, pairs, HEIGHT, False, False, True)[
        2
    ]
    for _ in range(4):
        again = torch.ops.gsa.axial_attention_backward(
            grad, queries, values, pairs, HEIGHT, False, False, True
        )
        assert torch.equal(again[2], first)


@pytest.mark.usefixtures("kernel")
def test_an_empty_batch_gives_empty_results() -> None:
    queries, values, pairs = pass_inputs((0, 2, 3, 2, 4, 5, 4), WIDTH)
    assert torch.ops.gsa.axial_attention(queries, values, pairs, WIDTH).shape == (0, 2, 2, 4, 5)
    grad = torch.zeros(values.shape, dtype=torch.float64)
    grads = torch.ops.gsa.axial_attention_backward(grad, queries, values, pairs, WIDTH, True, True, True)
    assert [tuple(g.shape) for g in grads] == [tuple(queries.shape), tuple(values.shape), tuple(pairs.shape)]
    assert not grads[2].any()


@pytest.mark.usefixtures("kernel")
@pytest.mark.filterwarnings("ignore::gsa_cli.errors.SpanWarning")  # a span smaller than the map, on purpose
@pytest.mark.parametrize(
    "options",
    [
        {"span": 2, "stride": 2},
        {"heads": 1},
        {"content": False},
        {"positional": False},
        {"positional": False, "query_softmax": True},
    ],
    ids=[
        "span 2 on a 7x5 map, stride 2",
        "one head",
        "positional branch only",
        "content branch only",
        "content branch, query softmax (gemm)",
    ],
)
def test_module_equals_the_reference_forward_and_backward(options: dict[str, object]) -> None:
    torch.manual_seed(0)
    settings: dict[str, object] = {"heads": 2, "span": 7, **options}
    native = GlobalSelfAttention2d(4, 6, implementation="native", **settings).double()  # type: ignore[arg-type]
    reference_module = GlobalSelfAttention2d(4, 6, implementation="reference", **settings).double()  # type: ignore[arg-type]
    reference_module.load_state_dict(native.state_dict())
    x = torch.randn(1, 4, 7, 5, dtype=torch.float64)
    results = []
    for module in (native, reference_module):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.pow(2).sum().backward()
        results.append([out, xi.grad, *(p.grad for p in module.parameters())])
    for mine, theirs in zip(*results, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------------------------------
# Which implementation runs, and the fallback.


@pytest.mark.usefixtures("kernel")
def test_auto_runs_native_on_the_cpu_and_gemm_elsewhere() -> None:
    assert gsa_native.implementation_that_runs("auto", "cpu") == "native"
    assert gsa_native.implementation_that_runs("native", "cpu") == "native"
    assert gsa_native.implementation_that_runs("auto", "meta") == "gemm"
    assert gsa_native.implementation_that_runs("reference", "cpu") == "reference"
    model = torch.nn.Sequential(GlobalSelfAttention2d(4, 4, heads=2, span=5), torch.nn.Conv2d(4, 4, 1))
    assert gsa_native.model_implementation(model, "cpu") == "native"
    assert gsa_native.model_implementation(torch.nn.Conv2d(4, 4, 3), "cpu") is None


def test_native_asked_for_on_another_device_runs_gemm_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gsa_native, "_WARNED", set())
    module = GlobalSelfAttention2d(4, 4, heads=2, span=5, implementation="native").to("meta")
    x = torch.empty(2, 4, 3, 5, device="meta")
    with pytest.warns(gsa_native.NativeKernelWarning, match="'native' has no meta kernel"):
        assert module(x).shape == (2, 4, 3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        module(x)
        GlobalSelfAttention2d(4, 4, heads=2, span=5).to("meta")(x)  # "auto" runs gemm there silently


@pytest.fixture
def failed_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """This process as if the kernel had failed to build (a compiler error), in an empty cache."""
    message = "axial.cpp:1:10: fatal error: torch/library.h: No such file or directory"

    def compile_fails(directory: Path) -> None:
        raise RuntimeError(f"Error building extension 'gsa_native_axial':\n[1/2] c++ ...\n{message}\n")

    monkeypatch.setenv("GSA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(gsa_native, "_compile", compile_fails)
    monkeypatch.setattr(gsa_native._Process, "library", None)
    monkeypatch.setattr(gsa_native._Process, "error", None)
    monkeypatch.setattr(gsa_native, "_WARNED", set())
    return message


def test_auto_falls_back_to_gemm_with_one_line_saying_why(failed_build: str) -> None:
    torch.manual_seed(0)
    auto = GlobalSelfAttention2d(4, 6, heads=2, span=6)
    gemm = GlobalSelfAttention2d(4, 6, heads=2, span=6, implementation="gemm")
    gemm.load_state_dict(auto.state_dict())
    x = torch.randn(2, 4, 5, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = auto(x)
        auto(x)
    assert [str(w.message) for w in caught] == [
        f"the native GSA kernel could not be built ({failed_build}): implementation 'auto' runs 'gemm' "
        "instead; `gsa kernels` reports the build"
    ]
    assert caught[0].category is gsa_native.NativeKernelWarning
    torch.testing.assert_close(out, gemm(x), rtol=0, atol=0)
    assert gsa_native.implementation_that_runs("auto", "cpu") == "gemm"
    state = gsa_native.kernel_state()
    assert (state.status, state.error) == ("failed", failed_build)
    assert state.log is not None
    assert failed_build in state.log.read_text()


def test_calling_the_op_without_a_build_is_one_clear_error(failed_build: str) -> None:
    queries, values, pairs = pass_inputs((1, 1, 2, 2, 3, 3, 3), HEIGHT)
    with pytest.raises(gsa_native.GsaError, match=r"the native GSA kernel is not built: axial\.cpp:1:10"):
        torch.ops.gsa.axial_attention(queries, values, pairs, HEIGHT)


def test_a_missing_compiler_is_the_reason_given(tmp_path: Path) -> None:
    # A fresh process with a compiler that is not there: the real build fails, gemm runs.
    if shutil.which("ninja") is None:
        pytest.skip("torch's extension builder needs ninja first: the compiler is never reached")
    script = textwrap.dedent(
        """
        import json, warnings, torch
        from gsa_cli.models import gsa_native
        from gsa_cli.models.gsa import GlobalSelfAttention2d
        torch.manual_seed(0)
        auto = GlobalSelfAttention2d(4, 6, heads=2, span=6)
        gemm = GlobalSelfAttention2d(4, 6, heads=2, span=6, implementation="gemm")
        gemm.load_state_dict(auto.state_dict())
        x = torch.randn(2, 4, 5, 6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            same = bool(torch.equal(auto(x), gemm(x)))
        print(json.dumps({"same": same, "warnings": [str(w.message) for w in caught],
                          "error": gsa_native.kernel_state().error}))
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "GSA_KERNEL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same"]
    assert "no-such-c++" in report["error"]
    assert len(report["warnings"]) == 1
    assert report["error"] in report["warnings"][0]


# ---------------------------------------------------------------------------------------------------
# Compiled and exported graphs, and the MAC counters.


@pytest.mark.usefixtures("kernel")
def test_compiled_graphs_hold_the_op_forward_and_backward() -> None:
    torch.manual_seed(0)
    module = GlobalSelfAttention2d(4, 8, heads=2, span=6, implementation="native")
    x = torch.randn(2, 4, 5, 6)
    out, forward, backward = compiled_call_targets(module, x)
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad()
    eager = module(x)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for mine, theirs in zip(grads, [p.grad for p in module.parameters()], strict=True):
        torch.testing.assert_close(mine, theirs)
    assert forward.count("gsa.axial_attention.default") == 2  # the column pass and the row pass
    assert backward.count("gsa.axial_attention_backward.default") == 2


@pytest.mark.usefixtures("kernel")
def test_export_holds_the_op() -> None:
    torch.manual_seed(0)
    module = GlobalSelfAttention2d(4, 8, heads=2, span=6, implementation="native").eval()
    x = torch.randn(2, 4, 5, 6)
    program = torch.export.export(module, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("gsa.axial_attention.default") == 2
    torch.testing.assert_close(program.module()(x), module(x))


@pytest.mark.usefixtures("kernel")
def test_a_flop_counter_counts_forward_and_backward_like_gemm() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name, function in (("native", gsa_native.axial_attention_native), ("gemm", axial_attention_gemm)):
        inputs = [t.detach().float().requires_grad_(True) for t in pass_inputs((2, 2, 3, 5, 6, 7, 6), WIDTH)]
        with FlopCounterMode(display=False) as counter:
            function(*inputs, axis="width").sum().backward()
        counts[name] = counter.get_total_flops()
    batch, heads, d, c, height, width = 2, 2, 3, 5, 6, 7
    forward = batch * heads * height * width * width * (d + c)
    backward = batch * heads * height * width * width * (3 * d + 2 * c)
    assert counts["native"] == counts["gemm"] == 2 * (forward + backward)


# ---------------------------------------------------------------------------------------------------
# The build: its state, the cache, concurrent first builds, the wheel.


def test_kernel_state_reports_the_build(kernel: gsa_native.KernelState) -> None:
    assert kernel.status == "loaded"
    assert kernel.variant in VARIANTS
    assert kernel.build_seconds is not None
    assert kernel.build_seconds > 0
    assert (kernel.directory / "build.json").is_file()
    assert kernel.directory.parent == gsa_native.cache_root()
    assert "not found" not in kernel.compiler


def test_the_kernel_runs_its_loops_on_torchs_threads(kernel: gsa_native.KernelState) -> None:
    # Without OpenMP, at::parallel_for compiles to a plain loop on one thread.
    compile_flags, _ = gsa_native.openmp_flags()
    if not compile_flags:
        pytest.skip("torch has no OpenMP here: its own thread pool needs no flags")
    assert b"GOMP_parallel" in gsa_native._library_path(kernel.directory).read_bytes()


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GSA_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch"))
    assert gsa_native.cache_root() == tmp_path / "torch" / "gsa_cli"
    monkeypatch.setenv("GSA_KERNEL_CACHE", str(tmp_path / "ours"))
    assert gsa_native.build_directory().parent == tmp_path / "ours"
    first = gsa_native.build_directory().name
    monkeypatch.setenv("CXX", "clang++")  # another compiler: another build
    assert gsa_native.build_directory().name != first


BUILD_IN_CHILD = """
import json, os, shutil, sys, time
from pathlib import Path
from gsa_cli.models import gsa_native

directory, built, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def compile_slowly(target: Path) -> None:  # stands in for the compiler: slow enough to overlap
    with log.open("a") as handle:
        handle.write(f"{os.getpid()}\\n")
    time.sleep(1)
    shutil.copy(built, target / built.name)

library = gsa_native.build_into(directory, compile_slowly)
print(json.dumps({"library": str(library), "variant": __import__("torch").ops.gsa_native.variant("avx2")}))
"""


def test_concurrent_first_builds_compile_once(kernel: gsa_native.KernelState, tmp_path: Path) -> None:
    directory, log = tmp_path / "cache" / kernel.directory.name, tmp_path / "compiled"
    built = gsa_native._library_path(kernel.directory)
    command = [sys.executable, "-c", BUILD_IN_CHILD, str(directory), str(built), str(log)]
    children = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    assert len(log.read_text().split()) == 1  # one compiled; the other waited and loaded its library
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert {report["library"] for report in reports} == {str(gsa_native._library_path(directory))}
    assert (directory / "build.json").is_file()


@pytest.mark.slow
def test_two_processes_build_at_once_into_an_empty_cache(tmp_path: Path) -> None:
    script = (
        "import json; from gsa_cli.models import gsa_native; s = gsa_native.build(); "
        "print(json.dumps({'error': s.error, 'built_here': s.built_here, 'variant': s.variant}))"
    )
    env = {**os.environ, "GSA_KERNEL_CACHE": str(tmp_path)}
    children = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        for _ in "ab"
    ]
    reports = [json.loads(child.communicate(timeout=1200)[0].strip().splitlines()[-1]) for child in children]
    assert [report["error"] for report in reports] == [None, None]
    assert sorted(report["built_here"] for report in reports) == [False, True]
    assert reports[0]["variant"] == reports[1]["variant"] is not None


def test_the_wheel_ships_the_source() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in (*gsa_native.SOURCES, *gsa_native.HEADERS):
        relative = path.relative_to(ROOT / "gsa_cli" / "models").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in package_data["gsa_cli.models"]), relative


# ---------------------------------------------------------------------------------------------------
# What ran, as profiles and runs record it.


@pytest.mark.usefixtures("kernel")
def test_profile_rows_record_the_implementation_that_ran() -> None:
    from gsa_cli.bench.profile import ProfileSettings, profile
    from gsa_cli.choices import Mode
    from gsa_cli.presets import load_preset

    settings = ProfileSettings(
        device="cpu", img_sizes=(16,), batch_sizes=(1,), mode=Mode.INFER, warmup=0, iters=1
    )
    recorded = {}
    for model, overrides in (("gsa", []), ("gsa", ["model.gsa_impl=gemm"]), ("conv", [])):
        row = profile(load_preset("smoke", model=model, overrides=overrides), settings).rows[0]
        recorded[(model, *overrides)] = row.gsa_impl
    assert recorded == {("gsa",): "native", ("gsa", "model.gsa_impl=gemm"): "gemm", ("conv",): None}


@pytest.mark.usefixtures("kernel")
def test_a_runs_summary_records_the_implementation_that_ran(tmp_path: Path) -> None:
    from gsa_cli.presets import load_preset
    from gsa_cli.train.loop import SilentReporter
    from gsa_cli.train.run import TrainOptions, train

    tiny = ["recipe.epochs=1", "data.train_samples=16", "data.val_samples=16"]  # one step
    options = TrainOptions(out=tmp_path / "run", device="cpu", threads=1)
    summary = train(load_preset("smoke", overrides=tiny), options, reporter=SilentReporter())
    assert summary.gsa_impl == "native"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["gsa_impl"] == "native"


# ---------------------------------------------------------------------------------------------------
# gsa kernels.


@pytest.mark.usefixtures("kernel")
def test_gsa_kernels_builds_and_reports_the_state() -> None:
    from typer.testing import CliRunner

    from gsa_cli.cli.app import app

    result = CliRunner().invoke(app, ["kernels"])
    assert result.exit_code == 0, result.output
    state = gsa_native.kernel_state()
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in result.output.splitlines()}
    assert lines["native GSA kernel"].startswith("loaded (")
    assert f"in {state.build_seconds:.1f} s" in lines["native GSA kernel"]
    assert lines["instruction set"] == state.variant
    assert lines["compiler"] == state.compiler
    assert lines["cache"] == str(state.directory)


def test_gsa_kernels_reports_a_failed_build_and_exits_1(failed_build: str) -> None:
    from typer.testing import CliRunner

    from gsa_cli.cli.app import app

    result = CliRunner().invoke(app, ["kernels"])
    assert result.exit_code == 1
    assert "native GSA kernel: failed" in " ".join(result.output.split())
    assert f"the native GSA kernel did not build: {failed_build}; the full output is in" in result.output


# ---------------------------------------------------------------------------------------------------
# The benchmark runs (tiny: its numbers are not looked at here).


@pytest.mark.usefixtures("kernel")
def test_the_benchmark_runs_and_reports_against_the_baselines(tmp_path: Path) -> None:
    out = tmp_path / "bench.csv"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_native.py"), "--stages", "4", "--batch", "2"]
    command += [
        "--rounds",
        "1",
        "--iters",
        "1",
        "--no-memory",
        "--impl",
        "native,einsum,conv3x3",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "native time_vs_einsum: geometric mean over 1 shapes" in result.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert [row["impl"] for row in report["rows"]] == ["native", "einsum", "conv3x3"]
    assert report["rows"][1]["time_vs_einsum"] == 1.0
    assert report["machine"]["kernel_variant"] in VARIANTS


def test_the_kernel_links_torchs_openmp_runtime_even_with_another_one_loaded() -> None:
    import sklearn.utils._openmp_helpers  # noqa: F401  (scikit-learn's own libgomp, as the digits set loads)

    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    others = {line.split()[-1] for line in maps.splitlines() if "gomp" in line and str(torch_lib) not in line}
    if not any(torch_lib.glob("libgomp*.so*")) or not others:
        pytest.skip("needs torch's own libgomp and another one loaded beside it")
    gsa_native.openmp_flags.cache_clear()
    _, link = gsa_native.openmp_flags()
    assert Path(link[0]).parent.resolve() == torch_lib  # two runtimes in one process can abort it at exit

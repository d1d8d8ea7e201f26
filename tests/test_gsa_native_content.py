"""The native content kernel (``gsa_cli/models/gsa_native_content.py``, ``csrc/content.cpp``): equal to the
reference content branch in float64, forward and backward, on odd shapes (rows short and long, so both ways
of summing over the positions) and in every instruction-set variant; close in float32 and from
half-precision inputs; one node in compiled and exported graphs; counted like gemm; gemm where it cannot
run and for the ``query_softmax`` ablation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from graph_helpers import compiled_call_targets

from gsa_cli.models import gsa_native
from gsa_cli.models.gsa import GlobalSelfAttention2d, content_attention
from gsa_cli.models.gsa_kernels import content_attention_gemm
from gsa_cli.models.gsa_native_content import content_attention_native

VARIANTS = ["avx512", "avx2", "baseline"]  # asked for; a CPU without AVX-512 runs AVX2 for the first
# (batch, heads, channels per head of queries and keys d and of values c, positions N)
SHAPES = {
    "short rows, d != c": (2, 3, 5, 7, 13),
    "one head, batch 1, one position": (1, 1, 1, 1, 1),
    "long rows": (2, 2, 6, 9, 300),
    "channels past a register tile": (1, 2, 9, 5, 40),
    "many channels, one head": (3, 1, 33, 17, 130),
}


pytestmark = pytest.mark.usefixtures("kernel")  # tests/conftest.py: built once, else skipped


def branch_inputs(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float64, *, seed: int = 0, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values as strided views of one projection, as the module passes them (with
    ``channels_last``, positions a projection's width apart); keys spread so that the softmax is peaked."""
    batch, heads, d, c, positions = shape
    generator = torch.Generator().manual_seed(seed)
    channels = heads * (2 * d + c) + 1
    if channels_last:
        projection = torch.randn(batch, positions, channels, generator=generator, dtype=dtype).transpose(1, 2)
    else:
        projection = torch.randn(batch, channels, positions, generator=generator, dtype=dtype)
    projection[:, heads * d : 2 * heads * d] *= 4
    queries = projection[:, : heads * d].unflatten(1, (heads, d))
    keys = projection[:, heads * d : 2 * heads * d].unflatten(1, (heads, d))
    values = projection[:, 2 * heads * d : heads * (2 * d + c)].unflatten(1, (heads, c))
    return queries, keys, values


def reference(inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> list[torch.Tensor]:
    """The einsum reference's output and gradients of queries, keys and values."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = content_attention(*leaves, query_softmax=False)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def relative_error(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((mine.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("channels_last", [False, True], ids=["positions adjacent", "positions apart"])
def test_every_variant_equals_the_reference_in_float64(
    variant: str, shape: tuple[int, ...], channels_last: bool
) -> None:
    inputs = branch_inputs(shape, channels_last=channels_last)
    grad = torch.randn(inputs[2].shape, dtype=torch.float64)
    expected = reference(inputs, grad)
    out = torch.ops.gsa_native.content_forward(*inputs, variant)
    grads = torch.ops.gsa_native.content_backward(grad, *inputs, True, True, True, variant)
    for mine, theirs in zip([out, *grads], expected, strict=True):
        assert mine.dtype == torch.float64
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_each_gradient_alone_is_the_same_and_the_others_are_empty(needs: tuple[bool, bool, bool]) -> None:
    inputs = branch_inputs(SHAPES["short rows, d != c"])
    grad = torch.randn(inputs[2].shape, dtype=torch.float64)
    full = torch.ops.gsa.content_attention_backward(grad, *inputs, True, True, True)
    alone = torch.ops.gsa.content_attention_backward(grad, *inputs, *needs)
    for need, mine, theirs in zip(needs, alone, full, strict=True):
        if need:
            torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-13)
        else:
            assert mine.numel() == 0


def test_op_passes_gradcheck_and_gradgradcheck() -> None:
    inputs = tuple(t.detach().requires_grad_(True) for t in branch_inputs((2, 2, 3, 2, 7), seed=1))
    assert torch.autograd.gradcheck(torch.ops.gsa.content_attention, inputs)
    # A gradient penalty differentiates the backward (create_graph): through gemm's backward.
    assert torch.autograd.gradgradcheck(torch.ops.gsa.content_attention, inputs)


@pytest.mark.parametrize("shape", [(3, 2, 8, 8, 196), (2, 8, 8, 8, 3136), (2, 2, 64, 64, 16)])
def test_float32_is_within_tolerance_of_float64(shape: tuple[int, ...]) -> None:
    inputs = branch_inputs(shape)
    grad = torch.randn(inputs[2].shape, dtype=torch.float64)
    expected = reference(inputs, grad)
    single = [t.float() for t in inputs]
    out = torch.ops.gsa.content_attention(*single)
    grads = torch.ops.gsa.content_attention_backward(grad.float(), *single, True, True, True)
    for mine, theirs in zip([out, *grads], expected, strict=True):
        assert mine.dtype == torch.float32
        assert relative_error(mine, theirs) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    inputs = [t.to(dtype) for t in branch_inputs((2, 2, 8, 8, 50), torch.float32)]
    grad = torch.randn(inputs[2].shape).to(dtype)
    out = torch.ops.gsa.content_attention(*inputs)
    grads = torch.ops.gsa.content_attention_backward(grad, *inputs, True, True, True)
    assert [t.dtype for t in (out, *grads)] == [dtype] * 4
    # Against float32 from the same rounded inputs: only the results' own rounding differs.
    expected = reference(tuple(t.float() for t in inputs), grad.float())
    for mine, theirs in zip([out, *grads], expected, strict=True):
        assert relative_error(mine, theirs) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_an_empty_batch_gives_empty_results() -> None:
    inputs = branch_inputs((0, 2, 3, 2, 5))
    assert torch.ops.gsa.content_attention(*inputs).shape == (0, 2, 2, 5)
    grad = torch.zeros(0, 2, 2, 5, dtype=torch.float64)
    grads = torch.ops.gsa.content_attention_backward(grad, *inputs, True, True, True)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs]


def test_the_query_softmax_ablation_runs_gemm() -> None:
    inputs = branch_inputs((2, 2, 3, 4, 9))
    expected = content_attention_gemm(*inputs, query_softmax=True)
    out = content_attention_native(*inputs, query_softmax=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_calling_the_op_without_a_build_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gsa_native._Process, "library", None)
    monkeypatch.setattr(gsa_native._Process, "error", "content.cpp:1:10: fatal error: no compiler")
    with pytest.raises(gsa_native.GsaError, match=r"the native GSA kernel is not built: content\.cpp:1:10"):
        torch.ops.gsa.content_attention(*branch_inputs((1, 1, 2, 2, 3)))


def test_where_the_kernel_failed_to_build_the_branch_runs_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gsa_native._Process, "library", None)
    monkeypatch.setattr(gsa_native._Process, "error", "no compiler")
    monkeypatch.setattr(gsa_native, "_WARNED", set())
    inputs = branch_inputs((2, 2, 3, 4, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = content_attention_native(*inputs, query_softmax=False)
    assert [w.category for w in caught] == [gsa_native.NativeKernelWarning]
    expected = content_attention_gemm(*inputs, query_softmax=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_compiled_graphs_and_exports_hold_the_op() -> None:
    torch.manual_seed(0)
    module = GlobalSelfAttention2d(4, 8, heads=2, span=6, implementation="native")
    x = torch.randn(2, 4, 5, 6)
    out, forward, backward = compiled_call_targets(module, x)
    torch.testing.assert_close(out, module(x))
    assert forward.count("gsa.content_attention.default") == 1
    assert backward.count("gsa.content_attention_backward.default") == 1
    program = torch.export.export(module.eval(), (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("gsa.content_attention.default") == 1
    torch.testing.assert_close(program.module()(x), module(x))


def test_a_flop_counter_counts_forward_and_backward_like_gemm() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name, function in (("native", content_attention_native), ("gemm", content_attention_gemm)):
        inputs = [t.detach().float().requires_grad_(True) for t in branch_inputs((2, 2, 3, 5, 11))]
        with FlopCounterMode(display=False) as counter:
            function(*inputs, query_softmax=False).sum().backward()
        counts[name] = counter.get_total_flops()
    products = 2 * 2 * 3 * 5 * 11  # B h d c N
    assert counts["native"] == counts["gemm"] == 2 * products * (2 + 5)  # two products forward, five back

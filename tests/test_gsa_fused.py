"""The module's fused training function (``gsa_cli/models/gsa_fused.py``) and the kernels' in-place
backward it runs on (``axial_backward_into``, ``content_backward_into``): equal to the module run branch
by branch, and to the reference, in float64, forward, backward, the batch norm's running statistics and
a second backward; used exactly where it may run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from test_gsa_native import SHAPES, VARIANTS, pass_inputs, reference
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gsa_cli.models import gsa_fused
from gsa_cli.models.gsa import GlobalSelfAttention2d
from gsa_cli.models.gsa_kernels import HEIGHT, WIDTH

pytestmark = pytest.mark.usefixtures("kernel")  # tests/conftest.py: built once, else skipped


# ---------------------------------------------------------------------------------------------------
# The kernels' backward into given tensors.


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "shape",
    [
        SHAPES["odd non-square map, span smaller"],
        SHAPES["many lines, a short axis"],
        (2, 2, 16, 16, 20, 18, 8),
    ],
    ids=["odd map", "short axis", "long axes, 16 channels"],
)
@pytest.mark.parametrize("dim", [HEIGHT, WIDTH], ids=["column pass", "row pass"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_axial_backward_into_stores_or_adds_into_strided_slices(
    variant: str, shape: tuple[int, ...], dim: int, dtype: torch.dtype
) -> None:
    queries, values, pairs = pass_inputs(shape, dim, dtype)
    grad = torch.randn(values.shape, dtype=dtype)
    _, grad_queries, grad_values, grad_pairs = reference(queries, values, pairs, dim, grad)
    # The gradients' home: slices of one projection-shaped tensor, holding something already.
    split = queries.shape[1] * queries.shape[2]
    held = torch.randn(
        queries.shape[0], 2 * split + values.shape[1] * values.shape[2], *queries.shape[3:], dtype=dtype
    )
    before = held.clone()
    into_q = held[:, :split].unflatten(1, queries.shape[1:3])
    into_v = held[:, 2 * split :].unflatten(1, values.shape[1:3])
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for accumulate_q, accumulate_v in [(False, True), (True, False)]:
        held.copy_(before)
        out = torch.ops.gsa_native.axial_backward_into(
            grad, queries, values, pairs, dim, into_q, into_v, accumulate_q, accumulate_v, True, variant
        )
        torch.testing.assert_close(out, grad_pairs, **tolerance)
        start_q = before[:, :split].unflatten(1, queries.shape[1:3]) if accumulate_q else 0
        start_v = before[:, 2 * split :].unflatten(1, values.shape[1:3]) if accumulate_v else 0
        torch.testing.assert_close(into_q, start_q + grad_queries, **tolerance)
        torch.testing.assert_close(into_v, start_v + grad_values, **tolerance)
        torch.testing.assert_close(held[:, split : 2 * split], before[:, split : 2 * split], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_axial_backward_into_adds_half_precision_in_float32(dtype: torch.dtype) -> None:
    queries, values, pairs = pass_inputs((2, 2, 8, 8, 6, 9, 6), WIDTH, torch.float32)
    queries, values = queries.to(dtype), values.to(dtype)
    grad = torch.randn(values.shape).to(dtype)
    _, grad_queries, _, _ = reference(queries.float(), values.float(), pairs, WIDTH, grad.float())
    start = torch.randn(queries.shape).to(dtype)
    into = start.clone()
    empty = values.new_empty(0)
    torch.ops.gsa_native.axial_backward_into(grad, queries, values, pairs, WIDTH, into, empty, True, False,
                                             False, "avx512")  # fmt: skip
    expected = start.float() + grad_queries
    assert (into.float() - expected).abs().max() / expected.abs().max() < 1e-2


def test_axial_backward_into_refuses_a_gradient_of_another_size() -> None:
    queries, values, pairs = pass_inputs(SHAPES["odd non-square map, span smaller"], WIDTH)
    wrong = torch.empty(1, 1, 1, 1, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="the queries' gradient"):
        torch.ops.gsa_native.axial_backward_into(
            values, queries, values, pairs, WIDTH, wrong, values.new_empty(0), True, False, False, "avx512"
        )


def test_content_backward_into_writes_the_gradients_into_strided_slices() -> None:
    torch.manual_seed(0)
    batch, heads, dk, dv, positions = 2, 3, 4, 5, 13
    projection = torch.randn(batch, heads * (2 * dk + dv), positions, dtype=torch.float64)
    q, k, v = (t.unflatten(1, (heads, -1)) for t in projection.split((heads * dk, heads * dk, heads * dv), 1))
    grad = torch.randn(batch, heads, dv, positions, dtype=torch.float64)
    expected = torch.ops.gsa_native.content_backward(grad, q, k, v, True, True, True, "avx512")
    held = torch.full_like(projection, float("nan"))
    into = [t.unflatten(1, (heads, -1)) for t in held.split((heads * dk, heads * dk, heads * dv), 1)]
    torch.ops.gsa_native.content_backward_into(grad, q, k, v, *into, "avx512")
    for mine, theirs in zip(into, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------
# The module.


def _module(case: dict[str, object]) -> tuple[GlobalSelfAttention2d, torch.Tensor]:
    torch.manual_seed(0)
    channels, heads, size, span = 12, 3, (5, 7), 7
    stride = int(case.get("stride", 1))  # type: ignore[call-overload]
    module = GlobalSelfAttention2d(channels, channels, heads=heads, span=span, stride=stride).double()
    bn = case.get("bn")
    if isinstance(bn, nn.BatchNorm2d):
        module.bn = copy.deepcopy(bn).double()  # the case's own stays as declared
    with torch.no_grad():
        if module.bn.affine:
            module.bn.weight.uniform_(0.5, 1.5)
            module.bn.bias.uniform_(-0.5, 0.5)
        if module.bn.track_running_stats:
            module.bn.running_mean.uniform_(-1, 1)
            module.bn.running_var.uniform_(0.5, 2)
    module.train(bool(case.get("train", True)))
    x = torch.randn(int(case.get("batch", 2)), channels, *size, dtype=torch.float64)  # type: ignore[call-overload]
    if case.get("channels_last"):
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return module, x


def _step(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, input and parameter gradients and the buffers after one forward and backward."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = [p.grad for p in module.parameters()]
    return [out.detach(), x.grad, *grads, *(b.clone() for b in module.buffers())]


CASES = {
    "train": {},
    "eval, with gradients": {"train": False},
    "stride 2, batch 1": {"stride": 2, "batch": 1},
    "channels-last": {"channels_last": True},
    "momentum None (a cumulative average)": {"bn": nn.BatchNorm2d(12, momentum=None)},
    "no running statistics": {"bn": nn.BatchNorm2d(12, track_running_stats=False)},
    "no running statistics, eval": {"bn": nn.BatchNorm2d(12, track_running_stats=False), "train": False},
    "no affine": {"bn": nn.BatchNorm2d(12, affine=False)},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_fused_module_equals_the_reference_with_its_running_statistics(case: dict[str, object]) -> None:
    module, x = _module(case)
    fused = copy.deepcopy(module)
    reference_module = copy.deepcopy(module)
    reference_module.implementation = "reference"
    with torch.no_grad():
        projection = fused.qkv(x)
    with torch.enable_grad():
        assert gsa_fused.fused_ready(fused, projection)
    for _ in range(2):  # twice: the running statistics and the cumulative average move on alike
        mine = _step(fused, x)
        theirs = _step(reference_module, x)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_fused_module_passes_gradcheck_and_gradgradcheck() -> None:
    torch.manual_seed(0)
    module = GlobalSelfAttention2d(4, 4, heads=2, span=3).double().train()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert type(module(x).grad_fn).__name__ == "_FusedAttentionBackward"
    assert torch.autograd.gradcheck(module, (x,))
    assert torch.autograd.gradgradcheck(module, (x,))  # a gradient penalty: the public operators again


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_second_backward_of_the_same_graph_gives_the_same_gradients(train: bool) -> None:
    # The backward frees the column pass's outputs as it goes; with retain_graph it forms them again.
    module, x = _module({"train": train})
    x.requires_grad_(True)
    out = module(x)
    inputs = [x, *module.parameters()]
    first = torch.autograd.grad(out.square().sum(), inputs, retain_graph=True)
    second = torch.autograd.grad(out.square().sum(), inputs)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _runs_fused(
    module: GlobalSelfAttention2d, x: torch.Tensor, around: Callable[[], object] | None = None
) -> bool:
    x = x.detach().clone().requires_grad_(True)
    if around is None:
        out = module(x)
    else:
        with around():  # type: ignore[attr-defined]
            out = module(x)
    return out.grad_fn is not None and "_FusedAttention" in type(out.grad_fn).__name__


def test_the_fused_function_runs_only_where_it_may() -> None:
    module, x = _module({})
    assert _runs_fused(module, x)
    assert not _runs_fused(module, x, torch.no_grad)
    assert not _runs_fused(module, x, lambda: FlopCounterMode(display=False))
    for changed in ({"implementation": "gemm"}, {"implementation": "reference"}, {"content": False},
                    {"positional": False}, {"query_softmax": True}):  # fmt: skip
        other = copy.deepcopy(module)
        for key, value in changed.items():
            setattr(other, key, value)
        assert not _runs_fused(other, x), changed
    synced = copy.deepcopy(module)
    synced.bn = nn.SyncBatchNorm(12).double()  # reduces across processes: the module's own path
    assert not gsa_fused.fused_ready(synced, synced.qkv(x))
    single = copy.deepcopy(module).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gsa_fused.fused_ready(single, single.qkv(x.float()))
    assert not gsa_fused.fused_ready(module, module.qkv(x)[:, :, ::2])  # neither layout

"""The GSA module against a naive per-pixel reference written from spec section 1, its implementations
against its reference (einsum) form, and its properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gsa_cli.models import GlobalSelfAttention2d, gsa_kernels
from gsa_cli.models.gsa import IMPLEMENTATIONS, Axis, Implementation, axial_attention, content_attention
from gsa_cli.models.gsa_kernels import (
    HEIGHT,
    WIDTH,
    AxialRelativeAttention,
    ContentAttention,
    axial_attention_gemm,
    content_attention_gemm,
)

FAST = [name for name in IMPLEMENTATIONS if name != "reference"]  # held equal to the reference


def naive_gsa(module: GlobalSelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """Spec 1.1-1.3 pixel by pixel, with plain loops and no shared code with the module."""
    batch, _, height, width = x.shape
    heads, dk, dv, span = module.heads, module.key_channels, module.out_channels, module.span
    dkh, dvh = dk // heads, dv // heads
    weight = module.qkv.weight[:, :, 0, 0]
    qkv = torch.einsum("oc,bchw->bohw", weight, x)
    q, k, v = qkv[:, :dk], qkv[:, dk : 2 * dk], qkv[:, 2 * dk :]
    out = torch.zeros(batch, dv, height, width, dtype=x.dtype)

    if module.content:
        for b in range(batch):
            for head in range(heads):
                kq = slice(head * dkh, (head + 1) * dkh)
                vs = slice(head * dvh, (head + 1) * dvh)
                keys = k[b, kq].reshape(dkh, -1)
                keys = torch.exp(keys) / torch.exp(keys).sum(dim=1, keepdim=True)  # softmax over N
                values = v[b, vs].reshape(dvh, -1)
                context = torch.zeros(dkh, dvh, dtype=x.dtype)
                for d in range(dkh):
                    for e in range(dvh):
                        context[d, e] = (keys[d] * values[e]).sum()
                for row in range(height):
                    for col in range(width):
                        query = q[b, kq, row, col]
                        if module.query_softmax:
                            query = torch.exp(query) / torch.exp(query).sum()
                        for e in range(dvh):
                            out[b, head * dvh + e, row, col] += (context[:, e] * query).sum()

    if module.positional:
        y = torch.zeros(batch, dv, height, width, dtype=x.dtype)
        for b in range(batch):
            for head in range(heads):
                kq = slice(head * dkh, (head + 1) * dkh)
                vs = slice(head * dvh, (head + 1) * dvh)
                for row in range(height):
                    for col in range(width):
                        for i in range(height):
                            if abs(i - row) < span:
                                rel = module.rel_col[i - row + span - 1, kq]
                                y[b, vs, row, col] += (q[b, kq, row, col] * rel).sum() * v[b, vs, i, col]
        bn = module.bn
        if module.training:
            mean = y.mean(dim=(0, 2, 3))
            var = y.var(dim=(0, 2, 3), unbiased=False)
        else:
            assert bn.running_mean is not None
            assert bn.running_var is not None
            mean, var = bn.running_mean, bn.running_var
        y = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        for b in range(batch):
            for head in range(heads):
                kq = slice(head * dkh, (head + 1) * dkh)
                vs = slice(head * dvh, (head + 1) * dvh)
                for row in range(height):
                    for col in range(width):
                        for j in range(width):
                            if abs(j - col) < span:
                                rel = module.rel_row[j - col + span - 1, kq]
                                weight_j = (q[b, kq, row, col] * rel).sum()
                                out[b, vs, row, col] += weight_j * y[b, vs, row, j]

    if module.stride == 2:
        pooled = torch.zeros(batch, dv, math.ceil(height / 2), math.ceil(width / 2), dtype=x.dtype)
        for row in range(pooled.shape[2]):
            for col in range(pooled.shape[3]):
                window = out[:, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
                pooled[:, :, row, col] = window.mean(dim=(2, 3))
        out = pooled
    return out


def make_module(*, seed: int = 0, **kwargs: object) -> GlobalSelfAttention2d:
    torch.manual_seed(seed)
    options: dict[str, object] = {"heads": 2, "span": 9}
    options.update(kwargs)
    module = GlobalSelfAttention2d(4, 6, **options).double()  # type: ignore[arg-type]
    if module.positional:
        # Random BN state, so that the test sees whether BN is applied where the spec puts it.
        with torch.no_grad():
            module.bn.weight.uniform_(0.5, 1.5)
            module.bn.bias.uniform_(-0.5, 0.5)
            module.bn.running_mean.uniform_(-0.5, 0.5)
            module.bn.running_var.uniform_(0.5, 2.0)
    return module.eval()


CASES = {
    "both branches": {},
    "content only": {"positional": False},
    "positional only": {"content": False},
    "three heads, key channels 9": {"heads": 3, "key_channels": 9},
    "one head": {"heads": 1},
    "span smaller than the map": {"span": 2},
    "stride 2": {"stride": 2},
    "stride 2, span 3": {"stride": 2, "span": 3},
    "query softmax": {"query_softmax": True},
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_matches_naive_reference_on_odd_non_square_map(options: dict[str, object]) -> None:
    module = make_module(**options)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    expected = naive_gsa(module, x)
    actual = module(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_matches_naive_reference_in_training_mode_with_batch_statistics() -> None:
    module = make_module(span=3).train()
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    expected = naive_gsa(module, x)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_same_tables_serve_a_larger_input_than_the_span() -> None:
    module = make_module(span=3)
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(module(x), naive_gsa(module, x), rtol=1e-10, atol=1e-10)


def test_in_eval_mode_the_positional_branch_grows_with_the_cube_of_the_input_scale() -> None:
    # README: no softmax, and a fixed batch norm (here the identity: fresh running statistics, no eps
    # shift in the ratio), so q (y(q, v)) is homogeneous of degree 3; with the content branch (degree 2
    # times a softmax of the keys) the module grows about as fast.
    torch.manual_seed(0)
    positional = GlobalSelfAttention2d(8, 8, heads=2, span=5, content=False).double().eval()
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(positional(10 * x), 1000 * positional(x), rtol=1e-9, atol=0)
        both = GlobalSelfAttention2d(8, 8, heads=2, span=5).double().eval()
        growth = both(100 * x).abs().mean() / both(x).abs().mean()
    assert 1e5 < growth < 1e7


# ---------------------------------------------------------------------------------------------------
# The reference (the einsums of models/gsa.py) against the loop; every implementation against it.


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_reference_matches_naive_loop(options: dict[str, object]) -> None:
    module = make_module(implementation="reference", **options)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(module(x), naive_gsa(module, x), rtol=1e-10, atol=1e-10)


def test_reference_matches_naive_loop_in_training_mode_with_gradients() -> None:
    module = make_module(implementation="reference", span=3).train()
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 6, 6, 5, dtype=torch.float64)
    expected = torch.autograd.grad((naive_gsa(module, x) * weights).sum(), [x, *module.parameters()])
    actual = torch.autograd.grad((module(x) * weights).sum(), [x, *module.parameters()])
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _output_and_gradients(module: GlobalSelfAttention2d, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output, and the gradients of a fixed random weighting of it for the input and each parameter."""
    out = module(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    names = ["input", *(name for name, _ in module.named_parameters())]
    grads = torch.autograd.grad((out * weights).sum(), [x, *module.parameters()])
    return {"output": out, **dict(zip(names, grads, strict=True))}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("implementation", FAST)
def test_every_implementation_equals_the_reference_forward_and_backward(
    implementation: Implementation, options: dict[str, object], training: bool
) -> None:
    reference = make_module(implementation="reference", **options).train(training)
    other = make_module(implementation=implementation, **options).train(training)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    expected, actual = _output_and_gradients(reference, x), _output_and_gradients(other, x)
    assert set(actual) == set(expected)
    parameters = {"qkv.weight", "rel_col", "rel_row", "bn.weight", "bn.bias"} if other.positional else set()
    assert parameters | {"output", "input", "qkv.weight"} == set(actual)
    for name, want in expected.items():
        torch.testing.assert_close(actual[name], want, rtol=1e-10, atol=1e-10, msg=name)
    for name, buffer in reference.named_buffers():  # batch-norm running statistics, when training
        torch.testing.assert_close(dict(other.named_buffers())[name], buffer, rtol=1e-12, atol=1e-12)


def _strided_projection(heads: int, splits: tuple[int, ...], *spatial: int) -> list[torch.Tensor]:
    """Views of one projection split along its channels, as the module passes them: ``(B, h, c, ...)``."""
    projection = torch.randn(2, heads * sum(splits), *spatial, dtype=torch.float64)
    parts = projection.split([heads * c for c in splits], dim=1)
    return [t.unflatten(1, (heads, -1)).detach().requires_grad_(True) for t in parts]


def _assert_same_function(
    reference: object, fast: object, inputs: list[torch.Tensor], **kwargs: object
) -> None:
    results = []
    for function in (reference, fast):
        out = function(*inputs, **kwargs)  # type: ignore[operator]
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append((out, *torch.autograd.grad((out * weights).sum(), inputs)))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("query_softmax", [False, True], ids=["plain queries", "query softmax"])
def test_content_functions_are_equal(query_softmax: bool) -> None:
    torch.manual_seed(0)
    inputs = [t.flatten(-2) for t in _strided_projection(3, (3, 3, 2), 5, 7)]  # (B, h, c, N)
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    _assert_same_function(content_attention, content_attention_gemm, inputs, query_softmax=query_softmax)


@pytest.mark.usefixtures("logits_chunk", "result_layout")
@pytest.mark.parametrize("axis", ["height", "width"])
def test_axial_functions_are_equal(axis: Axis) -> None:
    torch.manual_seed(0)
    queries, values = _strided_projection(3, (3, 2), 5, 4)
    length = {"height": 5, "width": 4}[axis]
    pairs = torch.randn(3, length, 3, length, dtype=torch.float64, requires_grad=True)
    _assert_same_function(axial_attention, axial_attention_gemm, [queries, values, pairs], axis=axis)


def test_implementation_is_shown_and_auto_by_default() -> None:
    assert GlobalSelfAttention2d(4, 6, heads=2, span=3).implementation == "auto"
    module = GlobalSelfAttention2d(4, 6, heads=2, span=3, implementation="reference")
    assert "implementation='reference'" in repr(module)


def test_parameter_layout_follows_the_spec() -> None:
    module = GlobalSelfAttention2d(16, 32, heads=4, key_channels=8, span=5)
    shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert shapes == {
        "qkv.weight": (2 * 8 + 32, 16, 1, 1),
        "rel_col": (9, 8),
        "rel_row": (9, 8),
        "bn.weight": (32,),
        "bn.bias": (32,),
        "bn.running_mean": (32,),
        "bn.running_var": (32,),
        "bn.num_batches_tracked": (),
    }
    content_only = GlobalSelfAttention2d(16, 32, heads=4, span=5, positional=False)
    assert set(content_only.state_dict()) == {"qkv.weight"}


def test_key_channels_default_to_output_channels() -> None:
    module = GlobalSelfAttention2d(8, 24, heads=8, span=4)
    assert module.key_channels == 24
    assert module.qkv.weight.shape == (72, 8, 1, 1)
    assert module.rel_col.std().item() == pytest.approx((24 / 8) ** -0.5, rel=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": 5}, "must divide"),
        ({"span": 0}, "span must be at least 1"),
        ({"stride": 3}, "stride must be 1 or 2"),
        ({"content": False, "positional": False}, "at least one"),
        (
            {"implementation": "fast"},
            "implementation must be one of auto, reference, gemm, native, got 'fast'",
        ),
    ],
)
def test_impossible_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    options: dict[str, object] = {"heads": 2, "span": 4}
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        GlobalSelfAttention2d(4, 6, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_content_branch_is_permutation_equivariant(implementation: Implementation) -> None:
    module = make_module(positional=False, implementation=implementation)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    perm = torch.randperm(35)
    shuffled = x.flatten(2)[:, :, perm].reshape_as(x)
    expected = module(x).flatten(2)[:, :, perm].reshape(2, 6, 5, 7)
    torch.testing.assert_close(module(shuffled), expected)


def test_positional_branch_is_not_permutation_equivariant() -> None:
    module = make_module(content=False)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    perm = torch.randperm(35)
    shuffled = x.flatten(2)[:, :, perm].reshape_as(x)
    expected = module(x).flatten(2)[:, :, perm].reshape(2, 6, 5, 7)
    assert not torch.allclose(module(shuffled), expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("branch", ["content", "positional", "both"])
def test_one_module_is_global(branch: str, implementation: Implementation) -> None:
    options = {"content": {"positional": False}, "positional": {"content": False}, "both": {}}[branch]
    module = make_module(span=9, implementation=implementation, **options)
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    module(x)[0, :, 0, 0].sum().backward()
    assert x.grad is not None
    assert x.grad[0, :, 8, 8].abs().sum() > 0  # opposite corner


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_span_limits_the_positional_branch(implementation: Implementation) -> None:
    module = make_module(content=False, span=2, implementation=implementation)
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    module(x)[0, :, 0, 0].sum().backward()
    assert x.grad is not None
    # Two hops of at most one pixel each: (0,0) sees rows and columns 0..1 only.
    assert x.grad[0, :, 2:, :].abs().sum() == 0
    assert x.grad[0, :, :, 2:].abs().sum() == 0
    assert x.grad[0, :, 1, 1].abs().sum() > 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_parameter_receives_a_gradient(implementation: Implementation) -> None:
    module = make_module(implementation=implementation).train()
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    module(x).pow(2).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def _counted_macs(module: GlobalSelfAttention2d, size: int) -> int:
    x = torch.randn(1, 8, size, size)
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_content_cost_grows_linearly_with_positions(implementation: Implementation) -> None:
    module = GlobalSelfAttention2d(8, 8, heads=2, span=16, positional=False, implementation=implementation)
    module.eval()
    assert _counted_macs(module, 16) == 4 * _counted_macs(module, 8)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_positional_cost_grows_as_positions_times_height_plus_width(implementation: Implementation) -> None:
    module = GlobalSelfAttention2d(8, 8, heads=2, span=16, content=False, implementation=implementation)
    module.eval()
    qkv_macs = {s: 3 * 8 * 8 * s * s for s in (8, 16)}
    attention = {s: _counted_macs(module, s) - qkv_macs[s] for s in (8, 16)}
    # N (H + W) doubles the side: 4 x 2 = 8 times the work.
    assert attention[16] == 8 * attention[8]
    # Per axis pass: logits N * size * d_k and aggregation N * size * d_v, two passes.
    assert attention[8] == 2 * (64 * 8 * 8 + 64 * 8 * 8)


@pytest.fixture(params=["all heads at once", "two heads, then one", "one head at a time"])
def logits_chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with each way of chunking the heads (large maps go one head at a time, small ones
    in groups; with the gradchecks' 3 heads, groups of two make a chunk of two, then one of one)."""
    per_head_logits, groups = {
        "all heads at once": (1 << 30, 1),
        "two heads, then one": (1 << 30, 2),
        "one head at a time": (1, 1),
    }[request.param]
    monkeypatch.setattr(gsa_kernels, "PER_HEAD_LOGITS", per_head_logits)
    monkeypatch.setattr(gsa_kernels, "HEAD_GROUPS", groups)


@pytest.fixture(params=["short results transposed", "never transposed", "always transposed"])
def result_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with each way of laying out the GEMM results (transposed when they are short)."""
    limits = {"short results transposed": 3, "never transposed": 0, "always transposed": 1 << 30}
    monkeypatch.setattr(gsa_kernels, "SHORT_COLUMNS", limits[request.param])


@pytest.mark.usefixtures("logits_chunk", "result_layout")
@pytest.mark.parametrize("axis", [HEIGHT, WIDTH], ids=["column pass", "row pass"])
def test_axial_pass_gradients_pass_gradcheck(axis: int) -> None:
    torch.manual_seed(0)
    batch, heads, dk, dv, height, width = 2, 3, 3, 2, 5, 4  # some results short enough to transpose
    # Strided views, as the module passes them (slices of its projection).
    projection = torch.randn(batch, heads * (dk + dv), height, width, dtype=torch.float64)
    queries = projection[:, : heads * dk].unflatten(1, (heads, dk)).detach().requires_grad_(True)
    values = projection[:, heads * dk :].unflatten(1, (heads, dv)).detach().requires_grad_(True)
    length = queries.shape[axis]
    pairs = torch.randn(heads, length, dk, length, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, v, p: AxialRelativeAttention.apply(q, v, p, axis), (queries, values, pairs)
    )


@pytest.mark.usefixtures("logits_chunk")
def test_axial_pass_is_twice_differentiable() -> None:
    # A gradient penalty differentiates the backward itself (create_graph=True).
    torch.manual_seed(0)
    queries = torch.randn(2, 2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    pairs = torch.randn(2, 4, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda q, v, p: AxialRelativeAttention.apply(q, v, p, WIDTH), (queries, values, pairs)
    )


@pytest.mark.parametrize("query_softmax", [False, True], ids=["plain queries", "query softmax"])
def test_content_branch_is_twice_differentiable(query_softmax: bool) -> None:
    torch.manual_seed(0)
    inputs = [torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: ContentAttention.apply(q, k, v, query_softmax), tuple(inputs)
    )


@pytest.mark.parametrize("query_softmax", [False, True], ids=["plain queries", "query softmax"])
def test_content_branch_gradients_pass_gradcheck(query_softmax: bool) -> None:
    torch.manual_seed(0)
    batch, heads, dk, dv, positions = 2, 3, 3, 2, 7
    projection = torch.randn(batch, heads * (2 * dk + dv), positions, dtype=torch.float64)
    q, k, v = projection.split((heads * dk, heads * dk, heads * dv), dim=1)
    inputs = [t.unflatten(1, (heads, -1)).detach().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: ContentAttention.apply(q, k, v, query_softmax), tuple(inputs)
    )


@pytest.mark.usefixtures("logits_chunk", "result_layout")
@pytest.mark.parametrize("options", [{}, {"span": 2, "stride": 2}], ids=["global", "span 2, stride 2"])
def test_module_gradients_match_the_naive_reference(options: dict[str, object]) -> None:
    module = make_module(**options).train()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(module(x).shape, dtype=torch.float64)
    expected = torch.autograd.grad((naive_gsa(module, x) * weights).sum(), [x, *module.parameters()])
    actual = torch.autograd.grad((module(x) * weights).sum(), [x, *module.parameters()])
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_on_cpu_is_close_to_float32(dtype: torch.dtype, implementation: Implementation) -> None:
    torch.manual_seed(0)
    module = GlobalSelfAttention2d(16, 16, heads=4, span=8, implementation=implementation).eval()
    x = torch.randn(2, 16, 8, 8)
    reference = module(x)
    with torch.autocast("cpu", dtype=dtype):
        low = module(x)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() < 0.05 * scale
    module.train()
    expected = torch.autograd.grad(module(x).pow(2).mean(), list(module.parameters()))
    with torch.autocast("cpu", dtype=dtype):
        loss = module(x).float().pow(2).mean()
    grads = torch.autograd.grad(loss, list(module.parameters()))
    for (name, _), grad, want in zip(module.named_parameters(), grads, expected, strict=True):
        assert grad.dtype == torch.float32, name
        assert torch.isfinite(grad).all(), name
        assert (grad - want).abs().max() < 0.05 * want.abs().max(), name


def test_channels_last_input_gives_the_same_output() -> None:
    module = make_module()
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(module(x.to(memory_format=torch.channels_last)), module(x))


def test_inference_mode_first_then_training() -> None:
    module = GlobalSelfAttention2d(8, 8, heads=2, span=6)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        module.eval()(x)
    module.train()(x).sum().backward()
    assert module.rel_col.grad is not None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_compiles_without_graph_breaks(implementation: Implementation) -> None:
    torch._dynamo.reset()
    module = GlobalSelfAttention2d(8, 8, heads=2, span=6, implementation=implementation).train()
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(x)
        out.sum().backward()
        compiled(torch.randn(2, 8, 6, 6)).sum().backward()  # the same graph again, no recompilation
    torch.testing.assert_close(out, module(x))
    assert module.rel_row.grad is not None


@pytest.mark.slow
def test_compiles_with_inductor() -> None:
    torch._dynamo.reset()
    module = GlobalSelfAttention2d(8, 8, heads=2, span=6).eval()
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5)

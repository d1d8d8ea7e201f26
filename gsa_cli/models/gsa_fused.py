"""A GSA module's training step on the CPU's native kernels as one autograd function.

Run branch by branch (:class:`gsa_cli.models.gsa.GlobalSelfAttention2d`), a module's backward sums the
queries' gradient over their three uses (the content branch and both axial passes) and the values'
over two, then concatenates the queries', keys' and values' gradients into the projection's: passes
over the activations that move data and multiply nothing (a tenth of the module's time at 56x56). Here
the backward writes each gradient where the projection's gradient holds it: the content branch stores
its three, and each axial pass adds its own to them as it writes (``axial_backward_into``); the batch
norm between the passes runs as ATen's.

It computes what the module computes (tests hold it equal to the reference in float64, forward,
backward, the batch norm's running statistics, and a second backward), and runs where all of this holds:
eager training (grad enabled) on the CPU with the native kernel built, float32 or float64 without
autocast, both branches on and no query softmax, a plain ``nn.BatchNorm2d`` (``SyncBatchNorm`` reduces
its statistics across processes), a contiguous or channels-last projection, and no tracing,
compilation, export, dispatch mode (the MAC counters' ``FlopCounterMode``) or ``torch.func`` transform:
those see the module's public operators. A backward with ``create_graph`` forms the module again from
those operators and differentiates it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsa_cli.models.gsa_native import refusal, requested_isa

if TYPE_CHECKING:
    from gsa_cli.models.gsa import GlobalSelfAttention2d

Layout = tuple[int, int, int]  # heads, d_k, d_v


def fused_ready(module: GlobalSelfAttention2d, qkv: Tensor) -> bool:
    """Whether ``module`` runs on its projection ``qkv`` as one function (see the module's note)."""
    return (
        not torch.compiler.is_compiling()  # first: a compiled or exported graph reads nothing else here
        and module.content
        and module.positional
        and not module.query_softmax
        and module.implementation in ("auto", "native")
        and torch.is_grad_enabled()
        and qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.float64)
        and type(module.bn) is nn.BatchNorm2d
        and (qkv.is_contiguous() or qkv.is_contiguous(memory_format=torch.channels_last))
        and not torch.is_autocast_enabled("cpu")
        and not torch._C._get_tracing_state()  # torch.jit.trace (fvcore's MAC counter)
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
        and refusal("cpu", module.implementation) is None
    )


def fused_attention(module: GlobalSelfAttention2d, qkv: Tensor) -> Tensor:
    """The module's two branches and their sum on its projection ``qkv``: ``(B, d_v, H, W)``, before any
    pooling. Updates the batch norm's running statistics as ``nn.BatchNorm2d`` does."""
    height, width = qkv.shape[-2:]
    bn = module.bn
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_statistics = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats  # whether the running statistics are used or updated
    running = (bn.running_mean, bn.running_var) if keep else (None, None)
    layout = (module.heads, module.key_channels, module.out_channels)
    settings = (batch_statistics, factor, bn.eps, running)
    out: Tensor = _FusedAttention.apply(
        qkv, module._pairs(module.rel_col, height), module._pairs(module.rel_row, width), bn.weight, bn.bias,
        layout, settings,
    )  # fmt: skip
    return out


def _split(qkv: Tensor, layout: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values ``(B, h, channels, H, W)``: views of the projection (or its gradient)."""
    heads, dk, dv = layout
    q, k, v = qkv.split((dk, dk, dv), dim=1)
    return q.unflatten(1, (heads, -1)), k.unflatten(1, (heads, -1)), v.unflatten(1, (heads, -1))


def _positions(t: Tensor) -> Tensor:
    """``(B, h, channels, H, W)`` as ``(B, h, channels, N)``: a view (gradients are written through it)."""
    return t.view(*t.shape[:3], -1)


def _unfused(
    qkv: Tensor,
    pairs: tuple[Tensor, Tensor],
    bn: tuple[Tensor | None, Tensor | None],
    layout: Layout,
    settings: Any,
) -> Tensor:
    """The same function from the public operators, differentiable twice (for a backward with
    ``create_graph``); the batch norm as in the forward, without updating its running statistics."""
    batch_statistics, _, eps, (running_mean, running_var) = settings
    q, k, v = _split(qkv, layout)
    out = torch.ops.gsa.content_attention(q.flatten(-2), k.flatten(-2), v.flatten(-2))
    y = torch.ops.gsa.axial_attention(q, v, pairs[0], 3)
    shape = y.shape
    mean, var = (None, None) if batch_statistics else (running_mean, running_var)
    y = F.batch_norm(y.flatten(1, 2), mean, var, bn[0], bn[1], batch_statistics, 0.0, eps).view(shape)
    return (out.view(shape) + torch.ops.gsa.axial_attention(q, y, pairs[1], 4)).flatten(1, 2)


class _FusedAttention(torch.autograd.Function):
    """Both branches and their sum from the projection, the pairs of both tables and the batch norm's
    affine parameters; ``layout`` and ``settings`` as :func:`fused_attention` makes them."""

    @staticmethod
    def forward(
        ctx: Any,
        qkv: Tensor,
        pairs_col: Tensor,
        pairs_row: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        layout: Layout,
        settings: Any,
    ) -> Tensor:
        batch_statistics, factor, eps, (running_mean, running_var) = settings
        isa = requested_isa()
        q, k, v = _split(qkv, layout)
        out = torch.ops.gsa_native.content_forward(q.flatten(-2), k.flatten(-2), v.flatten(-2), isa)
        y = torch.ops.gsa_native.axial_forward(q, v, pairs_col, 3, isa)  # (B, h, c, H, W)
        normed, mean, invstd = torch.native_batch_norm(
            y.flatten(1, 2), weight, bias, running_mean, running_var, batch_statistics, factor, eps
        )
        normed = normed.view(y.shape)
        out = out.view(y.shape).add_(torch.ops.gsa_native.axial_forward(q, normed, pairs_row, 4, isa))
        kept = () if batch_statistics else (running_mean, running_var)  # eval mode's backward reads them
        ctx.save_for_backward(qkv, pairs_col, pairs_row, weight, bias, mean, invstd, *kept)
        # The column pass's output before and after the batch norm: intermediates, kept on ctx so that
        # the backward frees each once it is used (a second backward forms them again from the inputs).
        ctx.intermediates = [y, normed]
        ctx.layout, ctx.settings = layout, settings
        return out.flatten(1, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qkv, pairs_col, pairs_row, weight, bias, mean, invstd, *kept = ctx.saved_tensors
        batch_statistics, _, eps, _ = ctx.settings
        running_mean, running_var = kept if kept else (None, None)
        isa = requested_isa()
        q, k, v = _split(qkv, ctx.layout)
        if ctx.intermediates is None:  # a second backward of the same graph (retain_graph): form them again
            y = torch.ops.gsa_native.axial_forward(q, v, pairs_col, 3, isa)
            normed = torch.native_batch_norm(
                y.flatten(1, 2), weight, bias, running_mean, running_var, batch_statistics, 0.0, eps
            )[0].view(y.shape)
        else:
            y, normed = ctx.intermediates
        ctx.intermediates = None  # freed as they are used below
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # backward(create_graph=True): differentiate the public operators
            inputs = (qkv, pairs_col, pairs_row, weight, bias)
            wanted = [t for t, need in zip(inputs, needs, strict=False) if need]
            with torch.enable_grad():
                out = _unfused(qkv, (pairs_col, pairs_row), (weight, bias), ctx.layout, ctx.settings)
            found = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
            return (*(next(found) if need else None for need in needs[:5]), None, None)
        # Row pass, batch norm, then the projection's gradient: allocated once the column pass's outputs
        # are freed, so that the peak stays that of the module run branch by branch.
        grad = grad.unflatten(1, (ctx.layout[0], -1))  # (B, h, c, H, W)
        grad_q_row, grad_normed = torch.empty_like(q), torch.empty_like(normed)
        grad_row = torch.ops.gsa_native.axial_backward_into(
            grad, q, normed, pairs_row, 4, grad_q_row, grad_normed, False, False, needs[2], isa
        )
        shape = y.shape
        del normed
        grad_y, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_normed.flatten(1, 2), y.flatten(1, 2), weight, running_mean, running_var, mean, invstd,
            batch_statistics, eps, [True, weight is not None and needs[3], bias is not None and needs[4]],
        )  # fmt: skip
        del y, grad_normed
        grads = torch.empty_like(qkv)  # the projection's gradient, written in place from here on
        grad_q, grad_k, grad_v = _split(grads, ctx.layout)
        torch.ops.gsa_native.content_backward_into(
            grad.flatten(-2), q.flatten(-2), k.flatten(-2), v.flatten(-2),
            _positions(grad_q), _positions(grad_k), _positions(grad_v), isa,
        )  # fmt: skip
        del grad
        grad_q.add_(grad_q_row)
        del grad_q_row
        grad_col = torch.ops.gsa_native.axial_backward_into(
            grad_y.view(shape), q, v, pairs_col, 3, grad_q, grad_v, True, True, needs[1], isa
        )
        return (
            grads if needs[0] else None,
            grad_col if needs[1] else None,
            grad_row if needs[2] else None,
            grad_weight if needs[3] else None,
            grad_bias if needs[4] else None,
            None,
            None,
        )

"""GSA's content branch as one fused C++ kernel (``csrc/content.cpp``), in the library of :mod:`.gsa_native`.

:func:`content_attention_native` has the signature of :func:`gsa_cli.models.gsa.content_attention` and
computes the same thing (tests hold them equal in float64, forward and backward). Where the batched GEMMs
of :class:`~gsa_cli.models.gsa_kernels.ContentAttention` copy the projection's strided views, write the
softmaxed keys and run a few tall, thin matrix products per head, the kernel takes each (image, head) in
turn: its keys softmaxed, the ``d x c`` context and the output formed in cache, nothing of the
activations' size written but the result (backward forms the softmax and the context again). float32 and
float64; bfloat16 and float16 inputs computed in float32 and returned in their dtype.

It is the custom op ``gsa::content_attention`` (:data:`CONTENT_OP`), with a fake implementation and an
autograd formula whose backward is ``gsa::content_attention_backward``, as the axial op is; the MAC
counters count it by name. The ``query_softmax`` ablation, and a backward with ``create_graph``, run the
gemm implementation (its backward is differentiable).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from gsa_cli.models.gsa_kernels import ContentAttention, content_attention_gemm
from gsa_cli.models.gsa_native import loaded_or_raise, refusal, requested_isa

CONTENT_OP = "gsa::content_attention"  # the public operators, as the MAC counters know them
CONTENT_BACKWARD_OP = "gsa::content_attention_backward"


@torch.library.custom_op(CONTENT_OP, mutates_args=(), device_types="cpu")
def content_attention_op(queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """The content branch with the shapes of :func:`gsa_cli.models.gsa.content_attention` (no query
    softmax); ``(B, h, c, N)`` in the values' dtype."""
    loaded_or_raise()
    out: Tensor = torch.ops.gsa_native.content_forward(queries, keys, values, requested_isa())
    return out


@content_attention_op.register_fake
def _content_attention_fake(queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    return values.new_empty(values.shape)


@torch.library.custom_op(CONTENT_BACKWARD_OP, mutates_args=(), device_types="cpu")
def content_attention_backward_op(
    grad: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    need_queries: bool,
    need_keys: bool,
    need_values: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`content_attention_op`'s queries, keys and values (empty where not
    needed), each in its input's dtype; the softmax and the context formed again."""
    loaded_or_raise()
    needs = (need_queries, need_keys, need_values)
    grads = torch.ops.gsa_native.content_backward(grad, queries, keys, values, *needs, requested_isa())
    return grads[0], grads[1], grads[2]


@content_attention_backward_op.register_fake
def _content_attention_backward_fake(
    grad: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    need_queries: bool,
    need_keys: bool,
    need_values: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(  # type: ignore[return-value]
        t.new_empty(t.shape if need else (0,))
        for t, need in zip((queries, keys, values), (need_queries, need_keys, need_values), strict=True)
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    queries, keys, values = ctx.saved_tensors
    needs: tuple[bool, bool, bool] = tuple(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():  # backward(create_graph=True): the gemm form, differentiable again
        inputs = [t for t, need in zip((queries, keys, values), needs, strict=True) if need]
        with torch.enable_grad():
            out = ContentAttention.apply(queries, keys, values, False)
        found = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
        return tuple(next(found) if need else None for need in needs)
    grads = torch.ops.gsa.content_attention_backward(grad, queries, keys, values, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))


content_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.gsa.content_attention)
def _content_attention_flops(queries: Any, keys: Any, values: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs (2 per multiply-add) from the operands' shapes, for ``FlopCounterMode``: the context
    ``B h d c N`` and its product with the queries, as the batched GEMMs count."""
    batch, heads, channels, positions = queries
    return 2 * 2 * batch * heads * channels * values[2] * positions


@register_flop_formula(torch.ops.gsa.content_attention_backward)
def _content_attention_backward_flops(
    grad: Any, queries: Any, keys: Any, values: Any, *needs: bool, **kwargs: Any
) -> int:
    """FLOPs of the backward, as far as its gradients are needed: the context again and the queries'
    gradient (for the queries), the context's gradient (for the keys or values), then the values' and
    the softmaxed keys' gradients (``B h d c N`` each)."""
    batch, heads, channels, positions = queries
    need_queries, need_keys, need_values = needs[:3]
    products = 2 * need_queries + (need_keys or need_values) + need_keys + need_values
    return 2 * products * batch * heads * channels * values[2] * positions


def content_attention_native(queries: Tensor, keys: Tensor, values: Tensor, *, query_softmax: bool) -> Tensor:
    """:func:`gsa_cli.models.gsa.content_attention` as the fused kernel; as gemm where it cannot run (saying
    why once) and for the ``query_softmax`` ablation."""
    if query_softmax or refusal(queries.device.type, "native") is not None:
        return content_attention_gemm(queries, keys, values, query_softmax=query_softmax)
    out: Tensor = torch.ops.gsa.content_attention(queries, keys, values)
    return out


def content_attention_auto(queries: Tensor, keys: Tensor, values: Tensor, *, query_softmax: bool) -> Tensor:
    """The fastest content branch for the device: the fused kernel on the CPU, gemm elsewhere, where the
    kernel does not build (saying why once), and for the ``query_softmax`` ablation."""
    if query_softmax or refusal(queries.device.type, "auto") is not None:
        return content_attention_gemm(queries, keys, values, query_softmax=query_softmax)
    out: Tensor = torch.ops.gsa.content_attention(queries, keys, values)
    return out

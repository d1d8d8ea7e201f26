"""GSA's fast implementations: the two branches as batched GEMMs in hand-written autograd functions.

Each public function here has the signature of its reference in :mod:`gsa_cli.models.gsa` and computes
the same thing (tests hold them equal in float64, forward and backward):

* :func:`content_attention_gemm` is :func:`~gsa_cli.models.gsa.content_attention`
  (:class:`ContentAttention`);
* :func:`axial_attention_gemm` is :func:`~gsa_cli.models.gsa.axial_attention`
  (:class:`AxialRelativeAttention`).

Both keep nothing of the activations' size for backward and form it again there (the references let
autograd keep the logits). The MAC counters (:mod:`gsa_cli.bench.macs`) count each autograd function
by the class names exported here, :data:`AXIAL_FUNCTION` and :data:`CONTENT_FUNCTION`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gsa_cli.models.gsa import Axis

# The dimensions of the ``(B, h, c, H, W)`` tensors the axial pass takes, by name.
BATCH, HEAD, CHANNEL, HEIGHT, WIDTH = range(5)
MAP_DIMS: dict[Axis, int] = {"height": HEIGHT, "width": WIDTH}
_OTHER = {HEIGHT: WIDTH, WIDTH: HEIGHT}  # the map's other dimension: a pass's rows run along it


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``permute(order)``."""
    return tuple(order.index(dim) for dim in range(len(order)))


# Per attended dimension, the (B, h, c, H, W) dimensions in the order of the GEMM layouts (A: the attended
# dimension's positions, O: the other dimension's), and the orders that undo them.
_QUERY_ORDER = {dim: (HEAD, dim, CHANNEL, BATCH, other) for dim, other in _OTHER.items()}  # (h, A, d, B, O)
_PASS_ORDER = {dim: (HEAD, BATCH, other, CHANNEL, dim) for dim, other in _OTHER.items()}  # (h, B, O, c, A)
_PASS_ORDER_T = {dim: (HEAD, BATCH, other, dim, CHANNEL) for dim, other in _OTHER.items()}  # (h, B, O, A, c)
_QUERY_INVERSE = {dim: _inverse(order) for dim, order in _QUERY_ORDER.items()}
_PASS_INVERSE = {dim: _inverse(order) for dim, order in _PASS_ORDER.items()}


# Logits of one head, in elements, from which heads are taken one at a time. Below it all heads go into
# one product (fewer, larger GEMMs; the copy that regroups their logits is small); above it each head
# runs on strided views of its own, so nothing of the logits' size is ever copied.
PER_HEAD_LOGITS = 1 << 16

# A batched GEMM whose result has fewer columns than this, and fewer than rows, runs up to five times
# slower on CPU than its transpose (measured with MKL: 64x7 results against 7x64); such results are
# laid out transposed and computed as ``(b^T a^T)^T``, which costs nothing on a GPU either.
SHORT_COLUMNS = 16


# On small maps, heads go into products HEAD_GROUPS groups at a time: the layout copies made for the
# products (of the queries, values and gradient) are then a fraction of the activations.
HEAD_GROUPS = 4


def _head_chunks(heads: int, length: int, rows: int) -> list[slice]:
    """The heads a pass takes at a time: one by one when a head's logits (``length x rows x length``)
    reach :data:`PER_HEAD_LOGITS`, else in :data:`HEAD_GROUPS` groups. ``rows`` counts the batch, so a
    traced program (``torch.export``, ``torch.compile``) takes heads one by one whatever the batch:
    the rule would otherwise tie it to a range of batch sizes (a guard, and a recompile past it)."""
    one_by_one = torch.compiler.is_compiling() or length * rows * length >= PER_HEAD_LOGITS
    per_chunk = 1 if one_by_one else -(-heads // HEAD_GROUPS)
    return [slice(start, min(start + per_chunk, heads)) for start in range(0, heads, per_chunk)]


def _transposed(rows: int, columns: int) -> bool:
    """Whether a ``rows x columns`` GEMM result is better laid out (and computed) transposed. In a
    traced program ``rows`` (which may count the batch, see :func:`_head_chunks`) count as many."""
    many = torch.compiler.is_compiling()
    return columns < (SHORT_COLUMNS if many else min(rows, SHORT_COLUMNS))


def _empty_result(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised GEMM result of ``shape``, laid out for a fast GEMM (see :func:`_transposed`)."""
    *batch, rows, columns = shape
    if _transposed(rows, columns):
        return like.new_empty((*batch, columns, rows)).mT
    return like.new_empty(shape)


def _bmm(left: Tensor, right: Tensor, out: Tensor | None = None) -> Tensor:
    """``left @ right`` for 3-D tensors, into ``out`` when given, in the faster orientation.

    Without ``out`` the result may be a transposed view; with it, ``out`` (as made by
    :func:`_empty_result`, a view of a chunk of it) sets the orientation.
    """
    transposed = _transposed(left.shape[1], right.shape[2]) if out is None else not out.is_contiguous()
    differentiable = torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)
    if out is not None and (differentiable or torch.compiler.is_compiling()):
        # out= is not differentiable (a backward run with create_graph: a gradient penalty), nor is it in
        # a traced program (torch.export's, which may run with grad on).
        return out.copy_(torch.bmm(right.mT, left.mT).mT if transposed else torch.bmm(left, right))
    if transposed:
        return torch.bmm(right.mT, left.mT, out=None if out is None else out.mT).mT
    return torch.bmm(left, right, out=out)


def _logits(queries: Tensor, pairs: Tensor) -> Tensor:
    """``logits[a, m, i] = sum_d queries[a, d, m] pairs[a, d, i]`` for a chunk of ``G`` heads.

    Args:
        queries: ``(G, A, d, M)``.
        pairs: ``(G, A, d, A)``.

    Returns:
        ``(G·M, A_a, A_i)``: a strided view of the product when ``G == 1`` (and the product's layout
        allows it), else a copy.
    """
    group, length = queries.shape[:2]
    logits = _bmm(queries.flatten(0, 1).mT, pairs.flatten(0, 1))  # (G·A_a, M, A_i)
    return logits.unflatten(0, (group, length)).transpose(1, 2).flatten(0, 1)


def _pass_queries(queries: Tensor, dim: int) -> Tensor:
    """``(B, h, d, H, W)`` as a contiguous ``(h, A, d, M)``: per head and attended position ``a``, the
    ``d x M`` matrix of the queries of all ``M`` rows (the batch times the other axis)."""
    return queries.permute(_QUERY_ORDER[dim]).flatten(3).contiguous()


def _pass_layout(tensor: Tensor, dim: int) -> Tensor:
    """``(B, h, c, H, W)`` as ``(h, M, c, A)``: a copy (even of an expanded tensor: bmm on odd strides
    copies matrix by matrix), laid out transposed when its GEMMs want it (see :func:`_transposed`)."""
    if _transposed(tensor.shape[CHANNEL], tensor.shape[dim]):
        stored = tensor.permute(_PASS_ORDER_T[dim])  # (h, B, O, A, c)
        return stored.flatten(1, 2).contiguous().mT
    return tensor.permute(_PASS_ORDER[dim]).flatten(1, 2).contiguous()


def _map_layout(tensor: Tensor, batch: int, dim: int) -> Tensor:
    """``(h, M, c, A)`` as a ``(B, h, c, H, W)`` view: the inverse of :func:`_pass_layout`."""
    return tensor.unflatten(1, (batch, -1)).permute(_PASS_INVERSE[dim])


class AxialRelativeAttention(torch.autograd.Function):
    """One axial pass of the positional branch, with its logits recomputed in backward.

    For each head, along the map dimension ``dim`` (:data:`HEIGHT`: the column pass, :data:`WIDTH`:
    the row pass), each query position ``a`` and each key position ``i``::

        logits[a, m, i] = sum_d queries[a, d, m] * pairs[a, d, i]      (no softmax, no scaling)
        out[m, c, a]    = sum_i values[m, c, i] * logits[a, m, i]

    where ``m`` runs over the batch and the other axis. The logits are ``A`` times larger than the
    activations; they are formed a head at a time on large maps (all heads at once on small ones, see
    :data:`PER_HEAD_LOGITS`) and never stored: backward forms them again, which costs one small matrix
    product and saves most of the memory. The inputs are saved as they come (views of the module's
    projection): the copies laid out for the products are made inside, again in backward, and never
    kept.

    Shapes: ``queries (B, h, d, H, W)``, ``values (B, h, c, H, W)``, ``pairs (h, A, d, A)``; returns
    ``(B, h, c, H, W)`` as a strided view of the products' result, and strided input gradients. Every
    product is a batched GEMM writing straight into its result, each result laid out so that its GEMM
    runs fast (:data:`SHORT_COLUMNS`). With one head per chunk they run on strided views and nothing
    of the logits' size is copied.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, queries: Tensor, values: Tensor, pairs: Tensor, dim: int
    ) -> Tensor:
        dtype = queries.dtype
        values, pairs = values.to(dtype), pairs.to(dtype)
        ctx.save_for_backward(queries, values, pairs)
        ctx.map_dim = dim  # type: ignore[attr-defined]
        batch, heads, _, height, width = queries.shape
        length, rows = queries.shape[dim], batch * (height * width // queries.shape[dim])
        out = _empty_result(values, (heads, rows, values.shape[2], length))  # (h, M, c, A)
        for chunk in _head_chunks(heads, length, rows):
            # The chunk's copies in the products' layout, made here: a head at a time on large maps.
            q = _pass_queries(queries[:, chunk], dim)  # (G, A, d, M)
            v = _pass_layout(values[:, chunk], dim)  # (G, M, c, A)
            logits = _logits(q, pairs[chunk])  # (G·M, A_a, A_i)
            # out[m] (c x a) = values[m] (c x i) @ logits[m]^T (i x a)
            _bmm(v.flatten(0, 1), logits.mT, out=out[chunk].flatten(0, 1))
        return _map_layout(out, batch, dim)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        queries, values, pairs = ctx.saved_tensors  # type: ignore[attr-defined]
        dim: int = ctx.map_dim  # type: ignore[attr-defined]
        need_q, need_v, need_p, _ = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad = grad.to(queries.dtype)
        batch, heads, dkh, height, width = queries.shape
        length, rows = queries.shape[dim], batch * (height * width // queries.shape[dim])
        grad_q = _empty_result(queries, (heads, length, dkh, rows)) if need_q else None  # (h, A, d, M)
        grad_v = _empty_result(values, (heads, rows, values.shape[2], length)) if need_v else None
        grad_p = _empty_result(pairs, pairs.shape) if need_p else None  # (h, A, d, A)
        for chunk in _head_chunks(heads, length, rows):
            # The forward's copies made again, and the gradient's, a chunk of heads at a time.
            q = _pass_queries(queries[:, chunk], dim)  # (G, A, d, M)
            p = pairs[chunk]  # (G, A, d, A)
            g = _pass_layout(grad[:, chunk], dim).flatten(0, 1)  # (G·M, c, A_a), as the forward result
            if grad_v is not None:
                # grad_v[m] (c x i) = g[m] (c x a) @ logits[m] (a x i), the logits recomputed
                _bmm(g, _logits(q, p), out=grad_v[chunk].flatten(0, 1))
            if grad_q is None and grad_p is None:
                continue
            v = _pass_layout(values[:, chunk], dim).flatten(0, 1)  # (G·M, c, A_i)
            # grad_logits[m] (a x i) = g[m]^T (a x c) @ values[m] (c x i)
            grad_logits = _bmm(g.mT, v)  # (G·M, A_a, A_i)
            # by_query: (G·A_a, M, A_i), a view when G == 1
            by_query = grad_logits.unflatten(0, (-1, rows)).transpose(1, 2).flatten(0, 1)
            if grad_q is not None:
                # grad_q[a] (d x m) = pairs[a] (d x i) @ by_query[a]^T (i x m)
                _bmm(p.flatten(0, 1), by_query.mT, out=grad_q[chunk].flatten(0, 1))
            if grad_p is not None:
                # grad_p[a] (d x i) = queries[a] (d x m) @ by_query[a] (m x i)
                _bmm(q.flatten(0, 1), by_query, out=grad_p[chunk].flatten(0, 1))
        if grad_q is not None:
            grad_q = grad_q.unflatten(3, (batch, -1)).permute(_QUERY_INVERSE[dim])  # (B, h, d, H, W)
        if grad_v is not None:
            grad_v = _map_layout(grad_v, batch, dim)  # (B, h, c, H, W), a view
        return grad_q, grad_v, grad_p, None


def _softmax_backward(grad: Tensor, probabilities: Tensor, dim: int) -> Tensor:
    """The gradient of a softmax's input from that of its output (both in the softmax's dtype)."""
    return torch.ops.aten._softmax_backward_data(grad, probabilities, dim, probabilities.dtype)


class ContentAttention(torch.autograd.Function):
    """The content branch (spec 1.1), keeping nothing of the activations' size for backward.

    ``keys = softmax(k)`` over positions, ``context = keys v^T`` per head (``d_k/h x d_v/h``),
    ``out = context^T q`` (``q`` softmaxed over its channels first with ``query_softmax``). Only the
    inputs are saved, as they come (views of the projection); backward forms the softmaxes and the
    context again. Softmaxes run in at least float32.

    Shapes: ``queries (B, h, d, N)``, ``keys (B, h, d, N)``, ``values (B, h, c, N)``; returns
    ``(B, h, c, N)``.
    """

    @staticmethod
    def _queries(queries: Tensor, query_softmax: bool) -> Tensor:
        """The queries, softmaxed over their channels (in at least float32) with ``query_softmax``;
        contiguous either way: matmul on views whose batch dimensions do not merge copies matrix by
        matrix."""
        if query_softmax:
            return queries.softmax(dim=2, dtype=torch.promote_types(queries.dtype, torch.float32))
        return queries.contiguous()

    @staticmethod
    def _keys(keys: Tensor) -> Tensor:
        """The keys softmaxed over positions, in at least float32."""
        return keys.softmax(dim=-1, dtype=torch.promote_types(keys.dtype, torch.float32))

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        queries: Tensor,
        keys: Tensor,
        values: Tensor,
        query_softmax: bool,
    ) -> Tensor:
        dtype = values.dtype
        context = torch.matmul(ContentAttention._keys(keys).to(dtype), values.contiguous().mT)  # (B, h, d, c)
        ctx.save_for_backward(queries, keys, values)
        ctx.query_softmax = query_softmax  # type: ignore[attr-defined]
        return torch.matmul(context.mT, ContentAttention._queries(queries, query_softmax).to(dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        queries, keys, values = ctx.saved_tensors  # type: ignore[attr-defined]
        query_softmax: bool = ctx.query_softmax  # type: ignore[attr-defined]
        dtype = values.dtype
        # Everything formed again from the inputs (so that a backward with create_graph is itself
        # differentiable), in an order that keeps few activation-sized tensors alive at once.
        grad = grad.to(dtype).contiguous()  # (B, h, c, N)
        q = ContentAttention._queries(queries, query_softmax)
        grad_context = torch.matmul(q.to(dtype), grad.mT)  # (B, h, d, c)
        if not query_softmax:
            del q  # the softmax's backward needs it; the plain queries are a copy of a saved view
        k = ContentAttention._keys(keys)
        v = values.contiguous()
        grad_q = torch.matmul(torch.matmul(k.to(dtype), v.mT), grad)  # context @ grad: (B, h, d, N)
        del grad
        if query_softmax:
            grad_q = _softmax_backward(grad_q.to(q.dtype), q, dim=2)
            del q
        grad_k = torch.matmul(grad_context, v)  # (B, h, d, N): d keys, of k
        del v
        grad_k = _softmax_backward(grad_k.to(k.dtype), k, dim=-1)
        grad_v = torch.matmul(grad_context.mT, k.to(dtype))  # (B, h, c, N)
        return grad_q.to(queries.dtype), grad_k.to(keys.dtype), grad_v, None


# The autograd functions' names, as the MAC counters' handles know them.
AXIAL_FUNCTION = AxialRelativeAttention.__name__
CONTENT_FUNCTION = ContentAttention.__name__


def content_attention_gemm(queries: Tensor, keys: Tensor, values: Tensor, *, query_softmax: bool) -> Tensor:
    """:func:`gsa_cli.models.gsa.content_attention` as batched GEMMs (:class:`ContentAttention`)."""
    out: Tensor = ContentAttention.apply(queries, keys, values, query_softmax)
    return out


def axial_attention_gemm(queries: Tensor, values: Tensor, pairs: Tensor, *, axis: Axis) -> Tensor:
    """:func:`gsa_cli.models.gsa.axial_attention` as batched GEMMs (:class:`AxialRelativeAttention`)."""
    out: Tensor = AxialRelativeAttention.apply(queries, values, pairs, MAP_DIMS[axis])
    return out

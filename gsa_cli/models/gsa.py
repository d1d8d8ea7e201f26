"""The global self-attention (GSA) module of Shen et al., "Global Self-Attention Networks".

The module follows ``shared/spec/GSA.md`` section 1: a 1x1 projection to queries, keys and values, a
content branch (linear attention with a softmax over positions on the keys) and a positional branch
(relative-position attention along columns, batch norm, then along rows), summed; a 2x2 average pool
follows when ``stride == 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relative_index(size: int, span: int, *, device: torch.device) -> Tensor:
    """Index into a zero-padded relative table for every (query, key) pair along one axis.

    Entry ``[a, i]`` is ``i - a + span - 1`` (the table row of offset ``i - a``) when ``|i - a| < span``
    and ``2 * span - 1`` (the zero row appended to the table) otherwise.

    Returns:
        A ``(size, size)`` long tensor.
    """
    positions = torch.arange(size, device=device)
    offset = positions[None, :] - positions[:, None]  # (a, i): key position - query position
    index = offset + span - 1
    return torch.where(offset.abs() < span, index, torch.full_like(index, 2 * span - 1))


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
    per_chunk = 1 if length * rows * length >= PER_HEAD_LOGITS else -(-heads // HEAD_GROUPS)
    return [slice(start, min(start + per_chunk, heads)) for start in range(0, heads, per_chunk)]


def _transposed(rows: int, columns: int) -> bool:
    """Whether a ``rows x columns`` GEMM result is better laid out (and computed) transposed."""
    return columns < min(rows, SHORT_COLUMNS)


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
    if out is not None and torch.is_grad_enabled() and (left.requires_grad or right.requires_grad):
        # A backward run with create_graph (a gradient penalty): out= is not differentiable.
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


def _pass_queries(queries: Tensor, axis: int) -> Tensor:
    """``(B, h, d, H, W)`` as a contiguous ``(h, A, d, M)``: per head and attended position ``a``, the
    ``d x M`` matrix of the queries of all ``M`` rows (the batch times the other axis)."""
    return queries.permute(1, axis, 2, 0, 7 - axis).flatten(3).contiguous()


def _pass_layout(tensor: Tensor, axis: int) -> Tensor:
    """``(B, h, c, H, W)`` as ``(h, M, c, A)``: a copy (even of an expanded tensor: bmm on odd strides
    copies matrix by matrix), laid out transposed when its GEMMs want it (see :func:`_transposed`)."""
    other = 7 - axis
    if _transposed(tensor.shape[2], tensor.shape[axis]):
        return tensor.permute(1, 0, other, axis, 2).flatten(1, 2).contiguous().mT  # stored (h, M, A, c)
    return tensor.permute(1, 0, other, 2, axis).flatten(1, 2).contiguous()


def _map_layout(tensor: Tensor, batch: int, axis: int) -> Tensor:
    """``(h, M, c, A)`` as a ``(B, h, c, H, W)`` view: the inverse of :func:`_pass_layout`."""
    order = (1, 0, 3, 4, 2) if axis == 3 else (1, 0, 3, 2, 4)
    return tensor.unflatten(1, (batch, -1)).permute(order)


class AxialRelativeAttention(torch.autograd.Function):
    """One axial pass of the positional branch, with its logits recomputed in backward.

    For each head, along ``axis`` (3: the column pass over the height, 4: the row pass over the
    width), each query position ``a`` and each key position ``i``::

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
        ctx: torch.autograd.function.FunctionCtx, queries: Tensor, values: Tensor, pairs: Tensor, axis: int
    ) -> Tensor:
        dtype = queries.dtype
        values, pairs = values.to(dtype), pairs.to(dtype)
        ctx.save_for_backward(queries, values, pairs)
        ctx.axis = axis  # type: ignore[attr-defined]
        batch, heads, _, height, width = queries.shape
        length, rows = queries.shape[axis], batch * (height * width // queries.shape[axis])
        out = _empty_result(values, (heads, rows, values.shape[2], length))  # (h, M, c, A)
        for chunk in _head_chunks(heads, length, rows):
            # The chunk's copies in the products' layout, made here: a head at a time on large maps.
            q = _pass_queries(queries[:, chunk], axis)  # (G, A, d, M)
            v = _pass_layout(values[:, chunk], axis)  # (G, M, c, A)
            logits = _logits(q, pairs[chunk])  # (G·M, A_a, A_i)
            # out[m] (c x a) = values[m] (c x i) @ logits[m]^T (i x a)
            _bmm(v.flatten(0, 1), logits.mT, out=out[chunk].flatten(0, 1))
        return _map_layout(out, batch, axis)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        queries, values, pairs = ctx.saved_tensors  # type: ignore[attr-defined]
        axis: int = ctx.axis  # type: ignore[attr-defined]
        need_q, need_v, need_p, _ = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad = grad.to(queries.dtype)
        batch, heads, dkh, height, width = queries.shape
        length, rows = queries.shape[axis], batch * (height * width // queries.shape[axis])
        grad_q = _empty_result(queries, (heads, length, dkh, rows)) if need_q else None  # (h, A, d, M)
        grad_v = _empty_result(values, (heads, rows, values.shape[2], length)) if need_v else None
        grad_p = _empty_result(pairs, pairs.shape) if need_p else None  # (h, A, d, A)
        for chunk in _head_chunks(heads, length, rows):
            # The forward's copies made again, and the gradient's, a chunk of heads at a time.
            q = _pass_queries(queries[:, chunk], axis)  # (G, A, d, M)
            p = pairs[chunk]  # (G, A, d, A)
            g = _pass_layout(grad[:, chunk], axis).flatten(0, 1)  # (G·M, c, A_a), as the forward result
            if grad_v is not None:
                # grad_v[m] (c x i) = g[m] (c x a) @ logits[m] (a x i), the logits recomputed
                _bmm(g, _logits(q, p), out=grad_v[chunk].flatten(0, 1))
            if grad_q is None and grad_p is None:
                continue
            v = _pass_layout(values[:, chunk], axis).flatten(0, 1)  # (G·M, c, A_i)
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
            order = (3, 0, 2, 1, 4) if axis == 3 else (3, 0, 2, 4, 1)
            grad_q = grad_q.unflatten(3, (batch, -1)).permute(order)  # (B, h, d, H, W), a view
        if grad_v is not None:
            grad_v = _map_layout(grad_v, batch, axis)  # (B, h, c, H, W), a view
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


class GlobalSelfAttention2d(nn.Module):
    """Global self-attention over a 2-D feature map: content attention plus positional attention.

    Args:
        in_channels: Channels of the input map.
        out_channels: Channels of the output map (``d_v``, the value channels).
        heads: Attention heads; must divide ``key_channels`` and ``out_channels`` [ours: 8].
        key_channels: Query and key channels ``d_k`` [ours: ``out_channels``].
        span: Neighbourhood half-extent ``L`` of the positional branch; global when it is at least
            the map's height and width. The relative tables have ``2 * span - 1`` rows.
        stride: 1, or 2 for a 2x2 average pool after the sum [ours, the SASA convention].
        content: Keep the content branch.
        positional: Keep the positional branch.
        query_softmax: Softmax the queries over their channels in the content branch (an ablation;
            the paper has none).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        heads: int = 8,
        key_channels: int | None = None,
        span: int,
        stride: int = 1,
        content: bool = True,
        positional: bool = True,
        query_softmax: bool = False,
    ) -> None:
        super().__init__()
        key_channels = out_channels if key_channels is None else key_channels
        if key_channels % heads or out_channels % heads:
            raise ValueError(
                f"heads={heads} must divide key_channels={key_channels} and out_channels={out_channels}"
            )
        if span < 1:
            raise ValueError(f"span must be at least 1, got {span}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if not (content or positional):
            raise ValueError("at least one of content and positional must be on")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.key_channels = key_channels
        self.span = span
        self.stride = stride
        self.content = content
        self.positional = positional
        self.query_softmax = query_softmax

        # Channel order q, then k, then v (spec 1.4).
        self.qkv = nn.Conv2d(in_channels, 2 * key_channels + out_channels, 1, bias=False)
        if positional:
            std = (key_channels // heads) ** -0.5
            self.rel_col = nn.Parameter(torch.randn(2 * span - 1, key_channels) * std)
            self.rel_row = nn.Parameter(torch.randn(2 * span - 1, key_channels) * std)
            self.bn = nn.BatchNorm2d(out_channels)
        self._index_cache: dict[tuple[int, torch.device], Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, heads={self.heads}, "
            f"key_channels={self.key_channels}, span={self.span}, stride={self.stride}, "
            f"content={self.content}, positional={self.positional}, "
            f"query_softmax={self.query_softmax}"
        )

    def no_weight_decay(self) -> set[str]:
        """The relative tables, kept out of weight decay [ours]: like timm's position embeddings and
        relative-position bias tables; decay would pull the positional branch (no softmax) to zero."""
        return {"rel_col", "rel_row"} if self.positional else set()

    def _index(self, size: int, device: torch.device) -> Tensor:
        """The relative index for one axis length, built once per (size, device)."""
        if torch.compiler.is_compiling():
            # Inside a compiled graph the index is built by the graph itself (the compiler folds it to
            # a constant); filling the cache from there would make the next call recompile.
            return relative_index(size, self.span, device=device)
        key = (size, device)
        if key not in self._index_cache:
            # A normal tensor even when first built under inference_mode, so autograd may use it later.
            with torch.inference_mode(False):
                self._index_cache[key] = relative_index(size, self.span, device=device)
        return self._index_cache[key]

    def _pairs(self, table: Tensor, size: int) -> Tensor:
        """Relative table ``(2L-1, d_k)`` laid out per (query, key) pair: ``(heads, a, d_k/h, i)``.

        Pairs farther apart than the span get zeros. Its size does not depend on the batch.
        """
        padded = F.pad(table, (0, 0, 0, 1))  # (2L, d_k): row 2L-1 is the zero row
        pairs = padded[self._index(size, table.device)]  # (a, i, d_k)
        # Contiguous, so that every head's slice is a plain batch of matrices.
        return pairs.unflatten(-1, (self.heads, -1)).permute(2, 0, 3, 1).contiguous()  # (h, a, d_k/h, i)

    def _content(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Spec 1.1: softmax of k over positions, context = K_s v^T, content = context^T q."""
        content = ContentAttention.apply(q.flatten(3), k.flatten(3), v.flatten(3), self.query_softmax)
        return content.unflatten(-1, q.shape[-2:])  # (B, h, dv/h, H, W)

    def _positional(self, q: Tensor, v: Tensor) -> Tensor:
        """Spec 1.2: column pass, batch norm, row pass; no softmax, no scaling.

        Returns the row pass's result as a strided ``(B, h, dv/h, H, W)`` view.
        """
        batch, heads, dvh, height, width = v.shape
        # Column pass: y(a,b) = sum_i (q(a,b) . rel_col[i-a]) v(i,b).
        y = AxialRelativeAttention.apply(q, v, self._pairs(self.rel_col, height), 3)  # (B, h, c, H, W)
        y = self.bn(y.reshape(batch, heads * dvh, height, width))  # BN over all C_out channels
        # Row pass: p(a,b) = sum_j (q(a,b) . rel_row[j-b]) y(a,j).
        y = y.view(batch, heads, dvh, height, width)
        return AxialRelativeAttention.apply(q, y, self._pairs(self.rel_row, width), 4)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        dk, dv = self.key_channels, self.out_channels
        q, k, v = self.qkv(x).split((dk, dk, dv), dim=1)
        q = q.unflatten(1, (self.heads, -1))  # (B, h, dk/h, H, W)
        k = k.unflatten(1, (self.heads, -1))  # (B, h, dk/h, H, W)
        v = v.unflatten(1, (self.heads, -1))  # (B, h, dv/h, H, W)

        out = self._content(q, k, v) if self.content else None  # (B, h, dv/h, H, W)
        if self.positional:
            positional = self._positional(q, v)  # (B, h, dv/h, H, W), strided
            out = positional if out is None else out + positional  # spec 1.3
        assert out is not None  # at least one branch is on
        out = out.reshape(batch, dv, height, width)  # heads concatenated, head-major
        if self.stride == 2:
            # ceil_mode keeps odd sizes in step with the strided 1x1 shortcut.
            out = F.avg_pool2d(out, 2, ceil_mode=True)
        return out

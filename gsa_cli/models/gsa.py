"""The global self-attention (GSA) module of Shen et al., "Global Self-Attention Networks".

``shared/spec/GSA.md`` section 1, top to bottom: a 1x1 projection to queries, keys and values; the
content branch (spec 1.1) and the positional branch (spec 1.2: along each column, batch norm, along each
row), written as plain einsums, :func:`content_attention` and :func:`axial_attention`; their sum, then a
2x2 average pool when ``stride == 2`` (spec 1.3): :class:`GlobalSelfAttention2d`.

Implementations (the ``implementation`` keyword) are equivalent: tests hold them equal in float64,
forward and backward. ``"reference"`` runs the einsums below, autograd keeping the logits; ``"gemm"``
(:mod:`gsa_cli.models.gsa_kernels`) runs batched GEMMs that never store the logits; ``"native"``
(:mod:`gsa_cli.models.gsa_native`) runs each axial pass, and the content branch, as one fused C++ kernel
on the CPU, built on first use (gemm where it cannot run); ``"auto"`` (default) picks the fastest for the
device: native on the CPU where it builds, gemm elsewhere (with one warning line saying why). Training
on the CPU kernels, :meth:`GlobalSelfAttention2d.forward` runs both branches as one autograd function
(:mod:`gsa_cli.models.gsa_fused`: the same result, gradients summed where written). Timings and
memory of each: ``benchmarks/README.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsa_cli.errors import SpanWarning
from gsa_cli.models.gsa_fused import fused_attention, fused_ready
from gsa_cli.models.gsa_kernels import axial_attention_gemm, content_attention_gemm
from gsa_cli.models.gsa_native import axial_attention_auto, axial_attention_native
from gsa_cli.models.gsa_native_content import content_attention_auto, content_attention_native

Axis = Literal["height", "width"]  # the image axis an axial pass attends along: a column, or a row
Implementation = Literal["auto", "reference", "gemm", "native"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("auto", "reference", "gemm", "native")


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


def content_attention(queries: Tensor, keys: Tensor, values: Tensor, *, query_softmax: bool) -> Tensor:
    """Spec 1.1, per head: ``K_s = softmax_N(k)``, ``context = K_s v^T``, ``content = context^T q``.

    Queries and keys ``(B, h, d, N)`` (``d = d_k/h`` channels at ``N = H*W`` positions), values
    ``(B, h, c, N)`` (``c = d_v/h``); returns ``(B, h, c, N)``. ``query_softmax`` (an ablation) first
    softmaxes each position's queries over their channels.
    """
    keys = keys.softmax(dim=-1)  # (B, h, d, N): K_s, each key channel over the positions
    if query_softmax:
        queries = queries.softmax(dim=-2)  # (B, h, d, N): each position over its channels
    context = torch.einsum("bhdn,bhcn->bhdc", keys, values)  # (B, h, d, c): K_s v^T
    return torch.einsum("bhdc,bhdn->bhcn", context, queries)  # (B, h, c, N): context^T q


def _map_letters(axis: Axis, position: str) -> str:
    """Einsum letters of an ``(H, W)`` map: ``position`` on the attended axis, ``o`` on the other."""
    return position + "o" if axis == "height" else "o" + position


def axial_attention(queries: Tensor, values: Tensor, pairs: Tensor, *, axis: Axis) -> Tensor:
    """Spec 1.2, one axial pass along ``axis``; no softmax, no scaling. The column pass
    (``axis="height"``) is ``y(a,b) = sum_i ( q(a,b) . rel_col[i-a] ) v(i,b)``; the row pass
    (``axis="width"``) is ``p(a,b) = sum_j ( q(a,b) . rel_row[j-b] ) y(a,j)``.

    Queries ``(B, h, d, H, W)``, values ``(B, h, c, H, W)``; ``pairs`` ``(h, A, d, A)`` is the table
    per (query, key) pair on the attended axis of length ``A``, zero beyond the span
    (:meth:`GlobalSelfAttention2d._pairs`). Returns ``(B, h, c, H, W)``.
    """
    # Einsum letters: a the query's and i the key's position on the attended axis, o the other axis.
    query, key = _map_letters(axis, "a"), _map_letters(axis, "i")  # "ao", "io" on a column pass
    logits = torch.einsum(f"bhd{query},hadi->bh{query}i", queries, pairs)  # (B, h, H, W, A): q . rel[i-a]
    return torch.einsum(f"bh{query}i,bhc{key}->bhc{query}", logits, values)  # (B, h, c, H, W): sum_i


# Each branch's implementations by name; "auto" is the fastest on every device measured (see the note).
CONTENT = {"reference": content_attention, "gemm": content_attention_gemm, "native": content_attention_native}
AXIAL = {"reference": axial_attention, "gemm": axial_attention_gemm, "native": axial_attention_native}
CONTENT["auto"], AXIAL["auto"] = content_attention_auto, axial_attention_auto  # native on the CPU, else gemm


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
        implementation: ``"reference"`` (the einsums above), ``"gemm"`` (:mod:`.gsa_kernels`),
            ``"native"`` (:mod:`.gsa_native`), or ``"auto"``: the fastest for the device (see the
            module's note). All compute the same.
    """

    warn_beyond_span = True  # False where a config sets the span small on purpose (build_model)

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
        implementation: Implementation = "auto",
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
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.key_channels = key_channels
        self.span = span
        self.stride = stride
        self.content = content
        self.positional = positional
        self.query_softmax = query_softmax
        self.implementation = implementation

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
            f"query_softmax={self.query_softmax}, implementation={self.implementation!r}"
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
            if self.warn_beyond_span:  # once per module and size, in eager runs
                SpanWarning.check(self.span, size)
            # A normal tensor even when first built under inference_mode, so autograd may use it later.
            with torch.inference_mode(False):
                self._index_cache[key] = relative_index(size, self.span, device=device)
        return self._index_cache[key]

    def _pairs(self, table: Tensor, size: int) -> Tensor:
        """Relative table ``(2L-1, d_k)`` laid out per (query, key) pair: ``(heads, a, d_k/h, i)``; pairs
        farther apart than the span get zeros. Its size does not depend on the batch."""
        padded = F.pad(table, (0, 0, 0, 1))  # (2L, d_k): row 2L-1 is the zero row
        index = self._index(size, table.device)
        # index_select, whose backward is index_add: 0.45-0.66x the time of indexing (its index_put).
        pairs = padded.index_select(0, index.flatten()).unflatten(0, index.shape)  # (a, i, d_k)
        # Contiguous, so that every head's slice is a plain batch of matrices.
        return pairs.unflatten(-1, (self.heads, -1)).permute(2, 0, 3, 1).contiguous()  # (h, a, d_k/h, i)

    def _positional(self, q: Tensor, v: Tensor) -> Tensor:
        """Spec 1.2: column pass, batch norm over all ``C_out`` channels, row pass (same queries)."""
        batch, heads, dvh, height, width = v.shape
        axial_pass = AXIAL[self.implementation]
        y = axial_pass(q, v, self._pairs(self.rel_col, height), axis="height")  # (B, h, c, H, W)
        y = self.bn(y.reshape(batch, heads * dvh, height, width))  # (B, C_out, H, W)
        y = y.view(batch, heads, dvh, height, width)  # (B, h, c, H, W)
        return axial_pass(q, y, self._pairs(self.rel_row, width), axis="width")  # (B, h, c, H, W)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        out = fused_attention(self, qkv) if fused_ready(self, qkv) else self._attention(qkv)
        if self.stride == 2:  # ceil_mode keeps odd sizes in step with the strided 1x1 shortcut
            out = F.avg_pool2d(out, 2, ceil_mode=True)
        return out

    def _attention(self, qkv: Tensor) -> Tensor:
        """Spec 1.1-1.3 on the projection ``qkv``: both branches, summed; ``(B, d_v, H, W)``."""
        batch, _, height, width = qkv.shape
        dk, dv = self.key_channels, self.out_channels
        # (B, h, dk/h, H, W) twice, then (B, h, dv/h, H, W)
        q, k, v = (t.unflatten(1, (self.heads, -1)) for t in qkv.split((dk, dk, dv), dim=1))
        out = None
        if self.content:
            content_branch = CONTENT[self.implementation]
            q_n, k_n, v_n = (t.flatten(-2) for t in (q, k, v))  # (B, h, d, N): the map's N = H*W positions
            out = content_branch(q_n, k_n, v_n, query_softmax=self.query_softmax)  # (B, h, dv/h, N)
            out = out.unflatten(-1, (height, width))  # (B, h, dv/h, H, W)
        if self.positional:
            positional = self._positional(q, v)  # (B, h, dv/h, H, W), possibly strided
            out = positional if out is None else out + positional  # spec 1.3
        assert out is not None  # at least one branch is on
        return out.reshape(batch, dv, height, width)  # heads concatenated, head-major

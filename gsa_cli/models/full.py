"""Dense global multi-head self-attention over a 2-D feature map: the quadratic baseline.

Every position attends to every other one through ``torch.nn.functional.scaled_dot_product_attention``
(softmax of ``q k^T / sqrt(d)`` over all ``N = H*W`` keys), so its cost grows as ``N^2``, where GSA's
content branch grows as ``N`` and its positional branch as ``N (H + W)``. It has the same interface and
1x1 projection as :class:`~gsa_cli.models.gsa.GlobalSelfAttention2d` and is built in its place by
``model.kind: full`` [ours]. It carries no positional encoding: it is a cost baseline for ``gsa profile``
and ``gsa compare``, not a reproduction of any paper's accuracy.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FullSelfAttention2d(nn.Module):
    """Multi-head softmax attention of every position to every position, then an optional 2x2 pool.

    Args:
        in_channels: Channels of the input map.
        out_channels: Channels of the output map (the value channels).
        heads: Attention heads; must divide ``key_channels`` and ``out_channels``.
        key_channels: Query and key channels [default: ``out_channels``, as GSA].
        stride: 1, or 2 for a 2x2 average pool after the attention (as GSA).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        heads: int = 8,
        key_channels: int | None = None,
        stride: int = 1,
    ) -> None:
        super().__init__()
        key_channels = out_channels if key_channels is None else key_channels
        if key_channels % heads or out_channels % heads:
            raise ValueError(
                f"heads={heads} must divide key_channels={key_channels} and out_channels={out_channels}"
            )
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.key_channels = key_channels
        self.stride = stride
        # Channel order q, then k, then v, as GSA's projection.
        self.qkv = nn.Conv2d(in_channels, 2 * key_channels + out_channels, 1, bias=False)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, heads={self.heads}, "
            f"key_channels={self.key_channels}, stride={self.stride}"
        )

    def _tokens(self, x: Tensor) -> Tensor:
        """``(B, h * d, H, W)`` to contiguous ``(B, h, N, d)``: SDPA's low-memory CPU path needs it."""
        return x.flatten(2).unflatten(1, (self.heads, -1)).transpose(2, 3).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        dk, dv = self.key_channels, self.out_channels
        q, k, v = self.qkv(x).split((dk, dk, dv), dim=1)
        # softmax(q k^T / sqrt(dk/h)) v for each head, over all N = H*W positions.
        out = F.scaled_dot_product_attention(
            self._tokens(q), self._tokens(k), self._tokens(v)
        )  # (B, h, N, dv/h)
        out = out.transpose(2, 3).reshape(batch, dv, height, width)  # heads concatenated, head-major
        if self.stride == 2:
            out = F.avg_pool2d(out, 2, ceil_mode=True)
        return out

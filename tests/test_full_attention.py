"""Dense global attention (``model.kind: full``) against a reference written from its definition."""

from __future__ import annotations

import pytest
import torch

from gsa_cli.models import FullSelfAttention2d, GlobalSelfAttention2d, build_model
from gsa_cli.presets import load_preset


def naive_full(module: FullSelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, position by position, then the optional 2x2 mean."""
    batch, _, height, width = x.shape
    heads, dk, dv = module.heads, module.key_channels, module.out_channels
    dkh, dvh = dk // heads, dv // heads
    qkv = torch.einsum("oc,bchw->bohw", module.qkv.weight[:, :, 0, 0], x).flatten(2)  # (B, 2dk+dv, N)
    q, k, v = qkv[:, :dk], qkv[:, dk : 2 * dk], qkv[:, 2 * dk :]
    out = torch.zeros(batch, dv, height * width, dtype=x.dtype)
    for b in range(batch):
        for head in range(heads):
            ks, vs = slice(head * dkh, (head + 1) * dkh), slice(head * dvh, (head + 1) * dvh)
            for n in range(height * width):
                scores = (q[b, ks, n, None] * k[b, ks]).sum(0) / dkh**0.5  # (N,)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, vs, n] = (weights * v[b, vs]).sum(1)
    out = out.reshape(batch, dv, height, width)
    if module.stride == 2:
        out = torch.nn.functional.avg_pool2d(out, 2, ceil_mode=True)
    return out


@pytest.mark.parametrize(
    "options", [{}, {"heads": 1}, {"heads": 3, "key_channels": 9}, {"stride": 2}], ids=str
)
def test_matches_the_reference_on_an_odd_non_square_map(options: dict[str, int]) -> None:
    torch.manual_seed(0)
    options = dict(options)
    heads = options.pop("heads", 2)
    module = FullSelfAttention2d(4, 6, heads=heads, **options).double()
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(module(x), naive_full(module, x), rtol=1e-10, atol=1e-10)


def test_is_global_and_every_parameter_gets_a_gradient() -> None:
    module = FullSelfAttention2d(4, 6, heads=2).double()
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    module(x)[0, :, 0, 0].sum().backward()
    assert x.grad is not None
    assert x.grad[0, :, 8, 8].abs().sum() > 0  # the opposite corner
    assert module.qkv.weight.grad is not None
    assert module.qkv.weight.grad.abs().sum() > 0


def test_shares_gsa_projection_layout() -> None:
    full = FullSelfAttention2d(16, 32, heads=4, key_channels=8)
    gsa = GlobalSelfAttention2d(16, 32, heads=4, key_channels=8, span=5)
    assert full.qkv.weight.shape == gsa.qkv.weight.shape == (2 * 8 + 32, 16, 1, 1)
    assert set(full.state_dict()) == {"qkv.weight"}


def test_impossible_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="must divide"):
        FullSelfAttention2d(4, 6, heads=4)
    with pytest.raises(ValueError, match="stride"):
        FullSelfAttention2d(4, 8, heads=4, stride=3)


def test_full_model_puts_dense_attention_in_the_attention_stages_only() -> None:
    config = load_preset("smoke", model="full", overrides=["model.attention_stages=[2, 4]"])
    model = build_model(config)
    kinds = [type(model.stage(s)[0].conv2).__name__ for s in range(1, 5)]
    assert kinds == ["Conv2d", "FullSelfAttention2d", "Conv2d", "FullSelfAttention2d"]
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)

"""Multiply-add counts against numbers derived by hand, and the two counters against each other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsa_cli.bench.macs import MacCount, count_macs, einsum_macs
from gsa_cli.choices import MacCounter
from gsa_cli.errors import GsaError
from gsa_cli.models import FullSelfAttention2d, GlobalSelfAttention2d, build_model
from gsa_cli.models.gsa import IMPLEMENTATIONS
from gsa_cli.presets import load_preset

FVCORE, TORCH = MacCounter.FVCORE, MacCounter.TORCH


class OnNonSquareMap(nn.Module):
    """Feeds a module a fixed (channels, height, width) map, so that count_macs can drive it."""

    def __init__(self, module: nn.Module, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.module = module
        self.shape = (channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.shape
        return self.module(x.flatten()[: channels * height * width].reshape(1, channels, height, width))


def count_module(module: nn.Module, channels: int, height: int, width: int, counter: MacCounter) -> MacCount:
    side = max(height, width, 8)
    wrapper = OnNonSquareMap(module, channels, height, width)
    return count_macs(wrapper, img_size=side, channels=channels, counter=counter)


# ---------------------------------------------------------------------------------------------------
# ResNet-50: the published numbers (shared/spec/MEASURING.md).


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return build_model(load_preset("imagenet50", model="conv"))


def test_resnet50_parameters_and_fvcore_macs_are_the_published_ones(resnet50: nn.Module) -> None:
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032
    count = count_macs(resnet50, img_size=224)
    assert count.total == 4_111_512_576  # fvcore's total: "4.11 GMACs"
    assert count.products == 4_089_184_256  # conv + fc: torchvision's "4.09 GFLOPS"
    assert count.by_operator["conv"] + count.by_operator["linear"] == 4_089_184_256
    assert count.by_operator["batch_norm"] == 22_227_968  # 2 per element in eval mode
    assert count.by_operator["adaptive_avg_pool2d"] == 100_352  # 2048 x 7 x 7
    assert count.uncounted == {}
    # The residual sums (block outputs: 3 x 256x56x56 + 4 x 512x28x28 + 6 x 1024x14x14 + 3 x 2048x7x7),
    # counted apart from the MACs.
    assert count.elementwise == count.by_operator["add"] == 5_519_360


def test_resnet50_torch_counter_agrees_on_conv_and_fc(resnet50: nn.Module) -> None:
    count = count_macs(resnet50, img_size=224, counter=TORCH)
    assert count.total == 4_089_184_256  # FlopCounterMode's 8.18 G FLOPs, halved
    assert count.elementwise is None
    assert "aten::add" in count.uncounted  # FlopCounterMode counts products only
    assert any("batch_norm" in op for op in count.uncounted)


def test_counting_leaves_the_model_in_its_mode(resnet50: nn.Module) -> None:
    resnet50.train()
    count_macs(resnet50, img_size=32)
    assert resnet50.training
    resnet50.eval()


# ---------------------------------------------------------------------------------------------------
# The GSA module: every operator, by hand (spec section 1; N = H * W positions).


def gsa_expected(*, c_in: int, dk: int, dv: int, heads: int, height: int, width: int) -> dict[str, int]:
    n = height * width
    return {
        "conv": n * c_in * (2 * dk + dv),  # the 1x1 qkv projection
        # content: context = K_s V^T (dk/h x dv/h per position per head), then context^T q: twice.
        "content_attention": 2 * n * dk * dv // heads,
        # positional: column logits N*H*dk and aggregation N*H*dv; row pass the same with W.
        "axial_relative_attention": n * height * (dk + dv) + n * width * (dk + dv),
        "softmax": 3 * dk * n,  # the keys' softmax over positions
        "batch_norm": 2 * dv * n,  # between the passes, eval mode
        "add": dv * n,  # content + positional
    }


@pytest.mark.parametrize(
    ("c_in", "dv", "dk", "heads", "height", "width"),
    [(8, 16, 16, 2, 6, 9), (4, 12, 6, 3, 5, 5), (16, 16, 32, 8, 7, 4)],
)
def test_gsa_module_count_matches_the_hand_formula(
    c_in: int, dv: int, dk: int, heads: int, height: int, width: int
) -> None:
    module = GlobalSelfAttention2d(c_in, dv, heads=heads, key_channels=dk, span=max(height, width))
    count = count_module(module, c_in, height, width, FVCORE)
    expected = gsa_expected(c_in=c_in, dk=dk, dv=dv, heads=heads, height=height, width=width)
    assert count.by_operator == expected
    assert count.total == sum(expected.values()) - expected["add"]
    assert count.elementwise == expected["add"]
    assert (
        count.products
        == expected["conv"] + expected["content_attention"] + expected["axial_relative_attention"]
    )
    assert count.uncounted == {}


def test_gsa_module_stride_two_adds_a_pool_over_every_input_element() -> None:
    module = GlobalSelfAttention2d(8, 16, heads=2, span=7, stride=2)
    count = count_module(module, 8, 7, 5, FVCORE)  # odd sizes: ceil-mode windows at the border
    assert count.by_operator["avg_pool2d"] == 16 * 7 * 5


def test_gsa_module_branches_switch_their_counts_off() -> None:
    content = count_module(GlobalSelfAttention2d(8, 8, heads=2, span=6, positional=False), 8, 6, 6, FVCORE)
    assert content.by_operator == {
        "conv": 36 * 8 * 24,
        "content_attention": 2 * 36 * 8 * 8 // 2,
        "softmax": 3 * 8 * 36,
    }
    positional = count_module(GlobalSelfAttention2d(8, 8, heads=2, span=6, content=False), 8, 6, 6, FVCORE)
    assert "softmax" not in positional.by_operator
    assert positional.by_operator["axial_relative_attention"] == 36 * 6 * 16 * 2
    assert "content_attention" not in positional.by_operator


def test_gsa_query_softmax_counts_a_second_softmax() -> None:
    module = GlobalSelfAttention2d(8, 8, heads=2, span=6, positional=False, query_softmax=True)
    assert count_module(module, 8, 6, 6, FVCORE).by_operator["softmax"] == 2 * 3 * 8 * 36


def test_both_counters_agree_on_the_products_of_the_gsa_module() -> None:
    module = GlobalSelfAttention2d(8, 16, heads=4, span=9)
    fvcore = count_module(module, 8, 6, 9, FVCORE)
    torch_count = count_module(module, 8, 6, 9, TORCH)
    assert torch_count.total == fvcore.products


# ---------------------------------------------------------------------------------------------------
# Every implementation of the GSA module counts the same: the reference's einsums and softmaxes (fvcore's
# einsum and softmax handles; FlopCounterMode's bmm) against the handles of the GEMM autograd functions.

GSA_OPTIONS = {
    "both branches": {},
    "query softmax": {"query_softmax": True},
    "stride 2, span 3": {"stride": 2, "span": 3},
    "content only": {"positional": False},
    "positional only": {"content": False},
    "eight heads, key channels 32": {"heads": 8, "key_channels": 32},
}


@pytest.mark.parametrize("options", GSA_OPTIONS.values(), ids=GSA_OPTIONS.keys())
def test_every_gsa_implementation_counts_the_same_macs(options: dict[str, object]) -> None:
    counts = {}
    for implementation in IMPLEMENTATIONS:
        settings: dict[str, object] = {"heads": 4, "span": 9, "implementation": implementation, **options}
        module = GlobalSelfAttention2d(8, 16, **settings)  # type: ignore[arg-type]
        counts[implementation] = {counter: count_module(module, 8, 6, 9, counter) for counter in MacCounter}
    gemm = counts["gemm"]
    assert gemm[FVCORE].by_operator["conv"] < gemm[FVCORE].products  # the attention is counted
    for implementation, count in counts.items():
        assert count[FVCORE].uncounted == {}, implementation
        for field in ("total", "products", "elementwise"):
            assert getattr(count[FVCORE], field) == getattr(gemm[FVCORE], field), (implementation, field)
        assert count[FVCORE].by_module == gemm[FVCORE].by_module, implementation
        assert count[TORCH].total == gemm[TORCH].total == gemm[FVCORE].products, implementation


def test_every_gsa_implementation_counts_the_same_macs_for_a_whole_net() -> None:
    counts = {}
    for implementation in IMPLEMENTATIONS:
        model = build_model(load_preset("smoke", overrides=[f"model.gsa_impl={implementation}"]))
        counts[implementation] = {
            counter: count_macs(model, img_size=16, counter=counter) for counter in MacCounter
        }
    gemm = counts["gemm"]
    for implementation, count in counts.items():
        assert count[FVCORE].uncounted == {}, implementation
        assert (count[FVCORE].total, count[FVCORE].products) == (gemm[FVCORE].total, gemm[FVCORE].products)
        assert count[FVCORE].elementwise == gemm[FVCORE].elementwise
        assert count[FVCORE].by_module == gemm[FVCORE].by_module, implementation
        assert count[TORCH].total == gemm[TORCH].total == gemm[FVCORE].products, implementation
        assert count[TORCH].by_module == gemm[TORCH].by_module, implementation


# ---------------------------------------------------------------------------------------------------
# Dense attention: N^2 (d_k + d_v) for the two products, 3 per score for the softmax.


def test_full_attention_count_matches_the_hand_formula() -> None:
    c_in, dk, dv, heads, height, width = 8, 16, 24, 4, 5, 6
    n = height * width
    module = FullSelfAttention2d(c_in, dv, heads=heads, key_channels=dk)
    count = count_module(module, c_in, height, width, FVCORE)
    assert count.by_operator == {
        "conv": n * c_in * (2 * dk + dv),
        "scaled_dot_product_attention": n * n * (dk + dv),
        "softmax": 3 * heads * n * n,
    }
    assert count.uncounted == {}
    torch_count = count_module(module, c_in, height, width, TORCH)
    assert torch_count.total == count.products  # FlopCounterMode counts SDPA too (its CPU kernel added)


def test_attention_grows_linearly_for_gsa_content_and_quadratically_for_full() -> None:
    content = GlobalSelfAttention2d(8, 8, heads=2, span=16, positional=False)
    full = FullSelfAttention2d(8, 8, heads=2)
    small, large = (count_module(content, 8, s, s, FVCORE).by_operator["content_attention"] for s in (8, 16))
    assert large == 4 * small  # 4x the positions
    small, large = (
        count_module(full, 8, s, s, FVCORE).by_operator["scaled_dot_product_attention"] for s in (8, 16)
    )
    assert large == 16 * small


# ---------------------------------------------------------------------------------------------------
# Whole networks: both counters agree on the products, nothing is left uncounted.


@pytest.mark.parametrize("kind", ["conv", "gsa", "full"])
def test_counters_agree_on_products_and_nothing_is_uncounted(kind: str) -> None:
    model = build_model(load_preset("smoke", model=kind))
    fvcore = count_macs(model, img_size=16)
    assert fvcore.uncounted == {}
    assert count_macs(model, img_size=16, counter=TORCH).total == fvcore.products
    assert fvcore.by_module[""] == fvcore.total


def test_conv_net_counters_agree_on_a_cifar_resnet() -> None:
    model = build_model(load_preset("cifar26", model="conv"))
    fvcore = count_macs(model, img_size=32)
    assert count_macs(model, img_size=32, counter=TORCH).total == fvcore.products
    assert fvcore.products == fvcore.by_operator["conv"] + fvcore.by_operator["linear"]


# ---------------------------------------------------------------------------------------------------
# Einsum by hand, and what may not go uncounted.


@pytest.mark.parametrize(
    ("equation", "shapes", "expected"),
    [
        ("ij,jk->ik", [(2, 3), (3, 5)], 2 * 3 * 5),
        ("ij,jk", [(2, 3), (3, 5)], 2 * 3 * 5),  # implicit output
        ("bij,bjk->bik", [(4, 2, 3), (4, 3, 5)], 4 * 2 * 3 * 5),
        ("...ij,...jk->...ik", [(7, 4, 2, 3), (7, 4, 3, 5)], 7 * 4 * 2 * 3 * 5),
        ("bij,jk->bik", [(4, 2, 3), (3, 5)], 4 * 2 * 3 * 5),
        ("ij->ji", [(3, 4)], 0),  # a permutation
        ("ij->i", [(3, 4)], 12),  # a reduction: one add per element
        # Three operands along the optimal path: (ij,jk) then (ik,kl): 2*30*5 + 2*5*40.
        ("ij,jk,kl->il", [(2, 30), (30, 5), (5, 40)], 2 * 30 * 5 + 2 * 5 * 40),
    ],
)
def test_einsum_macs(equation: str, shapes: list[tuple[int, ...]], expected: int) -> None:
    assert einsum_macs(equation, shapes) == expected


class MatrixVector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3 * 4 * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.weight, x.flatten())


def test_an_uncountable_product_is_an_error_not_a_silent_zero() -> None:
    for counter in MacCounter:  # neither fvcore nor FlopCounterMode knows torch.mv
        with pytest.raises(GsaError, match=r"aten::mv"):
            count_macs(MatrixVector(), img_size=4, counter=counter)

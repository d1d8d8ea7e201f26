"""The block-by-block benchmark times what it says: each twin's spatial operators on their own inputs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gsa_cli import load_preset
from gsa_cli.bench.macs import count_macs
from gsa_cli.models import build_model
from gsa_cli.models.gsa import GlobalSelfAttention2d

Loader = Callable[[str], ModuleType]  # the conftest fixture load_benchmark


@pytest.mark.parametrize("size", [8, 7], ids=["even", "odd"])
def test_pool_first_pools_then_attends_at_the_output_size(size: int, load_benchmark: Loader) -> None:
    bench = load_benchmark("bench_blocks")
    torch.manual_seed(0)
    module = GlobalSelfAttention2d(8, 8, heads=2, span=size, stride=2, implementation="gemm")
    variant = bench.pooled_first(module, size)
    gsa = variant[1]
    assert gsa.stride == 1
    assert gsa.span == (size + 1) // 2
    assert (gsa.heads, gsa.key_channels, gsa.implementation) == (2, 8, "gemm")
    x = torch.randn(2, 8, size, size)
    out = variant(x)
    assert out.shape == module(x).shape
    torch.testing.assert_close(out, gsa(F.avg_pool2d(x, 2, ceil_mode=True)))


def test_operator_inputs_are_what_each_spatial_operator_sees(load_benchmark: Loader) -> None:
    bench = load_benchmark("bench_blocks")
    model = build_model(load_preset("smoke", model="gsa")).train()
    images = torch.randn(2, 3, 16, 16)
    inputs = bench.operator_inputs(model, images)
    operators = bench.spatial_operators(model)
    assert list(inputs) == list(operators) == [f"layer{i}.0.conv2" for i in range(1, 5)]
    width = 8
    for stage, name in enumerate(operators):  # smoke: width 8, cifar stem, maps 16, 16, 8, 4 at the input
        channels, side = width * 2**stage, 16 // 2 ** max(0, stage - 1)
        assert inputs[name].shape == (2, channels, side, side), name
        assert not inputs[name].requires_grad


def test_a_smoke_run_writes_consistent_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_benchmark: Loader
) -> None:
    bench = load_benchmark("bench_blocks")
    out = tmp_path / "blocks.csv"
    argv = ["bench_blocks.py", "--preset", "smoke", "--batch", "2", "--rounds", "1", "--iters", "1",
            "--step-iters", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    table = pd.read_csv(out)
    blocks = table[table["kind"] == "block"]
    assert list(blocks["name"]) == [f"layer{i}.0.conv2" for i in range(1, 5)]
    assert list(blocks["stride"]) == [1, 2, 2, 2]
    assert blocks["pool_first_ms"].isna().tolist() == [True, False, False, False]

    # The MACs are each operator's share of the whole net's count.
    for kind in ("conv", "gsa"):
        net = build_model(load_preset("smoke", model=kind))
        by_module = count_macs(net, img_size=16).by_module
        assert list(blocks[f"{kind}_macs"]) == [by_module[name] for name in blocks["name"]]
    for _, row in blocks.iterrows():  # a 3x3 convolution: C * C * 9 per output position
        channels, side = (int(n) for n in row["input"].split("x")[:2])
        assert row["conv_macs"] == channels * channels * 9 * (side // row["stride"]) ** 2

    ratios = blocks["gsa_ms"] / blocks["conv_ms"]
    assert (blocks["time_ratio"] - ratios).abs().max() < 1e-3
    per_mac = blocks["time_ratio"] / (blocks["gsa_macs"] / blocks["conv_macs"])
    assert (blocks["per_mac"] - per_mac).abs().max() < 1e-2

    sums = table[table["kind"] == "sum"].set_index("stride")
    for stride, group in blocks.groupby("stride"):
        assert sums.loc[stride, "gsa_ms"] == pytest.approx(group["gsa_ms"].sum(), abs=0.02)
        assert sums.loc[stride, "conv_macs"] == group["conv_macs"].sum()
    step = table[table["kind"] == "step"].iloc[0]
    rest = table[table["kind"] == "rest"].iloc[0]
    expected = (step["gsa_ms"] - step["conv_ms"]) - (blocks["gsa_ms"].sum() - blocks["conv_ms"].sum())
    assert rest["gsa_ms"] == pytest.approx(expected, abs=0.02)
    assert step["pool_first_ms"] > 0
    assert table.columns[-1] == "cpu_wait_pct"

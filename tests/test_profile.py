"""The profiler on tiny nets: rows, units, how each number was obtained, and errors."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from gsa_cli.bench import profile as profiling
from gsa_cli.bench.breakdown import module_shares, operator_shares
from gsa_cli.bench.macs import count_macs
from gsa_cli.bench.profile import ProfileSettings, Timing, profile
from gsa_cli.choices import MacCounter, Mode
from gsa_cli.errors import ConfigError
from gsa_cli.models import build_model
from gsa_cli.presets import load_preset
from gsa_cli.report.profile import module_frame, operator_frame, rows_frame, summary_frame
from gsa_cli.runtime import Precision

FAST: dict[str, Any] = {"warmup": 0, "iters": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def sweep() -> profiling.ProfileResult:
    config = load_preset("smoke", model="gsa")
    return profile(config, ProfileSettings(img_sizes=(16, 24), batch_sizes=(2, 3), **FAST))


def test_one_row_per_image_size_and_batch_size_in_order(sweep: profiling.ProfileResult) -> None:
    assert [(r.img_size, r.batch) for r in sweep.rows] == [(16, 2), (16, 3), (24, 2), (24, 3)]
    assert all(r.status == "ok" for r in sweep.rows)


def test_rows_record_how_they_were_measured(sweep: profiling.ProfileResult) -> None:
    row = sweep.rows[0]
    assert (row.preset, row.model, row.precision, row.layout, row.compile) == (
        "smoke",
        "gsa",
        "fp32",
        "nchw",
        False,
    )
    assert (row.counter, row.warmup, row.iters, row.torch) == ("fvcore", 0, 2, torch.__version__)
    assert row.device.endswith(("(1 thread)", "threads)"))  # the thread count in words
    assert "RSS" in row.memory
    assert row.dense_peak_tflops is None  # a CPU: no tabulated peak
    assert row.uncounted == ""
    for waited in (row.infer_cpu_wait_pct, row.train_cpu_wait_pct):  # None where Linux PSI is absent
        assert waited is None or 0 <= waited <= 100


def test_macs_are_counted_on_the_model_built_for_each_image_size(sweep: profiling.ProfileResult) -> None:
    for row in sweep.rows:
        sized = profiling.at_image_size(load_preset("smoke", model="gsa"), row.img_size)
        model = build_model(sized)
        assert row.params == row.trainable_params == sum(p.numel() for p in model.parameters())
        assert row.gmacs == count_macs(model, img_size=row.img_size).total / 1e9
    # A GSA net's relative tables follow the feature sizes: more parameters at 24 px than at 16.
    assert sweep.rows[2].params > sweep.rows[0].params


def test_throughput_latency_and_rate_are_consistent(sweep: profiling.ProfileResult) -> None:
    for row in sweep.rows:
        assert row.infer_ms is not None
        assert row.infer_img_s is not None
        assert row.infer_tflops is not None
        assert row.train_ms is not None
        assert row.train_img_s is not None
        assert row.train_tflops is not None
        assert row.infer_img_s == pytest.approx(row.batch / (row.infer_ms / 1e3))
        assert row.train_img_s == pytest.approx(row.batch / (row.train_ms / 1e3))
        assert row.infer_tflops == pytest.approx(2 * row.gmacs * 1e9 * row.infer_img_s / 1e12)
        assert row.train_tflops == pytest.approx(6 * row.gmacs * 1e9 * row.train_img_s / 1e12)
        assert row.infer_ms_iqr is not None
        assert row.infer_ms_iqr >= 0
        for mode in ("infer", "train"):
            peak, baseline, process = (
                getattr(row, f"{mode}_{name}_mib") for name in ("peak", "baseline", "process")
            )
            assert peak is not None
            assert baseline is not None
            assert process is not None
            assert baseline > 100  # Python and torch: not the model's
            assert process == pytest.approx(baseline + peak, abs=0.01)


def test_summary_shows_what_varies_and_captions_what_is_fixed(sweep: profiling.ProfileResult) -> None:
    summary, caption = summary_frame(rows_frame(sweep.rows))
    assert {"px", "batch", "GMACs", "infer img/s", "train ms (IQR)"} <= set(summary.columns)
    assert "infer % peak" not in summary.columns  # empty on a CPU
    assert "device:" in caption
    assert "precision: fp32" in caption
    assert "model: gsa" in caption


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak RSS through /proc")
def test_a_model_twice_as_big_shows_its_weights_in_the_memory_above_the_baseline() -> None:
    # Weight bytes by hand: fp32 parameters at 4 bytes; a conv ResNet's parameters grow with the square
    # of its width, so widths 48 and 68 give about 2x (the counts are taken from the models themselves).
    rows = []
    for width in (48, 68):
        config = load_preset("smoke", model="conv", overrides=[f"model.width={width}"])
        (row,) = profile(config, ProfileSettings(batch_sizes=(2,), **FAST)).rows
        rows.append(row)
    small, large = rows
    assert 1.9 < large.params / small.params < 2.1
    weights = [row.params * 4 / 2**20 for row in rows]  # MiB
    for row, weight_mib in zip(rows, weights, strict=True):
        assert row.infer_peak_mib is not None
        assert row.train_peak_mib is not None
        assert row.infer_peak_mib >= 0.95 * weight_mib  # the weights are resident
        assert row.train_peak_mib >= 2.8 * weight_mib  # weights, gradients and momentum
        assert row.infer_process_mib is not None
        assert row.infer_process_mib > 5 * weight_mib  # the whole process: mostly Python and torch
    extra = weights[1] - weights[0]
    assert large.infer_peak_mib - small.infer_peak_mib >= 0.8 * extra  # type: ignore[operator]
    assert large.train_peak_mib - small.train_peak_mib >= 2.4 * extra  # type: ignore[operator]


def test_mode_infer_times_inference_only() -> None:
    config = load_preset("smoke", model="conv")
    (row,) = profile(config, ProfileSettings(mode=Mode.INFER, batch_sizes=(2,), **FAST)).rows
    assert row.infer_img_s is not None
    assert row.train_img_s is None
    assert row.train_peak_mib is None
    assert row.train_baseline_mib is None
    assert row.train_process_mib is None


def test_torch_counter_is_recorded_and_agrees_on_a_conv_net() -> None:
    config = load_preset("smoke", model="conv")
    settings = ProfileSettings(mode=Mode.INFER, batch_sizes=(1,), counter=MacCounter.TORCH, **FAST)
    (row,) = profile(config, settings).rows
    fvcore = count_macs(build_model(config), img_size=16)
    assert row.counter == "torch"
    assert row.gmacs == fvcore.products / 1e9
    assert row.g_elementwise is None
    assert "add" in row.uncounted


def test_out_of_memory_is_recorded_in_its_row_and_the_sweep_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    real = profiling._time_training

    def run_out_at_batch_three(config: Any, batch: int, run: Any) -> Timing:
        if batch == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(config, batch, run)

    monkeypatch.setattr(profiling, "_time_training", run_out_at_batch_three)
    config = load_preset("smoke", model="conv")
    rows = profile(config, ProfileSettings(batch_sizes=(2, 3, 4), **FAST)).rows
    assert [r.status for r in rows] == ["ok", "out of memory (train)", "ok"]
    assert rows[1].infer_img_s is not None
    assert rows[1].train_img_s is None
    assert rows[2].train_img_s is not None


def test_a_batch_too_small_for_batch_norm_is_recorded_in_its_row_and_the_sweep_goes_on() -> None:
    # The ImageNet stem at 32 px leaves a 1x1 map: batch norm cannot train on batch 1 there.
    config = load_preset("smoke", model="conv", overrides=["model.stem=imagenet"])
    rows = profile(config, ProfileSettings(img_sizes=(32,), batch_sizes=(1, 2), **FAST)).rows
    assert [r.status for r in rows] == ["batch too small for batch norm (train)", "ok"]
    assert rows[0].infer_img_s is not None
    assert rows[0].train_img_s is None
    assert rows[1].train_img_s is not None


def test_other_runtime_errors_are_not_taken_for_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(config: Any, batch: int, run: Any) -> Timing:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(profiling, "_time_inference", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        profile(load_preset("smoke", model="conv"), ProfileSettings(batch_sizes=(2,), **FAST))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_sizes": (0,)}, "batch size must be at least 1"),
        ({"img_sizes": (16, -1)}, "image size must be at least 1"),
        ({"iters": 0}, "timed iterations"),
        ({"warmup": -1}, "warm-up"),
    ],
)
def test_impossible_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        profile(load_preset("smoke"), ProfileSettings(device="cpu", **settings))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none_is_refused() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        profile(load_preset("smoke"), ProfileSettings(device="cuda"))


def test_inputs_are_random_not_zeros() -> None:
    run = profiling._Run(torch.device("cpu"), Precision.FP32, False, False, 0, 1, seed=0)
    images, labels = profiling._inputs(load_preset("smoke"), 4, run)
    assert images.std() > 0.5
    assert labels.unique().numel() > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_the_gpu_records_events_timing_memory_and_peak() -> None:
    config = load_preset("smoke", model="gsa")
    settings = ProfileSettings(
        device="cuda", precision=Precision.BF16, channels_last=True, batch_sizes=(8,), warmup=1, iters=3
    )
    (row,) = profile(config, settings).rows
    assert row.status == "ok"
    assert row.memory == "torch.cuda.max_memory_allocated above the allocation before the model"
    assert row.infer_peak_mib is not None
    assert row.infer_peak_mib > row.params * 4 / 2**20  # at least the fp32 weights
    assert row.infer_baseline_mib is not None
    assert row.infer_process_mib is None  # the whole process: the CPU's measure only
    assert row.layout == "channels_last"
    assert row.precision == "bf16"
    if row.dense_peak_tflops is not None:
        assert row.infer_peak_pct is not None


def test_spatial_macs_are_the_3x3_convolutions_of_a_conv_net() -> None:
    model = build_model(load_preset("smoke", model="conv"))  # cifar stem, 16 px, widths 8..64, one block each
    # Stage s: output side 16 / 2**(s-1) (stride 2 from stage 2), width 8 * 2**(s-1): side^2 * width^2 * 9.
    expected = sum((16 >> s) ** 2 * (8 << s) ** 2 * 9 for s in range(4))
    assert expected == 4 * 147_456
    assert profiling.spatial_macs(count_macs(model, img_size=16)) == expected


@pytest.mark.parametrize("counter", list(MacCounter))
def test_breakdowns_follow_the_model_and_add_up_to_the_total(counter: MacCounter) -> None:
    model = build_model(load_preset("smoke", model="gsa"))
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_modules()}
    count = count_macs(model, img_size=16, counter=counter)
    shares = module_shares(count, params, depth=1)
    assert shares[0].module == "(model)"
    assert shares[0].share_pct == pytest.approx(100)
    names = [share.module for share in shares[1:]]
    assert names == [name for name in params if name in names]  # the model's order, whatever the counter's
    assert {"conv1", "layer1", "layer4", "fc"} <= set(names)
    assert sum(share.gmacs for share in shares[1:]) == pytest.approx(count.total / 1e9)  # the children
    if counter is MacCounter.FVCORE:  # FlopCounterMode leaves out modules without products (bn1)
        assert sum(share.params for share in shares[1:]) == params[""]
    operators = operator_shares(count)
    assert [op.g for op in operators] == sorted((op.g for op in operators), reverse=True)
    counted = [op for op in operators if op.share_pct is not None]
    assert sum(op.share_pct or 0 for op in counted) == pytest.approx(100)
    assert all(op.kind.startswith("elementwise") for op in operators if op.share_pct is None)
    assert list(module_frame(shares).columns) == ["module", "params", "gmacs", "share_pct"]
    assert list(operator_frame(operators).columns) == ["operator", "kind", "G", "share of GMACs %"]

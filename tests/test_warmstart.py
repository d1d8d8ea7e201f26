"""Warm starts (``gsa train --init``): torchvision's and timm's weights, gsa checkpoints, and the report.

No network: torchvision's weights API reads a randomly initialised torchvision ResNet-50 placed where
it caches downloads (``$TORCH_HOME/hub/checkpoints``), timm's reads one through its own ``file``
override, so both run their real loading code on weights whose every value is known.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import one_error_line
from torch import Tensor
from typer.testing import CliRunner

from gsa_cli import load_preset
from gsa_cli.cli.app import app
from gsa_cli.config import Config
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.models import build_model
from gsa_cli.train.checkpoint import Checkpoint
from gsa_cli.train.loop import SilentReporter, TrainingStoppedError
from gsa_cli.train.run import TrainOptions, train
from gsa_cli.train.warmstart import group_names, warm_start


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # stable and fast on a shared 2-core machine


class Quiet(SilentReporter):
    """A reporter that shows nothing; ``stop_after`` raises SIGINT at that epoch's end (as Ctrl-C)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after

    def epoch_end(self, row: Any, epochs: int, best: bool) -> None:
        if row.epoch == self.stop_after:
            signal.raise_signal(signal.SIGINT)


def resnet50(kind: str, classes: int = 1000) -> tuple[Config, torch.nn.Module]:
    config = load_preset("imagenet50", model=kind, overrides=[f"data.num_classes={classes}"])
    torch.manual_seed(123)
    return config, build_model(config)


def random_torchvision_resnet50(torch_home: Path) -> dict[str, Tensor]:
    """A randomly initialised torchvision ResNet-50's weights, where torchvision's DEFAULT weights of it
    are cached after a download (so that its weights API reads them without a network)."""
    from torchvision.models import ResNet50_Weights, resnet50

    torch.manual_seed(7)
    state = resnet50().state_dict()
    with torch.no_grad():
        for tensor in state.values():  # BN statistics too: no value may equal a fresh model's by chance
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor))
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / Path(ResNet50_Weights.DEFAULT.url).name)
    return state


def smoke_run(out: Path, kind: str, *extra: str) -> Path:
    config = load_preset("smoke", model=kind, overrides=["recipe.epochs=1", *extra])
    train(config, TrainOptions(out=out, device="cpu"), reporter=Quiet())
    return out


# ---------------------------------------------------------------------------------------------------
# torchvision and timm.


def test_the_conv_twin_loads_torchvision_weights_and_every_tensor_equals_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = random_torchvision_resnet50(tmp_path)
    config, model = resnet50("conv")
    report = warm_start(model, "torchvision", config.model)
    assert report.source == "torchvision ResNet50_Weights.IMAGENET1K_V2"
    assert report.loaded == tuple(source)  # key for key, in torchvision's order
    assert (report.missing, report.unexpected, report.mismatched, report.notes) == ((), (), (), ())
    state = model.state_dict()
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor), name


def test_a_classifier_for_other_classes_is_skipped_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = random_torchvision_resnet50(tmp_path)
    config, model = resnet50("conv", classes=10)
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = warm_start(model, "torchvision", config.model)
    assert report.mismatched == (("fc.weight", (10, 2048), (1000, 2048)), ("fc.bias", (10,), (1000,)))
    assert report.notes == ("the classifier (fc) starts fresh: the weights have 1000 classes, this model 10",)
    assert report.rows()[3] == ("shape mismatch (initialised)", 2, ["fc (2)"])
    state = model.state_dict()
    for name in state:
        expected = fresh[name] if name.startswith("fc.") else source[name]
        assert torch.equal(state[name], expected), name


def test_the_conv_twin_loads_timm_weights_through_timm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(11)
    source = timm.create_model("resnet50").state_dict()
    torch.save(source, tmp_path / "resnet50.pth")
    create = timm.create_model

    def offline(name: str, **kwargs: Any) -> Any:  # timm's own loading, from a file instead of the hub
        assert (name, kwargs) == ("resnet50", {"pretrained": True})
        return create(name, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "resnet50.pth")})

    monkeypatch.setattr(timm, "create_model", offline)
    config, model = resnet50("conv")
    report = warm_start(model, "timm", config.model)
    assert report.source == "timm resnet50.a1_in1k"
    assert len(report.loaded) == len(source) == len(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source[name]), name


@pytest.mark.parametrize(
    ("init", "overrides", "message"),
    [
        ("torchvision", [], r"this model has 1-1-1-1: use a preset of one of those depths"),
        ("timm", [], r"resnet26 \(2-2-2-2\), resnet50 .* this model has 1-1-1-1"),
        ("torchvision", ["model.layers=[3,4,6,3]"], r"resnet50 has width 64, this model model.width 8"),
    ],
)
def test_a_layout_without_pretrained_weights_is_one_clear_error(
    init: str, overrides: list[str], message: str
) -> None:
    config = load_preset("smoke", model="conv", overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        warm_start(build_model(config), init, config.model)


# ---------------------------------------------------------------------------------------------------
# gsa checkpoints and state-dict files.


def test_a_gsa_twin_from_a_conv_checkpoint_gets_all_but_its_attention(tmp_path: Path) -> None:
    run = smoke_run(tmp_path / "conv", "conv")
    conv = Checkpoint.load(run / "best.pt").model
    config = load_preset("smoke", model="gsa")
    model = build_model(config)
    report = warm_start(model, str(run), config.model)  # a run directory: its best.pt
    assert report.source == f"{run / 'best.pt'} (epoch 1)"
    state = model.state_dict()
    attention = {name for name in state if ".conv2." in name}  # every stage's spatial operator is GSA
    assert attention
    assert set(report.missing) == attention
    assert set(report.unexpected) == {name for name in conv if name.endswith(".conv2.weight")}
    assert set(report.loaded) == set(state) - attention
    assert report.mismatched == ()
    for name in report.loaded:
        assert torch.equal(state[name], conv[name]), name
    assert group_names(report.missing) == ["layer{1,2,3,4}.*.conv2 (32)"]


def test_a_checkpoint_with_an_ema_starts_from_the_ema_weights(tmp_path: Path) -> None:
    run = smoke_run(tmp_path / "ema", "gsa", "recipe.ema_decay=0.5")
    checkpoint = Checkpoint.load(run / "last.pt")
    assert checkpoint.ema is not None
    config = load_preset("smoke", model="gsa")
    model = build_model(config)
    report = warm_start(model, str(run / "last.pt"), config.model)
    assert report.source == f"{run / 'last.pt'} (EMA weights, epoch 1)"
    assert (report.missing, report.unexpected, report.mismatched) == ((), (), ())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint.ema[name]), name


def test_a_plain_state_dict_file_loads_with_ddp_prefixes_dropped(tmp_path: Path) -> None:
    config = load_preset("smoke", model="conv")
    torch.manual_seed(3)
    source = build_model(config).state_dict()
    torch.save(
        {"state_dict": {f"module.{name}": tensor for name, tensor in source.items()}}, tmp_path / "w.pt"
    )
    model = build_model(config)
    report = warm_start(model, str(tmp_path / "w.pt"), config.model)
    assert report.source == str(tmp_path / "w.pt")
    assert len(report.loaded) == len(source)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source[name]), name


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.ones(3, 3)}, tmp_path / "other.pt")
    config = load_preset("smoke", model="conv")
    with pytest.raises(ConfigError, match=r"none of its 1 tensors fits this model"):
        warm_start(build_model(config), str(tmp_path / "other.pt"), config.model)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", b"not weights\n", r"not a readable weights file"),
        ("list.pt", None, r"holds no state dict"),
    ],
)
def test_a_file_without_weights_is_one_line(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    config = load_preset("smoke", model="conv")
    with pytest.raises(GsaError, match=message):
        warm_start(build_model(config), str(path), config.model)


def test_group_names_collapses_blocks_and_merges_stages() -> None:
    names = [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "layer1.0.conv2.qkv.weight",
        "layer1.1.conv2.rel_row",
        "layer2.0.conv2.qkv.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "fc.weight",
    ]
    assert group_names(names) == [
        "conv1 (1)",
        "bn1 (2)",
        "layer{1,2}.*.conv2 (3)",
        "layer2.*.downsample (2)",
        "fc (1)",
    ]


# ---------------------------------------------------------------------------------------------------
# Through the command line.


def test_gsa_train_init_prints_the_table_and_records_the_source(tmp_path: Path) -> None:
    run = smoke_run(tmp_path / "conv", "conv")
    out = tmp_path / "warm"
    args = ["train", "-p", "smoke", "--epochs", "1", "--device", "cpu", "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--init", str(run / "best.pt")])
    assert result.exit_code == 0, result.output
    assert f"warm start from {run / 'best.pt'} (epoch 1)" in " ".join(result.stdout.split())  # the title
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") == 4}
    assert "100" in lines["loaded"]
    assert "layer{1,2,3,4}.*.conv2 (32)" in lines["missing (initialised)"]
    assert "layer{1,2,3,4}.*.conv2 (4)" in lines["unexpected (ignored)"]
    record = json.loads((out / "init.json").read_text())
    assert record["source"] == f"{run / 'best.pt'} (epoch 1)"
    assert len(record["missing"]) == 32
    assert json.loads((out / "summary.json").read_text())["init"] == record["source"]


def test_a_resumed_warm_started_run_keeps_its_source(tmp_path: Path) -> None:
    run = smoke_run(tmp_path / "conv", "conv")
    config = load_preset("smoke", model="gsa", overrides=["recipe.epochs=2"])
    warm = tmp_path / "warm"
    shown: list[str] = []
    options = TrainOptions(out=warm, device="cpu", init=str(run))
    with pytest.raises(TrainingStoppedError):
        train(
            config,
            options,
            reporter=Quiet(stop_after=1),
            show_init=lambda report: shown.append(report.source),
        )
    assert shown == [f"{run / 'best.pt'} (epoch 1)"]
    assert json.loads((warm / "summary.json").read_text())["init"] == shown[0]
    resumed = train(None, TrainOptions(resume=warm, device="cpu"), reporter=Quiet())
    assert (resumed.status, resumed.init) == ("finished", shown[0])


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (
            ["-p", "smoke", "--init", "nope.pt"],
            1,
            r"^error: --init nope.pt: no such file; give torchvision, timm, a checkpoint",
        ),
        (["-p", "smoke", "--init", "."], 1, r"^error: --init \.: a folder without best.pt"),
        (["--init", "torchvision", "--resume", "somewhere"], 2, r"configured; drop --init \(start a new"),
    ],
)
def test_a_bad_init_is_one_line_and_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], code: int, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--device", "cpu", *extra])
    assert result.exit_code == code
    assert re.search(message, one_error_line(result))
    assert not (tmp_path / "runs").exists()


def test_init_timm_without_timm_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "-p", "smoke", "--device", "cpu", "--out", str(out), "--init", "timm"]
    )
    assert result.exit_code == 2
    assert one_error_line(result) == "error: --init timm needs the timm package: pip install 'gsa-cli[timm]'"
    assert not out.exists()

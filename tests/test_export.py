"""``gsa export`` and what it rests on: a dynamic-batch export of a trained smoke run (``.pt2`` and ONNX)
checked against eager, the CLI's outputs and refusals, a traced GSA pass that holds for every batch, and
the warning of a net used at a larger input than it was built for.

The exports are slow-ish (seconds each), so each is made once per module and read by several tests."""

from __future__ import annotations

import io
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line
from typer.testing import CliRunner

from gsa_cli import load_preset
from gsa_cli.choices import ExportFormat
from gsa_cli.cli.app import app
from gsa_cli.config import GsaImplementation
from gsa_cli.errors import ConfigError, GsaError, SpanWarning
from gsa_cli.models import GlobalSelfAttention2d, ResNet, build_model, gsa_kernels
from gsa_cli.train import export
from gsa_cli.train.checkpoint import Checkpoint, config_from_checkpoint
from gsa_cli.train.export import ExportCheckError, ExportOptions, export_checkpoint
from gsa_cli.train.loop import SilentReporter
from gsa_cli.train.run import TrainOptions, train

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # stable and fast on a shared 2-core machine


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch smoke run of the GSA net, with EMA weights."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export") / "run"
    config = load_preset("smoke", overrides=["recipe.epochs=1", "recipe.ema_decay=0.9"])
    train(config, TrainOptions(out=out, device="cpu"), reporter=SilentReporter())
    return out


def eager_model(checkpoint_path: Path, *, ema: bool = True) -> ResNet:
    """The checkpoint's net as the test builds it, independently of the exporter (eval mode, gemm)."""
    checkpoint = Checkpoint.load(checkpoint_path)
    config = config_from_checkpoint(checkpoint, checkpoint_path)
    config = replace(config, model=replace(config.model, gsa_impl=GsaImplementation.GEMM))
    model = build_model(config)
    weights = checkpoint.ema if ema and checkpoint.ema is not None else checkpoint.model
    model.load_state_dict(weights)
    return model.eval()


def images(batch: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close_to_eager(outputs: torch.Tensor, eager: torch.Tensor) -> None:
    """Within the exporter's own tolerance: 1e-3 of the largest logit (at least 1)."""
    assert outputs.shape == eager.shape
    scale = max(1.0, eager.abs().max().item())
    assert (outputs - eager).abs().max().item() <= 1e-3 * scale


def no_temporaries(folder: Path) -> bool:
    return not [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------
# .pt2 of a run directory, through the library.


@pytest.fixture(scope="module")
def pt2_report(run_dir: Path) -> export.ExportReport:
    return export_checkpoint(run_dir, ExportOptions(format=ExportFormat.PT2))


def test_a_run_directory_exports_its_best_checkpoint_as_pt2_checked_at_batch_1_and_32(
    run_dir: Path, pt2_report: export.ExportReport
) -> None:
    report = pt2_report
    assert report.checkpoint == run_dir / "best.pt"
    assert report.path == run_dir / "best.pt2"
    assert report.path.stat().st_size == report.size_bytes > 0
    assert (report.weights, report.epoch, report.opset) == ("ema", 1, None)
    assert report.input_shape == ("batch", 3, 16, 16)
    assert [check.batch for check in report.checks] == [1, 32]
    for check in report.checks:
        assert check.ok
        assert check.limit == pytest.approx(1e-3 * max(1.0, check.max_eager))
        assert 0 <= check.max_diff <= check.limit
    assert no_temporaries(run_dir)


@pytest.fixture(scope="module")
def saved_program(pt2_report: export.ExportReport) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """The saved program loaded back (seconds), with the record of where it came from."""
    extra = {"gsa.json": ""}
    program = torch.export.load(pt2_report.path, extra_files=extra)
    return program, json.loads(extra["gsa.json"])


def test_the_saved_program_runs_any_batch_as_eager_does_with_grad_on(
    run_dir: Path, saved_program: tuple[torch.export.ExportedProgram, dict[str, str]]
) -> None:
    program, _ = saved_program
    module = program.module()
    eager = eager_model(run_dir / "best.pt")
    for batch in (1, 17, 32):  # 17: past the 2 to 15 that the batch-dependent head chunking allowed
        x = images(batch)
        with torch.no_grad():
            expected = eager(x)
        assert_close_to_eager(module(x).detach(), expected)  # grad on: no out= products in the graph
    constraints = [str(value) for value in program.range_constraints.values()]
    assert any(text.startswith("VR[1,") for text in constraints), constraints


def test_the_program_records_where_it_came_from(
    pt2_report: export.ExportReport, saved_program: tuple[torch.export.ExportedProgram, dict[str, str]]
) -> None:
    _, about = saved_program
    assert about["gsa.checkpoint"] == str(pt2_report.checkpoint)
    assert (about["gsa.epoch"], about["gsa.weights"], about["gsa.preset"]) == ("1", "ema", "smoke")
    assert about["gsa.img_size"] == "16"


# ---------------------------------------------------------------------------------------------------
# ONNX of a run directory and .pt2 of a checkpoint file, through the CLI.


@dataclass
class CliExport:
    output: str
    stderr: str
    path: Path

    @property
    def words(self) -> str:
        """The output with each run of whitespace one space (rich wraps titles and lines)."""
        return " ".join(self.output.split())


@pytest.fixture(scope="module")
def onnx_cli(run_dir: Path) -> CliExport:
    for name in export.ONNX_EXTRA:
        pytest.importorskip(name)
    result = runner.invoke(app, ["export", str(run_dir), "--format", "onnx"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return CliExport(result.stdout, result.stderr, run_dir / "best.onnx")


def test_onnx_export_of_a_run_directory_prints_the_check_per_batch(onnx_cli: CliExport) -> None:
    rows = {line.split("│")[1].strip(): line for line in onnx_cli.output.splitlines() if line.count("│") > 4}
    assert set(rows) == {"1", "32"}
    for row in rows.values():
        cells = [cell.strip() for cell in row.split("│")[1:-1]]
        assert float(cells[1]) <= float(cells[3])  # the difference within what is allowed
        assert cells[4] == "ok"
    assert "input batch x 3 x 16 x 16 (any batch), opset " in onnx_cli.words
    assert no_temporaries(onnx_cli.path.parent)


def test_the_onnx_model_runs_any_batch_in_onnx_runtime_as_eager_does(
    run_dir: Path, onnx_cli: CliExport
) -> None:
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_cli.path))
    (batch_dim, *rest) = model.graph.input[0].type.tensor_type.shape.dim
    assert (model.graph.input[0].name, batch_dim.dim_param) == ("images", "batch")
    assert [dim.dim_value for dim in rest] == [3, 16, 16]
    about = {prop.key: prop.value for prop in model.metadata_props}
    assert (about["gsa.epoch"], about["gsa.weights"]) == ("1", "ema")
    session = onnxruntime.InferenceSession(str(onnx_cli.path), providers=["CPUExecutionProvider"])
    eager = eager_model(run_dir / "best.pt")
    for batch in (1, 17, 32):
        x = images(batch, seed=2)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            assert_close_to_eager(torch.from_numpy(logits), eager(x))


@pytest.fixture(scope="module")
def pt2_cli(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliExport:
    """The checkpoint file exported at 20 px with the trained (not EMA) weights, over a file there."""
    out = tmp_path_factory.mktemp("pt2") / "net.pt2"
    out.write_bytes(b"an older export")
    args = ["export", str(run_dir / "last.pt"), "-f", "pt2", "-o", str(out), "--no-ema", "--img-size", "20"]
    result = runner.invoke(app, [*args, "--force"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return CliExport(result.stdout, result.stderr, out)


def test_pt2_export_of_a_checkpoint_file_replaces_a_file_only_with_force(
    run_dir: Path, pt2_cli: CliExport
) -> None:
    assert "(pt2; " in pt2_cli.words
    assert "epoch 1, model weights)" in pt2_cli.words
    assert "input batch x 3 x 20 x 20 (any batch)," in pt2_cli.words
    module = torch.export.load(pt2_cli.path).module()  # the older file replaced
    eager = eager_model(run_dir / "last.pt", ema=False)
    x = images(17, size=20)
    with torch.no_grad(), pytest.warns(SpanWarning):  # built for 16 px
        expected = eager(x)
    assert_close_to_eager(module(x).detach(), expected)
    before = pt2_cli.path.read_bytes()
    result = runner.invoke(app, ["export", str(run_dir / "last.pt"), "-f", "pt2", "-o", str(pt2_cli.path)])
    assert result.exit_code == 2
    assert (
        one_error_line(result)
        == f"error: {pt2_cli.path}: already exists; add --force to replace it, or name another --out"
    )
    assert pt2_cli.path.read_bytes() == before


def test_a_larger_input_than_the_net_was_built_for_warns_in_yellow_lines(pt2_cli: CliExport) -> None:
    lines = {line for line in pt2_cli.stderr.splitlines() if line.startswith("warning: ")}
    expected = {(16, 20), (8, 10), (4, 5)}  # (span, map side) of each stage at 20 px
    advice = "give the net the image size it was built for, or build it for this size"
    assert lines == {
        f"warning: a GSA module of span {span} sees {size}-pixel maps: its positional attention is not "
        f"global; {advice}"
        for span, size in expected
    }


# ---------------------------------------------------------------------------------------------------
# Refusals: one line, a non-zero exit, nothing written.


def test_a_missing_path_or_a_file_that_is_no_checkpoint_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    result = runner.invoke(app, ["export", str(missing), "-f", "pt2"])
    assert result.exit_code == 1
    assert one_error_line(result) == f"error: {missing}: no such run directory or checkpoint"
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    result = runner.invoke(app, ["export", str(text), "-f", "pt2"])
    assert result.exit_code == 1
    assert one_error_line(result).startswith(f"error: {text}: not a readable checkpoint")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.pt"]


def test_a_missing_onnx_extra_is_one_line_naming_it(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    out = tmp_path / "net.onnx"
    result = runner.invoke(app, ["export", str(run_dir), "-f", "onnx", "-o", str(out)])
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "--format onnx needs onnxruntime" in line
    assert "pip install 'gsa-cli[onnx]'" in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{ckpt}"], "--out {ckpt}: that is the checkpoint being exported; name another file"),
        (["-o", "{tmp}"], "--out {tmp}: exists and is not a file; name a file to write"),
        (["--tolerance", "0"], "--tolerance 0.0: must be above 0"),
        (["--img-size", "0"], "--img-size 0: must be at least 1"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    run_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    fill = {"ckpt": str(run_dir / "best.pt"), "tmp": str(tmp_path)}
    result = runner.invoke(
        app, ["export", str(run_dir), "-f", "pt2", "--force", *(a.format(**fill) for a in args)]
    )
    assert result.exit_code == 2
    assert one_error_line(result) == "error: " + message.format(**fill)
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_differs_from_eager_is_not_written(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check itself: a program 1% off at batch 32 fails it; no file is left, nor a temporary."""

    def one_percent_off(model: torch.nn.Module, example: torch.Tensor, about: dict[str, str]) -> tuple:
        def save(file: io.BufferedWriter) -> None:
            file.write(b"a program")

        def load(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
            assert path.read_bytes() == b"a program"  # the check runs what was written
            return lambda x: model(x) * (1.01 if len(x) == 32 else 1.0)

        return save, load, None

    monkeypatch.setattr(export, "_pt2", one_percent_off)
    out = tmp_path / "net.pt2"
    with pytest.raises(
        ExportCheckError, match=r"net\.pt2: not written: at batch 32 the export's logits differ"
    ):
        export_checkpoint(run_dir, ExportOptions(format=ExportFormat.PT2, out=out))
    assert list(tmp_path.iterdir()) == []
    assert issubclass(ExportCheckError, GsaError)
    assert not issubclass(ExportCheckError, ConfigError)


# ---------------------------------------------------------------------------------------------------
# The GSA pass traced: no batch-dependent rule in the graph, no warning under tracing.


def test_a_compiled_axial_pass_does_not_recompile_between_batch_8_and_16() -> None:
    """``torch.compile(dynamic=True)`` of the gemm pass, forward and backward, for batches 8, 16, 32: one
    compiled frame. (The head chunking's rule counted the batch: 16-pixel maps split heads from batch 16.)
    A whole net is not the test: on the CPU torch's convolution picks its backend by the batch and
    recompiles at 16 by itself, a conv twin too."""
    from torch._dynamo.testing import CompileCounter

    def column_pass(queries: torch.Tensor, values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return gsa_kernels.axial_attention_gemm(queries, values, pairs, axis="height")

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(column_pass, dynamic=True, backend=counter)
    heads, channels, size = 4, 4, 16
    pairs = torch.randn(heads, size, channels, size, requires_grad=True)
    for batch in (8, 16, 32):
        queries = torch.randn(batch, heads, channels, size, size, requires_grad=True)
        values = torch.randn(batch, heads, channels, size, size, requires_grad=True)
        out = compiled(queries, values, pairs)
        out.square().sum().backward()
        assert counter.frame_count == 1, f"recompiled at batch {batch}"
        expected = column_pass(queries, values, pairs)
        torch.testing.assert_close(out, expected)
    torch._dynamo.reset()


def test_a_module_warns_once_per_size_beyond_its_span_and_never_under_tracing() -> None:
    net = build_model(load_preset("smoke")).eval()  # built for 16 px: spans 16, 16, 8, 4
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        net(images(2, size=16))
        assert caught == []  # at its own size: global
        net(images(2, size=20))
        net(images(3, size=20))
    assert all(w.category is SpanWarning for w in caught)
    seen = sorted(
        str(w.message).split(": ")[0] for w in caught
    )  # one per module and size, the second call none
    assert seen == [
        "a GSA module of span 16 sees 20-pixel maps",  # layer1's
        "a GSA module of span 16 sees 20-pixel maps",  # layer2's, strided after it
        "a GSA module of span 4 sees 5-pixel maps",
        "a GSA module of span 8 sees 10-pixel maps",
    ]

    module = GlobalSelfAttention2d(8, 8, heads=2, span=4).eval()
    x = torch.randn(2, 8, 6, 6)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", SpanWarning)  # a warning under tracing would fail here
        program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), program.module()(x))
        torch._dynamo.reset()
    with pytest.warns(SpanWarning, match="span 4 sees 6-pixel maps"):
        module(x)


def test_a_span_the_config_sets_small_on_purpose_does_not_warn() -> None:
    local = build_model(load_preset("smoke", overrides=["model.span=3"])).eval()  # maps of 16 to 4 px
    spans = {m.span for m in local.modules() if isinstance(m, GlobalSelfAttention2d)}
    assert spans == {3}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", SpanWarning)
        local(images(2, size=16))
        local(images(2, size=20))
    built_global = build_model(load_preset("smoke")).eval()
    with pytest.warns(SpanWarning), torch.no_grad():  # the same check is live for a net built global
        built_global(images(2, size=20))


def test_weights_that_do_not_fit_their_config_are_one_line_and_nothing_written(
    run_dir: Path, tmp_path: Path
) -> None:
    from gsa_cli.config import config_to_yaml

    checkpoint = Checkpoint.load(run_dir / "last.pt")
    wider = load_preset("smoke", overrides=["recipe.epochs=1", "model.width=12"])
    edited = tmp_path / "edited.pt"
    replace(checkpoint, config_yaml=config_to_yaml(wider)).save(edited)
    result = CliRunner().invoke(app, ["export", str(edited), "-f", "pt2"])
    assert result.exit_code == 1, result.output
    assert one_error_line(result).startswith(
        f"error: {edited}: its ema weights do not fit the model its saved config builds: "
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["edited.pt"]

"""Checkpoints that cannot be trusted are refused in one line (issue 13, the low list): a flipped byte
(the checksum), a ``best.pt`` copied from another run, weights that do not fit their saved config.
A checkpoint file written before the checksum still loads.
"""

from __future__ import annotations

import shutil
import struct
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_checkpoint import old_format_payload, write_old
from test_run_integrity import error_line, smoke, stopped_run, trained
from typer.testing import CliRunner

from gsa_cli.cli.app import app
from gsa_cli.config import config_to_yaml
from gsa_cli.errors import GsaError
from gsa_cli.results import now_iso
from gsa_cli.train.checkpoint import Checkpoint
from gsa_cli.train.integrity import payload_digest
from gsa_cli.train.loop import SilentReporter
from gsa_cli.train.run import TrainOptions, train


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tensor_data(path: Path) -> list[range]:
    """The byte ranges of the tensors' data in a torch file (its zip's ``data/N`` records)."""
    raw = path.read_bytes()
    ranges = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename:
                name_length, extra_length = struct.unpack(
                    "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
                )
                start = info.header_offset + 30 + name_length + extra_length
                ranges.append(range(start, start + info.file_size))
    return ranges


def flipped(path: Path, position: int, target: Path | None = None) -> Path:
    """A copy of ``path`` (at ``target``, else in place) with the byte at ``position`` inverted."""
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    target = target or path
    target.write_bytes(bytes(data))
    return target


def refusal(path: Path) -> str:
    with pytest.raises(GsaError) as refused:
        Checkpoint.load(path)
    message = str(refused.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------
# The checksum.


def test_one_flipped_byte_in_a_saved_checkpoint_is_refused_as_corrupt(tmp_path: Path) -> None:
    saved = tmp_path / "last.pt"
    Checkpoint.load(write_old(tmp_path / "old.pt", old_format_payload())).save(saved)
    assert Checkpoint.load(saved).step == 1  # intact, it loads
    size, data = saved.stat().st_size, tensor_data(saved)
    assert any(size // 2 in span for span in data)  # the middle byte is a tensor's: no read error
    spans = data[:: max(1, len(data) // 12)]  # and a dozen tensors' middles, the optimizer's among them
    for position in [size // 2, *(span[len(span) // 2] for span in spans)]:
        bad = flipped(saved, position, tmp_path / f"flipped-{position}.pt")
        message = refusal(bad)
        assert message.startswith(f"{bad}: corrupt: its contents do not match the checksum"), message


def test_a_checkpoint_written_before_the_checksum_still_loads_and_a_new_one_has_it(tmp_path: Path) -> None:
    old = write_old(tmp_path / "old.pt", old_format_payload())
    assert "sha256" not in torch.load(old, weights_only=True)
    checkpoint = Checkpoint.load(old)  # no checksum: read unchecked, as before
    checkpoint.save(tmp_path / "new.pt")
    raw = torch.load(tmp_path / "new.pt", weights_only=True)
    assert raw["sha256"] == payload_digest(raw)
    raw["sha256"] = "0" * 64  # a checksum that is wrong (or damaged itself): refused too
    torch.save(raw, tmp_path / "wrong.pt")
    assert ": corrupt: " in refusal(tmp_path / "wrong.pt")


def test_a_resume_from_a_corrupt_last_pt_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    out = stopped_run(tmp_path / "run")
    flipped(out / "last.pt", (out / "last.pt").stat().st_size // 2)
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.name != ".lock"}
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert error_line(result).startswith(f"error: {out / 'last.pt'}: corrupt: ")
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.name != ".lock"} == before


def test_eval_of_a_run_whose_best_pt_is_corrupt_refuses_and_does_not_fall_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trained(out)
    flipped(out / "best.pt", (out / "best.pt").stat().st_size // 2)
    result = CliRunner().invoke(app, ["eval", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert error_line(result).startswith(f"error: {out / 'best.pt'}: corrupt: ")
    assert not (out / "eval.json").exists()  # last.pt, intact, was not evaluated in its place


# ---------------------------------------------------------------------------------------------------
# A checkpoint belongs to its run directory.


def test_a_best_pt_copied_from_another_run_is_not_evaluated_into_its_eval_json(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    trained(first)
    started = Checkpoint.load(first / "best.pt").started
    while now_iso() == started:  # the same config, started a second later (the summary's resolution)
        time.sleep(0.05)
    trained(second)
    shutil.copyfile(first / "best.pt", second / "best.pt")
    for target in (second, second / "best.pt"):  # the run directory, or the file inside it
        result = CliRunner().invoke(app, ["eval", str(target), "--device", "cpu"])
        assert result.exit_code == 1, result.output
        line = error_line(result)
        assert line.startswith(f"error: {second / 'best.pt'}: not the checkpoint of the run in {second}: ")
        assert f"its run's start is {started}, summary.json says " in line
    assert not (second / "eval.json").exists()
    # Outside any run directory it is evaluated, and eval.json written beside it.
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copyfile(first / "best.pt", loose / "best.pt")
    result = CliRunner().invoke(app, ["eval", str(loose / "best.pt"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (loose / "eval.json").is_file()
    # And in its own run directory, as always.
    assert CliRunner().invoke(app, ["eval", str(first), "--device", "cpu"]).exit_code == 0
    assert (first / "eval.json").is_file()


# ---------------------------------------------------------------------------------------------------
# Weights that do not fit the model their config builds.


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (["model.width=12"], "other shape: "),  # the saved config edited: the same keys, wider
        (["model.attention_stages=[1, 2, 3]"], "missing "),  # another model: stage 4 conv, not attention
    ],
)
def test_weights_that_do_not_fit_their_config_are_one_line_in_eval_and_resume(
    tmp_path: Path, changes: list[str], problem: str
) -> None:
    out = stopped_run(tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        checkpoint = Checkpoint.load(out / name)
        edited = config_to_yaml(smoke(2, *changes))
        replace(checkpoint, config_yaml=edited).save(out / name)
    result = CliRunner().invoke(app, ["eval", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert line.startswith(
        f"error: {out / 'best.pt'}: its model weights do not fit the model its saved config"
    )
    assert problem in line
    with pytest.raises(GsaError) as refused:
        train(None, TrainOptions(resume=out, device="cpu"), reporter=SilentReporter())
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{out / 'last.pt'}: its model weights do not fit the model its saved config")
    assert problem in message


def test_an_optimizer_state_that_does_not_fit_is_one_line_on_resume(tmp_path: Path) -> None:
    out = stopped_run(tmp_path / "run")
    checkpoint = Checkpoint.load(out / "last.pt")
    optimizer = dict(checkpoint.optimizer)
    groups = [dict(group) for group in optimizer["param_groups"]]
    groups[0]["params"] = groups[0]["params"][:-1]  # a group one parameter short: another recipe's
    optimizer["param_groups"] = groups
    replace(checkpoint, optimizer=optimizer).save(out / "last.pt")
    with pytest.raises(GsaError) as refused:
        train(None, TrainOptions(resume=out, device="cpu"), reporter=SilentReporter())
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{out / 'last.pt'}: its optimizer state does not fit this run's optimizer (")

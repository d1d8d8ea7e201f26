"""YAML is read with bounds (bytes, alias expansion, nesting), refuses duplicate keys and non-UTF-8 text,
and every message stays one short line whatever value it is about."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from gsa_cli import ConfigError, load_preset
from gsa_cli.presets import preset_dir

SMOKE = (preset_dir() / "smoke.yaml").read_text(encoding="utf-8")
MESSAGE_LIMIT = 300  # characters: a path, a key and a short value, never a whole document


def _bomb(levels: int, fanout: int) -> str:
    """A flow sequence in which each level lists the previous one ``fanout`` times ("billion laughs")."""
    items = ["&a0 [" + ", ".join(["lol"] * fanout) + "]"]
    for level in range(1, levels):
        items.append(f"&a{level} [" + ", ".join([f"*a{level - 1}"] * fanout) + "]")
    return "[" + ", ".join(items) + "]"


def _preset_with(tmp_path: Path, replace: str, by: str, name: str = "bad.yaml") -> Path:
    assert replace in SMOKE
    path = tmp_path / name
    path.write_text(SMOKE.replace(replace, by, 1), encoding="utf-8")
    return path


def _refused(path: Path | str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_preset(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message, message[:1000]
    assert len(message) < MESSAGE_LIMIT, message[:1000]
    return message


def test_the_billion_laughs_preset_is_refused_at_once_naming_the_file(tmp_path: Path) -> None:
    # 9 levels of 9: 387 million strings once expanded, from a few hundred bytes.
    text = "description: " + _bomb(9, 9) + "\n"
    assert len(text) < 700
    path = _preset_with(tmp_path, "description: Synthetic 16 px images, tiny net, seconds; for tests\n", text)
    message = _refused(path)
    assert message.startswith(f"{path}: ")
    assert "alias" in message


def test_an_alias_bomb_in_a_known_key_gives_a_short_message(tmp_path: Path) -> None:
    # Small enough to print today (46,656 strings), large enough to be refused by the expansion bound.
    path = _preset_with(tmp_path, "heads: 2", "heads: " + _bomb(6, 6))
    assert _refused(path).startswith(f"{path}: ")


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    message = _refused("smoke", overrides=["model.layers=" + _bomb(6, 6)])
    assert message.startswith("--set model.layers=")


def test_the_public_loader_bounds_text_from_a_checkpoint() -> None:
    from gsa_cli.presets import load_yaml_text

    with pytest.raises(ConfigError, match=r"^run/last\.pt \(its saved config\): .*alias"):
        load_yaml_text("description: " + _bomb(9, 9), "run/last.pt (its saved config)")
    assert load_yaml_text(SMOKE, "x") == yaml.safe_load(SMOKE)


def test_anchors_and_aliases_within_the_bound_still_work(tmp_path: Path) -> None:
    path = _preset_with(tmp_path, "width: 8", "width: &w 8")
    path.write_text(path.read_text().replace("span: null", "span: *w"))
    assert load_preset(path).model.span == 8


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = _preset_with(tmp_path, "description: Synthetic", "description: &d {again: *d}\n#")
    message = _refused(path)
    assert message.startswith(f"{path}: ")
    assert "itself" in message


def test_deep_nesting_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _preset_with(tmp_path, "heads: 2", "heads: " + "[" * 5000 + "]" * 5000)
    assert _refused(path).startswith(f"{path}: ")


def test_a_preset_over_the_size_bound_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(SMOKE + ("# padding" + " " * 90 + "\n") * 20_000)  # 2 MB of comments
    message = _refused(path)
    assert message.startswith(f"{path}: ")
    assert "bytes" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("heads", "'" + "x" * 10_000 + "'"),  # a long string of the wrong type
        ("heads", "[" + ", ".join(["[1, 2, 3]"] * 500) + "]"),  # a long list of the wrong type
        ("k" * 1000, "1"),  # a long unknown key (YAML allows 1024 characters in a plain key)
        ('"two\\nlines"', "1"),  # an unknown key with a line break in it
    ],
    ids=["long-string", "long-list", "long-key", "key-with-newline"],
)
def test_messages_never_print_an_unbounded_value(tmp_path: Path, key: str, value: str) -> None:
    path = _preset_with(tmp_path, "heads: 2", f"{key}: {value}")
    assert _refused(path).startswith(f"{path}: model.")


def test_a_preset_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SMOKE.replace("Synthetic", "Synth\xe9tic").encode("latin-1"))
    message = _refused(path)
    assert message.startswith(f"{path}: ")
    assert "UTF-8" in message


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux only")
def test_a_preset_whose_name_is_not_utf8_is_refused(tmp_path: Path) -> None:
    directory = os.fsencode(tmp_path)
    with open(os.path.join(directory, b"caf\xe9.yaml"), "wb") as file:
        file.write(SMOKE.encode())
    name = os.fsdecode(os.path.join(directory, b"caf\xe9.yaml"))
    message = _refused(name)
    assert "UTF-8" in message
    assert "rename" in message


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """The 1-based line of the ``occurrence``-th line that starts (after indentation) with ``needle``."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if line.lstrip().startswith(needle)]
    return hits[occurrence - 1]


@pytest.mark.parametrize(
    ("text", "key", "occurrence"),
    [
        (SMOKE.replace("  heads: 2\n", "  heads: 2\n  heads: 4\n"), "heads", 2),
        (SMOKE + "model:\n  heads: 4\n", "model", 2),
        (SMOKE.replace("layers: [1, 1, 1, 1]", "layers: {a: 1, a: 2}"), "layers", 1),
    ],
    ids=["heads", "model", "flow-mapping"],
)
def test_a_key_given_twice_in_one_mapping_is_refused(
    tmp_path: Path, text: str, key: str, occurrence: int
) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    message = _refused(path)
    assert message.startswith(f"{path}: line {_line_of(text, key + ':', occurrence)}: ")
    assert repr("a" if key == "layers" else key) in message
    assert "twice" in message


def test_a_key_given_twice_in_an_override_is_refused() -> None:
    message = _refused("smoke", overrides=["model.layers={a: 1, a: 2}"])
    assert message.startswith("--set model.layers={a: 1, a: 2}: ")
    assert "'a'" in message
    assert "twice" in message


def test_a_checkpoint_whose_saved_config_is_an_alias_bomb_is_refused_in_one_line(tmp_path: Path) -> None:
    import torch

    from gsa_cli.errors import GsaError
    from gsa_cli.train.checkpoint import Checkpoint, config_from_checkpoint

    payload = {"config_yaml": "description: " + _bomb(9, 9) + "\n", "preset": "smoke"}
    checkpoint = Checkpoint.__new__(Checkpoint)  # only the two fields the decoder reads
    for name, value in payload.items():
        object.__setattr__(checkpoint, name, value)
    source = tmp_path / "last.pt"
    with pytest.raises(GsaError) as caught:
        config_from_checkpoint(checkpoint, source)
    message = str(caught.value)
    assert message.startswith(f"{source} (its saved config): ")
    assert "\n" not in message
    assert len(message) < MESSAGE_LIMIT
    assert torch.is_tensor(torch.zeros(1))  # torch imported: the decoder runs beside it in a real run


def test_a_run_whose_config_yaml_is_an_alias_bomb_is_named_by_compare(tmp_path: Path) -> None:
    from fixtures_runs import write_run
    from typer.testing import CliRunner

    from gsa_cli.cli.app import app

    run, other = tmp_path / "run", tmp_path / "other"
    write_run(run, kind="gsa", val_top1=[50.0], params=10, gmacs=0.1)
    write_run(other, kind="conv", val_top1=[40.0], params=12, gmacs=0.2)
    (run / "config.yaml").write_text("description: " + _bomb(9, 9) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["compare", str(other), str(run)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[:1000]
    assert lines[0].startswith(f"error: {run / 'config.yaml'}: ")
    assert len(lines[0]) < MESSAGE_LIMIT

"""Numbers in presets and ``--set`` read as YAML 1.2 does; every float key finite; seeds in range;
a model of attention has at least one attention stage."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gsa_cli import ConfigError, load_preset
from gsa_cli.cli.app import app
from gsa_cli.config import DataConfig, ModelConfig, RecipeConfig, config_to_yaml
from gsa_cli.presets import preset_dir
from gsa_cli.results import RunDir

SMOKE = (preset_dir() / "smoke.yaml").read_text(encoding="utf-8")


def _refused(preset: str | Path, *overrides: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_preset(preset, overrides=overrides, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message, message[:1000]
    assert len(message) < 300, message[:1000]
    return message


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("recipe.lr=3e-4", 3e-4),
        ("recipe.lr=0.00005", 5e-5),
        (f"recipe.lr={0.00005}", 5e-5),  # what `--lr 0.00005` passes on: str(5e-05) == "5e-05"
        ("recipe.lr=1e3", 1000.0),
        ("recipe.lr=+2.5E-1", 0.25),
        ("recipe.lr=.5", 0.5),
        ("recipe.epochs=010", 10),  # YAML 1.2: decimal, not YAML 1.1's octal 8
        ("recipe.epochs=0o10", 8),
        ("recipe.epochs=0x10", 16),
        ("recipe.epochs=1_000", 1000),
        ("recipe.seed=-0", 0),
    ],
)
def test_numbers_read_as_yaml_1_2(override: str, value: float) -> None:
    key = override.partition("=")[0].split(".")[1]
    loaded = getattr(load_preset("smoke", overrides=[override]).recipe, key)
    assert loaded == value
    assert type(loaded) is type(value)


def test_numbers_in_a_preset_file_read_as_yaml_1_2(tmp_path: Path) -> None:
    path = tmp_path / "numbers.yaml"
    path.write_text(SMOKE.replace("lr: 0.05", "lr: 5e-2").replace("epochs: 1", "epochs: 010"))
    config = load_preset(path)
    assert (config.recipe.lr, config.recipe.epochs) == (0.05, 10)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("recipe.epochs=1:30", "recipe.epochs: expected an integer, got '1:30'"),  # not YAML 1.1's 90
        ("recipe.lr=1:30", "recipe.lr: expected a number, got '1:30'"),
        ("recipe.epochs=0b11", "recipe.epochs: expected an integer, got '0b11'"),
        ("recipe.epochs=1e3", "recipe.epochs: expected an integer, got 1000.0"),
        ("recipe.epochs=" + "9" * 5000, "recipe.epochs: "),  # past Python's digit limit for int()
    ],
    ids=["sexagesimal-int", "sexagesimal-float", "binary", "float-for-int", "5000-digits"],
)
def test_what_yaml_1_2_does_not_call_a_number_is_refused_with_the_key(override: str, message: str) -> None:
    assert message in _refused("smoke", override)


def test_lr_option_takes_a_small_learning_rate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--lr", "0.00005", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert RunDir(out).config.is_file()
    assert load_preset(RunDir(out).config, model=None).recipe.lr == 5e-5


def _float_keys() -> list[str]:
    keys = []
    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("recipe", RecipeConfig)):
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            if float in (hints[spec.name], *typing.get_args(hints[spec.name])):
                keys.append(f"{section}.{spec.name}")
    return keys


def test_the_float_keys_are_found() -> None:
    assert {"recipe.lr", "model.key_ratio", "recipe.warmup_epochs", "data.noise"} <= set(_float_keys())


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize(
    "value",
    [".nan", ".inf", "-.inf", ".NaN", "+.INF", "1e400", "1" + "0" * 400],
    ids=["nan", "inf", "-inf", "NaN", "+INF", "1e400", "10**400"],
)
def test_every_float_key_refuses_a_value_that_is_not_finite(key: str, value: str) -> None:
    preset = "longrange" if key.startswith("data.") else "smoke"  # only longrange data takes noise
    message = _refused(preset, f"{key}={value}")
    assert f": {key}: must be a finite number" in message


def test_a_float_key_refuses_nan_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "nan.yaml"
    path.write_text(SMOKE.replace("key_ratio: 1.0", "key_ratio: .nan"))
    assert _refused(path).startswith(f"{path}: model.key_ratio: must be a finite number")


def test_a_saved_config_with_a_tiny_learning_rate_and_a_numeric_description_loads_back(
    tmp_path: Path,
) -> None:
    config = load_preset("smoke", overrides=["recipe.lr=5e-5", "description='3e-4'", "recipe.seed=0o17"])
    assert config.description == "3e-4"
    assert config.recipe.seed == 15
    saved = tmp_path / "smoke.yaml"
    saved.write_text(config_to_yaml(config))
    assert load_preset(saved, model=None) == config


@pytest.mark.parametrize("seed", [-1, 2**63, 99999999999999999999])
def test_a_seed_the_generators_cannot_take_is_refused(seed: int) -> None:
    assert "recipe.seed: must be an integer from 0 to 9223372036854775807" in _refused(
        "smoke", f"recipe.seed={seed}"
    )


def test_the_largest_seed_is_accepted() -> None:
    assert load_preset("smoke", overrides=[f"recipe.seed={2**63 - 1}"]).recipe.seed == 2**63 - 1


@pytest.mark.parametrize("key", ["attention_stages", "gsa_stages"])
@pytest.mark.parametrize("kind", ["gsa", "full"])
def test_an_attention_model_without_attention_stages_is_refused(key: str, kind: str) -> None:
    with pytest.warns(FutureWarning) if key == "gsa_stages" else contextlib.nullcontext():
        message = _refused("smoke", f"model.{key}=[]", model=kind)
    assert f"model.attention_stages: a {kind} model needs at least one attention stage" in message
    assert "--model conv" in message


def test_a_conv_model_may_list_no_attention_stage(tmp_path: Path) -> None:
    assert (
        load_preset("smoke", model="conv", overrides=["model.attention_stages=[]"]).model.attention_stages
        == ()
    )
    path = tmp_path / "plain.yaml"
    path.write_text(SMOKE.replace("attention_stages: [1, 2, 3, 4]", "attention_stages: []"))
    assert load_preset(path, model="conv").model.attention_stages == ()  # the file's kind is gsa
    _refused(path)

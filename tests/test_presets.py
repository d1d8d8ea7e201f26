"""Strict preset loading: every shipped preset loads; bad files and overrides are named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gsa_cli import ConfigError, load_preset
from gsa_cli.config import Config, ModelKind, config_to_yaml
from gsa_cli.errors import DeprecatedKeyWarning
from gsa_cli.presets import preset_dir, preset_names

REQUIRED = {
    "imagenet26",
    "imagenet38",
    "imagenet50",
    "imagenet101",
    "cifar26",
    "cifar38",
    "cifar50",
    "digits",
    "smoke",
}


def test_every_required_preset_ships() -> None:
    assert set(preset_names()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("kind", ["gsa", "conv"])
def test_preset_loads_and_round_trips_through_yaml(name: str, kind: str, tmp_path: Path) -> None:
    config = load_preset(name, model=kind)
    assert config.name == name
    assert config.model.kind is ModelKind(kind)
    assert config.description
    saved = tmp_path / f"{name}.yaml"
    saved.write_text(config_to_yaml(config))
    assert load_preset(saved, model=None) == config


def test_imagenet_and_cifar_presets_carry_the_spec_layouts() -> None:
    imagenet = load_preset("imagenet50")
    assert (imagenet.data.img_size, imagenet.data.num_classes, imagenet.model.stem.value) == (
        224,
        1000,
        "imagenet",
    )
    assert imagenet.model.stage_blocks == (3, 4, 6, 3)
    assert imagenet.recipe.nesterov
    assert imagenet.recipe.label_smoothing > 0
    cifar = load_preset("cifar26")
    assert (cifar.data.img_size, cifar.data.num_classes, cifar.model.stem.value) == (32, 100, "cifar")
    assert cifar.model.stage_blocks == (1, 2, 4, 1)
    assert load_preset("imagenet101").model.stage_blocks == (3, 4, 23, 3)


def _resnet_parameters(config: Config) -> int:
    """A bottleneck ResNet's parameters, counted by hand from its layout: a 3x3 stem conv (stride 1 or 2)
    and BN, then per block a 1x1 reduce, the spatial operator (a 3x3 conv, or GSA's 1x1 qkv, its two
    relative tables of ``2 * span - 1`` rows and a BN), a 1x1 expand (x4), three BNs and, where the shape
    changes, a 1x1 projection and BN; then the classifier. GSA's span is each block's input size (the
    preset's null)."""
    data, model = config.data, config.model
    stem_stride = {"cifar": 1, "stride2": 2}[model.stem.value]
    width, size = model.width, (data.img_size - 1) // stem_stride + 1
    total = 9 * data.channels * width + 2 * width
    channels = width
    for index, blocks in enumerate(model.stage_blocks):
        inner = width * 2**index
        out = 4 * inner
        for block in range(blocks):
            stride = 2 if index > 0 and block == 0 else 1
            if model.kind is ModelKind.GSA:
                spatial = 3 * inner * inner + 2 * (2 * size - 1) * inner + 2 * inner
            else:
                spatial = 9 * inner * inner
            total += channels * inner + spatial + inner * out + 2 * (inner + inner + out)
            if channels != out or stride == 2:
                total += channels * out + 2 * out
            channels, size = out, (size - 1) // stride + 1
    return total + channels * data.num_classes + data.num_classes


def test_the_fashion_preset_builds_both_twins_with_one_recipe() -> None:
    from gsa_cli.models import count_parameters

    conv, gsa = load_preset("fashion", model="conv"), load_preset("fashion", model="gsa")
    for config in (conv, gsa):
        assert config.data.dataset.value == "fashion-mnist"
        assert (config.data.img_size, config.data.channels, config.data.num_classes) == (28, 1, 10)
        assert (config.model.stem.value, config.model.stage_blocks) == ("stride2", (1, 2, 4, 1))
        assert config.model.attention_stages == (1, 2, 3, 4)
        assert count_parameters(config) == _resnet_parameters(config)
    assert conv.recipe == gsa.recipe  # the twins are trained alike
    assert conv.data == gsa.data
    assert count_parameters(gsa) < count_parameters(conv)


def test_model_kind_defaults_to_gsa() -> None:
    assert load_preset("cifar26").model.kind is ModelKind.GSA


def test_the_old_gsa_stages_key_is_still_read_with_a_deprecation_note() -> None:
    with pytest.warns(
        DeprecatedKeyWarning, match=r"model\.gsa_stages is deprecated; call it model\.attention_stages"
    ):
        config = load_preset("cifar26", overrides=["model.gsa_stages=[3, 4]"])
    assert config.model.attention_stages == (3, 4)
    assert "gsa_stages" not in config_to_yaml(config)


def test_a_preset_file_with_the_old_stage_key_is_read_and_with_both_keys_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load((preset_dir() / "smoke.yaml").read_text())
    raw["model"]["gsa_stages"] = raw["model"].pop("attention_stages")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw))
    with pytest.warns(DeprecatedKeyWarning, match=rf"{old}: model\.gsa_stages is deprecated"):
        assert load_preset(str(old)).model.attention_stages == load_preset("smoke").model.attention_stages
    raw["model"]["attention_stages"] = [1]
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"model\.gsa_stages: give model\.attention_stages only"):
        load_preset(str(both))


def test_a_path_works_as_well_as_a_name(tmp_path: Path) -> None:
    copy = tmp_path / "mine.yaml"
    copy.write_text((preset_dir() / "smoke.yaml").read_text())
    config = load_preset(str(copy))
    assert config.name == "mine"
    assert config.data == load_preset("smoke").data


def test_overrides_apply_with_yaml_values() -> None:
    config = load_preset(
        "cifar26",
        overrides=["model.heads=4", "model.attention_stages=[3, 4]", "recipe.lr=0.2", "model.span=null"],
    )
    assert config.model.heads == 4
    assert config.model.attention_stages == (3, 4)
    assert config.recipe.lr == 0.2
    assert config.model.span is None


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _smoke_document() -> dict[str, object]:
    loaded = yaml.safe_load((preset_dir() / "smoke.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "colour", "red", "model.colour: unknown key"),
        ("model", "heads", "eight", "model.heads: expected an integer, got 'eight'"),
        ("model", "heads", True, "model.heads: expected an integer, got True"),
        ("model", "heads", 3, "model.heads: 3 heads do not divide the 8 channels of stage 1"),
        ("model", "span", 0, "model.span: must be at least 1"),
        ("model", "stem", "tiny", "model.stem: expected one of 'imagenet', 'cifar'"),
        (
            "model",
            "attention_stages",
            [1, 5],
            "model.attention_stages: must be distinct stage numbers from 1 to 4",
        ),
        ("model", "key_ratio", 0.3, "model.key_ratio:"),
        ("data", "dataset", "mnist", "data.dataset: expected one of"),
        ("data", "num_classes", 1, "data.num_classes: must be at least 2"),
        ("recipe", "lr", -1, "recipe.lr: must be positive"),
        ("recipe", "optimizer", "lion", "recipe.optimizer: expected one of 'sgd', 'adamw'"),
        ("recipe", "momentum", 1.5, "recipe.momentum: must be in [0, 1)"),
    ],
)
def test_bad_values_name_the_file_and_dotted_key(
    tmp_path: Path, section: str, key: str, value: object, message: str
) -> None:
    document = _smoke_document()
    section_values = document[section]
    assert isinstance(section_values, dict)
    section_values[key] = value
    path = _write(tmp_path, document)
    with pytest.raises(ConfigError) as caught:
        load_preset(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert caught.value.exit_code == 2


def test_depth_not_in_the_table_is_refused(tmp_path: Path) -> None:
    document = yaml.safe_load((preset_dir() / "cifar26.yaml").read_text())
    document["model"]["depth"] = 34
    path = _write(tmp_path, document)
    with pytest.raises(ConfigError, match=r"model\.depth: must be one of 26, 38, 50, 101"):
        load_preset(path)


def test_depth_and_layers_together_are_refused(tmp_path: Path) -> None:
    document = _smoke_document()
    document["model"]["depth"] = 26  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"model\.depth: give either depth or layers"):
        load_preset(_write(tmp_path, document))


def test_missing_section_and_unknown_top_level_key(tmp_path: Path) -> None:
    document = _smoke_document()
    del document["data"]
    with pytest.raises(ConfigError, match=r"bad\.yaml: data: missing"):
        load_preset(_write(tmp_path, document))
    document = _smoke_document()
    document["trainer"] = {}
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):
        load_preset(_write(tmp_path, document))


def test_a_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  heads: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML at line"):
        load_preset(path)


def test_a_document_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level: expected a mapping"):
        load_preset(path)


def test_unknown_preset_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'imagenet51': choose one of"):
        load_preset("imagenet51")
    with pytest.raises(ConfigError, match=r"no/such\.yaml: no such preset file"):
        load_preset("no/such.yaml")


def test_unknown_model_kind() -> None:
    with pytest.raises(ConfigError, match="unknown model kind 'mlp'"):
        load_preset("smoke", model="mlp")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.heads=3", "--set model.heads=3: model.heads: 3 heads do not divide"),
        ("model.nope=1", "--set model.nope=1: model.nope: unknown key"),
        ("model.span=-2", "--set model.span=-2: model.span: must be at least 1"),
        ("model.depth=34", "--set model.depth=34: model.depth: give either depth or layers"),
        ("model", "--set model: expected KEY=VALUE"),
        ("model.heads=[1", "--set model.heads=[1: not valid YAML at line 1"),
        ("model.heads.x=1", "--set model.heads.x=1: model.heads is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_override(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_preset("smoke", overrides=[override])
    assert message in str(caught.value)

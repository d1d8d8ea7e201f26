"""Find, list and load presets: YAML files under ``presets/`` (or any path to such a file)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gsa_cli.config import (
    Config,
    Dataset,
    ModelKind,
    apply_overrides,
    config_from_mapping,
    override_source,
)
from gsa_cli.errors import ConfigError
from gsa_cli.yamlio import load_yaml_text as load_yaml_text  # the checkpoint's saved config is read with it
from gsa_cli.yamlio import read_yaml_file

PRESET_SUFFIXES = (".yaml", ".yml")


def preset_dir() -> Path:
    """The folder of shipped presets: ``presets/`` in a source checkout, else inside the wheel."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "presets"
    if checkout.is_dir() and (package.parent / "pyproject.toml").is_file():
        return checkout
    return package / "_presets"


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in preset_dir().iterdir() if p.suffix in PRESET_SUFFIXES)


def resolve_preset_path(name_or_path: str | Path) -> Path:
    """The file a preset name or path refers to.

    Raises:
        ConfigError: if it is neither a shipped preset nor an existing YAML file.
    """
    text = str(name_or_path)
    looks_like_path = Path(text).suffix in PRESET_SUFFIXES or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{text}: no such preset file (give a YAML file or a preset name)")
        return path
    for suffix in PRESET_SUFFIXES:
        candidate = preset_dir() / f"{text}{suffix}"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"unknown preset {text!r}: choose one of {', '.join(preset_names())} or give a path to a YAML file"
    )


def resolve_config(raw: Any, *, name: str, source: str) -> Config:
    """:func:`~gsa_cli.config.config_from_mapping`, then the checks of the data set's own module.

    Raises:
        ConfigError: naming ``source`` and the dotted key at fault.
    """
    config = config_from_mapping(raw, name=name, source=source)
    if config.data.dataset is Dataset.LONGRANGE:
        from gsa_cli.longrange import check_data

        problem = check_data(config.data)
        if problem is not None:
            key, message = problem
            raise ConfigError(f"{source}: {key}: {message}")
    return config


def load_preset(
    name_or_path: str | Path,
    *,
    model: str | ModelKind | None = "gsa",
    overrides: Iterable[str] = (),
) -> Config:
    """Load a preset by name or path and return the resolved, validated config.

    Args:
        name_or_path: A shipped preset's name (``"imagenet50"``) or a path to a YAML file.
        model: The model kind, ``"gsa"``, ``"conv"`` or ``"full"``; ``None`` keeps the file's ``model.kind``.
        overrides: ``section.key=value`` strings applied after the file, e.g. ``"model.heads=4"``.

    Raises:
        ConfigError: naming the file (or the override) and the dotted key at fault.
    """
    path = resolve_preset_path(name_or_path)
    name = path.stem
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{path}: the file name is not UTF-8: rename the preset (runs record its name)"
        ) from None
    raw = read_yaml_file(path)
    if model is not None:
        kind = _kind(model)
        if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
            # The kind asked for before the checks: a conv net may list no attention stage, for one.
            raw = apply_overrides(raw, [f"model.kind={kind}"])
    config = resolve_config(raw, name=name, source=str(path))
    for text in overrides:
        # Applied one at a time so that an error names the override that caused it.
        raw = apply_overrides(raw, [text])
        config = resolve_config(raw, name=name, source=override_source(text))
    return config


def _kind(model: str | ModelKind) -> str:
    kinds = [kind.value for kind in ModelKind]
    kind = model.value if isinstance(model, ModelKind) else model
    if kind not in kinds:
        raise ConfigError(f"unknown model kind {kind!r}: choose one of {', '.join(kinds)}")
    return kind

"""Parameter counts of the shipped presets' models: what ``gsa presets`` lists."""

from __future__ import annotations

from dataclasses import dataclass

from gsa_cli.config import ModelKind
from gsa_cli.models import count_parameters
from gsa_cli.presets import load_preset, preset_names


@dataclass(frozen=True)
class PresetSummary:
    name: str
    description: str
    dataset: str
    img_size: int
    conv_params: int
    gsa_params: int


def preset_summaries() -> list[PresetSummary]:
    """One summary per shipped preset, with the parameter counts of its conv and GSA models."""
    rows = []
    for name in preset_names():
        gsa = load_preset(name, model=ModelKind.GSA)
        conv = load_preset(name, model=ModelKind.CONV)
        rows.append(
            PresetSummary(
                name=name,
                description=gsa.description,
                dataset=gsa.data.dataset.value,
                img_size=gsa.data.img_size,
                conv_params=count_parameters(conv),
                gsa_params=count_parameters(gsa),
            )
        )
    return rows

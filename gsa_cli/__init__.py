"""gsa: train and benchmark Global Self-Attention Networks against convolutional baselines.

The Python API: :func:`load_preset` returns a resolved, validated config; :func:`build_model` builds
its network; :class:`gsa_cli.models.GlobalSelfAttention2d` is the module on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gsa_cli.config import Config
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.presets import load_preset

if TYPE_CHECKING:
    from gsa_cli.models import ResNet

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "GsaError", "build_model", "load_preset"]


def build_model(config: Config) -> ResNet:
    """Build the ``nn.Module`` a resolved config describes (see :func:`gsa_cli.models.build_model`)."""
    from gsa_cli.models import build_model as build

    return build(config)


def __getattr__(name: str) -> Any:
    # `gsa_cli.models` imports torch: load it only when asked for.
    if name == "models":
        import importlib

        return importlib.import_module("gsa_cli.models")
    raise AttributeError(f"module 'gsa_cli' has no attribute {name!r}")

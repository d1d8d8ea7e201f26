"""Models: the GSA module, the ResNet family, and ``build_model(config)``."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from gsa_cli.config import Config, ModelConfig, ModelKind
from gsa_cli.models.full import FullSelfAttention2d
from gsa_cli.models.gsa import GlobalSelfAttention2d
from gsa_cli.models.resnet import ResNet, SpatialFactory, conv3x3

__all__ = [
    "FullSelfAttention2d",
    "GlobalSelfAttention2d",
    "ResNet",
    "build_model",
    "build_resnet",
    "count_parameters",
    "spatial_factory",
]


def _gsa(model: ModelConfig, channels: int, stride: int, feature_size: int) -> nn.Module:
    module = GlobalSelfAttention2d(
        channels,
        channels,
        heads=model.heads,
        key_channels=round(channels * model.key_ratio),
        span=model.span if model.span is not None else feature_size,
        stride=stride,
        content=model.content,
        positional=model.positional,
        query_softmax=model.query_softmax,
        implementation=model.gsa_impl.value,
    )
    # A span the config sets is local on purpose: only a net built global warns when used larger.
    module.warn_beyond_span = model.span is None
    return module


def _full(model: ModelConfig, channels: int, stride: int, feature_size: int) -> nn.Module:
    del feature_size  # dense attention is global at any size
    return FullSelfAttention2d(
        channels,
        channels,
        heads=model.heads,
        key_channels=round(channels * model.key_ratio),
        stride=stride,
    )


def spatial_factory(model: ModelConfig, stage: int) -> SpatialFactory:
    """The spatial operator of a 1-based stage: in the attention stages (``model.attention_stages``) GSA
    for a ``gsa`` model and dense attention for a ``full`` one; a 3x3 conv everywhere else."""
    if stage in model.attention_stages:
        if model.kind is ModelKind.GSA:
            return partial(_gsa, model)
        if model.kind is ModelKind.FULL:
            return partial(_full, model)
    return conv3x3


def build_model(config: Config) -> ResNet:
    """Build the network a resolved config describes (its ``model.kind`` picks the family)."""
    return build_resnet(
        config.model,
        in_channels=config.data.channels,
        num_classes=config.data.num_classes,
        img_size=config.data.img_size,
    )


def build_resnet(
    model: ModelConfig,
    *,
    in_channels: int,
    num_classes: int,
    img_size: int,
    drop_rate: float = 0.0,
    global_pool: str = "avg",
) -> ResNet:
    """The network of a validated model config for the given input and classes (0: no classifier); the
    timm entry points (:mod:`gsa_cli.timm`) build through it."""
    blocks = model.stage_blocks
    return ResNet(
        blocks=blocks,
        spatial=[spatial_factory(model, stage) for stage in range(1, len(blocks) + 1)],
        width=model.width,
        stem=model.stem.value,
        in_channels=in_channels,
        num_classes=num_classes,
        img_size=img_size,
        zero_init_residual=model.zero_init_residual,
        drop_rate=drop_rate,
        global_pool=global_pool,
    )


def count_parameters(config: Config) -> int:
    """Parameters of the model ``config`` builds, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())

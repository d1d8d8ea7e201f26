"""A run's data on one rank: the data sets, this rank's share of them, and their loaders.

:func:`run_data` is the data phase of a training run (:mod:`gsa_cli.train.run`): it finds the data
(``--data``, else ``GSA_DATA``, else the data set's default), builds both splits, fingerprints them
(what a resume checks, :mod:`gsa_cli.train.integrity`), and gives each rank its share. Training batches
are full (no ragged last batch, if a full one exists) and each sample's augmentation is keyed to
(seed, epoch, index) (:mod:`gsa_cli.train.streams`); validation is sharded over the ranks.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from gsa_cli.config import Config
from gsa_cli.data import (
    DATA_ENV,
    CorruptFiles,
    ShardSampler,
    TrainSampler,
    build_datasets,
    data_root,
    held_in_memory,
    loader_workers,
    make_loader,
)
from gsa_cli.errors import ConfigError
from gsa_cli.train.distributed import World
from gsa_cli.train.integrity import DataFingerprint, fingerprint
from gsa_cli.train.options import TrainOptions
from gsa_cli.train.streams import KeyedSampler, SeededSamples


@dataclass(frozen=True)
class RunData:
    """This rank's data for a run.

    Args (fields):
        train_loader / val_loader: The loaders of this rank's shares.
        sampler: The training share's sampler (its epoch and start are set per epoch).
        loader_seeds: The generator the training loader draws its workers' seeds from, reseeded per
            epoch (see the streams module).
        corrupt: The unreadable-file policy applied to each batch.
        fingerprint: What the data is (a resume checks it).
        root: The data folder (None: a data set held in memory or generated).
    """

    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    sampler: TrainSampler
    loader_seeds: torch.Generator
    corrupt: CorruptFiles
    fingerprint: DataFingerprint
    root: Path | None


def run_data(
    config: Config, options: TrainOptions, world: World, device: torch.device, message: Callable[[str], None]
) -> RunData:
    """The data sets of ``config``, this rank's share of them, and their loaders (``message`` hears of
    skipped unreadable files).

    Raises:
        ConfigError: for a training set too small to share among the ranks.
        DataError: for data that is missing or malformed.
    """
    root = data_root(options.data or os.environ.get(DATA_ENV) or None, config.data)
    train_set, val_set = build_datasets(config, root)
    in_memory = held_in_memory(config.data)
    workers = loader_workers(options.workers, root, world_size=world.world_size, in_memory=in_memory)
    batch_size, seed = config.recipe.batch_size, config.recipe.seed
    sampler = TrainSampler(train_set, rank=world.rank, world_size=world.world_size, seed=seed)
    if sampler.num_samples < 2:
        raise ConfigError(
            f"{sampler.total_size} training images are too few to train on {world.world_size} rank(s)"
        )
    loader = functools.partial(
        make_loader, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda"
    )
    loader_seeds = torch.Generator()
    shard = ShardSampler(len(val_set), rank=world.rank, world_size=world.world_size)  # type: ignore[arg-type]
    return RunData(
        train_loader=loader(
            SeededSamples(train_set, seed),
            KeyedSampler(sampler),
            drop_last=sampler.num_samples >= batch_size,
            generator=loader_seeds,
        ),
        val_loader=loader(val_set, shard, drop_last=False),
        sampler=sampler,
        loader_seeds=loader_seeds,
        corrupt=CorruptFiles(options.on_corrupt, message),
        fingerprint=fingerprint(config.data, train_set, val_set),
        root=root,
    )

"""The random draws of training, each a pure function of the run's seed and of where the run stands.

A resumed run must draw what an uninterrupted one draws. Restoring the global generators at the stop
is not enough: torchvision's transforms and MixUp/CutMix draw from torch's global CPU generator, in
the main process or in loader workers seeded from a base seed that every ``iter(loader)`` draws from
that generator too; a resumed epoch makes its ``iter()`` at another point of the stream, its workers
start on other samples, and a change of ``--workers`` changes everything. So here each draw is keyed
instead of streamed:

- **augmentation**: a training sample's transform runs on torch's CPU generator seeded from
  ``(recipe.seed, epoch, sample index)`` (:class:`SeededSamples`, fed ``(epoch, index)`` keys by
  :class:`KeyedSampler`): the same crop whichever rank, worker or session loads it, and whatever came
  before.
- **batch mixing**: MixUp/CutMix of update ``step`` runs seeded from ``(recipe.seed, rank, step)``
  (:func:`seeded` around the loop's batch transform).
- **loader workers**: each loader has its own generator, reseeded per epoch and rank, so that no
  ``iter()`` draws from the global one and worker seeds depend on the epoch alone.

The global generators (which nothing in the loop draws from now: the models have no dropout) are still
saved and restored by the checkpoint. Each keyed draw saves, reseeds and restores the CPU generator:
a few microseconds per sample (see :func:`seeded`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from gsa_cli.data import TrainSampler

# The streams, so that two of them never share a key.
AUGMENT, MIXING, LOADER = 1, 2, 3


def stream_seed(*key: int) -> int:
    """A 63-bit seed that is a well-mixed function of ``key`` (non-negative integers)."""
    data = b"".join(part.to_bytes(16, "little", signed=True) for part in key)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on torch's CPU generator seeded with ``seed``, then put its state back: the draws
    inside are a function of ``seed``, and the stream outside does not see them."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class SeededSamples(Dataset[Any]):
    """A training set whose sample ``(epoch, index)`` is transformed under :func:`seeded` with the key
    ``(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded(stream_seed(AUGMENT, self.seed, epoch, index)):
            return self.dataset[index]


class KeyedSampler(Sampler[tuple[int, int]]):
    """The indices of a :class:`~gsa_cli.data.TrainSampler` as ``(epoch, index)`` keys."""

    def __init__(self, sampler: TrainSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

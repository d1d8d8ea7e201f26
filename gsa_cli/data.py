"""Data sets, transforms, samplers and loaders for the six data sets a preset can name.

- ``imagenet``: the ImageFolder layout ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (``ROOT`` may
  also hold it under ``imagenet/``), the same classes in both; RandomResizedCrop and flip to train,
  resize to ``img_size / 0.875`` and centre crop to evaluate. 16-bit grey images are scaled to 8 bits;
  32-bit integer and float images (modes ``I``, ``F``) are unreadable files, their range unknown.
- ``cifar100``: the ``cifar-100-python`` folder (``train``, ``test``, ``meta``), its pickles read by
  :mod:`gsa_cli.cifar`'s restricted unpickler (nothing in them runs); a crop padded by ``img_size / 8``
  (4 pixels at 32) and flip to train, a resize to evaluate when ``img_size`` is not 32.
- ``fashion-mnist``: the four IDX files (:mod:`gsa_cli.fashion`), by default from Debian's folder, held in
  memory; a crop padded by 2 pixels and flip to train.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits, split once into train and test
  (stratified, 20% test, a fixed seed), scaled to the preset's image size; padded crop, no flip.
- ``synthetic``: deterministic random images around one random prototype per class (learnable, so a
  smoke run's loss falls), for tests.
- ``longrange``: two glyphs a set distance apart on noise, labelled same shape or not
  (:mod:`gsa_cli.longrange`), generated in memory from fixed seeds; float images already centred, no
  crop or flip.

The folder of the three file-based sets comes from ``--data`` or the ``GSA_DATA`` environment variable
(:func:`data_root`); the others are generated or bundled. Every image goes through the same tail: an image
tensor, optional RandAugment (training), float (uint8 scaled to [0, 1]), normalised with the data set's
statistics. An unreadable image is reported by its path: :class:`CheckedDataset` turns it into a
:class:`BadSample`, the loaders' collate function sets it aside, and :meth:`CorruptFiles.check` (in the
main process) either fails naming the file or skips it with one warning per file.

The training sampler shards an epoch over the ranks and can start part-way into it (a resumed run sees
the samples an uninterrupted one would; :mod:`gsa_cli.train.streams` keys their augmentation to the
epoch and index, so that it sees the same crops too); the evaluation sampler shards without padding,
so that every sample counts exactly once. :func:`loader_workers` picks the loader processes per rank.
No loader's ``iter()`` draws from torch's global generator (each has its own).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from gsa_cli.choices import OnCorrupt as OnCorrupt  # re-exported: the enum lives in choices.py
from gsa_cli.cifar import CIFAR_LAYOUT, read_cifar100
from gsa_cli.config import Config, DataConfig
from gsa_cli.config import Dataset as DatasetKind
from gsa_cli.errors import ConfigError
from gsa_cli.errors import DataError as DataError  # re-exported: its old home
from gsa_cli.fashion import FASHION_LAYOUT, read_fashion_mnist
from gsa_cli.fashion import default_root as fashion_default_root
from gsa_cli.transforms import EVAL_CROP_RATIO as EVAL_CROP_RATIO  # re-exported: their old home
from gsa_cli.transforms import NATIVE_SIZE as NATIVE_SIZE
from gsa_cli.transforms import NORMALIZATION as NORMALIZATION
from gsa_cli.transforms import eval_transform as eval_transform
from gsa_cli.transforms import train_transform as train_transform

DATA_ENV = "GSA_DATA"  # the data folder when --data is not given

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
SYNTHETIC_SEED = 1234
LONGRANGE_SEEDS = (0, 1000)  # training and validation sets

IMAGENET_LAYOUT = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (ImageFolder)"


# ---------------------------------------------------------------------------------------------------
# Unreadable samples, carried through the loader to the main process.


@dataclass(frozen=True)
class BadSample:
    path: str
    reason: str


class CheckedDataset(Dataset[Any]):
    """Wraps a data set so that a sample that cannot be loaded becomes a :class:`BadSample`."""

    def __init__(self, dataset: Dataset[Any], describe: Callable[[int], str]) -> None:
        self.dataset = dataset
        self.describe = describe

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises on bad files
            return BadSample(self.describe(index), f"{type(err).__name__}: {err}")


@dataclass
class Batch:
    images: Tensor
    labels: Tensor
    bad: list[BadSample]


def collate_checked(samples: Sequence[Any]) -> Batch:
    """Stack the good samples; keep the bad ones aside (by path) for :meth:`CorruptFiles.check`."""
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    images = torch.stack([torch.as_tensor(image) for image, _ in good])
    labels = torch.tensor([int(label) for _, label in good], dtype=torch.long)
    return Batch(images, labels, bad)


class CorruptFiles:
    """Applies the ``--on-corrupt`` policy to each batch and counts what was skipped."""

    def __init__(self, policy: OnCorrupt, warn: Callable[[str], None]) -> None:
        self.policy = policy
        self.warn = warn
        self.skipped: set[str] = set()

    def check(self, batch: Batch) -> bool:
        """Return whether the batch has images to use.

        Raises:
            DataError: naming the first unreadable file, under the ``fail`` policy.
        """
        for sample in batch.bad:
            if self.policy is OnCorrupt.FAIL:
                raise DataError(
                    f"{sample.path}: cannot read the image ({sample.reason}); remove or replace the "
                    "file, or pass --on-corrupt skip to skip unreadable files"
                )
            if sample.path not in self.skipped:
                self.skipped.add(sample.path)
                self.warn(f"skipping unreadable image {sample.path} ({sample.reason})")
        return batch.images.numel() > 0


class TensorImages(Dataset[tuple[Any, int]]):
    """Images held as one uint8 tensor ``(N, C, H, W)`` with integer labels."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Any], Any]) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), int(self.labels[index])


# ---------------------------------------------------------------------------------------------------
# The data sets.


def _digits(data: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, resized to ``img_size``, as uint8 (train images, labels, test...)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if data.img_size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(data.img_size, data.img_size), mode="bilinear", align_corners=False
        )
    images = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        list(range(len(labels))),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    train_index, test_index = torch.tensor(train_idx), torch.tensor(test_idx)
    return images[train_index], labels[train_index], images[test_index], labels[test_index]


def _synthetic(data: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One random prototype per class plus noise, as uint8; the same for every call."""
    assert data.train_samples is not None  # validated
    assert data.val_samples is not None
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    shape = (data.channels, data.img_size, data.img_size)
    prototypes = torch.rand((data.num_classes, *shape), generator=generator)

    def draw(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(data.num_classes, (count,), generator=generator)
        noise = torch.randn((count, *shape), generator=generator) * 0.25
        images = (prototypes[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
        return images, labels

    train_images, train_labels = draw(data.train_samples)
    val_images, val_labels = draw(data.val_samples)
    return train_images, train_labels, val_images, val_labels


def _longrange(data: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The long-range glyph pairs, float images already centred (background noise around 0)."""
    from gsa_cli.longrange import make_longrange

    assert data.train_samples is not None  # validated
    assert data.val_samples is not None
    assert data.distance is not None
    assert data.shapes is not None
    assert data.noise is not None
    sets = []
    for count, seed in zip((data.train_samples, data.val_samples), LONGRANGE_SEEDS, strict=True):
        images, labels = make_longrange(
            count,
            img_size=data.img_size,
            distance=(data.distance[0], data.distance[1]),
            shapes=data.shapes,
            noise=data.noise,
            seed=seed,
        )
        sets += [torch.from_numpy(images), torch.from_numpy(labels)]
    return sets[0], sets[1], sets[2], sets[3]


def _imagenet_root(root: Path) -> Path:
    for candidate in (root, root / "imagenet"):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise DataError(f"{root}: no ImageNet data here; expected {IMAGENET_LAYOUT}, ROOT being this folder")


def _listed(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)
    return ", ".join(shown[:limit]) + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


def _image_folder(
    root: Path, split: str, data: DataConfig, transform: Callable[[Any], Any], *, classes: list[str] | None
) -> tuple[Dataset[Any], list[str]]:
    """``root/split`` and its classes; they must be ``classes`` (the training classes) when given."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    def load(path: str) -> Any:
        with open(path, "rb") as handle:
            image: Image.Image = Image.open(handle)
            if image.mode in ("I", "F"):  # 32-bit integers or floats: no fixed range to map to 8 bits
                raise ValueError(f"mode {image.mode}, 32-bit integer or float pixels; save it as 8-bit RGB")
            if image.mode.startswith("I;16"):  # 16-bit grey, scaled: convert("RGB") would clip at 255
                image = Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8))
            return image.convert("RGB")  # decodes fully: a truncated file fails here, inside the check

    folder = root / split
    try:
        dataset = ImageFolder(str(folder), transform=transform, loader=load)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"{folder}: {err}; expected {IMAGENET_LAYOUT}") from None
    if classes is None and len(dataset.classes) != data.num_classes:
        raise ConfigError(
            f"{folder}: {len(dataset.classes)} class folders, but the preset says "
            f"data.num_classes={data.num_classes}; fix the data or pass "
            f"--set data.num_classes={len(dataset.classes)}"
        )
    if classes is not None and dataset.classes != classes:  # a label is the class's index among them
        extra, lacks = (
            _listed(set(dataset.classes) - set(classes)),
            _listed(set(classes) - set(dataset.classes)),
        )
        if extra:
            differ = f"has classes not in {root / 'train'}: {extra}" + (
                f"; and lacks: {lacks}" if lacks else ""
            )
        else:
            differ = f"lacks classes of {root / 'train'}: {lacks}"
        raise DataError(f"{folder} {differ}; give both folders the same class folders")
    samples = dataset.samples
    return CheckedDataset(dataset, lambda index: samples[index][0]), dataset.classes


def _cifar_root(root: Path) -> Path:
    for candidate in (root, root.parent):
        if (candidate / "cifar-100-python").is_dir():
            return candidate
    raise DataError(f"{root}: no cifar-100-python folder here; expected {CIFAR_LAYOUT}")


def _cifar100(root: Path, train: bool, transform: Callable[[Any], Any]) -> Dataset[Any]:
    images, labels = read_cifar100(_cifar_root(root) / "cifar-100-python", train=train)
    return TensorImages(torch.from_numpy(images), torch.from_numpy(labels), transform)


def _fashion(root: Path, train: bool, transform: Callable[[Any], Any]) -> Dataset[Any]:
    images, labels = read_fashion_mnist(root, train=train)  # (N, 28, 28) uint8, (N,) int64
    return TensorImages(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), transform)


def data_root(path: str | Path | None, data: DataConfig) -> Path | None:
    """The folder to read ``data`` from: ``path`` (from ``--data`` or ``GSA_DATA``), checked.

    Raises:
        DataError: if the data set needs a folder and none (or a missing one) was given.
    """
    if data.dataset in (DatasetKind.DIGITS, DatasetKind.SYNTHETIC, DatasetKind.LONGRANGE):
        return None
    if data.dataset is DatasetKind.FASHION_MNIST and (path is None or str(path) == ""):
        return fashion_default_root()  # Debian's folder, or one line naming it
    layouts = {DatasetKind.IMAGENET: IMAGENET_LAYOUT, DatasetKind.FASHION_MNIST: FASHION_LAYOUT}
    layout = layouts.get(data.dataset, CIFAR_LAYOUT)
    if path is None or str(path) == "":
        raise DataError(
            f"the {data.dataset.value} data set needs a folder: pass --data ROOT or set GSA_DATA "
            f"(expected {layout})"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {path}: no such folder (expected {layout})")
    return root


def build_datasets(
    config: Config, root: Path | None, *, augment: bool = True
) -> tuple[Dataset[Any], Dataset[Any]]:
    """The training and validation sets of ``config.data``.

    Args:
        config: The resolved config (its ``data`` section, and ``recipe.randaugment``).
        root: The folder from :func:`data_root` (None for the data sets held in memory).
        augment: Apply the training augmentation to the training set (else the evaluation transform).

    Raises:
        DataError: for a missing or malformed data folder, naming the expected layout.
        ConfigError: for a preset that does not fit the data (classes, channels).
    """
    data = config.data
    train_tf = train_transform(data, randaugment=config.recipe.randaugment) if augment else None
    eval_tf = eval_transform(data)
    train_tf = train_tf or eval_tf
    if data.dataset in (DatasetKind.IMAGENET, DatasetKind.CIFAR100) and data.channels != 3:
        raise ConfigError(f"data.channels: {data.dataset.value} images have 3 channels, got {data.channels}")
    if data.dataset is DatasetKind.DIGITS:
        if data.channels != 1 or data.num_classes != 10:
            raise ConfigError(
                "data: digits are 1-channel images of 10 classes (channels: 1, num_classes: 10)"
            )
        train_x, train_y, test_x, test_y = _digits(data)
        return TensorImages(train_x, train_y, train_tf), TensorImages(test_x, test_y, eval_tf)
    if data.dataset is DatasetKind.SYNTHETIC:
        train_x, train_y, val_x, val_y = _synthetic(data)
        return TensorImages(train_x, train_y, train_tf), TensorImages(val_x, val_y, eval_tf)
    if data.dataset is DatasetKind.LONGRANGE:
        train_x, train_y, val_x, val_y = _longrange(data)
        return TensorImages(train_x, train_y, train_tf), TensorImages(val_x, val_y, eval_tf)
    assert root is not None, "data_root() gives a folder for file-based data sets"
    if data.dataset is DatasetKind.FASHION_MNIST:
        if data.channels != 1 or data.num_classes != 10:
            raise ConfigError(
                "data: Fashion-MNIST images have 1 channel, 10 classes (channels: 1, num_classes: 10)"
            )
        return _fashion(root, True, train_tf), _fashion(root, False, eval_tf)
    if data.dataset is DatasetKind.IMAGENET:
        base = _imagenet_root(root)
        train, classes = _image_folder(base, "train", data, train_tf, classes=None)
        return train, _image_folder(base, "val", data, eval_tf, classes=classes)[0]
    if data.num_classes != 100:
        raise ConfigError(f"data.num_classes: CIFAR-100 has 100 classes, got {data.num_classes}")
    return _cifar100(root, True, train_tf), _cifar100(root, False, eval_tf)


# ---------------------------------------------------------------------------------------------------
# Samplers and loaders.


class TrainSampler(DistributedSampler[Any]):
    """A DistributedSampler (also with one process) that can start part-way into an epoch.

    The order of an epoch depends only on the seed and the epoch, so a run resumed after an
    interruption sees the same samples as one that never stopped.
    """

    def __init__(self, dataset: Dataset[Any], *, rank: int, world_size: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding: a sharded evaluation
    counts each sample exactly once."""

    def __init__(self, size: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset[Any],
    sampler: Sampler[Any],
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    drop_last: bool,
    generator: torch.Generator | None = None,
) -> DataLoader[Any]:
    """A loader of :class:`Batch` es. Its ``iter()`` draws the workers' base seed from ``generator`` (a
    new one by default), never from torch's global generator."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_checked,
        persistent_workers=False,
        generator=generator if generator is not None else torch.Generator(),
    )


def held_in_memory(data: DataConfig) -> bool:
    """Whether the data set is held in memory as tensors (no image files decoded while loading)."""
    return data.dataset not in (DatasetKind.IMAGENET, DatasetKind.CIFAR100)


def loader_workers(
    requested: int | None, root: Path | None, *, world_size: int, in_memory: bool = False
) -> int:
    """Loader processes per rank: ``requested`` (``--workers``) if given, else 0 for the data sets held
    in memory (no ``root``, or ``in_memory``: Fashion-MNIST) and, for those read image by image, the cores
    shared among this machine's ranks (1 to 8).

    Raises:
        ConfigError: for a negative ``requested``.
    """
    if requested is not None:
        if requested < 0:
            raise ConfigError(f"--workers must not be negative, got {requested}")
        return requested
    if root is None or in_memory:  # digits, synthetic, longrange and fashion-mnist live in memory
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, min(8, (os.cpu_count() or 1) // local))

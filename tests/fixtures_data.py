"""Tiny data sets in the real on-disk formats, written for tests (nothing is downloaded)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(
    root: Path, *, classes: int = 3, train_per_class: int = 6, val_per_class: int = 2
) -> Path:
    """``root/train/<class>/*.jpeg`` and ``root/val/<class>/*.jpeg``: 24x20 RGB JPEGs, one colour per
    class plus noise. Returns ``root``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            base = rng.integers(0, 256, size=3)
            for index in range(count):
                pixels = np.clip(base + rng.normal(0, 20, size=(20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{index}.JPEG", quality=90)
    return root


def make_cifar100(root: Path, *, train: int = 40, test: int = 20) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: pickles laid out exactly as the real archive's
    (``data`` uint8 ``(N, 3072)`` channel-major rows, ``fine_labels``, ``coarse_labels``; ``meta`` with
    ``fine_label_names``). Returns ``root``."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, count in (("train", train), ("test", test)):
        entry = {
            "filenames": [f"img_{i}.png" for i in range(count)],
            "batch_label": f"{split} batch",
            "fine_labels": [int(x) for x in rng.integers(0, 100, size=count)],
            "coarse_labels": [int(x) for x in rng.integers(0, 20, size=count)],
            "data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        }
        with open(folder / split, "wb") as handle:
            pickle.dump(entry, handle)
    meta = {
        "fine_label_names": [f"class_{i}" for i in range(100)],
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle)
    return root

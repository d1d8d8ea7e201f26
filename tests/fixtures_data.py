"""Tiny data sets in the real on-disk formats, written for tests (nothing is downloaded)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

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


class Python2Pickler(pickle._Pickler):
    """Writes protocol 2 as Python 2's cPickle wrote the real archive: byte strings as STRING opcodes
    (``str`` again when read with ``encoding="latin1"``, the array's pixels included) and numpy's globals
    under their numpy 1 names (``numpy.core.multiarray._reconstruct``)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def write_cifar_pickle(path: Path, entry: Any, *, protocol: int | None = None) -> None:
    """Pickle ``entry`` to ``path``: as the real archive (Python 2, protocol 2) when ``protocol`` is None,
    else with this Python's pickle at ``protocol`` (a re-packed copy)."""
    with open(path, "wb") as handle:
        if protocol is None:
            Python2Pickler(handle, protocol=2).dump(entry)
        else:
            pickle.dump(entry, handle, protocol=protocol)


def cifar_entry(count: int, *, seed: int = 0, python2: bool = True) -> dict[Any, Any]:
    """One split of the archive: ``data`` uint8 ``(N, 3072)`` channel-major rows, ``fine_labels``,
    ``coarse_labels``, ``filenames``, ``batch_label``; Python 2 byte-string keys unless ``python2`` is
    False (then ``str`` keys, as a re-packed copy made with Python 3 has)."""
    rng = np.random.default_rng(seed)
    text = (lambda value: value.encode()) if python2 else (lambda value: value)
    return {
        text("filenames"): [text(f"img_{i}.png") for i in range(count)],
        text("batch_label"): text("batch"),
        text("fine_labels"): [int(x) for x in rng.integers(0, 100, size=count)],
        text("coarse_labels"): [int(x) for x in rng.integers(0, 20, size=count)],
        text("data"): rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
    }


def make_cifar100(root: Path, *, train: int = 40, test: int = 20, protocol: int | None = None) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: pickles laid out exactly as the real archive's
    (see :func:`cifar_entry`; ``meta`` with ``fine_label_names``), written as Python 2 wrote them unless
    ``protocol`` is given. Returns ``root``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    python2 = protocol is None
    for seed, (split, count) in enumerate((("train", train), ("test", test))):
        write_cifar_pickle(folder / split, cifar_entry(count, seed=seed, python2=python2), protocol=protocol)
    text: Any = (lambda value: value.encode()) if python2 else (lambda value: value)
    meta = {
        text("fine_label_names"): [text(f"class_{i}") for i in range(100)],
        text("coarse_label_names"): [text(f"super_{i}") for i in range(20)],
    }
    write_cifar_pickle(folder / "meta", meta, protocol=protocol)
    return root

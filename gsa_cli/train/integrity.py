"""What makes a checkpoint trustworthy beyond its keys: its checksum, its data, and weights that fit.

- **The checksum.** :func:`payload_digest` is the SHA-256 of a checkpoint's contents: every key but
  the checksum itself, in order, each value encoded with its type (a tensor as its dtype, shape and
  raw bytes). :mod:`gsa_cli.train.checkpoint` stores it in the file under ``sha256`` and checks it on
  every load, so that a bit flipped on a disk or in a copy is refused instead of trained on. It covers
  the values a load reads back, not the file's bytes: the zip's padding and the pickle's framing are
  not in it (a flip there either changes a value, which the digest sees, or breaks the read).
- **The data.** :class:`DataFingerprint` records what a run trained on: the data set's kind, its
  classes (their names, for image folders), the sizes of both splits, and a content hash of each split
  (the file list and the bytes of a few fixed files for image folders; the labels and a few fixed
  images for sets held in memory). A resume on other data is refused by comparing them
  (:mod:`gsa_cli.train.options`). An image rewritten in place under the same name is seen only if it
  is one of the fixed few: the hash is cheap, not complete.
- **The weights.** :func:`load_weights` loads a state dict only when its keys and shapes are the
  model's, and otherwise names the first that differ in one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gsa_cli.config import DataConfig
from gsa_cli.errors import GsaError

CHECKSUM_KEY = "sha256"
FIXED_SAMPLES = 5  # per split, spread evenly from the first to the last


# ---------------------------------------------------------------------------------------------------
# The checksum of a checkpoint's contents.


def payload_digest(payload: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of a checkpoint dict's values, every key but :data:`CHECKSUM_KEY`."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in payload.items() if key != CHECKSUM_KEY})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest``, tagged by its kind, so that no two different values feed alike."""
    if isinstance(value, Tensor):
        _feed_tensor(digest, value)
    elif isinstance(value, Mapping):  # dict and OrderedDict alike
        digest.update(f"{{{len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):  # alike too: a reader may give one for the other
        digest.update(f"[{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:  # None, bool, int, float (repr is exact, NaN included), str
        digest.update(f"{type(value).__name__}={value!r};".encode())


def _feed_tensor(digest: Any, tensor: Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"<{flat.dtype}{tuple(tensor.shape)}:".encode())
    digest.update(flat.view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------------
# The data a run trains on.


@dataclass(frozen=True)
class DataFingerprint:
    """What a run trained on, compared on resume (see the module's docstring)."""

    dataset: str  # the data set's kind, as the config names it
    num_classes: int
    class_names: tuple[str, ...] | None  # an image folder's class folders, in label order
    train_images: int
    val_images: int
    train_content: str  # SHA-256 (hex) of the split's file list or labels, and a few fixed samples
    val_content: str

    def changed(self, now: DataFingerprint, source: str) -> str | None:
        """How ``now`` (read from ``source``: ``--data ROOT``) differs from the run's data, in words (the
        first difference); None if alike."""
        if now.dataset != self.dataset:
            return f"the run trained on the {self.dataset} data set, {source} is {now.dataset}"
        if now.class_names != self.class_names and None not in (now.class_names, self.class_names):
            extra = sorted(set(now.class_names or ()) - set(self.class_names or ()))
            lacks = sorted(set(self.class_names or ()) - set(now.class_names or ()))
            what = "; ".join(
                f"{label} {_listed(names)}"
                for label, names in (("classes the run did not have:", extra), ("lacks:", lacks))
                if names
            )
            return f"{source} has other classes than the run: {what or 'the same names in another order'}"
        if now.num_classes != self.num_classes:
            return f"the run trained on {self.num_classes} classes, {source} has {now.num_classes}"
        if now.train_images != self.train_images:
            return f"the run trained on {self.train_images} training images, {source} has {now.train_images}"
        if now.val_images != self.val_images:
            return f"the run validated on {self.val_images} images, {source} has {now.val_images}"
        for split, before, after in (
            ("training", self.train_content, now.train_content),
            ("validation", self.val_content, now.val_content),
        ):
            if before != after:
                return f"the {split} images of {source} differ from the run's (other files or contents)"
        return None


def fingerprint(data: DataConfig, train_set: Dataset[Any], val_set: Dataset[Any]) -> DataFingerprint:
    """The fingerprint of a run's data sets, as :func:`gsa_cli.data.build_datasets` built them."""
    class_names, train_content = _content(train_set)
    _, val_content = _content(val_set)
    return DataFingerprint(
        dataset=data.dataset.value,
        num_classes=data.num_classes,
        class_names=class_names,
        train_images=len(train_set),  # type: ignore[arg-type]
        val_images=len(val_set),  # type: ignore[arg-type]
        train_content=train_content,
        val_content=val_content,
    )


def _content(dataset: Dataset[Any]) -> tuple[tuple[str, ...] | None, str]:
    """An image folder's class names and the hash of its file list and a few files' bytes; or, for
    images held in memory, no names and the hash of the labels and a few images."""
    digest = hashlib.sha256()
    folder: Any = getattr(dataset, "dataset", dataset)  # an ImageFolder inside its CheckedDataset
    samples: Sequence[tuple[str, int]] | None = getattr(folder, "samples", None)
    if samples is not None:
        root = str(folder.root).rstrip("/") + "/"
        listing = "\n".join(f"{path.removeprefix(root)}\0{label}" for path, label in samples)
        digest.update(listing.encode("utf-8", "surrogateescape"))
        for index in _fixed(len(samples)):
            try:
                digest.update(Path(samples[index][0]).read_bytes())
            except OSError as err:  # training names an unreadable file; here it only counts as one
                digest.update(f"unreadable: {type(err).__name__}".encode())
        return tuple(folder.classes), digest.hexdigest()
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        digest.update(f"{images.dtype}{tuple(images.shape)}".encode())
        _feed_tensor(digest, labels)
        for index in _fixed(len(labels)):
            _feed_tensor(digest, images[index])
    else:  # a kind of data set this module does not know: only its name counts
        digest.update(type(dataset).__name__.encode())
    return None, digest.hexdigest()


def _fixed(count: int) -> list[int]:
    """The indices of the fixed samples: evenly spread, the first and the last included."""
    if count <= 0:
        return []
    return sorted({round(i * (count - 1) / (FIXED_SAMPLES - 1)) for i in range(FIXED_SAMPLES)})


def _listed(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------
# Weights that fit the model.


def load_weights(module: nn.Module, state: Mapping[str, Tensor], path: Path, key: str) -> None:
    """Load ``state`` (the checkpoint's ``key``: ``model`` or ``ema``) into ``module``, strictly.

    Raises:
        GsaError: naming ``path`` and the first keys that are missing, unexpected or of another shape
            (a checkpoint of another model or preset, or a config changed since it was saved).
    """
    expected = module.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    shapes = [
        f"{name} {list(state[name].shape)} (the model's {list(tensor.shape)})"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    problems = [
        f"{label} {_listed(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("other shape:", shapes))
        if names
    ]
    if problems:
        raise GsaError(
            f"{path}: its {key} weights do not fit the model its saved config builds: "
            f"{'; '.join(problems)}; it is a checkpoint of another model, or its config was changed"
        )
    module.load_state_dict(state)


def load_state(part: Any, state: Any, path: Path, key: str) -> None:
    """Load a checkpoint's ``key`` state (``optimizer``, ``scheduler``, ``scaler``) into ``part``.

    Raises:
        GsaError: naming ``path`` and ``key`` when the state does not fit (torch's own message kept):
            parameter groups of another size, as when the model or the recipe changed since the save.
    """
    try:
        part.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise GsaError(
            f"{path}: its {key} state does not fit this run's {key} ({reason}); it is a checkpoint of "
            "another model or recipe, or its config was changed"
        ) from err

"""The images' transforms: training augmentation and evaluation, per data set (:func:`train_transform`,
:func:`eval_transform`), and their fast form for the data sets held in memory as uint8 tensors.

torchvision's v2 pipeline (``ToImage``, ``RandomCrop`` with padding, ``RandomHorizontalFlip``,
``ToDtype(scale=True)``, ``Normalize``) costs about 180 microseconds per 28 px image on the 2-core CPU,
most of it the pipeline's own machinery (wrapping, flattening, checks, kernel look-ups) rather than the
arithmetic: 11 s of each Fashion-MNIST epoch. :class:`TensorTransform` does the same on a uint8
``(C, H, W)`` tensor with plain tensor operations: the same random draws from torch's CPU generator, in
the same order (the crop's top, then its left, then the flip), and the same arithmetic, so the same
tensor bit for bit (tested against the v2 pipeline). Any other input (a PIL image, another dtype or
size) goes to the v2 pipeline it stands for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from gsa_cli.config import DataConfig
from gsa_cli.config import Dataset as DatasetKind

# Per-channel mean and std of each data set's training images, in [0, 1].
NORMALIZATION: dict[DatasetKind, tuple[tuple[float, ...], tuple[float, ...]]] = {
    DatasetKind.IMAGENET: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    DatasetKind.CIFAR100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DatasetKind.DIGITS: ((0.305,), (0.376,)),
    DatasetKind.FASHION_MNIST: ((0.2860,), (0.3530,)),  # of the 60,000 training images
    DatasetKind.SYNTHETIC: ((0.5,), (0.25,)),
    DatasetKind.LONGRANGE: ((0.0,), (1.0,)),  # generated as floats around 0 already
}
NATIVE_SIZE = {DatasetKind.CIFAR100: 32, DatasetKind.FASHION_MNIST: 28}  # resized to evaluate at others
EVAL_CROP_RATIO = 0.875  # ImageNet: resize to img_size / 0.875, then centre-crop img_size


def _normalize(kind: DatasetKind) -> list[Any]:
    mean, std = NORMALIZATION[kind]
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(data: DataConfig, *, randaugment: bool) -> Callable[[Any], Any]:
    """Augmentation for training images of ``data.img_size``; for uint8 tensors already at that size
    (the data sets held in memory), the same as a :class:`TensorTransform`."""
    size, crop, flip = data.img_size, 0, False
    steps: list[Any] = [v2.ToImage()]
    if data.dataset is DatasetKind.IMAGENET:
        steps += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif data.dataset is DatasetKind.CIFAR100:
        crop, flip = size // 8, True
    elif data.dataset is DatasetKind.DIGITS:
        crop = max(1, size // 8)  # no flip: digits are not symmetric
    elif data.dataset is DatasetKind.FASHION_MNIST:
        steps += [v2.Resize(size, antialias=True)] if size != NATIVE_SIZE[data.dataset] else []
        crop, flip = 2, True
    steps += [v2.RandomCrop(size, padding=crop)] if crop else []
    steps += [v2.RandomHorizontalFlip()] if flip else []
    if randaugment:
        steps.append(v2.RandAugment())
    general = v2.Compose(steps + _normalize(data.dataset))
    if randaugment or data.dataset is DatasetKind.IMAGENET:
        return general
    return TensorTransform(size, padding=crop, flip=flip, **_statistics(data.dataset), general=general)


def eval_transform(data: DataConfig) -> Callable[[Any], Any]:
    """The deterministic transform for validation images (fast for uint8 tensors at ``data.img_size``)."""
    steps: list[Any] = [v2.ToImage()]
    if data.dataset is DatasetKind.IMAGENET:
        resize = math.floor(data.img_size / EVAL_CROP_RATIO)
        steps += [v2.Resize(resize, antialias=True), v2.CenterCrop(data.img_size)]
        return v2.Compose(steps + _normalize(data.dataset))
    if data.img_size != NATIVE_SIZE.get(data.dataset, data.img_size):  # stored at another size
        steps += [v2.Resize(data.img_size, antialias=True)]
    general = v2.Compose(steps + _normalize(data.dataset))
    return TensorTransform(data.img_size, padding=0, flip=False, **_statistics(data.dataset), general=general)


def _statistics(kind: DatasetKind) -> dict[str, tuple[float, ...]]:
    mean, std = NORMALIZATION[kind]
    return {"mean": mean, "std": std}


class TensorTransform:
    """``[RandomCrop(size, padding)] [RandomHorizontalFlip()] ToDtype(float32, scale=True) Normalize``
    for uint8 ``(C, size, size)`` tensors.

    Args:
        size: The images' height and width, before and after the crop.
        padding: Zeros added on every side before a random ``size`` crop; 0 for no crop.
        flip: Flip horizontally with probability 1/2.
        mean: Per-channel means of ``Normalize``.
        std: Per-channel standard deviations of ``Normalize``.
        general: The v2 pipeline this stands for, run on any other input.
    """

    def __init__(
        self,
        size: int,
        *,
        padding: int,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        general: Callable[[Any], Any],
    ) -> None:
        self.size = size
        self.padding = padding
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.general = general

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, padding={self.padding}, flip={self.flip}, "
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
        )

    def __call__(self, image: Any) -> Any:
        if not (
            type(image) is Tensor  # a tv_tensor or a PIL image goes the v2 way, as it would have
            and image.dtype == torch.uint8
            and image.dim() == 3
            and image.shape[1:] == (self.size, self.size)
            and self.mean.numel() in (1, image.shape[0])  # per channel, or one for all (broadcast)
        ):
            return self.general(image)
        if self.padding:
            # RandomCrop's draws: the top, then the left, each over the padded image's extra rows.
            top = int(torch.randint(0, 2 * self.padding + 1, size=()))
            left = int(torch.randint(0, 2 * self.padding + 1, size=()))
            padded = F.pad(image, (self.padding,) * 4)
            image = padded[:, top : top + self.size, left : left + self.size]
        if self.flip and not bool(torch.rand(1) >= 0.5):  # RandomHorizontalFlip's draw: flip below p
            image = image.flip(-1)
        scaled = image.to(torch.float32).mul_(1.0 / 255)  # ToDtype(float32, scale=True)
        return scaled.sub_(self.mean).div_(self.std)  # Normalize

"""The images' transforms: the fast form for in-memory uint8 tensors gives, bit for bit, what torchvision's
v2 pipeline gives from the same generator state (crops, flips and normalisation alike), and every other
input goes the v2 way."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from gsa_cli import load_preset
from gsa_cli.data import build_datasets
from gsa_cli.transforms import TensorTransform, eval_transform, train_transform

IN_MEMORY = ["digits", "fashion", "cifar26", "smoke"]


def _images(preset: str, count: int) -> torch.Tensor:
    data = load_preset(preset).data
    generator = torch.Generator().manual_seed(0)
    shape = (count, data.channels, data.img_size, data.img_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("preset", IN_MEMORY)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_the_fast_form_equals_the_v2_pipeline_bit_for_bit(preset: str, split: str) -> None:
    data = load_preset(preset).data
    transform = train_transform(data, randaugment=False) if split == "train" else eval_transform(data)
    assert isinstance(transform, TensorTransform)
    images = _images(preset, 64)
    torch.manual_seed(5)
    fast = [transform(image) for image in images]
    after_fast = torch.rand(1)
    torch.manual_seed(5)
    slow = [transform.general(image) for image in images]
    assert torch.equal(torch.rand(1), after_fast)  # the same number of draws
    for mine, theirs in zip(fast, slow, strict=True):
        assert type(mine) is torch.Tensor
        assert mine.dtype == theirs.dtype == torch.float32
        assert torch.equal(mine, theirs.as_subclass(torch.Tensor))
    if split == "train" and preset != "smoke":  # smoke has no augmentation; the others moved images
        plain = eval_transform(data)
        assert any(not torch.equal(mine, plain(image)) for mine, image in zip(fast, images, strict=True))


def test_other_inputs_go_the_v2_way() -> None:
    data = load_preset("fashion").data
    transform = train_transform(data, randaugment=False)
    assert isinstance(transform, TensorTransform)
    image = _images("fashion", 1)[0]
    torch.manual_seed(1)
    from_pil = transform(Image.fromarray(image[0].numpy()))
    torch.manual_seed(1)
    assert torch.equal(from_pil, transform(image))  # a PIL image: v2, the same result
    larger = torch.cat([image, image], dim=2)  # 56 x 28
    torch.manual_seed(2)
    out = transform(larger)
    torch.manual_seed(2)
    assert torch.equal(out, transform.general(larger))  # another size: v2 (a 28 px crop of the padded one)
    assert out.shape == (1, 28, 28)
    floats = image.float() / 255
    assert torch.equal(eval_transform(data)(floats), eval_transform(data).general(floats))  # other dtype


def test_randaugment_and_imagenet_keep_the_v2_pipeline() -> None:
    assert isinstance(train_transform(load_preset("fashion").data, randaugment=True), v2.Compose)
    imagenet = load_preset("imagenet50").data
    assert isinstance(train_transform(imagenet, randaugment=False), v2.Compose)
    assert isinstance(eval_transform(imagenet), v2.Compose)


def test_the_data_sets_use_the_fast_form() -> None:
    train, test = build_datasets(load_preset("digits"), None)
    assert isinstance(train.transform, TensorTransform)  # type: ignore[attr-defined]
    assert isinstance(test.transform, TensorTransform)  # type: ignore[attr-defined]
    image, _ = train[0]
    assert image.shape == (1, 16, 16)
    assert image.dtype == torch.float32

"""Data files are read, never run: CIFAR pickles through a restricted unpickler, checked labels; image
folders whose classes disagree, and 16-bit or float images, are not silently misread."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from fixtures_data import cifar_entry, make_cifar100, make_image_folder, write_cifar_pickle
from PIL import Image
from torchvision.datasets import CIFAR100
from typer.testing import CliRunner

from gsa_cli import load_preset
from gsa_cli.cli.app import app
from gsa_cli.data import (
    CorruptFiles,
    DataError,
    OnCorrupt,
    ShardSampler,
    build_datasets,
    eval_transform,
    make_loader,
    train_transform,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def esc(path: Path) -> str:
    return re.escape(str(path))


def cifar_config() -> Any:
    return load_preset("smoke", overrides=["data.dataset=cifar100", "data.num_classes=100"])


def imagenet_config(classes: int = 3) -> Any:
    return load_preset("smoke", overrides=["data.dataset=imagenet", f"data.num_classes={classes}"])


# ---------------------------------------------------------------------------------------------------
# CIFAR-100: the restricted unpickler.


class System:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> Any:
        return (os.system, (self.command,))


class Exec:
    """Unpickles as ``exec(source)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> Any:
        return (exec, (self.source,))


def plant(root: Path, split: str, payload: Any) -> Path:
    """Rewrite ``split`` of the fixture as a valid-looking file that also holds ``payload``."""
    path = root / "cifar-100-python" / split
    if split == "meta":
        entry: dict[Any, Any] = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)]}
    else:
        entry = cifar_entry(8)
    entry[b"coarse_labels"] = payload
    write_cifar_pickle(path, entry)
    return path


@pytest.mark.parametrize("split", ["train", "test", "meta"])
@pytest.mark.parametrize("kind", ["system", "exec"])
def test_a_planted_payload_is_refused_naming_the_file_and_never_runs(
    tmp_path: Path, split: str, kind: str
) -> None:
    root = make_cifar100(tmp_path / "data")
    marker = tmp_path / "ran"
    payload = System(f"touch {marker}") if kind == "system" else Exec(f"open({str(marker)!r}, 'w')")
    path = plant(root, split, payload)
    refused = rf"^{esc(path)}: refused: .*(posix\.system|builtins\.exec)"
    with pytest.raises(DataError, match=refused) as caught:
        build_datasets(cifar_config(), root)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_a_planted_payload_stops_gsa_train_with_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path / "data")
    marker = tmp_path / "ran"
    path = plant(root, "train", System(f"touch {marker}"))
    result = CliRunner().invoke(
        app,
        ["train", "--preset", "smoke", "--set", "data.dataset=cifar100", "--set", "data.num_classes=100",
         "--data", str(root), "--out", str(tmp_path / "run"), "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: refused:"), result.output
    assert not marker.exists()


class UncheckedCIFAR100(CIFAR100):  # type: ignore[misc]
    """torchvision's reader without the MD5 sums of the official archive."""

    train_list: ClassVar[list[list[str | None]]] = [["train", None]]
    test_list: ClassVar[list[list[str | None]]] = [["test", None]]
    meta: ClassVar[dict[str, str | None]] = {"filename": "meta", "key": "fine_label_names", "md5": None}


@pytest.mark.parametrize("protocol", [None, 4, 5], ids=["python2", "p4", "p5"])
def test_genuine_files_read_as_torchvision_reads_them(tmp_path: Path, protocol: int | None) -> None:
    # The archive as Python 2 wrote it, and re-packed copies written by this Python, load; the samples
    # are those torchvision's CIFAR100 (which unpickles anything: fine for this trusted fixture) gives.
    root = make_cifar100(tmp_path, train=12, test=6, protocol=protocol)
    config = cifar_config()
    train, test = build_datasets(config, root, augment=False)
    for ours, split in ((train, True), (test, False)):
        reference = UncheckedCIFAR100(str(root), train=split, transform=eval_transform(config.data))
        assert len(ours) == len(reference)
        for index in range(len(ours)):
            image, label = ours[index]
            expected, expected_label = reference[index]
            assert torch.equal(image, expected)
            assert label == expected_label
    # The training augmentation draws the same random numbers from the same images.
    augment = train_transform(config.data, randaugment=config.recipe.randaugment)
    reference = UncheckedCIFAR100(str(root), train=True, transform=augment)
    augmented, _ = build_datasets(config, root)
    torch.manual_seed(7)
    ours_sample = augmented[3][0]
    torch.manual_seed(7)
    assert torch.equal(ours_sample, reference[3][0])


@pytest.mark.parametrize("label", [100, -1, 1000])
def test_an_out_of_range_label_is_refused_at_load_naming_the_file(tmp_path: Path, label: int) -> None:
    root = make_cifar100(tmp_path)
    path = root / "cifar-100-python" / "test"
    entry = cifar_entry(20)
    entry[b"fine_labels"][5] = label
    write_cifar_pickle(path, entry)
    with pytest.raises(DataError, match=rf"^{esc(path)}: fine_labels\[5\] is {label}, outside 0 to 99"):
        build_datasets(cifar_config(), root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop(b"fine_labels"), r"not a CIFAR-100 python pickle \(no fine_labels\)"),
        (
            lambda e: e.update({b"fine_labels": e[b"fine_labels"][:-1]}),
            r"fine_labels are not integers, one per image \(19 for 20\)",
        ),
        (lambda e: e.update({b"fine_labels": ["a"] * 20}), r"fine_labels are not integers"),
        (
            lambda e: e.update({b"data": e[b"data"][:, :100]}),
            r"data is not a uint8 array of shape \(N, 3072\)",
        ),
        (lambda e: e.update({b"data": e[b"data"].astype(np.int64)}), r"data is not a uint8 array"),
        (
            lambda e: e.clear() or e.update({b"data": [1, 2]}),
            r"not a CIFAR-100 python pickle \(no fine_labels\)",
        ),
    ],
)
def test_a_malformed_split_is_refused_naming_the_file(tmp_path: Path, change: Any, message: str) -> None:
    root = make_cifar100(tmp_path)
    path = root / "cifar-100-python" / "test"
    entry = cifar_entry(20)
    change(entry)
    write_cifar_pickle(path, entry)
    with pytest.raises(DataError, match=rf"^{esc(path)}: ({message})"):
        build_datasets(cifar_config(), root)


def test_a_file_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path)
    path = root / "cifar-100-python" / "meta"
    write_cifar_pickle(path, [1, 2, 3])
    with pytest.raises(DataError, match=rf"^{esc(path)}: not a CIFAR-100 python pickle"):
        build_datasets(cifar_config(), root)


# ---------------------------------------------------------------------------------------------------
# Image folders: the validation classes are the training classes.


def test_validation_classes_that_differ_from_the_training_classes_are_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    (root / "val" / "n00000002").rename(root / "val" / "zebra")
    with pytest.raises(
        DataError,
        match=rf"^{esc(root / 'val')} has classes not in {esc(root / 'train')}: zebra; and lacks: n00000002",
    ):
        build_datasets(imagenet_config(), root)


def test_validation_lacking_a_class_is_refused_naming_it(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    for image in (root / "val" / "n00000001").iterdir():
        image.unlink()
    (root / "val" / "n00000001").rmdir()
    lacks = rf"^{esc(root / 'val')} lacks classes of {esc(root / 'train')}: n00000001;"
    with pytest.raises(DataError, match=lacks):
        build_datasets(imagenet_config(), root)


def test_an_extra_validation_class_is_refused_naming_it(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    (root / "val" / "n00000009").mkdir()
    (root / "val" / "n00000000" / "img_0.JPEG").rename(root / "val" / "n00000009" / "img_0.JPEG")
    with pytest.raises(
        DataError,
        match=rf"^{esc(root / 'val')} has classes not in {esc(root / 'train')}: n00000009; give",
    ):
        build_datasets(imagenet_config(), root)


def test_many_differing_classes_are_counted_not_all_listed(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    for index in range(8):
        (root / "val" / f"extra{index}").mkdir()
        image = (root / "val" / "n00000000" / "img_0.JPEG").read_bytes()
        (root / "val" / f"extra{index}" / "img.JPEG").write_bytes(image)
    with pytest.raises(
        DataError, match=r"not in .*: extra0, extra1, extra2, extra3, extra4 and 3 more; give"
    ):
        build_datasets(imagenet_config(), root)


# ---------------------------------------------------------------------------------------------------
# 16-bit and float images.


def replace_with(path: Path, image: Image.Image, suffix: str) -> Path:
    path.unlink()
    target = path.with_suffix(suffix)
    image.save(target)
    return target


def test_a_16_bit_grey_png_is_scaled_to_8_bits_not_saturated(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    folder = root / "val" / "n00000000"
    grey16 = Image.fromarray(np.full((20, 24), 128 * 257, dtype=np.uint16))  # 128/255 of full scale
    wide = replace_with(folder / "img_0.JPEG", grey16, ".png")
    assert Image.open(wide).mode == "I;16"
    replace_with(folder / "img_1.JPEG", Image.fromarray(np.full((20, 24), 128, dtype=np.uint8)), ".png")
    _, val = build_datasets(imagenet_config(), root)
    paths = [path for path, _ in val.dataset.samples]
    image16, _ = val[paths.index(str(wide))]
    image8, _ = val[paths.index(str(folder / "img_1.png"))]
    assert torch.equal(image16, image8)


@pytest.mark.parametrize(
    ("mode", "pixels"),
    [("F", np.linspace(0, 1, 480, dtype=np.float32)), ("I", np.arange(480, dtype=np.int32) * 1000)],
)
def test_float_and_32_bit_images_are_refused_naming_the_file_and_mode_or_skipped(
    tmp_path: Path, mode: str, pixels: Any
) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    image = Image.fromarray(pixels.reshape(20, 24))
    assert image.mode == mode
    bad = replace_with(root / "val" / "n00000001" / "img_0.JPEG", image, ".tiff")
    _, val = build_datasets(imagenet_config(), root)

    def loader() -> Any:
        sampler = ShardSampler(len(val), rank=0, world_size=1)
        return make_loader(val, sampler, batch_size=4, workers=0, pin_memory=False, drop_last=False)

    fail = CorruptFiles(OnCorrupt.FAIL, warn=lambda text: None)
    with pytest.raises(DataError, match=rf"^{esc(bad)}: cannot read the image .*mode {mode}\b"):
        [fail.check(batch) for batch in loader()]
    warnings: list[str] = []
    skip = CorruptFiles(OnCorrupt.SKIP, warn=warnings.append)
    assert sum(len(batch.labels) for batch in loader() if skip.check(batch)) == 5
    assert skip.skipped == {str(bad)}
    assert len(warnings) == 1

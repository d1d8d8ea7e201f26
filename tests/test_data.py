"""Data sets, transforms, samplers and the unreadable-file policy, on fixtures in real formats."""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import pytest
import torch
from fixtures_data import make_cifar100, make_image_folder

from gsa_cli import load_preset
from gsa_cli.data import (
    CorruptFiles,
    DataError,
    OnCorrupt,
    ShardSampler,
    TrainSampler,
    build_datasets,
    data_root,
    loader_workers,
    make_loader,
)
from gsa_cli.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # stable and fast on a shared 2-core machine


def imagenet_config(classes: int = 3):
    return load_preset("smoke", overrides=["data.dataset=imagenet", f"data.num_classes={classes}"])


def cifar_config():
    return load_preset("smoke", overrides=["data.dataset=cifar100", "data.num_classes=100"])


def test_digits_split_is_deterministic_disjoint_and_stratified() -> None:
    config = load_preset("digits")
    train, test = build_datasets(config, None, augment=False)
    again, test_again = build_datasets(config, None, augment=False)
    assert (len(train), len(test)) == (1437, 360)  # 1797 images, 20% held out
    assert torch.equal(train.images, again.images)
    assert torch.equal(test.labels, test_again.labels)
    # Disjoint: no test image appears among the training images.
    train_rows = {bytes(image.numpy()) for image in train.images}
    assert not any(bytes(image.numpy()) in train_rows for image in test.images)
    # Stratified: each digit's share of the test set is 20% of its images, rounded either way.
    totals = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    shares = torch.bincount(test.labels, minlength=10)
    assert ((shares - totals * 0.2).abs() <= 1).all(), (shares.tolist(), totals.tolist())
    image, label = test[0]
    assert image.shape == (1, 16, 16)
    assert image.dtype == torch.float32
    assert 0 <= label < 10


def test_synthetic_data_is_the_same_every_time_and_sized_by_the_preset() -> None:
    config = load_preset("smoke")
    train, val = build_datasets(config, None)
    train2, _ = build_datasets(config, None)
    assert (len(train), len(val)) == (64, 32)
    assert torch.equal(train.images, train2.images)
    assert torch.equal(train.labels, train2.labels)


def test_image_folder_fixture_loads_with_the_eval_transform(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    train, val = build_datasets(imagenet_config(), root)
    assert (len(train), len(val)) == (18, 6)
    image, label = val[5]
    assert image.shape == (3, 16, 16)
    assert label == 2
    image, _ = train[0]
    assert image.shape == (3, 16, 16)


def test_image_folder_under_an_imagenet_subfolder_is_found(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imagenet")
    train, _ = build_datasets(imagenet_config(), tmp_path)
    assert len(train) == 18


def test_cifar100_fixture_loads_as_torchvision_reads_it(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path)
    train, test = build_datasets(cifar_config(), root)
    assert (len(train), len(test)) == (40, 20)
    image, label = test[0]
    assert image.shape == (3, 16, 16)
    assert 0 <= label < 100
    # The folder itself works as the root, too.
    train, _ = build_datasets(cifar_config(), root / "cifar-100-python")
    assert len(train) == 40


def test_missing_data_folder_names_the_expected_layout(tmp_path: Path) -> None:
    config = cifar_config()
    with pytest.raises(DataError, match="pass --data ROOT or set GSA_DATA"):
        data_root(None, config.data)
    with pytest.raises(DataError, match=r"no such folder .*cifar-100-python"):
        data_root(tmp_path / "nowhere", config.data)
    with pytest.raises(DataError, match=r"no cifar-100-python folder here; expected ROOT/cifar-100-python"):
        build_datasets(config, tmp_path)
    with pytest.raises(DataError, match=r"no ImageNet data here; expected ROOT/train/<class>"):
        build_datasets(imagenet_config(), tmp_path)


def test_malformed_cifar_file_is_named(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path)
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=r"cifar-100-python/test: not a CIFAR-100 python pickle"):
        build_datasets(cifar_config(), root)
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"missing meta"):
        build_datasets(cifar_config(), root)


def test_class_count_that_does_not_match_the_preset_is_a_config_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet", classes=2)
    with pytest.raises(
        ConfigError, match=r"2 class folders, .* data.num_classes=3.*--set data.num_classes=2"
    ):
        build_datasets(imagenet_config(3), root)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_fails_with_its_path_even_from_a_worker(tmp_path: Path, workers: int) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    bad = root / "val" / "n00000001" / "img_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    _, val = build_datasets(imagenet_config(), root)
    loader = make_loader(
        val, ShardSampler(len(val), rank=0, world_size=1), batch_size=4, workers=workers,
        pin_memory=False, drop_last=False,
    )  # fmt: skip
    policy = CorruptFiles(OnCorrupt.FAIL, warn=lambda text: None)
    with pytest.raises(DataError, match=rf"{bad}: cannot read the image .*--on-corrupt skip"):
        [policy.check(batch) for batch in loader]


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    bad = root / "val" / "n00000000" / "img_1.JPEG"
    bad.write_bytes(b"\x00" * 100)
    _, val = build_datasets(imagenet_config(), root)
    loader = make_loader(
        val, ShardSampler(len(val), rank=0, world_size=1), batch_size=4, workers=0,
        pin_memory=False, drop_last=False,
    )  # fmt: skip
    warnings: list[str] = []
    policy = CorruptFiles(OnCorrupt.SKIP, warn=warnings.append)
    images = sum(len(batch.labels) for batch in loader if policy.check(batch))
    assert images == 5
    assert policy.skipped == {str(bad)}
    assert len(warnings) == 1
    assert str(bad) in warnings[0]


def test_train_sampler_resumes_part_way_through_the_same_epoch_order() -> None:
    dataset = list(range(20))
    sampler = TrainSampler(dataset, rank=0, world_size=1, seed=3)  # type: ignore[arg-type]
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == dataset
    assert order != dataset
    sampler.start = 8
    assert list(sampler) == order[8:]
    assert len(sampler) == 12
    sampler.start = 0
    sampler.set_epoch(3)
    assert list(sampler) != order  # a new order each epoch


def test_shard_sampler_counts_every_sample_once() -> None:
    shards = [list(ShardSampler(10, rank=rank, world_size=3)) for rank in range(3)]
    assert sorted(functools.reduce(operator.iadd, shards, [])) == list(range(10))


def test_loader_workers_none_in_memory_and_the_cores_shared_by_a_machines_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert loader_workers(3, None, world_size=1) == 3  # asked for: as asked
    assert loader_workers(None, None, world_size=1) == 0  # an in-memory data set
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None, tmp_path, world_size=1) == 8  # at most 8
    assert loader_workers(None, tmp_path, world_size=4) == 4  # 16 cores over 4 ranks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # torchrun's ranks on this machine
    assert loader_workers(None, tmp_path, world_size=64) == 1  # at least 1
    with pytest.raises(ConfigError, match="--workers must not be negative, got -1"):
        loader_workers(-1, None, world_size=1)

"""Fashion-MNIST's IDX files: found in each layout, read as torchvision reads them, and every damaged
file refused in one line that names it. Fixtures are tiny IDX files written here, never the real ones."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets.mnist import read_image_file, read_label_file

from gsa_cli import fashion
from gsa_cli.fashion import (
    CLASS_NAMES,
    DataError,
    default_root,
    fashion_folder,
    read_fashion_mnist,
)

IMAGES, LABELS = 2051, 2049  # the IDX magic numbers, written out here as the format defines them


def write_idx(
    path: Path, values: np.ndarray, *, magic: int, gz: bool, shape: tuple[int, ...] | None = None
) -> Path:
    """An IDX file: the big-endian magic, one big-endian 32-bit size per dimension (``shape``, by default
    the array's), then the bytes; gzipped if ``gz`` (``.gz`` appended to the name)."""
    sizes = values.shape if shape is None else shape
    payload = struct.pack(f">I{len(sizes)}I", magic, *sizes) + values.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_fashion(
    folder: Path, *, gz: bool, train: int = 12, test: int = 5, seed: int = 0
) -> dict[str, np.ndarray]:
    """The four files in ``folder``: random 28x28 images and labels 0 to 9 (each class in training).
    Returns the arrays written, by file stem."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, magic=IMAGES, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, magic=LABELS, gz=gz)
        written[f"{prefix}-images-idx3-ubyte"], written[f"{prefix}-labels-idx1-ubyte"] = images, labels
    return written


def _refused(root: Path, *, train: bool = True) -> str:
    with pytest.raises(DataError) as caught:
        read_fashion_mnist(root, train=train)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------
# Reading.


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_both_splits_read_back_what_was_written_as_torchvision_reads_it(tmp_path: Path, gz: bool) -> None:
    written = make_fashion(tmp_path, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = read_fashion_mnist(tmp_path, train=train)
        assert images.dtype == np.uint8
        assert labels.dtype == np.int64
        assert images.shape == (12 if train else 5, 28, 28)
        np.testing.assert_array_equal(images, written[f"{prefix}-images-idx3-ubyte"])
        np.testing.assert_array_equal(labels, written[f"{prefix}-labels-idx1-ubyte"])
        images[0, 0, 0] = 1  # writable: torch.from_numpy would warn on a read-only buffer
    if not gz:  # torchvision's reader, an independent parser of the same format
        np.testing.assert_array_equal(
            read_fashion_mnist(tmp_path, train=True)[0],
            read_image_file(str(tmp_path / "train-images-idx3-ubyte")).numpy(),
        )
        np.testing.assert_array_equal(
            read_fashion_mnist(tmp_path, train=False)[1],
            read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")).numpy(),
        )


def test_gzipped_and_raw_files_read_equal(tmp_path: Path) -> None:
    make_fashion(tmp_path / "gz", gz=True)
    make_fashion(tmp_path / "raw", gz=False)
    for train in (True, False):
        for got, expected in zip(
            read_fashion_mnist(tmp_path / "gz", train=train),
            read_fashion_mnist(tmp_path / "raw", train=train),
            strict=True,
        ):
            np.testing.assert_array_equal(got, expected)


def test_compression_is_told_by_content_not_name(tmp_path: Path) -> None:
    written = make_fashion(tmp_path, gz=False)
    name = "train-images-idx3-ubyte"
    (tmp_path / name).rename(tmp_path / f"{name}.gz")  # an uncompressed file named .gz
    np.testing.assert_array_equal(read_fashion_mnist(tmp_path, train=True)[0], written[name])


@pytest.mark.parametrize("sub", [".", "fashion-mnist", "FashionMNIST/raw"])
def test_each_layout_is_found_from_the_root(tmp_path: Path, sub: str) -> None:
    folder = tmp_path / sub
    written = make_fashion(folder, gz=sub != "FashionMNIST/raw")
    assert fashion_folder(tmp_path) == folder
    np.testing.assert_array_equal(
        read_fashion_mnist(tmp_path, train=False)[1], written["t10k-labels-idx1-ubyte"]
    )


def test_torchvision_raw_folder_with_both_forms_reads(tmp_path: Path) -> None:
    folder = tmp_path / "FashionMNIST" / "raw"
    make_fashion(folder, gz=True)
    written = make_fashion(folder, gz=False)  # torchvision keeps the .gz beside what it extracted
    np.testing.assert_array_equal(
        read_fashion_mnist(tmp_path, train=True)[0], written["train-images-idx3-ubyte"]
    )


def test_the_class_names_are_fashion_mnists_in_label_order() -> None:
    assert len(CLASS_NAMES) == 10
    assert CLASS_NAMES[0] == "T-shirt/top"
    assert CLASS_NAMES[9] == "Ankle boot"
    assert CLASS_NAMES[5] == "Sandal"


# ---------------------------------------------------------------------------------------------------
# Missing files and the default folder.


def test_an_empty_folder_names_the_layout_and_how_to_get_the_files(tmp_path: Path) -> None:
    message = _refused(tmp_path)
    assert str(tmp_path) in message
    assert "ROOT/{train,t10k}-images-idx3-ubyte" in message
    assert "FashionMNIST/raw" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_a_missing_file_is_named_with_the_expected_layout(tmp_path: Path) -> None:
    make_fashion(tmp_path / "fashion-mnist", gz=True)
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    message = _refused(tmp_path)
    assert str(tmp_path / "fashion-mnist") in message
    assert "lacks t10k-labels-idx1-ubyte[.gz]" in message
    assert "train-images" not in message.split(";")[0]  # only the missing file is listed as missing
    assert "ROOT/{train,t10k}-images-idx3-ubyte" in message


def test_the_debian_folder_is_the_default_and_named_when_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    monkeypatch.setattr(fashion, "DEBIAN_ROOT", absent)
    with pytest.raises(DataError) as caught:
        default_root()
    message = str(caught.value)
    assert str(absent) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data" in message
    assert "\n" not in message
    make_fashion(absent, gz=True)
    assert default_root() == absent
    assert len(read_fashion_mnist(default_root(), train=True)[0]) == 12


def test_the_debian_location_is_the_packages() -> None:
    assert Path("/usr/share/datasets/fashion-mnist") == fashion.DEBIAN_ROOT


# ---------------------------------------------------------------------------------------------------
# Damaged files: one line naming the file.


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_a_bad_magic_number_is_refused_naming_the_file(tmp_path: Path, gz: bool) -> None:
    written = make_fashion(tmp_path, gz=gz)
    path = write_idx(
        tmp_path / "train-images-idx3-ubyte", written["train-images-idx3-ubyte"], magic=2052, gz=gz
    )
    message = _refused(tmp_path)
    assert message.startswith(f"{path}: magic number 2052, expected 2051")
    assert "replace it with the original file" in message


def test_swapped_image_and_label_files_are_called_so(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=False)
    images, labels = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    images.rename(tmp_path / "swap")
    labels.rename(images)
    (tmp_path / "swap").rename(labels)
    message = _refused(tmp_path, train=False)
    assert message.startswith(f"{images}: magic number 2049, expected 2051")
    assert "the magic number of labels: a swapped file?" in message


def test_a_file_that_is_not_idx_at_all_is_refused(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"<html>Not Found</html>")  # what a failed download often saves
    assert _refused(tmp_path).startswith(f"{path}: magic number ")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_a_truncated_file_is_refused_naming_it(tmp_path: Path, gz: bool) -> None:
    written = make_fashion(tmp_path, gz=False)
    payload = struct.pack(">IIII", IMAGES, 12, 28, 28) + written["train-images-idx3-ubyte"].tobytes()
    cut = payload[: len(payload) - 100]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(cut)
    if gz:  # a complete gzip stream of a truncated file
        path.unlink()
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(cut))
    message = _refused(tmp_path)
    assert message.startswith(f"{path}: truncated: the header announces 12 images (9,424 bytes in all)")
    assert "holds 9,324 bytes" in message


def test_a_cut_gzip_stream_is_refused_naming_it(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download
    message = _refused(tmp_path)
    assert message.startswith(f"{path}: ")
    assert "truncated" in message or "cut short" in message


def test_a_corrupt_gzip_stream_is_refused_naming_it(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC no longer matches
    path.write_bytes(bytes(data))
    message = _refused(tmp_path, train=False)
    assert message.startswith(f"{path}: cannot be read")


def test_a_header_cut_short_is_refused(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">II", IMAGES, 12))
    assert _refused(tmp_path).startswith(f"{path}: the header is cut short (8 of 16 bytes)")


def test_bytes_past_what_the_header_announces_are_refused(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    assert _refused(tmp_path).startswith(f"{path}: bytes after the 12 labels its header announces")


def test_images_and_labels_of_different_counts_are_refused_naming_both(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=True)
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), magic=LABELS, gz=True)
    message = _refused(tmp_path)
    assert message.startswith(f"{labels}: 11 labels for the 12 images of train-images-idx3-ubyte.gz")


def test_images_of_another_size_are_refused(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=True)
    images = np.zeros((12, 32, 32), np.uint8)  # CIFAR-sized
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images, magic=IMAGES, gz=True)
    assert _refused(tmp_path).startswith(f"{path}: images of 32x32 pixels, Fashion-MNIST's are 28x28")


@pytest.mark.parametrize("label", [10, 255])
def test_a_label_out_of_range_is_refused_naming_the_file(tmp_path: Path, label: int) -> None:
    make_fashion(tmp_path, gz=False)
    labels = np.arange(5, dtype=np.uint8) % 10
    labels[3] = label
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, magic=LABELS, gz=False)
    message = _refused(tmp_path, train=False)
    assert message.startswith(f"{path}: labels[3] is {label}, outside 0 to 9 (1 such labels)")


def test_an_empty_split_is_refused(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=False)
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8), magic=LABELS, gz=False)
    assert _refused(tmp_path, train=False).startswith(f"{path}: the header announces no labels")


def test_gsa_train_and_eval_run_the_fashion_preset_on_idx_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gsa_cli.cli.app import app
    from gsa_cli.results import RunDir

    make_fashion(tmp_path / "data" / "FashionMNIST" / "raw", gz=True, train=40, test=20)
    out = tmp_path / "run"
    shrink = ["--set", "recipe.batch_size=8", "--threads", "1"]
    command = ["train", "--preset", "fashion", "--epochs", "1", "--data", str(tmp_path / "data")]
    result = CliRunner().invoke(app, [*command, "--out", str(out), *shrink])
    assert result.exit_code == 0, result.output
    rows = RunDir(out).read_metrics()
    assert [row.epoch for row in rows] == [1]
    evaluated = CliRunner().invoke(app, ["eval", str(out), "--data", str(tmp_path / "data")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "20" in evaluated.output  # the 20 test images, each counted once


def test_training_without_data_names_the_debian_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from gsa_cli.cli.app import app

    monkeypatch.setattr(fashion, "DEBIAN_ROOT", tmp_path / "absent")
    monkeypatch.delenv("GSA_DATA", raising=False)
    result = CliRunner().invoke(app, ["train", "--preset", "fashion", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(tmp_path / "absent") in lines[0]
    assert not (tmp_path / "run").exists()  # a start that fails writes nothing

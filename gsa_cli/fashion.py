"""Fashion-MNIST's four IDX files, found under a folder, read and checked without torch.

Zalando's Fashion-MNIST (MIT licence) is 70,000 28x28 grey images of ten kinds of clothing, in the
format of the original MNIST: ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (60,000
images), ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (10,000), each usually gzipped
(``.gz``). An IDX file is a big-endian header, then the values: a magic number (two zero bytes, the
value type, ``0x08`` for unsigned bytes, and the number of dimensions), one 32-bit size per dimension,
then the values in C order. Images are ``2051`` = ``0x00000803``, ``(N, 28, 28)``; labels are ``2049`` =
``0x00000801``, ``(N,)``, each in 0 to 9.

The files are found in ``ROOT`` itself, in ``ROOT/fashion-mnist/`` or in torchvision's
``ROOT/FashionMNIST/raw/``, compressed or not (told apart by their first bytes, not their names).
Every check names the file and what would fix it: a wrong magic number, a header that disagrees with
the file's length (a truncated download), images that are not 28x28, a label outside 0 to 9, image and
label files of different counts. Any count is accepted when the two agree, so a subset loads too.
Debian's ``dataset-fashion-mnist`` package installs the gzipped files in :data:`DEBIAN_ROOT`, the
folder :func:`default_root` gives when ``--data`` is not given.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from gsa_cli.errors import DataError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_LAYOUT = (
    "ROOT/{train,t10k}-images-idx3-ubyte and ROOT/{train,t10k}-labels-idx1-ubyte, gzipped (.gz) or not, "
    "ROOT being the folder, its fashion-mnist/ or its FashionMNIST/raw/"
)
INSTALL = (
    "apt-get install dataset-fashion-mnist (puts them in /usr/share/datasets/fashion-mnist), or download "
    "the four .gz files from github.com/zalandoresearch/fashion-mnist"
)
REPLACE = "replace it with the original file (" + INSTALL + ")"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SIDE = 28  # every image is SIDE x SIDE
IMAGES_MAGIC = 0x0803  # 2051: unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x0801  # 2049: unsigned bytes, 1 dimension
GZIP_MAGIC = b"\x1f\x8b"
SUBFOLDERS = (".", "fashion-mnist", "FashionMNIST/raw")  # where under ROOT the files may lie
SPLIT_PREFIX = {True: "train", False: "t10k"}


def file_stems(*, train: bool) -> tuple[str, str]:
    """The names, without ``.gz``, of one split's image and label files."""
    prefix = SPLIT_PREFIX[train]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


STEMS = (*file_stems(train=True), *file_stems(train=False))


# ---------------------------------------------------------------------------------------------------
# Finding the files.


def _file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever is a file (the uncompressed one first)."""
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_folder(root: Path) -> Path:
    """The folder under ``root`` (``root``, ``root/fashion-mnist`` or ``root/FashionMNIST/raw``) that
    holds all four files.

    Raises:
        DataError: naming the files a partial folder lacks, or the expected layout if none has any.
    """
    partial: list[tuple[Path, list[str]]] = []
    for sub in SUBFOLDERS:
        folder = root / sub if sub != "." else root
        missing = [stem for stem in STEMS if _file(folder, stem) is None]
        if not missing:
            return folder
        if len(missing) < len(STEMS):
            partial.append((folder, missing))
    if partial:
        folder, missing = partial[0]
        names = ", ".join(f"{stem}[.gz]" for stem in missing)
        raise DataError(f"{folder}: Fashion-MNIST lacks {names}; expected {FASHION_LAYOUT}; {INSTALL}")
    raise DataError(f"{root}: no Fashion-MNIST files here; expected {FASHION_LAYOUT}; {INSTALL}")


def default_root() -> Path:
    """The folder to read when ``--data`` is not given: :data:`DEBIAN_ROOT`, where Debian's package puts
    the files.

    Raises:
        DataError: if it is absent, naming it, the package and ``--data``.
    """
    if not DEBIAN_ROOT.is_dir():
        raise DataError(
            f"the fashion-mnist data set is not at {DEBIAN_ROOT} (Debian's location): "
            f"apt-get install dataset-fashion-mnist, or pass --data ROOT or set GSA_DATA "
            f"(expected {FASHION_LAYOUT})"
        )
    return DEBIAN_ROOT


# ---------------------------------------------------------------------------------------------------
# Reading and checking one file.


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    """At most ``limit`` bytes of ``path`` (all of them if None), decompressed if it starts as gzip."""
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
        if compressed:
            with gzip.open(path, "rb") as stream:
                return stream.read(-1 if limit is None else limit)
        with open(path, "rb") as plain:
            return plain.read(-1 if limit is None else limit)
    except EOFError:  # gzip: the stream ends before its end marker
        raise DataError(f"{path}: the gzip stream is cut short (a truncated download); {REPLACE}") from None
    except (OSError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {err}); {REPLACE}") from None


def _read_idx(path: Path, *, magic: int, what: str) -> np.ndarray:
    """The unsigned-byte array in the IDX file ``path``, whose header must carry ``magic``."""
    ndim = magic & 0xFF
    header_size = 4 * (1 + ndim)
    header = _read_bytes(path, header_size)
    if len(header) < 4:
        raise DataError(f"{path}: {len(header)} bytes, too short for an IDX header; {REPLACE}")
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        other = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(found)
        holds = f", the magic number of {other}: a swapped file?" if other else ""
        raise DataError(
            f"{path}: magic number {found}, expected {magic} (IDX {what}, unsigned bytes, {ndim} "
            f"dimension{'s' if ndim > 1 else ''}){holds}; {REPLACE}"
        )
    if len(header) < header_size:
        raise DataError(f"{path}: the header is cut short ({len(header)} of {header_size} bytes); {REPLACE}")
    shape = tuple(int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1))
    if shape[1:] and shape[1:] != (SIDE, SIDE):
        raise DataError(
            f"{path}: images of {shape[1]}x{shape[2]} pixels, Fashion-MNIST's are {SIDE}x{SIDE}; {REPLACE}"
        )
    if shape[0] == 0:
        raise DataError(f"{path}: the header announces no {what}; {REPLACE}")
    expected = header_size + int(np.prod(shape))
    data = _read_bytes(path, expected + 1)  # one byte more: trailing data is caught too
    if len(data) < expected:
        raise DataError(
            f"{path}: truncated: the header announces {shape[0]:,} {what} ({expected:,} bytes in all), "
            f"the file holds {len(data):,} bytes; {REPLACE}"
        )
    if len(data) > expected:
        raise DataError(
            f"{path}: bytes after the {shape[0]:,} {what} its header announces ({expected:,} bytes in "
            f"all); {REPLACE}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()  # writable


# ---------------------------------------------------------------------------------------------------
# One split.


def read_fashion_mnist(root: Path, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """One split of the Fashion-MNIST files under ``root`` (see :func:`fashion_folder`), checked: images
    ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 in 0 to 9; the training split if ``train``, else
    the test split. No checksums are compared, so a re-packed copy or a subset loads too.

    Raises:
        DataError: naming the file that is missing, malformed, truncated or out of range.
    """
    folder = fashion_folder(root)
    images_path, labels_path = (_file(folder, stem) for stem in file_stems(train=train))
    assert images_path is not None  # fashion_folder found all four
    assert labels_path is not None
    images = _read_idx(images_path, magic=IMAGES_MAGIC, what="images")
    labels = _read_idx(labels_path, magic=LABELS_MAGIC, what="labels")
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: {len(labels):,} labels for the {len(images):,} images of {images_path.name}; "
            f"both files must come from the same download ({REPLACE})"
        )
    outside = np.flatnonzero(labels >= len(CLASS_NAMES))
    if len(outside):
        first = outside[0]
        raise DataError(
            f"{labels_path}: labels[{first}] is {labels[first]}, outside 0 to {len(CLASS_NAMES) - 1} "
            f"({len(outside):,} such labels); {REPLACE}"
        )
    return images, labels.astype(np.int64)

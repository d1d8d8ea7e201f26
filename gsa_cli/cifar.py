"""The ``cifar-100-python`` folder read without running anything in it.

The archive's three files (``train``, ``test``, ``meta``) are Python 2 pickles (protocol 2) of dicts:
``data`` a uint8 numpy array ``(N, 3072)`` of channel-major 32x32 RGB rows, ``fine_labels`` and
``coarse_labels`` lists of ints, ``meta`` with the 100 ``fine_label_names``. A pickle can name any
function to call while it loads, so these are read by :class:`CifarUnpickler`, which admits only the
numpy array reconstruction those files use (under numpy 1's and numpy 2's module names, and what
Python 3's protocols 4 and 5 write for a re-packed copy) and refuses every other global before it is
looked up. Labels are checked against CIFAR-100's 100 classes as the file is read.

Its errors are :class:`~gsa_cli.errors.DataError`, as every data set's are.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gsa_cli.errors import DataError

CIFAR_LAYOUT = "ROOT/cifar-100-python/{train,test,meta} (the extracted cifar-100-python.tar.gz)"
CLASSES = 100
PIXELS = 3 * 32 * 32  # one channel-major row of ``data``
CORES = ("core", "_core")  # numpy 2 renamed numpy.core to numpy._core: pickles name either
REPLACE = "replace it with the file from cifar-100-python.tar.gz"


class CifarUnpickler(pickle.Unpickler):
    """Admits only what the real files hold: dicts, lists, strings, numbers and numpy arrays. Any other
    global (what a planted ``__reduce__`` would call) is refused before it is looked up: nothing runs."""

    ARRAY_GLOBALS: ClassVar[dict[tuple[str, str], Any]] = {
        **{(f"numpy.{core}.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0] for core in CORES},
        **{(f"numpy.{core}.numeric", "_frombuffer"): np.empty(1).__reduce_ex__(5)[0] for core in CORES},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ARRAY_GLOBALS:
            raise DataError(f"refused: the pickle asks for {module}.{name}")
        return self.ARRAY_GLOBALS[module, name]


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The dict in ``path``, holding ``keys``; Python 2 strings read as ``str`` (``encoding="latin1"``)."""
    try:
        with open(path, "rb") as handle:
            entry = CifarUnpickler(handle, encoding="latin1").load()
    except DataError as err:  # from find_class
        raise DataError(
            f"{path}: {err}, which no CIFAR-100 file holds (nothing in it was run); {REPLACE}"
        ) from None
    except Exception as err:  # a foreign or damaged file: whatever the unpickler met, name the file
        raise DataError(
            f"{path}: not a CIFAR-100 python pickle ({type(err).__name__}: {err}); expected {CIFAR_LAYOUT}"
        ) from None
    missing = [key for key in keys if key not in entry] if isinstance(entry, dict) else list(keys)
    if missing:
        raise DataError(f"{path}: not a CIFAR-100 python pickle (no {', '.join(missing)}); {REPLACE}")
    return entry


def _split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path, ("data", "fine_labels"))
    data, labels = entry["data"], np.asarray(entry["fine_labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (PIXELS,)):
        raise DataError(
            f"{path}: data is not a uint8 array of shape (N, {PIXELS}) (32x32 RGB rows); {REPLACE}"
        )
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise DataError(
            f"{path}: fine_labels are not integers, one per image ({labels.size} for {len(data)})"
        )
    outside = np.flatnonzero((labels < 0) | (labels >= CLASSES))
    if len(outside):
        first = outside[0]
        raise DataError(
            f"{path}: fine_labels[{first}] is {labels[first]}, outside 0 to {CLASSES - 1} "
            f"({len(outside)} such labels); {REPLACE}"
        )
    return np.array(data).reshape(-1, 3, 32, 32), labels.astype(np.int64)  # copies, writable


def read_cifar100(folder: Path, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """One split of the ``cifar-100-python`` ``folder``, checked: images ``(N, 3, 32, 32)`` uint8 and
    labels ``(N,)`` int64. No checksums are compared, so a re-packed copy or a subset loads too.

    Raises:
        DataError: naming the file that is missing, malformed, out of range or holds a refused global.
    """
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected {CIFAR_LAYOUT}")
    names = _unpickle(folder / "meta", ("fine_label_names",))["fine_label_names"]
    if not isinstance(names, list) or len(names) != CLASSES:
        raise DataError(f"{folder / 'meta'}: fine_label_names is not a list of CIFAR-100's 100 names")
    return _split(folder / ("train" if train else "test"))

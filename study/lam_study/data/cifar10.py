"""CIFAR-10 (Krizhevsky, 2009): 32x32 colour images of 10 object classes.

Files: the official "python version" archive unpacked, i.e. the folder
``cifar-10-batches-py/`` with ``data_batch_1`` ... ``data_batch_5`` (train, 50,000
images) and ``test_batch`` (10,000). Each is a Python-2 pickle of a dict with
``b"data"``: a numpy ``uint8`` array ``[10000, 3072]`` (1024 red, then 1024 green,
then 1024 blue values, each plane row-major 32x32) and ``b"labels"``: a list of
ints ``0..9``.

Searched for in ``root``, ``$LAM_PLUGIN_DATA/cifar10``, ``~/.cache/lam_plugin/cifar10``
(each either holding ``cifar-10-batches-py/`` or being it).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DatasetFormatError, ImageDataset, PathLike, check_split, find_dir

logger = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: ``split -> batch file names``.
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# Unpickling runs whatever callables the pickle names, so a tampered batch file could
# execute arbitrary code (e.g. ``os.system``). The official batches only contain dicts,
# lists, byte strings and ints, which need no lookup, plus numpy arrays, which pickle
# as ``_reconstruct(ndarray, shape, dtype)`` followed by ``__setstate__``. Those three
# globals are the only ones resolved; any other name is refused before anything runs.
# ``_reconstruct`` is taken from ``ndarray.__reduce__`` so that it is the same object
# whichever numpy module path (``numpy.core`` in numpy 1, ``numpy._core`` in numpy 2)
# the pickle was written with.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals needed for plain arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_cifar10(root: PathLike | None = None, split: str = "train") -> ImageDataset:
    """CIFAR-10 ``split`` (``"train"``: 50,000 images, ``"test"``: 10,000).

    Returns:
        :class:`ImageDataset` with images ``uint8 [N, 3, 32, 32]`` (RGB) and labels
        ``int64 [N]`` in ``0..9`` (see :data:`CLASSES`).

    Raises:
        DatasetNotFoundError: the batch files are in none of the searched folders.
        DatasetFormatError: a batch is corrupt or names a disallowed global.
    """
    check_split(split, FILES)
    directory = find_dir(
        "cifar10",
        root,
        FILES[split],
        nested="cifar-10-batches-py",
        title=f"CIFAR-10 ({split} split)",
        source="python pickle batches",
        how_to_get=[f"download {URL} and unpack it (tar xzf) into one of the folders above"],
    )
    logger.info("Loading CIFAR-10 %s split from %s", split, directory)
    batches = [read_batch(directory / name) for name in FILES[split]]
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _, labels in batches])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), f"cifar10-{split}")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as ``(uint8 data [n, 3072], int64 labels [n])``, unpickled safely.

    Raises:
        DatasetFormatError: not a pickle, a disallowed global, or unexpected contents.
    """
    try:
        with path.open("rb") as stream:
            batch = _BatchUnpickler(stream, encoding="bytes").load()
    except Exception as error:  # a corrupt pickle can fail in many ways; all mean "bad file"
        raise DatasetFormatError(f"{path}: not a valid CIFAR-10 batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetFormatError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFormatError(f"{path}: b'data' must be a uint8 array [n, 3072]")
    valid_values = labels.dtype.kind in "iu" and (labels.size == 0 or 0 <= labels.min() <= labels.max() <= 9)
    if labels.shape != (len(data),) or not valid_values:
        raise DatasetFormatError(f"{path}: b'labels' must be {len(data)} ints in 0..9")
    return data, labels.astype(np.int64)

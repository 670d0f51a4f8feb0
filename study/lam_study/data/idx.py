"""Reader for the IDX format of MNIST and FashionMNIST, gzip-compressed or not.

An IDX file is a big-endian header followed by the raw array:

* 2 zero bytes, 1 byte type code (``0x08`` = uint8, ``0x09`` int8, ``0x0B`` int16,
  ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), 1 byte number of dimensions ``d``;
* ``d`` unsigned 32-bit sizes;
* ``prod(sizes)`` values in row-major order.

Image files have ``d = 3`` (``[N, rows, cols]``, magic number 2051), label files
``d = 1`` (``[N]``, magic number 2049).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .base import DatasetFormatError, ImageDataset

logger = logging.getLogger(__name__)

_TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def idx_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem.gz`` or else ``directory/stem`` if either exists."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_pair(dirs: Iterable[Path], image_stem: str, label_stem: str) -> tuple[Path, Path] | None:
    """``(image file, label file)`` in the first of ``dirs`` that holds both (see :func:`idx_file`)."""
    for directory in dirs:
        images, labels = idx_file(directory, image_stem), idx_file(directory, label_stem)
        if images is not None and labels is not None:
            return images, labels
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (``.gz`` is decompressed) into an array of its dimensions.

    Raises:
        DatasetFormatError: bad gzip stream, bad magic number, or a size that does
            not match the header.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPE_CODES:
        raise DatasetFormatError(f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    dtype, ndim = _TYPE_CODES[data[2]], data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetFormatError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)


def load_idx_pair(images_path: Path, labels_path: Path, name: str, num_classes: int = 10) -> ImageDataset:
    """An :class:`ImageDataset` ``[N, 1, rows, cols]`` from a uint8 image file and a uint8 label file."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{images_path}: expected uint8 images [N, rows, cols], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetFormatError(f"{labels_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetFormatError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetFormatError(f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    logger.info("Read %d images %s from %s", len(images), images.shape[1:], images_path)
    return ImageDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        name=name,
    )


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetFormatError(f"{path}: corrupt gzip stream ({error})") from error

"""SVHN (Netzer et al., 2011), cropped-digits format: 32x32 colour house-number digits.

The out-of-distribution set for CIFAR-10. Files: ``train_32x32.mat`` (73,257 images),
``test_32x32.mat`` (26,032) and optionally ``extra_32x32.mat`` (531,131), MATLAB v5
files holding ``X``: ``uint8 [32, 32, 3, N]`` and ``y``: ``[N, 1]`` labels ``1..10``,
where 10 stands for the digit 0.

Searched for in ``root``, ``$LAM_PLUGIN_DATA/svhn``, ``~/.cache/lam_plugin/svhn``.
Reading them needs scipy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .base import DatasetFormatError, ImageDataset, PathLike, check_split, find_dir

logger = logging.getLogger(__name__)

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}

URL = "http://ufldl.stanford.edu/housenumbers/"


def load_svhn(root: PathLike | None = None, split: str = "train") -> ImageDataset:
    """SVHN ``split`` (``"train"``, ``"test"`` or ``"extra"``).

    Returns:
        :class:`ImageDataset` with images ``uint8 [N, 3, 32, 32]`` (RGB) and labels
        ``int64 [N]`` equal to the digit, ``0..9``.

    Raises:
        DatasetNotFoundError: the ``.mat`` file is in none of the searched folders.
        DatasetFormatError: the file is not a MATLAB v5 file with ``X`` and ``y`` as above.
    """
    check_split(split, FILES)
    directory = find_dir(
        "svhn",
        root,
        (FILES[split],),
        title=f"SVHN ({split} split)",
        source="cropped-digits .mat file",
        how_to_get=[f"download {URL}{FILES[split]} into one of the folders above", "pip install scipy  (to read it)"],
    )
    path = directory / FILES[split]
    logger.info("Loading SVHN %s split from %s", split, path)
    images, labels = read_mat(path)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), f"svhn-{split}")


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images [N, 3, 32, 32], int64 digits [N])`` from one cropped-digits ``.mat`` file."""
    from scipy.io import loadmat  # optional dependency, only needed here

    try:
        contents = loadmat(path, variable_names=["X", "y"])
    except (ValueError, NotImplementedError, OSError) as error:  # NotImplementedError: MATLAB v7.3
        raise DatasetFormatError(f"{path}: not a readable MATLAB v5 file ({error})") from error
    if "X" not in contents or "y" not in contents:
        raise DatasetFormatError(f"{path}: expected variables 'X' and 'y'")
    images, labels = contents["X"], contents["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DatasetFormatError(f"{path}: X must be uint8 [32, 32, 3, N], got {images.dtype} {images.shape}")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != images.shape[3]:
        raise DatasetFormatError(f"{path}: {images.shape[3]} images but {len(labels)} labels")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DatasetFormatError(f"{path}: labels must be in 1..10")
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels % 10

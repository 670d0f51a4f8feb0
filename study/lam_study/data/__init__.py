"""Image datasets of the paper, loaded into memory as :class:`ImageDataset`.

Each ``load_<name>(root=None, split=...)`` looks for the official files in ``root``,
``$LAM_PLUGIN_DATA/<name>`` and ``~/.cache/lam_plugin/<name>`` (plus per-dataset
places), and raises :class:`DatasetNotFoundError` naming where it looked and how to
get the data; nothing falls back to another dataset.
"""

from .base import DatasetFormatError, DatasetNotFoundError, ImageDataset
from .cars196 import load_cars196
from .cifar10 import load_cifar10
from .cub200 import load_cub200
from .fashionmnist import download_fashionmnist, load_fashionmnist
from .idx import read_idx
from .lfw import load_lfw
from .mnist import load_mnist
from .registry import DATASETS, OOD_PAIRS, get_dataset
from .svhn import load_svhn

__all__ = [
    "DATASETS",
    "OOD_PAIRS",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageDataset",
    "download_fashionmnist",
    "get_dataset",
    "load_cars196",
    "load_cifar10",
    "load_cub200",
    "load_fashionmnist",
    "load_lfw",
    "load_mnist",
    "load_svhn",
    "read_idx",
]

"""Dataset names, their loaders, and the paper's in-distribution -> out-of-distribution pairs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .base import ImageDataset
from .cars196 import load_cars196
from .cifar10 import load_cifar10
from .cub200 import load_cub200
from .fashionmnist import load_fashionmnist
from .lfw import load_lfw
from .mnist import load_mnist
from .svhn import load_svhn

#: Dataset name -> loader ``(root=None, split=..., **options) -> ImageDataset``.
DATASETS: Mapping[str, Callable[..., ImageDataset]] = MappingProxyType(
    {
        "fashionmnist": load_fashionmnist,
        "mnist": load_mnist,
        "cifar10": load_cifar10,
        "svhn": load_svhn,
        "cub200": load_cub200,
        "cars196": load_cars196,
        "lfw": load_lfw,
    }
)

#: In-distribution dataset -> the out-of-distribution dataset the paper pairs it with.
OOD_PAIRS: Mapping[str, str] = MappingProxyType(
    {"fashionmnist": "mnist", "cifar10": "svhn", "cub200": "cars196", "lfw": "cub200"}
)


def get_dataset(name: str, **kwargs: object) -> ImageDataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`; case, ``-`` and ``_`` ignored) with ``kwargs``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key](**kwargs)

"""The data of the protocol: FashionMNIST and MNIST, their subsets, the validation
split and the in-memory tensors every method is trained and evaluated on."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import ImageDataset, load_fashionmnist, load_mnist
from .config import ReproduceConfig


@dataclass(frozen=True)
class ProtocolData:
    """The datasets of the protocol, before subsets and the validation split.

    Attributes:
        train: in-distribution training images (FashionMNIST train).
        test: in-distribution test images (FashionMNIST test).
        ood: out-of-distribution images (MNIST test).
    """

    train: ImageDataset
    test: ImageDataset
    ood: ImageDataset


def load_fashionmnist_protocol(root: str | os.PathLike[str] | None = None) -> ProtocolData:
    """FashionMNIST train/test and MNIST test (the OoD set), from the usual places.

    Raises:
        DatasetNotFoundError: a dataset is missing (its message says how to get it).
    """
    return ProtocolData(
        train=load_fashionmnist(root, split="train"),
        test=load_fashionmnist(root, split="test"),
        ood=load_mnist(split="test"),
    )


@dataclass(frozen=True)
class _Tensors:
    """Float images in ``[0, 1]`` and labels of every part, held in memory."""

    fit_x: Tensor
    fit_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    ood_x: Tensor
    fingerprint: str
    names: dict[str, str]

    @property
    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.fit_y), "val": len(self.val_y), "test": len(self.test_y), "ood": len(self.ood_x)}


def _limit(data: ImageDataset, limit: int | None, generator: torch.Generator) -> ImageDataset:
    if limit is None or limit >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=generator)[:limit])


def _prepare(data: ProtocolData, config: ReproduceConfig) -> _Tensors:
    g = torch.Generator().manual_seed(config.split_seed)
    train = _limit(data.train, config.train_limit, g)
    order = torch.randperm(len(train), generator=g)
    n_val = round(config.val_fraction * len(train))
    fit, val = train.subset(order[n_val:]), train.subset(order[:n_val])
    test = _limit(data.test, config.test_limit, g)
    ood = _limit(data.ood, config.ood_limit, g)
    if len(fit) < 2 or len(test) < 2 or len(ood) < 1:
        raise ValueError(f"too little data: {len(fit)} fit, {len(test)} test, {len(ood)} OoD images")
    digest = hashlib.sha256()
    digest.update(str(tuple(fit.images.shape)).encode())
    digest.update(fit.images.contiguous().numpy().tobytes())
    digest.update(fit.labels.contiguous().numpy().tobytes())
    return _Tensors(
        fit_x=fit.float(),
        fit_y=fit.labels,
        val_x=val.float(),
        val_y=val.labels,
        test_x=test.float(),
        test_y=test.labels,
        ood_x=ood.float(),
        fingerprint=digest.hexdigest()[:16],
        names={"train": data.train.name, "test": data.test.name, "ood": data.ood.name},
    )

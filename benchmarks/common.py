"""What the benchmark scripts share: their data."""

from __future__ import annotations

import torch


def fashionmnist_or_random(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n`` FashionMNIST training images and labels, or random images when the
    data set is not installed; with the name of what was used."""
    try:
        from lam_study.data import load_fashionmnist

        ds = load_fashionmnist(split="train").subset(torch.arange(n))
        return ds.float(), ds.labels, "FashionMNIST"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "random images"

"""Small building blocks for embedding networks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["L2Normalize"]


class L2Normalize(nn.Module):
    """Projects each row onto the unit sphere: ``z = f / ||f||`` along ``dim``.

    Use this module (not ``F.normalize`` inside a forward) so that the BackPACK
    curvature backend can see, and differentiate through, the normalisation.
    """

    def __init__(self, dim: int = -1, eps: float = 1e-12) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x, dim=self.dim, eps=self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

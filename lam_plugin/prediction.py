"""The predictive distribution of embeddings for a batch of inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Prediction:
    """Summary of the embedding distribution of ``B`` inputs.

    Attributes:
        mean: ``[B, D]`` unit-norm mean embedding (the normalised mean of the samples).
        std: ``[B, D]`` per-dimension standard deviation of the samples.
        samples: ``[n, B, D]`` the unit-norm samples, when they were asked for.
    """

    mean: Tensor
    std: Tensor
    samples: Tensor | None = None

    @property
    def uncertainty(self) -> Tensor:
        """``[B]`` the paper's out-of-distribution score, ``sum_d std[:, d]``."""
        return self.std.sum(dim=-1)

    @classmethod
    def from_samples(cls, samples: Tensor, keep_samples: bool = False) -> "Prediction":
        """Summarise ``[n, B, D]`` unit-norm samples (``n >= 2``)."""
        if samples.ndim != 3:
            raise ValueError(f"samples must have shape [n, B, D], got {tuple(samples.shape)}")
        if samples.shape[0] < 2:
            raise ValueError(f"at least 2 samples are needed for a standard deviation, got n={samples.shape[0]}")
        mean = torch.nn.functional.normalize(samples.mean(dim=0), dim=-1)
        std = samples.std(dim=0)
        return cls(mean=mean, std=std, samples=samples if keep_samples else None)

    def to(self, device: torch.device | str) -> "Prediction":
        """A copy on ``device``."""
        return Prediction(
            mean=self.mean.to(device),
            std=self.std.to(device),
            samples=None if self.samples is None else self.samples.to(device),
        )

    def __len__(self) -> int:
        return self.mean.shape[0]

"""The predictive distribution of embeddings for a batch of inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Prediction"]


@dataclass(frozen=True)
class Prediction:
    """Summary of the embedding distribution of ``B`` inputs.

    Attributes:
        mean: ``[B, D]`` unit-norm mean embedding (the normalised mean of the samples).
        std: ``[B, D]`` per-dimension standard deviation of the samples.
        samples: ``[n, B, D]`` the unit-norm samples, when they were asked for.
        output_var: ``[B, D]`` variance of the model output before the L2 normalisation,
            when the method exposes it (:meth:`EmbeddingPosterior.predict` and
            every baseline's ``predict`` do).
    """

    mean: Tensor
    std: Tensor
    samples: Tensor | None = None
    output_var: Tensor | None = None

    @property
    def uncertainty(self) -> Tensor:
        """``[B]`` the paper's out-of-distribution score, ``sum_d std[:, d]``."""
        return self.std.sum(dim=-1)

    @property
    def output_uncertainty(self) -> Tensor | None:
        """``[B]`` ``sum_d output_var[:, d]``: the trace of the output's covariance before
        normalisation (``None`` when the method gives no ``output_var``).

        The normalisation divides the spread of an output by its length and removes its
        radial part; this score keeps both, so an input whose features excite
        weakly-determined weights scores high even when its output is long.
        """
        return None if self.output_var is None else self.output_var.sum(dim=-1)

    @classmethod
    def from_samples(cls, samples: Tensor, keep_samples: bool = False) -> Prediction:
        """Summarise ``[n, B, D]`` unit-norm samples (``n >= 2``)."""
        if samples.ndim != 3:
            raise ValueError(f"samples must have shape [n, B, D], got {tuple(samples.shape)}")
        if samples.shape[0] < 2:
            raise ValueError(f"at least 2 samples are needed for a standard deviation, got n={samples.shape[0]}")
        mean = torch.nn.functional.normalize(samples.mean(dim=0), dim=-1)
        std = samples.std(dim=0)
        return cls(mean=mean, std=std, samples=samples if keep_samples else None)

    @classmethod
    def from_outputs(cls, outputs: Tensor, keep_samples: bool = False, normalize: bool = True) -> Prediction:
        """Summarise ``[n, B, D]`` model outputs: the samples are the outputs L2-normalised
        (as given when ``normalize`` is false), and ``output_var`` is the variance of the
        outputs themselves."""
        samples = torch.nn.functional.normalize(outputs, dim=-1) if normalize else outputs
        pred = cls.from_samples(samples, keep_samples=keep_samples)
        return replace(pred, output_var=outputs.var(dim=0))

    @classmethod
    def concat(cls, parts: list[Prediction]) -> Prediction:
        """One prediction of the items of ``parts``, in order (samples along dimension 1)."""
        if not parts:
            raise ValueError("no prediction to concatenate")
        if len(parts) == 1:
            return parts[0]
        dims = sorted({int(p.mean.shape[-1]) for p in parts})
        if len(dims) > 1:
            raise ValueError(f"cannot concatenate predictions of embedding dimensions {dims}")

        def cat(field: str, dim: int = 0) -> Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values, dim=dim)

        return cls(mean=cat("mean"), std=cat("std"), samples=cat("samples", 1), output_var=cat("output_var"))  # type: ignore[arg-type]

    def to(self, device: torch.device | str) -> Prediction:
        """A copy on ``device``."""
        return Prediction(
            mean=self.mean.to(device),
            std=self.std.to(device),
            samples=None if self.samples is None else self.samples.to(device),
            output_var=None if self.output_var is None else self.output_var.to(device),
        )

    def __len__(self) -> int:
        return self.mean.shape[0]

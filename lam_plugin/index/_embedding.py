"""What users pass to :class:`~lam_plugin.index.UncertainIndex`, turned into checked rows.

A :class:`~lam_plugin.prediction.Prediction` is used as it is; other inputs are embedded
by the index's posterior batch by batch, every batch with the same weight samples (the
generator is seeded with the index's ``seed`` for each batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
from tqdm.auto import tqdm

from ..prediction import Prediction
from .inputs import batches, float32

if TYPE_CHECKING:
    from .uncertain_index import UncertainIndex

__all__ = ["Rows", "check", "check_mean", "predictions", "prepare"]

#: ``(mean [B, D], var [B, D], samples [B, n, D] in "mc" mode else None, std [B, D])``, float32.
Rows: TypeAlias = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]

_UNIT_NORM_TOL = 1e-3


def prepare(index: UncertainIndex, data: Any, name: str) -> Rows:
    """``(mean [B, D], var [B, D], samples [B, n, D] in mc mode else None, std [B, D])``, float32,
    of all of ``data``."""
    preds = list(predictions(index, data, name))
    if not preds:
        raise ValueError(f"{name} is empty")
    try:
        joined = Prediction.concat(preds)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    return check(index, joined, name)


def check(index: UncertainIndex, pred: Prediction, name: str) -> Rows:
    """The checked float32 arrays of :func:`prepare` for one prediction."""
    mean = check_mean(index, pred, name)
    std = float32(pred.std, f"{name}.std")
    if std.shape != mean.shape:
        raise ValueError(f"{name}.std must have the shape of {name}.mean {mean.shape}, got {std.shape}")
    if (std < 0).any():
        raise ValueError(f"{name}.std has negative entries")
    samples = None
    if index.variance == "mc":
        if pred.samples is None:
            raise ValueError(f"variance='mc' needs {name}.samples [n_samples, B, D] (predict with return_samples=True)")
        samples = float32(pred.samples, f"{name}.samples")
        if samples.shape != (index.n_samples, *mean.shape):
            raise ValueError(f"{name}.samples must have shape {(index.n_samples, *mean.shape)}, got {samples.shape}")
        samples = np.ascontiguousarray(samples.transpose(1, 0, 2))
    return mean, std * std, samples, std


def check_mean(index: UncertainIndex, pred: Prediction, name: str) -> np.ndarray:
    """The checked float32 means ``[B, D]`` of one prediction (unit-norm for ``"cosine"``)."""
    mean = float32(pred.mean, f"{name}.mean")
    if mean.ndim != 2 or mean.shape[0] == 0 or mean.shape[1] == 0:
        raise ValueError(f"{name}.mean must have shape [B, D] with B, D >= 1, got {mean.shape}")
    if index.metric == "cosine":
        norms = np.linalg.norm(mean, axis=1)
        if np.abs(norms - 1.0).max() > _UNIT_NORM_TOL:
            raise ValueError(f"metric='cosine' needs unit-norm {name}.mean, norms range {norms.min():.4g}..{norms.max():.4g}")
    return mean


@torch.no_grad()
def predictions(index: UncertainIndex, data: Any, name: str) -> Iterator[Prediction]:
    """One prediction per batch of ``data`` (``data`` itself if it is one), on the CPU;
    every batch is embedded with the same weight samples."""
    if isinstance(data, Prediction):
        yield data
        return
    if index.posterior is None:
        raise ValueError(f"{name} must be a Prediction: this index has no posterior to embed inputs with")
    parts, total = batches(data, index.batch_size, name)
    for x in tqdm(parts, total=total, desc=f"embedding {name}", disable=not index.progress, leave=False):
        generator = torch.Generator().manual_seed(index.seed)  # same weight samples for every batch
        yield index.posterior.predict(
            x, n=index.n_samples, generator=generator, return_samples=index.variance == "mc"
        ).to("cpu")

"""Calibrating the spread of an embedding posterior on held-out data.

A Laplace posterior's overall scale is only as good as the curvature's: a prior that
swamps a small curvature gives samples that scatter over the whole sphere, a large
running curvature (online LAM) gives samples that all agree. Both mis-state how often
the retrieval is right. :func:`calibrate_temperature` multiplies the posterior
covariance by the temperature ``tau`` (:meth:`EmbeddingPosterior.tempered`) that
minimises the expected calibration error of 1-NN retrieval on labelled validation
data (``lam_plugin.metrics.ece``), searching a log-spaced grid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .metrics import ece
from .posterior import EmbeddingPosterior
from .wrapping import Batch

__all__ = ["DEFAULT_TEMPERATURES", "CalibrationReport", "calibrate_temperature"]

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(float(t) for t in np.logspace(-4, 4, 17))


@dataclass(frozen=True)
class CalibrationReport:
    """The chosen temperature and the validation ECE of every candidate."""

    temperature: float
    ece: float
    scores: dict[float, float]


def calibrate_temperature(
    posterior: EmbeddingPosterior,
    x: Batch,
    labels: Tensor,
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    n: int = 30,
    seed: int = 0,
    bins: int = 10,
    batch_size: int | None = 1024,
) -> tuple[EmbeddingPosterior, CalibrationReport]:
    """The tempered posterior with the lowest validation ECE, and the report.

    Args:
        x: validation inputs.
        labels: their labels (several items per label).
        temperatures: candidate covariance multipliers (default ``10^-4 ... 10^4``); when
            the best lies on the edge of the grid, the search goes on beyond it by factors
            of 10 for as long as the ECE improves.
        n: weight samples per candidate (the same seeded draws for every candidate).
        batch_size: items embedded at once.

    A candidate that takes the precision, or the samples, out of the range of the
    posterior's dtype (float16: ``10^-4`` already) is passed over with a warning.
    """
    labels = _checked(temperatures, n, labels)
    scores: dict[float, float] = {}

    def score(tau: float) -> float:
        try:
            tempered = posterior.tempered(tau)
        except ValueError as err:  # out of the dtype's range: no candidate
            logger.warning("temperature %g passed over: %s", tau, err)
            return math.inf
        g = torch.Generator().manual_seed(seed)
        samples = tempered.sample(x, n=n, generator=g, batch_size=batch_size)
        if not bool(torch.isfinite(samples).all()):
            logger.warning("temperature %g passed over: its samples overflow %s", tau, samples.dtype)
            return math.inf
        scores[tau] = ece(samples, labels, bins=bins)
        return scores[tau]

    for tau in temperatures:
        score(float(tau))
    if not scores:
        raise ValueError(f"every temperature takes the precision out of the range of {posterior.mean.dtype}")
    # the lowest ECE; among equals, the temperature closest to 1 (the posterior as fitted)
    best = min(scores, key=lambda t: (round(scores[t], 12), abs(np.log(t))))
    # a best value on the edge of the grid: keep going by factors of 10 while it improves
    for edge, factor in ((max(scores), 10.0), (min(scores), 0.1)):
        while best == edge and 1e-12 < edge * factor < 1e12:
            edge *= factor
            if score(edge) < scores[best]:
                best = edge
    logger.info("calibrated temperature %.3g (validation ECE %.4f)", best, scores[best])
    return posterior.tempered(best), CalibrationReport(best, scores[best], scores)


def _checked(temperatures: Sequence[float], n: int, labels: Tensor) -> Tensor:
    """``labels`` as a tensor, after refusing arguments :func:`calibrate_temperature` cannot use."""
    if not temperatures:
        raise ValueError("temperatures must hold at least one candidate")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int of at least 2 (one weight sample has no spread to calibrate), got {n!r}")
    labels = torch.as_tensor(labels)
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    if int(torch.unique(labels, return_counts=True)[1].max()) < 2:
        raise ValueError("labels: no label occurs twice, so no item has a correct neighbour to be confident about")
    return labels

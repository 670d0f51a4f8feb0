"""What a posterior records: how it was built (:class:`PosteriorConfig`), what its fit saw
(:class:`FitStats`), and a summary of where its precision comes from
(:class:`PosteriorSummary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .calling import OutputKey

__all__ = ["FitStats", "PosteriorConfig", "PosteriorSummary"]


@dataclass(frozen=True)
class FitStats:
    """What a fit saw: data size and the pairs that made the curvature."""

    n_data: int = 0
    n_batches: int = 0
    n_positive: int = 0
    n_negative_active: int = 0
    n_negative_total: int = 0
    backend: str = ""


@dataclass(frozen=True)
class PosteriorConfig:
    """How the posterior was built and how it maps weights to embeddings.

    ``output_key`` and ``call`` say how the model is called and its embedding taken
    (:class:`~lam_plugin.calling.ModelCall`); a callable ``output_key`` is saved by its
    name (``output_fn``) and must be passed again to :meth:`EmbeddingPosterior.load`.
    ``layer`` and ``head`` are set for a last-layer posterior whose model output is the
    layer's output or its L2 normalisation: sampling then runs the backbone once.
    """

    geometry: str = "arccos"
    approx: str = "fix"
    margin: float = 0.7
    hessian_scale: float = 1.0
    output_key: OutputKey = None
    call: str = "auto"
    output_fn: str | None = None
    normalize: bool = True
    layer: str | None = None
    head: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PosteriorSummary:
    """Where the posterior precision comes from, and how much the uncertainty varies.

    ``data_share`` is ``hessian_scale * curvature / precision`` per parameter: near 0 the
    prior swamps the data and every input gets about the same uncertainty.
    """

    n_params: int
    prior_precision: float
    hessian_scale: float
    data_share_mean: float
    data_share_median: float
    params_data_dominated: float
    curvature_median: float
    curvature_max: float
    stats: FitStats
    uncertainty_quantiles: dict[str, float] | None = None

    def __str__(self) -> str:
        s = self.stats
        lines = [
            f"EmbeddingPosterior over {self.n_params:,} parameters (fit on {s.n_data:,} items, "
            f"{s.n_batches} batches, backend {s.backend})",
            f"  pairs: {s.n_positive:,} positive, {s.n_negative_active:,} active negative "
            f"of {s.n_negative_total:,} negative",
            f"  prior precision {self.prior_precision:.4g}, hessian scale {self.hessian_scale:.4g}",
            f"  data share of the precision: mean {self.data_share_mean:.3f}, median "
            f"{self.data_share_median:.3f}; data dominates in {100 * self.params_data_dominated:.1f}% of parameters",
            f"  curvature: median {self.curvature_median:.4g}, max {self.curvature_max:.4g}",
        ]
        if self.uncertainty_quantiles:
            q = self.uncertainty_quantiles
            lines.append(
                "  uncertainty over the given data: "
                + ", ".join(f"{k} {v:.4g}" for k, v in q.items())
            )
        if self.data_share_median < 0.1:
            lines.append(
                "  warning: the prior swamps the data curvature, so uncertainties will look alike; a smaller "
                "prior_precision or a larger hessian_scale gives the data more weight"
            )
        return "\n".join(lines)

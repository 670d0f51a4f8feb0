"""The deterministic embedder: no uncertainty at all."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lam_plugin.prediction import Prediction
from lam_plugin.wrapping import check_inputs
from lam_study.baselines.base import UncertaintyBaseline, eval_forward, normalized_forward

__all__ = ["DeterministicEmbedder"]


class DeterministicEmbedder(UncertaintyBaseline):
    """Wraps a trained embedder as a point estimate: ``std = 0``.

    :meth:`sample` repeats the single (L2-normalised) embedding ``n`` times. The
    uncertainty of every input is therefore ``0``, so out-of-distribution metrics
    (AUROC/AUPR of the uncertainty) are undefined for this baseline; it serves only as the
    retrieval reference. The model is run in eval mode; its modes are restored.
    """

    default_n = 1

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def sample_outputs(self, x: Tensor, n: int | None = None) -> Tensor:
        return eval_forward(self.model, x).unsqueeze(0).repeat(self._n(n), 1, 1)

    @torch.no_grad()
    def predict(self, x: Tensor, n: int | None = None, return_samples: bool = False) -> Prediction:
        check_inputs(x)
        z = normalized_forward(self.model, x)
        samples = z.unsqueeze(0).repeat(self._n(n), 1, 1) if return_samples else None
        return Prediction(mean=z, std=torch.zeros_like(z), samples=samples, output_var=torch.zeros_like(z))

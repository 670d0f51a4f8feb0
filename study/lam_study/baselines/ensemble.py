"""Deep ensembles: one sample per independently trained member."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lam_study.baselines.base import UncertaintyBaseline, eval_forward

__all__ = ["DeepEnsemble"]


class DeepEnsemble(UncertaintyBaseline):
    """An ensemble of ``M >= 2`` embedders trained independently (different seeds).

    The samples are the members' L2-normalised embeddings (``[M, B, D]``); the
    prediction's mean is their normalised average and its std their (unbiased) standard
    deviation over members. The ``n`` argument of :meth:`sample`/:meth:`predict` is
    accepted for interface compatibility and ignored: an ensemble has exactly ``M``
    samples. Members run in eval mode; their modes are restored.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"a deep ensemble needs at least 2 members, got {len(models)}")
        self.models = models

    def __len__(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def sample_outputs(self, x: Tensor, n: int | None = None) -> Tensor:
        outputs = [eval_forward(m, x) for m in self.models]
        for i, out in enumerate(outputs[1:], start=1):
            if out.shape != outputs[0].shape:
                raise ValueError(
                    f"ensemble members must give outputs of one shape: member 0 gives {tuple(outputs[0].shape)}, "
                    f"member {i} gives {tuple(out.shape)}"
                )
        return torch.stack(outputs)

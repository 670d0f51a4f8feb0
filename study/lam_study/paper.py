"""The options of the paper's code that the plug-in does not have.

The plug-in (docs/design.md §2, §4) tests the hinge of every negative pair, rescales
online LAM's batch curvature over all pairs of the batch (``dataset_size**2 /
n_pairs``) and applies the ``relu`` to every step's term. The paper's code differs in
three places, which the study reproduces here:

* ``hinge=False``: every mined negative counts, whatever its distance.
* ``curvature="triplets"``: online LAM's Hessian pairs are the pairs of the triplets
  ``(a, p, n)`` that violate the margin (``d_an - d_ap <= margin``,
  pytorch-metric-learning's ``TripletMarginMiner(type_of_triplets="all")``), rescaled
  by ``dataset_size / batch_size`` (its ``DiagLaplace.scale``): one step then adds
  about one epoch's worth of batch sums, as the post-hoc fit does. This running
  curvature is ``dataset_size * batch_size / n_pairs`` times smaller, so the weight
  noise of training is larger.
* ``relu``: ``"per_step"`` (the plug-in's), ``"on_use"`` (the signed running sum is
  kept, ``H <- memory_factor * H + mean_s h_s``, and the ``relu`` is applied only where
  ``H`` is used: to draw the weights and in the returned posterior; the latest version
  of the paper's training step read on its own) or ``"per_epoch"`` (the signed running
  sum, clamped at zero at the end of every epoch: what the latest version of the
  paper's code does in effect, since its validation hook replaces the running
  curvature with its ``relu`` after every training epoch).

:class:`PaperLaplaceEmbedder` is a :class:`~lam_plugin.LaplaceEmbedder` with these
options; its :meth:`~PaperLaplaceEmbedder.fit_online` takes ``curvature`` and ``relu``.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.miners import TripletMarginMiner
from torch import Tensor

from lam_plugin import LaplaceEmbedder
from lam_plugin.online import OnlineLaplace
from lam_plugin.pairs import PairSelection, PairSet

from .losses import ContrastiveBatchLoss

__all__ = ["CURVATURES", "RELUS", "PaperLaplaceEmbedder", "PaperOnlineLaplace", "PaperPairSelection"]

CURVATURES = ("pairs", "triplets")
RELUS = ("per_step", "on_use", "per_epoch")


class PaperPairSelection(PairSelection):
    """Pairs with the hinge test optional: with ``hinge=False`` every mined negative counts."""

    def __init__(self, *args: Any, hinge: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hinge = hinge

    def active(self, pairs: PairSet, z: Tensor) -> PairSet:
        return super().active(pairs, z) if self.hinge else pairs


class PaperOnlineLaplace(OnlineLaplace):
    """Online LAM with the paper's Hessian pairs (``curvature``) and ``relu`` placement."""

    def __init__(self, *args: Any, curvature: str = "pairs", relu: str = "per_step", **kwargs: Any) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if relu not in RELUS:
            raise ValueError(f"relu must be one of {RELUS}, got {relu!r}")
        super().__init__(*args, **kwargs)
        self.curvature, self.relu = curvature, relu
        if curvature == "triplets":
            old = self.selection
            self.selection = PaperPairSelection(
                TripletMarginMiner(margin=old.margin, type_of_triplets="all"),
                old.margin,
                old.max_pairs,
                old.generator,
                hinge=getattr(old, "hinge", True),
            )

    def batch_to_data(self, n_pairs: int, batch_size: int) -> float:
        if self.curvature == "triplets":
            return self.dataset_size / batch_size
        return super().batch_to_data(n_pairs, batch_size)

    def accumulate(self, h: Tensor) -> None:
        self.H.add_(h.clamp_min(0) if self.relu == "per_step" else h)

    def end_epoch(self) -> None:
        super().end_epoch()
        if self.relu == "per_epoch":
            self.H.clamp_min_(0)

    def extra(self) -> dict[str, Any]:
        hinge = getattr(self.selection, "hinge", True)
        return {**super().extra(), "curvature": self.curvature, "relu": self.relu, "hinge": hinge}


class PaperLaplaceEmbedder(LaplaceEmbedder):
    """:class:`~lam_plugin.LaplaceEmbedder` with the paper's ``hinge`` option (module
    docstring); online LAM is :class:`PaperOnlineLaplace`, and its loss counts the pairs
    of violating triplets without listing them (:class:`~lam_study.losses.ContrastiveBatchLoss`).

    Args:
        hinge: count a negative only while its hinge is active (the plug-in's rule);
            ``False`` counts every mined negative, as the paper's code does.
        kwargs: as for :class:`~lam_plugin.LaplaceEmbedder`.
    """

    online_class = PaperOnlineLaplace

    def __init__(self, model: torch.nn.Module, *, hinge: bool = True, **kwargs: Any) -> None:
        if not isinstance(hinge, bool):
            raise TypeError(f"hinge must be a bool, got {type(hinge).__name__}")
        super().__init__(model, **kwargs)
        self.hinge = hinge

    def pair_selection(self, max_pairs: int | None, generator: torch.Generator) -> PairSelection:
        return PaperPairSelection(self.miner, self.margin, max_pairs, generator, hinge=self.hinge)

    def loss(self) -> ContrastiveBatchLoss:
        return ContrastiveBatchLoss(self.margin, self.miner)

"""Retrieval, out-of-distribution and calibration metrics for embedding models.

The metrics follow "Bayesian Metric Learning for Uncertainty Quantification in
Image Retrieval" (NeurIPS 2023); where this module deliberately departs from the
paper's code the function's docstring says so.

Conventions shared by every function:

* Inputs are ``torch.Tensor`` (any device; gradients are ignored) or anything
  ``numpy.asarray`` accepts. Values are converted to float64 numpy arrays;
  scalar results are Python ``float``; curves are numpy arrays wrapped in small
  ``NamedTuple`` classes, so they unpack like tuples.
* Inputs are validated: wrong ``ndim``, mismatched lengths, empty inputs, NaN or
  infinite values and out-of-range parameters raise ``ValueError`` (``TypeError``
  for non-numeric data) naming the offending argument.
* Retrieval is leave-one-out: every item queries all the *other* items, ranked
  by Euclidean distance. Candidates are ranked by ``|x|^2 - 2 q.x`` (the squared
  distance less the query's constant ``|q|^2``) in float64, block by block, so
  memory stays at ``O(N * D + block)`` even for ``N = 70,000``. Ties in that
  quantity are broken by the smaller item index, so rankings are deterministic.
* Out-of-distribution (OoD) detection treats OoD as the positive class (label 1)
  and in-distribution as 0; a higher score means "more uncertain".

The modules, one concept each:

* ``retrieval``: mAP@k and recall@k;
* ``ood``: AUROC, AUPRC and their curves;
* ``sparsification``: the sparsification curve and the AUSC;
* ``calibration``: the sample-wise 1-NN votes, the reliability diagram and the ECE;
* ``neighbours``: the leave-one-out k-NN search they share;
* ``inputs``: the conversions and checks of the first two conventions above.
"""

from .calibration import (
    Certain,
    NearestNeighbourVotes,
    ReliabilityDiagram,
    ece,
    nearest_neighbour_votes,
    reliability_diagram,
)
from .inputs import ArrayLike
from .neighbours import nearest_neighbours
from .ood import PrCurve, RocCurve, auprc, auroc, pr_curve, roc_curve
from .retrieval import map_at_k, recall_at_k, retrieval_metrics
from .sparsification import SparsificationCurve, ausc, sparsification_curve

__all__ = [
    "ArrayLike",
    "Certain",
    "NearestNeighbourVotes",
    "PrCurve",
    "ReliabilityDiagram",
    "RocCurve",
    "SparsificationCurve",
    "auprc",
    "auroc",
    "ausc",
    "ece",
    "map_at_k",
    "nearest_neighbour_votes",
    "nearest_neighbours",
    "pr_curve",
    "recall_at_k",
    "reliability_diagram",
    "retrieval_metrics",
    "roc_curve",
    "sparsification_curve",
]

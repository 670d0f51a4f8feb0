"""The paper's training loss, computed from pair counts.

:class:`ContrastiveBatchLoss` extends the plug-in's loss of the same name
(pytorch-metric-learning's ``ContrastiveLoss(pos_margin=0, neg_margin=margin)`` on all
pairs or on a miner's tuples; a triplet ``(a, p, n)`` adds the pairs ``(a, p)`` and
``(a, n)``, and a pair counts once per tuple it appears in).

With ``TripletMarginMiner(margin, type_of_triplets="all")`` (the paper's loss: the
pairs of the margin-violating triplets ``d(a, n) - d(a, p) <= margin``) the library
path materialises every violating triplet, up to ``B^3`` index triples per batch: at
batch 256 it trains the FashionMNIST network at 611 images/s against 910 from counts
(``benchmarks/training.py``, idle 2-core CPU). No library computes that loss from
per-pair counts, so :func:`violating_triplet_loss` does it by hand: it counts, for every
pair, the violating triplets it belongs to (the same float comparisons as the miner,
per anchor over its positives x negatives, in chunks; no index triples) and weights each
pair's cost by its count, which is the same sum.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import TripletMarginMiner
from torch import Tensor

from lam_plugin.losses import ContrastiveBatchLoss as _PluginLoss
from lam_plugin.pairs import Miner

__all__ = ["ContrastiveBatchLoss", "violating_triplet_counts", "violating_triplet_loss"]

#: Elements of one chunk of the ``[anchors, P_max, N_max]`` triplet comparison.
_CHUNK_ELEMENTS = 1 << 24


def _is_euclidean_on_sphere(distance: Any) -> bool:
    return (
        type(distance) is LpDistance
        and distance.p == 2
        and distance.power == 1
        and bool(distance.normalize_embeddings)
    )


def _is_violating_triplet_miner(miner: Miner) -> bool:
    """True for ``TripletMarginMiner(type_of_triplets="all")`` on the default distance."""
    return (
        isinstance(miner, TripletMarginMiner)
        and miner.type_of_triplets == "all"
        and _is_euclidean_on_sphere(miner.distance)
    )


@torch.no_grad()
def violating_triplet_counts(distances: Tensor, labels: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """How many margin-violating triplets each pair of a batch belongs to.

    A triplet ``(a, p, n)`` has ``a != p``, ``y_a = y_p != y_n``, and violates the margin
    when ``d[a, n] - d[a, p] <= margin`` (the comparison of ``TripletMarginMiner`` with
    ``type_of_triplets="all"``, evaluated on the same floats).

    Args:
        distances: ``[B, B]`` pairwise distances.
        labels: ``[B]`` class labels.
        margin: the triplet margin.

    Returns:
        ``(positive [B, B], negative [B, B])`` int64 counts: ``positive[a, p]`` the
        violating triplets ``(a, p, ·)``, ``negative[a, n]`` the violating triplets
        ``(a, ·, n)``; zero off the positive, resp. negative, pairs.
    """
    b = distances.shape[0]
    same = labels[:, None] == labels[None, :]
    positive = same.clone()
    positive.fill_diagonal_(False)
    # each anchor's positives (then its negatives) first in its row, padded to the
    # batch's largest count: the comparison runs over [B, P_max, N_max], not [B, B, B]
    pos_idx, pos_d = _gather_first(distances, positive, pad=float("-inf"))
    neg_idx, neg_d = _gather_first(distances, ~same, pad=float("inf"))
    pos_counts = torch.zeros(b, b, dtype=torch.int64, device=distances.device)
    neg_counts = torch.zeros_like(pos_counts)
    chunk = max(1, _CHUNK_ELEMENTS // max(pos_d.shape[1] * neg_d.shape[1], 1))
    for start in range(0, b, chunk):
        rows = slice(start, start + chunk)
        # violates[a, j, k] = d[a, n_k] - d[a, p_j] <= margin; a padded p (-inf) or n
        # (+inf) makes the difference +inf, which never violates
        violates = (neg_d[rows, None, :] - pos_d[rows, :, None]) <= margin
        pos_counts[rows].scatter_(1, pos_idx[rows], violates.sum(2))
        neg_counts[rows].scatter_(1, neg_idx[rows], violates.sum(1))
    return pos_counts, neg_counts


def _gather_first(distances: Tensor, mask: Tensor, pad: float) -> tuple[Tensor, Tensor]:
    """Per row, the columns where ``mask`` holds and their distances, ``pad`` after them.

    Returns ``(columns [B, K], values [B, K])`` with ``K`` the largest row count of
    ``mask``; the padded columns are columns outside ``mask``.
    """
    k = int(mask.sum(1).max()) if mask.numel() else 0
    columns = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    values = distances.gather(1, columns).masked_fill(~mask.gather(1, columns), pad)
    return columns, values


def _weighted_nonzero_mean(costs: Tensor, weights: Tensor, embeddings: Tensor) -> Tensor:
    """``sum(w * c) / sum(w)`` over the entries with ``c > 0``; a zero tied to the graph if none."""
    keep = costs > 0
    total = weights[keep].sum()
    if total < 1:
        return torch.sum(embeddings * 0)
    return (costs[keep] * weights[keep]).sum() / total


def violating_triplet_loss(
    embeddings: Tensor, labels: Tensor, triplet_margin: float, neg_margin: float
) -> Tensor:
    """The contrastive loss on the pairs of the margin-violating triplets of a batch.

    Equals ``ContrastiveLoss(pos_margin=0, neg_margin=neg_margin)(embeddings, labels,
    TripletMarginMiner(triplet_margin, type_of_triplets="all")(embeddings, labels))`` up
    to the order of float summation: with ``c⁺[a, p]``, ``c⁻[a, n]`` the triplet counts of
    :func:`violating_triplet_counts` on ``d`` = Euclidean distance of the L2-normalised
    embeddings,

        L = Σ c⁺ d / Σ_{d > 0} c⁺  +  Σ c⁻ max(0, m - d) / Σ_{m - d > 0} c⁻,

    each term zero when it has no pair of non-zero cost, and ``L = 0`` when at most one
    triplet violates the margin (the library's rule for at most one pair of each kind).

    Args:
        embeddings: ``[B, D]`` network outputs (normalised here).
        labels: ``[B]`` class labels.
        triplet_margin: the miner's margin.
        neg_margin: the negative margin of the contrastive loss.

    Returns:
        The scalar loss, differentiable in ``embeddings``.
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings must be [B, D] and labels [B], got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.to(embeddings.device)
    distance = LpDistance()
    d = distance(embeddings)
    pos_counts, neg_counts = violating_triplet_counts(d.detach(), labels, triplet_margin)
    if pos_counts.sum() <= 1:
        return torch.sum(embeddings * 0) * 2
    a, p = pos_counts.nonzero(as_tuple=True)
    a2, n = neg_counts.nonzero(as_tuple=True)
    pos_term = _weighted_nonzero_mean(torch.relu(d[a, p]), pos_counts[a, p], embeddings)
    neg_term = _weighted_nonzero_mean(torch.relu(neg_margin - d[a2, n]), neg_counts[a2, n], embeddings)
    return pos_term + neg_term


class ContrastiveBatchLoss(_PluginLoss):
    """The plug-in's contrastive batch loss; with a ``TripletMarginMiner(type_of_triplets=
    "all")`` on its default distance the miner is not called: :func:`violating_triplet_loss`
    computes the same loss from pair counts (see the module docstring), so such a miner's
    statistics are not updated.

    Args:
        margin: the negative margin.
        miner: ``"all"`` or a pytorch-metric-learning miner.
    """

    def __init__(self, margin: float, miner: Miner = "all") -> None:
        super().__init__(margin, miner)
        self.counts_pairs = _is_violating_triplet_miner(miner)

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.counts_pairs:
            return violating_triplet_loss(embeddings, labels, float(self.miner.margin), self.margin)
        return super().__call__(embeddings, labels)

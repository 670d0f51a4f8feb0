"""Pairs of a batch: labels or miner tuples -> positive and negative index pairs.

Conventions (docs/design.md §2):

* ``miner="all"``: the unordered pairs ``{i, j}``, ``i < j``, of one batch.
* a pytorch-metric-learning miner: each tuple it returns contributes its pairs as
  given; a triplet ``(a, p, n)`` adds ``(a, p)`` and ``(a, n)``, and a pair that
  appears in several tuples counts as often as it appears.
* a negative pair counts only while its hinge is active, ``||z_i - z_j||^2 < margin``
  on the L2-normalised embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

Miner = str | Any

__all__ = ["Miner", "PairCounts", "PairSelection", "PairSet", "active", "all_pairs", "check_miner", "make_pairs", "subsample"]


@dataclass(frozen=True)
class PairSet:
    """Index pairs of one batch with their kind.

    Attributes:
        i, j: ``[P]`` int64 indices into the batch.
        positive: ``[P]`` bool, True for a positive (same-label) pair.
    """

    i: Tensor
    j: Tensor
    positive: Tensor

    def __len__(self) -> int:
        return self.i.numel()

    @property
    def n_positive(self) -> int:
        return int(self.positive.sum())

    @property
    def n_negative(self) -> int:
        return len(self) - self.n_positive

    @property
    def sign(self) -> Tensor:
        """``[P]`` +1 for positive pairs, -1 for negative pairs (the sign of their curvature)."""
        return self.positive.to(torch.int8) * 2 - 1

    def select(self, mask: Tensor) -> PairSet:
        return PairSet(self.i[mask], self.j[mask], self.positive[mask])


def all_pairs(labels: Tensor) -> PairSet:
    """Every unordered pair ``{i, j}``, ``i < j``, of a batch: the positives, then the
    negatives, each in row-major order.

    pytorch-metric-learning's ``get_all_pairs_indices`` gives the same pairs in both
    orders; this is its upper triangle, formed here so that the default fit needs no
    pytorch-metric-learning (an optional dependency, for miners and online LAM).
    """
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(1)
    a1, p = (same & upper).nonzero(as_tuple=True)
    a2, n = (~same & upper).nonzero(as_tuple=True)
    return _from_pml((a1, p, a2, n))


def _from_pml(indices: tuple[Tensor, ...]) -> PairSet:
    a1, p, a2, n = indices
    i = torch.cat([a1, a2]).long()
    j = torch.cat([p, n]).long()
    positive = torch.cat(
        [torch.ones_like(a1, dtype=torch.bool), torch.zeros_like(a2, dtype=torch.bool)]
    )
    return PairSet(i, j, positive)


def check_miner(miner: Miner) -> None:
    """Raise unless ``miner`` is ``"all"`` or a callable (a pytorch-metric-learning miner)."""
    if isinstance(miner, str):
        if miner != "all":
            raise ValueError(f"miner must be 'all' or a pytorch-metric-learning miner, got {miner!r}")
    elif not callable(miner):
        raise TypeError(f"miner must be 'all' or a callable pytorch-metric-learning miner, got {type(miner)}")


def make_pairs(labels: Tensor, miner: Miner = "all", embeddings: Tensor | None = None) -> PairSet:
    """Pairs of a batch from its ``labels [B]`` (``miner="all"``) or a PML miner.

    A miner is called as ``miner(embeddings, labels)`` and may return pairs
    ``(a1, p, a2, n)`` or triplets ``(a, p, n)``.
    """
    check_miner(miner)
    if isinstance(miner, str):
        return all_pairs(labels)
    if embeddings is None:
        raise ValueError("a miner needs the batch embeddings")
    indices = miner(embeddings, labels)
    if not isinstance(indices, tuple) or len(indices) not in (3, 4):
        raise ValueError(
            "the miner must return pairs (a1, p, a2, n) or triplets (a, p, n), "
            f"got {type(indices).__name__} of length {len(indices) if isinstance(indices, tuple) else '?'}"
        )
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # a miner object implies the library

    return _from_pml(lmu.convert_to_pairs(indices, labels))


def active(pairs: PairSet, z: Tensor, margin: float) -> PairSet:
    """Keep positives and the negatives whose hinge is active: ``||z_i - z_j||^2 < margin``.

    ``z`` is ``[B, D]`` L2-normalised.
    """
    d2 = (z[pairs.i] - z[pairs.j]).pow(2).sum(-1)
    return pairs.select(pairs.positive | (d2 < margin))


def subsample(pairs: PairSet, max_pairs: int | None, generator: torch.Generator | None = None) -> PairSet:
    """At most ``max_pairs`` pairs, drawn uniformly without replacement."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    keep = torch.randperm(len(pairs), generator=generator)[:max_pairs].to(pairs.i.device)
    return pairs.select(keep)


@dataclass
class PairCounts:
    """Running pair counts of a fit: positives, active negatives, all negatives."""

    positive: int = 0
    negative_active: int = 0
    negative_total: int = 0


@dataclass
class PairSelection:
    """How a fit turns a batch into curvature pairs (docs/design.md §2).

    Attributes:
        miner: ``"all"`` or a pytorch-metric-learning miner.
        margin: the hinge margin on squared distances of normalised embeddings.
        max_pairs: at most this many pairs (drawn at random) per batch.
        generator: for that draw.
        counts: updated by every call.
    """

    miner: Miner = "all"
    margin: float = 0.7
    max_pairs: int | None = None
    generator: torch.Generator | None = None
    counts: PairCounts = field(default_factory=PairCounts)

    def __call__(self, labels: Tensor, f: Tensor) -> PairSet:
        """The pairs of a batch with outputs ``f [B, D]`` that enter its curvature."""
        z = torch.nn.functional.normalize(f, dim=-1)
        pairs = make_pairs(labels, self.miner, z)
        self.counts.negative_total += pairs.n_negative
        pairs = self.active(pairs, z)
        pairs = subsample(pairs, self.max_pairs, self.generator)
        self.counts.positive += pairs.n_positive
        self.counts.negative_active += pairs.n_negative
        return pairs

    def checkpoint(self) -> tuple[PairCounts, Tensor | None]:
        """The counts and the generator's state, for :meth:`rewind` before a batch is redone."""
        return replace(self.counts), None if self.generator is None else self.generator.get_state()

    def rewind(self, point: tuple[PairCounts, Tensor | None]) -> None:
        """Back to a :meth:`checkpoint`: a batch redone (by another backend) counts once."""
        counts, state = point
        self.counts.positive, self.counts.negative_active = counts.positive, counts.negative_active
        self.counts.negative_total = counts.negative_total
        if self.generator is not None and state is not None:
            self.generator.set_state(state)

    def active(self, pairs: PairSet, z: Tensor) -> PairSet:
        """The pairs whose curvature is not zero: the positives and the negatives whose
        hinge is active (:func:`active`); ``z`` is ``[B, D]`` L2-normalised."""
        return active(pairs, z, self.margin)

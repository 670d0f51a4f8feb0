"""The contrastive loss of one batch, on all its pairs or on a miner's tuples.

:class:`ContrastiveBatchLoss` is pytorch-metric-learning's
``ContrastiveLoss(pos_margin=0, neg_margin=margin)`` (L2-normalised embeddings,
Euclidean distance d; a positive pair costs ``d``, a negative pair ``max(0, margin - d)``;
each kind is averaged over its pairs of non-zero cost and the two averages added) on
every pair of the batch (``miner="all"``) or on the tuples of a pytorch-metric-learning
miner. It is the training loss of online LAM (docs/design.md §4).
"""

from __future__ import annotations

from torch import Tensor

from .pairs import Miner, check_miner

__all__ = ["ContrastiveBatchLoss"]


class ContrastiveBatchLoss:
    """The contrastive loss of one batch: ``loss(embeddings [B, D], labels [B]) -> scalar``.

    Args:
        margin: the negative margin.
        miner: ``"all"`` or a pytorch-metric-learning miner.

    Raises:
        ImportError: pytorch-metric-learning is not installed (``pip install
            'lam-plugin[pml]'``).
    """

    def __init__(self, margin: float, miner: Miner = "all") -> None:
        check_miner(miner)
        try:
            from pytorch_metric_learning.losses import ContrastiveLoss
        except ImportError as err:
            raise ImportError(
                "the contrastive loss of online LAM comes from pytorch-metric-learning, which is not installed: "
                "pip install 'lam-plugin[pml]'"
            ) from err
        self.margin = float(margin)
        self.miner = miner
        self._library_loss = ContrastiveLoss(pos_margin=0.0, neg_margin=self.margin)

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        tuples = None if isinstance(self.miner, str) else self.miner(embeddings, labels)
        return self._library_loss(embeddings, labels, tuples)

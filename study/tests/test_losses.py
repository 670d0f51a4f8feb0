"""The batch contrastive loss against pytorch-metric-learning, value and gradient."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner, TripletMarginMiner

from lam_study.losses import ContrastiveBatchLoss, violating_triplet_counts, violating_triplet_loss


def _library(emb: torch.Tensor, y: torch.Tensor, triplet_margin: float, neg_margin: float) -> torch.Tensor:
    miner = TripletMarginMiner(margin=triplet_margin, type_of_triplets="all")
    return ContrastiveLoss(pos_margin=0, neg_margin=neg_margin)(emb, y, miner(emb, y))


@pytest.mark.parametrize(
    ("batch", "dim", "classes", "scale"),
    [(64, 3, 10, 1.0), (64, 3, 10, 100.0), (40, 16, 2, 0.01), (33, 3, 33, 1.0), (16, 3, 1, 1.0), (5, 2, 2, 1.0), (128, 3, 4, 1.0)],
)
def test_violating_triplet_loss_equals_library_loss_on_mined_triplets(batch, dim, classes, scale):
    g = torch.Generator().manual_seed(batch + dim + classes)
    emb = torch.randn(batch, dim, generator=g) * scale
    y = torch.randint(0, classes, (batch,), generator=g)
    ours_in, lib_in = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    ours = violating_triplet_loss(ours_in, y, 0.7, 0.7)
    lib = _library(lib_in, y, 0.7, 0.7)
    ours.backward()
    lib.backward()
    torch.testing.assert_close(ours, lib, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, lib_in.grad, rtol=1e-4, atol=1e-6)


def test_violating_triplet_loss_with_distinct_margins():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 3, generator=g)
    y = torch.randint(0, 5, (50,), generator=g)
    torch.testing.assert_close(violating_triplet_loss(emb, y, 0.2, 1.1), _library(emb, y, 0.2, 1.1))


def test_counts_by_hand():
    # one anchor 0 with positive 1 (d = 1) and negatives 2 (d = 1.5), 3 (d = 2.5)
    d = torch.tensor(
        [
            [0.0, 1.0, 1.5, 2.5],
            [1.0, 0.0, 2.0, 2.0],
            [1.5, 2.0, 0.0, 3.0],
            [2.5, 2.0, 3.0, 0.0],
        ]
    )
    y = torch.tensor([0, 0, 1, 2])
    pos, neg = violating_triplet_counts(d, y, margin=0.7)
    # anchor 0: (0,1,2) violates (1.5 - 1 <= 0.7), (0,1,3) not (2.5 - 1 > 0.7)
    # anchor 1: (1,0,2) and (1,0,3) do not (2 - 1 > 0.7); anchors 2, 3 have no positive
    assert pos.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert neg.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # the boundary counts, as the miner's <=
    pos, neg = violating_triplet_counts(d, y, margin=1.0)
    assert pos[1, 0] == 2 and neg[1, 2] == 1 and neg[1, 3] == 1


def test_one_or_no_violating_triplet_gives_zero_with_gradient_like_the_library():
    # two classes far apart: no triplet violates a small margin
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    ours = violating_triplet_loss(emb, y, 0.1, 0.7)
    lib = _library(emb, y, 0.1, 0.7)
    assert ours.item() == lib.item() == 0.0
    assert ours.requires_grad and lib.requires_grad
    # exactly one violating triplet: the library returns zero, and so do we
    # ((0, 1, 2): 0.10 - 1.41 <= 0.01; (1, 0, 2): 1.48 - 1.41 > 0.01)
    emb1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -0.1]], requires_grad=True)
    y1 = torch.tensor([0, 0, 1])
    miner = TripletMarginMiner(margin=0.01, type_of_triplets="all")
    assert len(miner(emb1, y1)[0]) == 1
    assert violating_triplet_loss(emb1, y1, 0.01, 0.7).item() == _library(emb1, y1, 0.01, 0.7).item() == 0.0


def test_batch_loss_uses_counts_only_for_the_plain_triplet_miner():
    assert ContrastiveBatchLoss(0.7, TripletMarginMiner(margin=0.7, type_of_triplets="all")).counts_pairs
    assert not ContrastiveBatchLoss(0.7, TripletMarginMiner(margin=0.7, type_of_triplets="semihard")).counts_pairs
    assert not ContrastiveBatchLoss(
        0.7, TripletMarginMiner(margin=0.7, type_of_triplets="all", distance=CosineSimilarity())
    ).counts_pairs
    assert not ContrastiveBatchLoss(0.7).counts_pairs


@pytest.mark.parametrize("miner", ["all", MultiSimilarityMiner(), TripletMarginMiner(margin=0.3, type_of_triplets="hard")])
def test_batch_loss_is_the_library_loss_for_other_miners(miner):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(30, 3, generator=g)
    y = torch.randint(0, 4, (30,), generator=g)
    tuples = None if miner == "all" else miner(emb, y)
    expected = ContrastiveLoss(pos_margin=0, neg_margin=0.7)(emb, y, tuples)
    torch.testing.assert_close(ContrastiveBatchLoss(0.7, miner)(emb, y), expected)


def test_batch_loss_rejects_bad_miners_and_shapes():
    with pytest.raises(ValueError, match="miner must be 'all'"):
        ContrastiveBatchLoss(0.7, "triplets")
    with pytest.raises(TypeError, match="callable"):
        ContrastiveBatchLoss(0.7, 3)
    with pytest.raises(ValueError, match=r"embeddings must be \[B, D\]"):
        violating_triplet_loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 0.7, 0.7)


def test_training_with_the_triplet_miner_follows_the_library_path():
    from lam_study.models import mlp_embedder
    from lam_study.training import train_contrastive

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    miner = TripletMarginMiner(margin=0.7, type_of_triplets="all")
    weights = []
    # SGD: its step is linear in the gradient, so the two paths' float rounding stays at
    # rounding size (RMSprop divides near-zero gradients by their own size)
    for chosen in (miner, lambda e, t: miner(e, t)):  # a plain callable takes the library path
        torch.manual_seed(0)
        model = mlp_embedder(8, 3)
        history = train_contrastive(
            model, x, y, epochs=2, batch_size=32, miner=chosen, optimizer="sgd", lr=0.1, seed=0, progress=False
        )
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert len(history.batch_losses) == 6
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)

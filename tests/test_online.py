"""Online LAM (docs/design.md §4): the curvature pairs, the loaders ``fit_online`` takes,
its default data-set size, and the running curvature of half-precision models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin import L2Normalize, LaplaceEmbedder
from lam_plugin.losses import ContrastiveBatchLoss

pytest.importorskip("pytorch_metric_learning")  # the training loss of online LAM


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4), L2Normalize())


def _batch(n: int = 12, classes: int = 3) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 10, generator=torch.Generator().manual_seed(1)), torch.arange(n) % classes


def test_online_curvature_pairs_are_every_pair_whatever_the_loss_miner():
    """Design §4 step 3: with a miner, the loss takes its tuples but the curvature takes
    every pair of the batch (``miner="all"``): 12 items of 3 classes have 18 positive and
    48 negative pairs, and the step adds what a post-hoc fit with ``miner="all"`` gives."""
    from pytorch_metric_learning.miners import TripletMarginMiner

    model = _mlp()
    before = copy.deepcopy(model)
    x, y = _batch()
    miner = TripletMarginMiner(margin=0.2, type_of_triplets="hard")
    lam = LaplaceEmbedder(model, miner=miner, approx="pos", prior_precision=1e12, progress=False)
    trainer = lam.online(x, dataset_size=100, max_pairs=None)
    assert trainer.loss_fn.miner is miner and lam.miner is miner
    h0 = trainer.H.clone()
    trainer.step(x, y)
    counts = trainer.selection.counts
    assert (counts.positive, counts.negative_total) == (18, 48)
    fit = LaplaceEmbedder(before, approx="pos", progress=False).fit([(x, y)])
    assert (fit.stats.n_positive, fit.stats.n_negative_total) == (18, 48)
    n_pairs = fit.stats.n_positive + fit.stats.n_negative_active
    added = trainer.H - trainer.memory_factor * h0
    expected = 100**2 / n_pairs * fit.curvature.clamp_min(0)
    assert float(expected.max()) > 0
    torch.testing.assert_close(added, expected, rtol=1e-3, atol=1e-3 * float(expected.max()))


class _DrainingLoader:
    """Re-iterable, but empty once it has been iterated to the end (a loader over a
    stream that is not rewound)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        yield from self.batches
        self.batches = []


def test_fit_online_refuses_one_shot_iterators_and_empty_epochs():
    """A generator would give its first batch to the set-up and nothing to later epochs:
    refused as ``fit`` refuses it, before any training; an epoch without batches fails."""
    batches = [_batch() for _ in range(3)]
    model = _mlp()
    start = copy.deepcopy(model.state_dict())
    lam = LaplaceEmbedder(model, progress=False)
    with pytest.raises(TypeError, match="loader must be re-iterable"):
        lam.fit_online((b for b in batches), epochs=5, dataset_size=36)
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="the loader yielded no batch in epoch 2 of 5"):
        lam.fit_online(_DrainingLoader(batches), epochs=5, dataset_size=36)
    post = LaplaceEmbedder(_mlp(), progress=False).fit_online(batches, epochs=5, dataset_size=36)
    assert post.stats.n_batches == 15


def test_fit_online_counts_the_items_of_pair_batches():
    """A loader of (anchor, positive) rows yields two items per row: the default data-set
    size of ``fit_online`` is ``2 * len(dataset)``, the items ``fit`` counts."""
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(24, 10, generator=g), torch.randn(24, 10, generator=g)), batch_size=6)
    assert LaplaceEmbedder(_mlp(), progress=False).fit(loader).stats.n_data == 48
    post = LaplaceEmbedder(_mlp(), progress=False).fit_online(loader, epochs=1, memory_factor=1.0)
    assert post.stats.n_data == 48
    # an explicit size is taken as it is
    post = LaplaceEmbedder(_mlp(), progress=False).fit_online(loader, epochs=1, dataset_size=30)
    assert post.stats.n_data == 30


class _Float32Loss(ContrastiveBatchLoss):
    """pytorch-metric-learning's distances have no bfloat16 CPU kernel: the loss runs in float32."""

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return super().__call__(embeddings.float(), labels)


class _Bf16Embedder(LaplaceEmbedder):
    def loss(self) -> ContrastiveBatchLoss:
        return _Float32Loss(self.margin, self.miner)


def test_a_bfloat16_model_keeps_its_running_curvature_in_float32():
    """bfloat16 holds three significant digits, so ``H <- 0.999 H`` would leave it as it
    was: ``H`` is float32, the sampled weights are bfloat16, and the posterior's curvature
    has the dtype of a post-hoc fit of the same model."""
    model = _mlp().to(torch.bfloat16)
    x, _ = _batch()
    distinct = torch.arange(12)  # no positive pair: approx="pos" has no curvature, H only decays
    trainer = _Bf16Embedder(model, approx="pos", progress=False).online(x, dataset_size=1000)
    assert trainer.H.dtype == torch.float32
    for _ in range(20):
        trainer.step(x, distinct)
    torch.testing.assert_close(trainer.H, torch.full_like(trainer.H, 1000 * 0.999**20))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    decayed = 0.999 * trainer.H
    trainer.step(x, torch.arange(12) % 3)  # positive pairs: curvature is added
    assert bool((trainer.H - decayed).max() > 1e-3 * decayed.max())
    fitted = LaplaceEmbedder(copy.deepcopy(model), approx="pos", progress=False).fit([(x.bfloat16(), _batch()[1])])
    post = trainer.posterior()
    assert post.curvature.dtype == fitted.curvature.dtype == torch.bfloat16
    assert post.sample(x, n=2).shape == (2, 12, 4)

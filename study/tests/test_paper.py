"""The paper's options (lam_study.paper): ``hinge=False``, online LAM's ``curvature=
"triplets"`` and its ``relu`` placements, each checked against a post-hoc fit."""

from __future__ import annotations

import copy

import pytest
import torch
from reference_models import paper_cnn
from torch.utils.data import DataLoader, TensorDataset

from lam_study.paper import PaperLaplaceEmbedder


def _loader(shape, n=24, batch=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % classes
    return DataLoader(TensorDataset(x, y), batch_size=batch)


@pytest.mark.parametrize("approx", ["fix", "pos", "full"])
@pytest.mark.parametrize("curvature", ["pairs", "triplets"])
def test_online_curvature_update_matches_a_post_hoc_fit_of_the_batch(curvature, approx):
    """One step adds relu(h) times the rescaling of its convention, h the GGN of the batch's
    Hessian pairs under ``approx``: checked against ``fit`` on the same batch with the same
    pairs (a prior so large that the sampled weights equal the mean to 1e-6)."""
    from pytorch_metric_learning.miners import TripletMarginMiner

    torch.manual_seed(0)
    model = paper_cnn(normalize=False)
    x, y = next(iter(_loader((1, 28, 28), n=16, batch=16, classes=3)))
    n_data = 1000
    before = copy.deepcopy(model)
    lam = PaperLaplaceEmbedder(model, prior_precision=1e12, approx=approx, progress=False)
    trainer = lam.online(x, dataset_size=n_data, max_pairs=None, curvature=curvature)
    h0 = trainer.H.clone()
    trainer.step(x, y)
    miner = "all" if curvature == "pairs" else TripletMarginMiner(margin=lam.margin, type_of_triplets="all")
    fit = PaperLaplaceEmbedder(before, miner=miner, approx=approx, progress=False).fit([(x, y)])
    n_pairs = fit.stats.n_positive + fit.stats.n_negative_active
    assert n_pairs > 0 and fit.curvature.max() > 0
    factor = n_data / len(y) if curvature == "triplets" else n_data**2 / n_pairs
    added = trainer.H - trainer.memory_factor * h0
    # ``fit`` keeps a ``pos`` sum signed (the exact arccos block Hessian is indefinite) and
    # the posterior clamps it where it is used; one online step adds relu(h)
    torch.testing.assert_close(
        added, factor * fit.curvature.clamp_min(0), rtol=1e-3, atol=1e-3 * float(added.abs().max())
    )
    assert trainer.posterior().config.extra["curvature"] == curvature
    assert trainer.posterior().config.approx == approx
    with pytest.raises(ValueError, match="curvature must be one of"):
        lam.online(x, dataset_size=n_data, curvature="quadruplets")  # type: ignore[arg-type]


def test_online_relu_on_use_accumulates_the_signed_batch_curvature():
    """``relu="on_use"`` adds the signed batch term h; ``"per_step"`` adds relu(h) (the other
    test checks that against ``fit``). Same model, seed and batch for both."""
    torch.manual_seed(0)
    model = paper_cnn(normalize=False)
    x, y = next(iter(_loader((1, 28, 28), n=16, batch=16, classes=3)))
    added, trainers = {}, {}
    for relu in ("per_step", "on_use", "per_epoch"):
        lam = PaperLaplaceEmbedder(copy.deepcopy(model), prior_precision=1e12, progress=False)
        trainer = trainers[relu] = lam.online(x, dataset_size=1000, max_pairs=None, curvature="triplets", relu=relu)
        h0 = trainer.H.clone()
        trainer.step(x, y)
        added[relu] = trainer.H - trainer.memory_factor * h0
        post = trainer.posterior()
        assert post.config.extra["relu"] == relu and (post.curvature >= 0).all()
    assert (added["on_use"] < 0).any(), "the batch must have negative curvature entries to tell the two apart"
    scale = float(added["per_step"].abs().max())
    torch.testing.assert_close(added["per_step"], added["on_use"].clamp_min(0), rtol=1e-4, atol=1e-5 * scale)
    # per_epoch accumulates the signed term as on_use does, and clamps the sum at the epoch's end
    torch.testing.assert_close(added["per_epoch"], added["on_use"], rtol=1e-4, atol=1e-5 * scale)
    for relu, trainer in trainers.items():
        trainer.H.fill_(-5.0)
        trainer.H[0] = 7.0
        trainer.end_epoch()
        expected = torch.full_like(trainer.H, 0.0 if relu == "per_epoch" else -5.0)
        expected[0] = 7.0
        torch.testing.assert_close(trainer.H, expected)
    trainer = trainers["on_use"]
    # a running sum that went negative draws weights with the prior's variance only
    trainer.H.fill_(-5.0)
    assert (trainer.posterior().curvature == 0).all()
    with pytest.raises(ValueError, match="relu must be one of"):
        lam.online(x, dataset_size=1000, relu="never")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hinge must be a bool"):
        PaperLaplaceEmbedder(model, hinge="off")  # type: ignore[arg-type]


def test_online_without_hinge_counts_every_negative():
    """An embedder with ``hinge=False`` counts inactive negatives too, in ``fit`` and online. The curvature of an active negative
    does not depend on the margin, so ``fit`` with a margin beyond every squared distance
    (4 on the unit sphere) is the reference."""
    torch.manual_seed(0)
    model = paper_cnn(normalize=False)
    x, y = next(iter(_loader((1, 28, 28), n=16, batch=16, classes=3)))
    n_data = 1000
    before = copy.deepcopy(model)
    lam = PaperLaplaceEmbedder(model, prior_precision=1e12, margin=0.1, hinge=False, progress=False)
    trainer = lam.online(x, dataset_size=n_data, max_pairs=None, curvature="pairs")
    h0 = trainer.H.clone()
    trainer.step(x, y)
    counts = trainer.selection.counts
    assert counts.negative_active == counts.negative_total > 0
    hinged = PaperLaplaceEmbedder(copy.deepcopy(before), margin=0.1, progress=False).fit([(x, y)])
    assert hinged.stats.n_negative_active < counts.negative_total  # the margin 0.1 deactivates some
    no_hinge = PaperLaplaceEmbedder(copy.deepcopy(before), margin=0.1, hinge=False, progress=False).fit([(x, y)])
    fit = PaperLaplaceEmbedder(before, margin=4.5, progress=False).fit([(x, y)])
    assert fit.stats.n_negative_active == no_hinge.stats.n_negative_active == counts.negative_total
    torch.testing.assert_close(no_hinge.curvature, fit.curvature)
    n_pairs = fit.stats.n_positive + fit.stats.n_negative_active
    added = trainer.H - trainer.memory_factor * h0
    torch.testing.assert_close(
        added, n_data**2 / n_pairs * fit.curvature, rtol=1e-3, atol=1e-3 * float(added.abs().max())
    )
    assert trainer.posterior().config.extra["hinge"] is False and not torch.equal(hinged.curvature, fit.curvature)

"""The default pairs of a batch, formed without pytorch-metric-learning, are its pairs."""

from __future__ import annotations

import pytest
import torch

from lam_plugin.pairs import all_pairs


def test_all_pairs_by_hand():
    pairs = all_pairs(torch.tensor([0, 1, 0, 1]))
    assert pairs.i.tolist() == [0, 1, 0, 0, 1, 2]
    assert pairs.j.tolist() == [2, 3, 1, 3, 2, 3]
    assert pairs.positive.tolist() == [True, True, False, False, False, False]
    assert len(all_pairs(torch.tensor([5]))) == 0


def test_all_pairs_are_pytorch_metric_learnings_upper_triangle_in_its_order():
    lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        y = torch.randint(0, 4, (int(torch.randint(2, 40, (), generator=g)),), generator=g)
        a1, p, a2, n = lmu.get_all_pairs_indices(y)
        keep_p, keep_n = a1 < p, a2 < n
        pairs = all_pairs(y)
        assert torch.equal(pairs.i, torch.cat([a1[keep_p], a2[keep_n]]))
        assert torch.equal(pairs.j, torch.cat([p[keep_p], n[keep_n]]))
        assert pairs.n_positive == int(keep_p.sum())

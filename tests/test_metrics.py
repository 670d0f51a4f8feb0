"""Tests for lam_plugin.metrics: hand-computed cases, library cross-checks and validation."""

from __future__ import annotations

import logging
from collections.abc import Callable

import faiss
import numpy as np
import pytest
import torch

from lam_plugin import metrics as M

# scikit-learn and torchmetrics serve only as references here: the plug-in computes
# every metric itself, so the tests that compare with them skip where they are absent.

# --------------------------------------------------------------------------- retrieval

# 1-D toy set. All 15 pairwise distances are distinct: 1,2,3,4,5,6,7,8,9,11,12,13,17,19,20.
TOY_X = np.array([[0.0], [1.0], [3.0], [7.0], [12.0], [20.0]])
TOY_Y = np.array([0, 0, 1, 1, 0, 2])
# Rankings (neighbour index, distance, label) and hits h_r:
#   q0 (label 0, P=2): 1(1,0) 2(3,1) 3(7,1) 4(12,0) 5(20,2)  -> h = 1 0 0 1 0
#   q1 (label 0, P=2): 0(1,0) 2(2,1) 3(6,1) 4(11,0) 5(19,2)  -> h = 1 0 0 1 0
#   q2 (label 1, P=1): 1(2,0) 0(3,0) 3(4,1) 4(9,0)  5(17,2)  -> h = 0 0 1 0 0
#   q3 (label 1, P=1): 2(4,1) 4(5,0) 1(6,0) 0(7,0)  5(13,2)  -> h = 1 0 0 0 0
#   q4 (label 0, P=2): 3(5,1) 5(8,2) 2(9,1) 1(11,0) 0(12,0)  -> h = 0 0 0 1 1
#   q5 (label 2, P=0): no positive -> excluded (the paper's code would score it AP = 1)
# k=1: AP = 1, 1, 0, 1, 0                      -> mAP = 3/5;   recall = 3/5
# k=3: AP = (1/1)/2, (1/1)/2, (1/3)/1, 1, 0    -> mAP = (1/2 + 1/2 + 1/3 + 1 + 0)/5 = 7/15;  recall = 4/5
# k=4: AP = (1/1 + 2/4)/2 = 3/4, 3/4, 1/3, 1, (1/4)/2 = 1/8
#                                              -> mAP = (90 + 90 + 40 + 120 + 15)/120/5 = 71/120; recall = 1
# k=5: q4 becomes (1/4 + 2/5)/2 = 13/40        -> mAP = (90 + 90 + 40 + 120 + 39)/120/5 = 379/600; recall = 1
TOY_EXPECTED = {
    1: (3 / 5, 3 / 5),
    3: (7 / 15, 4 / 5),
    4: (71 / 120, 1.0),
    5: (379 / 600, 1.0),
}


@pytest.mark.parametrize("k", sorted(TOY_EXPECTED))
def test_toy_map_and_recall_by_hand(k: int) -> None:
    expected_map, expected_recall = TOY_EXPECTED[k]
    assert M.map_at_k(TOY_X, TOY_Y, k) == pytest.approx(expected_map, abs=1e-12)
    assert M.recall_at_k(TOY_X, TOY_Y, k) == pytest.approx(expected_recall, abs=1e-12)


def test_retrieval_metrics_matches_single_k_calls_and_map1_equals_recall1() -> None:
    result = M.retrieval_metrics(TOY_X, TOY_Y, ks=(1, 3, 4, 5))
    assert set(result) == {f"{m}@{k}" for m in ("map", "recall") for k in (1, 3, 4, 5)}
    for k, (expected_map, expected_recall) in TOY_EXPECTED.items():
        assert result[f"map@{k}"] == pytest.approx(expected_map, abs=1e-12)
        assert result[f"recall@{k}"] == pytest.approx(expected_recall, abs=1e-12)
    assert result["map@1"] == result["recall@1"]
    assert all(isinstance(v, float) for v in result.values())


def test_labels_need_not_be_contiguous_ints() -> None:
    relabelled = np.array([7, 7, -3, -3, 7, 100])
    assert M.map_at_k(TOY_X, relabelled, 4) == pytest.approx(71 / 120)


def test_query_without_positives_is_excluded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lam_plugin.metrics"):
        value = M.map_at_k(TOY_X, TOY_Y, 1)
    # Excluding q5 gives 3/5; the paper's AP = 1 convention would give (3 + 1)/6 = 2/3.
    assert value == pytest.approx(3 / 5)
    assert "1 of 6 queries have no positive" in caplog.text


def test_no_query_with_positives_raises() -> None:
    with pytest.raises(ValueError, match="no query has a positive"):
        M.retrieval_metrics(TOY_X, np.arange(6), ks=(1,))


def test_tied_distances_break_by_smaller_index() -> None:
    # Integer coordinates: the float64 distances are exact, so the ties are exact.
    x = np.array([[0.0], [1.0], [1.0], [1.0]])
    expected = np.array([[1, 2, 3], [2, 3, 0], [1, 3, 0], [1, 2, 0]])
    for chunk_size in (None, 1, 3):
        np.testing.assert_array_equal(M.nearest_neighbours(x, 3, chunk_size=chunk_size), expected)
    # A tie straddling the cut-off keeps the lowest indices: q0 has 1, 2, 3 all at distance 1.
    np.testing.assert_array_equal(M.nearest_neighbours(x, 2), expected[:, :2])
    np.testing.assert_array_equal(M.nearest_neighbours(x, 1), expected[:, :1])


def test_many_exact_ties_match_a_stable_full_sort() -> None:
    # 300 points on a 3 x 3 integer grid: every row has long runs of equal distances.
    x = np.random.default_rng(3).integers(0, 3, size=(300, 2)).astype(np.float64)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    expected = np.argsort(dist, axis=1, kind="stable")[:, :7]
    for chunk_size in (None, 64):
        np.testing.assert_array_equal(M.nearest_neighbours(x, 7, chunk_size=chunk_size), expected)


def _brute_force_neighbours(x: np.ndarray, query: int, k: int) -> list[int]:
    ranked = []
    for j in range(x.shape[0]):
        if j != query:
            ranked.append((float(np.sum((x[query] - x[j]) ** 2)), j))
    return [j for _, j in sorted(ranked)[:k]]


def test_fast_knn_matches_brute_force_and_faiss_on_random_data() -> None:
    rng = np.random.default_rng(0)
    n, d, k = 2000, 8, 10
    x = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, 20, size=n)

    fast = M.nearest_neighbours(x, k)
    np.testing.assert_array_equal(M.nearest_neighbours(x, k, chunk_size=333), fast)
    for query in rng.choice(n, size=25, replace=False):
        assert fast[query].tolist() == _brute_force_neighbours(x.astype(np.float64), int(query), k)

    index = faiss.IndexFlatL2(d)
    index.add(x)
    _, faiss_idx = index.search(x, k + 1)
    assert (faiss_idx[:, 0] == np.arange(n)).all()  # no duplicates: self comes first
    np.testing.assert_array_equal(faiss_idx[:, 1:], fast)

    # Metrics against a direct full-matrix implementation of the definitions.
    dist = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    ranking = np.argsort(dist, axis=1, kind="stable")[:, :k]
    hits = labels[ranking] == labels[:, None]
    positives = np.bincount(labels)[labels] - 1
    result = M.retrieval_metrics(x, labels, ks=(1, 5, k))
    for kk in (1, 5, k):
        aps = [
            sum(hits[q, : r + 1].sum() / (r + 1) for r in range(kk) if hits[q, r]) / min(positives[q], kk)
            for q in range(n)
        ]
        assert result[f"map@{kk}"] == pytest.approx(np.mean(aps), abs=1e-12)
        assert result[f"recall@{kk}"] == pytest.approx(hits[:, :kk].any(axis=1).mean(), abs=1e-12)


# --------------------------------------------------------------------------- OoD


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2)


def _pairwise_auroc(scores_id: np.ndarray, scores_ood: np.ndarray) -> float:
    """The Mann-Whitney form: the share of (ID, OoD) pairs the OoD score wins, ties one half."""
    a, b = np.asarray(scores_id)[:, None], np.asarray(scores_ood)[None, :]
    return float(np.mean((b > a) + 0.5 * (b == a)))


def test_auroc_auprc_by_hand() -> None:
    scores_id, scores_ood = np.array([0.1, 0.4]), np.array([0.35, 0.8])
    # AUROC: OoD above ID in pairs (0.35,0.1) yes, (0.35,0.4) no, (0.8,0.1) yes, (0.8,0.4) yes -> 3/4.
    # AP: descending 0.8(OoD) P=1 R=1/2; 0.4(ID); 0.35(OoD) P=2/3 R=1 -> 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert M.auroc(scores_id, scores_ood) == pytest.approx(3 / 4)
    assert M.auprc(scores_id, scores_ood) == pytest.approx(5 / 6)

    # With a tie: ID [0.5], OoD [0.5, 0.9]. AUROC = (1/2 + 1)/2 = 3/4.
    # AP: threshold 0.9 -> P=1, R=1/2; threshold 0.5 -> TP=2, FP=1, P=2/3, R=1 -> 1/2 + 1/3 = 5/6.
    assert M.auroc([0.5], [0.5, 0.9]) == pytest.approx(3 / 4)
    assert M.auprc([0.5], [0.5, 0.9]) == pytest.approx(5 / 6)
    # ID [0.5, 0.2], OoD [0.5, 0.9]: pairs 1/2 + 1 + 1 + 1 -> 7/8.
    assert M.auroc([0.5, 0.2], [0.5, 0.9]) == pytest.approx(7 / 8)


def test_roc_curve_by_hand_with_ties_and_collinear_points() -> None:
    # Thresholds are the distinct scores, highest first, after inf (the point (0, 0)).
    roc = M.roc_curve([0.1, 0.4], [0.35, 0.8])
    assert isinstance(roc, M.RocCurve)
    np.testing.assert_array_equal(roc.fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(roc.tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(roc.thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert all(a.dtype == np.float64 for a in roc)
    # A tie enters as one point: at 0.5 one ID and one OoD come in together.
    fpr, tpr, thresholds = M.roc_curve([0.5, 0.2], [0.5, 0.9])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.5, 0.2])
    # Separable: thresholds 0.9 .. 0.1 give (fpr, tpr) = (0, 1/3) (0, 2/3) (0, 1) (1/3, 1) (2/3, 1) (1, 1).
    # Inner points collinear with both neighbours (0.8, 0.3, 0.2) are dropped; the check runs before
    # (0, 0) is prepended, so the first point, at 0.9, stays.
    fpr, tpr, thresholds = M.roc_curve([0.1, 0.2, 0.3], [0.7, 0.8, 0.9])
    np.testing.assert_array_equal(fpr, [0, 0, 0, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.7, 0.1])


def test_pr_curve_by_hand_with_ties() -> None:
    # Thresholds ascending; 0.1: TP 2 FP 2; 0.35: TP 2 FP 1; 0.4: TP 1 FP 1; 0.8: TP 1 FP 0; then (P 1, R 0).
    pr = M.pr_curve([0.1, 0.4], [0.35, 0.8])
    assert isinstance(pr, M.PrCurve)
    np.testing.assert_allclose(pr.precision, [1 / 2, 2 / 3, 1 / 2, 1, 1])
    np.testing.assert_array_equal(pr.recall, [1, 1, 0.5, 0.5, 0])
    np.testing.assert_array_equal(pr.thresholds, [0.1, 0.35, 0.4, 0.8])
    # Tie at 0.5: TP 2 FP 1 there; 0.9: TP 1 FP 0.
    precision, recall, thresholds = M.pr_curve([0.5], [0.5, 0.9])
    np.testing.assert_allclose(precision, [2 / 3, 1, 1])
    np.testing.assert_array_equal(recall, [1, 0.5, 0])
    np.testing.assert_array_equal(thresholds, [0.5, 0.9])


def test_all_equal_perfect_and_inverted_scores() -> None:
    # All equal: one operating point with everything flagged; AUROC 1/2, AP the chance level 3/5.
    fpr, tpr, thresholds = M.roc_curve([0.5, 0.5], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.5])
    precision, recall, thresholds = M.pr_curve([0.5, 0.5], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(precision, [3 / 5, 1])
    np.testing.assert_array_equal(recall, [1, 0])
    np.testing.assert_array_equal(thresholds, [0.5])
    assert M.auroc([0.5, 0.5], [0.5, 0.5, 0.5]) == 0.5
    assert M.auprc([0.5, 0.5], [0.5, 0.5, 0.5]) == pytest.approx(3 / 5)
    # Trapezoid: (0, 1) to (1, 3/5) -> 4/5.
    assert M.auprc([0.5, 0.5], [0.5, 0.5, 0.5], integration="trapezoid") == pytest.approx(4 / 5)
    # Perfect.
    assert M.auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert M.auprc([0.1, 0.2], [0.3, 0.4]) == 1.0
    # Inverted: every OoD below every ID. AUROC 0. PR points ascending: 0.1 (P 1/2, R 1),
    # 0.2 (P 1/3, R 1/2), 0.3 and 0.4 (P 0, R 0), (1, 0) -> AP = 1/2 * 1/2 + 1/2 * 1/3 = 5/12.
    assert M.auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    precision, recall, _ = M.pr_curve([0.3, 0.4], [0.1, 0.2])
    np.testing.assert_allclose(precision, [1 / 2, 1 / 3, 0, 0, 1])
    np.testing.assert_array_equal(recall, [1, 0.5, 0, 0, 0])
    assert M.auprc([0.3, 0.4], [0.1, 0.2]) == pytest.approx(5 / 12)


def test_auroc_is_the_pairwise_win_rate_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        n, m = rng.integers(1, 60, size=2)
        scores_id = rng.integers(0, 8, size=n) / 8  # coarse: many ties within and across classes
        scores_ood = rng.integers(2, 10, size=m) / 8
        assert M.auroc(scores_id, scores_ood) == pytest.approx(_pairwise_auroc(scores_id, scores_ood), abs=1e-12)
        # The order of the scores within a class does not matter.
        assert M.auroc(rng.permutation(scores_id), rng.permutation(scores_ood)) == pytest.approx(
            M.auroc(scores_id, scores_ood), abs=1e-12
        )


def _random_ood_cases(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cases: list[tuple[np.ndarray, np.ndarray]] = [
        (np.array([0.1, 0.4]), np.array([0.35, 0.8])),
        (np.array([0.5]), np.array([0.5, 0.9])),
        (np.full(3, 0.5), np.full(4, 0.5)),
        (rng.random(30), rng.random(20) + 0.3),
    ]
    for _ in range(count):
        n, m, levels = rng.integers(1, 80), rng.integers(1, 80), rng.integers(1, 12)
        cases.append((rng.integers(0, levels, size=n) / levels, rng.integers(0, levels, size=m) / levels + 0.1))
    return cases


def test_ood_metrics_and_curves_match_sklearn_on_random_data_with_ties() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    for scores_id, scores_ood in _random_ood_cases(seed=6, count=40):
        y = np.concatenate([np.zeros(len(scores_id)), np.ones(len(scores_ood))])
        s = np.concatenate([scores_id, scores_ood])
        for ours, theirs in zip(M.roc_curve(scores_id, scores_ood), skm.roc_curve(y, s)):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-15)
        for ours, theirs in zip(M.pr_curve(scores_id, scores_ood), skm.precision_recall_curve(y, s)):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-15)
        assert M.auroc(scores_id, scores_ood) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
        assert M.auprc(scores_id, scores_ood) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
        precision, recall, _ = skm.precision_recall_curve(y, s)
        first = np.count_nonzero(recall == 1.0) - 1
        order = np.argsort(recall[first:], kind="stable")
        reference = skm.auc(recall[first:][order], precision[first:][order])
        assert M.auprc(scores_id, scores_ood, integration="trapezoid") == pytest.approx(reference, abs=1e-12)


def test_auroc_auprc_against_torchmetrics() -> None:
    tmf = pytest.importorskip("torchmetrics.functional")
    for scores_id, scores_ood in _random_ood_cases(seed=1, count=3):
        preds = torch.tensor(np.concatenate([scores_id, scores_ood]), dtype=torch.float64)
        target = torch.cat([torch.zeros(len(scores_id)), torch.ones(len(scores_ood))]).long()
        assert M.auroc(scores_id, scores_ood) == pytest.approx(tmf.auroc(preds, target, task="binary").item())
        assert M.auprc(scores_id, scores_ood) == pytest.approx(
            tmf.average_precision(preds, target, task="binary").item()
        )


def test_roc_and_pr_curves_integrate_to_the_scalars() -> None:
    scores_id, scores_ood = [0.1, 0.4, 0.2, 0.7], [0.35, 0.8, 0.9]
    roc = M.roc_curve(scores_id, scores_ood)
    assert (roc.fpr[0], roc.tpr[0], roc.fpr[-1], roc.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert _trapezoid(roc.fpr, roc.tpr) == pytest.approx(M.auroc(scores_id, scores_ood))
    precision, recall, thresholds = M.pr_curve(scores_id, scores_ood)
    assert len(thresholds) == len(precision) - 1
    assert -np.sum(np.diff(recall) * precision[:-1]) == pytest.approx(M.auprc(scores_id, scores_ood))


def test_trapezoidal_auprc_of_the_papers_code_by_hand() -> None:
    # ID [0.1, 0.4], OoD [0.35, 0.8]. Operating points (recall, precision) from the highest
    # threshold down: 0.8 -> (1/2, 1); 0.4 -> (1/2, 1/2); 0.35 -> (1, 2/3), full recall, where
    # the curve stops (0.1 -> (1, 1/2) is cut); plus (0, 1). Sorted by recall:
    # (0, 1) (1/2, 1/2) (1/2, 1) (1, 2/3) -> 1/2 (1 + 1/2)/2 + 0 + 1/2 (1 + 2/3)/2 = 19/24,
    # below the average precision 5/6: a straight line is not always the optimistic side.
    assert M.auprc([0.1, 0.4], [0.35, 0.8], integration="trapezoid") == pytest.approx(19 / 24)
    # Not cutting at full recall would join (1/2, 1) to (1, 1/2) instead: 3/4.
    # ID [0.5], OoD [0.5, 0.9]: (0, 1) (1/2, 1) (1, 2/3) -> 1/2 + 1/2 (1 + 2/3)/2 = 11/12 (AP 5/6).
    assert M.auprc([0.5], [0.5, 0.9], integration="trapezoid") == pytest.approx(11 / 12)
    assert M.auprc([0.5], [0.5, 0.9], integration="step") == M.auprc([0.5], [0.5, 0.9])
    # Separable scores: both integrations give 1.
    assert M.auprc([0.1, 0.2], [0.3, 0.4], integration="trapezoid") == pytest.approx(1.0)


def test_trapezoidal_auprc_against_torchmetrics_auc_of_the_cut_curve() -> None:
    tmf = pytest.importorskip("torchmetrics.functional")
    from torchmetrics.utilities.compute import _auc_compute

    rng = np.random.default_rng(4)
    scores_id, scores_ood = rng.random(300), rng.random(200) + 0.4
    preds = torch.tensor(np.concatenate([scores_id, scores_ood]))
    target = torch.cat([torch.zeros(300), torch.ones(200)]).long()
    precision, recall, _ = tmf.precision_recall_curve(preds, target, task="binary")
    full = int((recall == 1).sum()) - 1  # the curve of the paper's torchmetrics stopped at full recall
    reference = _auc_compute(recall[full:], precision[full:], reorder=True).item()
    assert M.auprc(scores_id, scores_ood, integration="trapezoid") == pytest.approx(reference, abs=1e-6)  # float32
    assert M.auprc(scores_id, scores_ood, integration="trapezoid") != pytest.approx(M.auprc(scores_id, scores_ood))


# --------------------------------------------------------------------------- sparsification

# N = 4 in 2-D: nearest neighbours 0<->1 (distance 1, same label: correct) and
# 2<->3 (distance 2, labels 1 vs 2: incorrect), so correct = [1, 1, 0, 0].
SPARSE_MEAN = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [12.0, 0.0]])
SPARSE_Y = np.array([0, 0, 1, 2])
# floor(i * 4 / 100) removed for i = 0..98: 0 for i = 0..24 (25 points), 1 for 25..49 (25),
# 2 for 50..74 (25), 3 for 75..98 (24). Trapezoid with dx = 1/99 over accuracies a_0..a_98:
# (sum_i a_i - (a_0 + a_98)/2) / 99.
KEPT = np.repeat([4, 3, 2, 1], [25, 25, 25, 24])


def _trapezoid_by_hand(values_per_block: list[float]) -> float:
    curve = np.repeat(values_per_block, [25, 25, 25, 24])
    return (curve.sum() - (curve[0] + curve[-1]) / 2) / 99


def test_sparsification_misleading_uncertainty_by_hand() -> None:
    # Uncertainty = mean_d(std_q + std_nn): u0 = u1 = mean([0.7, 0.9]) = 0.8, u2 = u3 = mean([0.1, 0.3]) = 0.2.
    std = np.array([[0.3, 0.5], [0.4, 0.4], [0.0, 0.2], [0.1, 0.1]])
    curve = M.sparsification_curve(SPARSE_MEAN, std, SPARSE_Y)
    # Kept order (least uncertain first) 2, 3, 0, 1 -> accuracies keep4 = 2/4, keep3 = 1/3, keep2 = 0, keep1 = 0.
    np.testing.assert_allclose(curve.accuracy, np.repeat([1 / 2, 1 / 3, 0.0, 0.0], [25, 25, 25, 24]))
    # Oracle keeps 0, 1 first: 2/4, 2/3, 1, 1.
    np.testing.assert_allclose(curve.oracle_accuracy, np.repeat([1 / 2, 2 / 3, 1.0, 1.0], [25, 25, 25, 24]))
    np.testing.assert_allclose(curve.fractions, np.arange(99) / 100)
    # (25/2 + 25/3 - 1/4) / 99 = (61.75 / 3) / 99
    assert M.ausc(SPARSE_MEAN, std, SPARSE_Y) == pytest.approx(61.75 / 3 / 99, abs=1e-12)
    assert M.ausc(SPARSE_MEAN, std, SPARSE_Y) == pytest.approx(_trapezoid_by_hand([1 / 2, 1 / 3, 0, 0]))


def test_perfectly_informative_uncertainty_gives_the_oracle_curve() -> None:
    std = np.array([[0.1, 0.1], [0.1, 0.1], [0.5, 0.4], [0.5, 0.6]])
    curve = M.sparsification_curve(SPARSE_MEAN, std, SPARSE_Y)
    np.testing.assert_array_equal(curve.accuracy, curve.oracle_accuracy)
    # Oracle accuracies 2/4, 2/3, 1, 1: (25/2 + 50/3 + 25 + 24 - (1/2 + 1)/2) / 99
    assert M.ausc(SPARSE_MEAN, std, SPARSE_Y) == pytest.approx((12.5 + 50 / 3 + 49 - 0.75) / 99, abs=1e-12)


def test_constant_uncertainty_is_flat_when_all_correct_and_stable_otherwise() -> None:
    # All correct: the curve is flat at accuracy 1, so AUSC = 1 * 98/99.
    std = np.full((4, 2), 0.3)
    all_correct = np.array([0, 0, 1, 1])
    curve = M.sparsification_curve(SPARSE_MEAN, std, all_correct)
    np.testing.assert_array_equal(curve.accuracy, np.ones(99))
    assert M.ausc(SPARSE_MEAN, std, all_correct) == pytest.approx(98 / 99, abs=1e-12)
    # Mixed correctness with constant uncertainty: ties are stable, so the highest indices go first
    # and the curve is the accuracy of index prefixes (not a flat line at the base accuracy).
    mean = SPARSE_MEAN[[2, 3, 0, 1]]  # now correct = [0, 0, 1, 1]
    curve = M.sparsification_curve(mean, std, SPARSE_Y[[2, 3, 0, 1]])
    np.testing.assert_allclose(curve.accuracy, 2 * np.cumsum([0, 0, 1, 1])[KEPT - 1] / (2 * KEPT))
    assert curve.accuracy[0] == 0.5


def test_ausc_matches_sklearn_auc_of_the_curve() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    mean, std, labels = rng.normal(size=(250, 3)), rng.random((250, 3)), rng.integers(0, 6, size=250)
    accuracy = M.sparsification_curve(mean, std, labels).accuracy
    assert M.ausc(mean, std, labels) == pytest.approx(skm.auc(np.arange(99) / 99, accuracy), abs=1e-12)


# --------------------------------------------------------------------------- calibration


def _calibration_samples() -> tuple[np.ndarray, np.ndarray]:
    """Ten samples in which each query's 1-NN label is set by placing it next to anchor pair A or B.

    Anchors A = 0, A' = 0.01 e0 (label 0) and B = 100 e0, B' = 100.01 e0 (label 1) are each
    other's nearest neighbour in every sample. Query j sits at (A or B) + e_{j+1}: distance 1
    to that anchor, sqrt(1.0001) to its partner, sqrt(2) or ~100 to any other query.
    """
    d, s = 6, 10
    a, b = np.zeros(d), 100 * np.eye(d)[0]
    anchors = [a, a + 0.01 * np.eye(d)[0], b, b + 0.01 * np.eye(d)[0]]
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0])
    samples_at_a = [10, 7, 7, 5, 4]  # per query, the number of samples that place it next to A
    samples = np.empty((s, 9, d))
    for t in range(s):
        queries = [(a if t < n_a else b) + np.eye(d)[j + 1] for j, n_a in enumerate(samples_at_a)]
        samples[t] = np.stack(anchors + queries)
    return samples, labels


def test_ece_and_reliability_diagram_by_hand() -> None:
    samples, labels = _calibration_samples()
    # Anchors: prediction = own label, confidence 10/10, correct (4 items).
    # q0 (label 0): A 10/10 -> pred 0, conf 1.0, correct.
    # q1 (label 0): A 7/10  -> pred 0, conf 0.7, correct.
    # q2 (label 1): A 7/10  -> pred 0, conf 0.7, wrong.
    # q3 (label 1): A 5/10, B 5/10 -> tie -> smallest label 0, conf 0.5, wrong.
    # q4 (label 0): A 4/10  -> pred 1, conf 0.6, wrong.
    # Bins: 5 -> {q3}: conf .5, acc 0;  6 -> {q4}: conf .6, acc 0;  7 -> {q1, q2}: conf .7, acc 1/2;
    #       9 -> {4 anchors, q0}: conf 1.0, acc 1 (confidence 1.0 counts in the last bin).
    # ECE = (1 * .5 + 1 * .6 + 2 * .2 + 5 * 0) / 9 = 1.5 / 9 = 1/6.
    # (The paper's code would drop the five confidence-1.0 items: (.5 + .6 + .4) / 4 = 0.375.)
    diagram = M.reliability_diagram(samples, labels)
    np.testing.assert_array_equal(diagram.bin_count, [0, 0, 0, 0, 0, 1, 1, 2, 0, 5])
    np.testing.assert_allclose(diagram.bin_confidence[[5, 6, 7, 9]], [0.5, 0.6, 0.7, 1.0])
    np.testing.assert_allclose(diagram.bin_accuracy[[5, 6, 7, 9]], [0.0, 0.0, 0.5, 1.0])
    assert np.isnan(diagram.bin_confidence[[0, 1, 2, 3, 4, 8]]).all()
    assert np.isnan(diagram.bin_accuracy[[0, 1, 2, 3, 4, 8]]).all()
    assert M.ece(samples, labels) == pytest.approx(1 / 6, abs=1e-12)


def test_ece_with_certain_queries_dropped_as_the_papers_code_does() -> None:
    samples, labels = _calibration_samples()
    # The five confidence-1.0 items leave the last bin; the rest are weighed among themselves:
    # (1 * .5 + 1 * .6 + 2 * .2) / 4 = 0.375.
    diagram = M.reliability_diagram(samples, labels, certain="dropped")
    np.testing.assert_array_equal(diagram.bin_count, [0, 0, 0, 0, 0, 1, 1, 2, 0, 0])
    assert np.isnan(diagram.bin_confidence[9])
    assert M.ece(samples, labels, certain="dropped") == pytest.approx(0.375, abs=1e-12)
    # One neighbour search serves both conventions.
    votes = M.nearest_neighbour_votes(samples, labels)
    np.testing.assert_array_equal(votes.prediction, [0, 0, 1, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(votes.agreeing, [10, 10, 10, 10, 10, 7, 7, 5, 6])
    assert votes.ece() == M.ece(samples, labels)
    assert votes.ece(certain="dropped") == M.ece(samples, labels, certain="dropped")
    # Every query certain: nothing is left to bin, and that is said rather than a NaN.
    same = np.repeat(samples[:1], 3, axis=0)
    with pytest.raises(ValueError, match="every query has confidence 1.0"):
        M.ece(same, labels, certain="dropped")


def test_ece_with_other_bin_counts_and_perfect_calibration() -> None:
    samples, labels = _calibration_samples()
    # bins = 2: [0, .5) empty; [.5, 1] holds all 9: conf (.5 + .6 + .7 + .7 + 5) / 9 = 7.5/9, acc 6/9.
    assert M.ece(samples, labels, bins=2) == pytest.approx(abs(6 / 9 - 7.5 / 9), abs=1e-12)
    # Every sample identical and every 1-NN correct: confidence 1.0 and accuracy 1 -> ECE 0.
    same = np.repeat(samples[:1], 3, axis=0)
    assert M.ece(same[:, :4], labels[:4]) == 0.0


# --------------------------------------------------------------------------- inputs


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    std = rng.random((60, 4)).astype(np.float32)
    samples = rng.normal(size=(5, 60, 4)).astype(np.float32)
    y = rng.integers(0, 5, size=60)
    s_id, s_ood = rng.random(20), rng.random(15)
    t = torch.from_numpy

    assert M.retrieval_metrics(t(x), t(y)) == M.retrieval_metrics(x, y)
    assert M.map_at_k(t(x).requires_grad_(), t(y), 3) == M.map_at_k(x, y, 3)
    assert M.ausc(t(x), t(std), t(y)) == M.ausc(x, std, y)
    assert M.ece(t(samples), t(y)) == M.ece(samples, y)
    assert M.auroc(t(s_id), t(s_ood)) == M.auroc(s_id, s_ood)
    assert M.auprc(t(s_id).float(), list(s_ood)) == pytest.approx(M.auprc(s_id.astype(np.float32), s_ood))
    assert isinstance(M.auroc(s_id, s_ood), float)
    half = t(x).to(torch.bfloat16)  # numpy has no bfloat16: converted via float32
    assert M.map_at_k(half, t(y), 3) == M.map_at_k(half.float().numpy(), y, 3)


X4 = np.zeros((4, 2))
Y4 = np.array([0, 0, 1, 1])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: M.map_at_k(np.zeros(4), Y4, 1), ValueError, r"embeddings must have shape \[N, D\]"),
        (lambda: M.map_at_k(X4, Y4[:3], 1), ValueError, "labels must have one entry per row of embeddings"),
        (lambda: M.map_at_k(X4, Y4[:, None], 1), ValueError, r"labels must have shape \[N\]"),
        (lambda: M.map_at_k(X4, Y4, 0), ValueError, "k must satisfy 1 <= k < N = 4"),
        (lambda: M.recall_at_k(X4, Y4, 4), ValueError, "k must satisfy 1 <= k < N = 4"),
        (lambda: M.map_at_k(X4, Y4, 1.0), TypeError, "k must be an int"),
        (lambda: M.retrieval_metrics(X4, Y4, ks=()), ValueError, "ks must contain"),
        (lambda: M.retrieval_metrics(X4, Y4, ks=(1, 9)), ValueError, "each entry of ks"),
        (lambda: M.map_at_k(np.full((4, 2), np.nan), Y4, 1), ValueError, "embeddings must not contain NaN"),
        (lambda: M.map_at_k(np.zeros((0, 2)), Y4[:0], 1), ValueError, "embeddings must not be empty"),
        (lambda: M.map_at_k(X4[:1], Y4[:1], 1), ValueError, "at least 2 rows"),
        (lambda: M.map_at_k(X4, np.array([0.0, np.nan, 1, 1]), 1), ValueError, "labels must not contain NaN"),
        (lambda: M.map_at_k(np.array([["a", "b"]] * 4), Y4, 1), TypeError, "embeddings must hold real numbers"),
        (lambda: M.nearest_neighbours(X4, 1, chunk_size=0), ValueError, "chunk_size"),
        (lambda: M.auroc([], [0.5]), ValueError, "scores_id must not be empty"),
        (lambda: M.auprc([0.1], [[0.5]]), ValueError, r"scores_ood must have shape \[M\]"),
        (lambda: M.roc_curve([0.1, np.inf], [0.5]), ValueError, "scores_id must not contain NaN or infinite"),
        (lambda: M.ausc(X4, np.zeros((4, 3)), Y4), ValueError, "std must have the shape of mean"),
        (lambda: M.ausc(X4, -np.ones((4, 2)), Y4), ValueError, "std must be non-negative"),
        (lambda: M.sparsification_curve(X4, X4, Y4[:2]), ValueError, "labels must have one entry per row of mean"),
        (lambda: M.ece(X4, Y4), ValueError, r"samples must have shape \[S, N, D\]"),
        (lambda: M.ece(np.zeros((2, 4, 2)), Y4[:3]), ValueError, "labels must have one entry"),
        (lambda: M.reliability_diagram(np.zeros((2, 4, 2)), Y4, bins=0), ValueError, "bins must be a positive int"),
        (lambda: M.ece(np.zeros((0, 4, 2)), Y4), ValueError, "samples must not be empty"),
        (lambda: M.ece(np.zeros((2, 4, 2)), Y4, certain="none"), ValueError, "certain must be 'last_bin' or 'dropped'"),
        (lambda: M.auprc([0.1], [0.5], integration="simpson"), ValueError, "integration must be 'step' or 'trapezoid'"),
    ],
)
def test_invalid_inputs_raise_clear_errors(call: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()

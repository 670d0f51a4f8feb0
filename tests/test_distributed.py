"""Fitting inside a torch.distributed process group: 2 gloo ranks on the CPU, each over its
shard, end with the posterior of one process over all the batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lam_plugin import LaplaceEmbedder

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from distributed_worker import batches, bn_model, model, online_model, online_settings, settings  # noqa: E402


def _launch(mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, str(HERE / "distributed_worker.py"), mode, str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["fit", "ddp"])
def test_two_ranks_fit_what_one_process_fits_over_all_batches(tmp_path, mode):
    result = _launch(mode, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    single = LaplaceEmbedder(model(), **settings()).fit(batches())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["names"] == single.param_names  # a DDP model's names carry no "module." prefix
        assert _relerr(got["curvature"], single.curvature) <= 1e-5
        assert abs(float(got["prior"]) - single.prior_precision) <= 1e-5 * single.prior_precision
        assert got["n_data"] == single.stats.n_data == 72
        assert got["pairs"] == (single.stats.n_positive, single.stats.n_negative_total)
    assert torch.equal(ranks[0]["curvature"], ranks[1]["curvature"])
    # each rank alone sees a part of the curvature; the reduced one differs from it
    alone = LaplaceEmbedder(model(), **settings()).fit(batches()[0::2])
    assert _relerr(alone.curvature, single.curvature) > 0.1
    # only rank 0 wrote the file, and nothing was left behind by rank 1
    assert [p.name for p in tmp_path.glob("posterior*")] == ["posterior.safetensors"]


def test_ranks_that_fit_different_configurations_fail_on_every_rank(tmp_path):
    result = _launch("mismatch", tmp_path)
    assert result.returncode != 0
    for r in range(2):
        message = (tmp_path / f"rank{r}.err").read_text()
        assert "the ranks of the process group fit different configurations" in message
        assert "approx: rank 0 'pos', rank 1 'fix'" in message


def test_a_rank_whose_fit_fails_makes_every_rank_fail(tmp_path):
    result = _launch("empty", tmp_path)
    assert result.returncode != 0
    messages = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert messages[0] == messages[1] == "the fit failed on rank 1: ValueError: the loader yielded no batch"


def test_a_rank_whose_online_step_fails_makes_every_rank_fail(tmp_path):
    result = _launch("online-bad", tmp_path)
    assert result.returncode != 0
    messages = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert messages[0].startswith("online step 1 failed on rank 1: ValueError: y must hold one label per input (12)")


def test_online_lam_keeps_one_model_over_the_ranks(tmp_path):
    """Every rank starts from rank 0's weights, the gradients and each step's curvature are
    averaged: ranks with the same batches train what one process trains on them, and
    ranks with different shards stay one model."""
    pytest.importorskip("pytorch_metric_learning")
    result = _launch("online-same", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    net = model()
    single = LaplaceEmbedder(net, **online_settings()).fit_online(batches(), epochs=2, dataset_size=72, max_pairs=None)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert _relerr(got["curvature"], single.curvature) <= 1e-5
        for k, v in net.state_dict().items():
            torch.testing.assert_close(got["weights"][k], v, rtol=1e-5, atol=1e-6)
    shards = tmp_path / "shards"
    shards.mkdir()
    result = _launch("online", shards)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(shards / f"rank{r}.pt") for r in range(2))
    assert torch.equal(a["curvature"], b["curvature"])
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert _relerr(a["curvature"], single.curvature) > 1e-3  # the shards are not the whole


def test_online_lam_in_ranks_leaves_parameters_without_gradient_alone(tmp_path):
    """A head the embedding does not use gets no gradient in one process, so RMSprop leaves
    it (no weight decay either); ranks given the same batches do the same, and train what
    one process trains."""
    pytest.importorskip("pytorch_metric_learning")
    result = _launch("online-unused", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    net, kwargs = online_model("online-unused")
    start = {k: v.clone() for k, v in net.state_dict().items()}
    LaplaceEmbedder(net, **kwargs).fit_online(batches(), epochs=2, dataset_size=72, max_pairs=None)
    assert torch.equal(net.cls.weight, start["cls.weight"]) and torch.equal(net.cls.bias, start["cls.bias"])
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for k, v in net.state_dict().items():
            torch.testing.assert_close(got["weights"][k], v, rtol=1e-5, atol=1e-6)


def test_online_lam_in_ranks_keeps_one_set_of_buffers(tmp_path):
    """Each rank's training forward passes update its own BatchNorm statistics; rank 0's
    are broadcast after every step, so the ranks keep one model and embed alike."""
    pytest.importorskip("pytorch_metric_learning")
    result = _launch("online-bn", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k, v in a["weights"].items():
        assert torch.equal(v, b["weights"][k]), k
    assert not torch.equal(a["weights"]["1.running_mean"], bn_model().state_dict()["1.running_mean"])
    assert torch.equal(a["curvature"], b["curvature"]) and torch.equal(a["sample"], b["sample"])

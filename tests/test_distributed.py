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
from distributed_worker import batches, model, settings  # noqa: E402

pytest.importorskip("laplace")  # the workers use prior_precision="marglik"


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

"""lam_plugin.lightning.LaplaceCallback: the posterior fitted at the end of trainer.fit, on
one process and on two DDP ranks (Lightning's CPU accelerator, gloo), and the optional
import of Lightning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lam_plugin import EmbeddingPosterior, LaplaceEmbedder

HERE = Path(__file__).parent


@pytest.fixture
def worker() -> ModuleType:
    """tests/lightning_worker.py (the LightningModule and the data); skips without Lightning."""
    pytest.importorskip("pytorch_lightning")
    import lightning_worker

    return lightning_worker


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


_BLOCKED_IMPORT = r"""
import importlib.abc
import sys


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("pytorch_lightning", "lightning"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


import lam_plugin
import lam_plugin.index
import lam_plugin.online

assert not any(m.partition(".")[0] in ("pytorch_lightning", "lightning") for m in sys.modules), "Lightning imported"
sys.meta_path.insert(0, Block())
try:
    import lam_plugin.lightning
except ImportError as err:
    print(err)
else:
    raise SystemExit("lam_plugin.lightning imported without Lightning")
"""


def test_lam_plugin_never_imports_lightning_and_names_the_extra_without_it():
    result = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'lam-plugin[lightning]'" in result.stdout


@pytest.mark.parametrize("model_attr", [None, "net"])
def test_the_callback_fits_what_laplace_embedder_fits_on_the_trained_model(tmp_path, worker, model_attr):
    """With a ModelCheckpoint the file goes to its folder, without one to default_root_dir."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lam_plugin.lightning import LaplaceCallback

    callback = LaplaceCallback(model_attr=model_attr, **worker.settings())
    module = worker.Embedder()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    if model_attr is None:
        trainer = worker.trainer(tmp_path, callback, devices=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")])
        folder = tmp_path / "ckpt"
    else:
        trainer = worker.trainer(tmp_path, callback, devices=1, enable_checkpointing=False)
        folder = tmp_path
    trainer.fit(module, worker.loader())
    assert any(not torch.equal(v, start[k]) for k, v in module.state_dict().items())  # it trained

    model = module if model_attr is None else module.net
    expected = LaplaceEmbedder(model, **worker.settings()).fit(worker.loader())
    got = callback.posterior
    assert got is not None and got.param_names == expected.param_names
    assert got.param_names[0] == ("net.0.weight" if model_attr is None else "0.weight")
    torch.testing.assert_close(got.curvature, expected.curvature, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=0)
    assert got.prior_precision == expected.prior_precision and got.stats.n_data == expected.stats.n_data == 96

    assert callback.path == folder / "posterior.safetensors"
    if model_attr is None:
        assert sorted(p.suffix for p in folder.iterdir()) == [".ckpt", ".safetensors"]  # beside the checkpoint
    loaded = EmbeddingPosterior.load(callback.path, model)
    torch.testing.assert_close(loaded.curvature, expected.curvature, rtol=1e-6, atol=1e-6)


def test_bad_settings_fail_before_training(tmp_path, worker):
    from lam_plugin.lightning import LaplaceCallback

    with pytest.raises(ValueError, match="approx must be one of"):
        LaplaceCallback(approx="diag")
    with pytest.raises(TypeError, match="subsett"):
        LaplaceCallback(subsett="all")
    module = worker.Embedder()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = worker.trainer(tmp_path, LaplaceCallback(model_attr="encoder"), devices=1)
    with pytest.raises(AttributeError, match="model_attr='encoder'"):
        trainer.fit(module, worker.loader())
    assert all(torch.equal(v, start[k]) for k, v in module.state_dict().items())


def test_two_ddp_ranks_end_with_the_posterior_of_one_process_over_all_the_shards(tmp_path, worker):
    """Each rank fits its DistributedSampler shard and the fit all-reduces: every rank's
    posterior is that of one process over the union of the shards' batches (every item
    once), and rank 0 alone writes the file."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(HERE / "lightning_worker.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["sampler"] for r in ranks] == ["DistributedSampler"] * 2
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(96))  # the shards cover the data once
    assert ranks[0]["indices"] != list(range(0, 96, 2))  # shuffled shards

    module = worker.Embedder()
    module.load_state_dict(ranks[0]["weights"])
    x, y = worker.dataset().tensors
    shards = [r["indices"] for r in ranks]
    batches = [
        (x[s[i : i + worker.BATCH]], y[s[i : i + worker.BATCH]]) for s in shards for i in range(0, 48, worker.BATCH)
    ]
    single = LaplaceEmbedder(module, **worker.settings()).fit(batches)
    # each rank's last step left its own BatchNorm statistics; the callback fitted rank 0's
    assert not torch.equal(ranks[0]["running_mean_before"], ranks[1]["running_mean_before"])
    for got in ranks:
        assert all(torch.equal(v, ranks[0]["weights"][k]) for k, v in got["weights"].items())
        assert got["names"] == single.param_names
        assert _relerr(got["curvature"], single.curvature) <= 1e-5
        assert float(got["prior"]) == single.prior_precision and got["n_data"] == single.stats.n_data == 96
    alone = LaplaceEmbedder(module, **worker.settings()).fit(batches[:4])  # rank 0's shard only
    assert _relerr(alone.curvature, single.curvature) > 0.1

    path = tmp_path / "ckpt" / "posterior.safetensors"
    assert [r["path"] for r in ranks] == [str(path)] * 2
    assert [r["posterior_writes"] for r in ranks] == [1, 0]  # written once, by rank 0
    assert [p.name for p in path.parent.glob("posterior*")] == ["posterior.safetensors"]
    loaded = EmbeddingPosterior.load(path, module)
    assert _relerr(loaded.curvature, single.curvature) <= 1e-5

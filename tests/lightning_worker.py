"""The LightningModule and data of tests/test_lightning.py; run as a script, one DDP training.

    lightning_worker.py OUT

trains :class:`Embedder` with ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``
(Lightning starts the second rank by running this script again) and a
:class:`lam_plugin.lightning.LaplaceCallback` saving into ``OUT/ckpt``. Each rank writes
to ``OUT/rank<r>.pt`` its posterior, the dataset indices of its shard in the order its
loader gave them, the trained weights, and how many safetensors files it wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import safetensors.torch
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin import L2Normalize
from lam_plugin.lightning import LaplaceCallback

BATCH = 12


class Embedder(pl.LightningModule):
    """An MLP embedder (with a BatchNorm, whose statistics DDP ranks update each on its
    own) trained with a contrastive loss on the batches' pairs."""

    def __init__(self, margin: float = 0.7) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4), L2Normalize())
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z = self(x)
        d2 = torch.cdist(z, z).pow(2)
        same = y[:, None] == y[None, :]
        off = ~torch.eye(len(y), dtype=torch.bool)
        return d2[same & off].mean() + F.relu(self.margin - d2[~same]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))


def loader(shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset(), batch_size=BATCH, shuffle=shuffle)


def settings() -> dict[str, Any]:
    return dict(subset="all", approx="pos", prior_precision=2.0, progress=False)


def trainer(root: Path, callback: pl.Callback, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[callback, *kwargs.pop("callbacks", [])],
        **kwargs,
    )


class BufferRecorder(pl.Callback):
    """Keeps the BatchNorm statistics at the end of training, before LaplaceCallback runs."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.running_mean = pl_module.net[1].running_mean.clone()


def main(out: Path) -> None:
    writes = []
    save_file = safetensors.torch.save_file

    def counted(*args: Any, **kwargs: Any) -> None:
        writes.append(args[1])
        save_file(*args, **kwargs)

    safetensors.torch.save_file = counted  # lam_plugin.file_format calls it through the module
    callback, recorder = LaplaceCallback(**settings()), BufferRecorder()
    module = Embedder()
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt")
    fit = trainer(out, recorder, devices=2, strategy="ddp", callbacks=[callback, checkpoint])
    fit.fit(module, loader(shuffle=True))
    rank, posterior, used = fit.global_rank, callback.posterior, fit.train_dataloader
    assert posterior is not None and isinstance(used, DataLoader)
    torch.save(
        {
            "curvature": posterior.curvature,
            "prior": torch.as_tensor(posterior.prior_precision),
            "n_data": posterior.stats.n_data,
            "names": posterior.param_names,
            "sampler": type(used.sampler).__name__,
            "indices": list(used.sampler),
            "weights": module.state_dict(),
            "running_mean_before": recorder.running_mean,
            "posterior_writes": sum(Path(p).name.startswith("posterior.safetensors") for p in writes),
            "path": str(callback.path),
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))

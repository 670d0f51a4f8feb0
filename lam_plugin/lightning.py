"""A PyTorch Lightning callback that fits the Laplace posterior at the end of ``trainer.fit``.

Lightning is an optional extra (``pip install 'lam-plugin[lightning]'``): importing
:mod:`lam_plugin` never imports it, and nothing in :mod:`lam_plugin` imports this module.

```python
import pytorch_lightning as pl
from lam_plugin.lightning import LaplaceCallback

callback = LaplaceCallback(model_attr="encoder", subset="last_layer")
trainer = pl.Trainer(max_epochs=10, callbacks=[callback])
trainer.fit(module, train_loader)
posterior = callback.posterior  # also saved as <checkpoint folder>/posterior.safetensors
```

Under the DDP strategy each rank fits its own shard of the train dataloader (the one with
the ``DistributedSampler`` Lightning gave it) and :meth:`lam_plugin.LaplaceEmbedder.fit`
all-reduces the curvature, so every rank ends with the posterior of one process over all
the shards' batches; rank 0 alone writes the file (:mod:`lam_plugin.distributed`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .embedder import LaplaceEmbedder
from .posterior import EmbeddingPosterior

try:
    from pytorch_lightning import Callback, LightningModule, Trainer
    from pytorch_lightning.callbacks import ModelCheckpoint
except ModuleNotFoundError as err:  # only Lightning itself missing; a broken install raises as it is
    if err.name != "pytorch_lightning":
        raise
    raise ImportError(
        "lam_plugin.lightning needs PyTorch Lightning, an optional extra of lam-plugin: "
        "pip install 'lam-plugin[lightning]'"
    ) from err

__all__ = ["LaplaceCallback"]

logger = logging.getLogger(__name__)


class LaplaceCallback(Callback):
    """Fit a Laplace posterior over the trained embedding model when ``trainer.fit`` ends.

    In ``on_train_end`` (after the last optimiser step, while the model is still on its
    device and the process group is still up) the callback builds
    ``LaplaceEmbedder(<embedding model>, **embedder_kwargs)``, fits it on the trainer's
    train dataloader and keeps the result as :attr:`posterior`. Unless ``filename`` is
    None it saves the posterior to :attr:`path`, beside the checkpoints.

    The embedding model is the LightningModule itself, or its submodule named by
    ``model_attr``; the fit calls it on the batches' inputs, so it must map them to
    embeddings ``[B, D]`` (or to an output ``output_key`` takes them from). The train
    dataloader must yield batches that :meth:`lam_plugin.LaplaceEmbedder.fit` takes:
    ``(x, y)`` tuples (or lists) of inputs and integer labels, dicts with a ``"labels"``
    (or ``"label"``) entry, or ``(anchors, positives)`` pair batches. The fit runs over
    every batch of the loader, whatever ``limit_train_batches`` was; it uses the weights
    at the end of training, not those of the best checkpoint. To fit another set of
    weights, load them and call :meth:`~lam_plugin.LaplaceEmbedder.fit` yourself.

    Under the DDP strategy the callback first gives every rank rank 0's parameters and
    buffers (DDP keeps the parameters equal, but each rank's last forward pass updates its
    own BatchNorm statistics); then each rank fits its own shard (the loader Lightning
    built with a ``DistributedSampler``) and the fit all-reduces the curvature over the
    ranks: every rank's :attr:`posterior` is the one a single process gets over all the
    shards' batches, and rank 0 alone writes the file. With ``strategy="ddp_spawn"`` the fit runs in the
    spawned processes, so the callback of the launching process keeps no posterior: load
    the file there (:meth:`lam_plugin.EmbeddingPosterior.load`).

    Args:
        filename: the posterior file's name (a path relative to the folder is allowed), or
            None to keep the posterior in memory only.
        dirpath: the folder to save to; by default the ``dirpath`` of the trainer's
            (first) ``ModelCheckpoint``, else ``trainer.default_root_dir``. It must be a
            local folder (or a mounted one); it is created if missing.
        model_attr: the name of the LightningModule's submodule that is the embedding
            model (a dotted name such as ``"encoder.backbone"`` reaches deeper), or None
            for the LightningModule itself.
        **embedder_kwargs: the settings of :class:`lam_plugin.LaplaceEmbedder`
            (``subset``, ``approx``, ``prior_precision``, ...). They are checked when the
            callback is made. ``progress`` defaults to showing a bar on rank 0 where the
            trainer shows its own.

    Attributes:
        posterior: the fitted posterior (None before the end of training).
        path: the file it was saved to (None before then, or when ``filename`` is None).
    """

    def __init__(
        self,
        filename: str | None = "posterior.safetensors",
        *,
        dirpath: str | os.PathLike[str] | None = None,
        model_attr: str | None = None,
        **embedder_kwargs: Any,
    ) -> None:
        super().__init__()
        if filename is not None and (not isinstance(filename, str) or not filename.strip()):
            raise ValueError(f"filename must be a non-empty file name or None, got {filename!r}")
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(f"model_attr must be the name of a submodule or None, got {model_attr!r}")
        LaplaceEmbedder(nn.Identity(), **embedder_kwargs)  # fail now on a bad setting, not after training
        self.filename, self.dirpath, self.model_attr = filename, dirpath, model_attr
        self.embedder_kwargs = dict(embedder_kwargs)
        self.posterior: EmbeddingPosterior | None = None
        self.path: Path | None = None

    def embedding_model(self, pl_module: LightningModule) -> nn.Module:
        """The module the posterior covers: ``pl_module`` or its submodule ``model_attr``."""
        if self.model_attr is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.model_attr)
        except AttributeError as err:
            raise AttributeError(
                f"LaplaceCallback(model_attr={self.model_attr!r}): {type(pl_module).__name__} has no submodule "
                f"{self.model_attr!r} ({err})"
            ) from err

    def folder(self, trainer: Trainer) -> Path:
        """Where the file goes: ``dirpath``, else the checkpoint folder, else ``default_root_dir``."""
        folder: Any = self.dirpath
        checkpoint = trainer.checkpoint_callback
        if folder is None and isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None:
            folder = checkpoint.dirpath
        if folder is None:
            folder = trainer.default_root_dir
        if "://" in str(folder):
            raise ValueError(
                f"LaplaceCallback saves to local folders only, and the checkpoint folder is {folder}: pass "
                "LaplaceCallback(dirpath=...) a local folder, or filename=None and save callback.posterior yourself"
            )
        return Path(folder)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the embedding model and the folder before training rather than after it."""
        self.embedding_model(pl_module)
        if self.filename is not None:
            self.folder(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fit the posterior on the train dataloader (each rank its shard), keep it, save it."""
        model = self.embedding_model(pl_module)
        loader = _train_loader(trainer)
        kwargs: dict[str, Any] = {"progress": trainer.is_global_zero and trainer.progress_bar_callback is not None}
        kwargs.update(self.embedder_kwargs)
        logger.info(
            "fitting the Laplace posterior of %s on the train dataloader (rank %d of %d)",
            type(model).__name__,
            trainer.global_rank,
            trainer.world_size,
        )
        if distributed.in_process_group():
            # DDP keeps the parameters equal, not the buffers: each rank's last forward pass
            # updated its own BatchNorm statistics. Every rank fits rank 0's model.
            distributed.broadcast_module(model)
        with torch.enable_grad():
            self.posterior = LaplaceEmbedder(model, **kwargs).fit(loader)
        if self.filename is None:
            return
        path = self.folder(trainer) / self.filename
        if distributed.is_writer():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.posterior.save(path)  # writes on rank 0 only
        self.path = path
        if distributed.is_writer():
            logger.info("saved the Laplace posterior to %s", path)
        trainer.strategy.barrier("lam_plugin.lightning.saved")  # the file exists on return, on every rank


def _train_loader(trainer: Trainer) -> Iterable[Any]:
    """The train dataloader Lightning used (with its ``DistributedSampler`` under DDP)."""
    loader = trainer.train_dataloader
    if loader is None:
        raise RuntimeError("LaplaceCallback: the trainer has no train dataloader to fit the posterior on")
    if isinstance(loader, (Mapping, list, tuple)):
        raise TypeError(
            f"LaplaceCallback fits on one train dataloader, and the trainer has a {type(loader).__name__} of them: "
            "leave the callback out and, after trainer.fit, call LaplaceEmbedder(model).fit on the loader you choose"
        )
    return loader

"""Fast contrastive training and batched embedding of in-memory tensors.

The data are held as tensors and shuffled by permuting indices with a seeded
:class:`torch.Generator`; there is no ``DataLoader`` and no per-sample Python loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lam_plugin import wrapping
from lam_plugin.arguments import integer, number, positive_int
from lam_plugin.metrics import map_at_k
from lam_plugin.numerics import flush_denormals
from lam_plugin.wrapping import eval_mode

from .losses import ContrastiveBatchLoss

logger = logging.getLogger(__name__)

__all__ = ["TrainingHistory", "embed", "model_device", "preserve_modes", "seeded", "train_contrastive"]


@dataclass
class TrainingHistory:
    """Losses recorded during training.

    Attributes:
        epoch_losses: mean training loss of each epoch.
        batch_losses: loss of every optimisation step, in order.
        val_map5: mAP@5 on the validation data after each epoch (empty without them).
        best_epoch: the epoch (1-based) whose weights the model holds at the end when
            ``keep_best`` restored them, else ``None``.
    """

    epoch_losses: list[float] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)
    val_map5: list[float] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def final_loss(self) -> float:
        """Mean loss of the last epoch (``nan`` before any epoch)."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")

    def __len__(self) -> int:
        return len(self.epoch_losses)


def check_schedule(epochs: Any, batch_size: Any, lr: Any) -> tuple[int, int, float]:
    """A training loop's ``epochs`` (an int, 0 allowed), ``batch_size`` (an int of at least
    1) and ``lr`` (a positive finite number), checked before any weight changes."""
    return integer(epochs, "epochs", low=0), positive_int(batch_size, "batch_size"), number(lr, "lr", low=0.0)


@contextlib.contextmanager
def preserve_modes(*models: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule of ``models`` on exit.

    Unlike :func:`lam_plugin.wrapping.eval_mode`, which puts a model in eval mode for
    the block, this changes no mode on entry: the block may set any modes it wants
    (``model.train()`` for training, eval with only the dropout layers in train mode
    for MC dropout, ...), and it accepts several models at once. For "eval mode, then
    restore", use ``eval_mode``.
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the global torch RNG seeded by ``seed``, then restore its state.

    Layers such as ``nn.Dropout`` draw from the global RNG, which cannot be given a
    generator; this makes them reproducible without a lasting ``torch.manual_seed``
    side effect on the caller. ``seed=None`` does nothing.
    """
    if seed is None:
        yield
        return
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; CPU if it has none.

    :func:`lam_plugin.wrapping.model_device`, plus one case it does not cover: a model
    without parameters but with buffers reports the device of its first buffer.
    """
    if next(model.parameters(), None) is None:
        for t in model.buffers():
            return t.device
    return wrapping.model_device(model)


def _make_optimizer(
    optimizer: str | torch.optim.Optimizer, params: Any, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    name = optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(
        f"unknown optimizer {optimizer!r}; use 'adam', 'adamw', 'sgd', 'rmsprop' or an Optimizer instance"
    )


def _check_data(images: Tensor, labels: Tensor) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N], got {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} inputs but {labels.shape[0]} labels")
    if images.shape[0] < 2:
        raise ValueError("at least 2 training examples are needed")


@flush_denormals()
def train_contrastive(
    model: nn.Module, images: Tensor, labels: Tensor, *,
    epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
    margin: float = 0.7, miner: Any | None = None,
    optimizer: str | torch.optim.Optimizer = "adam", weight_decay: float = 0.0, lr_decay: float | None = None,
    validation: tuple[Tensor, Tensor] | None = None, keep_best: bool = False,
    seed: int = 0, device: torch.device | str | None = None, progress: bool = True,
) -> TrainingHistory:
    """Train ``model`` in place with the contrastive loss on in-memory data.

    Uses ``pytorch_metric_learning.losses.ContrastiveLoss(pos_margin=0, neg_margin=margin)``
    (its default ``LpDistance`` normalises the embeddings) over all pairs of each batch,
    or over the pairs/triplets chosen by ``miner`` (any PML miner) when given
    (:class:`lam_plugin.losses.ContrastiveBatchLoss`).

    Every epoch visits the data in a fresh order drawn from a ``torch.Generator`` seeded
    with ``seed``; stochastic layers (dropout) draw from the global RNG, which is seeded
    with ``seed`` for the duration of the call and restored afterwards. The run is
    therefore deterministic for a fixed seed and initial model, and leaves the caller's
    global RNG state untouched. Batches with fewer than 2 examples are skipped.

    Args:
        model: the embedder, trained in place (moved to ``device``); the train/eval mode
            of every submodule is restored at the end.
        images: ``[N, ...]`` float inputs.
        labels: ``[N]`` integer class labels.
        epochs: passes over the data.
        batch_size: examples per step.
        lr: learning rate.
        margin: negative margin of the contrastive loss.
        miner: optional PML miner called as ``miner(embeddings, labels)``.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"rmsprop"`` or a ready optimizer instance.
        weight_decay: weight decay of the built optimizer.
        lr_decay: when given, the learning rate is multiplied by it after every epoch
            (``torch.optim.lr_scheduler.ExponentialLR``); the paper's code uses ``exp(-0.01)``.
        validation: optional ``(images [M, ...], labels [M])``: after every epoch the
            model embeds them in eval mode and their mAP@5 (each image a query against
            the others, :func:`lam_plugin.metrics.map_at_k`) is logged and recorded in
            ``history.val_map5``. Training itself is unchanged by it.
        keep_best: restore, at the end, the weights (the whole ``state_dict``, buffers
            included) of the epoch with the highest validation mAP@5, the first such
            epoch on a tie, as the paper's code does with its ``best.ckpt``. Needs
            ``validation``; keeps one copy of the state on the model's device.
        seed: seed of the shuffling (and of the dropout masks).
        device: where to train; default, the model's device.
        progress: show a tqdm bar with the running loss.

    Returns:
        The :class:`TrainingHistory` of per-epoch and per-step losses.
    """
    loop = _setup(
        model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr, margin=margin, miner=miner,
        optimizer=optimizer, weight_decay=weight_decay, lr_decay=lr_decay, validation=validation, keep_best=keep_best,
        device=device,
    )
    with preserve_modes(model), seeded(seed, loop.device):
        return _run_epochs(loop, seed, progress)


@dataclass
class _Loop:
    """A contrastive training run as :func:`_setup` checked and prepared it, and the weights
    of its best epoch so far (``keep_best``)."""

    model: nn.Module
    images: Tensor
    labels: Tensor
    epochs: int
    batch_size: int
    loss_fn: ContrastiveBatchLoss
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ExponentialLR | None
    validation: tuple[Tensor, Tensor] | None
    keep_best: bool
    device: torch.device
    best_state: dict[str, Tensor] | None = None


def _setup(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    margin: float,
    miner: Any | None,
    optimizer: str | torch.optim.Optimizer,
    weight_decay: float,
    lr_decay: float | None,
    validation: tuple[Tensor, Tensor] | None,
    keep_best: bool,
    device: torch.device | str | None,
) -> _Loop:
    """Check the arguments of :func:`train_contrastive`, move ``model`` to ``device``, and
    build its loss, optimizer and learning-rate schedule."""
    _check_data(images, labels)
    epochs, batch_size, lr = check_schedule(epochs, batch_size, lr)
    if validation is not None:
        _check_data(*validation)
    if keep_best and validation is None:
        raise ValueError("keep_best=True needs validation=(images, labels) to choose the best epoch")
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    loss_fn = ContrastiveBatchLoss(margin, miner if miner is not None else "all")
    opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    if lr_decay is not None and not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay}")
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay) if lr_decay is not None else None
    return _Loop(model, images, labels, epochs, batch_size, loss_fn, opt, scheduler, validation, keep_best, device)


def _run_epochs(loop: _Loop, seed: int, progress: bool) -> TrainingHistory:
    """Train ``loop.model`` for its epochs, each in a fresh order drawn from a generator seeded
    with ``seed``; then restore the best epoch's weights where ``keep_best`` kept them."""
    generator = torch.Generator().manual_seed(seed)
    history = TrainingHistory()
    loop.model.train()
    bar = tqdm(range(loop.epochs), desc="contrastive", disable=not progress)
    for _ in bar:
        order = torch.randperm(loop.images.shape[0], generator=generator).to(loop.images.device)
        _train_epoch(loop, order, history)
        if loop.scheduler is not None:
            loop.scheduler.step()
        bar.set_postfix(loss=f"{history.epoch_losses[-1]:.4f}")
        if loop.validation is not None:
            _validate_epoch(loop, loop.validation, history)
    if loop.best_state is not None:
        loop.model.load_state_dict(loop.best_state)
        logger.info(
            "kept epoch %d of %d (validation mAP@5 %.4f)", history.best_epoch, loop.epochs, max(history.val_map5)
        )
    return history


def _train_epoch(loop: _Loop, order: Tensor, history: TrainingHistory) -> None:
    """One pass over the data in ``order``, batch by batch (batches of fewer than 2 examples
    skipped); every step's loss and the epoch's mean loss go into ``history``."""
    total, steps = 0.0, 0
    for start in range(0, loop.images.shape[0], loop.batch_size):
        idx = order[start : start + loop.batch_size]
        if idx.numel() < 2:
            continue
        x = loop.images[idx].to(loop.device, non_blocking=True)
        y = loop.labels[idx].to(loop.device, non_blocking=True)
        emb = loop.model(x)
        loss = loop.loss_fn(emb, y)
        loop.opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            loop.opt.step()
        value = float(loss.detach())
        history.batch_losses.append(value)
        total += value
        steps += 1
    history.epoch_losses.append(total / max(steps, 1))


def _validate_epoch(loop: _Loop, validation: tuple[Tensor, Tensor], history: TrainingHistory) -> None:
    """Record the validation mAP@5 of the epoch just trained; with ``keep_best``, keep a copy
    of the weights of the best epoch so far (the first on a tie)."""
    score = map_at_k(embed(loop.model, validation[0], device=loop.device), validation[1], 5)
    history.val_map5.append(score)
    logger.info("epoch %d: loss %.4f, validation mAP@5 %.4f", len(history), history.final_loss, score)
    if loop.keep_best and (history.best_epoch is None or score > history.val_map5[history.best_epoch - 1]):
        loop.best_state = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
        history.best_epoch = len(history)


@torch.no_grad()
def embed(
    model: nn.Module, images: Tensor, batch_size: int = 1024, device: torch.device | str | None = None
) -> Tensor:
    """``[N, D]`` L2-normalised embeddings of ``images``, computed in eval mode.

    The train/eval mode of every submodule of ``model`` is restored afterwards. The model
    is moved to ``device`` (default: the model's own device), where the result lies.
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    outs: list[Tensor] = []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            outs.append(torch.nn.functional.normalize(model(x).flatten(1), dim=-1))
    if not outs:
        raise ValueError("images is empty")
    return torch.cat(outs)

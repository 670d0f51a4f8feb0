"""Online LAM: training with sampled weights and a running curvature estimate.

Each step (docs/design.md §4), with ``mu`` the current weights of the Laplace subset:

1. ``sigma = 1 / sqrt(relu(H) + prior)``; draw ``theta_s = mu + sigma * eps_s`` for each
   of ``n_samples`` samples (``eps_s ~ N(0, I)``).
2. Embed the batch with ``theta_s`` and take the contrastive loss
   (:class:`~lam_plugin.losses.ContrastiveBatchLoss`) on the embedder's miner tuples.
   Because ``d theta_s / d mu = I``, back-propagating through ``theta_s`` applies the
   gradient at the sampled weights to ``mu`` (and the backbone is trained as usual).
3. Without gradient and with the model in eval mode, as in every fit, the contrastive
   GGN diagonal ``h_s`` at ``theta_s`` over every pair
   of the batch (at most ``max_pairs``; a negative only while its hinge is active), from
   the fit's curvature backend (:meth:`CurvatureBackend.batch_at`), rescaled to the data
   set by ``dataset_size**2 / n_pairs``: an estimate of the curvature summed over every
   pair of the data set.
4. ``H <- memory_factor * H + relu(mean_s h_s)``, starting from ``H_0 = dataset_size``.

The optimiser is RMSprop with weight decay and an exponential learning-rate decay per
epoch, as in the paper. ``H`` is kept in float32 at least (a bfloat16 ``H`` could not
decay by ``memory_factor``); the sampled weights have the parameters' dtype. Inside a
``torch.distributed`` process group every rank starts from rank 0's weights, the
gradients and each step's curvature are averaged over the ranks and rank 0's buffers
(BatchNorm's running statistics) are broadcast after every step
(:mod:`lam_plugin.distributed`), so all ranks keep one model and one ``H``. Subclasses
change the pairs (:attr:`OnlineLaplace.selection`),
the rescaling (:meth:`OnlineLaplace.batch_to_data`) and the update of ``H``
(:meth:`OnlineLaplace.accumulate`, :meth:`OnlineLaplace.end_epoch`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from ._batches import is_pair_batch, labelled, len_or
from ._parameters import unflatten
from .arguments import number, positive_int
from .calling import Batch, ModelCall
from .curvature.base import CurvatureBackend, FitTarget, UnsupportedModelError
from .curvature.last_layer import HeadMismatchError
from .geometry import Geometry, OutputHessian, output_hessian
from .numerics import flush_denormals
from .pairs import PairSelection
from .posterior import EmbeddingPosterior, FitStats, PosteriorConfig
from .prior import marglik_prior_precision
from .wrapping import batch_size, eval_mode, model_device, prepare_inputs

__all__ = ["OnlineLaplace", "dataset_size_of"]

logger = logging.getLogger(__name__)

Fallback = Callable[[CurvatureBackend, Exception], CurvatureBackend]
Loss = Callable[[Tensor, Tensor], Tensor]


class OnlineLaplace:
    """Step-wise online LAM for use inside any training loop (``LaplaceEmbedder.online``
    builds one from its settings).

    Args:
        model: the model, trained in place.
        call: how it is called and its embedding taken.
        target: the weights of the posterior.
        backend: the curvature backend of ``target`` (any :class:`CurvatureBackend`).
        selection: the Hessian pairs of a batch (its generator draws the weight noise too);
            :meth:`LaplaceEmbedder.online` gives every pair of the batch, whatever the
            loss's miner.
        loss: ``loss(embeddings [B, D], labels [B]) -> scalar``.
        geometry: the geometry of the output Hessian; ``config.approx`` its approximation.
        config: the configuration recorded in the returned posterior.
        prior_precision: a number, a ``[P]`` tensor or ``"marglik"`` (1 while training;
            chosen by :meth:`posterior`).
        dataset_size: number of training items (scales the batch curvature; a pair
            ``(anchor, positive)`` is two items).
        lr: RMSprop's learning rate.
        weight_decay: RMSprop's weight decay.
        lr_decay: multiplies the learning rate at each :meth:`end_epoch`.
        memory_factor: ``m`` in ``H <- m H + relu(h)``.
        n_samples: weight samples per step.
        fallback: the backend that takes over when ``backend`` refuses a batch (or raises).
    """

    def __init__(
        self,
        model: nn.Module,
        call: ModelCall,
        target: FitTarget,
        backend: CurvatureBackend,
        selection: PairSelection,
        loss: Loss,
        geometry: Geometry,
        config: PosteriorConfig,
        prior_precision: float | Tensor | str,
        dataset_size: int,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        lr_decay: float = math.exp(-0.01),
        memory_factor: float = 0.999,
        n_samples: int = 1,
        fallback: Fallback | None = None,
    ) -> None:
        positive_int(dataset_size, "dataset_size")
        number(lr, "lr", low=0.0)
        number(weight_decay, "weight_decay", low=0.0, low_open=False)
        number(lr_decay, "lr_decay", low=0.0, high=1.0, high_open=False)
        number(memory_factor, "memory_factor", low=0.0, high=1.0, high_open=False)
        positive_int(n_samples, "n_samples")
        self.model, self.call, self.target, self.backend = model, call, target, backend
        self.selection, self.loss_fn, self.geometry, self.config = selection, loss, geometry, config
        self.prior_precision = prior_precision
        self.dataset_size = int(dataset_size)
        self.memory_factor = memory_factor
        self.n_samples = n_samples
        self.fallback = fallback
        self.generator = selection.generator if selection.generator is not None else torch.Generator()
        params = dict(model.named_parameters())
        n_params = sum(params[n].numel() for n in target.names)
        self.param_dtype = params[target.names[0]].dtype  # of the weights and the returned curvature
        h_dtype = torch.promote_types(self.param_dtype, torch.float32)  # H <- 0.999 H: more than bfloat16's 3 digits
        self.H = torch.full((n_params,), float(dataset_size), dtype=h_dtype, device=model_device(model))
        if isinstance(prior_precision, Tensor) and prior_precision.numel() not in (1, n_params):
            raise ValueError(
                f"prior_precision must be a scalar or one value per weight of the posterior ({n_params}), "
                f"got {prior_precision.numel()}"
            )
        self.optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=lr_decay)
        self.steps = 0
        self.distributed = distributed.in_process_group()
        if self.distributed:
            self._join_process_group()

    def _join_process_group(self) -> None:
        """Check that every rank trains the same thing, and start them from rank 0's weights."""
        distributed.check_same_everywhere(
            {
                "parameters": [[n, list(p.shape)] for n, p in self.model.named_parameters()],
                "subset": self.target.names,
                "approx": self.config.approx,
                "geometry": self.geometry.name,
                "dataset_size": self.dataset_size,
                "n_samples": self.n_samples,
            }
        )
        distributed.broadcast_module(self.model)

    @property
    def prior(self) -> float | Tensor:
        """The prior precision of the sampled weights: a number, or ``[P]`` on ``H``'s device
        (``"marglik"`` samples with 1 until the end, where :meth:`posterior` chooses it)."""
        p = self.prior_precision
        if isinstance(p, str):
            return 1.0
        if isinstance(p, Tensor):
            return float(p) if p.numel() == 1 else p.to(self.H)
        return float(p)

    @flush_denormals()
    def step(self, x: Batch, y: Tensor) -> float:
        """One optimisation step on the batch ``(x, y)``; returns the loss. In a process
        group, a rank whose own part of the step fails makes every rank fail with its
        error before the gradients are averaged (none is left waiting)."""
        error: Exception | None = None
        loss: Tensor | None = None
        curvatures: list[Tensor] = []
        try:
            loss, curvatures = self._losses_and_curvatures(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as err:
            if not self.distributed:
                raise
            error = err
        if self.distributed:
            distributed.fail_together(error, f"online step {self.steps}")
            distributed.average_gradients(self.model)
        assert loss is not None
        self.optimizer.step()
        if self.distributed:
            distributed.broadcast_buffers(self.model)  # each rank's forward updated its own BatchNorm statistics
        with torch.no_grad():
            self.H.mul_(self.memory_factor)
            h = torch.stack(curvatures).mean(0) if curvatures else None
            if self.distributed:
                h = distributed.mean_over_ranks(h, self.H)
            if h is not None:
                self.accumulate(h)
        self.steps += 1
        return float(loss.detach())

    def _losses_and_curvatures(self, x: Batch, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The loss averaged over ``n_samples`` weight samples, and the batch curvature
        ``[P]`` (in ``H``'s dtype) at each sample that has a Hessian pair. The noise
        ``sigma * eps`` is drawn in ``H``'s dtype and added in the parameters' dtype."""
        device = model_device(self.model)
        x = prepare_inputs(x, self.model)
        y = torch.as_tensor(y, device=device)
        if y.ndim != 1 or y.shape[0] != batch_size(x):
            raise ValueError(f"y must hold one label per input ({batch_size(x)}), got shape {tuple(y.shape)}")
        params = dict(self.model.named_parameters())
        sigma = (self.H.clamp_min(0) + self.prior).rsqrt()
        losses, curvatures = [], []
        for _ in range(self.n_samples):
            eps = torch.randn(self.H.shape, generator=self.generator, dtype=self.H.dtype).to(device)
            noise = unflatten((sigma * eps).to(self.param_dtype), self.model, self.target.names)
            sampled = {n: params[n] + noise[n] for n in self.target.names}
            out = self.call.functional(self.model, sampled, x)
            losses.append(self.loss_fn(out, y))
            with torch.no_grad():
                h = self._curvature(x, y, {n: t.detach() for n, t in sampled.items()})
            if h is not None:
                curvatures.append(h)
        return torch.stack(losses).mean(), curvatures

    def _curvature(self, x: Batch, y: Tensor, sampled: dict[str, Tensor]) -> Tensor | None:
        """The batch curvature at the sampled weights, rescaled to the data set; None when
        the batch has no Hessian pair. As in every fit, the model runs in eval mode (no
        dropout; BatchNorm's running statistics, left as they are) and the pairs and the
        output Hessian come from the outputs of that forward pass."""
        n_pairs = 0

        def hessian(f: Tensor) -> OutputHessian:
            nonlocal n_pairs
            pairs = self.selection(y, f)
            n_pairs = len(pairs)
            return output_hessian(f, pairs, self.geometry, self.config.approx)  # type: ignore[arg-type]

        point = self.selection.checkpoint()
        with eval_mode(self.model):
            try:
                h, _ = self.backend.batch_at(x, hessian, sampled)
            except (HeadMismatchError, UnsupportedModelError) as err:
                if self.fallback is None:
                    raise
                self.selection.rewind(point)  # the batch is redone: its pairs count once
                if isinstance(err, HeadMismatchError):  # sampling cannot take the last layer's shortcut either
                    self.target = FitTarget(self.target.names)
                self.backend = self.fallback(self.backend, err)
                logger.warning("%s; using the %s backend from here on", err, self.backend.name)
                h, _ = self.backend.batch_at(x, hessian, sampled)
        return h.to(self.H.dtype) * self.batch_to_data(n_pairs, len(y)) if n_pairs else None

    def run_epochs(self, loader: Iterable[Any], epochs: int, progress: bool = False) -> None:
        """``epochs`` passes of :meth:`step` over the labelled batches of ``loader``, each
        ended by :meth:`end_epoch` (what :meth:`LaplaceEmbedder.fit_online` runs). An epoch
        in which ``loader`` yields no batch is an error (a one-shot iterator, say)."""
        bar = tqdm(total=epochs * len_or(loader, 1), desc="online LAM", disable=not progress)
        try:
            for epoch in range(epochs):
                steps = self.steps
                for batch in loader:
                    loss = self.step(*labelled(batch))
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if self.steps == steps:
                    raise ValueError(
                        f"the loader yielded no batch in epoch {epoch + 1} of {epochs}: it must yield its batches "
                        "in every epoch (a DataLoader or a list of batches)"
                    )
                self.end_epoch()
        finally:
            bar.close()

    def batch_to_data(self, n_pairs: int, batch_size: int) -> float:
        """The factor that rescales one batch's curvature sum to the data set:
        ``dataset_size**2 / n_pairs``."""
        return self.dataset_size**2 / n_pairs

    def accumulate(self, h: Tensor) -> None:
        """Add one step's curvature ``h [P]`` to the decayed ``H``: ``H += relu(h)``."""
        self.H.add_(h.clamp_min(0))

    def end_epoch(self) -> None:
        """Decay the learning rate (call once per epoch)."""
        self.scheduler.step()

    def posterior(self, n_data: int | None = None) -> EmbeddingPosterior:
        """The posterior at the current weights with the running curvature ``relu(H)`` in
        the parameters' dtype, as :meth:`LaplaceEmbedder.fit` gives it."""
        named = dict(self.model.named_parameters())
        mean = torch.cat([named[n].detach().reshape(-1) for n in self.target.names])
        curvature = self.H.clamp_min(0).to(self.param_dtype)
        prior = self.prior
        if isinstance(self.prior_precision, str):
            prior = marglik_prior_precision(curvature, mean)
        config = replace(
            self.config,
            hessian_scale=1.0,
            layer=self.target.layer if self.target.head is not None else None,
            head=self.target.head,
            extra={**self.config.extra, **self.extra()},
        )
        counts = self.selection.counts
        stats = FitStats(
            n_data=n_data or self.dataset_size,
            n_batches=self.steps,
            n_positive=counts.positive,
            n_negative_active=counts.negative_active,
            n_negative_total=counts.negative_total,
            backend=f"online/{self.backend.name}",
        )
        return EmbeddingPosterior(self.model, self.target.names, curvature, prior, mean=mean, config=config, stats=stats)

    def extra(self) -> dict[str, Any]:
        """What the posterior's ``config.extra`` records of this training."""
        return {"online": True, "memory_factor": self.memory_factor, "steps": self.steps}


def dataset_size_of(loader: Iterable[Any], first: Any = None) -> int:
    """The number of items of the loader's data set: ``len(loader.dataset)``, or twice that
    when ``first`` (a loader item) is a pair batch ``(anchors, positives)``, whose rows
    hold two items each, as :meth:`LaplaceEmbedder.fit` counts them. A clear error when
    the loader has no sized dataset."""
    try:
        rows = len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        raise ValueError("pass dataset_size=: the loader has no sized .dataset") from None
    return 2 * rows if first is not None and is_pair_batch(first) else rows

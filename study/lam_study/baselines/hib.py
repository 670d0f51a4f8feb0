"""Hedged Instance Embeddings (Oh et al., 2019)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lam_plugin.wrapping import eval_mode
from lam_study.baselines.base import VarianceHeadBaseline
from lam_study.training import TrainingHistory, _check_data, model_device, preserve_modes, seeded

from ..training import check_schedule

__all__ = ["HIB", "hib_loss"]


def hib_loss(
    mu: Tensor, log_var: Tensor, labels: Tensor, a: Tensor, b: Tensor, k: int, beta: float
) -> Tensor | None:
    """Soft contrastive loss of a batch of stochastic embeddings, plus ``beta * KL``.

    With ``z ~ N(mu, diag(exp(log_var)))`` drawn ``k`` times per input, the match
    probability of a pair is ``p_ij = mean_{k1,k2} sigmoid(-a ||z_i^k1 - z_j^k2|| + b)``.
    The loss is the binary cross-entropy of ``p_ij`` against ``[y_i == y_j]`` over all pairs
    ``i < j`` (positives and negatives weighted equally), plus ``beta`` times the mean
    ``KL(N(mu, sigma^2) || N(0, I))``. ``None`` when the batch has fewer than 2 inputs.
    """
    n_batch, dim = mu.shape
    if n_batch < 2:
        return None
    std = (0.5 * log_var).exp()
    z = mu + std * torch.randn((k, n_batch, dim), device=mu.device, dtype=mu.dtype)  # [k, B, D]
    flat = z.reshape(k * n_batch, dim)
    dist = torch.cdist(flat, flat).view(k, n_batch, k, n_batch)
    logits = -a * dist + b
    # log p and log(1 - p) of the averaged sigmoid, computed stably
    log_p = torch.logsumexp(nn.functional.logsigmoid(logits), dim=(0, 2)) - 2 * math.log(k)
    log_q = torch.logsumexp(nn.functional.logsigmoid(-logits), dim=(0, 2)) - 2 * math.log(k)
    i, j = torch.triu_indices(n_batch, n_batch, offset=1, device=mu.device)
    same = labels[i] == labels[j]
    nll = torch.where(same, -log_p[i, j], -log_q[i, j])
    parts = [nll[same].mean()] if same.any() else []
    if (~same).any():
        parts.append(nll[~same].mean())
    contrastive = torch.stack(parts).mean()
    kl = 0.5 * (log_var.exp() + mu**2 - 1.0 - log_var).sum(-1).mean()
    return contrastive + beta * kl


class HIB(VarianceHeadBaseline):
    """Hedged Instance Embeddings: a stochastic embedding ``z ~ N(mu(x), sigma^2(x))``.

    ``mu`` is the output of ``model`` and ``log sigma^2`` that of a head on
    ``feature_fn(x)``. :meth:`fit` trains the head, the match-probability scale ``a > 0``
    and offset ``b`` and, when ``train_embedder`` is true (the default, as in the paper),
    ``model`` itself, with the soft contrastive loss on ``k`` samples per input plus
    ``beta * KL(N(mu, sigma^2) || N(0, I))``. Training uses the raw (unnormalised) ``z`` as
    in the paper; the samples returned by :meth:`sample` are ``normalise(z)``. ``mu`` and
    the head's features come from two forward passes (``model(x)`` and ``feature_fn(x)``).

    Args:
        model: the embedder producing ``mu``. Trained in place by :meth:`fit` only if
            ``train_embedder=True`` is passed there.
        head: module mapping ``feature_fn(x)`` to ``[B, D]`` log-variances; default
            ``InputScale Linear ReLU Linear`` (the input divided by the features' RMS) built
            at the first :meth:`fit`.
        feature_fn: the head's input; default :func:`default_feature_fn`.
        hidden: width of the default head.
        k: samples per input during training.
        beta: weight of the KL regulariser.
        n: default number of samples at prediction.
        seed: when given, prediction noise is drawn from the global RNG seeded with it
            (its state restored afterwards).
    """

    method_name = "HIB"

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module | None = None,
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        hidden: int = 64,
        k: int = 8,
        beta: float = 1e-4,
        n: int = 100,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, head=head, feature_fn=feature_fn, hidden=hidden, n=n, seed=seed)
        self.k = int(k)
        self.beta = float(beta)
        self.raw_a = nn.Parameter(torch.tensor(0.0))  # a = softplus(raw_a) + 1e-3
        self.b = nn.Parameter(torch.tensor(0.0))

    @property
    def a(self) -> Tensor:
        return nn.functional.softplus(self.raw_a) + 1e-3

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(model_device(self.model))
        mu = self.model(x).flatten(1)
        log_var = self.head(self.feature_fn(x).flatten(1))  # type: ignore[misc]
        return mu, log_var

    @torch.no_grad()
    def mean_log_var(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw ``mu`` ``[B, D]`` and ``log sigma^2`` ``[B, D]`` of ``x`` (eval mode)."""
        head = self._require_head()
        with eval_mode(self.model), eval_mode(head):
            return self._forward(x)

    def fit(
        self,
        images: Tensor,
        labels: Tensor,
        epochs: int = 10,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
        train_embedder: bool = True,
        progress: bool = False,
    ) -> TrainingHistory:
        """Train HIB; the model is updated only when ``train_embedder`` is true.

        With ``train_embedder=False`` the model stays frozen (eval mode, no gradients).
        The model's module modes are restored at the end either way.
        """
        _check_data(images, labels)
        epochs, batch_size, lr = check_schedule(epochs, batch_size, lr)
        device = model_device(self.model)
        with seeded(seed, device), preserve_modes(self.model):
            head = self._prepare_head(images, device)
            self.raw_a.data = self.raw_a.data.to(device)
            self.b.data = self.b.data.to(device)
            params = [*list(head.parameters()), self.raw_a, self.b]
            if train_embedder:
                params += [p for p in self.model.parameters() if p.requires_grad]

            def batch_loss(idx: Tensor) -> Tensor | None:
                x, y = images[idx].to(device), labels[idx].to(device)
                with contextlib.nullcontext() if train_embedder else torch.no_grad():
                    mu = self.model(x).flatten(1)
                    feats = self.feature_fn(x).flatten(1)
                return hib_loss(mu, head(feats), y, self.a, self.b, self.k, self.beta)

            self.model.train(train_embedder)
            head.train()
            history = self._fit_batches(len(labels), batch_loss, params, epochs, batch_size, lr, seed, progress)
            head.eval()
        return history

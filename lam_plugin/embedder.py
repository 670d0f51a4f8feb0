"""LaplaceEmbedder: wraps any embedding model and fits its Laplace posterior."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from ._batches import first_batch, labelled
from ._batches import inputs as inputs_of
from ._parameters import Subset, architecture, fit_target, flatten
from .arguments import check_prior, number, positive_int
from .calling import Batch, Convention, ModelCall, OutputKey
from .curvature.base import BackendOptions, CurvatureBackend, FitTarget, HessianFn, UnsupportedModelError
from .curvature.last_layer import HeadMismatchError
from .curvature.selection import BackendSpec, check_backend, fallback_backend, make_backend
from .geometry import APPROXES, Geometry, OutputHessian, output_hessian, resolve_geometry
from .losses import ContrastiveBatchLoss
from .numerics import flush_denormals
from .online import OnlineLaplace, dataset_size_of
from .pairs import Miner, PairSelection, check_miner
from .posterior import EmbeddingPosterior, FitStats, PosteriorConfig
from .prior import marglik_prior_precision
from .wrapping import batch_size, eval_mode, model_device, prepare_inputs

__all__ = ["LaplaceEmbedder"]

logger = logging.getLogger(__name__)

PriorPrecision = float | Tensor | Literal["marglik"]


class LaplaceEmbedder:
    """Adds a Laplace posterior over (part of) the weights of any embedding model.

    Args:
        model: any ``nn.Module`` mapping a batch to embeddings ``[B, D]`` (or to an output
            from which ``output_key`` takes them). It is never modified by :meth:`fit`.
        subset: ``"last_layer"`` (the last ``nn.Linear`` whose output the embedding
            depends on), ``"all"``, the name of a module (as in ``named_modules()``), or
            a list of parameter-name prefixes.
        approx: ``"pos"``, ``"fix"`` or ``"full"`` (docs/design.md §2).
        geometry: ``"arccos"``, ``"euclidean"`` or a :class:`~lam_plugin.geometry.Geometry`.
        margin: the contrastive margin ``m``; a negative pair counts while
            ``||z_i - z_j||^2 < m`` (its hinge is active).
        miner: ``"all"`` (every unordered pair of a batch) or a pytorch-metric-learning miner.
        prior_precision: a positive float (or ``[P]`` tensor), or ``"marglik"``.
        backend: ``"auto"``, a registered name (``"backpack"``, ``"torch.func"``,
            ``"hooks"``, ``"montecarlo"``, ``"last_layer"``; see
            :data:`lam_plugin.curvature.BACKENDS`), a
            :class:`~lam_plugin.curvature.CurvatureBackend` subclass or an instance.
            ``"auto"`` takes the last layer's closed form where the embedding is that
            layer's output or its L2 normalisation, else BackPACK where it supports every
            module, else hooks where they cover the subset, else torch.func; it logs its
            choice, and the posterior records it (``stats.backend``).
        output_key: how the embedding is taken from the model output: ``None`` (the output
            itself, or a sentence-transformers ``"sentence_embedding"``), a key, an index,
            an attribute of a ``ModelOutput``, or a callable ``(output, inputs) -> [B, D]``
            such as :func:`lam_plugin.calling.mean_pooling`.
        call: how a dict batch is passed: ``"auto"`` (by the signature of ``forward``),
            ``"positional"`` (``model(batch)``) or ``"keywords"`` (``model(**batch)``).
        normalize: L2-normalise the embedding samples.
        hessian_scale: multiplies the curvature in the posterior precision.
        max_pairs: at most this many pairs per batch (drawn at random) enter the curvature.
        chunk_size: vmap chunk size for torch.func Jacobians and for sampling.
        mc_samples: random directions per batch of ``backend="montecarlo"``.
        progress: show a progress bar during fits.
        seed: seeds pair subsampling (and the Monte Carlo directions).
    """

    #: the online trainer :meth:`online` builds (a subclass may change the update of ``H``)
    online_class: type[OnlineLaplace] = OnlineLaplace

    def __init__(
        self,
        model: nn.Module,
        *,
        subset: Subset = "last_layer",
        approx: str = "fix",
        geometry: str | Geometry = "arccos",
        margin: float = 0.7,
        miner: Miner = "all",
        prior_precision: PriorPrecision = 1.0,
        backend: BackendSpec = "auto",
        output_key: OutputKey = None,
        call: Convention = "auto",
        normalize: bool = True,
        hessian_scale: float = 1.0,
        max_pairs: int | None = None,
        chunk_size: int | None = None,
        mc_samples: int = 16,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if approx not in APPROXES:
            raise ValueError(f"approx must be one of {APPROXES}, got {approx!r}")
        check_backend(backend)
        number(margin, "margin", low=0.0)
        number(hessian_scale, "hessian_scale", low=0.0)
        if max_pairs is not None:
            positive_int(max_pairs, "max_pairs")
        if chunk_size is not None:
            positive_int(chunk_size, "chunk_size")
        positive_int(mc_samples, "mc_samples")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        check_miner(miner)
        self.model = distributed.unwrap(model)
        self.subset, self.approx, self.geometry = subset, approx, resolve_geometry(geometry)
        self.margin, self.miner, self.prior_precision = float(margin), miner, check_prior(prior_precision)
        self.backend, self.output_key, self.call = backend, output_key, call
        self.model_call = ModelCall(output_key, call)
        self.normalize, self.hessian_scale, self.max_pairs = normalize, float(hessian_scale), max_pairs
        self.chunk_size, self.mc_samples, self.progress, self.seed = chunk_size, mc_samples, progress, seed
        self.posterior: EmbeddingPosterior | None = None

    # -- what a fit is made of (subclasses may override) -----------------------------------
    def fit_target(self, example: Batch) -> FitTarget:
        """The weights of :attr:`subset` on an example batch (``lam_plugin._parameters.fit_target``)."""
        return fit_target(self.model, self.subset, prepare_inputs(example, self.model), self.model_call)

    def make_backend(self, target: FitTarget) -> CurvatureBackend:
        """The curvature backend of :attr:`backend` for ``target``."""
        return make_backend(self.backend, self.model, self.model_call, target, self._backend_options())

    def pair_selection(self, max_pairs: int | None, generator: torch.Generator) -> PairSelection:
        """How a batch's outputs become its Hessian pairs (miner, hinge, subsampling)."""
        return PairSelection(self.miner, self.margin, max_pairs, generator)

    def loss(self) -> ContrastiveBatchLoss:
        """The training loss of online LAM."""
        return ContrastiveBatchLoss(self.margin, self.miner)

    def posterior_config(self, target: FitTarget) -> PosteriorConfig:
        """What the posterior records of this embedder's settings and of ``target``."""
        return PosteriorConfig(
            geometry=self.geometry.name,
            approx=self.approx,
            margin=self.margin,
            hessian_scale=self.hessian_scale,
            output_key=self.output_key,
            call=self.call,
            normalize=self.normalize,
            layer=target.layer if target.head is not None else None,
            head=target.head,
        )

    def _backend_options(self) -> BackendOptions:
        return BackendOptions(chunk_size=self.chunk_size, mc_samples=self.mc_samples, seed=self.seed)

    def _fallback(self, target: FitTarget) -> Any:
        def take_over(engine: CurvatureBackend, err: Exception) -> CurvatureBackend:
            return fallback_backend(self.backend, engine, err, target, self._backend_options())

        return take_over

    # -- fitting ------------------------------------------------------------------------
    @flush_denormals()
    def fit(self, loader: Iterable[Any]) -> EmbeddingPosterior:
        """Fit the posterior on ``loader`` (yielding ``(x, y)`` batches) and return it.

        The curvature is the contrastive GGN diagonal summed over all batches; the ``relu``
        is applied once to the total for ``approx`` "fix" and "full".
        """
        selection = self.pair_selection(self.max_pairs, torch.Generator().manual_seed(self.seed))
        grouped, error, summed = distributed.in_process_group(), None, None
        try:
            with eval_mode(self.model):
                target = self.fit_target(labelled(first_batch(loader))[0])
                summed = self._sum_batches(loader, target, selection)
        except Exception as err:  # in a process group, every rank must learn of it (no hang)
            if not grouped:
                raise
            error = err
        if grouped:
            distributed.fail_together(error)
        assert summed is not None
        total, n_data, n_batches, target, backend = summed
        if grouped:
            total, n_data, n_batches, target = self._sum_over_ranks(total, n_data, n_batches, target, selection)
        dtype = flatten(self.model, target.names[:1]).dtype
        curvature = (total.clamp_min(0) if self.approx in ("fix", "full") else total).to(dtype)
        _check_curvature(total, curvature, target.names, self.model, selection, self.approx)
        counts = selection.counts
        stats = FitStats(
            n_data=n_data,
            n_batches=n_batches,
            n_positive=counts.positive,
            n_negative_active=counts.negative_active,
            n_negative_total=counts.negative_total,
            backend=backend,
        )
        mean = flatten(self.model, target.names)
        prior = self.prior_precision
        if isinstance(prior, str):
            prior = marglik_prior_precision(self.hessian_scale * curvature, mean)
        config = self.posterior_config(target)
        self.posterior = EmbeddingPosterior(self.model, target.names, curvature, prior, mean=mean, config=config, stats=stats)
        return self.posterior

    fit_posterior = fit

    def _sum_over_ranks(
        self, total: Tensor, n_data: int, n_batches: int, target: FitTarget, selection: PairSelection
    ) -> tuple[Tensor, int, int, FitTarget]:
        """The curvature sum, item and batch counts and pair counts over every rank of the
        process group (:mod:`lam_plugin.distributed`), after checking that the ranks fit
        the same thing. The last layer's shortcut is kept only where every rank kept it."""
        distributed.check_same_everywhere(
            {
                "parameters": {n: list(p.shape) for n, p in self.model.named_parameters() if n in set(target.names)},
                "architecture": architecture(self.model),
                "approx": self.approx,
                "geometry": self.geometry.name,
                "margin": self.margin,
                "hessian_scale": self.hessian_scale,
                "normalize": self.normalize,
                "prior_precision": self.prior_precision if not isinstance(self.prior_precision, Tensor) else "tensor",
            }
        )
        c = selection.counts
        local = [n_data, n_batches, c.positive, c.negative_active, c.negative_total, int(target.head is not None)]
        total, (n_data, n_batches, c.positive, c.negative_active, c.negative_total, heads) = distributed.sum_over_ranks(
            total, local
        )
        if target.head is not None and heads < torch.distributed.get_world_size():
            target = FitTarget(target.names)
        return total, n_data, n_batches, target

    def _sum_batches(
        self, loader: Iterable[Any], target: FitTarget, selection: PairSelection
    ) -> tuple[Tensor, int, int, FitTarget, str]:
        """``(signed curvature sum in float64, items, batches, target, backend name)`` over
        the loader; the target loses its last layer when the closed form gives way to
        another backend."""
        engine = self.make_backend(target)
        total: Tensor | None = None
        n_data = n_batches = 0
        try:
            bar = tqdm(loader, desc=f"curvature ({engine.name})", disable=not self.progress, leave=False)
            for batch in bar:
                x, y = labelled(batch)
                if y.shape[0] != batch_size(x):
                    raise ValueError(f"a batch has {batch_size(x)} inputs but {y.shape[0]} labels")
                x, y = prepare_inputs(x, self.model), y.to(model_device(self.model))
                point = selection.checkpoint()
                try:
                    diag, _ = engine.batch(x, self._hessian_fn(y, selection))
                except (HeadMismatchError, UnsupportedModelError) as err:
                    selection.rewind(point)  # the batch is redone: its pairs count once
                    engine = self._fallback(target)(engine, err)
                    target = FitTarget(target.names) if isinstance(err, HeadMismatchError) else target
                    logger.warning("%s; using the %s backend from here on", err, engine.name)
                    bar.set_description(f"curvature ({engine.name})")
                    diag, _ = engine.batch(x, self._hessian_fn(y, selection))
                total = diag.to(torch.float64, copy=True) if total is None else total.add_(diag)
                n_data, n_batches = n_data + y.shape[0], n_batches + 1
        finally:
            if engine is not self.backend:
                engine.close()
        if total is None:
            raise ValueError("the loader yielded no batch")
        return total, n_data, n_batches, target, engine.name

    def _hessian_fn(self, y: Tensor, selection: PairSelection) -> HessianFn:
        """Outputs -> pairs (miner, hinge, subsample) -> the batch's output Hessian."""

        def build(f: Tensor) -> OutputHessian:
            return output_hessian(f, selection(y, f), self.geometry, self.approx)  # type: ignore[arg-type]

        return build

    # -- online LAM -------------------------------------------------------------------------
    def online(
        self, example: Batch, dataset_size: int, *, max_pairs: int | None = 5000, **kwargs: Any
    ) -> OnlineLaplace:
        """A step-wise online-LAM trainer (``.step(x, y)``, ``.end_epoch()``, ``.posterior()``)
        for use inside your own training loop, on any curvature backend; ``kwargs`` go to
        :attr:`online_class` (:class:`~lam_plugin.online.OnlineLaplace`).

        The loss takes :attr:`miner`'s tuples; the running curvature takes every pair of
        each batch (docs/design.md §4 step 3): the :meth:`pair_selection` it is given has
        ``miner="all"``, whatever :attr:`miner` is."""
        if max_pairs is not None:
            positive_int(max_pairs, "max_pairs")
        with eval_mode(self.model):
            target = self.fit_target(example)
        backend = self.make_backend(target)
        selection = self.pair_selection(max_pairs, torch.Generator().manual_seed(self.seed))
        selection.miner = "all"  # on what pair_selection gives, so that a subclass keeps its other rules (a hinge)
        return self.online_class(
            self.model,
            self.model_call,
            target,
            backend,
            selection,
            self.loss(),
            self.geometry,
            self.posterior_config(target),
            self.prior_precision,
            dataset_size,
            fallback=self._fallback(target),
            **kwargs,
        )

    def fit_online(
        self, loader: Iterable[Any], epochs: int = 20, *, dataset_size: int | None = None, **kwargs: Any
    ) -> EmbeddingPosterior:
        """Train the model with online LAM (docs/design.md §4) and return its posterior.

        ``kwargs`` go to :meth:`online` (``max_pairs``, ``lr``, ``weight_decay``,
        ``lr_decay``, ``memory_factor``, ``n_samples``). ``loader`` must be re-iterable (a
        DataLoader or a list of batches; a one-shot iterator is refused) and yield a batch
        in every epoch (:meth:`OnlineLaplace.run_epochs`). ``dataset_size`` defaults to the
        items of ``loader.dataset``: ``len(loader.dataset)``, or twice that for
        ``(anchors, positives)`` pair batches, two items a row, as :meth:`fit` counts them.
        The rescaling of the batch sums fixes the running curvature only up to a
        convention, so the posterior's overall spread is not calibrated: set it with
        :func:`lam_plugin.calibration.calibrate_temperature` on held-out labelled data.

        Unlike :meth:`fit`, this trains the model's weights in place (it is a training
        loop); every module's train/eval flag is restored afterwards.
        """
        positive_int(epochs, "epochs")
        first = first_batch(loader)
        size = dataset_size if dataset_size is not None else dataset_size_of(loader, first)
        trainer = self.online(inputs_of(first), size, **kwargs)
        flags = {m: m.training for m in self.model.modules()}
        self.model.train()
        try:
            trainer.run_epochs(loader, epochs, progress=self.progress)
        finally:
            for m, flag in flags.items():
                m.training = flag
        self.posterior = trainer.posterior()
        return self.posterior

    # -- using the posterior -------------------------------------------------------------
    def sample_embeddings(self, x: Batch, n: int = 30, generator: torch.Generator | None = None) -> Tensor:
        """``[n, B, D]`` embedding samples; same as ``posterior.sample``."""
        if self.posterior is None:
            raise RuntimeError("call fit(loader) before sampling")
        return self.posterior.sample(x, n=n, generator=generator)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(subset={self.subset!r}, approx={self.approx!r}, "
            f"geometry={self.geometry.name!r}, margin={self.margin}, backend={self.backend!r})"
        )


def _check_curvature(
    total: Tensor, curvature: Tensor, names: Sequence[str], model: nn.Module, selection: PairSelection, approx: str
) -> None:
    """Refuse a fit whose signed curvature is zero everywhere, saying why (no positive
    pair, or weights the embedding does not use); warn where only the ``relu`` makes it
    zero, and name the parameters of the subset that got none."""
    counts = selection.counts
    if not bool(total.ne(0).any()):
        if counts.positive == 0 and (approx == "pos" or counts.negative_active == 0):
            raise ValueError(
                "the fit found no positive pair in any batch, so the curvature is zero: batches need at least two "
                "items of one label (sample several per class), or (anchors, positives) pair batches"
            )
        raise ValueError(
            f"the curvature is zero for every parameter of the subset ({_shown(names)}): the embedding does not "
            "depend on them; choose parameters that it uses (subset='last_layer' finds the last Linear it uses)"
        )
    if not bool(curvature.ne(0).any()):
        logger.warning(
            "the curvature of approx=%r is negative or zero for every parameter, so the posterior is the prior: the "
            "%d active negative pairs outweigh the %d positive ones everywhere (an untrained network does this); "
            "use approx='pos', more positives per batch, or a smaller margin",
            approx,
            counts.negative_active,
            counts.positive,
        )
    sizes = [p.numel() for n, p in model.named_parameters() if n in set(names)]
    unused = [n for n, part in zip(names, total.split(sizes)) if not bool(part.ne(0).any())]
    if unused:
        logger.warning("parameters %s get no curvature: the embedding does not depend on them", _shown(unused))


def _shown(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(list(names)[:limit]) + (", ..." if len(names) > limit else "")

"""LaplaceEmbedder: wraps any embedding model and fits its Laplace posterior."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arguments import check_prior, number, positive_int
from .curvature.backpack import BackpackBackend, backpack_support
from .curvature.base import CurvatureBackend, HessianFn, UnsupportedModelError
from .curvature.functorch import FunctorchBackend
from .curvature.hooks import HooksBackend, hooks_support
from .curvature.last_layer import Head, HeadMismatchError, LastLayerCurvature
from .curvature.montecarlo import MonteCarloBackend
from .geometry import APPROXES, GEOMETRIES, OutputHessian, output_hessian
from .numerics import flush_denormals
from .online import OnlineLaplace, dataset_size_of, first_input
from .pairs import Miner, PairSelection
from .parameters import Subset, check_affects_output, flatten, probe_last_layer, resolve_subset
from .posterior import EmbeddingPosterior, FitStats, PosteriorConfig
from .prior import marglik_prior_precision
from .batches import labelled
from .calling import Batch, Convention, ModelCall, OutputKey
from .wrapping import batch_size, eval_mode, model_device, prepare_inputs

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "backpack", "torch.func", "hooks", "montecarlo"]
PriorPrecision = Union[float, Tensor, Literal["marglik"]]
BACKENDS = ("auto", "backpack", "torch.func", "hooks", "montecarlo")


class LaplaceEmbedder:
    """Adds a Laplace posterior over (part of) the weights of any embedding model.

    Args:
        model: any ``nn.Module`` mapping a batch to embeddings ``[B, D]`` (or to an output
            from which ``output_key`` takes them). It is never modified.
        subset: ``"last_layer"`` (the last ``nn.Linear`` whose output the embedding
            depends on), ``"all"``, the name of a module (as in ``named_modules()``), or
            a list of parameter-name prefixes.
        approx: ``"pos"``, ``"fix"`` or ``"full"``; geometry: ``"arccos"`` or ``"euclidean"``
            (docs/design.md §2).
        margin: the contrastive margin ``m``; a negative pair counts while
            ``||z_i - z_j||^2 < m``.
        hinge: that hinge test (docs/design.md §2, the default). ``False`` counts every
            mined negative whatever its distance, as the paper's code does.
        miner: ``"all"`` (every unordered pair of a batch) or a pytorch-metric-learning miner.
        prior_precision: a positive float (or ``[P]`` tensor), or ``"marglik"``.
        backend: ``"auto"``, ``"backpack"``, ``"torch.func"``, ``"hooks"`` (module hooks and
            batched backward passes: no tracing, no vmap, for Hugging Face models) or
            ``"montecarlo"`` (an unbiased estimate from ``mc_samples`` random directions).
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
        seed: seeds pair subsampling.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        subset: Subset = "last_layer",
        approx: str = "fix",
        geometry: str = "arccos",
        margin: float = 0.7,
        hinge: bool = True,
        miner: Miner = "all",
        prior_precision: PriorPrecision = 1.0,
        backend: BackendName = "auto",
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
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not (isinstance(margin, (int, float)) and margin > 0):
            raise ValueError(f"margin must be a positive number, got {margin!r}")
        number(hessian_scale, "hessian_scale", low=0.0)
        if max_pairs is not None and (not isinstance(max_pairs, int) or max_pairs < 1):
            raise ValueError(f"max_pairs must be a positive int or None, got {max_pairs!r}")
        check_prior(prior_precision)
        if chunk_size is not None:
            positive_int(chunk_size, "chunk_size")
        positive_int(mc_samples, "mc_samples")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if not isinstance(hinge, bool):
            raise TypeError(f"hinge must be a bool, got {type(hinge).__name__}")
        if isinstance(miner, str) and miner != "all":
            raise ValueError(f"miner must be 'all' or a pytorch-metric-learning miner, got {miner!r}")
        self.model = model
        self.subset = subset
        self.approx = approx
        self.geometry = geometry
        self.margin = float(margin)
        self.hinge = hinge
        self.miner = miner
        self.prior_precision = prior_precision
        self.backend = backend
        self.output_key = output_key
        self.call = call
        self.model_call = ModelCall(output_key, call)
        self.normalize = normalize
        self.hessian_scale = float(hessian_scale)
        self.max_pairs = max_pairs
        self.chunk_size = chunk_size
        self.mc_samples = mc_samples
        self.progress = progress
        self.seed = seed
        self.posterior: EmbeddingPosterior | None = None

    # -- fitting ------------------------------------------------------------------------
    @flush_denormals()
    def fit(self, loader: Iterable[Any]) -> EmbeddingPosterior:
        """Fit the posterior on ``loader`` (yielding ``(x, y)`` batches) and return it.

        The curvature is the contrastive GGN diagonal summed over all batches; ``relu`` is
        applied once to the total for ``approx`` "fix" and "full".
        """
        first = _first_batch(loader)
        device = model_device(self.model)
        x0 = prepare_inputs(labelled(first)[0], self.model)
        selection = PairSelection(
            self.miner, self.margin, self.max_pairs, torch.Generator().manual_seed(self.seed), self.hinge
        )
        total: Tensor | None = None
        n_data = n_batches = 0
        out_dim = 0
        with eval_mode(self.model):
            names, layer, head = self._subset(x0)
            engine = self._engine(names, layer, head)
            try:
                bar = tqdm(loader, desc=f"curvature ({engine.name})", disable=not self.progress, leave=False)
                for batch in bar:
                    x, y = labelled(batch)
                    if y.shape[0] != batch_size(x):
                        raise ValueError(f"a batch has {batch_size(x)} inputs but {y.shape[0]} labels")
                    x, y = prepare_inputs(x, self.model), y.to(device)
                    try:
                        diag, out = engine.batch(x, self._hessian_fn(y, selection))
                    except (HeadMismatchError, UnsupportedModelError) as err:
                        engine, head = self._fallback(engine, err, names), None
                        logger.warning("%s; using the %s backend from here on", err, engine.name)
                        bar.set_description(f"curvature ({engine.name})")
                        diag, out = engine.batch(x, self._hessian_fn(y, selection))
                    total = diag.to(torch.float64, copy=True) if total is None else total.add_(diag)
                    n_data += y.shape[0]
                    n_batches += 1
                    out_dim = out.shape[-1]
            finally:
                engine.close()
        if total is None:
            raise ValueError("the loader yielded no batch")
        dtype = flatten(self.model, names[:1]).dtype
        curvature = (total.clamp_min(0) if self.approx in ("fix", "full") else total).to(dtype)
        _check_curvature(total, curvature, names, self.model, selection, self.approx)
        config = PosteriorConfig(
            geometry=self.geometry,
            approx=self.approx,
            margin=self.margin,
            hessian_scale=self.hessian_scale,
            output_key=self.output_key,
            call=self.call,
            normalize=self.normalize,
            layer=layer if head is not None else None,
            head=head,
        )
        stats = FitStats(
            n_data=n_data,
            n_batches=n_batches,
            n_positive=selection.counts.positive,
            n_negative_active=selection.counts.negative_active,
            n_negative_total=selection.counts.negative_total,
            backend=engine.name,
        )
        mean = flatten(self.model, names)
        prior = self.prior_precision
        if isinstance(prior, str):
            prior = marglik_prior_precision(self.hessian_scale * curvature, mean, n_data, out_dim)
        self.posterior = EmbeddingPosterior(self.model, names, curvature, prior, mean=mean, config=config, stats=stats)
        return self.posterior

    fit_posterior = fit

    def _subset(self, x0: Batch) -> tuple[list[str], str | None, Head | None]:
        """``(parameter names, last layer, head)`` of this fit's subset on the example ``x0``.

        ``layer`` is set for ``"last_layer"`` and for a subset naming an ``nn.Linear``;
        ``head`` is the parameter-free map from that layer's output to the embedding
        (identity or L2 normalisation), None where there is none. Calls the model on
        ``x0`` before any work, so a model that cannot take the batch or returns no
        ``[B, D]`` embedding fails here.
        """
        subset, model = self.subset, self.model
        names_given = isinstance(subset, str) and subset not in ("all", "last_layer")
        names = resolve_subset(model, subset) if subset != "last_layer" else None
        if subset == "last_layer" or (names_given and isinstance(dict(model.named_modules())[subset], nn.Linear)):
            layer, head = probe_last_layer(model, x0, self.model_call, None if subset == "last_layer" else subset)
            return resolve_subset(model, subset, layer), layer, head
        assert names is not None
        check_affects_output(model, names, x0, self.model_call)
        return names, None, None

    def _engine(self, names: Sequence[str], layer: str | None, head: Head | None) -> CurvatureBackend:
        """The curvature backend for this fit (docs/curvature.md)."""
        model, call = self.model, self.model_call
        if self.backend == "torch.func":
            return FunctorchBackend(model, call, names, self.chunk_size)
        if self.backend == "hooks":
            return HooksBackend(model, call, names)
        if self.backend == "montecarlo":
            return MonteCarloBackend(model, call, names, samples=self.mc_samples, generator=torch.Generator().manual_seed(self.seed))
        if self.backend == "auto" and layer is not None and head is not None:
            logger.info("backend auto: the closed form of layer %r (head %s)", layer, head)
            return LastLayerCurvature(model, call, names, layer, head)
        converted, reason = backpack_support(model)
        if converted is not None:
            logger.info("backend auto: BackPACK")
            return BackpackBackend(model, call, names, converted=converted)
        if self.backend == "backpack":
            raise UnsupportedModelError(f"backend='backpack' cannot run this model: BackPACK does not support {reason}")
        hooks_reason = hooks_support(model, names)
        if hooks_reason is None:
            logger.info("backend auto: hooks (BackPACK does not support %s)", reason)
            return HooksBackend(model, call, names)
        logger.warning(
            "BackPACK does not support %s, and the hooks backend does not support %s; using the torch.func backend",
            reason,
            hooks_reason,
        )
        return FunctorchBackend(model, call, names, self.chunk_size)

    def _fallback(self, engine: CurvatureBackend, err: Exception, names: Sequence[str]) -> CurvatureBackend:
        """The backend that takes over from ``engine`` after it raised ``err`` on a batch,
        or ``err`` again. The closed form was exact on every earlier batch (each is
        checked), and the hooks backend refuses a model before it returns anything wrong,
        so what they added stands: the general backend of ``auto`` (torch.func after the
        hooks) continues from this batch."""
        if isinstance(err, UnsupportedModelError) and not (self.backend == "auto" and isinstance(engine, HooksBackend)):
            raise err
        engine.close()
        if isinstance(err, UnsupportedModelError):
            return FunctorchBackend(self.model, self.model_call, names, self.chunk_size)
        return self._engine(names, None, None)

    def _hessian_fn(self, y: Tensor, selection: PairSelection) -> HessianFn:
        """Outputs -> pairs (miner, hinge, subsample) -> the batch's output Hessian."""

        def build(f: Tensor) -> OutputHessian:
            return output_hessian(f, selection(y, f), self.geometry, self.approx)  # type: ignore[arg-type]

        return build

    # -- online LAM -------------------------------------------------------------------------
    def online(self, example: Batch, dataset_size: int, **kwargs: Any) -> OnlineLaplace:
        """A step-wise online-LAM trainer (``.step(x, y)``, ``.end_epoch()``, ``.posterior()``)
        for use inside your own training loop; ``kwargs`` go to :class:`OnlineLaplace`."""
        return OnlineLaplace(self, prepare_inputs(example, self.model), dataset_size, **kwargs)

    def fit_online(
        self,
        loader: Iterable[Any],
        epochs: int = 20,
        *,
        dataset_size: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        lr_decay: float = math.exp(-0.01),
        memory_factor: float = 0.999,
        n_samples: int = 1,
        max_pairs: int | None = 5000,
        curvature: Literal["pairs", "triplets"] = "pairs",
        relu: Literal["per_step", "on_use", "per_epoch"] = "per_step",
    ) -> EmbeddingPosterior:
        """Train the model with online LAM (docs/design.md §4) and return its posterior.

        ``curvature`` chooses the pairs of the running curvature and its rescaling:
        ``"pairs"`` (all pairs, ``dataset_size**2 / n_pairs``) or ``"triplets"`` (the
        margin-violating triplets, ``dataset_size / batch_size``, as the paper's code);
        see :mod:`lam_plugin.online`. ``relu`` applies the ``relu`` to every step's
        curvature (docs/design.md §4), only where the signed running sum is used
        (``"on_use"``), or to the signed running sum at the end of every epoch
        (``"per_epoch"``, what the paper's latest code does in effect); see
        :class:`~lam_plugin.online.OnlineLaplace`.

        The rescaling of the batch sums fixes the running curvature only up to a
        convention, so the returned posterior's overall spread is not calibrated: set it
        with :func:`lam_plugin.calibration.calibrate_temperature` on held-out labelled
        data. (On FashionMNIST with ``curvature="triplets"``, temperature 1 gave a test
        ECE of 0.13; the temperature chosen on validation, 10³, gave 0.005.)

        Unlike :meth:`fit`, this trains the model's weights in place (it is a training
        loop); every module's train/eval flag is restored afterwards.
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        size = dataset_size if dataset_size is not None else dataset_size_of(loader)
        trainer = self.online(
            first_input(loader),
            size,
            lr=lr,
            weight_decay=weight_decay,
            lr_decay=lr_decay,
            memory_factor=memory_factor,
            n_samples=n_samples,
            max_pairs=max_pairs,
            curvature=curvature,
            relu=relu,
        )
        flags = {m: m.training for m in self.model.modules()}
        self.model.train()
        try:
            bar = tqdm(total=epochs * _len_or_none(loader, 1), desc="online LAM", disable=not self.progress)
            for _ in range(epochs):
                for batch in loader:
                    x, y = labelled(batch)
                    loss = trainer.step(x, y)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                trainer.end_epoch()
            bar.close()
        finally:
            for m, flag in flags.items():
                m.training = flag
        self.posterior = trainer.posterior()
        return self.posterior

    # -- using the posterior -------------------------------------------------------------
    def _fitted(self) -> EmbeddingPosterior:
        if self.posterior is None:
            raise RuntimeError("call fit(loader) before sampling")
        return self.posterior

    def sample_embeddings(self, x: Batch, n: int = 30, generator: torch.Generator | None = None) -> Tensor:
        """``[n, B, D]`` embedding samples; same as ``posterior.sample``."""
        return self._fitted().sample(x, n=n, generator=generator)

    def __repr__(self) -> str:
        return (
            f"LaplaceEmbedder(subset={self.subset!r}, approx={self.approx!r}, geometry={self.geometry!r}, "
            f"margin={self.margin}, backend={self.backend!r})"
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


def _len_or_none(loader: Iterable[Any], default: int) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return default


def _first_batch(loader: Iterable[Any]) -> Any:
    if iter(loader) is loader:  # type: ignore[comparison-overlap]
        raise TypeError("loader must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    try:
        return next(iter(loader))
    except StopIteration:
        raise ValueError("the loader yielded no batch") from None
    except TypeError as err:
        raise TypeError(f"loader must be an iterable of (x, y) batches, got {type(loader).__name__}") from err

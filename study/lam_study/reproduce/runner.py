"""Training and fitting of every method (:class:`_Runner`), through the file cache of
:mod:`.cache` under the keys of :mod:`.specs`, and the fitted methods it hands to the
evaluation (:class:`_Method`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning.miners import TripletMarginMiner
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin.calibration import calibrate_temperature
from lam_plugin.posterior import EmbeddingPosterior
from lam_plugin.prediction import Prediction
from lam_plugin.prior import marglik_prior_precision

from ..baselines import HIB, PFE, DeepEnsemble, DeterministicEmbedder, MCDropout
from ..baselines.base import default_feature_fn, variance_head
from ..baselines.mc_dropout import dropout_modules
from ..models import fashionmnist_net
from ..paper import PaperLaplaceEmbedder
from ..training import seeded, train_contrastive
from . import specs
from .cache import ModelCache
from .config import ReproduceConfig, _prior_name
from .constants import CALIBRATION_TEMPERATURES
from .protocol import _Tensors

# the package's logger, so that log lines keep the name "lam_study.reproduce"
logger = logging.getLogger(__package__)


@dataclass
class _Method:
    """A fitted method: ``predict(x, keep_samples) -> Prediction`` on one chunk of inputs."""

    name: str
    predict: Callable[[Tensor, bool], Prediction]
    uncertain: bool = True
    info: dict[str, Any] = field(default_factory=dict)


def _online_kwargs(config: ReproduceConfig, progress: bool) -> dict[str, Any]:
    """The arguments of :meth:`PaperLaplaceEmbedder.fit_online` that the configuration sets."""
    return {
        "lr": config.online_lr,
        "max_pairs": config.online_max_pairs or config.max_pairs,
        "curvature": config.online_curvature,
        "relu": config.online_relu,
    }


class _Runner:
    """Builds (trains or loads) the methods of one configuration, with a file cache
    (:attr:`cache`, a :class:`~.cache.ModelCache` of ``cache_dir``)."""

    def __init__(
        self,
        config: ReproduceConfig,
        data: _Tensors,
        cache_dir: Path,
        device: torch.device,
        progress: bool,
        cached_only: bool = False,
    ) -> None:
        self.config = config
        self.data = data
        self.cache = ModelCache(cache_dir, cached_only)
        self.device = device
        self.progress = progress
        self._nets: dict[str, nn.Module] = {}
        self.prior_values: dict[int, dict[str, float]] = {}
        self.curvature_stats: dict[int, dict[str, float | int]] = {}
        self.temperatures: dict[int, dict[str, float]] = {}

    # -- networks --------------------------------------------------------------------------
    def new_net(self, seed: int, dropout: float = 0.0) -> nn.Module:
        """The paper's network with the initial weights of ``seed`` (same for every dropout rate)."""
        with seeded(seed):
            net = fashionmnist_net(
                self.config.embedding_dim, normalize=False, dropout=dropout, dropout_layout=self.config.dropout_layout
            )
        # channels_last convolution weights: 1.03x (batch 256) to 1.47x (batch 64) the
        # training throughput of this network on CPU (docs/benchmarks.md); the values and
        # the cache files (saved contiguous) are the same as in the default layout.
        return net.to(self.device, memory_format=torch.channels_last)

    def net_spec(self, dropout: float) -> dict[str, Any]:
        """The cache spec of this run's contrastive network of dropout rate ``dropout`` (:func:`.specs.net_spec`)."""
        return specs.net_spec(self.config, self.data.fingerprint, dropout)

    def contrastive_net(self, seed: int, dropout: float = 0.0) -> nn.Module:
        """A contrastively trained network (deterministic, ensemble member or MC dropout)."""
        method = "mc_dropout" if dropout > 0 else "deterministic"
        spec = self.net_spec(dropout)
        path = self.cache.path(method, seed, spec)
        if path.name in self._nets:
            return self._nets[path.name]
        net = self.new_net(seed, dropout)
        if self.cache.load_into(net, path):
            logger.info("loaded %s seed %d from %s", method, seed, path)
        else:
            self.cache.miss(f"the {method} network", seed, path)
            logger.info("training %s seed %d (%d images, %d epochs)", method, seed, len(self.data.fit_y), self.config.epochs)
            c = self.config
            train_contrastive(
                net,
                self.data.fit_x,
                self.data.fit_y,
                epochs=c.epochs,
                batch_size=c.batch_size,
                lr=c.lr,
                margin=c.margin,
                miner=self.loss_miner(),
                optimizer=c.optimizer,
                weight_decay=c.weight_decay,
                lr_decay=c.lr_decay,
                validation=(self.data.val_x, self.data.val_y) if c.keep_best_epoch else None,
                keep_best=c.keep_best_epoch,
                seed=seed,
                device=self.device,
                progress=self.progress,
            )
            self.cache.save(net.state_dict(), path, spec)
        net.eval()
        self._nets[path.name] = net
        return net

    def loss_miner(self) -> TripletMarginMiner | None:
        """The miner of the contrastive networks' loss: None for all pairs."""
        if self.config.loss_miner == "triplets":
            return TripletMarginMiner(margin=self.config.margin, type_of_triplets="all")
        return None

    def lam_loader(self, seed: int) -> DataLoader[tuple[Tensor, ...]]:
        dataset = TensorDataset(self.data.fit_x, self.data.fit_y)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=self.config.lam_batch_size, shuffle=True, generator=g)

    def _embedder(self, net: nn.Module, seed: int, approx: str = "fix", pairs: str = "all") -> PaperLaplaceEmbedder:
        """The last-layer ``arccos`` embedder of ``net`` (prior 1) with Hessian pairs ``pairs``
        (:attr:`ReproduceConfig.posthoc_pairs`)."""
        c = self.config
        triplets = pairs == "triplets"
        return PaperLaplaceEmbedder(
            net,
            subset="last_layer",
            approx=approx,
            geometry="arccos",
            margin=c.margin,
            miner=TripletMarginMiner(margin=c.margin, type_of_triplets="all") if triplets else "all",
            prior_precision=1.0,
            # the paper's post-hoc code draws max_pairs triplets, two pairs each, and never
            # tests the hinge of a mined negative
            max_pairs=2 * c.max_pairs if triplets else c.max_pairs,
            hinge=not triplets,
            progress=self.progress,
            seed=seed,
        )

    def _feature_dim(self, net: nn.Module) -> int:
        with torch.no_grad():
            return int(default_feature_fn(net)(self.data.fit_x[:2].to(self.device)).shape[1])

    # -- methods ---------------------------------------------------------------------------
    def build(self, name: str, seed: int) -> _Method:
        return getattr(self, f"_build_{name}")(seed)

    def _build_deterministic(self, seed: int) -> _Method:
        embedder = DeterministicEmbedder(self.contrastive_net(seed))
        return _Method("deterministic", lambda x, keep: embedder.predict(x), uncertain=False)

    def _build_deep_ensemble(self, seed: int) -> _Method:
        seeds = [seed + k for k in range(self.config.ensemble_size)]
        ensemble = DeepEnsemble([self.contrastive_net(s) for s in seeds])
        return _Method(
            "deep_ensemble", lambda x, keep: ensemble.predict(x, return_samples=keep), info={"member_seeds": seeds}
        )

    def _build_mc_dropout(self, seed: int) -> _Method:
        net = self.contrastive_net(seed, self.config.dropout)
        prefix, tail = _split_at_dropout(net)
        mc = MCDropout(tail, n=self.config.n_samples)

        def predict(x: Tensor, keep: bool) -> Prediction:
            with torch.no_grad():
                feats = prefix(x.to(self.device))  # no dropout before this point: computed once
            return mc.predict(feats, return_samples=keep)

        return _Method("mc_dropout", predict, info={"passes": self.config.n_samples, "rate": self.config.dropout})

    def _build_pfe(self, seed: int) -> _Method:
        c = self.config
        det = self.contrastive_net(seed)
        pfe = PFE(det, hidden=c.head_hidden, n=c.n_samples)
        epochs = c.pfe_epochs or c.epochs
        spec = specs.pfe_spec(c, self.net_spec(0.0), epochs)
        path = self.cache.path("pfe", seed, spec)
        head = variance_head(self._feature_dim(det), c.embedding_dim, c.head_hidden).to(self.device)
        if self.cache.load_into(head, path):
            pfe.head = head.eval()
        else:
            self.cache.miss("the PFE head", seed, path)
            logger.info("training the PFE head, seed %d (%d epochs)", seed, epochs)
            pfe.fit(
                self.data.fit_x, self.data.fit_y, epochs=epochs, batch_size=c.batch_size, lr=c.head_lr, seed=seed,
                progress=self.progress,
            )
            assert pfe.head is not None
            self.cache.save(pfe.head.state_dict(), path, spec)
        return _Method("pfe", lambda x, keep: pfe.predict(x, return_samples=keep))

    def _build_hib(self, seed: int) -> _Method:
        c = self.config
        net = self.new_net(seed)
        hib = HIB(net, hidden=c.head_hidden, n=c.n_samples)
        epochs = c.hib_epochs or c.epochs
        spec = specs.hib_spec(c, self.net_spec(0.0), epochs, hib.k, hib.beta)
        path = self.cache.path("hib", seed, spec)
        head = variance_head(self._feature_dim(net), c.embedding_dim, c.head_hidden).to(self.device)
        state = self.cache.load(path)
        loaded = False
        if state is not None:
            try:
                net.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
                head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
                hib.raw_a.data = state["raw_a"].to(self.device)
                hib.b.data = state["b"].to(self.device)
                hib.head = head.eval()
                loaded = True
            except (RuntimeError, KeyError) as err:
                logger.warning("cache file %s does not fit HIB (%s); retraining", path, err)
                self.cache.loaded.remove(path.name)
        if not loaded:
            self.cache.miss("the HIB network and head", seed, path)
            logger.info("training HIB, seed %d (%d epochs)", seed, epochs)
            hib.fit(
                self.data.fit_x, self.data.fit_y, epochs=epochs, batch_size=c.batch_size, lr=c.head_lr, seed=seed,
                train_embedder=True, progress=self.progress,
            )
            assert hib.head is not None
            tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
            tensors.update({f"head.{k}": v for k, v in hib.head.state_dict().items()})
            tensors.update(raw_a=hib.raw_a.data, b=hib.b.data)
            self.cache.save(tensors, path, spec)
        net.eval()
        return _Method("hib", lambda x, keep: hib.predict(x, return_samples=keep))

    def _fit_cached(self, net: nn.Module, seed: int, path: Path, what: str) -> EmbeddingPosterior:
        """The post-hoc fit (:meth:`_embedder`) of ``net``, loaded from ``path`` when cached there."""
        if path.is_file():
            try:
                posterior = EmbeddingPosterior.load(path, net)
                self.cache.loaded.append(path.name)
                return posterior
            except ValueError as err:
                logger.warning("cache file %s does not fit (%s); refitting", path, err)
        self.cache.miss(what, seed, path)
        logger.info("fitting %s, seed %d", what, seed)
        posterior = self._embedder(net, seed, self.config.posthoc_approx, self.config.posthoc_pairs).fit(
            self.lam_loader(seed)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        posterior.save(path)  # written to a temporary file, then renamed
        self.cache.trained.append(path.name)
        return posterior

    def lam_posthoc_base(self, seed: int) -> EmbeddingPosterior:
        """The post-hoc posterior of the deterministic network of ``seed`` (prior 1, cached)."""
        det = self.contrastive_net(seed)
        path = self.cache.path("lam_posthoc", seed, specs.fit_spec(self.config, self.net_spec(0.0)))
        return self._fit_cached(det, seed, path, "the post-hoc LAM curvature")

    def _calibrated(self, posterior: EmbeddingPosterior, seed: int) -> tuple[EmbeddingPosterior, float]:
        """``posterior`` with its temperature chosen on validation ECE (unchanged without validation data).

        The prior sets how the precision is shared between data and prior; the
        temperature then sets the overall spread, which neither the curvature sum nor the
        prior pins down (:mod:`lam_plugin.calibration`).
        """
        if len(self.data.val_y) < 2:
            return posterior, 1.0
        calibrated, report = calibrate_temperature(
            posterior,
            self.data.val_x,
            self.data.val_y,
            temperatures=CALIBRATION_TEMPERATURES,
            n=min(self.config.n_samples, 30),
            seed=seed,
            batch_size=self.config.eval_batch_size,
        )
        return calibrated, report.temperature

    def lam_posthoc_candidates(self, seed: int) -> dict[str, EmbeddingPosterior]:
        """One posterior per prior candidate, sharing the cached curvature, each with its
        temperature calibrated on validation."""
        base = self.lam_posthoc_base(seed)
        out: dict[str, EmbeddingPosterior] = {}
        values: dict[str, float] = {}
        temperatures: dict[str, float] = {}
        for candidate in self.config.candidates:
            if candidate == "marglik":
                value = marglik_prior_precision(base.config.hessian_scale * base.curvature, base.mean)
            else:
                value = float(candidate)
            name = _prior_name(candidate)
            values[name] = value
            posterior = EmbeddingPosterior(
                base.model, base.param_names, base.curvature, value, mean=base.mean, config=base.config, stats=base.stats
            )
            out[name], temperatures[name] = self._calibrated(posterior, seed)
        self.prior_values[seed] = values
        self.temperatures[seed] = temperatures
        curvature = base.curvature.float()
        self.curvature_stats[seed] = {
            "n_params": int(curvature.numel()),
            "zero_fraction": float((curvature <= 0).float().mean()),
            "median": float(curvature.median()),
            "max": float(curvature.max()),
            "n_positive_pairs": base.stats.n_positive,
            "n_negative_pairs_active": base.stats.n_negative_active,
        }
        return out

    def _build_lam_online(self, seed: int) -> _Method:
        c = self.config
        net = self.new_net(seed)
        kwargs = _online_kwargs(c, self.progress)
        spec = specs.online_spec(c, self.net_spec(0.0), kwargs)
        path = self.cache.path("lam_online", seed, spec)
        post_path = self.cache.path("lam_online", seed, spec, suffix=".posterior")
        posterior: EmbeddingPosterior | None = None
        if path.is_file() and post_path.is_file() and self.cache.load_into(net, path):
            try:
                posterior = EmbeddingPosterior.load(post_path, net)
                self.cache.loaded.append(post_path.name)
            except ValueError as err:
                logger.warning("cache file %s does not fit (%s); retraining", post_path, err)
                self.cache.loaded.remove(path.name)
                net = self.new_net(seed)
        if posterior is None:
            missing = post_path if path.is_file() else path
            self.cache.miss("the online-LAM network and its running curvature", seed, missing)
            logger.info("training online LAM, seed %d (%d epochs)", seed, c.epochs)
            embedder = self._embedder(net, seed, c.online_approx)
            embedder.hinge = c.online_hinge
            if c.online_loss_miner == "triplets":
                embedder.miner = TripletMarginMiner(margin=c.margin, type_of_triplets="all")
            posterior = embedder.fit_online(self.lam_loader(seed), epochs=c.epochs, **kwargs)
            self.cache.save(net.state_dict(), path, spec)
            posterior.save(post_path)
            self.cache.trained.append(post_path.name)
        net.eval()
        if c.online_posterior == "refit":
            refit_path = self.cache.path("lam_online", seed, specs.fit_spec(c, spec), suffix=".refit")
            posterior = self._fit_cached(net, seed, refit_path, "the post-hoc LAM curvature of online LAM's weights")
        # the running curvature of online LAM sets the posterior's scale only up to the
        # rescaling of its batch sums: its temperature is chosen on validation ECE
        posterior, temperature = self._calibrated(posterior, seed)
        logger.info("online LAM seed %d: temperature %g", seed, temperature)
        info: dict[str, Any] = {"prior_precision": 1.0, "temperature": temperature}
        return _Method("lam_online", _posterior_predict(posterior, c.n_samples, seed), info=info)


def _split_at_dropout(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(prefix, rest)`` of a Sequential at its first dropout layer; ``(identity, net)`` otherwise.

    Everything before the first dropout is deterministic, so MC dropout can run it once
    per input instead of once per pass; the result has the same distribution.
    """
    if isinstance(net, nn.Sequential):
        drops = set(map(id, dropout_modules(net)))
        for i, module in enumerate(net):
            if id(module) in drops:
                return net[:i].eval(), net[i:]
    return nn.Identity(), net


def _posterior_predict(posterior: EmbeddingPosterior, n: int, seed: int) -> Callable[[Tensor, bool], Prediction]:
    def predict(x: Tensor, keep: bool) -> Prediction:
        # a fresh generator per chunk: every chunk sees the same n weight samples, so the
        # per-sample 1-NN of the ECE compares embeddings of one network at a time
        generator = torch.Generator().manual_seed(10_000 + seed)
        return posterior.predict(x, n=n, generator=generator, return_samples=keep)

    return predict

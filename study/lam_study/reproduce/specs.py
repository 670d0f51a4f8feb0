"""The cache specs of every model and fit of a run: the settings a cached file depends on.

A spec is a JSON-able dict; its hash (:func:`~lam_study.reproduce.cache.short_hash`)
names the cache file, so any change to a spec retrains that model. Fields added after
the first runs were cached enter a spec only with a value other than the one those runs
had, so that their cache files keep their keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .cache import short_hash
from .config import ReproduceConfig
from .constants import CACHE_VERSION, ONLINE_LATER_DEFAULTS


def net_spec(c: ReproduceConfig, fingerprint: str, dropout: float) -> dict[str, Any]:
    """The spec of a contrastively trained network of dropout rate ``dropout`` (0: the
    deterministic network and the ensemble members) on the data of ``fingerprint``."""
    spec = {
        "cache_version": CACHE_VERSION,
        "net": "fashionmnist_net",
        "embedding_dim": c.embedding_dim,
        "dropout": dropout,
        "epochs": c.epochs,
        "lr": c.lr,
        "optimizer": c.optimizer,
        "batch_size": c.batch_size,
        "margin": c.margin,
        "miner": c.loss_miner,
        "data": fingerprint,
    }
    # fields added after the first networks were cached: named only with a value
    # other than those networks', so their cache files keep their keys
    if c.weight_decay:
        spec["weight_decay"] = c.weight_decay
    if c.lr_decay is not None:
        spec["lr_decay"] = c.lr_decay
    if c.keep_best_epoch:
        spec["keep_best_epoch"] = "validation map@5"
    # the layout joined the spec after "pool" networks were cached; it is named only
    # where it changes the network, so those cache files keep their keys
    if dropout > 0 and c.dropout_layout != "pool":
        spec["dropout_layout"] = c.dropout_layout
    return spec


def pfe_spec(c: ReproduceConfig, parent: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """The spec of a PFE head trained for ``epochs`` on the frozen network of spec ``parent``."""
    return {
        "parent": short_hash(parent),
        "head_hidden": c.head_hidden,
        "epochs": epochs,
        "lr": c.head_lr,
        "batch_size": c.batch_size,
        "input_scale": "rms",  # the head divides its input by the features' RMS (InputScale)
    }


def hib_spec(c: ReproduceConfig, base: Mapping[str, Any], epochs: int, k: int, beta: float) -> dict[str, Any]:
    """The spec of a HIB network and head trained for ``epochs`` (``k`` samples per input,
    weight ``beta``) from the initial weights of the network of spec ``base``."""
    return {
        **base,
        "lr": c.head_lr,
        "method": "hib",
        "head_hidden": c.head_hidden,
        "epochs": epochs,
        "k": k,
        "beta": beta,
        "input_scale": "rms",
    }


def fit_spec(c: ReproduceConfig, parent: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of a post-hoc fit (``posthoc_approx``, ``posthoc_pairs``) of the network of spec ``parent``."""
    spec: dict[str, Any] = {
        "parent": short_hash(parent),
        "subset": "last_layer",
        "approx": c.posthoc_approx,
        "geometry": "arccos",
        "margin": c.margin,
        "miner": "all",
        "batch_size": c.lam_batch_size,
        "max_pairs": c.max_pairs,
    }
    if c.posthoc_pairs == "triplets":
        spec.update(miner="triplets", hinge=False, max_pairs=2 * c.max_pairs)
    return spec


def online_spec(c: ReproduceConfig, net: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of an online-LAM network and its running curvature, trained from the initial
    weights of the network of spec ``net`` with the :meth:`fit_online` arguments ``kwargs``."""
    # online LAM has its own optimiser and loss: of the recipe of the contrastive
    # networks only its learning rate (online_lr, below) enters the key
    dropped = ("weight_decay", "lr_decay", "keep_best_epoch")
    base = {k: v for k, v in net.items() if k not in dropped}
    spec = {
        **base,
        "miner": "all",
        "method": "lam_online",
        "lr": c.online_lr,
        "optimizer": "rmsprop (fit_online)",
        "batch_size": c.lam_batch_size,
        "max_pairs": kwargs.get("max_pairs", c.max_pairs),
        "subset": "last_layer",
        "approx": c.online_approx,
        "geometry": "arccos",
        "prior_precision": 1.0,
        # the keys of later options enter only with a value other than their first
        # default, so that the caches of earlier runs stay valid
        "fit_online_kwargs": sorted(k for k in kwargs if k not in ONLINE_LATER_DEFAULTS),
    }
    chosen = {
        "curvature": c.online_curvature,
        "relu": c.online_relu,
        "hinge": c.online_hinge,
        "loss_miner": c.online_loss_miner,
    }
    spec.update({k: v for k, v in chosen.items() if v != ONLINE_LATER_DEFAULTS[k]})
    return spec

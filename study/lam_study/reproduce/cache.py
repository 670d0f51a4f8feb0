"""The file cache of the trained networks and fits of a run (:class:`ModelCache`).

A cached model is one ``safetensors`` file in the cache folder, named after its method,
its seed and the first 10 hex digits of the SHA-256 of its spec (:func:`short_hash`):
``{method}-seed{seed}-{hash}{suffix}.safetensors``. Its metadata holds the lam_plugin
version and the spec; it is written atomically, to a temporary file renamed at the end
(:func:`lam_plugin.file_format.save_atomically`). A file that cannot be read or does not
fit its model is retrained, with a warning; with ``cached_only`` a model that is not in
the cache stops the run with :class:`CacheMissError` instead of being trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from lam_plugin import __version__, file_format

from .config import CacheMissError

# the package's logger, so that log lines keep the name "lam_study.reproduce"
logger = logging.getLogger(__package__)


def short_hash(spec: Mapping[str, Any]) -> str:
    """The first 10 hex digits of the SHA-256 of ``spec`` as sorted JSON: its cache key."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


class ModelCache:
    """The cached models of one run in ``directory``, and the names of the files it trained
    (:attr:`trained`) and loaded (:attr:`loaded`)."""

    def __init__(self, directory: Path, cached_only: bool) -> None:
        self.directory = directory
        self.cached_only = cached_only
        self.trained: list[str] = []
        self.loaded: list[str] = []

    def path(self, method: str, seed: int, spec: Mapping[str, Any], suffix: str = "") -> Path:
        """The cache file of ``method`` at ``seed`` with the spec ``spec``."""
        return self.directory / f"{method}-seed{seed}-{short_hash(spec)}{suffix}.safetensors"

    def save(self, tensors: Mapping[str, Tensor], path: Path, spec: Mapping[str, Any]) -> None:
        """Write ``tensors`` (detached, on the CPU, contiguous) to ``path`` with the version and
        ``spec`` as metadata, and record it as trained."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"lam_plugin_version": __version__, "spec": json.dumps(spec, sort_keys=True, default=str)}
        # no format header: cache files keep the layout of the caches already on disk
        file_format.save_atomically(path, state, meta, framework="pt")
        self.trained.append(path.name)

    def miss(self, what: str, seed: int, path: Path) -> None:
        """Called where ``what`` is about to be trained or fitted because ``path`` is not usable.

        Raises:
            CacheMissError: with ``cached_only``.
        """
        if self.cached_only:
            raise CacheMissError(
                f"{what}, seed {seed}, is not in the cache: no usable {path}. Evaluating cached models "
                "only was asked for (cached_only, --cached-only); run without it to train, or give the "
                "output folder whose cache/ holds this configuration's models"
            )

    def load(self, path: Path) -> dict[str, Tensor] | None:
        """The tensors of ``path``, recorded as loaded; None if there is no such file or it
        cannot be read (with a warning)."""
        if not path.is_file():
            return None
        try:
            state = load_file(str(path))
        except Exception as err:  # a truncated or foreign file: retrain rather than fail
            logger.warning("ignoring unreadable cache file %s (%s)", path, err)
            return None
        self.loaded.append(path.name)
        return state

    def load_into(self, module: nn.Module, path: Path) -> bool:
        """Load the state dict of ``module`` from ``path``; False (with a warning where the file
        does not fit ``module``) if it is not usable."""
        state = self.load(path)
        if state is None:
            return False
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            logger.warning("cache file %s does not fit the model (%s); retraining", path, err)
            self.loaded.remove(path.name)
            return False
        return True

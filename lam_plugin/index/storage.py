"""The index file: safetensors tensors plus string metadata, never pickle.

Tensors: ``faiss_index`` (``faiss.serialize_index`` bytes, uint8), ``ids`` int64 ``[N]``,
``var`` float32 ``[N, D]`` (closed form) or ``samples`` float32 ``[N, n, D]`` (mc).
Metadata: the format name and :data:`FORMAT_VERSION`, the index configuration (JSON),
the posterior fingerprint and a SHA-256 of the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

__all__ = ["FORMAT_VERSION", "read", "write"]

#: Version of the file written by :meth:`UncertainIndex.save`; other versions are refused.
FORMAT_VERSION = 1
_FORMAT_NAME = "lam_plugin.UncertainIndex"


def write(path: Path, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], fingerprint: str | None) -> None:
    """Write ``tensors`` with the metadata above to a temporary file, then rename it to ``path``."""
    metadata = {
        "format": _FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(dict(config)),
        "posterior_fingerprint": fingerprint or "",
        "sha256": _checksum(tensors),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], str | None]:
    """``(tensors, config, posterior fingerprint or None)`` of a file written by :func:`write`.

    Files of another format or version, unreadable files and files whose checksum does
    not match are refused with a ``ValueError``.
    """
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT_NAME:
                raise ValueError(f"{path} is not an UncertainIndex file (format {meta.get('format')!r})")
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise ValueError(
                    f"{path} has format version {meta.get('format_version')!r}; this version of lam_plugin "
                    f"reads version {FORMAT_VERSION} only"
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if _checksum(tensors) != meta.get("sha256"):
        raise ValueError(f"{path} is corrupted: its checksum does not match")
    return tensors, json.loads(meta["config"]), meta.get("posterior_fingerprint") or None


def _checksum(tensors: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(tensors[key]).tobytes())
    return digest.hexdigest()

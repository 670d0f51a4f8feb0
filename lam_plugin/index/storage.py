"""The index file: safetensors tensors plus string metadata, never pickle.

Tensors: ``faiss_index`` (``faiss.serialize_index`` bytes, uint8), ``ids`` int64 ``[N]``,
and for the closed form ``var`` ``[N, D]`` (float16 codes or float32 variances, as the
configuration's ``variance_dtype``), ``var_scale`` float32 ``[N]`` (float16 codes only)
and ``var_sum`` float32 ``[N]`` (:mod:`lam_plugin.index.items` has the encoding), or for
mc ``samples`` float32 ``[N, n, D]``. Metadata: the format name and
:data:`FORMAT_VERSION`, the index configuration (JSON), the posterior fingerprint, a
SHA-256 of the tensors (``sha256``) and one of the configuration and fingerprint
(``config_sha256``; checked where present: files written before it was added are read
without it, their configuration checked against the index they hold on load).

Version 2 (this one) added ``var_scale``, ``var_sum`` and float16 ``var``; version 1
files (float32 ``var`` only) are refused like any other version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import file_format

__all__ = ["FORMAT_VERSION", "read", "write"]

#: Version of the file written by :meth:`UncertainIndex.save`; other versions are refused.
FORMAT_VERSION = 2
_FORMAT_NAME = "lam_plugin.UncertainIndex"
_WHAT = "lam-plugin UncertainIndex"


def write(path: Path, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], fingerprint: str | None) -> None:
    """Write ``tensors`` with the metadata above to ``path`` (:func:`lam_plugin.file_format.write`)."""
    config_json = json.dumps(dict(config))
    metadata = {
        "config": config_json,
        "posterior_fingerprint": fingerprint or "",
        "sha256": _checksum(tensors),
        "config_sha256": _config_checksum(config_json, fingerprint or ""),
    }
    file_format.write(path, tensors, metadata, format_name=_FORMAT_NAME, version=FORMAT_VERSION, framework="np")


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], str | None]:
    """``(tensors, config, posterior fingerprint or None)`` of a file written by :func:`write`.

    Missing files, files safetensors cannot read, files of another format or version and
    files whose checksums do not match (of the tensors; of the configuration and
    fingerprint, in files that have one) are refused (``FileNotFoundError``, ``ValueError``).
    """
    tensors, meta = file_format.read(path, format_name=_FORMAT_NAME, version=FORMAT_VERSION, what=_WHAT, framework="np")
    if _checksum(tensors) != meta.get("sha256"):
        raise ValueError(f"{path} is corrupted: its checksum does not match")
    config_json, fingerprint = meta.get("config", ""), meta.get("posterior_fingerprint", "")
    if "config_sha256" in meta and _config_checksum(config_json, fingerprint) != meta["config_sha256"]:
        raise ValueError(f"{path} is corrupted: the checksum of its configuration does not match")
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupted: its configuration is not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} is corrupted: its configuration is not a JSON object")
    return tensors, config, fingerprint or None


def _checksum(tensors: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(tensors[key]).tobytes())
    return digest.hexdigest()


def _config_checksum(config_json: str, fingerprint: str) -> str:
    return hashlib.sha256(f"{config_json}\0{fingerprint}".encode()).hexdigest()

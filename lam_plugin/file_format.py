"""Versioned safetensors files: the one way lam-plugin writes tensors to disk.

A file holds tensors and string metadata only, nothing executable. The metadata name
the file's format and its version; reading refuses a missing file, one safetensors
cannot parse, another format and another version, each with an error that says which.
Writing goes through a temporary file of its own in the same folder, renamed at the
end, so an interrupted write never leaves a truncated file under the final name and two
processes saving to one path never write into each other's file. The file gets the
permissions ``open()`` would give it (those of the file it replaces, else 0o666 less the
umask), not the owner-only 0o600 of safetensors' own temporary file.

Used by :class:`lam_plugin.EmbeddingPosterior` (torch tensors) and
:class:`lam_plugin.UncertainIndex` (numpy arrays); ``lam-study reproduce`` writes its
cache through :func:`save_atomically` too, without the header.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import safetensors.numpy
import safetensors.torch
from safetensors import SafetensorError, safe_open

from . import __version__
from .distributed import is_writer

logger = logging.getLogger(__name__)

__all__ = ["read", "save_atomically", "write"]

Framework = Literal["pt", "np"]


def write(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str],
    *,
    format_name: str,
    version: int,
    framework: Framework,
) -> None:
    """Write ``tensors`` (torch tensors for ``"pt"``, numpy arrays for ``"np"``) and
    ``metadata`` under ``format_name`` and ``version`` to ``path``."""
    meta = {"format": format_name, "format_version": str(version), **metadata}
    save_atomically(path, tensors, meta, framework=framework)


def save_atomically(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str], *, framework: Framework
) -> None:
    """``safetensors`` ``save_file`` to a temporary file beside ``path``, renamed to ``path``
    at the end; the temporary file is removed if anything fails."""
    path = Path(path)
    if not is_writer():
        logger.debug("not writing %s: only rank 0 of the process group writes files", path)
        return
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: there is no folder {path.parent}")
    save = safetensors.torch.save_file if framework == "pt" else safetensors.numpy.save_file
    # a temporary name of its own, so that two processes saving to one path never share it
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save(dict(tensors), str(tmp), metadata=dict(metadata))
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_mode(path: Path) -> int:
    """Permission bits for a file written to ``path``: those of the file already there,
    else what ``open()`` gives a new file, 0o666 less the process's umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # Linux reports the umask in /proc; elsewhere it can only be read by setting it,
    # which for an instant changes it for the other threads too.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read(
    path: str | os.PathLike[str], *, format_name: str, version: int, what: str, framework: Framework
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a file :func:`write` made with ``format_name`` and
    ``version``; ``what`` names the file kind in errors (e.g. ``"lam-plugin posterior"``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file safetensors cannot read, or of another format or version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), framework=framework) as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a {what} file: safetensors cannot read it ({err})") from err
    if meta.get("format") != format_name:
        raise ValueError(f"{path} is not a {what} file (format {meta.get('format')!r})")
    if meta.get("format_version") != str(version):
        raise ValueError(
            f"{path} has {what} format version {meta.get('format_version')!r}; this lam-plugin "
            f"({__version__}) reads version {version} only"
        )
    return tensors, meta

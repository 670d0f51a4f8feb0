"""Checking and batching what users pass to the index: inputs, arrays, ids, counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any, cast

import numpy as np
from torch import Tensor

from .._batches import inputs, is_one_batch, without_labels
from ..wrapping import slice_batch

__all__ = ["as_ids", "batches", "float32"]


def batches(data: Any, batch_size: int, name: str) -> tuple[Iterable[Any], int | None]:
    """Batches of posterior inputs from a tensor, a dict of tensors or an iterable of
    batches (``x``, ``(x, y, ...)``, dicts with their labels: see :mod:`lam_plugin._batches`),
    and their number (``None`` if unknown). Label entries never reach the posterior. A tuple
    or a list ``[x, y]`` is one batch, as the posterior's ``predict`` reads it."""
    if isinstance(data, tuple) or (isinstance(data, list) and is_one_batch(data)):
        data = inputs(data)
    if isinstance(data, Tensor):
        if data.ndim == 0:
            raise ValueError(f"{name} must be a batch [B, ...], got a scalar tensor")
        n = data.shape[0]
        return (data[i : i + batch_size] for i in range(0, n, batch_size)), -(-n // batch_size)
    if isinstance(data, Mapping):
        data = without_labels(data)
        lengths = {key: value.shape[0] for key, value in data.items() if isinstance(value, Tensor)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the tensors of {name} must have the same batch size, got {lengths}")
        n = next(iter(lengths.values()))
        return (slice_batch(data, i, i + batch_size) for i in range(0, n, batch_size)), -(-n // batch_size)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        total = len(cast("Sized", data)) if hasattr(data, "__len__") else None
        return (inputs(b) for b in data), total
    raise TypeError(
        f"{name} must be a Prediction, a tensor, a dict of tensors or an iterable of batches, "
        f"got {type(data).__name__}"
    )


def float32(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array; arrays that are not floating point
    (integers, booleans, complex numbers, objects) and NaN or infinite entries are refused."""
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        arr = x.detach().cpu().float().numpy()
    else:
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    return arr


def as_ids(ids: Sequence[int] | np.ndarray | Tensor, n: int | None = None) -> np.ndarray:
    """``ids`` as ``[n]`` int64 (any length when ``n`` is ``None``), checked to be distinct
    non-negative integers."""
    arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise ValueError(f"ids must have shape ({'N' if n is None else n},), got {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.unsignedinteger) and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"ids must be below 2**63 (stored as int64), got {int(arr.max())}")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        raise ValueError("ids must be non-negative (-1 marks empty result slots)")
    if np.unique(arr).size != arr.size:
        raise ValueError("ids has duplicates")
    return arr

"""Checks and conversions shared by the metrics: every input becomes a finite numpy
array of the expected rank, or a ``ValueError``/``TypeError`` that names the argument."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ArrayLike", "as_float_array", "as_labels", "check_at_least_two", "check_k", "to_numpy"]

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[int]


def to_numpy(x: ArrayLike) -> np.ndarray:
    """``x`` as a numpy array; a tensor is detached and moved to the CPU first."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # numpy has no bfloat16
        return t.numpy()
    return np.asarray(x)


def as_float_array(x: ArrayLike, name: str, shape: str, *, cast: bool = True) -> np.ndarray:
    """``x`` as a finite, non-empty real array with ``shape.count(',') + 1`` dimensions.

    With ``cast`` the result is float64; without, the input dtype is kept (no copy).
    """
    arr = to_numpy(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    ndim = shape.count(",") + 1
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape} ({ndim}-D), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must not contain NaN or infinite values")
    return arr.astype(np.float64, copy=False) if cast else arr


def as_labels(labels: ArrayLike, n: int, n_name: str) -> np.ndarray:
    """``labels`` as a ``[n]`` array, one per row of the argument ``n_name``, without NaN."""
    arr = to_numpy(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must have shape [N] (1-D), got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise ValueError(f"labels must have one entry per row of {n_name} ({n}), got {arr.shape[0]}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError("labels must not contain NaN values")
    return arr


def check_at_least_two(n: int, name: str) -> None:
    if n < 2:
        raise ValueError(f"{name} must have at least 2 rows for leave-one-out retrieval, got {n}")


def check_k(k: int, n: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"{name} must satisfy 1 <= k < N = {n} (each query has N - 1 others), got {k}")

"""Checks of the arguments users pass to constructors and fitting methods.

Each check names the argument and what was expected, and runs before any work is done,
so that a bad value never reaches the model (``fit_online`` trains it in place).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_prior", "integer", "number", "positive_int"]


def integer(value: Any, name: str, *, low: int) -> int:
    """``value`` as an int of at least ``low``; bools and non-integers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int of at least 1; bools and non-integers are refused."""
    return integer(value, name, low=1)


def number(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = True,
    high_open: bool = True,
) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (open or closed
    at each end as asked); bools and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    x = float(value)
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (math.isfinite(x) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return x


def check_prior(value: Any) -> float | str | Tensor:
    """``"marglik"``, a positive finite number, or a tensor of them (a scalar, or one per
    weight of the posterior: that length is checked where the weights are known)."""
    if isinstance(value, str):
        if value != "marglik":
            raise ValueError(f"prior_precision must be a positive number or 'marglik', got {value!r}")
        return value
    if isinstance(value, Tensor):
        if value.ndim > 1 or not value.is_floating_point():
            raise ValueError(
                f"prior_precision must be a float scalar or a 1-D float tensor, got {value.dtype} of shape "
                f"{tuple(value.shape)}"
            )
        if value.numel() == 0 or not bool(torch.isfinite(value).all() and (value > 0).all()):
            raise ValueError("prior_precision must be positive and finite in every entry")
        return value
    return number(value, "prior_precision", low=0.0)

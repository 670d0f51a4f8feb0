"""Arrays that grow by rows in amortised constant time, for what the index keeps per item."""

from __future__ import annotations

import numpy as np

__all__ = ["GrowingRows"]


class GrowingRows:
    """Rows ``[N, *shape]`` appended in amortised O(1) per row.

    A buffer that doubles when full: adding a gallery in ``K`` chunks copies each row a
    constant number of times on average, instead of ``K`` times as re-concatenating
    would. :attr:`view` is the filled part (a view, valid until the next append).
    """

    def __init__(self, rows: np.ndarray) -> None:
        self._buf = np.ascontiguousarray(rows)
        self._n = rows.shape[0]

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def append(self, rows: np.ndarray) -> np.ndarray:
        """Append ``rows`` ``[k, *shape]`` and return the new :attr:`view`."""
        if self._n == 0 and self._buf.shape[1:] != rows.shape[1:]:  # the shape is set by the first rows
            self._buf = np.empty((0, *rows.shape[1:]), dtype=self._buf.dtype)
        if rows.shape[1:] != self._buf.shape[1:]:
            raise ValueError(f"rows of shape {rows.shape[1:]} cannot join rows of shape {self._buf.shape[1:]}")
        need = self._n + rows.shape[0]
        if need > self._buf.shape[0]:
            grown = np.empty((max(need, 2 * self._buf.shape[0], 256), *self._buf.shape[1:]), dtype=self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = rows
        self._n = need
        return self.view

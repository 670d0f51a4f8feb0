"""Arrays that grow by rows in amortised constant time, and a set of ids that grows the
same way, for what the index keeps per item."""

from __future__ import annotations

import numpy as np

__all__ = ["GrowingRows", "SortedIds"]


class GrowingRows:
    """Rows ``[N, *shape]`` appended in amortised O(1) per row.

    A buffer that doubles when full: adding a gallery in ``K`` chunks copies each row a
    constant number of times on average, instead of ``K`` times as re-concatenating
    would. :attr:`view` is the filled part (a view, valid until the next change); the
    buffer holds at most twice the filled rows (or 256 rows) after an append.
    """

    def __init__(self, rows: np.ndarray) -> None:
        self._buf = np.ascontiguousarray(rows)
        self._n = rows.shape[0]

    @property
    def view(self) -> np.ndarray:
        """The ``[N, *shape]`` filled rows."""
        return self._buf[: self._n]

    def append(self, rows: np.ndarray) -> np.ndarray:
        """Append ``rows`` ``[k, *shape]`` and return the new :attr:`view` (no rows: nothing
        to append, whatever their shape, as an empty store's is not set yet)."""
        if rows.shape[0] == 0:
            return self.view
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

    def delete(self, rows: np.ndarray) -> np.ndarray:
        """Drop the rows at positions ``rows`` ``[k]`` (the others keep their order) into a
        buffer of exactly the rows left, and return the new :attr:`view`."""
        self._buf = np.delete(self.view, rows, axis=0)
        self._n = self._buf.shape[0]
        return self.view


class SortedIds:
    """A set of int64 ids kept as sorted runs whose sizes at least double from the last
    to the first (a log-structured merge).

    Adding ``k`` ids sorts them and merges runs of no larger size into them: each id
    is merged O(log N) times, so ``K`` additions cost O(N log N) in all rather than the
    O(N K) of checking every addition against all ids. A membership test of ``k`` ids is
    a binary search in each of the O(log N) runs.
    """

    def __init__(self, ids: np.ndarray) -> None:
        self._runs: list[np.ndarray] = []
        self.add(ids)

    def add(self, ids: np.ndarray) -> None:
        """Add the ``[k]`` ids (not in the set yet)."""
        if not len(ids):
            return
        run = np.sort(ids)
        while self._runs and len(self._runs[-1]) <= len(run):
            run = np.sort(np.concatenate([self._runs.pop(), run]), kind="stable")  # a merge of two sorted runs
        self._runs.append(run)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """``[k]`` bool: whether each of ``ids`` ``[k]`` is in the set."""
        found = np.zeros(len(ids), dtype=bool)
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, ids), len(run) - 1)
            found |= run[pos] == ids
        return found

"""Variances stored in a few bits per dimension: a per-item scale and a quantised
per-dimension shape.

An item's variances ``b`` ``[D]`` are split into their sum ``s = sum_d b_d`` (kept exactly,
float32, so ``E[d^2]`` stays exact) and the shape ``t_d = b_d / s`` (``sum_d t_d = 1``).
The shape is quantised per dimension to ``2^bits`` levels:

* **encode**: ``u_d = sqrt(t_d)`` falls into one of ``L = 2^bits`` equal bins on
  ``[lo_d, hi_d]`` (the 0.1 % and 99.9 % quantiles of ``u_d`` over a training sample;
  values outside go to the first or last bin), ``c_d = clip(floor((u_d - lo_d) / w_d), 0,
  L - 1)`` with ``w_d = (hi_d - lo_d) / L``. The square root spreads the many small
  variances of a dimension over more bins than a linear grid would.
* **decode**: ``b'_d = s level[d, c_d]``, where ``level[d, j]`` is the mean of ``t_d`` over
  the training items in bin ``j`` of dimension ``d`` (the bin's centre, squared, when no
  training item fell in it), so that the decoded shape is unbiased on the training sample.
* **packing**: bit planes, bit ``k`` of the ``D`` codes in ``ceil(D / 8)`` bytes for each ``k``:
  ``ceil(D / 8) bits`` bytes per item (48 at ``D = 128``, 3 bits), against ``2 D`` of float16.

The error is measured, not bounded (docs/design.md, section 5): with 3 bits the
closed-form variance of a search differs from the float32 one by 0.7 % at the median
and 2.5-2.8 % at the 99th percentile on the gallery measured there; the ``float16``
storage of :mod:`lam_plugin.index.items` keeps a proven ``1e-3``.

Written here rather than taken from FAISS: FAISS's ``ScalarQuantizer`` has no 3-bit
type, and a ``ProductQuantizer`` with one dimension per sub-quantiser and 3 bits (the
same codes with k-means levels) encodes at about 6 microseconds per item of dimension
128 on a 2-core host, 12 times these bit planes and nearly as long as FAISS's own
IVF-PQ ``add`` of the item.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["VarianceQuantizer"]

logger = logging.getLogger(__name__)

#: Quantiles of ``sqrt(t_d)`` over the training sample that bound the bins.
_RANGE_QUANTILES = (0.001, 0.999)
#: Fewer training items than this draw a warning: the 0.1 % quantile of fewer is their minimum.
_FEW = 1000
#: Names of the arrays that hold a trained quantiser, as in :meth:`VarianceQuantizer.state`.
STATE_NAMES = ("var_lo", "var_width", "var_levels")


class VarianceQuantizer:
    """Codes of ``bits`` bits per dimension for the shape of variances (module docstring).

    Args:
        bits: bits per dimension, 2 to 8.
    """

    def __init__(self, bits: int) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {bits}")
        self.bits, self.levels = bits, 1 << bits
        self._lo: np.ndarray | None = None  # [D] float32
        self._inv_width: np.ndarray | None = None  # [D] float32
        self._width: np.ndarray | None = None
        self._table: np.ndarray | None = None  # [D, L] float32, level[d, j]

    @property
    def trained(self) -> bool:
        return self._table is not None

    def code_size(self, dim: int) -> int:
        """Bytes of the codes of one item of dimension ``dim``."""
        return -(-dim // 8) * self.bits

    def train(self, var: np.ndarray) -> None:
        """Set the bins and levels from the float32 variances ``var`` ``[n, D]`` of a sample."""
        n, dim = var.shape
        if n == 0:
            raise ValueError("the variances quantiser needs at least one training item")
        if n < _FEW:
            logger.warning(
                "the %d-bit variance bins are trained on %d items: their measured error needs more "
                "(thousands; train() on a sample, or a first add of more items than train_size)", self.bits, n
            )
        shape = _shape(var, var.sum(axis=1, dtype=np.float32))
        u = np.sqrt(shape)
        lo, hi = np.quantile(u, _RANGE_QUANTILES, axis=0).astype(np.float32)
        width = np.maximum(hi - lo, np.float32(1e-30)) / np.float32(self.levels)
        self._lo, self._width, self._inv_width = lo, width, (1.0 / width).astype(np.float32)
        flat = self._bins(u).astype(np.int64) + np.arange(dim) * self.levels  # bin j of dimension d -> d L + j
        sums = np.bincount(flat.ravel(), weights=shape.ravel(), minlength=dim * self.levels)
        counts = np.bincount(flat.ravel(), minlength=dim * self.levels)
        centres = (lo[:, None] + (np.arange(self.levels) + 0.5) * width[:, None]) ** 2
        means = np.where(counts > 0, sums / np.maximum(counts, 1), centres.ravel())
        self._table = means.reshape(dim, self.levels).astype(np.float32)

    def encode(self, var: np.ndarray, var_sum: np.ndarray) -> np.ndarray:
        """``[n, code_size]`` uint8 codes of the variances ``var`` ``[n, D]`` whose sums are ``var_sum`` ``[n]``."""
        self._check(var.shape[1])
        return self._pack(self._bins(np.sqrt(_shape(var, var_sum))))

    def decode(self, codes: np.ndarray, var_sum: np.ndarray) -> np.ndarray:
        """``[..., D]`` float32 variances ``b'`` of ``codes`` ``[..., code_size]`` and sums ``var_sum`` ``[...]``."""
        assert self._table is not None
        dim = self._table.shape[0]
        bins = self._unpack(codes, dim).astype(np.intp)
        shape = self._table[np.arange(dim), bins]
        shape *= var_sum[..., None]
        return shape

    def state(self) -> dict[str, np.ndarray]:
        """The trained quantiser as arrays, named :data:`STATE_NAMES`."""
        assert self._lo is not None and self._width is not None and self._table is not None
        return dict(zip(STATE_NAMES, (self._lo, self._width, self._table), strict=True))

    def restore(self, state: dict[str, np.ndarray], dim: int, where: str) -> None:
        """Take the arrays of :meth:`state` (read from ``where``), checked against ``dim``."""
        shapes = {"var_lo": (dim,), "var_width": (dim,), "var_levels": (dim, self.levels)}
        for name, want in shapes.items():
            got = state.get(name)
            if got is None or got.shape != want or got.dtype != np.float32:
                found = "missing" if got is None else f"{got.dtype} {got.shape}"
                raise ValueError(f"{where} is inconsistent: {name} should be float32 {want}, found {found}")
        self._lo, self._width, self._table = state["var_lo"], state["var_width"], state["var_levels"]
        self._inv_width = (1.0 / self._width).astype(np.float32)

    def same_as(self, other: VarianceQuantizer) -> bool:
        """Whether ``other`` has the same bits and trained bins and levels (codes mean the same)."""
        if self.bits != other.bits or self.trained != other.trained:
            return False
        return not self.trained or all(np.array_equal(a, b) for a, b in zip(self.state().values(), other.state().values(), strict=True))

    def _check(self, dim: int) -> None:
        if self._table is None:
            raise RuntimeError("the variances quantiser is not trained")
        if dim != self._table.shape[0]:
            raise ValueError(f"variances of dimension {dim}, the quantiser was trained on dimension {self._table.shape[0]}")

    def _bins(self, u: np.ndarray) -> np.ndarray:
        """``[n, D]`` uint8 bins of ``u = sqrt(t)`` ``[n, D]`` (overwritten)."""
        assert self._lo is not None and self._inv_width is not None
        u -= self._lo
        u *= self._inv_width
        np.clip(u, 0.0, np.float32(self.levels - 1), out=u)
        return u.astype(np.uint8)  # truncation: floor of the non-negative values

    def _pack(self, bins: np.ndarray) -> np.ndarray:
        """``[n, bits ceil(D/8)]`` uint8 bit planes: bytes ``k ceil(D/8) ..`` hold bit ``k`` of
        the ``D`` bins (``np.packbits``, big-endian within a byte, zero-padded)."""
        planes = [np.packbits((bins >> k) & 1, axis=-1) for k in range(self.bits)]
        return np.concatenate(planes, axis=-1)

    def _unpack(self, codes: np.ndarray, dim: int) -> np.ndarray:
        """``[..., dim]`` uint8 bins of ``codes`` ``[..., bits ceil(dim/8)]`` (inverse of :meth:`_pack`)."""
        planes = np.split(codes, self.bits, axis=-1)
        bins = np.unpackbits(planes[0], axis=-1, count=dim)
        for k in range(1, self.bits):
            bins |= np.unpackbits(planes[k], axis=-1, count=dim) << k
        return bins


def _shape(var: np.ndarray, var_sum: np.ndarray) -> np.ndarray:
    """``[n, D]`` float32 ``t = var / var_sum`` (zero for an item whose variances are all zero)."""
    inverse = np.divide(np.float32(1.0), var_sum, out=np.zeros_like(var_sum), where=var_sum > 0)
    return var * inverse[:, None]

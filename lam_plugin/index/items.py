"""What the index keeps per item beside FAISS: ids and variances (or samples), row ``i``
of each array belonging to row ``i`` of the FAISS index.

Closed form (``variance="closed_form"``), per item of dimension ``D``:

* ``ids`` int64 ``[N]``;
* ``var_sum`` float32 ``[N]``, ``sum_d b_d`` of the exact variances (so ``E[d^2]`` is exact);
* ``variance_dtype="float32"``: ``var`` float32 ``[N, D]``, the variances ``b`` themselves
  (``4 D + 12`` bytes per item);
* ``variance_dtype="float16"`` (default): ``var`` float16 ``[N, D]`` codes
  ``c_d = fl16(b_d / s)`` and ``var_scale`` float32 ``[N]`` ``s = max_d b_d / 2^15``, so
  that the largest variance maps to the code ``2^15`` and the codes use float16's range
  down to ``2^-29`` of it before losing precision (``2 D + 16`` bytes per item: 272
  instead of 524 at ``D = 128``). Decoded ``b'_d = c_d s`` (the largest exactly) with

      |b'_d - b_d| <= u b_d + 2^-40 max_e b_e,   u = 2^-11 + 2^-22

  (float16 rounding, float32 rounding of the division and product; the second term
  covers dimensions below ``2^-29`` of the item's largest). The closed-form variances
  of a search are sums of the stored ``b`` with non-negative weights: for l2,
  ``dVar/db_d = 4 (a_d + b_d + delta_d^2)`` and ``b_d (a_d + b_d) <= (a_d + b_d)^2``, so

      |Var' - Var| <= (2u + u^2) Var + 2^-38 max_e b_e E[d^2]          (l2)
      |Var' - Var| <= u Var + 2^-40 max_e b_e (||mu_q||^2 + sum_d a_d)  (ip)

  i.e. a relative error below ``1e-3`` (l2; ``5e-4`` ip) of each returned variance up to
  an absolute term of about ``4e-12`` times the item's largest variance times ``E[d^2]``.
  The order probabilities take their variances from the same ``b'``. An item whose
  largest variance is below ``2^-100`` (a standard deviation below ``1e-15``) is scaled
  as if it were ``2^-100`` (``2^15`` over less would overflow float32): its decoded
  variances are off by less than ``2^-110`` each, an error of no consequence.
* ``variance_dtype="3bit"`` (also ``"4bit"``, ``"8bit"``): ``var`` uint8 ``[N, ceil(D/8) bits]``
  codes of the shape ``b / sum_d b_d`` (:mod:`lam_plugin.index.variance_codes`), decoded
  with ``var_sum`` as the per-item scale: ``ceil(D/8) bits + 12`` bytes per item (60 at
  ``D = 128``, 3 bits), with a measured rather than a proven error. The trained
  quantiser is stored beside the items (``var_lo``, ``var_width``, ``var_levels``).

Monte Carlo (``variance="mc"``): ``ids`` and ``samples`` float32 ``[N, n, D]``, item-major
so that one fancy index gathers a neighbour's samples; ``variance_dtype`` does not apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .rows import GrowingRows, SortedIds
from .variance_codes import STATE_NAMES, VarianceQuantizer

__all__ = ["VARIANCE_DTYPES", "ItemStore", "to_float16"]

#: Storage types of the closed-form variances: floats, or codes of a few bits per dimension.
VARIANCE_DTYPES = ("float16", "float32", "8bit", "4bit", "3bit")
#: float16 code of the largest variance of an item (a power of two: the scale is exact).
_TOP_CODE = 2.0**15
_TINY_TOP = 2.0**-100  # ~8e-31: 2^15 / _TINY_TOP stays far inside float32


class ItemStore:
    """Ids and variances (or samples) of the ``N`` items of an index, growable by rows.

    Args:
        variance: ``"closed_form"`` or ``"mc"``.
        variance_dtype: one of :data:`VARIANCE_DTYPES`, the storage of closed-form variances.
        n_samples: samples per item (``"mc"``).
    """

    def __init__(self, variance: str, variance_dtype: str, n_samples: int) -> None:
        self.variance, self.variance_dtype = variance, variance_dtype
        self._rows = {"ids": GrowingRows(np.empty(0, dtype=np.int64))}
        quantised = variance != "mc" and variance_dtype.endswith("bit")
        self.quantizer = VarianceQuantizer(int(variance_dtype[:-3])) if quantised else None
        if variance == "mc":
            self._rows["samples"] = GrowingRows(np.empty((0, n_samples, 0), dtype=np.float32))
        else:
            dtype = np.uint8 if quantised else np.dtype(variance_dtype)
            self._rows["var"] = GrowingRows(np.empty((0, 0), dtype=dtype))
            self._rows["var_sum"] = GrowingRows(np.empty(0, dtype=np.float32))
            if variance_dtype == "float16":
                self._rows["var_scale"] = GrowingRows(np.empty(0, dtype=np.float32))
        self._max_id = -1
        self._sorted: SortedIds | None = None  # built on the first ids not above all stored ones

    def __len__(self) -> int:
        return int(self._rows["ids"].view.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """``[N]`` int64 user ids in row order (a view)."""
        return self._rows["ids"].view

    @property
    def needs_training(self) -> bool:
        """Whether the variances are quantised by a quantiser not trained yet (:meth:`train`)."""
        return self.quantizer is not None and not self.quantizer.trained

    def train(self, var: np.ndarray) -> None:
        """Train the variances quantiser, if any, on the float32 variances ``var`` ``[n, D]`` of a sample."""
        if self.quantizer is not None:
            self.quantizer.train(var)

    @property
    def nbytes(self) -> int:
        """Bytes of the filled rows of all per-item arrays."""
        return sum(rows.view.nbytes for rows in self._rows.values())

    def next_ids(self, n: int) -> np.ndarray:
        """``[n]`` default ids: ``max(ids) + 1`` onwards (``0`` onwards when empty)."""
        return np.arange(self._max_id + 1, self._max_id + 1 + n, dtype=np.int64)

    def check_new(self, ids: np.ndarray) -> None:
        """Refuse ``ids`` ``[k]`` of which some are stored already. Ids above all stored
        ones pass at once; others are looked up in a :class:`SortedIds` of the stored ids."""
        if not len(ids) or ids.min() > self._max_id:
            return
        if self._sorted is None:
            self._sorted = SortedIds(self.ids)
        clash = ids[self._sorted.contains(ids)]
        if clash.size:
            raise ValueError(f"ids already in the index: {clash[:10].tolist()}")

    def append(self, ids: np.ndarray, var: np.ndarray | None, samples: np.ndarray | None) -> None:
        """Append items: ``ids`` ``[B]`` (checked new), float32 variances ``var`` ``[B, D]``
        (closed form) or ``samples`` ``[B, n, D]`` (``"mc"``)."""
        if self.variance == "mc":
            self._rows["samples"].append(samples)  # type: ignore[arg-type]
        else:
            assert var is not None
            var_sum = var.sum(axis=1, dtype=np.float32)
            self._rows["var_sum"].append(var_sum)
            if self.quantizer is not None:
                self._rows["var"].append(self.quantizer.encode(var, var_sum))
            elif self.variance_dtype == "float16":
                # tops below _TINY_TOP (std under 1e-17) share its scale: 2^15 / top would overflow
                top = np.maximum(var.max(axis=1), np.float32(_TINY_TOP))
                self._rows["var"].append(to_float16(var * (np.float32(_TOP_CODE) / top)[:, None]))
                self._rows["var_scale"].append(top * np.float32(1.0 / _TOP_CODE))
            else:
                self._rows["var"].append(var)
        self._rows["ids"].append(ids)
        self._max_id = max(self._max_id, int(ids.max()))
        if self._sorted is not None:
            self._sorted.add(ids)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Sorted ``[k]`` rows of the distinct ``ids`` ``[k]``; unknown ids are refused."""
        stored = np.isin(self.ids, ids)
        if int(stored.sum()) != len(ids):
            unknown = ids[~np.isin(ids, self.ids)]
            raise ValueError(f"ids not in the index: {unknown[:10].tolist()}" + (" ..." if unknown.size > 10 else ""))
        return np.flatnonzero(stored)

    def delete(self, rows: np.ndarray) -> None:
        """Drop the items at ``rows`` ``[k]``; the others keep their order."""
        for arrays in self._rows.values():
            arrays.delete(rows)
        self._max_id = int(self.ids.max()) if len(self) else -1
        self._sorted = None

    def variances(self, rows: np.ndarray) -> np.ndarray:
        """``[..., D]`` float32 variances of the items at ``rows`` ``[...]`` (a new array)."""
        codes = self._rows["var"].view[rows]
        if self.quantizer is not None:
            return self.quantizer.decode(codes, self._rows["var_sum"].view[rows])
        if self.variance_dtype == "float32":
            return codes
        scale = self._rows["var_scale"].view[rows]
        return np.multiply(codes, scale[..., None], dtype=np.float32)

    def var_sums(self, rows: np.ndarray) -> np.ndarray:
        """``[...]`` ``sum_d b_d`` of the items at ``rows`` ``[...]``."""
        return self._rows["var_sum"].view[rows]

    def samples(self, rows: np.ndarray) -> np.ndarray:
        """``[..., n, D]`` samples of the items at ``rows`` ``[...]`` (``"mc"``; a new array)."""
        return self._rows["samples"].view[rows]

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays for a file, by name (module docstring): the per-item arrays and a
        trained variances quantiser."""
        arrays = {name: rows.view for name, rows in self._rows.items()}
        if self.quantizer is not None and self.quantizer.trained:
            arrays |= self.quantizer.state()
        return arrays

    def extend(self, other: ItemStore) -> None:
        """Append the items of ``other`` (same configuration and quantiser, ids not stored here)."""
        if (self.variance, self.variance_dtype) != (other.variance, other.variance_dtype):
            raise ValueError(
                f"cannot merge items stored as {other.variance!r}/{other.variance_dtype!r} into {self.variance!r}/{self.variance_dtype!r}"
            )
        if self.quantizer is not None and other.quantizer is not None and not self.quantizer.same_as(other.quantizer):
            raise ValueError("cannot merge items whose variances were quantised with other bins (train every part on the same sample)")
        self.check_new(other.ids)
        for name, rows in self._rows.items():
            rows.append(other._rows[name].view)
        self._max_id = max(self._max_id, other._max_id)
        self._sorted = None

    def restore(self, tensors: dict[str, np.ndarray], dim: int, path: Path) -> None:
        """Fill this empty store with the arrays of :meth:`tensors` read from ``path``,
        checked to agree with each other, with ``dim`` and with the configuration."""
        n = tensors["ids"].shape[0] if "ids" in tensors else 0
        if self.quantizer is not None and (n or any(name in tensors for name in STATE_NAMES)):
            self.quantizer.restore({name: tensors[name] for name in STATE_NAMES if name in tensors}, dim, str(path))
        for name, rows in self._rows.items():
            want = rows.view
            last = self.quantizer.code_size(dim) if self.quantizer is not None and name == "var" else dim
            shape = (n, *want.shape[1:-1], last) if want.ndim > 1 else (n,)
            got = tensors.get(name)
            empty = n == 0 and got is not None and got.ndim == len(shape) and got.shape[0] == 0  # shape set later
            if got is None or (got.shape != shape and not empty) or got.dtype != want.dtype:
                found = "missing" if got is None else f"{got.dtype} {got.shape}"
                raise ValueError(f"{path} is inconsistent: {name} should be {want.dtype} {shape}, found {found}")
        self._rows = {name: GrowingRows(tensors[name]) for name in self._rows}  # no copy: the next append grows them
        self._max_id = int(self.ids.max()) if n else -1


def to_float16(t: np.ndarray) -> np.ndarray:
    """``t`` (float32, finite, ``0 <= t < 65520``) rounded to float16, to
    nearest with ties to even: bit for bit ``t.astype(np.float16)``, 2-3 times faster
    than that cast (about 6.5 ns per element with numpy 2.4 on a 2-core x86 host).

    On the float32 bits ``b``: a float16 normal (``t >= 2^-14``) has the exponent
    rebiased by ``127 - 15 = 112`` and the 13 low mantissa bits rounded off, ``h =
    (b + 0xFFF + bit 13 of b) >> 13 - 112 * 2^10`` (a carry out of the mantissa raises
    the exponent, as rounding should). A subnormal (``t < 2^-14``) is ``t`` in units of
    ``2^-24``: adding ``0.5`` puts those units in the low mantissa bits of the float32
    sum, rounded by the FPU, so ``h = bits(t + 0.5) - bits(0.5)``.
    """
    bits = t.view(np.uint32)
    half = bits >> 13
    half &= 1
    half += 0x0FFF
    half += bits
    half >>= 13
    half -= 112 << 10
    small = t < np.float32(2.0**-14)
    if small.any():
        half[small] = (t[small] + np.float32(0.5)).view(np.uint32) - np.uint32(0x3F000000)
    return half.astype(np.uint16).view(np.float16)

"""The NaN/infinity scan of host float rows (Numba), imported on first use so that `import kvarray`
does not load Numba.

A float is NaN or infinite iff its exponent bits are all ones. The scan reads eight bytes at a time (four
float16 or two float32 lanes in a uint64): ``(word & exponent mask) + lowest exponent bit`` carries into
a lane's sign bit exactly when that lane's exponent is all ones, and never into the next lane; the
results are OR-ed, so the loop has no branch and vectorizes (about 4 microseconds for a decode step's
``[64, 8, 64]`` float16 rows, where ``numpy.isfinite(x).all()`` takes 40 or more). A `put`'s keys and
values are scanned in the kernel call that writes them (`nonfinite_words`, inlined into
`kvarray.ops.cpu_njit.scatter_copy_pair`), or in one `host_nonfinite` call before other writers.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["FLOAT16_LANES", "FLOAT32_LANES", "NO_LANES", "float_lanes", "host_nonfinite", "nonfinite_words"]

_F16_MASK = np.uint64(0x7C007C007C007C00)
_F16_ADD = np.uint64(0x0400040004000400)
_F16_TOP = np.uint64(0x8000800080008000)
_F32_MASK = np.uint64(0x7F8000007F800000)
_F32_ADD = np.uint64(0x0080000000800000)
_F32_TOP = np.uint64(0x8000000080000000)
_FLOAT16 = np.dtype(np.float16)

#: ``(exponent mask, lowest exponent bit, sign bits)`` of the float lanes of a uint64 word, the constants
#: of `nonfinite_words`: four float16 lanes, two float32 lanes; `NO_LANES` scans nothing.
FLOAT16_LANES = (_F16_MASK, _F16_ADD, _F16_TOP)
FLOAT32_LANES = (_F32_MASK, _F32_ADD, _F32_TOP)
NO_LANES = (np.uint64(0), np.uint64(0), np.uint64(0))


@numba.njit(nogil=True, cache=True)
def nonfinite_words(a: np.ndarray, b: np.ndarray, lanes: tuple[np.uint64, np.uint64, np.uint64]) -> int:
    """1 when a float lane of the uint64 words ``a [W]`` is NaN or infinite, else 2 when one of ``b [V]``
    is, else 0; `lanes` is `FLOAT16_LANES` or `FLOAT32_LANES` (`NO_LANES`: 0 without reading). Inlined
    into the kernels that scan before they write (`kvarray.ops.cpu_njit.scatter_copy_pair`; Numba's
    on-disk cache notices edits only to a kernel's own file: after editing this, touch cpu_njit.py)."""
    mask, add, top = lanes
    if top == 0:
        return 0
    acc = np.uint64(0)
    for i in range(a.size):
        acc |= (a[i] & mask) + add
    if acc & top:
        return 1
    for i in range(b.size):
        acc |= (b[i] & mask) + add
    return 2 if acc & top else 0


@numba.njit(nogil=True, cache=True)
def _scan_float16(a: np.ndarray, b: np.ndarray) -> int:
    """`nonfinite_words` of float16 lanes."""
    return nonfinite_words(a, b, FLOAT16_LANES)


@numba.njit(nogil=True, cache=True)
def _scan_float32(a: np.ndarray, b: np.ndarray) -> int:
    """`nonfinite_words` of float32 lanes."""
    return nonfinite_words(a, b, FLOAT32_LANES)


_NO_WORDS = np.empty(0, np.uint64)


def _words(arr: np.ndarray) -> np.ndarray | None:
    """`arr` as flat uint64 words, or None when its size or strides do not allow a view."""
    if arr.flags.c_contiguous and arr.nbytes % 8 == 0:
        return arr.reshape(-1).view(np.uint64)
    return None


def host_nonfinite(first: np.ndarray, second: np.ndarray | None = None) -> int:
    """Which of the host float16/float32 arrays (any shapes) holds a NaN or an infinity: 0 for `first`,
    1 for `second`, -1 for none. Two arrays of one dtype are scanned in one kernel call (a `put`'s keys
    and values)."""
    a = _words(first)
    b = _NO_WORDS if second is None else _words(second)
    if a is not None and b is not None and (second is None or second.dtype == first.dtype):
        found = _scan_float16(a, b) if first.dtype == _FLOAT16 else _scan_float32(a, b)
        return found - 1
    for index, arr in enumerate((first, second)):  # odd sizes, strides or dtypes: one at a time
        if arr is None:
            continue
        words = _words(arr)
        if words is None:
            bad = not bool(np.isfinite(arr).all())  # NumPy's own loop
        else:
            bad = (_scan_float16 if arr.dtype == _FLOAT16 else _scan_float32)(words, _NO_WORDS) != 0
        if bad:
            return index
    return -1


def float_lanes(dtype: Any) -> tuple[np.uint64, np.uint64, np.uint64] | None:
    """The `nonfinite_words` lanes of float16 or float32 words, None for another dtype."""
    dtype = np.dtype(dtype)
    if dtype == _FLOAT16:
        return FLOAT16_LANES
    return FLOAT32_LANES if dtype == np.dtype(np.float32) else None

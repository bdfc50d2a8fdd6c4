"""Argument checks shared by the public kernel wrappers: dtype, rank, shape, contiguity, index range.

Each check raises a named `kvarray.errors` exception whose message says what was expected. Value checks
(index ranges, distinct cells) read the indices, so they run only on host arrays; device kernels skip
out-of-range indices instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DTypeMismatch, IndexOutOfRange, LayoutError, ShapeMismatch
from ..xp import is_device_array

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
INT8 = np.dtype(np.int8)
SCALE = np.dtype(np.float16)


def dtype_of(x: Any) -> np.dtype:
    return np.dtype(x.dtype)


def check_arrays(**named: Any) -> None:
    """Raise `DTypeMismatch` for an argument that is not an array (a NumPy array or scalar, or a device
    array); None passes (an optional argument left out). The wrappers call it first, so a list gets a named
    error, not an AttributeError from deep inside a check."""
    for name, x in named.items():
        if x is not None and not isinstance(x, (np.ndarray, np.generic)) and not is_device_array(x):
            raise DTypeMismatch(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}")


def check_dtype(name: str, x: Any, allowed: tuple[np.dtype, ...]) -> None:
    if dtype_of(x) not in allowed:
        wanted = " or ".join(str(d) for d in allowed)
        raise DTypeMismatch(f"{name} must be {wanted}, got {x.dtype}")


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ShapeMismatch(f"{name} must be {layout} (rank {rank}), got shape {tuple(x.shape)}")


def check_contiguous(name: str, x: Any, writable: bool = False) -> None:
    flags = x.flags
    if not flags["C_CONTIGUOUS"]:
        raise LayoutError(
            f"{name} must be C-contiguous (got strides {tuple(x.strides)}); pass a contiguous copy"
        )
    if writable and not is_device_array(x) and not flags["WRITEABLE"]:
        raise LayoutError(f"{name} must be writable")


def check_indices(name: str, x: Any, size: int, limit: int, distinct: bool = False) -> None:
    """`x` is a 1-D int32/int64 array of `size` entries in ``[0, limit)`` (and distinct if asked)."""
    check_dtype(name, x, INDEX_DTYPES)
    check_rank(name, x, 1, f"[{size}]")
    if x.shape[0] != size:
        raise ShapeMismatch(f"{name} must have {size} entries, got {x.shape[0]}")
    if size == 0 or is_device_array(x):
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= limit:
        raise IndexOutOfRange(f"{name} must lie in [0, {limit}), got values in [{lo}, {hi}]")
    if distinct and np.unique(x).size != size:
        raise IndexOutOfRange(f"{name} must be distinct: one call may not write a cell twice")


def check_scales(pool_name: str, pool: Any, scales: Any | None) -> int:
    """Check an int8 pool's scales ``[N, C // g]`` float16 (C values per row); returns the group size g.

    A float pool must come without scales, an int8 pool with them.
    """
    if dtype_of(pool) != INT8:
        check_dtype(pool_name, pool, FLOAT_DTYPES)
        if scales is not None:
            raise DTypeMismatch(f"scales were given but {pool_name} is {pool.dtype}, not int8")
        return 0
    if scales is None:
        raise DTypeMismatch(f"{pool_name} is int8 and needs its scales [rows, values_per_row // group_size]")
    check_dtype("scales", scales, (SCALE,))
    check_contiguous("scales", scales, writable=True)
    values = int(np.prod(pool.shape[1:], dtype=np.int64))
    if (
        scales.ndim != 2
        or scales.shape[0] != pool.shape[0]
        or scales.shape[1] == 0
        or values % scales.shape[1]
    ):
        raise ShapeMismatch(
            f"scales of an int8 pool of shape {tuple(pool.shape)} must be "
            f"[{pool.shape[0]}, {values} // group_size], "
            f"got {tuple(scales.shape)}"
        )
    return values // scales.shape[1]

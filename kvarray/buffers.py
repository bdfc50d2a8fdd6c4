"""Per-pass helpers shared by the caches: the checks of `put`'s arguments, per-plan device copies of host
index arrays, and staging buffers that grow and are reused across passes.

Shapes: R rows written, H kv heads, D head_dim.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from .errors import DeviceMismatch, DTypeMismatch, IndexOutOfRange, ShapeMismatch
from .xp import from_dlpack, is_device_array

#: Staging buffers grow by this factor when too small, so that a growing batch reallocates rarely.
GROWTH = 1.5


def check_layer(layer: object, num_layers: int) -> None:
    """Raise `IndexOutOfRange` unless `layer` is an integer in ``[0, num_layers)``."""
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
        raise IndexOutOfRange(f"layer must be in [0, {num_layers}), got {layer!r}")


def check_rows(
    name: str, arr: Any, xp: ModuleType, rows: int, heads: int, dim: int, dtypes: tuple[np.dtype, ...],
    axis: str = "T",
) -> Any:
    """`arr` as a C-contiguous ``[rows, heads, dim]`` array of namespace `xp` (zero-copy when it already
    is one), from any DLPack producer. O(1): shape and dtype only, never the values.

    Raises `ShapeMismatch` (rank, head shape, then row count; `axis` names the rows in the message),
    `DTypeMismatch` (a dtype not in `dtypes`) or `DeviceMismatch` (`host_rows`).
    """
    out = host_rows(name, arr, xp)
    if out.ndim != 3 or tuple(out.shape[1:]) != (heads, dim):
        want = (rows, heads, dim)
        raise ShapeMismatch(f"{name} must be [{axis}, kv_heads, head_dim] = {want}, got {tuple(out.shape)}")
    if out.shape[0] != rows:
        raise ShapeMismatch(f"{name} has {out.shape[0]} rows; {rows} are expected ({axis})")
    if np.dtype(out.dtype) not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise DTypeMismatch(f"{name} must be {wanted}, got {out.dtype}")
    return xp.ascontiguousarray(out)


def host_rows(name: str, arr: Any, xp: ModuleType) -> Any:
    """`arr` as an array of namespace `xp` (`from_dlpack`), refusing with `DeviceMismatch` an array in
    CUDA memory for host (NumPy) pools: rows are never copied off a device behind the caller's back."""
    if xp is np and is_device_array(arr):
        raise DeviceMismatch(
            f"{name} live on a CUDA device; this cache's pools are host NumPy arrays (xp=numpy): pass host "
            "arrays, or build the cache with xp=cupy"
        )
    return from_dlpack(arr, xp)


class DeviceCopies:
    """Host NumPy arrays of the current plan on the pools' side: the arrays themselves for NumPy pools,
    one device copy per name and plan for CuPy pools (`clear` at each new plan)."""

    __slots__ = ("xp", "_copies")

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp
        self._copies: dict[str, Any] = {}

    def get(self, name: str, arr: np.ndarray) -> Any:
        """`arr` on the pools' side, copied once per plan under `name`."""
        if self.xp is np:
            return arr
        copy = self._copies.get(name)
        if copy is None:
            copy = self._copies[name] = self.xp.asarray(arr)
        return copy

    def convert(self, arr: np.ndarray) -> Any:
        """`arr` on the pools' side, not remembered (for arrays used once)."""
        return arr if self.xp is np else self.xp.asarray(arr)

    def clear(self) -> None:
        """Forget the copies (a new plan)."""
        self._copies = {}


class StagingBuffers:
    """Reused output buffers, one flat array per key, grown (x `GROWTH`) when a request does not fit.

    `held` remembers, per key, what the buffer holds (for a cache that can skip re-staging the same data);
    it is forgotten when the buffer is reallocated.
    """

    __slots__ = ("xp", "_buffers", "held")

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp
        self._buffers: dict[Any, Any] = {}
        self.held: dict[Any, Any] = {}

    def get(self, key: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        """A C-contiguous `shape` array of `dtype` over the storage kept under `key`."""
        size = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.size < size or np.dtype(buf.dtype) != np.dtype(dtype):
            grown = 0 if buf is None else int(GROWTH * buf.size)
            buf = self._buffers[key] = self.xp.empty(max(size, grown), dtype=dtype)
            self.held.pop(key, None)
        return buf[:size].reshape(shape)

    def clear(self) -> None:
        """Release every buffer."""
        self._buffers, self.held = {}, {}

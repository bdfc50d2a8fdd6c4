"""The kernels: validated public wrappers that dispatch by array type.

Host (NumPy) arrays run the Numba CPU kernels of `kvarray.ops.cpu`; device arrays (CuPy, or anything with
``__cuda_array_interface__``) run the Numba CUDA kernels of `kvarray.ops.cuda`. `kvarray.ops.reference`
holds the NumPy oracle with the same signatures. Every wrapper checks dtypes, ranks, shapes and contiguity
(and, for host indices, their range) and raises a named `kvarray.errors` exception before any write, so a
refused call changes nothing. Shapes use N pool rows (cells), H kv heads, D head_dim, T rows written,
S sequences, L padded length, C = H * D values per row and g values per int8 group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ConfigError, DeviceMismatch, DTypeMismatch, IndexOutOfRange, ShapeMismatch
from ..guard import check_finite, check_finite_kv
from ..spec import RopeSpec
from ..xp import is_device_array
from .checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    INT8,
    check_arrays,
    check_contiguous,
    check_dtype,
    check_indices,
    check_rank,
    check_scales,
    dtype_of,
)

__all__ = [
    "backend_for",
    "dequantize_int8",
    "gather_rows",
    "kv_layers_writer",
    "kv_writer",
    "move_rows",
    "quantize_int8",
    "rope_shift",
    "scatter_rows",
]


def backend_for(*arrays: Any) -> ModuleType:
    """The kernel module for these arrays: `kvarray.ops.cpu` for host arrays, `kvarray.ops.cuda` for device
    arrays; raises `DeviceMismatch` when they are mixed."""
    sides = {is_device_array(a) for a in arrays if a is not None}
    if len(sides) > 1:
        raise DeviceMismatch("kernel arguments are split between host memory and a CUDA device")
    if sides == {True}:
        from . import cuda

        return cuda
    from . import cpu

    return cpu


def kv_writer(
    key_pool: Any, value_pool: Any, key_scales: Any | None = None, value_scales: Any | None = None,
    finite: bool = False,
) -> Callable[[Any, Any, Any], None]:
    """``write(keys, values, cells)``: `scatter_rows` of ``keys [T, H, D]`` into ``key_pool [N, H, D]`` and of
    ``values`` into ``value_pool`` at ``cells [T]`` int64, prepared once for one layer's pair of pools.

    With `finite` (always for an int8 pool), ``write`` refuses keys or values holding NaN or infinity with
    `NonFiniteValues` and writes nothing. Not validated otherwise: for a cache's `put`, which checks the
    rows and owns the cells. The CPU backend scans and writes two float pools of one dtype in one kernel
    call; otherwise it is `check_finite`, then the backend's `scatter_rows` twice.
    """
    backend = backend_for(key_pool, value_pool, key_scales, value_scales)
    make = getattr(backend, "kv_writer", None)
    if make is not None:
        return make(key_pool, value_pool, key_scales, value_scales, finite)
    checked = (finite or key_scales is not None, finite or value_scales is not None)

    def write(keys: Any, values: Any, cells: Any) -> None:
        check_finite_kv(keys, values, checked)
        backend.scatter_rows(key_pool, keys, cells, key_scales)
        backend.scatter_rows(value_pool, values, cells, value_scales)

    return write


def kv_layers_writer(
    key_pools: Sequence[Any], value_pools: Sequence[Any], finite: bool = False
) -> Callable[[Any, Any, Any], bool] | None:
    """``write(keys, values, cells)`` of every layer at once, ``keys``, ``values`` ``[L, T, H, D]`` into the
    L pairs of pools ``[N, H, D]`` at ``cells [T]`` int64, where the backend has such a kernel (the CPU,
    for float pools of one dtype: `kvarray.ops.cpu.kv_layers_writer`); None otherwise (write layer by layer
    with `kv_writer`). ``write`` returns False, writing nothing, for rows it does not take; with `finite`
    it raises `NonFiniteValues` and writes nothing when a row holds NaN or infinity. Not validated
    otherwise: for a cache's `put_layers`, which checks the rows and owns the cells."""
    make = getattr(backend_for(*key_pools, *value_pools), "kv_layers_writer", None)
    return None if make is None else make(key_pools, value_pools, finite)


def _check_pool(name: str, pool: Any, scales: Any | None) -> int:
    check_rank(name, pool, 3, "[cells, kv_heads, head_dim]")
    check_contiguous(name, pool, writable=True)
    return check_scales(name, pool, scales)


def _check_rows_match(rows_name: str, rows: Any, pool: Any) -> None:
    check_dtype(rows_name, rows, FLOAT_DTYPES)
    check_rank(rows_name, rows, 3, "[tokens, kv_heads, head_dim]")
    check_contiguous(rows_name, rows)
    if tuple(rows.shape[1:]) != tuple(pool.shape[1:]):
        raise ShapeMismatch(
            f"{rows_name} rows are [kv_heads, head_dim] = {tuple(rows.shape[1:])}, "
            f"the pool's are {tuple(pool.shape[1:])}"
        )


def scatter_rows(pool: Any, rows: Any, cells: Any, scales: Any | None = None) -> None:
    """Write new rows into given cells of a pool, quantizing on the way when the pool is int8.

    Args:
        pool: ``[N, H, D]`` float16/float32, or int8 with `scales`; C-contiguous, written in place.
        rows: ``[T, H, D]`` float16/float32 (converted to the pool's dtype on the way); finite for an int8
            pool (`NonFiniteValues` otherwise: a NaN would leave its group's scale meaningless).
        cells: ``[T]`` int32/int64, distinct, in ``[0, N)``: ``pool[cells[t]] = rows[t]``.
        scales: ``[N, H * D // g]`` float16 for an int8 pool (written for each cell), else None.
    """
    check_arrays(pool=pool, rows=rows, cells=cells, scales=scales)
    _check_pool("pool", pool, scales)
    _check_rows_match("rows", rows, pool)
    check_indices("cells", cells, rows.shape[0], pool.shape[0], distinct=True)
    if dtype_of(pool) == INT8:
        check_finite("rows", rows)  # NaN or infinity would leave a group's scale and values meaningless
    backend_for(pool, rows, cells, scales).scatter_rows(pool, rows, cells, scales)


def gather_rows(pool: Any, indptr: Any, indices: Any, out: Any, scales: Any | None = None) -> None:
    """Copy each sequence's cells into a padded ``[S, H, L, D]`` staging buffer (HND), dequantizing int8.

    Args:
        pool: ``[N, H, D]`` float16/float32, or int8 with `scales`.
        indptr: ``[S + 1]`` int32/int64, nondecreasing from 0: sequence s owns
            ``indices[indptr[s]:indptr[s + 1]]`` (the page table, page size 1).
        indices: ``[indptr[S]]`` int32/int64 cells in ``[0, N)``, each sequence's in position order.
        out: ``[S, H, L, D]`` float, L >= the longest sequence; the pool's dtype for a float pool,
            float16/float32 for an int8 pool. Positions past a sequence's length are set to 0.
        scales: ``[N, H * D // g]`` float16 for an int8 pool, else None.
    """
    check_arrays(pool=pool, indptr=indptr, indices=indices, out=out, scales=scales)
    _check_pool("pool", pool, scales)
    check_dtype("out", out, FLOAT_DTYPES if dtype_of(pool) == INT8 else (dtype_of(pool),))
    check_rank("out", out, 4, "[sequences, kv_heads, length, head_dim]")
    check_contiguous("out", out, writable=True)
    n_seq, heads, length, dim = out.shape
    if (heads, dim) != tuple(pool.shape[1:]):
        raise ShapeMismatch(
            f"out is [S, H, L, D] with (H, D) = {(heads, dim)}, the pool's are {tuple(pool.shape[1:])}"
        )
    check_dtype("indptr", indptr, INDEX_DTYPES)
    check_rank("indptr", indptr, 1, "[sequences + 1]")
    if indptr.shape[0] != n_seq + 1:
        raise ShapeMismatch(
            f"indptr must have S + 1 = {n_seq + 1} entries for out's S = {n_seq}, got {indptr.shape[0]}"
        )
    if not is_device_array(indptr):
        lengths = np.diff(indptr)
        if indptr[0] != 0 or (lengths < 0).any():
            raise IndexOutOfRange("indptr must start at 0 and never decrease")
        if n_seq and lengths.max() > length:
            raise ShapeMismatch(f"out holds L = {length} positions, the longest sequence has {lengths.max()}")
        check_indices("indices", indices, int(indptr[-1]), pool.shape[0])
    else:
        check_dtype("indices", indices, INDEX_DTYPES)
        check_rank("indices", indices, 1, "[nnz]")
    backend_for(pool, indptr, indices, out, scales).gather_rows(pool, indptr, indices, out, scales)


def move_rows(pools: Sequence[Any], src: Any, dst: Any, length: Any) -> None:
    """Apply a plan of row moves to every pool at once (the defragmentation kernel).

    Args:
        pools: arrays ``[N, ...]`` with the same N, any trailing shape and dtype (keys, values and scales of
            every layer), C-contiguous, moved in place.
        src: ``[M]`` int32/int64 first source row of each run.
        dst: ``[M]`` int32/int64 first destination row of each run.
        length: ``[M]`` int32/int64 rows in each run (>= 0).

    Every run reads the rows as they were before the call, so a run's source may overlap any destination;
    destination ranges must be pairwise disjoint, and all runs must lie in ``[0, N)``.
    """
    if not isinstance(pools, (list, tuple)):
        raise ShapeMismatch(f"pools must be a list or tuple of arrays, got {type(pools).__name__}")
    check_arrays(**{f"pools[{i}]": pool for i, pool in enumerate(pools)}, src=src, dst=dst, length=length)
    if not pools:
        return
    rows = pools[0].shape[0]
    for i, pool in enumerate(pools):
        if pool.ndim < 1 or pool.shape[0] != rows:
            raise ShapeMismatch(
                f"pools[{i}] has {pool.shape[0] if pool.ndim else 0} rows, pools[0] has {rows}"
            )
        check_contiguous(f"pools[{i}]", pool, writable=True)
    runs = src.shape[0] if getattr(src, "ndim", 0) == 1 else -1
    for name, arr in (("src", src), ("dst", dst), ("length", length)):
        check_dtype(name, arr, INDEX_DTYPES)
        check_rank(name, arr, 1, "[runs]")
        if arr.shape[0] != runs:
            raise ShapeMismatch(
                f"src, dst and length must have one entry per run; {name} has {arr.shape[0]}, src {runs}"
            )
    if not is_device_array(src):
        _check_runs(src, dst, length, rows)
    backend_for(*pools, src, dst, length).move_rows(pools, src, dst, length)


def _check_runs(src: np.ndarray, dst: np.ndarray, length: np.ndarray, rows: int) -> None:
    if len(src) == 0:
        return
    if (length < 0).any():
        raise IndexOutOfRange("run lengths must be >= 0")
    if (length > rows).any():
        raise IndexOutOfRange(f"every run must lie in [0, {rows}): a run is longer than the pools")
    room = rows - length.astype(np.int64)  # start <= rows - length: no overflow, as start + length could
    for name, start in (("src", src), ("dst", dst)):
        if (start < 0).any() or (start.astype(np.int64) > room).any():
            raise IndexOutOfRange(f"every {name} run must lie in [0, {rows})")
    order = np.argsort(dst, kind="stable")
    begins, ends = dst[order], dst[order] + length[order]
    live = length[order] > 0
    begins, ends = begins[live], ends[live]
    if (begins[1:] < ends[:-1]).any():
        raise IndexOutOfRange("destination runs overlap: a row cannot receive two moves")


def quantize_int8(x: Any, q: Any, scales: Any) -> None:
    """Quantize float rows to int8 with one float16 scale per group (symmetric absmax; docs/kernels.md).

    Args:
        x: ``[R, ...]`` float16/float32, C = prod of the trailing dims values per row, finite
            (`NonFiniteValues` otherwise).
        q: int8, x's shape, written.
        scales: ``[R, C // g]`` float16, written; g consecutive values of a row share a scale.
    """
    check_arrays(x=x, q=q, scales=scales)
    _check_quant_pair("x", x, q, scales)
    check_dtype("x", x, FLOAT_DTYPES)
    check_finite("x", x)
    backend_for(x, q, scales).quantize_int8(x, q, scales)


def dequantize_int8(q: Any, scales: Any, out: Any) -> None:
    """Dequantize int8 rows: ``out = q * scale`` of the row's group.

    Args:
        q: ``[R, ...]`` int8, C values per row.
        scales: ``[R, C // g]`` float16.
        out: float16/float32, q's shape, written.
    """
    check_arrays(q=q, scales=scales, out=out)
    _check_quant_pair("out", out, q, scales)
    check_dtype("out", out, FLOAT_DTYPES)
    check_contiguous("out", out, writable=True)
    backend_for(q, scales, out).dequantize_int8(q, scales, out)


def _check_quant_pair(float_name: str, values: Any, q: Any, scales: Any) -> None:
    if dtype_of(q) != INT8:
        raise DTypeMismatch(f"q must be int8, got {q.dtype}")
    if q.ndim < 1:
        raise ShapeMismatch("q must have a row axis first: [rows, ...]")
    if tuple(values.shape) != tuple(q.shape):
        raise ShapeMismatch(
            f"{float_name} and q must have one shape, got {tuple(values.shape)} and {tuple(q.shape)}"
        )
    check_contiguous(float_name, values)
    check_contiguous("q", q, writable=True)
    check_scales("q", q, scales)


def rope_shift(pool: Any, cells: Any, deltas: Any, rope: RopeSpec, scales: Any | None = None) -> None:
    """Rotate cached keys by a position delta of rotary embedding, in place (the context-shift kernel).

    Args:
        pool: ``[N, H, D]`` key pool, float16/float32, or int8 with `scales` (dequantized, rotated in float64
            and re-quantized).
        cells: ``[T]`` int32/int64 distinct cells in ``[0, N)`` to rotate.
        deltas: ``[T]`` int32/int64 position change of each cell (new position - old position).
        rope: the model's `RopeSpec` (theta, rotary dims, neox or gptj pairing, scaling).
        scales: ``[N, H * D // g]`` float16 for an int8 pool, else None.
    """
    check_arrays(pool=pool, cells=cells, deltas=deltas, scales=scales)
    if not isinstance(rope, RopeSpec):
        raise ConfigError(f"rope must be a RopeSpec, got {type(rope).__name__}")
    _check_pool("pool", pool, scales)
    rope.rotary_dims(pool.shape[2])
    check_indices("cells", cells, cells.shape[0] if cells.ndim == 1 else -1, pool.shape[0], distinct=True)
    check_dtype("deltas", deltas, INDEX_DTYPES)
    check_rank("deltas", deltas, 1, "[T]")
    if deltas.shape[0] != cells.shape[0]:
        raise ShapeMismatch(f"deltas must have one entry per cell ({cells.shape[0]}), got {deltas.shape[0]}")
    backend_for(pool, cells, deltas, scales).rope_shift(pool, cells, deltas, rope, scales)

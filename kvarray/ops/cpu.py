"""Numba CPU kernels: the host fast path of every kernel in `kvarray.ops` (same names and signatures as
`kvarray.ops.reference`; bit-identical results, see docs/kernels.md).

The functions here are thin: they view the arrays as the kernels in `kvarray.ops.cpu_njit` (copies, RoPE)
and `kvarray.ops.cpu_int8` (quantize, dequantize, int8 gather and RoPE) want them (2-D rows; float16 as
its uint16 bit pattern; raw row bytes and addresses for copies), compute derived values (group size, the
RoPE angles of each distinct delta and the pairing, int64 indices, the move strategy, whether to stream)
and call one ``@njit`` kernel. Inputs are assumed valid (the public wrappers in `kvarray.ops` check them).
Shapes: N pool rows (cells), H kv heads, D head_dim, T rows, S sequences, L padded length, C = H * D.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numba
import numpy as np

from ..errors import DTypeMismatch, IndexOutOfRange, LayoutError, ShapeMismatch
from ..finite import NO_LANES, float_lanes
from ..guard import check_finite, check_finite_kv
from ..spec import RopeSpec, RopeStyle
from .checks import INDEX_DTYPES, check_contiguous, check_dtype, check_rank
from .cpu_copy import PIECE_BYTES, CopyHelper
from .cpu_int8 import dequantize_rows, gather_dequantize, quantize_rows, rope_int8
from .cpu_njit import (
    MOVE_PIECE_BYTES,
    ROPE_GPTJ,
    ROPE_NEOX,
    STREAM_BYTES,
    copy_blocks,
    copy_runs_in_order,
    gather_copy,
    rope_float,
    scatter_convert,
    scatter_copy,
    scatter_copy_layers,
    scatter_copy_pair,
)

__all__ = [
    "copy_runs", "dequantize_int8", "gather_rows", "kv_layers_writer", "kv_writer", "move_rows",
    "quantize_int8", "rope_shift", "scatter_rows", "swap_thread_limit",
]

#: Calls moving fewer bytes than this run the serial twin of their kernel (no thread wake-up, see
#: `cpu_njit._parallel`); a decode step's put of 64 rows of 2 KiB stays below it.
PARALLEL_BYTES = 256 << 10
#: Calls moving at least this many bytes hand work items out dynamically (see `_launch`).
DYNAMIC_BYTES = 1 << 20


_local = threading.local()  # the calling thread's limit on the threads of its parallel kernels


def swap_thread_limit(threads: int) -> int:
    """Let the calling thread's kernels use at most `threads` Numba threads (0: Numba's own setting; 1:
    always the serial twins, and `copy_runs` without its helper thread) until the next call; returns the
    limit it replaces.

    The limit is applied where a kernel would run in parallel, not around every call (a decode step of the
    engine, `EngineCore.step`, runs only serial twins, and switching Numba's thread count costs tens of
    microseconds each way)."""
    previous = getattr(_local, "threads", 0)
    _local.threads = threads
    return previous


def _launch(kernel: Any, nbytes: int, *args: Any) -> Any:
    """Run `kernel` on `args`, sized by the `nbytes` the call moves.

    Small calls, and every call under a thread limit of 1 (`swap_thread_limit`), run the kernel's serial
    twin. Large calls run in parallel (on at most the limit's threads) with work items handed out one at
    a time (``numba.parallel_chunksize(1)``) instead of one static slice per thread, so a thread the OS
    pauses (a busy machine) does not hold up the others; work items are blocks (64 rows, 64 positions,
    64 KiB), so this costs nothing measurable."""
    limit = getattr(_local, "threads", 0)
    if nbytes < PARALLEL_BYTES or limit == 1:
        return kernel.serial(*args)
    outer = numba.get_num_threads()
    if limit and limit < outer:
        numba.set_num_threads(limit)
    try:
        with numba.parallel_chunksize(1) if nbytes >= DYNAMIC_BYTES else nullcontext():
            return kernel(*args)
    finally:
        if limit and limit < outer:
            numba.set_num_threads(outer)


def _bits(a: np.ndarray) -> np.ndarray:
    """`a` as the kernels see it: float16 as its uint16 bit pattern, other dtypes unchanged."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _row_bytes(a: np.ndarray, rows: int) -> np.ndarray:
    """A C-contiguous array as ``[rows, B]`` uint8: the raw bytes of each row."""
    return a.reshape(rows, -1).view(np.uint8)


def _index(x: np.ndarray) -> np.ndarray:
    """Indices as int64 (one kernel specialization for int32 and int64 callers; a no-op for int64)."""
    return np.ascontiguousarray(x, dtype=np.int64)


def scatter_rows(
    pool: np.ndarray, rows: np.ndarray, cells: np.ndarray, scales: np.ndarray | None = None
) -> None:
    """Write ``rows [T, H, D]`` into ``pool[cells[t]]`` (``pool [N, H, D]``); quantize when the pool is int8.

    `cells` ``[T]`` distinct in ``[0, N)``; an int8 pool's ``scales [N, H * D // g]`` float16 get each written
    cell's scales. Float rows of another float dtype are rounded to the pool's dtype.
    """
    n_rows = rows.shape[0]
    if n_rows == 0:
        return
    cells64 = _index(cells)
    nbytes = rows.nbytes
    if scales is not None:
        flat = pool.reshape(pool.shape[0], -1)
        _launch(quantize_rows, nbytes, _bits(rows).reshape(n_rows, -1), cells64, flat, _bits(scales))
    elif rows.dtype == pool.dtype:
        stream = nbytes >= STREAM_BYTES
        _launch(
            scatter_copy, nbytes, _row_bytes(pool, pool.shape[0]), _row_bytes(rows, n_rows), cells64, stream
        )
    else:
        flat = _bits(pool).reshape(pool.shape[0], -1)
        _launch(scatter_convert, nbytes, flat, _bits(rows).reshape(n_rows, -1), cells64)


def kv_writer(
    key_pool: np.ndarray,
    value_pool: np.ndarray,
    key_scales: np.ndarray | None = None,
    value_scales: np.ndarray | None = None,
    finite: bool = False,
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``write(keys, values, cells)``: `scatter_rows` of ``keys [T, H, D]`` into ``key_pool [N, H, D]`` and of
    ``values [T, H, D]`` into ``value_pool``, at ``cells [T]`` int64, prepared once for a pair of pools.

    With `finite` (always for an int8 pool), rows holding NaN or infinity are refused with
    `NonFiniteValues` before anything is written. Two float pools of one dtype, written with rows of that
    dtype, take one kernel call that scans both arrays and then writes both (the pools' byte views are made
    here, once); other pairs (int8, a conversion) take a `check_finite` call and two `scatter_rows` calls.
    """
    checked = (finite or key_scales is not None, finite or value_scales is not None)

    def write_each(keys: np.ndarray, values: np.ndarray, cells: np.ndarray) -> None:
        check_finite_kv(keys, values, checked)
        scatter_rows(key_pool, keys, cells, key_scales)
        scatter_rows(value_pool, values, cells, value_scales)

    dtype = key_pool.dtype
    if key_scales is not None or value_scales is not None or value_pool.dtype != dtype:
        return write_each
    key_bytes, value_bytes = key_pool.view(np.uint8), value_pool.view(np.uint8)
    lanes = float_lanes(dtype) if finite else NO_LANES
    assert lanes is not None, "float pools only"

    def write(keys: np.ndarray, values: np.ndarray, cells: np.ndarray) -> None:
        if keys.dtype != dtype or values.dtype != dtype or (finite and (keys.nbytes | values.nbytes) % 8):
            write_each(keys, values, cells)  # a conversion, or rows that are not whole uint64 words
        elif len(keys):
            nbytes = 2 * keys.nbytes
            k, v = keys.view(np.uint8), values.view(np.uint8)
            stream = nbytes >= STREAM_BYTES
            if _launch(scatter_copy_pair, nbytes, key_bytes, value_bytes, k, v, cells, stream, lanes):
                check_finite("keys", keys, ("values", values))  # nothing was written: name the row
                raise AssertionError("the scan in scatter_copy_pair and check_finite disagree")

    return write


def kv_layers_writer(
    key_pools: Sequence[np.ndarray], value_pools: Sequence[np.ndarray], finite: bool = False
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], bool] | None:
    """``write(keys, values, cells)``: `kv_writer`'s write of every layer at once, ``keys``, ``values``
    ``[L, T, H, D]`` into the L pairs of pools ``[N, H, D]`` at ``cells [T]`` int64, in one kernel call
    (`scatter_copy_layers`) that scans them all for NaN and infinity first (with `finite`) and then writes.
    For float pools of one dtype (None otherwise: the caller writes layer by layer). ``write`` returns
    False, writing nothing, for rows it does not take (another dtype, rows not in whole uint64 words, or
    writes of `STREAM_BYTES` or more, which the parallel per-layer kernels do better); it raises
    `NonFiniteValues` (nothing written) when a row holds NaN or infinity. The pools must stay allocated
    while ``write`` is used (their addresses are taken here)."""
    dtype = key_pools[0].dtype
    pools = [*key_pools, *value_pools]
    if any(p.dtype != dtype or not p.flags.c_contiguous for p in pools) or float_lanes(dtype) is None:
        return None
    lanes = float_lanes(dtype) if finite else NO_LANES
    key_addrs = np.array([p.ctypes.data for p in key_pools], np.int64)
    value_addrs = np.array([p.ctypes.data for p in value_pools], np.int64)
    rows = key_pools[0].shape[0]

    def write(keys: np.ndarray, values: np.ndarray, cells: np.ndarray) -> bool:
        nbytes = keys.nbytes + values.nbytes
        if keys.dtype != dtype or values.dtype != dtype or nbytes >= STREAM_BYTES or nbytes % 8:
            return False
        k, v = keys.view(np.uint8), values.view(np.uint8)
        if scatter_copy_layers(key_addrs, value_addrs, rows, k, v, cells, lanes):
            check_finite("keys", keys, ("values", values))  # nothing was written: name the row
            raise AssertionError("the scan in scatter_copy_layers and check_finite disagree")
        return True

    write.pools = pools  # type: ignore[attr-defined]  # the pools whose addresses the kernel writes to
    return write


def gather_rows(
    pool: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    out: np.ndarray,
    scales: np.ndarray | None = None,
) -> None:
    """Copy each sequence's cells into a padded ``out [S, H, L, D]`` (HND), dequantizing an int8 pool.

    ``pool [N, H, D]``; page table ``indptr [S + 1]``, ``indices [indptr[S]]``;
    ``out[s, :, j] = pool[indices[indptr[s] + j]]`` for j below the sequence's length, 0 after.
    """
    n_seq, heads, length, dim = out.shape
    if out.size == 0:
        return
    indptr64, indices64 = _index(indptr), _index(indices)
    size = dim * out.itemsize
    if scales is not None:
        flat = pool.reshape(pool.shape[0], -1)
        _launch(gather_dequantize, out.nbytes, flat, _bits(scales), indptr64, indices64, _bits(out))
    else:
        _launch(
            gather_copy,
            out.nbytes,
            _row_bytes(pool, pool.shape[0]).reshape(pool.shape[0], heads, size),
            indptr64,
            indices64,
            _row_bytes(out, n_seq).reshape(n_seq, heads, length, size),
            out.nbytes >= STREAM_BYTES,
        )


def quantize_int8(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> None:
    """Quantize ``x [R, ...]`` float16/float32 into ``q`` (x's shape, int8) and ``scales [R, C // g]``."""
    n_rows = x.shape[0]
    if n_rows == 0 or x.size == 0:
        return
    cells = np.arange(n_rows, dtype=np.int64)
    _launch(
        quantize_rows, x.nbytes, _bits(x).reshape(n_rows, -1), cells, q.reshape(n_rows, -1), _bits(scales)
    )


def dequantize_int8(q: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """Dequantize ``q [R, ...]`` int8 with ``scales [R, C // g]`` float16 into ``out`` (q's shape, float)."""
    n_rows = q.shape[0]
    if n_rows == 0 or q.size == 0:
        return
    _launch(dequantize_rows, out.nbytes, q.reshape(n_rows, -1), _bits(scales), _bits(out).reshape(n_rows, -1))


def rope_shift(
    pool: np.ndarray, cells: np.ndarray, deltas: np.ndarray, rope: RopeSpec, scales: np.ndarray | None = None
) -> None:
    """Rotate the keys ``pool[cells[t]]`` (``pool [N, H, D]``) by ``deltas[t]`` positions of RoPE, in place.

    `cells` ``[T]`` distinct, `deltas` ``[T]`` integers; an int8 pool comes with ``scales [N, H * D // g]``
    (dequantized, rotated in float64, re-quantized). Angles and rotation in float64, as the reference: the
    cos/sin of each distinct delta's angles come from NumPy (as the reference's do), so the result is the
    reference's bit for bit.
    """
    if len(cells) == 0:
        return
    dim = pool.shape[2]
    inv_freq = np.asarray(rope.inv_freq(dim), dtype=np.float64)
    style = ROPE_NEOX if rope.style is RopeStyle.NEOX else ROPE_GPTJ
    # the angles of each distinct delta, by NumPy as in the reference (a shift moves many cells by one delta)
    distinct, which = np.unique(_index(deltas), return_inverse=True)
    angle = distinct.astype(np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    cells64, which64 = _index(cells), _index(which.reshape(-1))
    flat = pool.reshape(pool.shape[0], -1)
    nbytes = len(cells) * pool[0].nbytes
    if scales is None:
        _launch(rope_float, nbytes, _bits(flat), dim, cells64, which64, cos, sin, style)
    else:
        _launch(rope_int8, nbytes, flat, dim, _bits(scales), cells64, which64, cos, sin, style)


def move_rows(pools: Sequence[np.ndarray], src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> None:
    """Move runs of rows in every pool: rows ``[src[m], src[m] + length[m])`` go to ``[dst[m], ...)``.

    Every pool is ``[N, ...]`` (any trailing shape and dtype, the same N, C-contiguous); `src`, `dst`,
    `length` are ``[M]``. All runs act at once (each destination receives its source's value from before the
    call); destination runs are pairwise disjoint. Strategy, picked here from the plan:

    * no source row is a destination row: every run is copied directly, all (pool, piece) pairs in parallel;
    * a downward compaction (every ``dst <= src``): runs by ascending dst, copied front to back, pools in
      parallel; no row is read after it is written, so no scratch is needed;
    * otherwise: the runs whose source meets a destination are staged through a scratch buffer first, then
      the staged runs are written back and the others copied directly.

    Identical pools passed twice are moved once.
    """
    live = np.asarray(length) > 0
    if not pools or not live.any():
        return
    n_rows = pools[0].shape[0]
    arrays = list({(p.ctypes.data, p.nbytes): p for p in pools if p.nbytes}.values())
    if not arrays:
        return
    base = np.array([p.ctypes.data for p in arrays], dtype=np.uint64)
    row_bytes = np.array([p.nbytes // n_rows for p in arrays], dtype=np.int64)
    rows = np.full(len(arrays), n_rows, dtype=np.int64)
    src, dst, count = _index(src)[live], _index(dst)[live], _index(length)[live]
    order = np.argsort(dst, kind="stable")
    src, dst, count = src[order], dst[order], count[order]
    staged = _reads_a_destination(src, dst, count)
    piece = max(1, MOVE_PIECE_BYTES // int(row_bytes.max()))
    moved = int(count.sum()) * int(row_bytes.sum())  # bytes written, over all pools
    stream = moved >= STREAM_BYTES

    def copy(frm: np.ndarray, to: np.ndarray, frm_rows: np.ndarray, to_rows: np.ndarray, runs: tuple) -> None:
        """Copy the runs ``(from_row, to_row, count)`` between the arrays at addresses `frm` and `to`."""
        from_row, to_row, n = _pieces(runs[0], runs[1], runs[2], piece)
        _launch(copy_blocks, moved, frm, to, row_bytes, frm_rows, to_rows, from_row, to_row, n, stream)

    if not staged.any():
        copy(base, base, rows, rows, (src, dst, count))
    elif (dst <= src).all():
        _launch(copy_runs_in_order, moved, base, row_bytes, rows, src, dst, count)
    else:
        staged_count = count[staged]
        staged_at = np.cumsum(staged_count) - staged_count
        total = int(staged_count.sum())
        scratch = np.empty(total * int(row_bytes.sum()), dtype=np.uint8)
        offsets = total * (np.cumsum(row_bytes) - row_bytes)
        scratch_base = np.uint64(scratch.ctypes.data) + offsets.astype(np.uint64)
        scratch_rows = np.full(len(arrays), total, dtype=np.int64)
        copy(base, scratch_base, rows, scratch_rows, (src[staged], staged_at, staged_count))
        copy(scratch_base, base, scratch_rows, rows, (staged_at, dst[staged], staged_count))
        direct = ~staged
        if direct.any():
            copy(base, base, rows, rows, (src[direct], dst[direct], count[direct]))


#: The helper thread of `copy_runs` (`kvarray.ops.cpu_copy`): started by the first call it helps.
_COPY_HELPER = CopyHelper()


def copy_runs(
    src: np.ndarray, dst: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray, counts: np.ndarray
) -> None:
    """Copy runs of rows between two arrays, bit for bit: for each run r,
    ``dst[dst_start[r] : dst_start[r] + counts[r]] = src[src_start[r] : src_start[r] + counts[r]]``.

    ``src [N, ...]``, ``dst [R, ...]``: host arrays of one dtype and one row shape, C-contiguous, not
    sharing memory, `dst` writable; ``src_start``, ``dst_start``, ``counts``: ``[K]`` int32/int64, counts
    >= 0, every run inside its array, destination runs pairwise disjoint. CPU only (no CUDA twin): it checks
    its arguments itself and raises `DTypeMismatch`, `ShapeMismatch`, `LayoutError` or `IndexOutOfRange`
    before writing anything.

    The runs are cut into pieces of at most `PIECE_BYTES`, taken one at a time by the calling thread and,
    for calls of `PARALLEL_BYTES` or more (unless the thread limit is 1, `swap_thread_limit`), a helper
    thread (`kvarray.ops.cpu_copy`: the caller waits only for pieces the helper took, never for a helper
    that has not started). Calls writing `STREAM_BYTES` or more use non-temporal stores, as libc's memcpy
    does for one large copy, so many runs of a few megabytes stream as well as one long copy.
    """
    _check_copy_runs(src, dst, src_start, dst_start, counts)
    live = np.asarray(counts) > 0
    row_bytes = src.nbytes // src.shape[0] if src.shape[0] else 0
    if not live.any() or row_bytes == 0:
        return
    piece = max(1, PIECE_BYTES // row_bytes)
    runs = (_index(src_start)[live], _index(dst_start)[live], _index(counts)[live])
    from_row, to_row, rows = _pieces(*runs, piece)
    nbytes = int(rows.sum()) * row_bytes
    counters = np.zeros(2, dtype=np.int64)
    work = (
        counters, np.uint64(dst.ctypes.data), dst.nbytes, np.uint64(src.ctypes.data), src.nbytes,
        to_row * row_bytes, from_row * row_bytes, rows * row_bytes, nbytes >= STREAM_BYTES,
    )
    _COPY_HELPER.run(work, helped=nbytes >= PARALLEL_BYTES and getattr(_local, "threads", 0) != 1)


def _check_copy_runs(
    src: np.ndarray, dst: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray, counts: np.ndarray
) -> None:
    if src.dtype != dst.dtype:
        raise DTypeMismatch(f"copy_runs copies bits: src is {src.dtype}, dst {dst.dtype}")
    if src.ndim < 1 or dst.ndim < 1 or src.shape[1:] != dst.shape[1:]:
        raise ShapeMismatch(f"src and dst must be [rows, ...] of one row shape, got {src.shape}, {dst.shape}")
    check_contiguous("src", src)
    check_contiguous("dst", dst, writable=True)
    if np.may_share_memory(src, dst):
        raise LayoutError("copy_runs: src and dst must not share memory")
    runs = src_start.shape[0] if getattr(src_start, "ndim", 0) == 1 else -1
    for name, arr in (("src_start", src_start), ("dst_start", dst_start), ("counts", counts)):
        check_dtype(name, arr, INDEX_DTYPES)
        check_rank(name, arr, 1, "[runs]")
        if arr.shape[0] != runs:
            raise ShapeMismatch(f"{name} has {arr.shape[0]} entries, src_start {runs}: one per run")
    if runs == 0:
        return
    length = counts.astype(np.int64)
    if (length < 0).any():
        raise IndexOutOfRange("run lengths (counts) must be >= 0")
    for name, start, rows in (("src", src_start, src.shape[0]), ("dst", dst_start, dst.shape[0])):
        if (start < 0).any() or (start.astype(np.int64) + length > rows).any():
            raise IndexOutOfRange(f"every {name} run must lie in [0, {rows})")
    live = length > 0
    order = np.argsort(dst_start[live], kind="stable")
    begins = dst_start[live][order].astype(np.int64)
    if (begins[1:] < (begins + length[live][order])[:-1]).any():
        raise IndexOutOfRange("destination runs overlap: a row cannot receive two copies")


def _reads_a_destination(src: np.ndarray, dst: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``[M]`` bool: run m's source rows meet some run's destination rows (`dst` ascending, runs disjoint)."""
    ends = dst + count
    nxt = np.searchsorted(ends, src, side="right")  # first destination run ending after src[m] begins
    hit = nxt < len(dst)
    hit[hit] = dst[nxt[hit]] < (src + count)[hit]
    return hit


def _pieces(src: np.ndarray, dst: np.ndarray, count: np.ndarray, piece: int) -> tuple[np.ndarray, ...]:
    """Runs ``[M]`` cut into blocks of at most `piece` rows: ``(src_row, dst_row, count)``, each ``[K]``."""
    n_pieces = (count + piece - 1) // piece
    run = np.repeat(np.arange(len(count)), n_pieces)
    first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    offset = (np.arange(int(n_pieces.sum()), dtype=np.int64) - first) * piece
    return src[run] + offset, dst[run] + offset, np.minimum(count[run] - offset, piece)

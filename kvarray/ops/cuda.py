"""The Numba CUDA kernels: one host function per kernel of `kvarray.ops.reference`, same names and signatures.

Inputs are assumed valid (the public wrappers in `kvarray.ops` check dtypes, shapes and contiguity; index
values on a device are not read back, so every kernel skips an out-of-range cell or row instead of writing
outside its array). Arguments may be CuPy arrays, Numba device arrays, or anything else that exposes
``__cuda_array_interface__``. Kernels launch on CuPy's current stream when an argument is a CuPy array,
else on Numba's default stream. Nothing here touches a device at import time, so the module imports on a
machine without a GPU and under ``NUMBA_ENABLE_CUDASIM=1``.

Layout of this module: the kernels (plain Python functions, compiled lazily with ``cuda.jit``, one thread
per output element or per int8 group, ``cuda.grid(1)`` then a bounds check), then `kernel_specs` (every
kernel with the signatures the host code launches, for the PTX tests), then the host functions (views,
launch configuration, scratch buffers). Shapes: N pool rows, H kv heads, D head_dim, C = H * D values per
row, W words per row (uint32 when the row's bytes allow, else bytes), g values per int8 group, G = C // g.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda

from ..errors import ShapeMismatch
from ..spec import RopeSpec, RopeStyle
from ..xp import require_cupy, to_numpy

THREADS_PER_BLOCK = 256
#: `cuda.grid(1)` is a 32-bit index: one launch covers fewer threads than this.
MAX_THREADS_PER_LAUNCH = 2**31 - 1
INT8_LIMIT = 127.0
# Python floats: a global np.float16 constant lowers to IR that NVVM rejects, so kernels convert inline.
FLOAT16_TINY = 2.0**-24  # smallest positive float16: the scale of a nonzero group that rounds to 0
FLOAT16_MAX = 65504.0  # largest finite float16: the scale of a group whose scale overflows


# ---------------------------------------------------------------------------------------------------------
# Kernels. Each one computes its coordinates from cuda.grid(1), returns when they fall outside the work,
# and skips cells/rows outside the arrays. Conversions: float32 -> float16 stores round to nearest even
# (cvt.rn.f16.f32), as NumPy's astype does.
# ---------------------------------------------------------------------------------------------------------


def _copy_rows(dst, dst_rows, src, src_rows):
    """``dst[dst_rows[r], w] = src[src_rows[r], w]`` (cast to dst's dtype), one thread per word; an index
    array that is None stands for r itself. ``dst [N, W]``, ``src [M, W]``, ``dst_rows``/``src_rows`` ``[R]``
    or None; R is ``src_rows``'s length, or M when `src_rows` is None. Serves scatter (destination rows
    mapped), move_rows's staging (source rows, then destination rows) and its direct copy (both)."""
    i = cuda.grid(1)
    width = dst.shape[1]
    r = i // width
    if r >= (src.shape[0] if src_rows is None else src_rows.shape[0]):
        return
    w = i - r * width
    frm = r if src_rows is None else src_rows[r]
    to = r if dst_rows is None else dst_rows[r]
    if to >= 0 and to < dst.shape[0] and frm >= 0 and frm < src.shape[0]:
        dst[to, w] = src[frm, w]


def _make_quantize(group: int) -> Callable[..., None]:
    """The int8 quantizer for groups of `group` values (a compile-time constant, so the loops unroll)."""

    def _quantize_groups(x, rows, q, scales):
        """Quantize group k of ``x[r]`` into ``q[row, k * g:(k + 1) * g]`` and ``scales[row, k]``, one thread
        per group; row is ``rows[r]``, or r when rows is None. ``x [R, C]`` float16/float32,
        ``rows [R]`` or None, ``q [N, C]`` int8, ``scales [N, C // g]`` float16."""
        i = cuda.grid(1)
        n_groups = scales.shape[1]
        r = i // n_groups
        if r >= x.shape[0]:
            return
        k = i - r * n_groups
        if rows is None:
            row = r
        else:
            row = rows[r]
        if row < 0 or row >= q.shape[0]:
            return
        base = k * group
        absmax = np.float32(0.0)
        for j in range(group):
            absmax = max(absmax, abs(np.float32(x[r, base + j])))
        scale16 = np.float16(absmax / np.float32(INT8_LIMIT))
        scale = np.float32(scale16)
        if scale == 0 and absmax > 0:
            scale16 = np.float16(FLOAT16_TINY)
        elif scale > np.float32(FLOAT16_MAX):  # the float16 rounding overflowed to inf
            scale16 = np.float16(FLOAT16_MAX)
        scale = np.float32(scale16)
        scales[row, k] = scale16
        for j in range(group):
            v = np.float32(0.0)
            if scale > 0:
                v = np.float32(x[r, base + j]) / scale
                v = min(max(v, np.float32(-INT8_LIMIT)), np.float32(INT8_LIMIT))
            q[row, base + j] = np.int8(round(v))  # round(): half to even, as np.rint

    return _quantize_groups


@functools.cache
def _quantize_py(group: int) -> Callable[..., None]:
    return _make_quantize(group)


@functools.cache
def _quantize_kernel(group: int) -> Any:
    return cuda.jit(_quantize_py(group))


def _dequantize(q, scales, out, group):
    """``out[r, c] = float32(q[r, c]) * float32(scales[r, c // g])``; ``q, out [R, C]``, ``scales [R, G]``."""
    i = cuda.grid(1)
    width = q.shape[1]
    r = i // width
    if r >= q.shape[0]:
        return
    c = i - r * width
    out[r, c] = np.float32(q[r, c]) * np.float32(scales[r, c // group])


def _gather(pool, indptr, indices, out):
    """``out[s, h, j, w] = pool[indices[indptr[s] + j], h, w]`` for j below sequence s's length, else 0;
    ``pool [N, H, W]``, ``indptr [S + 1]``, ``indices [nnz]``, ``out [S, H, L, W]`` (same dtype as pool)."""
    i = cuda.grid(1)
    n_seq, heads, length, width = out.shape
    w = i % width
    rest = i // width
    j = rest % length
    rest = rest // length
    h = rest % heads
    s = rest // heads
    if s >= n_seq:
        return
    begin = indptr[s]
    cell = indices[begin + j] if j < indptr[s + 1] - begin else pool.shape[0]
    if cell >= 0 and cell < pool.shape[0]:
        out[s, h, j, w] = pool[cell, h, w]
    else:
        out[s, h, j, w] = 0


def _gather_int8(pool, scales, indptr, indices, out, group):
    """`_gather` of an int8 pool, dequantized: ``pool [N, H, D]`` int8, ``scales [N, H * D // g]`` float16,
    ``out [S, H, L, D]`` float16/float32."""
    i = cuda.grid(1)
    n_seq, heads, length, dim = out.shape
    d = i % dim
    rest = i // dim
    j = rest % length
    rest = rest // length
    h = rest % heads
    s = rest // heads
    if s >= n_seq:
        return
    begin = indptr[s]
    value = np.float32(0.0)
    if j < indptr[s + 1] - begin:
        cell = indices[begin + j]
        if cell >= 0 and cell < pool.shape[0]:
            value = np.float32(pool[cell, h, d]) * np.float32(scales[cell, (h * dim + d) // group])
    out[s, h, j, d] = value


def _rope_float(pool, cells, deltas, inv_freq, neox):
    """Rotate pair k of head h of ``pool[cells[t]]`` by ``deltas[t] * inv_freq[k]`` radians, in place, in
    float64; ``pool [N, H, D]`` float16/float32, ``cells, deltas [T]``, ``inv_freq [rotary_dims // 2]``."""
    i = cuda.grid(1)
    half = inv_freq.shape[0]
    heads = pool.shape[1]
    k = i % half
    rest = i // half
    h = rest % heads
    t = rest // heads
    if t >= cells.shape[0]:
        return
    cell = cells[t]
    if cell < 0 or cell >= pool.shape[0]:
        return
    ia = k if neox else 2 * k
    ib = k + half if neox else 2 * k + 1
    angle = np.float64(deltas[t]) * inv_freq[k]
    cos, sin = math.cos(angle), math.sin(angle)  # float64: libdevice __nv_cos/__nv_sin
    a, b = np.float64(pool[cell, h, ia]), np.float64(pool[cell, h, ib])
    pool[cell, h, ia] = a * cos - b * sin
    pool[cell, h, ib] = a * sin + b * cos


def _rope_int8(pool, scales, cells, deltas, inv_freq, neox, out, group):
    """Dequantize ``pool[cells[t]]`` and rotate it as `_rope_float` into ``out[t]`` (float32, re-quantized by
    the caller). One thread per rotating pair or passing-through value: k < half is pair k, k >= half is
    value ``k + half``. ``pool [N, H, D]`` int8, ``scales [N, H * D // g]``, ``out [T, H, D]`` float32."""
    i = cuda.grid(1)
    half = inv_freq.shape[0]
    heads, dim = pool.shape[1], pool.shape[2]
    items = dim - half
    k = i % items
    rest = i // items
    h = rest % heads
    t = rest // heads
    if t >= cells.shape[0]:
        return
    cell = cells[t]
    if cell < 0 or cell >= pool.shape[0]:
        return
    base = h * dim
    if k >= half:  # a value past rotary_dims: dequantized, not rotated
        d = k + half
        out[t, h, d] = np.float32(pool[cell, h, d]) * np.float32(scales[cell, (base + d) // group])
        return
    ia = k if neox else 2 * k
    ib = k + half if neox else 2 * k + 1
    a = np.float64(np.float32(pool[cell, h, ia]) * np.float32(scales[cell, (base + ia) // group]))
    b = np.float64(np.float32(pool[cell, h, ib]) * np.float32(scales[cell, (base + ib) // group]))
    angle = np.float64(deltas[t]) * inv_freq[k]
    cos, sin = math.cos(angle), math.sin(angle)  # float64: libdevice __nv_cos/__nv_sin
    out[t, h, ia] = np.float32(a * cos - b * sin)
    out[t, h, ib] = np.float32(a * sin + b * cos)


_copy_rows_kernel = cuda.jit(_copy_rows)
_dequantize_kernel = cuda.jit(_dequantize)
_gather_kernel = cuda.jit(_gather)
_gather_int8_kernel = cuda.jit(_gather_int8)
_rope_float_kernel = cuda.jit(_rope_float)
_rope_int8_kernel = cuda.jit(_rope_int8)


# ---------------------------------------------------------------------------------------------------------
# The kernels and the signatures the host functions launch them with (what tests/ops/test_ptx.py compiles).
# ---------------------------------------------------------------------------------------------------------

#: Group sizes whose quantizer the PTX tests compile (the default 32 and two neighbours).
PTX_GROUP_SIZES = (16, 32, 128)


@dataclass(frozen=True)
class KernelSpec:
    """A kernel's Python function and the argument types its host function launches it with."""

    name: str
    py_func: Callable[..., None]
    signatures: tuple[tuple[Any, ...], ...]


def kernel_specs() -> tuple[KernelSpec, ...]:
    """Every kernel with each specialisation the host code uses: float16/float32 pools and rows, uint32 /
    uint16 / uint8 row words, int8 with float16/float32 rows, int32/int64 indices."""
    from numba.cuda import types as numba_types

    t: Any = numba_types  # populated at import time: invisible to type checkers

    f16, f32, f64, i8, i32, i64 = t.float16, t.float32, t.float64, t.int8, t.int32, t.int64
    words = (t.uint32, t.uint16, t.uint8)
    floats = (f16, f32)
    indexes = (i32, i64)

    def arr(dtype: Any, ndim: int) -> Any:
        return t.Array(dtype, ndim, "C")

    # (dst, dst_rows, src, src_rows): scatter (cells on the destination side, words or a float cast), then
    # move_rows's staging (source rows into scratch, scratch onto destination rows) and direct copy.
    copy = [(arr(w, 2), arr(ix, 1), arr(w, 2), t.none) for w in words for ix in indexes]
    copy += [
        (arr(a, 2), arr(ix, 1), arr(b, 2), t.none) for a, b in ((f16, f32), (f32, f16)) for ix in indexes
    ]
    copy += [(arr(w, 2), t.none, arr(w, 2), arr(i64, 1)) for w in words]
    copy += [(arr(w, 2), arr(i64, 1), arr(w, 2), arr(i64, 1)) for w in words]
    specs = [KernelSpec("copy_rows", _copy_rows, tuple(copy))]
    for group in PTX_GROUP_SIZES:
        sigs = tuple(
            (arr(x, 2), rows, arr(i8, 2), arr(f16, 2))
            for x in (f16, f32)
            for rows in (t.none, arr(i32, 1), arr(i64, 1))
        )
        specs.append(KernelSpec(f"quantize_g{group}", _quantize_py(group), sigs))
    specs += [
        KernelSpec(
            "dequantize", _dequantize, tuple((arr(i8, 2), arr(f16, 2), arr(o, 2), i64) for o in floats)
        ),
        KernelSpec(
            "gather",
            _gather,
            tuple((arr(w, 3), arr(ix, 1), arr(ix, 1), arr(w, 4)) for w in words for ix in indexes),
        ),
        KernelSpec(
            "gather_int8",
            _gather_int8,
            tuple(
                (arr(i8, 3), arr(f16, 2), arr(ix, 1), arr(ix, 1), arr(o, 4), i64)
                for o in floats
                for ix in indexes
            ),
        ),
        KernelSpec(
            "rope_float",
            _rope_float,
            tuple(
                (arr(p, 3), arr(ix, 1), arr(ix, 1), arr(f64, 1), t.boolean) for p in floats for ix in indexes
            ),
        ),
        KernelSpec(
            "rope_int8",
            _rope_int8,
            tuple(
                (arr(i8, 3), arr(f16, 2), arr(ix, 1), arr(ix, 1), arr(f64, 1), t.boolean, arr(f32, 3), i64)
                for ix in indexes
            ),
        ),
    ]
    return tuple(specs)


# ---------------------------------------------------------------------------------------------------------
# Host functions: views, launch configuration, scratch buffers. One thread per output value (or word, or
# int8 group), THREADS_PER_BLOCK threads a block, enough blocks to cover them.
# ---------------------------------------------------------------------------------------------------------


def _stream(*arrays: Any) -> Any:
    """CuPy's current stream when an argument is a CuPy array (kernels then order with CuPy's work), else 0
    (Numba's default stream)."""
    for a in arrays:
        if a is not None and type(a).__module__.startswith("cupy"):
            ptr = require_cupy().cuda.get_current_stream().ptr
            return cuda.external_stream(ptr) if ptr else 0
    return 0


def _launch(kernel: Any, threads: int, stream: Any, *args: Any) -> None:
    """Launch `kernel` over `threads` threads (nothing when 0)."""
    if threads <= 0:
        return
    if threads > MAX_THREADS_PER_LAUNCH:
        raise ShapeMismatch(
            f"one CUDA launch covers at most {MAX_THREADS_PER_LAUNCH} threads, this call needs "
            f"{threads}; split it"
        )
    blocks = (threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    kernel[blocks, THREADS_PER_BLOCK, stream](*args)


def _per_row(arr: Any) -> int:
    """Values in one row of ``arr [R, ...]``."""
    return int(np.prod(arr.shape[1:], dtype=np.int64))


def _as_rows(arr: Any) -> Any:
    """``arr [R, ...]`` (C-contiguous) as ``[R, values per row]``, no copy."""
    return arr.reshape(arr.shape[0], _per_row(arr))


def _pointer(arr: Any) -> int:
    """The device address of `arr`'s first element (0 for simulator arrays, which have none)."""
    interface = getattr(arr, "__cuda_array_interface__", None)
    return int(interface["data"][0]) if interface else 0


def _word_dtype(last_axis_bytes: int, *arrays: Any) -> np.dtype:
    """The widest of uint32 / uint16 / uint8 that tiles `last_axis_bytes` and aligns with every array."""
    for word in (np.uint32, np.uint16):
        size = np.dtype(word).itemsize
        if last_axis_bytes % size == 0 and all(_pointer(a) % size == 0 for a in arrays):
            return np.dtype(word)
    return np.dtype(np.uint8)


def _row_words(arr: Any) -> Any:
    """``arr [R, ...]`` of any dtype as raw row words ``[R, W]`` (uint32 where the row's bytes allow)."""
    rows = _as_rows(arr)
    return rows.view(_word_dtype(rows.shape[1] * np.dtype(arr.dtype).itemsize, arr))


def _expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows ``[starts[m], starts[m] + lengths[m])`` of every run, concatenated: int64 ``[sum(lengths)]``."""
    first = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - first, lengths)


def scatter_rows(pool: Any, rows: Any, cells: Any, scales: Any | None = None) -> None:
    """Write ``rows [T, H, D]`` into ``pool[cells[t]]`` (``pool [N, H, D]``); quantize when the pool is int8.

    `cells` ``[T]`` int32/int64 in ``[0, N)`` (others are skipped); with an int8 pool,
    ``scales [N, H * D // g]`` float16 receives each written cell's scales. Float rows of the pool's dtype
    are copied as words; float16 <-> float32 rows are converted (round to nearest even).
    """
    count = cells.shape[0]
    if count == 0:
        return
    stream = _stream(pool, rows, cells, scales)
    if scales is not None:
        group = _per_row(pool) // scales.shape[1]
        kernel = _quantize_kernel(group)
        _launch(kernel, count * scales.shape[1], stream, _as_rows(rows), cells, _as_rows(pool), scales)
        return
    dst, src = _as_rows(pool), _as_rows(rows)
    if np.dtype(pool.dtype) == np.dtype(rows.dtype):
        word = _word_dtype(dst.shape[1] * np.dtype(pool.dtype).itemsize, pool, rows)
        dst, src = dst.view(word), src.view(word)
    _launch(_copy_rows_kernel, count * dst.shape[1], stream, dst, cells, src, None)


def gather_rows(pool: Any, indptr: Any, indices: Any, out: Any, scales: Any | None = None) -> None:
    """Copy each sequence's cells into a padded staging buffer, dequantizing an int8 pool.

    ``pool [N, H, D]``; page table ``indptr [S + 1]``, ``indices [indptr[S]]`` int32/int64;
    ``out [S, H, L, D]``: ``out[s, :, j] = pool[indices[indptr[s] + j]]`` for j below the sequence's length,
    0 after (and 0 for a cell outside ``[0, N)``). One thread per value of `out` (per word for a float pool).
    """
    if out.size == 0:
        return
    stream = _stream(pool, indptr, indices, out, scales)
    if scales is not None:
        group = _per_row(pool) // scales.shape[1]
        _launch(_gather_int8_kernel, out.size, stream, pool, scales, indptr, indices, out, group)
        return
    word = _word_dtype(pool.shape[2] * np.dtype(pool.dtype).itemsize, pool, out)
    words = out.view(word)
    _launch(_gather_kernel, words.size, stream, pool.view(word), indptr, indices, words)


def move_rows(pools: Sequence[Any], src: Any, dst: Any, length: Any) -> None:
    """Move runs of rows in every pool: rows ``[src[m], src[m] + length[m])`` go to ``[dst[m], ...)``.

    Every pool is ``[N, ...]`` (any trailing shape and dtype, the same N), moved as raw row words. All moves
    act at once (each destination row receives its source's value from before the call); destination runs
    must be pairwise disjoint. `src`, `dst`, `length` ``[M]`` are read back to the host (a sync) and
    expanded to one entry per row; when some source row is also a destination row the rows are staged
    through a scratch buffer (two launches per pool), else copied directly (one launch per pool).
    """
    if not pools or src.shape[0] == 0:
        return
    starts, ends, lengths = (to_numpy(a).astype(np.int64) for a in (src, dst, length))
    live = lengths > 0
    from_rows = _expand_runs(starts[live], lengths[live])
    to_rows = _expand_runs(ends[live], lengths[live])
    moved = from_rows != to_rows  # a row moved onto itself keeps its value
    from_rows, to_rows = from_rows[moved], to_rows[moved]
    count = from_rows.shape[0]
    if count == 0:
        return
    staged = bool(np.isin(from_rows, to_rows).any())
    stream = _stream(*pools, src)
    from_dev = cuda.to_device(from_rows, stream=stream)
    to_dev = cuda.to_device(to_rows, stream=stream)
    for pool in pools:
        words = _row_words(pool)
        threads = count * words.shape[1]
        if staged:
            scratch = cuda.device_array((count, words.shape[1]), words.dtype, stream=stream)
            _launch(_copy_rows_kernel, threads, stream, scratch, None, words, from_dev)
            _launch(_copy_rows_kernel, threads, stream, words, to_dev, scratch, None)
        else:
            _launch(_copy_rows_kernel, threads, stream, words, to_dev, words, from_dev)


def quantize_int8(x: Any, q: Any, scales: Any) -> None:
    """Quantize ``x [R, ...]`` float16/float32 into int8 ``q`` (x's shape) and float16 ``scales [R, C // g]``.

    C is the number of values in one row; each row is cut into ``scales.shape[1]`` groups of g consecutive
    values, one thread per group (the rule is reference.py's, bit for bit).
    """
    rows, groups = x.shape[0], scales.shape[1]
    if rows * groups == 0:
        return
    kernel = _quantize_kernel(_per_row(x) // groups)
    _launch(kernel, rows * groups, _stream(x, q, scales), _as_rows(x), None, _as_rows(q), scales)


def dequantize_int8(q: Any, scales: Any, out: Any) -> None:
    """Dequantize ``q [R, ...]`` int8 with ``scales [R, C // g]`` float16 into ``out`` (q's shape, float):
    ``float32(q) * float32(scale)``, cast to out's dtype. One thread per value."""
    if q.size == 0:
        return
    group = _per_row(q) // scales.shape[1]
    _launch(_dequantize_kernel, q.size, _stream(q, scales, out), _as_rows(q), scales, _as_rows(out), group)


def rope_shift(pool: Any, cells: Any, deltas: Any, rope: RopeSpec, scales: Any | None = None) -> None:
    """Rotate the keys in ``pool[cells[t]]`` by ``deltas[t]`` positions of rotary embedding, in place.

    ``pool [N, H, D]`` float16/float32 (or int8 with ``scales [N, H * D // g]``: dequantized and rotated
    into a float32 scratch ``[T, H, D]``, then re-quantized into the cells); `cells` ``[T]`` distinct;
    `deltas` ``[T]``. Angles and the rotation are float64 (libdevice sin/cos); one thread per rotating pair.
    """
    count = cells.shape[0]
    if count == 0:
        return
    _, heads, dim = pool.shape
    stream = _stream(pool, cells, deltas, scales)
    inv_freq = cuda.to_device(np.ascontiguousarray(rope.inv_freq(dim)), stream=stream)
    half = inv_freq.shape[0]
    neox = rope.style is RopeStyle.NEOX
    if scales is None:
        _launch(_rope_float_kernel, count * heads * half, stream, pool, cells, deltas, inv_freq, neox)
        return
    group = _per_row(pool) // scales.shape[1]
    rotated = cuda.device_array((count, heads, dim), np.float32, stream=stream)
    args = (pool, scales, cells, deltas, inv_freq, neox, rotated, group)
    _launch(_rope_int8_kernel, count * heads * (dim - half), stream, *args)
    kernel = _quantize_kernel(group)
    _launch(kernel, count * scales.shape[1], stream, _as_rows(rotated), cells, _as_rows(pool), scales)

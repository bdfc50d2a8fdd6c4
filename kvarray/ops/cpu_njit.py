"""The ``@numba.njit`` copy and RoPE kernels behind `kvarray.ops.cpu`, and the bit-level helpers that they
and the int8 kernels of `kvarray.ops.cpu_int8` inline. Numba's on-disk cache notices edits only to the file
of a cached function: after editing a helper here, touch `cpu_int8.py` too (or clear ``__pycache__``).

Kernels decide nothing: `kvarray.ops.cpu` views the arrays as they want them (2-D rows; float16 as its
uint16 bit pattern, since Numba's CPU target has no float16; raw row bytes and addresses for copies), picks
the strategy and calls one kernel. Kernels skip cells and runs that fall outside their arrays. Shapes:
N pool rows (cells), H kv heads, D head_dim, T rows, S sequences, L padded length, C = H * D values per
row, G = C // g int8 groups per row.

float16 <-> float32 conversions follow NumPy's exact rules: round to nearest even, subnormals kept, NaN
payloads kept as NumPy keeps them. Large copies use non-temporal stores (see `_copy_bytes`).
"""

from __future__ import annotations

import types as types_module
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..finite import nonfinite_words

# error_model="numpy": no ZeroDivisionError branch per division, which would keep loops from vectorizing
_serial = numba.njit(nogil=True, cache=True, error_model="numpy")


def _parallel(fn: Any) -> Any:
    """Compile the kernel `fn` twice: with ``parallel=True`` (the returned dispatcher, for large calls) and
    serially (its ``.serial`` attribute, for small calls: waking a second thread costs a few microseconds
    when the machine is idle and milliseconds when it is busy, more than a small copy takes).

    The serial twin compiles a clone of `fn` under its own qualified name, so the two never share an entry of
    Numba's on-disk cache."""
    twin = types_module.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    dispatcher = numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")(fn)
    dispatcher.serial = _serial(twin)  # type: ignore[attr-defined]
    return dispatcher

#: Positions of one gather work item (a block of one sequence), so a single long sequence still splits.
GATHER_BLOCK = 64
#: Rows of one scatter, quantize or dequantize work item.
COPY_BLOCK = 64
#: Writes of at least this many bytes use non-temporal stores (they would not stay in cache anyway).
STREAM_BYTES = 4 << 20
#: Bytes a move work item copies at most, so one long run still splits across threads.
MOVE_PIECE_BYTES = 1 << 16
#: `rope_shift` pairing codes passed to the kernels.
ROPE_NEOX, ROPE_GPTJ = 0, 1

#: Cell index the gather kernels use for "no cell here" (padding).
NO_CELL = -1
#: float16 bit patterns: +inf, the largest finite value (65504) and the smallest subnormal (2**-24).
HALF_INF = 0x7C00
HALF_MAX = 0x7BFF  # 65504
HALF_TINY = 0x0001  # 2**-24

# ---------------------------------------------------------------------------------------------------------
# bit-level helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------------------


@intrinsic
def _f32_bits(typingctx, x):
    """The uint32 bit pattern of a float32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """The float32 with the bit pattern of the low 32 bits of an unsigned integer."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = (
            builder.trunc(args[0], ir.IntType(32))
            if u.bitwidth > 32
            else builder.zext(args[0], ir.IntType(32))
            if u.bitwidth < 32
            else args[0]
        )
        return builder.bitcast(low, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def _max_abs_bits(typingctx, m, v):
    """``umax(m, |v| bits)``: v float16 bits (m uint16) or float32 (m uint32), in v's own width, so the
    reduction loop vectorizes at 16/32 lanes (Numba's integer operators would widen to 64 bits)."""
    if v == types.uint16 and m == types.uint16:
        width, mask = 16, 0x7FFF
    elif v == types.float32 and m == types.uint32:
        width, mask = 32, 0x7FFFFFFF
    else:
        return None

    def codegen(context, builder, sig, args):
        kind = ir.IntType(width)
        bits = builder.bitcast(args[1], kind) if width == 32 else args[1]
        umax = builder.module.declare_intrinsic(
            f"llvm.umax.i{width}", fnty=ir.FunctionType(kind, [kind, kind])
        )
        return builder.call(umax, [args[0], builder.and_(bits, ir.Constant(kind, mask))])

    return m(m, v), codegen


@intrinsic
def _half_to_f32_hw(typingctx, h):
    """float16 bits (the low 16 bits of an unsigned integer) -> float32 value, exact (LLVM ``fpext``: one
    F16C instruction on x86-64)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        bits = args[0] if h.bitwidth == 16 else builder.trunc(args[0], ir.IntType(16))
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _f32_to_half_hw(typingctx, f):
    """float32 value -> float16 bits, round to nearest even (LLVM ``fptrunc``); NaN payloads are quieted."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _move_bytes(typingctx, dst, src, nbytes):
    """``memmove(dst, src, nbytes)`` between integer addresses (LLVM's memmove: libc's tuned copy)."""
    if not all(isinstance(a, types.Integer) for a in (dst, src, nbytes)):
        return None

    def codegen(context, builder, sig, args):
        to = builder.inttoptr(args[0], cgutils.voidptr_t)
        frm = builder.inttoptr(args[1], cgutils.voidptr_t)
        size = context.cast(builder, args[2], sig.args[2], types.intp)
        cgutils.raw_memmove(builder, to, frm, size, 1)
        return context.get_dummy_value()

    return types.none(dst, src, nbytes), codegen


@intrinsic
def _stream_16(typingctx, dst, src):
    """Copy 16 bytes from address `src` to the 16-byte aligned address `dst` with a non-temporal store
    (written around the caches, as libc's memcpy does for large copies: no read of the destination)."""
    if not (isinstance(dst, types.Integer) and isinstance(src, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vector = ir.VectorType(ir.IntType(64), 2)
        value = builder.load(builder.inttoptr(args[1], vector.as_pointer()), align=1)
        store = builder.store(value, builder.inttoptr(args[0], vector.as_pointer()), align=16)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.none(dst, src), codegen


@intrinsic
def _store_fence(typingctx):
    """A full memory fence: makes this thread's non-temporal stores visible before the kernel returns."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@_serial
def _copy_bytes(dst, src, nbytes, stream):
    """Copy `nbytes` from address `src` to address `dst` (not overlapping): memmove, or with `stream`
    non-temporal 16-byte stores between memmoved unaligned head and tail bytes."""
    if not stream or nbytes < 64:
        _move_bytes(dst, src, nbytes)
        return
    head = (np.uint64(16) - dst % np.uint64(16)) % np.uint64(16)
    if head:
        _move_bytes(dst, src, head)
    body = (np.uint64(nbytes) - head) // np.uint64(16)
    for i in range(body):
        at = head + i * np.uint64(16)
        _stream_16(dst + at, src + at)
    done = head + body * np.uint64(16)
    if done < nbytes:
        _move_bytes(dst + done, src + done, np.uint64(nbytes) - done)


@_serial
def _half_to_f32(h):
    """float16 bits -> float32 value exactly as NumPy's ``astype(float32)`` (a NaN keeps its payload)."""
    f = _half_to_f32_hw(h)
    if f == f:
        return f
    h32 = np.uint32(h) & np.uint32(0xFFFF)
    sign = (h32 & np.uint32(0x8000)) << np.uint32(16)
    return _bits_f32(sign | np.uint32(0x7F800000) | ((h32 & np.uint32(0x3FF)) << np.uint32(13)))


@_serial
def _f32_to_half(f):
    """float32 value -> float16 bits exactly as NumPy's ``astype(float16)`` (round to nearest even; a NaN
    keeps its top 10 payload bits, or payload 1 when those are all zero)."""
    if f == f:
        return _f32_to_half_hw(f)
    u = _f32_bits(f)
    payload = (u & np.uint32(0x7FFFFF)) >> np.uint32(13)
    out = (
        ((u >> np.uint32(16)) & np.uint32(0x8000))
        | np.uint32(HALF_INF)
        | (payload if payload else np.uint32(1))
    )
    return np.uint16(out)


@_serial
def _f64_to_half(d):
    """float64 value -> float16 bits with one rounding (float32 rounded to odd first, then to even). Written
    with selects, not branches, so loops over it vectorize."""
    f = np.float32(d)
    u = _f32_bits(f)
    odd = _bits_f32((u - np.uint32(1) if abs(np.float64(f)) > abs(d) else u) | np.uint32(1))
    return _f32_to_half(odd if (np.float64(f) != d) & (f == f) else f)


def _to_f32(v):
    """Kernel helper: a stored value (float16 bits, float32 or int8) as float32."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(_to_f32)
def _to_f32_impl(v):
    if v == types.uint16:
        return lambda v: _half_to_f32(v)
    return lambda v: np.float32(v)


def _from_f32(v, like):
    """Kernel helper: a float32 value stored into an array like `like` (float16 bits or float32)."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(_from_f32)
def _from_f32_impl(v, like):
    if like.dtype == types.uint16:
        return lambda v, like: _f32_to_half(v)
    return lambda v, like: v


def _from_f64(v, like):
    """Kernel helper: a float64 value stored into an array like `like` (float16 bits or float32)."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(_from_f64)
def _from_f64_impl(v, like):
    if like.dtype == types.uint16:
        return lambda v, like: _f64_to_half(v)
    return lambda v, like: np.float32(v)


# ---------------------------------------------------------------------------------------------------------
# scatter and gather
# ---------------------------------------------------------------------------------------------------------


@_parallel
def scatter_copy(pool, rows, cells, stream):
    """``pool[cells[t]] = rows[t]`` bit for bit; ``pool [N, B]``, ``rows [T, B]`` uint8 (B bytes a row);
    `stream`: non-temporal stores (large writes). Work items are blocks of `COPY_BLOCK` rows."""
    size = rows.shape[1]
    n_rows = rows.shape[0]
    for block in prange((n_rows + COPY_BLOCK - 1) // COPY_BLOCK):
        for t in range(block * COPY_BLOCK, min(n_rows, (block + 1) * COPY_BLOCK)):
            c = cells[t]
            if 0 <= c < pool.shape[0]:
                dst = pool.ctypes.data + np.uint64(c * size)
                _copy_bytes(dst, rows.ctypes.data + np.uint64(t * size), size, stream)
        if stream:
            _store_fence()


@_parallel
def scatter_copy_pair(key_pool, value_pool, keys, values, cells, stream, lanes):
    """`scatter_copy` of keys and values into their two pools in one call (a decode step's put: one kernel
    launch instead of two), after a scan for NaN and infinity: ``key_pool``, ``value_pool`` ``[N, H, B]``,
    ``keys``, ``values`` ``[T, H, B]`` uint8 (B bytes a head). `lanes`: the float lanes to scan
    (`kvarray.finite.FLOAT16_LANES` or `FLOAT32_LANES`; the rows' sizes then a multiple of 8 bytes) or
    `kvarray.finite.NO_LANES`. Returns `kvarray.finite.nonfinite_words`' answer: 0 after writing, 1 (keys)
    or 2 (values) when a scanned row holds NaN or infinity, and then nothing is written."""
    found = 0
    if lanes[2]:
        found = nonfinite_words(keys.reshape(-1).view(np.uint64), values.reshape(-1).view(np.uint64), lanes)
    if found:
        return found
    size = keys.shape[1] * keys.shape[2]
    n_rows = keys.shape[0]
    for block in prange((n_rows + COPY_BLOCK - 1) // COPY_BLOCK):
        for t in range(block * COPY_BLOCK, min(n_rows, (block + 1) * COPY_BLOCK)):
            c = cells[t]
            if 0 <= c < key_pool.shape[0]:
                at = np.uint64(c * size)
                row = np.uint64(t * size)
                _copy_bytes(key_pool.ctypes.data + at, keys.ctypes.data + row, size, stream)
                _copy_bytes(value_pool.ctypes.data + at, values.ctypes.data + row, size, stream)
        if stream:
            _store_fence()
    return 0


@_serial
def scatter_copy_layers(key_addrs, value_addrs, pool_rows, keys, values, cells, lanes):
    """`scatter_copy_pair` of every layer of a pass in one call (a decode step's rows of all layers, as a
    graph that runs every layer at once returns them), after one scan of all of them for NaN and
    infinity: ``key_addrs``, ``value_addrs`` ``[L]`` int64 the addresses of each layer's pools (``[N, H,
    B]`` C-contiguous, ``pool_rows`` = N, kept alive by the caller); ``keys``, ``values`` ``[L, T, H, B]``
    uint8. Serial: for the small writes of decode steps. Returns `scatter_copy_pair`'s answer (0: written;
    1 keys / 2 values hold NaN or infinity, and nothing is written)."""
    found = 0
    if lanes[2]:
        found = nonfinite_words(keys.reshape(-1).view(np.uint64), values.reshape(-1).view(np.uint64), lanes)
    if found:
        return found
    layers, n_rows = keys.shape[0], keys.shape[1]
    size = keys.shape[2] * keys.shape[3]
    for layer in range(layers):
        key_pool = np.uint64(key_addrs[layer])
        value_pool = np.uint64(value_addrs[layer])
        for t in range(n_rows):
            c = cells[t]
            if 0 <= c < pool_rows:
                at = np.uint64(c * size)
                row = np.uint64((layer * n_rows + t) * size)
                _copy_bytes(key_pool + at, keys.ctypes.data + row, size, False)
                _copy_bytes(value_pool + at, values.ctypes.data + row, size, False)
    return 0


@_parallel
def scatter_convert(pool, rows, cells):
    """``pool[cells[t]] = rows[t]`` converted between float16 bits and float32; ``[N, C]``, ``[T, C]``."""
    for t in prange(rows.shape[0]):
        c = cells[t]
        if 0 <= c < pool.shape[0]:
            for j in range(rows.shape[1]):
                pool[c, j] = _from_f32(_to_f32(rows[t, j]), pool)


@_parallel
def gather_copy(pool, indptr, indices, out, stream):
    """``out[s, h, j] = pool[indices[indptr[s] + j], h]``, zero past each length; ``pool [N, H, B]``,
    ``out [S, H, L, B]`` uint8 (B bytes a head); `stream`: non-temporal stores. Work items are blocks of
    `GATHER_BLOCK` positions of one sequence; each cell row is read whole (H pieces in a row, which the
    hardware prefetcher follows), its heads go to H output runs written in order."""
    n_seq, heads, length, size = out.shape
    blocks = (length + GATHER_BLOCK - 1) // GATHER_BLOCK
    for item in prange(n_seq * blocks):
        s = item // blocks
        begin = (item % blocks) * GATHER_BLOCK
        first = indptr[s]
        used = min(indptr[s + 1] - first, length)
        for j in range(begin, min(begin + GATHER_BLOCK, length)):
            c = indices[first + j] if j < used else NO_CELL
            for h in range(heads):
                if 0 <= c < pool.shape[0]:
                    to = out.ctypes.data + np.uint64(((s * heads + h) * length + j) * size)
                    _copy_bytes(to, pool.ctypes.data + np.uint64((c * heads + h) * size), size, stream)
                else:
                    for b in range(size):
                        out[s, h, j, b] = 0
        if stream:
            _store_fence()


# ---------------------------------------------------------------------------------------------------------
# move_rows: copies of row blocks between raw addresses (pools of any dtype and trailing shape at once)
# ---------------------------------------------------------------------------------------------------------


@_parallel
def copy_blocks(src_base, dst_base, row_bytes, src_rows, dst_rows, src_row, dst_row, count, stream):
    """Copy blocks of rows of P arrays, all blocks in parallel (no block may read what another writes).

    Array i: rows of ``row_bytes[i]`` bytes at addresses ``src_base[i]`` (``src_rows[i]`` rows) and
    ``dst_base[i]`` (``dst_rows[i]`` rows), all ``[P]``. Block k (``[K]`` arrays): `count` rows from row
    `src_row` to row `dst_row`, in every array. Work item = (array, block); blocks out of range are skipped.
    `stream`: non-temporal stores.
    """
    n_blocks = src_row.shape[0]
    for item in prange(src_base.shape[0] * n_blocks):
        i = item // n_blocks
        k = item % n_blocks
        rows, size = count[k], row_bytes[i]
        if (
            src_row[k] < 0
            or dst_row[k] < 0
            or src_row[k] + rows > src_rows[i]
            or dst_row[k] + rows > dst_rows[i]
        ):
            continue
        to = dst_base[i] + np.uint64(dst_row[k] * size)
        _copy_bytes(to, src_base[i] + np.uint64(src_row[k] * size), rows * size, stream)
        if stream:
            _store_fence()


@_parallel
def copy_runs_in_order(base, row_bytes, n_rows, src_row, dst_row, count):
    """Copy runs of rows inside each of P arrays, run after run, front to back (arrays in parallel).

    Array i: ``n_rows[i]`` rows of ``row_bytes[i]`` bytes at address ``base[i]``, all ``[P]``; run k
    (``[K]`` arrays) copies `count` rows from row `src_row` to row `dst_row`. Correct for a downward
    compaction (runs by ascending `dst_row`, each ``dst_row <= src_row``): no row is read after it is written.
    """
    for i in prange(base.shape[0]):
        size = row_bytes[i]
        for k in range(src_row.shape[0]):
            rows = count[k]
            if (
                src_row[k] < 0
                or dst_row[k] < 0
                or src_row[k] + rows > n_rows[i]
                or dst_row[k] + rows > n_rows[i]
            ):
                continue
            _move_bytes(
                base[i] + np.uint64(dst_row[k] * size), base[i] + np.uint64(src_row[k] * size), rows * size
            )


# ---------------------------------------------------------------------------------------------------------
# rope_shift
# ---------------------------------------------------------------------------------------------------------


@_serial
def _rotate_head(x, xrow, at, cos, sin, u, half, style, like):
    """Rotate the pairs of the head at ``x[xrow, at:at + D]`` (float16 bits or float32) by the angles
    ``cos[u], sin[u]`` (``[half]`` float64), in float64, rounding back to `like`'s dtype."""
    if style == ROPE_NEOX:  # contiguous halves: the loop vectorizes
        for i in range(half):
            a = np.float64(_to_f32(x[xrow, at + i]))
            b = np.float64(_to_f32(x[xrow, at + i + half]))
            x[xrow, at + i] = _from_f64(a * cos[u, i] - b * sin[u, i], like)
            x[xrow, at + i + half] = _from_f64(a * sin[u, i] + b * cos[u, i], like)
    else:
        for i in range(half):
            a = np.float64(_to_f32(x[xrow, at + 2 * i]))
            b = np.float64(_to_f32(x[xrow, at + 2 * i + 1]))
            x[xrow, at + 2 * i] = _from_f64(a * cos[u, i] - b * sin[u, i], like)
            x[xrow, at + 2 * i + 1] = _from_f64(a * sin[u, i] + b * cos[u, i], like)


@_parallel
def rope_float(pool, dim, cells, which, cos, sin, style):
    """Rotate each head of ``pool[cells[t]]`` (``[N, C]`` float16 bits or float32, heads of `dim` values) by
    the angles ``cos[which[t]], sin[which[t]]`` (``[U, half]`` float64, one row per distinct delta)."""
    half = np.uint64(cos.shape[1])
    for t in prange(cells.shape[0]):
        c = cells[t]
        if 0 <= c < pool.shape[0]:
            for h in range(np.uint64(pool.shape[1] // dim)):
                _rotate_head(
                    pool, np.uint64(c), h * np.uint64(dim), cos, sin, np.uint64(which[t]), half, style, pool
                )

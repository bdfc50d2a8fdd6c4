"""The ``@numba.njit`` kernels behind `kvarray.ops.cpu` and the helpers they inline (one file on purpose:
Numba's on-disk cache notices edits only to the file of a cached function).

Kernels decide nothing: `kvarray.ops.cpu` views the arrays as they want them (2-D rows; float16 as its
uint16 bit pattern, since Numba's CPU target has no float16; raw row bytes and addresses for copies), picks
the strategy and calls one kernel. Kernels skip cells and runs that fall outside their arrays. Shapes:
N pool rows (cells), H kv heads, D head_dim, T rows, S sequences, L padded length, C = H * D values per
row, G = C // g int8 groups per row.

float16 <-> float32 conversions follow NumPy's exact rules: round to nearest even, subnormals kept, NaN
payloads kept as NumPy keeps them. Large copies use non-temporal stores (see `_copy_bytes`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# error_model="numpy": no ZeroDivisionError branch per division, which would keep loops from vectorizing
_serial = numba.njit(nogil=True, cache=True, error_model="numpy")
_parallel = numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")

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
    """float64 value -> float16 bits with one rounding (float32 rounded to odd first, then to even)."""
    f = np.float32(d)
    if np.float64(f) != d and f == f:
        u = _f32_bits(f)
        if abs(np.float64(f)) > abs(d):
            u -= np.uint32(1)
        f = _bits_f32(u | np.uint32(1))
    return _f32_to_half(f)


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
# int8 groups
# ---------------------------------------------------------------------------------------------------------


def _absmax(x, t, begin, group):
    """Kernel helper: the largest |x| of ``x[t, begin:begin + group]`` (float16 bits or float32) as float32.

    Computed on bit patterns (an integer max vectorizes; NaN patterns sort above inf, so a NaN anywhere
    gives NaN, as NumPy's max does). Indices are unsigned: no negative-index wraparound in the loop."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(_absmax)
def _absmax_impl(x, t, begin, group):
    if x.dtype == types.uint16:

        def half_absmax(x, t, begin, group):
            m = np.uint16(0)
            for j in range(group):
                m = _max_abs_bits(m, x[t, begin + j])
            return _half_to_f32(m)

        return half_absmax

    def float_absmax(x, t, begin, group):
        m = np.uint32(0)
        for j in range(group):
            m = _max_abs_bits(m, x[t, begin + j])
        return _bits_f32(m)

    return float_absmax


@_serial
def _quantize_row(x, t, q, s, c, group, divisor):
    """Quantize row ``x[t] [C]`` (float16 bits or float32) into ``q[c] [C]`` int8 and ``s[c] [C // g]``
    float16 bits; `t`, `c` and `group` are uint64, ``divisor [C]`` float32 is scratch (each value's scale,
    so the division loop runs over the whole row and vectorizes without a remainder per group)."""
    values = np.uint64(x.shape[1])
    unusable = False
    for k in range(np.uint64(s.shape[1])):
        begin = k * group
        absmax = _absmax(x, t, begin, group)
        bits = _f32_to_half(absmax / np.float32(127.0))
        if bits == 0 and absmax > 0:
            bits = np.uint16(HALF_TINY)
        elif bits == HALF_INF:
            bits = np.uint16(HALF_MAX)
        s[c, k] = bits
        scale = _half_to_f32(bits)
        if not scale > 0:  # an all-zero group (scale 0) or a NaN group: zeros, written below
            unusable = True
            scale = np.float32(1.0)
        for j in range(group):
            divisor[begin + j] = scale
    for j in range(values):
        r = np.rint(_to_f32(x[t, j]) / divisor[j])
        r = r if r > np.float32(-127.0) else np.float32(-127.0)
        q[c, j] = np.int8(r if r < np.float32(127.0) else np.float32(127.0))
    if unusable:
        for k in range(np.uint64(s.shape[1])):
            if not _half_to_f32(s[c, k]) > 0:
                for j in range(k * group, (k + np.uint64(1)) * group):
                    q[c, j] = 0


@_parallel
def quantize_rows(x, cells, q, scales):
    """``q[cells[t]], scales[cells[t]] = quantize(x[t])``; ``x [T, C]``, ``q [N, C]``, ``scales [N, G]``.
    Work items are blocks of `COPY_BLOCK` rows."""
    group = np.uint64(x.shape[1] // scales.shape[1])
    n_rows = x.shape[0]
    for block in prange((n_rows + COPY_BLOCK - 1) // COPY_BLOCK):
        divisor = np.empty(x.shape[1], np.float32)
        for t in range(block * COPY_BLOCK, min(n_rows, (block + 1) * COPY_BLOCK)):
            c = cells[t]
            if 0 <= c < q.shape[0]:
                _quantize_row(x, np.uint64(t), q, scales, np.uint64(c), group, divisor)


@_parallel
def dequantize_rows(q, scales, out):
    """``out[r] = float32(q[r]) * float32(scale of the group)``; ``q, out [R, C]``, ``scales [R, G]``."""
    group = np.uint64(q.shape[1] // scales.shape[1])
    n_rows = q.shape[0]
    for block in prange((n_rows + COPY_BLOCK - 1) // COPY_BLOCK):
        factor = np.empty(q.shape[1], np.float32)
        for r in range(block * COPY_BLOCK, min(n_rows, (block + 1) * COPY_BLOCK)):
            row = np.uint64(r)
            _expand_scales(scales, row, group, factor)
            for j in range(np.uint64(q.shape[1])):
                out[row, j] = _from_f32(np.float32(q[row, j]) * factor[j], out)


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


@_serial
def _expand_scales(scales, cell, group, factor):
    """``factor[v] = float32(scales[cell, v // g])`` for the C values of one row (``factor [C]`` float32)."""
    for k in range(np.uint64(scales.shape[1])):
        scale = _half_to_f32(scales[cell, k])
        for v in range(group):
            factor[k * group + v] = scale


@_parallel
def gather_dequantize(pool, scales, indptr, indices, out):
    """Like `gather_copy` from an int8 ``pool [N, C]`` with ``scales [N, G]`` into float ``out [S, H, L, D]``
    (float16 bits or float32): ``float32(q) * float32(scale)`` then rounded to out's dtype."""
    n_seq, heads, length, dim = out.shape
    flat = out.reshape(n_seq * heads * length, dim)
    group = np.uint64(pool.shape[1] // scales.shape[1])
    blocks = (length + GATHER_BLOCK - 1) // GATHER_BLOCK
    for item in prange(n_seq * blocks):
        s = item // blocks
        begin = (item % blocks) * GATHER_BLOCK
        first = indptr[s]
        used = min(indptr[s + 1] - first, length)
        factor = np.empty(pool.shape[1], np.float32)
        for j in range(begin, min(begin + GATHER_BLOCK, length)):
            c = indices[first + j] if j < used else NO_CELL
            if 0 <= c < pool.shape[0]:
                cell = np.uint64(c)
                _expand_scales(scales, cell, group, factor)
            for h in range(heads):
                at = np.uint64((s * heads + h) * length + j)
                base = np.uint64(h * dim)
                if 0 <= c < pool.shape[0]:
                    for d in range(np.uint64(dim)):
                        flat[at, d] = _from_f32(np.float32(pool[cell, base + d]) * factor[base + d], flat)
                else:
                    for d in range(np.uint64(dim)):
                        flat[at, d] = 0


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
def _pair(i, half, style):
    """The two values of rotating pair i: (i, i + half) for NeoX, (2 i, 2 i + 1) for GPT-J."""
    if style == ROPE_NEOX:
        return i, i + half
    return 2 * i, 2 * i + 1


@_parallel
def rope_float(pool, cells, deltas, inv_freq, style):
    """Rotate ``pool[cells[t]]`` (``[N, H, D]`` float16 bits or float32) by ``deltas[t]`` positions."""
    half = inv_freq.shape[0]
    for t in prange(cells.shape[0]):
        c = cells[t]
        if not 0 <= c < pool.shape[0]:
            continue
        angle = np.float64(deltas[t]) * inv_freq
        cos, sin = np.cos(angle), np.sin(angle)
        for h in range(pool.shape[1]):
            for i in range(half):
                ia, ib = _pair(i, half, style)
                a = np.float64(_to_f32(pool[c, h, ia]))
                b = np.float64(_to_f32(pool[c, h, ib]))
                pool[c, h, ia] = _from_f64(a * cos[i] - b * sin[i], pool)
                pool[c, h, ib] = _from_f64(a * sin[i] + b * cos[i], pool)


@_parallel
def rope_int8(pool, scales, cells, deltas, inv_freq, style):
    """Rotate int8 keys ``pool[cells[t]]`` (``[N, H, D]``, ``scales [N, G]`` float16 bits): dequantize,
    rotate in float64, round to float32 and quantize again."""
    half = inv_freq.shape[0]
    heads, dim = pool.shape[1], pool.shape[2]
    values = heads * dim
    group = values // scales.shape[1]
    for t in prange(cells.shape[0]):
        c = cells[t]
        if not 0 <= c < pool.shape[0]:
            continue
        angle = np.float64(deltas[t]) * inv_freq
        cos, sin = np.cos(angle), np.sin(angle)
        q = pool[c].reshape(values)
        x = np.empty((1, values), np.float32)
        for v in range(values):
            x[0, v] = np.float32(q[v]) * _half_to_f32(scales[c, v // group])
        for h in range(heads):
            for i in range(half):
                ia, ib = _pair(i, half, style)
                a, b = np.float64(x[0, h * dim + ia]), np.float64(x[0, h * dim + ib])
                x[0, h * dim + ia] = np.float32(a * cos[i] - b * sin[i])
                x[0, h * dim + ib] = np.float32(a * sin[i] + b * cos[i])
        flat = pool.reshape(pool.shape[0], values)
        _quantize_row(
            x, np.uint64(0), flat, scales, np.uint64(c), np.uint64(group), np.empty(values, np.float32)
        )

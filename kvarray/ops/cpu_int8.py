"""The int8 ``@numba.njit`` kernels behind `kvarray.ops.cpu`: quantize (also scatter into an int8 pool),
dequantize, gather with dequantization and RoPE on an int8 pool. The bit-level helpers they inline live
in `kvarray.ops.cpu_njit`.

Numba's on-disk cache notices edits only to the file of a cached function: after editing a helper in
`cpu_njit.py` that these kernels use, touch this file too (or clear ``__pycache__``).

The scheme (docs/kernels.md): per group of g values, ``scale = float16(absmax / 127)`` (floored to 2**-24,
capped at 65504), ``q = clip(rint(x / scale), -127, 127)`` (0 where the scale is 0 or NaN) and back
``float32(q) * float32(scale)``. A row is done in three passes: the absmax of each group (an integer max
over bit patterns), then all the row's scales at once (a loop over groups, so it vectorizes too), then the
values group by group; g = `FAST_GROUP` gets its own copy of the loops with a fixed trip count, which
LLVM turns into straight vector code. Shapes: N pool rows, T rows, C values a row, G = C // g groups.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from .cpu_njit import (
    COPY_BLOCK,
    GATHER_BLOCK,
    HALF_INF,
    HALF_MAX,
    HALF_TINY,
    NO_CELL,
    _bits_f32,
    _f32_to_half,
    _from_f32,
    _half_to_f32,
    _half_to_f32_hw,
    _max_abs_bits,
    _parallel,
    _rotate_head,
)

# Numba-level inlining: a constant group size reaches LLVM as a constant trip count
_inline = numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")

#: The group size with fixed-length inner loops (llama.cpp's q8_0 and kvarray's default).
FAST_GROUP = 32


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


def _finite_f32(v):
    """Kernel helper: a stored value (float16 bits or float32) known not to be NaN, as float32 (the bare
    hardware conversion, without `_half_to_f32`'s NaN payload rule)."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(_finite_f32)
def _finite_f32_impl(v):
    if v == types.uint16:
        return lambda v: _half_to_f32_hw(v)
    return lambda v: np.float32(v)


@intrinsic
def _dequantize_16(typingctx, q_at, out_at, scale, like):
    """``out[0:16] = fptrunc(float32(q[0:16]) * scale)`` between addresses: 16 int8 in, 16 float16 bits
    (`like` a uint16 array) or float32 out, as one vector each way. Only for a finite scale (the products
    are then finite, and the hardware rounding is NumPy's)."""
    if not (isinstance(q_at, types.Integer) and isinstance(out_at, types.Integer) and scale == types.float32):
        return None
    half = like.dtype == types.uint16

    def codegen(context, builder, sig, args):
        lanes = 16
        q_vec = builder.load(
            builder.inttoptr(args[0], ir.VectorType(ir.IntType(8), lanes).as_pointer()), align=1
        )
        f_vec = builder.sitofp(q_vec, ir.VectorType(ir.FloatType(), lanes))
        splat = builder.insert_element(
            ir.Constant(ir.VectorType(ir.FloatType(), lanes), None), args[2], ir.Constant(ir.IntType(32), 0)
        )
        splat = builder.shuffle_vector(
            splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        )
        value = builder.fmul(f_vec, splat)
        if half:
            value = builder.bitcast(
                builder.fptrunc(value, ir.VectorType(ir.HalfType(), lanes)),
                ir.VectorType(ir.IntType(16), lanes),
            )
        builder.store(value, builder.inttoptr(args[1], value.type.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(q_at, out_at, scale, like), codegen


@_inline
def _quantize_row(x, t, q, qc, s, c, group, absmax, scale):
    """Quantize row ``x[t] [C]`` (float16 bits or float32) into ``q[qc] [C]`` int8 and ``s[c] [G]`` float16
    bits; `t`, `qc`, `c` and `group` are uint64; ``absmax, scale [G]`` float32 are scratch. Three passes: the
    absmax of each group, the row's scales (one loop over groups: it vectorizes), the values."""
    n_groups = np.uint64(s.shape[1])
    for k in range(n_groups):
        absmax[k] = _absmax(x, t, k * group, group)
    for k in range(n_groups):
        a = absmax[k]
        bits = _f32_to_half(a / np.float32(127.0))
        bits = np.uint16(HALF_TINY) if (bits == 0) & (a > 0) else bits
        bits = np.uint16(HALF_MAX) if bits == HALF_INF else bits
        s[c, k] = bits
        scale[k] = _half_to_f32(bits)
    for k in range(n_groups):
        begin = k * group
        d = scale[k]
        if d > 0:  # finite and > 0, so is every x / d of the group (a NaN x gives a NaN scale)
            for j in range(group):
                r = np.rint(_finite_f32(x[t, begin + j]) / d)
                q[qc, begin + j] = np.int8(max(min(r, np.float32(127.0)), np.float32(-127.0)))
        else:  # an all-zero group (scale 0) or a NaN group
            for j in range(group):
                q[qc, begin + j] = 0


@_inline
def _scales_f32(scales, row, scale):
    """``scale[k] = float32(scales[row, k])`` for the G scales of one row (float16 bits)."""
    for k in range(np.uint64(scales.shape[1])):
        scale[k] = _half_to_f32(scales[row, k])


@_inline
def _dequantize_groups(q, qrow, qat, out, orow, oat, scale, k0, n_groups, group):
    """``out[orow, oat + v] = float32(q[qrow, qat + v]) * scale[k0 + v // group]`` for
    ``v < n_groups * group``, rounded to out's dtype (float16 bits or float32); indices uint64. Groups of a
    multiple of 16 values with a finite scale go 16 values at a time (`_dequantize_16`)."""
    size = np.uint64(out.itemsize)
    q_at = q.ctypes.data + qrow * np.uint64(q.shape[1]) + qat
    out_at = out.ctypes.data + (orow * np.uint64(out.shape[1]) + oat) * size
    for k in range(n_groups):
        d = scale[k0 + k]
        begin = k * group
        if abs(d) < np.float32(np.inf) and group % np.uint64(16) == 0:
            for i in range(group // np.uint64(16)):
                v = begin + np.uint64(16) * i
                _dequantize_16(q_at + v, out_at + v * size, d, out)
        else:  # a NaN or inf scale, or an odd group size: value by value, with the NaN rule
            for j in range(group):
                out[orow, oat + begin + j] = _from_f32(np.float32(q[qrow, qat + begin + j]) * d, out)


@_parallel
def quantize_rows(x, cells, q, scales):
    """``q[cells[t]], scales[cells[t]] = quantize(x[t])``; ``x [T, C]``, ``q [N, C]``, ``scales [N, G]``.
    Work items are blocks of `COPY_BLOCK` rows. (Quantizing into a scratch row and streaming it to q with
    non-temporal stores measured slower.)"""
    group = np.uint64(x.shape[1] // scales.shape[1])
    n_rows = x.shape[0]
    for block in prange((n_rows + COPY_BLOCK - 1) // COPY_BLOCK):
        absmax = np.empty(scales.shape[1], np.float32)
        scale = np.empty(scales.shape[1], np.float32)
        for t in range(block * COPY_BLOCK, min(n_rows, (block + 1) * COPY_BLOCK)):
            c = cells[t]
            if 0 <= c < q.shape[0]:
                row, cell = np.uint64(t), np.uint64(c)
                if group == FAST_GROUP:
                    _quantize_row(x, row, q, cell, scales, cell, np.uint64(FAST_GROUP), absmax, scale)
                else:
                    _quantize_row(x, row, q, cell, scales, cell, group, absmax, scale)


@_parallel
def dequantize_rows(q, scales, out):
    """``out[r] = float32(q[r]) * float32(scale of the group)``; ``q, out [R, C]``, ``scales [R, G]``."""
    n_groups = np.uint64(scales.shape[1])
    group = np.uint64(q.shape[1]) // n_groups
    zero = np.uint64(0)
    n_rows = q.shape[0]
    for block in prange((n_rows + COPY_BLOCK - 1) // COPY_BLOCK):
        scale = np.empty(scales.shape[1], np.float32)
        for r in range(block * COPY_BLOCK, min(n_rows, (block + 1) * COPY_BLOCK)):
            row = np.uint64(r)
            _scales_f32(scales, row, scale)
            if group == FAST_GROUP:
                _dequantize_groups(q, row, zero, out, row, zero, scale, zero, n_groups, np.uint64(FAST_GROUP))
            else:
                _dequantize_groups(q, row, zero, out, row, zero, scale, zero, n_groups, group)


@_parallel
def gather_dequantize(pool, scales, indptr, indices, out):
    """``out[s, h, j] = dequantize(pool[indices[indptr[s] + j], h])``, zero past each length; int8
    ``pool [N, C]``, ``scales [N, G]``, ``out [S, H, L, D]`` float16 bits or float32. Work items are blocks
    of `GATHER_BLOCK` positions of one sequence; each cell's scales are converted once for its H heads.
    (Dequantizing a block into scratch and streaming it to out with non-temporal stores measured slower.)"""
    n_seq, heads, length, dim = out.shape
    flat = out.reshape(n_seq * heads * length, dim)
    n_groups = scales.shape[1]
    group = np.uint64(pool.shape[1] // n_groups)
    udim = np.uint64(dim)
    per_head = udim // group if udim % group == 0 else np.uint64(0)  # 0: a group spans two heads
    zero = np.uint64(0)
    blocks = (length + GATHER_BLOCK - 1) // GATHER_BLOCK
    for item in prange(n_seq * blocks):
        s = item // blocks
        begin = (item % blocks) * GATHER_BLOCK
        first = indptr[s]
        used = min(indptr[s + 1] - first, length)
        scale = np.empty(n_groups, np.float32)
        factor = np.empty(0 if per_head else pool.shape[1], np.float32)  # per value, when groups span heads
        for j in range(begin, min(begin + GATHER_BLOCK, length)):
            c = indices[first + j] if j < used else NO_CELL
            live = 0 <= c < pool.shape[0]
            cell = np.uint64(c if live else 0)
            if live:
                _scales_f32(scales, cell, scale)
                if not per_head:
                    for v in range(np.uint64(pool.shape[1])):
                        factor[v] = scale[v // group]
            for h in range(np.uint64(heads)):
                at = np.uint64((s * heads + h) * length + j)
                if not live:
                    for d in range(udim):
                        flat[at, d] = 0
                elif not per_head:
                    _dequantize_groups(
                        pool, cell, h * udim, flat, at, zero, factor, h * udim, udim, np.uint64(1)
                    )
                elif group == FAST_GROUP:
                    k0 = h * per_head
                    _dequantize_groups(
                        pool, cell, h * udim, flat, at, zero, scale, k0, per_head, np.uint64(FAST_GROUP)
                    )
                else:
                    _dequantize_groups(
                        pool, cell, h * udim, flat, at, zero, scale, h * per_head, per_head, group
                    )


@_parallel
def rope_int8(pool, dim, scales, cells, which, cos, sin, style):
    """Rotate int8 keys ``pool[cells[t]]`` (``[N, C]``, heads of `dim` values, ``scales [N, G]`` float16
    bits) by the angles ``cos[which[t]], sin[which[t]]`` (``[U, half]`` float64): dequantize, rotate in
    float64, round to float32 and quantize again."""
    half = np.uint64(cos.shape[1])
    values = np.uint64(pool.shape[1])
    n_groups = np.uint64(scales.shape[1])
    group = values // n_groups
    zero = np.uint64(0)
    for t in prange(cells.shape[0]):
        c = cells[t]
        if not 0 <= c < pool.shape[0]:
            continue
        cell = np.uint64(c)
        x = np.empty((1, pool.shape[1]), np.float32)
        scale = np.empty(scales.shape[1], np.float32)
        absmax = np.empty(scales.shape[1], np.float32)
        _scales_f32(scales, cell, scale)
        _dequantize_groups(pool, cell, zero, x, zero, zero, scale, zero, n_groups, group)
        for h in range(values // np.uint64(dim)):
            _rotate_head(x, zero, h * np.uint64(dim), cos, sin, np.uint64(which[t]), half, style, x)
        _quantize_row(x, zero, pool, cell, scales, cell, group, absmax, scale)

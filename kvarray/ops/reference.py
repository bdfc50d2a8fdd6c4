"""NumPy reference of every kernel: the test oracle, never the fast path.

Each function has the same signature and the same effect as its twins in `cpu.py` and `cuda.py`; inputs
are assumed valid (the public wrappers in `kvarray.ops` check them). Written for clarity, not speed.

The int8 scheme (one rule for all three backends, see docs/kernels.md):
    absmax = max |x| over a group of g values (float32)
    scale  = float16(absmax / 127)        division in float32, rounded to nearest float16
             if absmax > 0 and scale == 0: scale = 2**-24 (smallest float16), so small groups survive
             if scale is inf: scale = 65504 (largest float16; values past 127 * 65504 saturate)
    q      = clip(rint(x / scale), -127, 127) as int8, 0 where scale == 0   (float32 division)
    x'     = float32(q) * float32(scale)
so |x - x'| <= scale / 2 for every |x| <= 127 * 65504.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..spec import RopeSpec, RopeStyle

FLOAT16_TINY = np.float16(2.0**-24)
FLOAT16_MAX = np.float16(65504.0)


def _quantize_groups(x: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize rows ``x [R, C]`` (any float dtype), `groups` groups a row: ``(q [R, C], s [R, groups])``."""
    rows = x.shape[0]
    g = x.reshape(rows, groups, x.shape[1] // groups).astype(np.float32)  # explicit sizes: rows may be 0
    absmax = np.abs(g).max(axis=2) if g.shape[2] else np.zeros((rows, groups), np.float32)
    scale = (absmax / np.float32(127)).astype(np.float16)
    scale = np.where((scale == 0) & (absmax > 0), FLOAT16_TINY, scale)
    scale = np.where(np.isinf(scale), FLOAT16_MAX, scale).astype(np.float16)
    s32 = scale.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(g / np.where(s32 > 0, s32, 1)), 0)
    q = np.clip(q, -127, 127).astype(np.int8)
    return q.reshape(x.shape), scale


def _dequantize_groups(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Float32 values of rows ``q [R, C]`` int8 with ``scales [R, groups]`` float16."""
    rows, groups = scales.shape
    g = q.reshape(rows, groups, q.shape[1] // groups).astype(np.float32)
    g = g * scales.astype(np.float32)[:, :, None]
    return g.reshape(q.shape)


def _row_values(a: np.ndarray) -> int:
    """C, the values in one row of ``a [R, ...]`` (``reshape(R, -1)`` cannot infer it when R is 0)."""
    return int(np.prod(a.shape[1:], dtype=np.int64))


def quantize_int8(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> None:
    """Quantize ``x [R, ...]`` float16/float32 into ``q`` (x's shape, int8) and ``scales [R, C // g]``.

    C is the number of values in one row (``prod(x.shape[1:])``); each row is cut into ``scales.shape[1]``
    groups of g consecutive values.
    """
    rows, values = x.shape[0], _row_values(x)
    qq, s = _quantize_groups(x.reshape(rows, values), scales.shape[1])
    q.reshape(rows, values)[...] = qq
    scales[...] = s


def dequantize_int8(q: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """Dequantize ``q [R, ...]`` int8 with ``scales [R, C // g]`` float16 into ``out`` (q's shape, float)."""
    rows, values = q.shape[0], _row_values(q)
    out.reshape(rows, values)[...] = _dequantize_groups(q.reshape(rows, values), scales).astype(out.dtype)


def scatter_rows(
    pool: np.ndarray, rows: np.ndarray, cells: np.ndarray, scales: np.ndarray | None = None
) -> None:
    """Write ``rows [T, H, D]`` into ``pool[cells[t]]`` (``pool [N, H, D]``); quantize when the pool is int8.

    `cells` ``[T]`` are distinct cell indices in ``[0, N)``; with an int8 pool, ``scales [N, H * D // g]``
    float16 receives each written cell's scales.
    """
    if len(cells) == 0:
        return
    if scales is None:
        pool[cells] = rows.astype(pool.dtype)
        return
    t = len(cells)
    q, s = _quantize_groups(rows.reshape(t, -1), scales.shape[1])
    pool[cells] = q.reshape((t,) + pool.shape[1:])
    scales[cells] = s


def gather_rows(
    pool: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    out: np.ndarray,
    scales: np.ndarray | None = None,
) -> None:
    """Copy each sequence's cells into a padded staging buffer, dequantizing an int8 pool.

    ``pool [N, H, D]``; page table ``indptr [S + 1]``, ``indices [indptr[S]]`` (sequence s owns cells
    ``indices[indptr[s]:indptr[s + 1]]`` in position order); ``out [S, H, L, D]`` with L at least the longest
    sequence: ``out[s, :, j] = pool[indices[indptr[s] + j]]`` for j below the sequence's length, 0 after.
    """
    out[...] = 0
    for s in range(out.shape[0]):
        cells = indices[indptr[s] : indptr[s + 1]]
        if len(cells) == 0:
            continue
        if scales is None:
            block = pool[cells].astype(out.dtype)
        else:
            block = _dequantize_groups(pool[cells].reshape(len(cells), -1), scales[cells])
            block = block.reshape((len(cells),) + pool.shape[1:]).astype(out.dtype)
        out[s, :, : len(cells)] = block.transpose(1, 0, 2)


def move_rows(pools: Sequence[np.ndarray], src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> None:
    """Move runs of rows in every pool: rows ``[src[m], src[m] + length[m])`` go to ``[dst[m], ...)``.

    Every pool is ``[N, ...]`` (any trailing shape and dtype, the same N). All moves act at once: each
    destination row receives the source row's value from before the call, so overlapping source and
    destination ranges are fine; destination ranges must not overlap each other. Rows that no run writes
    keep their values.
    """
    if len(src) == 0:
        return
    from_rows = np.concatenate([np.arange(s, s + n) for s, n in zip(src, length, strict=True)])
    to_rows = np.concatenate([np.arange(d, d + n) for d, n in zip(dst, length, strict=True)])
    for pool in pools:
        pool[to_rows] = pool[from_rows].copy()


def rope_shift(
    pool: np.ndarray,
    cells: np.ndarray,
    deltas: np.ndarray,
    rope: RopeSpec,
    scales: np.ndarray | None = None,
) -> None:
    """Rotate the keys in ``pool[cells[t]]`` by ``deltas[t]`` positions of rotary embedding, in place.

    ``pool [N, H, D]`` float16/float32 (or int8 with ``scales [N, H * D // g]``: dequantized, rotated and
    re-quantized); `cells` ``[T]`` distinct; `deltas` ``[T]`` integer position deltas (negative turns back).
    Angles and the rotation are computed in float64; only the first ``rope.rotary_dims(D)`` values of each
    head rotate.
    """
    if len(cells) == 0:
        return
    head_dim = pool.shape[2]
    inv_freq = rope.inv_freq(head_dim)
    half = len(inv_freq)
    if scales is None:
        x = pool[cells].astype(np.float64)
    else:
        x = _dequantize_groups(pool[cells].reshape(len(cells), -1), scales[cells])
        x = x.reshape((len(cells),) + pool.shape[1:]).astype(np.float64)
    angle = np.asarray(deltas, np.float64)[:, None] * inv_freq[None, :]  # [T, half]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if rope.style is RopeStyle.NEOX:
        a, b = x[..., :half].copy(), x[..., half : 2 * half].copy()
        x[..., :half], x[..., half : 2 * half] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0 : 2 * half : 2].copy(), x[..., 1 : 2 * half : 2].copy()
        x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2] = a * cos - b * sin, a * sin + b * cos
    if scales is None:
        pool[cells] = x.astype(pool.dtype)
    else:
        q, s = _quantize_groups(x.astype(np.float32).reshape(len(cells), -1), scales.shape[1])
        pool[cells] = q.reshape(x.shape)
        scales[cells] = s

"""Each CPU kernel on 64 MiB of 2 KiB rows against ``numpy.copyto`` of the same bytes (docs/kernels.md).

Rows are float16 [8 heads, 128] or float32 [4 heads, 128] (2 KiB each); int8 pools use groups of 32 with a
float16 scale per group. Bytes counted: what the kernel reads plus what it writes.

    python -m pytest benchmarks/test_kernels.py --benchmark-enable -q
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from kvarray.ops import cpu
from kvarray.spec import RopeSpec

from .conftest import ROW_BYTES, ROWS_BYTES

GROUP = 32
Measure = Callable[[Callable[[], object], int], None]


def shape_of(dtype: type) -> tuple[int, int, int]:
    """``(T, H, D)``: 64 MiB of 2 KiB rows of `dtype`, D = 128."""
    heads = ROW_BYTES // (128 * np.dtype(dtype).itemsize)
    return ROWS_BYTES // ROW_BYTES, heads, 128


def random_rows(dtype: type, rows: int, heads: int, dim: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, heads, dim), dtype=np.float32).astype(dtype)


def int8_bytes(rows: int, values: int) -> int:
    """Bytes of int8 rows plus their float16 scales."""
    return rows * values + rows * (values // GROUP) * 2


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_scatter_rows(bandwidth: Measure, dtype: type) -> None:
    t, h, d = shape_of(dtype)
    rows = random_rows(dtype, t, h, d)
    pool = np.zeros((2 * t, h, d), dtype)
    cells = np.random.default_rng(1).permutation(2 * t)[:t].astype(np.int32)
    bandwidth(lambda: cpu.scatter_rows(pool, rows, cells), 2 * rows.nbytes)


def test_scatter_rows_int8(bandwidth: Measure) -> None:
    t, h, d = shape_of(np.float16)
    rows = random_rows(np.float16, t, h, d)
    pool = np.zeros((2 * t, h, d), np.int8)
    scales = np.zeros((2 * t, h * d // GROUP), np.float16)
    cells = np.random.default_rng(1).permutation(2 * t)[:t].astype(np.int32)
    bandwidth(lambda: cpu.scatter_rows(pool, rows, cells, scales), rows.nbytes + int8_bytes(t, h * d))


def gather_plan(t: int, sequences: int = 8) -> tuple[np.ndarray, np.ndarray, int]:
    """8 sequences of t / 8 cells each, scattered over a pool of 2 t cells: ``(indptr, indices, L)``."""
    length = t // sequences
    indices = np.random.default_rng(2).permutation(2 * t)[:t].astype(np.int32)
    return np.arange(sequences + 1, dtype=np.int32) * length, indices, length


def test_gather_rows(bandwidth: Measure) -> None:
    t, h, d = shape_of(np.float16)
    pool = random_rows(np.float16, 2 * t, h, d)
    indptr, indices, length = gather_plan(t)
    out = np.empty((len(indptr) - 1, h, length, d), np.float16)
    bandwidth(lambda: cpu.gather_rows(pool, indptr, indices, out), 2 * out.nbytes)


def test_gather_rows_int8(bandwidth: Measure) -> None:
    t, h, d = shape_of(np.float16)
    pool = np.random.default_rng(0).integers(-127, 128, (2 * t, h, d)).astype(np.int8)
    scales = np.full((2 * t, h * d // GROUP), 0.01, np.float16)
    indptr, indices, length = gather_plan(t)
    out = np.empty((len(indptr) - 1, h, length, d), np.float16)
    bandwidth(lambda: cpu.gather_rows(pool, indptr, indices, out, scales), int8_bytes(t, h * d) + out.nbytes)


@pytest.mark.parametrize("plan", ["direct", "compaction"])
def test_move_rows(bandwidth: Measure, plan: str) -> None:
    """64 MiB moved in runs of 64 rows: `direct` from the upper half of a pool into the lower half (no row is
    both); `compaction` closes a 1-row hole before every run, keys and values pools of 32 MiB each."""
    t, h, d = shape_of(np.float16)
    run = 64
    if plan == "direct":
        pools = [random_rows(np.float16, 2 * t, h, d)]
        starts = np.arange(0, t, run)
        src, dst = starts + t, starts
    else:
        pools = [random_rows(np.float16, t + t // run, h // 2, d) for _ in range(2)]
        starts = np.arange(0, t, run)
        src, dst = starts + starts // run + 1, starts
    length = np.full(len(starts), run)
    bandwidth(lambda: cpu.move_rows(pools, src, dst, length), 2 * ROWS_BYTES)


def test_quantize_int8(bandwidth: Measure) -> None:
    t, h, d = shape_of(np.float16)
    x = random_rows(np.float16, t, h, d)
    q, scales = np.empty(x.shape, np.int8), np.empty((t, h * d // GROUP), np.float16)
    bandwidth(lambda: cpu.quantize_int8(x, q, scales), x.nbytes + int8_bytes(t, h * d))


def test_dequantize_int8(bandwidth: Measure) -> None:
    t, h, d = shape_of(np.float16)
    q = np.random.default_rng(0).integers(-127, 128, (t, h, d)).astype(np.int8)
    scales = np.full((t, h * d // GROUP), 0.01, np.float16)
    out = np.empty(q.shape, np.float16)
    bandwidth(lambda: cpu.dequantize_int8(q, scales, out), int8_bytes(t, h * d) + out.nbytes)


def test_rope_shift(bandwidth: Measure) -> None:
    t, h, d = shape_of(np.float16)
    pool = random_rows(np.float16, t, h, d)
    cells = np.arange(t, dtype=np.int32)
    deltas = np.full(t, -3, np.int32)
    bandwidth(lambda: cpu.rope_shift(pool, cells, deltas, RopeSpec(theta=500000.0)), 2 * pool.nbytes)

"""CUDA kernel bandwidth against a CuPy device-to-device copy of the same bytes (needs a CUDA device).

Each kernel moves 64 MiB of 2 KiB rows (32768 cells of 8 kv heads x 128 float16 values); the baseline is
``dst[...] = src`` on CuPy arrays of 64 MiB. ``benchmark.extra_info`` records the kernel's GB/s (payload
bytes / time), the copy's, and their ratio. Run on a machine with a GPU:

    pytest benchmarks/test_kernels_gpu.py --benchmark-enable -m gpu

Without a usable device every test skips with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from kvarray import ops
from kvarray.spec import RopeSpec
from kvarray.xp import cupy_unavailable_reason, require_cupy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        bool(cupy_unavailable_reason()), reason=f"no usable CUDA device: {cupy_unavailable_reason()}"
    ),
]

ROWS, HEADS, DIM, GROUP = 32768, 8, 128, 32  # 32768 rows of 2 KiB (float16) = 64 MiB
PAYLOAD = ROWS * HEADS * DIM * 2


def _device_seconds(cp, fn: Callable[[], None], repeat: int = 20) -> float:
    """Mean seconds per call of `fn` on the device (CUDA events, after one warm-up call)."""
    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / repeat


def _measure(benchmark, cp, fn: Callable[[], None]) -> None:
    src, dst = cp.ones(PAYLOAD, cp.uint8), cp.zeros(PAYLOAD, cp.uint8)

    def copy() -> None:
        dst[...] = src

    kernel_s, copy_s = _device_seconds(cp, fn), _device_seconds(cp, copy)
    benchmark.extra_info.update(
        kernel_gbps=PAYLOAD / kernel_s / 1e9,
        copy_gbps=PAYLOAD / copy_s / 1e9,
        ratio_to_copy=copy_s / kernel_s,
    )

    def timed() -> None:
        fn()
        cp.cuda.get_current_stream().synchronize()

    benchmark(timed)


@pytest.fixture(scope="module")
def cp():
    return require_cupy()


def _rows(cp, dtype=np.float16):
    return cp.random.standard_normal((ROWS, HEADS, DIM), dtype=np.float32).astype(dtype)


@pytest.mark.parametrize("pool_dtype", ["float16", "int8"])
def test_scatter_rows(benchmark, cp, pool_dtype) -> None:
    rows = _rows(cp)
    pool = cp.zeros((2 * ROWS, HEADS, DIM), pool_dtype)
    scales = cp.zeros((2 * ROWS, HEADS * DIM // GROUP), cp.float16) if pool_dtype == "int8" else None
    cells = cp.random.permutation(2 * ROWS)[:ROWS].astype(cp.int32)
    _measure(benchmark, cp, lambda: ops.scatter_rows(pool, rows, cells, scales))


@pytest.mark.parametrize("pool_dtype", ["float16", "int8"])
def test_gather_rows(benchmark, cp, pool_dtype) -> None:
    sequences = 32
    pool = cp.zeros((2 * ROWS, HEADS, DIM), pool_dtype)
    scales = cp.ones((2 * ROWS, HEADS * DIM // GROUP), cp.float16) if pool_dtype == "int8" else None
    indptr = cp.arange(0, ROWS + 1, ROWS // sequences, dtype=cp.int32)
    indices = cp.random.permutation(2 * ROWS)[:ROWS].astype(cp.int32)
    out = cp.empty((sequences, HEADS, ROWS // sequences, DIM), cp.float16)
    _measure(benchmark, cp, lambda: ops.gather_rows(pool, indptr, indices, out, scales))


@pytest.mark.parametrize("overlap", [False, True], ids=["direct", "staged"])
def test_move_rows(benchmark, cp, overlap) -> None:
    pool = cp.zeros((2 * ROWS, HEADS, DIM), cp.float16)
    start = ROWS // 2 if overlap else ROWS  # half the source run is also destination: staged
    src, dst, length = (cp.asarray([v], cp.int64) for v in (start, 0, ROWS))
    _measure(benchmark, cp, lambda: ops.move_rows([pool], src, dst, length))


def test_quantize_int8(benchmark, cp) -> None:
    x, q = _rows(cp), cp.empty((ROWS, HEADS, DIM), cp.int8)
    scales = cp.empty((ROWS, HEADS * DIM // GROUP), cp.float16)
    _measure(benchmark, cp, lambda: ops.quantize_int8(x, q, scales))


def test_dequantize_int8(benchmark, cp) -> None:
    q, out = cp.ones((ROWS, HEADS, DIM), cp.int8), cp.empty((ROWS, HEADS, DIM), cp.float16)
    scales = cp.ones((ROWS, HEADS * DIM // GROUP), cp.float16)
    _measure(benchmark, cp, lambda: ops.dequantize_int8(q, scales, out))


def test_rope_shift(benchmark, cp) -> None:
    pool = _rows(cp)
    cells, deltas = cp.arange(ROWS, dtype=cp.int32), cp.full(ROWS, -7, cp.int32)
    _measure(benchmark, cp, lambda: ops.rope_shift(pool, cells, deltas, RopeSpec()))

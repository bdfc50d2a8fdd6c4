"""Fill Numba's on-disk cache with the CPU kernels, so the first real call does not pay for compilation.

`compile_cpu_kernels` calls every kernel of `kvarray.ops.cpu` once on tiny inputs of the common dtype
combinations: float16 and float32 pools, int8 pools written from float16 and float32 rows and read into
float16 and float32, int32 and int64 indices (the kernels see int64 either way). With an empty cache this
compiles (tens of seconds on two cores); with a filled cache (``NUMBA_CACHE_DIR`` or ``__pycache__``) it
only loads. ``kvarray info`` runs it and prints the time taken.
"""

from __future__ import annotations

import numpy as np

from ..spec import RopeSpec, RopeStyle
from . import cpu

_CELLS, _HEADS, _DIM, _GROUP = 4, 2, 32, 32


def compile_cpu_kernels() -> list[str]:
    """Call each CPU kernel once on tiny inputs of the common dtypes, in both its variants (the serial twin
    that small calls run and the parallel kernel of large calls); returns the kernel names compiled.

    Shapes: pools ``[4, 2, 32]``, two rows written, a page table of two sequences, int8 groups of 32.
    """
    small_calls = cpu.PARALLEL_BYTES
    try:
        _call_every_kernel()  # tiny inputs: the serial twins
        cpu.PARALLEL_BYTES = 0  # every call parallel, however small
        return _call_every_kernel()
    finally:
        cpu.PARALLEL_BYTES = small_calls


def _call_every_kernel() -> list[str]:
    names: list[str] = []
    cells32 = np.array([2, 0], dtype=np.int32)
    for index in (np.int32, np.int64):
        cells = cells32.astype(index)
        indptr = np.array([0, 1, 2], dtype=index)
        for dtype in (np.float16, np.float32):
            pool = np.zeros((_CELLS, _HEADS, _DIM), dtype=dtype)
            rows = np.ones((2, _HEADS, _DIM), dtype=dtype)
            cpu.scatter_rows(pool, rows, cells)
            cpu.scatter_rows(pool, rows.astype(np.float32 if dtype == np.float16 else np.float16), cells)
            cpu.kv_writer(pool, pool.copy())(rows, rows, cells.astype(np.int64))
            cpu.copy_runs(pool, np.empty_like(pool), *(np.array(a, dtype=index) for a in ([0], [1], [2])))
            cpu.gather_rows(pool, indptr, cells, np.empty((2, _HEADS, 2, _DIM), dtype=dtype))
            for style in RopeStyle:
                cpu.rope_shift(pool, cells, np.array([3, -1], dtype=index), RopeSpec(style=style))
            cpu.move_rows(
                [pool], np.array([0], dtype=index), np.array([1], dtype=index), np.array([2], dtype=index)
            )
        names += ["scatter_rows", "kv_writer", "copy_runs", "gather_rows", "rope_shift", "move_rows"]
        qpool = np.zeros((_CELLS, _HEADS, _DIM), dtype=np.int8)
        scales = np.zeros((_CELLS, _HEADS * _DIM // _GROUP), dtype=np.float16)
        for dtype in (np.float16, np.float32):
            rows = np.ones((2, _HEADS, _DIM), dtype=dtype)
            cpu.scatter_rows(qpool, rows, cells, scales)
            cpu.gather_rows(qpool, indptr, cells, np.empty((2, _HEADS, 2, _DIM), dtype=dtype), scales)
            cpu.quantize_int8(rows, np.empty(rows.shape, np.int8), np.empty((2, scales.shape[1]), np.float16))
            cpu.dequantize_int8(qpool, scales, np.empty(qpool.shape, dtype=dtype))
        cpu.rope_shift(qpool, cells, np.array([3, -1], dtype=index), RopeSpec(), scales)
        # the three move strategies: direct, in-order compaction, staged
        pools: list[np.ndarray] = [qpool, scales]
        for src, dst, length in (([0], [2], [2]), ([2], [0], [2]), ([0, 2], [2, 0], [2, 2])):
            cpu.move_rows(pools, *(np.array(a, dtype=index) for a in (src, dst, length)))
        names += ["quantize_int8", "dequantize_int8"]
    return sorted(set(names))

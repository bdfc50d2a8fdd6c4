"""`ops.kv_writer`: a layer's keys and values written by one prepared call, against two reference scatters.

The CPU writer copies two float pools of one dtype in one kernel call and falls back to `scatter_rows` for
int8 pools, mixed pairs and rows of another dtype; every case must equal `reference.scatter_rows` bit for bit.
Values encode coordinates (``1000 * which + 100 * (row % 8) + 10 * head + dim % 10``) so a row in the wrong
cell shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvarray import ops
from kvarray.ops import cpu, reference

CELLS, HEADS, DIM, GROUP = 12, 2, 64, 32


def coords(which: int, rows: int, dtype: type) -> np.ndarray:
    """``[rows, HEADS, DIM]`` with value ``1000 * which + 100 * (row % 8) + 10 * head + dim % 10``."""
    r, h, d = np.meshgrid(np.arange(rows), np.arange(HEADS), np.arange(DIM), indexing="ij")
    return (1000 * which + 100 * (r % 8) + 10 * h + d % 10).astype(dtype)


def pool_pair(key_dtype: str, value_dtype: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Two zeroed pools ``[CELLS, HEADS, DIM]`` with their int8 scales (None for float pools)."""
    out = []
    for dtype in (key_dtype, value_dtype):
        pool = np.zeros((CELLS, HEADS, DIM), dtype)
        scales = np.zeros((CELLS, HEADS * DIM // GROUP), np.float16) if dtype == "int8" else None
        out.append((pool, scales))
    return out


@pytest.mark.parametrize(
    ("key_dtype", "value_dtype", "rows_dtype", "cells"),
    [
        ("float16", "float16", "float16", [3, 0, 11]),  # one kernel call for both pools
        ("float32", "float32", "float32", [5, 6, 7, 8]),
        ("float16", "float16", "float32", [2, 9]),  # rows of another dtype: converted, two calls
        ("int8", "int8", "float16", [1, 4, 10]),  # quantized
        ("int8", "float16", "float16", [0, 7]),  # int8 keys, float16 values
        ("float16", "float16", "float16", []),  # an empty pass writes nothing
    ],
)
def test_kv_writer_matches_two_reference_scatters(key_dtype, value_dtype, rows_dtype, cells) -> None:
    ours, theirs = pool_pair(key_dtype, value_dtype), pool_pair(key_dtype, value_dtype)
    idx = np.asarray(cells, np.int64)
    keys, values = coords(1, len(cells), rows_dtype), coords(2, len(cells), rows_dtype)
    write = ops.kv_writer(ours[0][0], ours[1][0], ours[0][1], ours[1][1])
    write(keys, values, idx)
    for (pool, scales), rows in zip(theirs, (keys, values), strict=True):
        reference.scatter_rows(pool, rows, idx, scales)
    for (a, sa), (b, sb) in zip(ours, theirs, strict=True):
        assert a.tobytes() == b.tobytes()
        assert (sa is None) == (sb is None) and (sa is None or sa.tobytes() == sb.tobytes())
    if cells:
        assert np.count_nonzero(ours[0][0].reshape(CELLS, -1).any(axis=1)) == len(cells)


def test_kv_writer_parallel_path_equals_serial() -> None:
    """A write above `cpu.PARALLEL_BYTES` runs the parallel kernel; same bytes as the serial one."""
    cells = np.random.default_rng(0).permutation(4096)[:1200].astype(np.int64)
    keys, values = coords(1, len(cells), np.float16), coords(2, len(cells), np.float16)
    assert 2 * keys.nbytes >= cpu.PARALLEL_BYTES
    pools = [np.zeros((4096, HEADS, DIM), np.float16) for _ in range(4)]
    cpu.kv_writer(pools[0], pools[1], finite=True)(keys, values, cells)  # scans, then writes in parallel
    for pool, rows in zip(pools[2:], (keys, values), strict=True):
        reference.scatter_rows(pool, rows, cells)
    assert pools[0].tobytes() == pools[2].tobytes() and pools[1].tobytes() == pools[3].tobytes()


# (pool dtype, which array is poisoned, row, value, row shape [H, D]): the writer with finite=True refuses
# and writes nothing; (2, 3) float16 rows are 12 bytes, not whole uint64 words: the check_finite fallback
POISONED = [
    ("float16", "keys", 0, np.nan, (HEADS, DIM)),
    ("float16", "values", 2, np.inf, (HEADS, DIM)),
    ("float16", "keys", 1, -np.inf, (HEADS, DIM)),
    ("float32", "values", 0, np.nan, (HEADS, DIM)),
    ("float32", "keys", 2, -np.inf, (HEADS, DIM)),
    ("float16", "values", 1, np.nan, (2, 3)),
    ("int8", "values", 1, np.inf, (HEADS, DIM)),  # int8 pools always check
]


@pytest.mark.parametrize(("dtype", "which", "row", "value", "shape"), POISONED)
def test_kv_writer_refuses_nan_and_infinity_and_writes_nothing(dtype, which, row, value, shape) -> None:
    from kvarray.errors import NonFiniteValues

    rows_dtype = np.float16 if dtype == "int8" else dtype
    pools = [np.full((CELLS, *shape), 3, dtype) for _ in range(2)]
    scales = [np.ones((CELLS, shape[0] * shape[1] // GROUP), np.float16) if dtype == "int8" else None] * 2
    keys, values = (np.ones((3, *shape), rows_dtype) for _ in range(2))
    {"keys": keys, "values": values}[which][row, 0, 1] = value
    before = [p.copy() for p in pools]
    write = ops.kv_writer(pools[0], pools[1], scales[0], scales[1], finite=dtype != "int8")
    with pytest.raises(NonFiniteValues, match=f"{which} must be finite: NaN or infinity found in row {row}"):
        write(keys, values, np.array([4, 0, 9], np.int64))
    assert all(p.tobytes() == b.tobytes() for p, b in zip(pools, before, strict=True))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_kv_writer_without_the_check_stores_nan_and_with_it_passes_extremes(dtype) -> None:
    pools = [np.zeros((CELLS, HEADS, DIM), dtype) for _ in range(2)]
    keys = coords(1, 2, dtype)
    keys[1, 1, 5] = np.nan
    ops.kv_writer(pools[0], pools[1], finite=False)(keys, keys, np.array([1, 2], np.int64))
    assert np.isnan(pools[0][2, 1, 5]) and np.isnan(pools[1][2, 1, 5])
    info = np.finfo(dtype)
    extremes = coords(2, 2, dtype)
    extremes[0, 0, :4] = [info.max, info.min, info.smallest_subnormal, -0.0]
    ops.kv_writer(pools[0], pools[1], finite=True)(extremes, extremes, np.array([5, 6], np.int64))
    assert pools[0][5:7].tobytes() == extremes.tobytes() == pools[1][5:7].tobytes()

"""The CUDA kernels of `kvarray.ops.cuda` under the Numba CUDA simulator, against the NumPy reference.

Runs in its own process: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim tests/ops/test_cuda_sim.py``. The
simulator runs every thread as Python (about 0.3 ms each), so shapes are tiny: a few hundred threads a
test. Simulator arrays have no ``__cuda_array_interface__``, so the public wrappers of `kvarray.ops` would
send them to the CPU kernels; these tests call `kvarray.ops.cuda` directly. Values encode their
coordinates where that makes a failure readable (row * 100 + value index).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvarray.ops import reference
from kvarray.spec import Llama3Scaling, RopeSpec, RopeStyle

pytestmark = pytest.mark.cudasim

F16, F32, I8 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int8)


@pytest.fixture(scope="module")
def cuda():
    from numba import cuda

    return cuda


@pytest.fixture(scope="module")
def kernels():
    from kvarray.ops import cuda as kernels

    return kernels


def _coords(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Row r, value c of a row -> ``r * 100 + c`` (scaled to stay exact in float16)."""
    rows, per_row = shape[0], int(np.prod(shape[1:]))
    values = np.arange(rows)[:, None] * 100 + np.arange(per_row)[None, :]
    return (values.reshape(shape) / 8).astype(dtype)


def _noisy(shape: tuple[int, ...], dtype: np.dtype, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, shape).astype(dtype)


def _run(cuda, fn, *arrays, **kwargs):
    """Call `fn` on device copies of `arrays` (None passes through); the arrays' values afterwards."""
    device = [None if a is None else cuda.to_device(a) for a in arrays]
    fn(*device, **kwargs)
    return [None if d is None else d.copy_to_host() for d in device]


def _int8_pool(cells: int, heads: int, dim: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((cells, heads, dim), 7, I8), np.full((cells, heads * dim // group), 0.5, F16)


def test_simulator_arrays_and_dispatch(cuda) -> None:
    """The public wrappers dispatch on ``__cuda_array_interface__``: tested where simulator arrays have it."""
    from kvarray import ops

    pool = cuda.to_device(np.zeros((4, 1, 2), F32))
    if not hasattr(pool, "__cuda_array_interface__"):
        pytest.skip(
            "simulator arrays have no __cuda_array_interface__: kvarray.ops would run them on the CPU"
        )
    assert ops.backend_for(pool).__name__ == "kvarray.ops.cuda"


def _assert_scatter_matches_reference(cuda, kernels, pool, rows, cells) -> None:
    expected = pool.copy()
    reference.scatter_rows(expected, rows, cells)
    (got, *_) = _run(cuda, kernels.scatter_rows, pool, rows, cells)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize(("pool_dtype", "rows_dtype"), [(F16, F16), (F32, F32), (F16, F32), (F32, F16)])
def test_scatter_rows_float(cuda, kernels, pool_dtype, rows_dtype, index) -> None:
    pool = np.full((8, 2, 6), -1, pool_dtype)
    rows = _noisy((3, 2, 6), rows_dtype, 1)
    _assert_scatter_matches_reference(cuda, kernels, pool, rows, np.array([5, 0, 7], index))


def test_scatter_rows_odd_row_bytes_and_one_row(cuda, kernels) -> None:
    """A float16 row of 3 values is 6 bytes: copied as uint16 words."""
    pool = np.zeros((4, 1, 3), F16)
    rows = _coords((1, 1, 3), F16)
    _assert_scatter_matches_reference(cuda, kernels, pool, rows, np.array([2], np.int64))


def test_scatter_rows_skips_out_of_range_cells(cuda, kernels) -> None:
    """Device indices are not validated on the host: a kernel skips cells outside ``[0, N)``."""
    pool = np.zeros((4, 1, 4), F32)
    rows = _coords((3, 1, 4), F32)
    cells = np.array([1, 4, -3], np.int64)
    (got, *_) = _run(cuda, kernels.scatter_rows, pool, rows, cells)
    expected = np.zeros_like(pool)
    expected[1] = rows[0]
    np.testing.assert_array_equal(got, expected)


def test_empty_inputs_do_nothing(cuda, kernels) -> None:
    pool = _coords((4, 1, 4), F32)
    none = np.zeros(0, np.int64)
    got, *_ = _run(cuda, kernels.scatter_rows, pool, np.zeros((0, 1, 4), F32), none)
    np.testing.assert_array_equal(got, pool)
    got, *_ = _run(cuda, kernels.move_rows, [cuda.to_device(pool)], none, none, none)
    got, *_ = _run(cuda, kernels.rope_shift, pool, none, none, RopeSpec())
    np.testing.assert_array_equal(got, pool)
    out = np.ones((0, 1, 3, 4), F32)
    _run(cuda, kernels.gather_rows, pool, np.zeros(1, np.int64), none, out)


@pytest.mark.parametrize("rows_dtype", [F16, F32])
@pytest.mark.parametrize(("heads", "dim", "group"), [(2, 64, 32), (2, 80, 32), (1, 80, 16)])
def test_scatter_rows_int8(cuda, kernels, rows_dtype, heads, dim, group) -> None:
    pool, scales = _int8_pool(6, heads, dim, group)
    rows = _noisy((3, heads, dim), rows_dtype, 2)
    rows[1, 0, :group] = 0  # an all-zero group: scale 0, q 0
    cells = np.array([4, 1, 5], np.int32)
    want_pool, want_scales = pool.copy(), scales.copy()
    reference.scatter_rows(want_pool, rows, cells, want_scales)
    got_pool, _, _, got_scales = _run(cuda, kernels.scatter_rows, pool, rows, cells, scales)
    np.testing.assert_array_equal(got_scales, want_scales)
    np.testing.assert_array_equal(got_pool, want_pool)


def _special_groups(dtype: np.dtype) -> np.ndarray:
    """Four rows of 32 values (groups of 16): ties at half a step, tiny, zero, saturating and mixed groups."""
    x = np.zeros((4, 32), np.float32)
    x[0, :16] = np.arange(16) - 7.5  # absmax 8 -> scale float16(8 / 127); many values near ties
    x[0, 16:] = 2.0**-20 * np.arange(1, 17)  # tiny: scale rounds to a float16 subnormal
    x[1, :16] = 1e-9  # nonzero, scale rounds to 0: floored to 2**-24
    x[2, :16] = 60000.0 * np.linspace(-1, 1, 16)  # scale 472.4...
    x[2, 16:] = np.float32(1e7) if dtype == F32 else 65504.0  # float32 only: scale overflows float16 -> 65504
    x[3] = np.linspace(-3.3, 3.3, 32)
    x[3, 5] = 127 * 0.5  # exactly representable absmax
    return x.astype(dtype)


def _assert_quantize_matches_reference(cuda, kernels, x: np.ndarray, groups: int) -> None:
    """`kernels.quantize_int8` of ``x [R, ...]`` in `groups` groups a row: the reference's q and scales."""
    q, scales = np.zeros(x.shape, I8), np.zeros((x.shape[0], groups), F16)
    want_q, want_s = q.copy(), scales.copy()
    reference.quantize_int8(x, want_q, want_s)
    _, got_q, got_s = _run(cuda, kernels.quantize_int8, x, q, scales)
    np.testing.assert_array_equal(got_s, want_s)
    np.testing.assert_array_equal(got_q, want_q)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the saturating group
@pytest.mark.parametrize("dtype", [F16, F32])
def test_quantize_int8_matches_reference_bit_for_bit(cuda, kernels, dtype) -> None:
    _assert_quantize_matches_reference(cuda, kernels, _special_groups(dtype), groups=2)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_quantize_int8_noisy_rows_of_heads(cuda, kernels, dtype) -> None:
    _assert_quantize_matches_reference(cuda, kernels, _noisy((3, 2, 16), dtype, 3), groups=4)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_dequantize_int8(cuda, kernels, dtype) -> None:
    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, (3, 2, 16), dtype=np.int8)
    scales = rng.uniform(0, 500, (3, 2)).astype(F16)  # 127 * 500 stays finite in float16
    scales[0, 0] = 0
    out = np.full(q.shape, np.nan, dtype)
    want = out.copy()
    reference.dequantize_int8(q, scales, want)
    *_, got = _run(cuda, kernels.dequantize_int8, q, scales, out)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gather_rows_float(cuda, kernels, dtype, index) -> None:
    pool = _coords((6, 2, 4), dtype)
    indptr = np.array([0, 3, 3, 4], index)  # lengths 3, 0, 1
    indices = np.array([5, 0, 2, 4], index)
    out = np.full((3, 2, 3, 4), -1, dtype)
    want = out.copy()
    reference.gather_rows(pool, indptr, indices, want)
    *_, got = _run(cuda, kernels.gather_rows, pool, indptr, indices, out)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[0, 1, 0], pool[5, 1])  # out[s, h, j] = pool[cells[j], h]


@pytest.mark.parametrize("out_dtype", [F16, F32])
@pytest.mark.parametrize(("dim", "group"), [(64, 32), (80, 16)])
def test_gather_rows_int8(cuda, kernels, out_dtype, dim, group) -> None:
    pool = np.random.default_rng(5).integers(-127, 128, (4, 1, dim), dtype=np.int8)
    scales = np.random.default_rng(6).uniform(0, 2, (4, dim // group)).astype(F16)
    indptr = np.array([0, 2, 3], np.int64)
    indices = np.array([3, 1, 0], np.int64)
    out = np.full((2, 1, 2, dim), -1, out_dtype)
    want = out.copy()
    reference.gather_rows(pool, indptr, indices, want, scales)
    got = _run(cuda, kernels.gather_rows, pool, indptr, indices, out, scales)[3]
    np.testing.assert_array_equal(got, want)


def _pools(rows: int) -> list[np.ndarray]:
    """One pool of each layout a cache moves: float16 keys, float32 values, int8 rows and float16 scales."""
    return [
        _coords((rows, 2, 4), F16),  # 16 bytes a row: uint32 words
        _coords((rows, 3), F32),
        (np.arange(rows * 6) % 251 - 125).astype(I8).reshape(rows, 6),  # 6 bytes: uint16 words
        _coords((rows, 1), F16),  # 2 bytes: uint16
        (np.arange(rows * 3) % 100).astype(I8).reshape(rows, 3),  # 3 bytes: uint8
    ]


@pytest.mark.parametrize(
    ("src", "dst", "length"),
    [
        ([6], [0], [3]),  # disjoint: one direct launch per pool
        ([0, 5], [2, 7], [3, 2]),  # overlapping: staged through scratch
        ([0, 3], [3, 0], [3, 3]),  # a swap
        ([1, 4], [0, 9], [4, 0]),  # compaction by one row; a run of length 0
        ([2], [2], [3]),  # rows moved onto themselves
    ],
)
def test_move_rows(cuda, kernels, src, dst, length) -> None:
    src, dst, length = (np.array(a, np.int64) for a in (src, dst, length))
    pools = _pools(10)
    want = [p.copy() for p in pools]
    reference.move_rows(want, src, dst, length)
    device = [cuda.to_device(p) for p in pools]
    kernels.move_rows(
        device, cuda.to_device(src), cuda.to_device(dst), cuda.to_device(length.astype(np.int32))
    )
    for got, expected in zip(device, want, strict=True):
        np.testing.assert_array_equal(got.copy_to_host(), expected)


ROPES = [
    RopeSpec(),
    RopeSpec(theta=500000.0, style=RopeStyle.GPTJ),
    RopeSpec(rotary_dim=4, scaling=Llama3Scaling(factor=8.0, original_max_position_embeddings=16)),
]


@pytest.mark.parametrize("rope", ROPES, ids=["neox", "gptj", "partial-llama3"])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_rope_shift_float(cuda, kernels, dtype, rope) -> None:
    pool = _noisy((5, 2, 8), dtype, 7)
    cells = np.array([4, 1], np.int64)
    deltas = np.array([-3, 1000], np.int32)
    want = pool.copy()
    reference.rope_shift(want, cells, deltas, rope)
    (got, *_) = _run(cuda, kernels.rope_shift, pool, cells, deltas, rope=rope)
    tol = 1e-3 if dtype == F16 else 1e-6  # float64 libdevice sin/cos vs NumPy's: last-bit differences
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)
    np.testing.assert_array_equal(got[[0, 2, 3]], pool[[0, 2, 3]])


@pytest.mark.parametrize(
    ("dim", "rope"), [(64, RopeSpec()), (80, RopeSpec(rotary_dim=32, style=RopeStyle.GPTJ))]
)
def test_rope_shift_int8(cuda, kernels, dim, rope) -> None:
    group = 16
    pool, scales = np.zeros((3, 1, dim), I8), np.zeros((3, dim // group), F16)
    reference.quantize_int8(_noisy((3, 1, dim), F32, 8), pool, scales)
    cells = np.array([2, 0], np.int64)
    deltas = np.array([5, -2], np.int64)
    want_pool, want_scales = pool.copy(), scales.copy()
    reference.rope_shift(want_pool, cells, deltas, rope, want_scales)
    device_scales = cuda.to_device(scales)
    got_pool, *_ = _run(cuda, kernels.rope_shift, pool, cells, deltas, rope=rope, scales=device_scales)
    got_scales = device_scales.copy_to_host()
    # float64 sin/cos may differ in the last bit: a value on a rounding tie may land one step away
    np.testing.assert_allclose(got_scales.astype(np.float32), want_scales.astype(np.float32), rtol=1e-3)
    assert np.abs(got_pool.astype(int) - want_pool.astype(int)).max() <= 1
    np.testing.assert_array_equal(got_pool[1], pool[1])

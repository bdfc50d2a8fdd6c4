"""The CuPy backend: the public kernels on CuPy arrays (``gpu``: skipped, with the reason, without a device),
and the backend selection, device checks and DLPack round trips of `kvarray.xp`, which run everywhere."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from kvarray import ops, xp
from kvarray.errors import BackendUnavailable, DeviceMismatch
from kvarray.ops import reference
from kvarray.spec import RopeSpec, RopeStyle

F16, F32, I8 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int8)


# ---------------------------------------------------------------------------------------------------------
# The public kernels on CuPy arrays against the NumPy reference (need a CUDA device).
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def cp():
    return xp.require_cupy()


def _noisy(shape: tuple[int, ...], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, shape).astype(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize(("pool_dtype", "rows_dtype"), [(F16, F16), (F32, F32), (F16, F32), (F32, F16)])
def test_scatter_rows_on_cupy(cp, pool_dtype, rows_dtype, index) -> None:
    pool, rows = np.zeros((64, 4, 80), pool_dtype), _noisy((9, 4, 80), rows_dtype)
    cells = np.random.default_rng(1).permutation(64)[:9].astype(index)
    want = pool.copy()
    reference.scatter_rows(want, rows, cells)
    got = cp.asarray(pool)
    ops.scatter_rows(got, cp.asarray(rows), cp.asarray(cells))
    np.testing.assert_array_equal(got.get(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("rows_dtype", [F16, F32])
@pytest.mark.parametrize(("dim", "group"), [(64, 32), (80, 16), (128, 128)])
def test_scatter_rows_int8_on_cupy(cp, rows_dtype, dim, group) -> None:
    pool, scales = np.zeros((64, 4, dim), I8), np.zeros((64, 4 * dim // group), F16)
    rows, cells = _noisy((17, 4, dim), rows_dtype), np.arange(40, 57, dtype=np.int64)
    want_pool, want_scales = pool.copy(), scales.copy()
    reference.scatter_rows(want_pool, rows, cells, want_scales)
    got_pool, got_scales = cp.asarray(pool), cp.asarray(scales)
    ops.scatter_rows(got_pool, cp.asarray(rows), cp.asarray(cells), got_scales)
    np.testing.assert_array_equal(got_scales.get(), want_scales)
    np.testing.assert_array_equal(got_pool.get(), want_pool)


@pytest.mark.gpu
@pytest.mark.parametrize(("pool_dtype", "out_dtype"), [(F16, F16), (F32, F32), (I8, F16), (I8, F32)])
def test_gather_rows_on_cupy(cp, pool_dtype, out_dtype) -> None:
    rng = np.random.default_rng(2)
    pool = rng.integers(-127, 128, (50, 2, 64)).astype(pool_dtype)
    scales = rng.uniform(0, 1, (50, 4)).astype(F16) if pool_dtype == I8 else None
    indptr = np.array([0, 7, 7, 30], np.int32)
    indices = rng.permutation(50)[:30].astype(np.int32)
    out = np.full((3, 2, 24, 64), -1, out_dtype)
    want = out.copy()
    reference.gather_rows(pool, indptr, indices, want, scales)
    got = cp.asarray(out)
    device_scales = None if scales is None else cp.asarray(scales)
    ops.gather_rows(cp.asarray(pool), cp.asarray(indptr), cp.asarray(indices), got, device_scales)
    np.testing.assert_array_equal(got.get(), want)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("src", "dst", "length"), [([40], [0], [20]), ([5, 30], [0, 20], [20, 10]), ([0], [0], [8])]
)
def test_move_rows_on_cupy(cp, src, dst, length) -> None:
    pools = [_noisy((64, 2, 8), F16), _noisy((64, 8), F32), np.arange(64 * 3, dtype=I8).reshape(64, 3)]
    src, dst, length = (np.array(a, np.int64) for a in (src, dst, length))
    want = [p.copy() for p in pools]
    reference.move_rows(want, src, dst, length)
    got = [cp.asarray(p) for p in pools]
    ops.move_rows(got, cp.asarray(src), cp.asarray(dst), cp.asarray(length))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.get(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
def test_quantize_dequantize_on_cupy(cp, dtype) -> None:
    x = _noisy((33, 4, 64), dtype, 3)
    q, scales, out = np.zeros(x.shape, I8), np.zeros((33, 8), F16), np.zeros(x.shape, dtype)
    reference.quantize_int8(x, q, scales)
    reference.dequantize_int8(q, scales, out)
    got_q, got_s, got_out = cp.zeros(x.shape, I8), cp.zeros((33, 8), F16), cp.zeros(x.shape, dtype)
    ops.quantize_int8(cp.asarray(x), got_q, got_s)
    ops.dequantize_int8(got_q, got_s, got_out)
    np.testing.assert_array_equal(got_s.get(), scales)
    np.testing.assert_array_equal(got_q.get(), q)
    np.testing.assert_array_equal(got_out.get(), out)


@pytest.mark.gpu
@pytest.mark.parametrize("style", [RopeStyle.NEOX, RopeStyle.GPTJ])
@pytest.mark.parametrize("dtype", [F16, F32, I8])
def test_rope_shift_on_cupy(cp, dtype, style) -> None:
    rope = RopeSpec(style=style)
    cells, deltas = np.array([3, 9, 0], np.int64), np.array([-4, 7, 100000], np.int64)
    if dtype == I8:
        pool, scales = np.zeros((12, 2, 64), I8), np.zeros((12, 4), F16)
        reference.quantize_int8(_noisy((12, 2, 64), F32, 4), pool, scales)
    else:
        pool, scales = _noisy((12, 2, 64), dtype, 4), None
    want, want_scales = pool.copy(), None if scales is None else scales.copy()
    reference.rope_shift(want, cells, deltas, rope, want_scales)
    got, got_scales = cp.asarray(pool), None if scales is None else cp.asarray(scales)
    ops.rope_shift(got, cp.asarray(cells), cp.asarray(deltas), rope, got_scales)
    if dtype == I8:  # libdevice sin/cos vs NumPy's: a value on a rounding tie may land one step away
        assert np.abs(got.get().astype(int) - want.astype(int)).max() <= 1
    else:
        tol = 1e-3 if dtype == F16 else 1e-6
        np.testing.assert_allclose(got.get().astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# Backend selection and device checks (run everywhere).
# ---------------------------------------------------------------------------------------------------------


class FakeDeviceArray:
    """The smallest object `kvarray.xp` takes for a CUDA array: one with ``__cuda_array_interface__``."""

    shape = (4,)
    dtype = np.dtype(np.float32)
    ndim = 1
    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}


@pytest.fixture
def no_cupy(monkeypatch: pytest.MonkeyPatch):
    """Make CuPy unimportable for the test and re-probe (`kvarray.xp` memoizes its CuPy probe)."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    xp._cupy_status.cache_clear()
    yield
    xp._cupy_status.cache_clear()


@pytest.fixture
def fresh_probe():
    """Re-run the real CuPy probe before and after the test."""
    xp._cupy_status.cache_clear()
    yield
    xp._cupy_status.cache_clear()


def test_backend_cupy_without_cupy_names_the_reason(no_cupy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(xp.BACKEND_ENV, "cupy")
    with pytest.raises(BackendUnavailable, match="cupy backend was requested.*CuPy is not importable"):
        xp.default_namespace()
    with pytest.raises(BackendUnavailable, match="CuPy is not importable"):
        xp.require_cupy()
    assert "install kvarray[gpu]" in xp.cupy_unavailable_reason()


def test_no_backend_chosen_without_cupy_is_numpy(no_cupy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(xp.BACKEND_ENV, raising=False)
    assert xp.default_namespace() is np


def test_backend_cupy_without_a_device_names_the_reason(fresh_probe, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real probe: where CuPy imports but sees no device (this project's machines)."""
    reason = xp.cupy_unavailable_reason()
    if not reason:
        pytest.skip("a CUDA device is usable here, so selecting cupy succeeds")
    monkeypatch.setenv(xp.BACKEND_ENV, "cupy")
    with pytest.raises(BackendUnavailable) as info:
        xp.default_namespace()
    assert reason in str(info.value)
    with pytest.raises(BackendUnavailable) as info:
        xp.require_cupy()
    assert reason in str(info.value)


@pytest.mark.parametrize("value", ["numpy", " NumPy "])
def test_backend_numpy(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(xp.BACKEND_ENV, value)
    assert xp.default_namespace() is np


def test_unknown_backend_raises() -> None:
    with pytest.raises(BackendUnavailable, match="unknown array backend 'nonsense'.*numpy, cupy"):
        xp.get_namespace("nonsense")
    assert xp.get_namespace("numpy") is np


def test_mixed_host_and_device_arrays_raise() -> None:
    host, device = np.zeros(4, np.float32), FakeDeviceArray()
    assert xp.is_device_array(device) and not xp.is_device_array(host)
    with pytest.raises(DeviceMismatch):
        xp.array_namespace(host, device)
    with pytest.raises(DeviceMismatch):
        ops.backend_for(host, device)
    assert xp.array_namespace(host, None) is np
    assert ops.backend_for(host).__name__ != "kvarray.ops.cuda"


def test_device_arrays_dispatch_to_cuda() -> None:
    """Anything with ``__cuda_array_interface__`` goes to `kvarray.ops.cuda` (imported without a device)."""
    assert ops.backend_for(FakeDeviceArray(), FakeDeviceArray()).__name__ == "kvarray.ops.cuda"


def test_numpy_round_trips() -> None:
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert xp.to_numpy(x) is x
    assert xp.from_dlpack(x) is x
    view = xp.from_dlpack(x[1:], np)
    np.testing.assert_array_equal(view, x[1:])
    assert np.shares_memory(view, x)
    np.testing.assert_array_equal(xp.to_numpy(memoryview(x.tobytes())), np.frombuffer(x.tobytes(), np.uint8))


def test_torch_round_trips() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install kvarray[reference])")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = xp.from_dlpack(t)
    assert isinstance(a, np.ndarray) and np.shares_memory(a, t.numpy())
    np.testing.assert_array_equal(xp.to_numpy(t), t.numpy())
    graded = torch.ones(3, requires_grad=True)
    np.testing.assert_array_equal(xp.to_numpy(graded), np.ones(3, np.float32))
    back = torch.from_dlpack(xp.from_dlpack(t))
    assert torch.equal(back, t)

"""Each CPU kernel has a serial twin for small calls: both variants agree with the reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from kvarray.ops import cpu, reference
from kvarray.spec import RopeSpec, RopeStyle


@pytest.fixture(params=["serial", "parallel"])
def variant(request, monkeypatch):
    """Force every call below (serial) or above (parallel) the size at which kernels go parallel."""
    monkeypatch.setattr(cpu, "PARALLEL_BYTES", 1 << 62 if request.param == "serial" else 0)
    return request.param


def _pool(rng, n=48, heads=2, dim=64, dtype=np.float16):
    return (rng.standard_normal((n, heads, dim)) * 3).astype(dtype)


def _run_both(fn, *arrays):
    """Run ``fn(module, *copies)`` for the reference and the cpu module; return both copies."""
    ref = [a.copy() for a in arrays]
    ours = [a.copy() for a in arrays]
    fn(reference, *ref)
    fn(cpu, *ours)
    return ref, ours


def _assert_same(ref, ours):
    for r, o in zip(ref, ours, strict=True):
        np.testing.assert_array_equal(r.view(np.uint8), o.view(np.uint8))


def test_scatter_float_and_int8(variant):
    rng = np.random.default_rng(1)
    pool, rows = _pool(rng), _pool(rng, n=20)
    cells = rng.permutation(48)[:20].astype(np.int32)
    _assert_same(*_run_both(lambda m, p: m.scatter_rows(p, rows, cells), pool))
    _assert_same(*_run_both(lambda m, p: m.scatter_rows(p, rows.astype(np.float32), cells), pool))
    q = np.zeros((48, 2, 64), np.int8)
    scales = np.zeros((48, 4), np.float16)
    _assert_same(*_run_both(lambda m, qq, ss: m.scatter_rows(qq, rows, cells, ss), q, scales))


def test_gather_float_and_int8(variant):
    rng = np.random.default_rng(2)
    pool = _pool(rng)
    indptr = np.array([0, 5, 5, 17], np.int64)
    indices = rng.permutation(48)[:17].astype(np.int64)
    out = np.full((3, 2, 12, 64), 7, np.float16)
    _assert_same(*_run_both(lambda m, o: m.gather_rows(pool, indptr, indices, o), out))
    q = rng.integers(-127, 128, (48, 2, 64)).astype(np.int8)
    scales = rng.random((48, 4)).astype(np.float16)
    _assert_same(*_run_both(lambda m, o: m.gather_rows(q, indptr, indices, o, scales), out))


def test_quantize_dequantize(variant):
    rng = np.random.default_rng(3)
    x = _pool(rng, n=9).astype(np.float32)
    q, scales = np.zeros(x.shape, np.int8), np.zeros((9, 4), np.float16)
    _assert_same(*_run_both(lambda m, qq, ss: m.quantize_int8(x, qq, ss), q, scales))
    reference.quantize_int8(x, q, scales)
    out = np.zeros(x.shape, np.float32)
    _assert_same(*_run_both(lambda m, o: m.dequantize_int8(q, scales, o), out))


@pytest.mark.parametrize(
    ("src", "dst", "length"),
    [
        ([10, 30], [0, 12], [5, 6]),  # no source row is a destination row
        ([4, 20], [0, 6], [8, 9]),  # downward compaction with overlap
        ([0, 10], [3, 20], [8, 4]),  # upward overlap: staged
    ],
)
def test_move_rows(variant, src, dst, length):
    rng = np.random.default_rng(4)
    keys, values = _pool(rng), _pool(rng, dtype=np.float32)
    scales = rng.random((48, 4)).astype(np.float16)
    plan = [np.array(a, np.int64) for a in (src, dst, length)]
    _assert_same(*_run_both(lambda m, k, v, s: m.move_rows([k, v, s], *plan), keys, values, scales))


@pytest.mark.parametrize("style", list(RopeStyle))
def test_rope_shift(variant, style):
    rng = np.random.default_rng(5)
    pool = _pool(rng, dtype=np.float32)
    cells = np.array([3, 7, 40], np.int64)
    deltas = np.array([-5, 9, 9], np.int64)
    rope = RopeSpec(theta=10000.0, style=style)
    _assert_same(*_run_both(lambda m, p: m.rope_shift(p, cells, deltas, rope), pool))


class _Kernel:
    """A stand-in for a `_parallel` dispatcher: records which twin ran and Numba's thread count then."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.serial = lambda: self.calls.append(("serial", cpu.numba.get_num_threads()))

    def __call__(self) -> None:
        self.calls.append(("parallel", cpu.numba.get_num_threads()))


@pytest.mark.parametrize(
    "limit, expected",
    [(0, ("parallel", 4)), (1, ("serial", 4)), (2, ("parallel", 2)), (8, ("parallel", 4))],
    ids=["no-limit", "serial", "fewer-threads", "above-numba"],
)
def test_thread_limit_applies_where_a_kernel_runs_in_parallel(monkeypatch, limit, expected):
    """`swap_thread_limit`: 1 runs the serial twin, a limit below Numba's count lowers it for the call
    alone, 0 and larger limits leave it; small calls are serial whatever the limit."""
    threads = [4]  # Numba's thread count, faked: this machine may have fewer cores than the case needs
    monkeypatch.setattr(cpu.numba, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(cpu.numba, "set_num_threads", lambda n: threads.__setitem__(0, n))
    kernel = _Kernel()
    before = cpu.swap_thread_limit(limit)
    try:
        cpu._launch(kernel, cpu.PARALLEL_BYTES)
        cpu._launch(kernel, cpu.PARALLEL_BYTES - 1)
    finally:
        assert cpu.swap_thread_limit(before) == limit
    assert kernel.calls == [expected, ("serial", 4)]
    assert threads == [4]  # restored


def test_thread_limit_is_per_thread():
    import threading

    seen = []
    before = cpu.swap_thread_limit(1)
    try:
        worker = threading.Thread(target=lambda: seen.append(cpu.swap_thread_limit(0)))
        worker.start()
        worker.join()
    finally:
        cpu.swap_thread_limit(before)
    assert seen == [0]  # another thread's limit: none set there

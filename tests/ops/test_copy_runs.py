"""`ops.cpu.copy_runs` and its kernel `ops.cpu_copy.copy_pieces`, against a NumPy loop, bit for bit.

Row values encode coordinates (``100 * row + element``, or random bit patterns where NaN payloads matter),
destinations start filled with a sentinel so a row written twice, in the wrong place or not at all shows.
Small calls run on the calling thread with memmove; ``stream`` forces what large calls do (the helper thread
and non-temporal stores) on small arrays, so the unaligned heads and tails are exercised quickly.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvarray.errors import DTypeMismatch, IndexOutOfRange, LayoutError, ShapeMismatch
from kvarray.ops import cpu
from kvarray.ops.cpu_copy import FINISHED, PIECE_BYTES, TAKEN, copy_pieces, pieces_finished

SENTINEL = 0x5A


def reference(src: np.ndarray, dst: np.ndarray, src_start, dst_start, counts) -> np.ndarray:
    """`dst` after the runs, by a NumPy loop (a copy; `dst` is not written)."""
    out = dst.copy()
    for s, d, n in zip(src_start, dst_start, counts, strict=True):
        out[d : d + n] = src[s : s + n]
    return out


def coords(rows: int, row_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """``[rows, *row_shape]`` with value ``100 * row + element`` (wrapped to the dtype)."""
    size = int(np.prod(row_shape, dtype=np.int64))
    values = 100 * np.arange(rows)[:, None] + np.arange(size)[None, :]
    return values.astype(np.int64).astype(dtype).reshape(rows, *row_shape)


def filled(rows: int, row_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A destination whose every byte is `SENTINEL`."""
    out = np.empty((rows, *row_shape), dtype)
    out.view(np.uint8).reshape(-1)[:] = SENTINEL
    return out


@pytest.fixture(params=["default", "stream"])
def stream(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """"stream": every call helped and streamed, however small."""
    if request.param == "stream":
        monkeypatch.setattr(cpu, "PARALLEL_BYTES", 0)
        monkeypatch.setattr(cpu, "STREAM_BYTES", 0)
    return request.param == "stream"


def run(src, dst, src_start, dst_start, counts) -> None:
    idx = [np.asarray(a, np.int64) for a in (src_start, dst_start, counts)]
    expected = reference(src, dst, *idx)
    cpu.copy_runs(src, dst, *idx)
    assert dst.tobytes() == expected.tobytes()


# src rows, dst rows, row shape, dtype, (src_start, dst_start, counts)
CASES = [
    pytest.param(8, 8, (2, 64), "float16", ([6, 4, 2, 0], [0, 2, 4, 6], [2, 2, 2, 2]), id="reversed-pairs"),
    pytest.param(8, 5, (3, 5), "float16", ([7, 0], [0, 1], [1, 4]), id="odd-row-30B"),
    pytest.param(9, 9, (7,), "int8", ([1, 5], [6, 0], [3, 4]), id="int8-7B-gaps"),
    pytest.param(6, 6, (3,), "float32", ([2], [1], [4]), id="one-run"),
    pytest.param(4, 4, (2, 64), "float16", ([], [], []), id="no-runs"),
    pytest.param(4, 4, (2, 64), "float16", ([0, 3, 1], [3, 3, 0], [0, 0, 2]), id="empty-runs"),
    pytest.param(3, 3, (0,), "float32", ([0], [1], [2]), id="zero-byte-rows"),
]


@pytest.mark.parametrize(("n_src", "n_dst", "row_shape", "dtype", "runs"), CASES)
def test_copy_runs_matches_reference(n_src, n_dst, row_shape, dtype, runs, stream) -> None:
    src, dst = coords(n_src, row_shape, dtype), filled(n_dst, row_shape, dtype)
    run(src, dst, *runs)
    written = sum(runs[2])
    untouched = (dst.view(np.uint8).reshape(n_dst, -1) == SENTINEL).all(axis=1)
    if row_shape != (0,):
        assert int((~untouched).sum()) == written  # exactly the runs' rows were written


def test_nan_payloads_and_all_bit_patterns_copied_as_bits(stream) -> None:
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(512, 2, 64)  # every float16 pattern, NaNs included
    src, dst = bits.view(np.float16), filled(512, (2, 64), "float16")
    run(src, dst, [256, 0], [0, 256], [256, 256])


@pytest.mark.parametrize("offset", [0, 8, 16, 24])
def test_large_streamed_copy_from_unaligned_rows(offset: int) -> None:
    """Above `STREAM_BYTES` and `PARALLEL_BYTES` (helper, non-temporal stores), rows of 1000 bytes in a
    destination starting `offset` bytes past an allocation: pieces begin and end mid-line and mid-page."""
    rows, size = 12_000, 1000  # 12 MB, 46 pieces
    rng = np.random.default_rng(offset)
    src = rng.integers(0, 256, (rows, size), dtype=np.uint8)
    raw = np.full(rows * size + offset, SENTINEL, np.uint8)
    dst = raw[offset:].reshape(rows, size)
    counts = np.array([3000, 1, 4999, 4000], np.int64)
    src_start = np.array([9000, 8999, 0, 4999], np.int64)
    dst_start = np.cumsum(counts) - counts
    assert counts.sum() * size >= max(cpu.STREAM_BYTES, cpu.PARALLEL_BYTES, 4 * PIECE_BYTES)
    for _ in range(3):  # the helper serves several calls (and finds late work lists empty)
        dst[:] = SENTINEL
        run(src, dst, src_start, dst_start, counts)
    assert (raw[:offset] == SENTINEL).all()


def _work_list(n_pieces: int, piece: int, stream: bool):
    """A work list of `n_pieces` pieces of `piece` bytes, reversed order, and its source and destination."""
    src = np.arange(n_pieces * piece, dtype=np.int64).astype(np.uint8)
    dst = np.full(n_pieces * piece, SENTINEL, np.uint8)
    dst_at = np.arange(n_pieces, dtype=np.int64) * piece
    src_at = dst_at[::-1].copy()
    size = np.full(n_pieces, piece, np.int64)
    counters = np.zeros(2, np.int64)
    args = (counters, np.uint64(dst.ctypes.data), dst.nbytes, np.uint64(src.ctypes.data), src.nbytes,
            dst_at, src_at, size, stream)
    expected = src.reshape(n_pieces, piece)[::-1].reshape(-1)
    return args, src, dst, expected


@pytest.mark.parametrize("stream", [False, True], ids=["memmove", "stream"])
def test_threads_share_one_work_list(stream: bool) -> None:
    """Four threads run `copy_pieces` on one list at once: every piece is copied once, the counters say so."""
    args, _src, dst, expected = _work_list(64, 4096 + 72, stream)
    threads = [threading.Thread(target=copy_pieces, args=args) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pieces_finished(args[0]) == 64 and args[0][FINISHED] == 64
    assert args[0][TAKEN] == 64 + 4  # each thread took one past the end, then stopped
    assert dst.tobytes() == expected.tobytes()


def test_late_thread_finds_the_list_empty() -> None:
    args, _src, dst, expected = _work_list(5, 300, False)
    copy_pieces(*args)
    assert dst.tobytes() == expected.tobytes()
    dst[:] = 0  # what the caller does next with its buffer
    copy_pieces(*args)  # a helper arriving late
    assert args[0][FINISHED] == 5 and not dst.any()


def test_pieces_outside_the_buffers_are_skipped_and_counted() -> None:
    args, src, dst, _ = _work_list(3, 100, False)
    dst_at = args[5].copy()
    dst_at[1] = dst.nbytes - 50  # reaches 50 bytes past the destination
    args = (*args[:5], dst_at, *args[6:])
    copy_pieces(*args)
    assert args[0][FINISHED] == 3
    assert dst[100:200].tobytes() == bytes([SENTINEL]) * 100  # piece 1 was not written anywhere
    assert dst[:100].tobytes() == src[200:300].tobytes() and dst[200:300].tobytes() == src[:100].tobytes()


@st.composite
def plans(draw):
    """Rows, a row shape, a dtype and runs: destination runs are consecutive segments of a shuffled,
    gapped cover of the destination (disjoint by construction), sources anywhere in `src`."""
    dtype = draw(st.sampled_from(["int8", "float16", "float32", "float64"]))
    row_shape = draw(st.sampled_from([(1,), (3,), (2, 5), (4, 16), (17,)]))
    lengths = draw(st.lists(st.integers(0, 9), min_size=0, max_size=8))
    gaps = draw(st.lists(st.integers(0, 3), min_size=len(lengths), max_size=len(lengths)))
    n_src = draw(st.integers(max(lengths, default=0), 40)) or 1
    starts, at = [], 0
    for n, gap in zip(lengths, gaps, strict=True):
        at += gap
        starts.append(at)
        at += n
    order = draw(st.permutations(range(len(lengths))))
    src_start = [draw(st.integers(0, n_src - lengths[i])) for i in order]
    runs = (src_start, [starts[i] for i in order], [lengths[i] for i in order])
    return n_src, at + 2, row_shape, dtype, runs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans())
def test_random_plans_match_reference(plan, stream) -> None:
    n_src, n_dst, row_shape, dtype, runs = plan
    run(coords(n_src, row_shape, dtype), filled(n_dst, row_shape, dtype), *runs)


def _refused(exc: type[Exception], src, dst, src_start, dst_start, counts) -> None:
    before = dst.tobytes()
    idx = [np.asarray(a) for a in (src_start, dst_start, counts)]
    with pytest.raises(exc):
        cpu.copy_runs(src, dst, *idx)
    assert dst.tobytes() == before


def test_refusals_write_nothing() -> None:
    src, dst = coords(6, (4,), "float32"), filled(6, (4,), "float32")
    one = ([0], [0], [2])
    _refused(DTypeMismatch, src, filled(6, (4,), "int32"), *one)
    _refused(ShapeMismatch, src, filled(6, (5,), "float32"), *one)
    _refused(LayoutError, src[::2], dst, *one)  # not contiguous
    _refused(LayoutError, src, src[3:], *one)  # shares memory
    _refused(DTypeMismatch, src, dst, [0.0], [0], [2])  # float indices
    _refused(ShapeMismatch, src, dst, [0, 1], [0], [2])  # one entry per run
    _refused(IndexOutOfRange, src, dst, [5], [0], [2])  # source run past the end
    _refused(IndexOutOfRange, src, dst, [0], [-1], [2])
    _refused(IndexOutOfRange, src, dst, [0], [0], [-1])
    _refused(IndexOutOfRange, src, dst, [0, 2], [0, 1], [2, 2])  # destination runs overlap
    run(src, dst, [0, 2], [0, 2], [2, 0])  # an empty run touching another is no overlap

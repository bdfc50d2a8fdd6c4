"""Faults injected into the kernels halfway through `put`, `defrag`, `shift` (its copy-on-write and its
rotation) and the encoder cache's writes and staging: `defrag` and `shift` are all-or-nothing (the
bookkeeping is byte for byte as before and every sequence reads exactly the K/V it read before), a failed
`put` drops its pass's tokens (`abort_forward`) and leaves valid bookkeeping, a failed encoder write
releases what it allocated. The injected kernels write garbage into the rows they were given before
they fail, the worst a kernel can do."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hostile_helpers (no conftest here)

from hostile_helpers import (  # noqa: E402
    SPEC,
    InjectedFault,
    assert_same_views,
    bookkeeping,
    causal_cache,
    encdec_cache,
    encoder_cache,
    put_all,
    rows,
    snapshot,
    views,
)

from kvarray import ops  # noqa: E402
from kvarray.causal import CausalCache  # noqa: E402
from kvarray.cells import Cells  # noqa: E402
from kvarray.cellstate import expand_runs  # noqa: E402
from kvarray.errors import NoForwardPass, StalePlan  # noqa: E402
from kvarray.spec import RopeSpec  # noqa: E402

GARBAGE = 0x5A  # the byte a failing kernel leaves in the rows it touched


def scribble(arr: np.ndarray, rows_: np.ndarray) -> None:
    """Overwrite rows `rows_` of `arr` with garbage bytes."""
    arr.view(np.uint8).reshape(arr.shape[0], -1)[rows_] = GARBAGE


def fragmented(**options: Any) -> CausalCache:
    """Sequences 1 (cells 12-19, 28-29), 2 (20-27) and 3 (shares 20-21, owns 30-32) after sequence 0 (cells
    0-11) was removed: n_kv 64 for 21 used cells, and compaction moves live cells onto cells that are
    themselves sources of later moves (sequence 2 onto 12-17, sequence 3 onto 18-20)."""
    config: dict[str, Any] = {"capacity": 64, "max_sequences": 4, "kv_dtype": ("float16", "int8"),
                              "defrag_threshold": None, "xp": np}
    config.update(options)
    cache = CausalCache(SPEC, **config)
    for seq, count in ((0, 12), (1, 8), (2, 8)):
        put_all(cache, [seq] * count, list(range(count)))
    put_all(cache, [1, 1], [8, 9])
    cache.copy_prefix(2, 3, 2)
    put_all(cache, [3, 3, 3], [2, 3, 4])
    cache.remove(0)
    assert cache.stats().n_kv == 64 and cache.stats().cells_used == 21
    return cache


def live_destinations(cache: CausalCache) -> int:
    """How many destination rows of the next defrag hold live data (sources of other moves)."""
    plan = cache._cells.plan_defrag()
    targets = expand_runs(plan.dst, plan.length)
    return int(np.count_nonzero(cache._cells.refs[targets]))


# ---- defrag: all or nothing -------------------------------------------------------------------------
def move_fault(pools_done: int, garbage: bool) -> Callable[..., None]:
    """A `move_rows` that moves the first `pools_done` pools correctly, fills every destination row of
    the next pool with garbage (or, ``garbage=False``, moves all pools correctly), then fails."""
    real = ops.move_rows

    def move(pools: list[np.ndarray], src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> None:
        done = pools[:pools_done] if garbage else pools
        real(list(done), src, dst, length)
        if garbage and pools_done < len(pools):
            scribble(pools[pools_done], expand_runs(dst, length))
        raise InjectedFault("move_rows failed halfway")

    return move


DEFRAG_FAULTS = {
    "garbage in the first pool": (0, True),
    "three pools moved, garbage in the fourth": (3, True),
    "every pool moved, then a failure": (0, False),
}


@pytest.mark.parametrize("pools_done, garbage", DEFRAG_FAULTS.values(), ids=DEFRAG_FAULTS.keys())
def test_defrag_fault_in_the_move_changes_nothing(monkeypatch: pytest.MonkeyPatch, pools_done: int,
                                                  garbage: bool) -> None:
    cache = fragmented()
    assert live_destinations(cache) == 9  # the plan overwrites sources of later moves
    put_all(cache, [1], [10])
    plan, before, read = cache.plan, bookkeeping(cache), views(cache)
    monkeypatch.setattr(ops, "move_rows", move_fault(pools_done, garbage))
    with pytest.raises(InjectedFault):
        cache.defrag()
    assert bookkeeping(cache) == before
    assert_same_views(read, views(cache))
    assert plan.is_current() and cache.stats().defrags == 0
    cache._cells.check()
    monkeypatch.undo()
    moves = cache.defrag()
    assert moves.cells_moved == 22 and cache.stats().n_kv == 32
    assert_same_views(read, views(cache))


def test_defrag_fault_in_the_renumbering_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = fragmented()
    put_all(cache, [2], [8])
    plan, before, read = cache.plan, bookkeeping(cache), views(cache)
    real = Cells.apply_defrag

    def renumber_then_fail(cells: Cells, moves: Any) -> None:
        real(cells, moves)  # the bookkeeping is fully renumbered, then something fails
        raise InjectedFault("apply_defrag failed")

    monkeypatch.setattr(Cells, "apply_defrag", renumber_then_fail)
    with pytest.raises(InjectedFault):
        cache.defrag()
    assert bookkeeping(cache) == before
    assert_same_views(read, views(cache))
    assert plan.is_current()
    cache._cells.check()


def test_defrag_fault_inside_start_forward_refuses_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = fragmented(defrag_threshold=0.1)
    before, read = bookkeeping(cache), views(cache)
    monkeypatch.setattr(ops, "move_rows", move_fault(1, True))
    with pytest.raises(InjectedFault):
        cache.start_forward([1, 2], [10, 8])
    assert bookkeeping(cache) == before
    assert_same_views(read, views(cache))
    monkeypatch.undo()
    plan = cache.start_forward([1, 2], [10, 8])  # defragments, then plans
    assert cache.stats().defrags == 1 and plan.n_kv == 32


# ---- shift: all or nothing --------------------------------------------------------------------------
def rope_fault(fail_at: int) -> Callable[..., None]:
    """A `rope_shift` that rotates the first `fail_at` layers correctly, then scribbles over the cells of
    the next layer (keys and scales) and fails."""
    real = ops.rope_shift
    calls = []

    def rope(pool: np.ndarray, cells: np.ndarray, deltas: np.ndarray, spec: RopeSpec,
             scales: np.ndarray | None = None) -> None:
        calls.append(1)
        if len(calls) <= fail_at:
            real(pool, cells, deltas, spec, scales=scales)
            return
        scribble(pool, cells)
        if scales is not None:
            scribble(scales, cells)
        raise InjectedFault("rope_shift failed halfway")

    return rope


def copy_fault() -> Callable[..., None]:
    """A `move_rows` (the copy-on-write of shared cells) that scribbles over its destinations, then fails."""

    def move(pools: list[np.ndarray], src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> None:
        for pool in pools:
            scribble(pool, expand_runs(dst, length))
        raise InjectedFault("copy-on-write failed")

    return move


SHIFT_FAULTS = {
    "copy-on-write": ("move_rows", copy_fault),
    "rotation of layer 0": ("rope_shift", lambda: rope_fault(0)),
    "rotation of layer 1": ("rope_shift", lambda: rope_fault(1)),
}


@pytest.mark.parametrize("kv_dtype", [("float16", "int8"), ("int8", "float16")],
                         ids=["float16 keys", "int8 keys"])
@pytest.mark.parametrize("kernel, fault", SHIFT_FAULTS.values(), ids=SHIFT_FAULTS.keys())
def test_shift_fault_changes_nothing(monkeypatch: pytest.MonkeyPatch, kv_dtype: tuple[str, str], kernel: str,
                                     fault: Callable[[], Callable[..., None]]) -> None:
    cache = causal_cache(kv_dtype=kv_dtype)  # sequence 1 shares its first 3 cells with sequence 0
    plan, before, read = cache.plan, bookkeeping(cache), views(cache)
    monkeypatch.setattr(ops, kernel, fault())
    with pytest.raises(InjectedFault):
        cache.shift(1, 2, RopeSpec(), begin=0)
    assert bookkeeping(cache) == before
    assert_same_views(read, views(cache))
    assert plan.is_current()
    cache._cells.check()
    monkeypatch.undo()
    cache.shift(1, 2, RopeSpec(), begin=0)
    assert cache.cell_table(1)[1].tolist() == [2, 3, 4, 5, 6]
    after = views(cache)
    for seq in (0, 2):  # the other sequences read what they read before; sequence 0 shared the copies
        assert all(a.tobytes() == b.tobytes() for a, b in zip(read[seq], after[seq], strict=True))


# ---- put: the pass is dropped -----------------------------------------------------------------------
def writer_fault(cache: CausalCache, layer: int, rows_written: int) -> Callable[[], None]:
    """Make `layer`'s writer scribble over the key cells of its first `rows_written` tokens, then fail;
    returns what puts the real writer back."""
    key_pool, real = cache._pools[0][layer], cache._writers[layer]

    def write(keys: Any, values: Any, cells: np.ndarray) -> None:
        scribble(key_pool, np.asarray(cells)[:rows_written])
        raise InjectedFault("scatter failed halfway")

    cache._writers[layer] = write
    return lambda: cache._writers.__setitem__(layer, real)


@pytest.mark.parametrize("layer, rows_written", [(0, 0), (0, 2), (1, 1)],
                         ids=["layer 0 before any row", "layer 0 after both rows", "layer 1 after one row"])
def test_put_fault_drops_the_pass(layer: int, rows_written: int) -> None:
    cache = causal_cache()
    before, read = bookkeeping(cache), views(cache)
    plan = cache.start_forward([0, 2, 5], [6, 4, 0])  # two decode tokens, and a new sequence 5
    for done in range(layer):
        cache.put(done, rows(9, range(3), done), rows(9, range(3), done))
    writer_fault(cache, layer, rows_written)
    with pytest.raises(InjectedFault):
        cache.put(layer, rows(9, range(3), layer), rows(9, range(3), layer))
    assert bookkeeping(cache) == before  # no window: exactly the cells before start_forward
    assert_same_views(read, views(cache))
    assert not plan.is_current() and 5 not in cache.sequences()
    with pytest.raises(StalePlan):
        cache.get(0)
    assert cache.abort_forward() == 0  # already dropped
    cache._cells.check()


def test_put_fault_with_a_window_leaves_valid_bookkeeping() -> None:
    cache = causal_cache(window=4)
    plan = cache.start_forward([0, 0], [6, 7])  # ring writes over sequence 0's oldest cells
    repair = writer_fault(cache, 0, 1)
    with pytest.raises(InjectedFault):
        cache.put(0, rows(0, [6, 7]), rows(0, [6, 7]))
    repair()
    cache._cells.check()
    assert not plan.is_current() and cache.cell_table(0)[1].max() < 6
    put_all(cache, [0], [int(cache.cell_table(0)[1].max()) + 1])  # the sequence can go on (or be failed)


def test_abort_forward_drops_a_complete_pass() -> None:
    cache = causal_cache()
    before, read = bookkeeping(cache), views(cache)
    put_all(cache, [0, 2, 2, 5], [6, 4, 5, 0])
    assert cache.abort_forward() == 4
    assert bookkeeping(cache) == before
    assert_same_views(read, views(cache))
    assert cache.abort_forward() == 0
    put_all(cache, [0, 2, 2, 5], [6, 4, 5, 0])  # the same batch again
    cache.remove(0, 6)
    with pytest.raises(StalePlan):
        cache.abort_forward()
    with pytest.raises(NoForwardPass):
        CausalCache(SPEC, 8, 2, xp=np).abort_forward()


def test_put_refusal_is_not_a_fault() -> None:
    """A named error of put's checks is raised before anything is written: the pass stays."""
    cache = causal_cache()
    plan = cache.start_forward([0], [6])
    with pytest.raises(ValueError):
        cache.put(0, rows(0, [6, 7]), rows(0, [6, 7]))
    assert plan.is_current() and cache.length(0) == 7


def test_encdec_put_fault_drops_the_decoder_pass() -> None:
    cache = encdec_cache()
    before = bookkeeping(cache.causal)
    cache.start_forward([10, 11], [4, 4])
    repair = writer_fault(cache.causal, 0, 2)
    with pytest.raises(InjectedFault):
        cache.put(0, rows(1, range(2)), rows(1, range(2)))
    repair()
    assert bookkeeping(cache.causal) == before
    assert cache.abort_forward() == 0  # already dropped
    cache.get_cross(0)  # the cross plan is untouched
    put_all(cache, [10, 11], [4, 4])
    assert cache.abort_forward() == 2 and bookkeeping(cache.causal) == before


# ---- encoder cache ----------------------------------------------------------------------------------
def scatter_fault(fail_at: int) -> Callable[..., None]:
    """A `scatter_rows` that writes its first `fail_at` calls correctly, then scribbles and fails."""
    real = ops.scatter_rows
    calls = []

    def scatter(pool: np.ndarray, rows_: np.ndarray, cells: np.ndarray, scales: Any = None) -> None:
        calls.append(1)
        if len(calls) <= fail_at:
            real(pool, rows_, cells, scales=scales)
            return
        scribble(pool, cells)
        raise InjectedFault("scatter failed halfway")

    return scatter


def entries(cache: Any) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in cache.state_dict().items() if k.startswith("entries.")}


@pytest.mark.parametrize("fail_at", [0, 1], ids=["keys", "values"])
def test_encoder_put_fault_releases_new_entries(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    cache = encoder_cache(max_sequences=8)
    before, free = entries(cache), cache.stats().largest_free
    monkeypatch.setattr(ops, "scatter_rows", scatter_fault(fail_at))
    with pytest.raises(InjectedFault):
        cache.put_batch([13, 20, 21], 1, rows(1, range(9)), rows(1, range(9)), [4, 3, 2])
    assert entries(cache) == before and cache.stats().largest_free == free
    assert cache.entry(13).layers_written == (0,)
    monkeypatch.undo()
    cache.put_batch([13, 20, 21], 1, rows(1, range(9)), rows(1, range(9)), [4, 3, 2])
    assert cache.entry(20).start == 7 and cache.entry(13).layers_written == (0, 1)


def test_encoder_staging_fault_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cross view whose copy fails halfway is copied again by the next get, not reused half-written."""
    cache = encoder_cache()  # the current pass mixes a float16 and an int8 entry: the view is staged
    clean = [np.array(a, copy=True) for a in (cache.get(0).keys, cache.get(0).values)]
    cache = encoder_cache()

    def gather(pool: Any, indptr: Any, indices: Any, out: np.ndarray, scales: Any = None) -> None:
        out.view(np.uint8)[...] = GARBAGE
        raise InjectedFault("dequantize failed halfway")

    monkeypatch.setattr(ops, "gather_rows", gather)
    with pytest.raises(InjectedFault):
        cache.get(0)
    monkeypatch.undo()
    view = cache.get(0)
    assert view.keys.tobytes() == clean[0].tobytes() and view.values.tobytes() == clean[1].tobytes()


def test_failed_calls_leave_the_state_loadable() -> None:
    """After every kind of fault above, the state still round-trips through load_state_dict."""
    cache = fragmented()
    state = cache.state_dict()
    other = fragmented()
    other.load_state_dict(state)
    assert snapshot(other) == snapshot(cache)

"""Bookkeeping of kvarray.cells on tiny caches: exact cells, cell tables, free cells and defrag runs."""

# ruff: noqa: E501 - table rows and expected grids stay one per line

from __future__ import annotations

import numpy as np
import pytest

from kvarray.cells import FREE_CELL, Cells, group_batch
from kvarray.celltables import MIN_ROOM, CellTables, expand_runs
from kvarray.errors import (
    CacheFull,
    ConfigError,
    PositionError,
    SequenceExists,
    ShapeMismatch,
    TooManySequences,
    UnknownSequence,
)


def forward(cells: Cells, seqs: list[int], positions: list[int]) -> list[int]:
    """Run one batch through the bookkeeping; returns its slot mapping."""
    batch = group_batch(seqs, positions)
    return cells.commit_batch(batch, cells.plan_batch(batch)).tolist()


def tables(cells: Cells) -> dict[int, list[int]]:
    return {seq: table.tolist() for seq, table in cells.sequences()}


def positions_of(cells: Cells, seq: int) -> list[int]:
    return cells.positions[cells.table(seq)].tolist()


def snapshot(cells: Cells) -> dict[str, np.ndarray]:
    return cells.export()


def assert_same(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key


# ---- allocation ----------------------------------------------------------------------------------
def test_allocation_prefers_the_cells_after_a_sequences_last_cell() -> None:
    cells = Cells(capacity=8, max_sequences=4)
    steps = [
        # (seq_ids, positions, expected slot_mapping, expected tables)
        ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1], [0, 1, 2, 3, 4], {0: [0, 1, 2], 1: [3, 4]}),
        # seq 0's next cell (3) is taken: lowest free (6); seq 1 extends into 5, its own next cell
        ([0, 1], [3, 2], [6, 5], {0: [0, 1, 2, 6], 1: [3, 4, 5]}),
    ]
    for seqs, pos, slots, expected in steps:
        assert forward(cells, seqs, pos) == slots
        assert tables(cells) == expected
        cells.check()
    assert cells.remove(1) == 3
    assert tables(cells) == {0: [0, 1, 2, 6]}
    assert cells.positions.tolist() == [0, 1, 2, FREE_CELL, FREE_CELL, FREE_CELL, 3, FREE_CELL]
    # seq 0 extends into 7; the new seq 2 takes the lowest free cells 3, 4
    assert forward(cells, [0, 2, 2], [4, 0, 1]) == [7, 3, 4]
    assert tables(cells) == {0: [0, 1, 2, 6, 7], 2: [3, 4]}
    assert (cells.used, cells.free, cells.top, cells.n_kv) == (7, 1, 8, 8)
    cells.check()


def test_interleaved_batch_groups_tokens_by_sequence_in_order_of_first_appearance() -> None:
    cells = Cells(capacity=64, max_sequences=4)
    batch = group_batch([7, 3, 7, 3, 9], [0, 5, 1, 6, 2])
    assert batch.sequences.tolist() == [7, 3, 9]
    assert batch.token_seq.tolist() == [0, 1, 0, 1, 2]
    assert cells.commit_batch(batch, cells.plan_batch(batch)).tolist() == [0, 2, 1, 3, 4]
    assert positions_of(cells, 3) == [5, 6]
    assert (cells.top, cells.n_kv) == (5, 32)


def test_the_decode_fast_path_allocates_like_the_general_path() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        general, fast = Cells(capacity=40, max_sequences=6), Cells(capacity=40, max_sequences=6)
        for cells in (general, fast):
            for seq in range(6):
                forward(cells, [seq] * 3, [0, 1, 2])
            cells.remove(2)
            cells.remove(4, 1)
            cells.copy_prefix(0, 2, 3)  # seqs 0 and 2 end on one shared cell
        seqs = rng.permutation([0, 1, 2, 3, 4, 5]).tolist()
        positions = [1 if s == 4 else 3 for s in seqs]
        batch = group_batch(seqs, positions)
        step = fast.commit_decode(batch)
        assert step is not None
        assert step.slot_mapping.tolist() == forward(general, seqs, positions)
        assert step.slots.tolist() == [fast.tables.slot(s) for s in seqs]
        assert tables(fast) == tables(general)
        assert_same(snapshot(fast), snapshot(general))
        fast.check()


def test_many_decode_steps_grow_the_tables_like_the_general_path() -> None:
    """Steps of a random subset of sequences in random order, some sequences leaving and coming back: the
    tables fill their room (`CellTables.make_room`, then the store compacts), the cell after a sequence's
    last one is often another's, and both paths make the same choices throughout."""
    rng = np.random.default_rng(5)
    general, fast = Cells(capacity=600, max_sequences=8), Cells(capacity=600, max_sequences=8)
    for cells in (general, fast):
        for seq in range(8):
            forward(cells, [seq] * 2, [0, 1])
    for _ in range(60):
        if rng.random() < 0.1:  # one sequence leaves, a new one starts with a short prompt
            gone = int(rng.choice(list(fast.tables)))
            new = max(fast.tables) + 1
            for cells in (general, fast):
                cells.remove(gone)
                forward(cells, [new] * 3, [0, 1, 2])
        seqs = rng.permutation(list(fast.tables))[: int(rng.integers(1, 9))].tolist()
        positions = [fast.length(s) for s in seqs]
        step = fast.commit_decode(group_batch(seqs, positions))
        assert step is not None
        assert step.slot_mapping.tolist() == forward(general, seqs, positions)
        assert_same(snapshot(fast), snapshot(general))
    assert max(map(fast.length, fast.tables)) > 16  # some table outgrew its first room
    fast.check()


@pytest.mark.parametrize(
    "seqs, positions, why",
    [
        ([0, 1], [3, 2], "a position that does not follow the sequence's last"),
        ([0, 0], [3, 4], "two tokens of one sequence"),
        ([0, 7], [3, 0], "a new sequence"),
        ([0, 1, 2], [3, 3, 3], "more tokens than free cells"),
    ],
)
def test_the_decode_fast_path_refuses_other_batches_and_changes_nothing(seqs, positions, why) -> None:
    cells = Cells(capacity=8, max_sequences=4)
    for seq in range(2):
        forward(cells, [seq] * 3, [0, 1, 2])
    forward(cells, [2], [0])  # 7 cells used, 1 free
    before = snapshot(cells)
    assert cells.commit_decode(group_batch(seqs, positions)) is None, why
    assert_same(before, snapshot(cells))


def test_the_decode_fast_path_is_off_with_a_window() -> None:
    cells = Cells(capacity=16, max_sequences=2, window=4)
    forward(cells, [0] * 2, [0, 1])
    assert cells.commit_decode(group_batch([0], [2])) is None


# ---- ring windows with sinks ---------------------------------------------------------------------
def test_ring_window_with_a_sink_overwrites_the_oldest_non_sink_cell() -> None:
    cells = Cells(capacity=8, max_sequences=2, window=3, sinks=1)
    steps = [
        # (positions of seq 0, slot_mapping, cell table, positions of the table)
        ([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]),
        ([4], [1], [0, 2, 3, 1], [0, 2, 3, 4]),  # position 1 (cell 1) left the window: overwritten
        ([5], [2], [0, 3, 1, 2], [0, 3, 4, 5]),
        # a 3-token pass reuses only what its first token cannot see (cell 3), then takes fresh cells
        ([6, 7, 8], [3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 4, 5, 6, 7, 8]),
        # the next decode token reuses the oldest invisible cell and frees the others
        ([9], [1], [0, 4, 5, 1], [0, 7, 8, 9]),
    ]
    for pos, slots, table, table_positions in steps:
        assert forward(cells, [0] * len(pos), pos) == slots
        assert cells.table(0).tolist() == table
        assert positions_of(cells, 0) == table_positions
        cells.check()
    assert cells.used == 4


def test_ring_overwrite_of_a_shared_cell_takes_a_fresh_cell_instead() -> None:
    cells = Cells(capacity=8, max_sequences=2, window=2, sinks=0)
    assert forward(cells, [0, 0], [0, 1]) == [0, 1]
    cells.copy_prefix(0, 1, 2)
    assert cells.refs[:2].tolist() == [2, 2]
    # seq 0 would overwrite cell 0 (position 0), but seq 1 still owns it: copy-on-write, a fresh cell
    assert forward(cells, [0], [2]) == [2]
    assert tables(cells) == {0: [1, 2], 1: [0, 1]}
    assert cells.refs[:3].tolist() == [1, 2, 1]
    assert forward(cells, [1], [2]) == [0]  # seq 1 is the only owner of cell 0 now: ring write in place
    cells.check()


# ---- remove, copy_prefix, shift -------------------------------------------------------------------
def test_remove_ranges_are_half_open_positions() -> None:
    cells = Cells(capacity=8, max_sequences=2)
    forward(cells, [0] * 6, list(range(6)))
    assert cells.remove(0, 2, 4) == 2
    assert positions_of(cells, 0) == [0, 1, 4, 5]
    assert cells.remove(0, 4) == 2
    assert positions_of(cells, 0) == [0, 1]
    assert cells.remove(0, 5, 9) == 0
    assert cells.remove(0) == 2
    assert tables(cells) == {}
    assert cells.free == 8
    cells.check()


def test_copy_prefix_shares_cells_and_remove_drops_one_reference() -> None:
    cells = Cells(capacity=8, max_sequences=3)
    forward(cells, [0] * 4, [0, 1, 2, 3])
    cells.copy_prefix(0, 1, 3)
    assert forward(cells, [1, 1], [3, 4]) == [4, 5]
    assert tables(cells) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 4, 5]}
    assert cells.refs.tolist() == [2, 2, 2, 1, 1, 1, 0, 0]
    assert (cells.used, cells.shared, cells.tokens) == (6, 3, 9)
    cells.remove(0)
    assert cells.refs.tolist() == [1, 1, 1, 0, 1, 1, 0, 0]
    assert cells.positions[3] == FREE_CELL
    cells.check()


def test_shift_moves_positions_and_copies_shared_cells_first() -> None:
    cells = Cells(capacity=8, max_sequences=2)
    forward(cells, [0] * 5, [0, 1, 2, 3, 4])
    cells.copy_prefix(0, 1, 5)
    cells.remove(1, 1, 3)
    plan = cells.shift(1, -2, begin=3)
    assert (plan.copy_src.tolist(), plan.copy_dst.tolist()) == ([3, 4], [5, 6])
    assert (plan.cells.tolist(), plan.deltas.tolist()) == ([5, 6], [-2, -2])
    assert tables(cells) == {0: [0, 1, 2, 3, 4], 1: [0, 5, 6]}
    assert positions_of(cells, 1) == [0, 1, 2]
    assert positions_of(cells, 0) == [0, 1, 2, 3, 4]
    cells.check()


# ---- defragmentation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("batches", "removed", "runs", "after"),
    [
        # A [0, 1], B [2, 3, 4], C [5, 6]; B leaves: C moves down as one run
        ([([0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 2, 0, 1])], [1], ([5], [2], [2]), {0: [0, 1], 2: [2, 3]}),
        # two decode steps interleave A [0, 3] and B [1, 2] -> A [0, 1], B [2, 3]: cell 3 to 1, then 1-2 to 2-3
        ([([0, 1], [0, 0]), ([0, 1], [1, 1])], [], ([3, 1], [1, 2], [1, 2]), {0: [0, 1], 1: [2, 3]}),
    ],
)
def test_defrag_plan_compacts_each_sequence_in_order(batches, removed, runs, after) -> None:
    cells = Cells(capacity=8, max_sequences=4)
    for seqs, pos in batches:
        batch = group_batch(seqs, pos)
        cells.commit_batch(batch, cells.plan_batch(batch))
    for seq in removed:
        cells.remove(seq)
    before = {seq: positions_of(cells, seq) for seq in tables(cells)}
    plan = cells.plan_defrag()
    assert (plan.src.tolist(), plan.dst.tolist(), plan.length.tolist()) == runs
    cells.apply_defrag(plan)
    assert tables(cells) == after
    assert {seq: positions_of(cells, seq) for seq in after} == before
    cells.check()


def test_defrag_keeps_a_shared_prefix_once() -> None:
    cells = Cells(capacity=16, max_sequences=4)
    forward(cells, [9, 0, 0, 0], [0, 0, 1, 2])  # 9 [0], 0 [1, 2, 3]
    cells.copy_prefix(0, 1, 2)
    forward(cells, [1], [2])  # 1 [1, 2, 4]
    cells.remove(9)
    cells.apply_defrag(cells.plan_defrag())
    assert tables(cells) == {0: [0, 1, 2], 1: [0, 1, 3]}
    assert cells.refs[:5].tolist() == [2, 2, 1, 1, 0]
    cells.check()


# ---- errors leave everything as it was ---------------------------------------------------------------
def _filled() -> Cells:
    cells = Cells(capacity=8, max_sequences=2)
    forward(cells, [0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    return cells


@pytest.mark.parametrize(
    ("seqs", "positions", "error"),
    [
        ([0], [2], PositionError),  # backwards
        ([0], [4], PositionError),  # skips 3
        ([0, 0], [3, 3], PositionError),  # duplicate in one batch
        ([1, 1], [3, 2], PositionError),  # out of order in one batch
        ([0, 5], [3, -1], PositionError),  # a new sequence at a negative position
        ([0, 5], [3, 0], TooManySequences),
        ([0, 0, 0, 0], [3, 4, 5, 6], CacheFull),  # 4 asked, 3 free, and nothing half-allocated
        ([[0]], [[3]], ShapeMismatch),
    ],
)
def test_refused_batches_change_nothing(seqs, positions, error) -> None:
    cells = _filled()
    before = snapshot(cells)
    with pytest.raises(error):
        batch = group_batch(seqs, positions)
        cells.plan_batch(batch)
    assert_same(before, snapshot(cells))


def test_cache_full_names_asked_and_free() -> None:
    cells = _filled()
    with pytest.raises(CacheFull) as info:
        cells.plan_batch(group_batch([0, 0, 0, 0, 1], [3, 4, 5, 6, 2]))
    assert (info.value.asked, info.value.free) == (5, 3)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.remove(3), UnknownSequence),
        (lambda c: c.remove(0, 2, 1), PositionError),
        (lambda c: c.remove(0, -1), PositionError),
        (lambda c: c.copy_prefix(3, 4, 1), UnknownSequence),
        (lambda c: c.copy_prefix(0, 4, 4), PositionError),  # longer than the source
        (lambda c: c.copy_prefix(0, 1, 2), SequenceExists),
        (lambda c: c.copy_prefix(0, 4, 2), TooManySequences),
        (lambda c: c.shift(3, 1), UnknownSequence),
        (lambda c: c.shift(0, -1, begin=1), PositionError),  # position 1 would land on 0
        (lambda c: c.shift(0, -1), PositionError),  # position 0 would become -1
    ],
)
def test_refused_management_calls_change_nothing(call, error) -> None:
    cells = _filled()
    before = snapshot(cells)
    generation = cells.generation
    with pytest.raises(error):
        call(cells)
    assert_same(before, snapshot(cells))
    assert cells.generation == generation


def test_shift_that_needs_copies_beyond_the_free_cells_changes_nothing() -> None:
    cells = Cells(capacity=4, max_sequences=2)
    forward(cells, [0, 0, 0], [0, 1, 2])
    cells.copy_prefix(0, 1, 3)
    before = snapshot(cells)
    with pytest.raises(CacheFull):
        cells.shift(1, 5, begin=1)  # two shared cells to copy, one free
    assert_same(before, snapshot(cells))


def test_can_resume_follows_the_positions_and_the_ring() -> None:
    cells = Cells(capacity=4, max_sequences=2, window=2)
    forward(cells, [0, 0], [0, 1])
    assert cells.can_resume(0, 2) and not cells.can_resume(0, 1) and not cells.can_resume(0, 3)
    assert cells.can_resume(7, 0) and not cells.can_resume(7, -1)
    forward(cells, [1, 1], [0, 1])
    assert not cells.can_resume(7, 0)  # max_sequences
    assert cells.free == 0 and cells.can_resume(0, 2)  # full, but the ring overwrites position 0


@pytest.mark.parametrize(
    "kwargs",
    [{"capacity": 0, "max_sequences": 1}, {"capacity": 4, "max_sequences": 0},
     {"capacity": 4, "max_sequences": 1, "window": 0}, {"capacity": 4, "max_sequences": 1, "sinks": 2}],
)
def test_bad_configuration(kwargs) -> None:
    with pytest.raises(ConfigError):
        Cells(**kwargs)


# ---- the shared store of cell tables (kvarray.celltables) -----------------------------------------
def layout(t: CellTables) -> dict[int, tuple[int, int, int]]:
    """Each live sequence's (offset, length, room) in the store."""
    return {seq: (int(t.offset[t.slot(seq)]), int(t.length[t.slot(seq)]), int(t.room[t.slot(seq)])) for seq in t}


def check_store(t: CellTables, model: dict[int, list[int]]) -> None:
    """The tables hold the model's cells, in insertion order, in disjoint regions of the store."""
    assert list(t) == list(model)
    assert {seq: t.cells(t.slot(seq)).tolist() for seq in t} == model
    regions = sorted((offset, offset + room) for offset, length, room in layout(t).values() if length <= room)
    assert len(regions) == len(model), "a table longer than its room"
    assert all(a_end <= b for (_, a_end), (b, _) in zip(regions, regions[1:], strict=False)), "overlapping regions"
    assert all(end <= t._end <= len(t.store) for _, end in regions)
    slots = t.live_slots()
    indptr, indices = t.csr(slots)
    assert indices.tolist() == [c for cells in model.values() for c in cells]
    assert indptr.tolist() == np.cumsum([0] + [len(c) for c in model.values()]).tolist()


def test_expand_runs_concatenates_the_runs() -> None:
    assert expand_runs(np.array([10, 3, 7]), np.array([2, 3, 0])).tolist() == [10, 11, 3, 4, 5]
    assert expand_runs(np.array([], np.int64), np.array([], np.int64)).tolist() == []


def test_cell_tables_grow_in_place_move_to_the_end_and_compact() -> None:
    t = CellTables(sequences=2, entries=128)
    steps = [
        # (operation, expected (offset, length, room) per sequence, expected store size)
        (lambda: t.add(7, np.arange(3)), {7: (0, 3, MIN_ROOM)}, 128),
        (lambda: t.add(8, np.arange(20)), {7: (0, 3, 16), 8: (16, 20, 40)}, 128),  # room: twice the cells
        # 8 is the last region: it grows in place, to twice the 50 entries it needs
        (lambda: t.extend(t.slot(8), np.arange(30)), {7: (0, 3, 16), 8: (16, 50, 100)}, 128),
        # 7 outgrows its room: the store has no room at its end, so the tables are compacted into a store
        # twice as large as needed (512 >= 2 * (16 + 100 + 34)), and 7 moves to the end with 2 * 17
        (lambda: t.extend(t.slot(7), np.arange(14)), {7: (116, 17, 34), 8: (16, 50, 100)}, 512),
        # a third sequence: the slot arrays double; a fresh region after the last
        (lambda: t.add(9, np.arange(1)), {7: (116, 17, 34), 8: (16, 50, 100), 9: (150, 1, 16)}, 512),
        # dropping 8 leaves its region unused until a compaction reclaims it (insertion order kept)
        (lambda: t.drop(8), {7: (116, 17, 34), 9: (150, 1, 16)}, 512),
        (lambda: t._compact(0), {7: (0, 17, 34), 9: (34, 1, 16)}, 512),
    ]
    for operation, expected, size in steps:
        operation()
        assert layout(t) == expected
        assert len(t.store) == size
    assert t.cells(t.slot(7)).tolist() == [0, 1, 2, *range(14)]
    assert t.cells(t.slot(9)).tolist() == [0]


def test_cell_tables_make_room_for_one_more_entry_and_keep_the_tables() -> None:
    t, model = CellTables(sequences=2, entries=16), {}
    for seq in range(5):
        t.add(seq, np.arange(seq + 1, dtype=np.int32) * 10)
        model[seq] = (np.arange(seq + 1) * 10).tolist()
    for step in range(40):  # rooms fill up, so some calls move tables and compact the store
        seqs = [s for s in model if (s + step) % 3]
        slots = t.slots(seqs)
        rooms = {s: int(t.room[t.slot(s)]) for s in model}
        t.make_room(slots)
        for s in seqs:
            slot = t.slot(s)
            assert t.length[slot] < t.room[slot]
            if len(model[s]) < rooms[s]:
                assert t.room[slot] == rooms[s]  # a table with room left keeps it
            t.extend(slot, np.array([1000 * step + s], np.int32))  # fits without a move now
            model[s].append(1000 * step + s)
        check_store(t, model)
    assert t.slots([0, 99]) is None


def test_cell_tables_many_sequences_with_interleaved_removes_match_a_dict_of_lists() -> None:
    rng = np.random.default_rng(11)
    t, model = CellTables(sequences=4, entries=32), {}
    for i in range(1500):
        op = rng.integers(6)
        if op == 0 or not model:
            seq = int(rng.integers(0, 400))
            if seq not in model:
                cells = rng.integers(0, 1000, int(rng.integers(1, 40))).astype(np.int32)
                t.add(seq, cells)
                model[seq] = cells.tolist()
            continue
        seq = list(model)[int(rng.integers(len(model)))]
        slot = t.slot(seq)
        if op == 1:
            t.drop(seq)
            del model[seq]
        elif op == 2:
            cells = rng.integers(0, 1000, int(rng.integers(0, 50))).astype(np.int32)
            t.extend(slot, cells)
            model[seq] += cells.tolist()
        elif op == 3:
            start = int(rng.integers(len(model[seq])))
            count = int(rng.integers(0, len(model[seq]) - start + 1))
            t.delete(slot, start, count)
            del model[seq][start : start + count]
        elif op == 4:
            mask = rng.random(len(model[seq])) < 0.7
            t.keep(slot, mask)
            model[seq] = [c for c, k in zip(model[seq], mask, strict=True) if k]
        else:
            start = int(rng.integers(len(model[seq])))
            cells = rng.integers(0, 1000, len(model[seq]) - start).astype(np.int32)
            t.write(slot, start, cells)
            model[seq][start:] = cells.tolist()
        if seq in model and not model[seq]:
            t.drop(seq)
            del model[seq]
        if i % 50 == 0:
            check_store(t, model)
    check_store(t, model)
    assert len(t.offset) >= 64  # the slot arrays grew
    mapping = np.arange(1000)[::-1].copy()
    t.remap(mapping)
    check_store(t, {seq: [999 - c for c in cells] for seq, cells in model.items()})
    ids = list(model)
    indptr, indices = t.csr(t.live_slots())
    restored = CellTables()
    restored.load(ids, indptr, indices)
    check_store(restored, {seq: [999 - c for c in cells] for seq, cells in model.items()})


def test_cells_with_many_sequences_keep_their_tables_through_churn() -> None:
    cells = Cells(capacity=4096, max_sequences=300)
    rng = np.random.default_rng(2)
    live: dict[int, int] = {}
    for _ in range(60):
        new = [s for s in range(300) if s not in live][: int(rng.integers(0, 20))]
        seqs = new + [s for s in live if rng.random() < 0.8]
        positions = [0 if s in new else live[s] for s in seqs]
        if len(seqs) > cells.free:
            break
        forward(cells, seqs, positions)
        for s in seqs:
            live[s] = live.get(s, 0) + 1
        for s in [s for s in live if rng.random() < 0.05]:
            keep = int(rng.integers(0, live[s]))
            cells.remove(s, keep)
            live[s] = keep
            if keep == 0:
                del live[s]
        cells.check()
        assert {s: positions_of(cells, s) for s in live} == {s: list(range(n)) for s, n in live.items()}

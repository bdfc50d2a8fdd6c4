"""Cell bookkeeping of a causal cache: NumPy integers and plain Python, never K/V data.

A *cell* is one token's row in every pool. This module decides which cells a batch writes (the free list,
each sequence's cell table, ring windows with sinks, prefix sharing by reference counts);
`kvarray.cellstate` plans defragmentation and exports, restores and checks the state. `kvarray.causal`
joins the bookkeeping with the pools and the kernels.

State, all on the host:
    positions  ``[capacity]`` int64: the token position a cell holds, `FREE_CELL` when no sequence owns it.
    refs       ``[capacity]`` int32: how many sequences own the cell (0 = free, > 1 = shared).
    tables     `CellTables`: each live sequence's cells in increasing position order, all in one store.

Every mutating method either raises a `kvarray.errors` exception before changing anything or completes,
and bumps `generation`, which plans use to notice that they are stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np

from .batch import Batch, group_batch
from .celltables import CellTables
from .errors import (
    CacheFull,
    ConfigError,
    PositionError,
    SequenceExists,
    TooManySequences,
    UnknownSequence,
)

if TYPE_CHECKING:
    from .cellstate import DefragPlan

__all__ = [
    "FREE_CELL", "N_KV_MULTIPLE", "Batch", "CellTables", "Cells", "DecodeStep", "group_batch", "round_up",
]

#: The position of a cell that no sequence owns.
FREE_CELL = -1
#: n_kv, the length of the pool view, is the high-water mark of used cells rounded up to this multiple.
N_KV_MULTIPLE = 32


#: `_plain_decode`'s answers: allocated; not a plain decode (nothing changed); a table has no room for
#: one more entry (nothing changed: `CellTables.make_room`, then call again).
_DONE, _NOT_PLAIN, _TABLE_FULL = 0, 1, 2


def round_up(n: int, multiple: int = N_KV_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that is >= n (0 stays 0)."""
    return -(-n // multiple) * multiple


class DecodeStep(NamedTuple):
    """What `Cells.commit_decode` allocated: ``slot_mapping [S]`` int32, the new cell of each sequence's
    token, and ``slots [S]`` int64, the slot of each sequence's table in `CellTables`."""

    slot_mapping: np.ndarray
    slots: np.ndarray


class _SeqPlan(NamedTuple):
    """What one sequence of a batch does: evict table[sinks : sinks + evict], reuse some, take `fresh`."""

    seq: int
    first_position: int
    tokens: int
    evict: int
    reuse: list[int]
    fresh: int


@dataclass(frozen=True, slots=True)
class ShiftPlan:
    """What `Cells.shift` did: copy ``copy_src[i] -> copy_dst[i]`` (copy-on-write of shared cells) first,
    then rotate keys of ``cells [n]`` by ``deltas [n]`` (int64)."""

    copy_src: np.ndarray
    copy_dst: np.ndarray
    cells: np.ndarray
    deltas: np.ndarray


class Cells:
    """The bookkeeping of one causal cache: free list, cell tables, ownership, windows, defrag plans.

    Args:
        capacity: cells in the pools.
        max_sequences: live sequences (sequences holding at least one cell) at most.
        window: sliding window W in positions (a token at p sees positions > p - W), or None.
        sinks: K, the first cells of every sequence that stay visible and are never evicted (with a window).
    """

    def __init__(self, capacity: int, max_sequences: int, window: int | None = None, sinks: int = 0) -> None:
        if capacity <= 0 or max_sequences <= 0:
            raise ConfigError(f"capacity and max_sequences must be positive, got {capacity}, {max_sequences}")
        if window is not None and window <= 0:
            raise ConfigError(f"window must be a positive number of positions or None, got {window}")
        if sinks < 0 or (sinks and window is None):
            raise ConfigError(f"sinks must be >= 0 and need a window, got sinks={sinks}, window={window}")
        self.capacity = int(capacity)
        self.max_sequences = int(max_sequences)
        self.window = None if window is None else int(window)
        self.sinks = int(sinks)
        self.positions = np.full(self.capacity, FREE_CELL, np.int64)
        self.refs = np.zeros(self.capacity, np.int32)
        self.tables = CellTables()
        self.generation = 0
        self.used = 0
        self._lowest_free = 0  # no free cell below this index
        self._top = 0  # no used cell at or above this index
        self._top_exact = True

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        """Cells no sequence owns."""
        return self.capacity - self.used

    @property
    def top(self) -> int:
        """One past the highest used cell (0 when the cache is empty)."""
        if not self._top_exact:  # scan down from the old top, in chunks that double
            top, chunk = self._top, 8 * N_KV_MULTIPLE
            while top > 0:
                low = max(0, top - chunk)
                used = self.refs[low:top].nonzero()[0]
                if used.size:
                    top = low + int(used[-1]) + 1
                    break
                top, chunk = low, 2 * chunk
            self._top = top
            self._top_exact = True
        return self._top

    @property
    def n_kv(self) -> int:
        """The pool view's length: `top` rounded up to a multiple of `N_KV_MULTIPLE`, at most `capacity`."""
        return min(round_up(self.top), self.capacity)

    @property
    def fragmentation(self) -> float:
        """``1 - used / n_kv`` (0 for an empty cache)."""
        n_kv = self.n_kv
        return 1.0 - self.used / n_kv if n_kv else 0.0

    @property
    def shared(self) -> int:
        """Cells owned by more than one sequence."""
        return int(np.count_nonzero(self.refs > 1))

    @property
    def tokens(self) -> int:
        """Sum of the sequences' cell counts (shared cells counted once per owner)."""
        return self.tables.total()

    def table(self, seq: int) -> np.ndarray:
        """Sequence `seq`'s cells ``[n]`` int32 in position order (a view, valid until the bookkeeping
        changes: copy it to keep it). Raises `UnknownSequence`."""
        return self.tables.cells(self._slot(seq))

    def length(self, seq: int) -> int:
        """Cells in `seq`'s table (0 for a sequence without cells)."""
        slot = self.tables.slot(int(seq))
        return 0 if slot is None else int(self.tables.length[slot])

    def lengths(self, seqs: np.ndarray) -> np.ndarray:
        """``[S]`` int64 `length` of each of ``seqs [S]`` (0 for a sequence without cells)."""
        return np.fromiter(map(self.length, seqs.tolist()), np.int64, len(seqs))

    def last_position(self, seq: int) -> int | None:
        """The highest position `seq` holds, or None for a sequence without cells."""
        slot = self.tables.slot(int(seq))
        return None if slot is None else int(self.positions[self.tables.cells(slot)[-1]])

    def sequences(self) -> Iterator[tuple[int, np.ndarray]]:
        """The live sequences and their tables (views, as `table`), in insertion order."""
        tables = self.tables
        return ((seq, tables.cells(slot)) for seq, slot in tables.items())

    def page_table(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tables of the live sequences ``seqs [S]`` in CSR form: ``indptr [S + 1]`` int32 and
        ``indices [indptr[S]]`` int32 (`CellTables.csr`). Raises `UnknownSequence`."""
        slots = self.tables.slots(seqs.tolist())
        if slots is None:
            missing = next(s for s in seqs.tolist() if s not in self.tables)
            raise UnknownSequence(f"sequence {missing} holds no cells")
        return self.tables.csr(slots)

    def cells_at(self, seqs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``[T]`` int64 the cell holding position ``positions[t]`` of sequence ``seqs[t]`` (``[T]`` int64
        each). Raises `UnknownSequence`, `PositionError` (a position the sequence does not hold)."""
        cells = np.empty(len(seqs), np.int64)
        for seq in dict.fromkeys(seqs.tolist()):
            table = self.tables.cells(self._slot(seq))
            mine = np.flatnonzero(seqs == seq)
            held = self.positions[table]  # increasing
            at = np.minimum(np.searchsorted(held, positions[mine]), len(table) - 1)
            wrong = held[at] != positions[mine]
            if wrong.any():
                raise PositionError(
                    f"sequence {seq} holds no cell at position {int(positions[mine][wrong][0])} "
                    f"(it holds {len(table)} positions, {int(held[0])} to {int(held[-1])})"
                )
            cells[mine] = table[at]
        return cells

    def _slot(self, seq: int) -> int:
        slot = self.tables.slot(int(seq))
        if slot is None:
            raise UnknownSequence(f"sequence {seq} holds no cells")
        return slot

    # ---- forward passes --------------------------------------------------------------------------
    def plan_batch(self, batch: Batch) -> list[_SeqPlan]:
        """Decide, without changing anything, what each sequence of `batch` evicts, reuses and allocates.

        Raises `PositionError`, `TooManySequences` or `CacheFull` (asked = fresh cells the batch needs,
        free = cells free plus those its evictions release).
        """
        positions, refs, window, sinks = self.positions, self.refs, self.window, self.sinks
        plans: list[_SeqPlan] = []
        new_sequences = 0
        fresh_total = 0
        dropped: list[int] = []
        first_positions = batch.positions[batch.order[batch.starts]].tolist()
        counts = batch.counts.tolist()
        for seq, p0, count in zip(batch.sequences.tolist(), first_positions, counts, strict=True):
            slot = self.tables.slot(seq)
            if slot is None:
                if p0 < 0:
                    raise PositionError(f"sequence {seq} cannot start at negative position {p0}")
                new_sequences += 1
                plans.append(_SeqPlan(seq, p0, count, 0, [], count))
                fresh_total += count
                continue
            table = self.tables.cells(slot)
            last = int(positions[table[-1]])
            if p0 != last + 1:
                raise PositionError(
                    f"sequence {seq} holds positions up to {last}; its next token must be at {last + 1}, "
                    f"got {p0} (use remove() or shift() to rewrite a sequence)"
                )
            evict, reuse = 0, list[int]()
            if window is not None:
                limit, i = p0 - window, sinks
                while i < len(table) and positions[table[i]] <= limit:
                    i += 1
                evict = i - sinks if i > sinks else 0
                for c in table[sinks : sinks + evict].tolist():
                    if refs[c] == 1 and len(reuse) < count:
                        reuse.append(c)
                    else:
                        dropped.append(c)
            plans.append(_SeqPlan(seq, p0, count, evict, reuse, count - len(reuse)))
            fresh_total += count - len(reuse)
        if new_sequences and len(self.tables) + new_sequences > self.max_sequences:
            raise TooManySequences(
                f"the batch starts {new_sequences} new sequence(s) while {len(self.tables)} are live; "
                f"max_sequences is {self.max_sequences}"
            )
        if fresh_total > self.free:
            released = 0
            if dropped:
                cells, drops = np.unique(np.asarray(dropped, np.int64), return_counts=True)
                released = int(np.count_nonzero(refs[cells] == drops))
            if fresh_total > self.free + released:
                raise CacheFull(fresh_total, self.free + released)
        return plans

    def commit_decode(self, batch: Batch) -> DecodeStep | None:
        """Allocate one cell per sequence of a plain decode batch, or return None, changing nothing, when
        `batch` needs the general path (`plan_batch`, `commit_batch`).

        Plain decode: no window, one token per sequence, each the next one of a live sequence, and enough
        free cells. Same choices as `commit_batch`: the cell after each sequence's last cell when free
        (one sequence per cell: the first in batch order), else the lowest free cells in batch order. One
        compiled call (`_plain_decode`) checks and allocates: a decode step's bookkeeping is otherwise
        some twenty NumPy calls, each slow when the forward pass has just evicted the caches.
        """
        count = len(batch.seq_ids)
        if self.window is not None or count > self.free or len(batch.sequences) != count:
            return None
        tables = self.tables
        slots = tables.slots(batch.sequences.tolist())
        if slots is None:
            return None
        slot_mapping = np.empty(count, np.int32)
        while True:
            status, lowest, top = _plain_decode(
                self.positions, self.refs, tables.store, tables.offset, tables.length, tables.room, slots,
                batch.positions, self._lowest_free, slot_mapping,
            )  # fmt: skip
            if status != _TABLE_FULL:
                break
            tables.make_room(slots)  # rare: doubling the room makes it once per `room` appends
        if status == _NOT_PLAIN:
            return None
        self.used += count
        self._lowest_free = lowest
        self._top = max(self._top, top)
        self.generation += 1
        return DecodeStep(slot_mapping, slots)

    def commit_batch(self, batch: Batch, plans: list[_SeqPlan]) -> np.ndarray:
        """Apply `plan_batch`'s decisions; returns ``slot_mapping [T]`` int32 (the cell of each token).

        Fresh cells: first each sequence extends the run of free cells right after its last cell (when two
        sequences end on one shared cell, the next cell goes to one of them), then the remaining tokens
        take the lowest free cells, sequences in order of first appearance.
        """
        positions, refs, sinks, tables = self.positions, self.refs, self.sinks, self.tables
        chosen: list[list[int]] = []
        one_more: list[tuple[int, int]] = []  # (plan index, the cell after the sequence's last): decode
        for k, plan in enumerate(plans):
            slot = tables.slot(plan.seq)
            if plan.evict:
                assert slot is not None
                evicted = tables.cells(slot)[sinks : sinks + plan.evict].tolist()
                tables.delete(slot, sinks, plan.evict)
                keep = set(plan.reuse)
                self._release([c for c in evicted if c not in keep])
            cells = list(plan.reuse)
            if plan.fresh and slot is not None and tables.length[slot]:
                start = int(tables.cells(slot)[-1]) + 1
                if plan.fresh == 1:
                    one_more.append((k, start))
                else:
                    run = self._free_run(start, plan.fresh)
                    if run:
                        cells.extend(range(start, start + run))
                        refs[start : start + run] = 1
                        self.used += run
            chosen.append(cells)
        if one_more:
            index = np.fromiter((k for k, _ in one_more), np.int64, len(one_more))
            after = np.fromiter((c for _, c in one_more), np.int64, len(one_more))
            ok = after < self.capacity
            ok[ok] = refs[after[ok]] == 0
            first = np.zeros(len(after), bool)
            first[np.unique(after, return_index=True)[1]] = True
            ok &= first
            refs[after[ok]] = 1
            self.used += int(ok.sum())
            for k, c in zip(index[ok].tolist(), after[ok].tolist(), strict=True):
                chosen[k].append(c)
        missing = [plan.tokens - len(cells) for plan, cells in zip(plans, chosen, strict=True)]
        lowest = self._take_lowest(sum(missing)).tolist()
        grouped: list[int] = []
        offset = 0
        for cells, more in zip(chosen, missing, strict=True):
            if more:
                cells.extend(lowest[offset : offset + more])
                offset += more
            grouped.extend(cells)
        grouped_cells = np.asarray(grouped, np.int32)
        slot_mapping = np.empty(len(batch.seq_ids), np.int32)
        slot_mapping[batch.order] = grouped_cells
        positions[grouped_cells] = batch.positions[batch.order]
        for plan, cells in zip(plans, chosen, strict=True):
            slot = tables.slot(plan.seq)
            if slot is None:
                tables.add(plan.seq, np.asarray(cells, np.int32))
            else:
                tables.extend(slot, np.asarray(cells, np.int32))
        if len(slot_mapping):
            self._top = max(self._top, int(grouped_cells.max()) + 1)
        assert self.used <= self.capacity
        self.generation += 1
        return slot_mapping

    def _free_run(self, start: int, limit: int) -> int:
        """Free cells at ``start, start + 1, ...`` (at most `limit`)."""
        segment = self.refs[start : start + limit]
        taken = np.flatnonzero(segment)
        return int(taken[0]) if taken.size else len(segment)

    def _take_lowest(self, n: int) -> np.ndarray:
        """Mark the `n` lowest free cells owned (refs = 1) and return them ``[n]`` int32, ascending."""
        if n == 0:
            return np.empty(0, np.int32)
        found: list[np.ndarray] = []
        have, lo, chunk = 0, self._lowest_free, max(64, 2 * n)
        while have < n:
            assert lo < self.capacity, "the free count and the refs disagree"
            free = (self.refs[lo : lo + chunk] == 0).nonzero()[0][: n - have] + lo
            found.append(free)
            have += len(free)
            lo += chunk
            chunk *= 2
        cells = (found[0] if len(found) == 1 else np.concatenate(found)).astype(np.int32)
        self.refs[cells] = 1
        self.used += n
        self._lowest_free = int(cells[-1]) + 1
        return cells

    def _release(self, cells: list[int] | np.ndarray) -> None:
        """Drop one reference from each of `cells` (distinct); cells whose last owner left become free."""
        if len(cells) == 0:
            return
        arr = np.asarray(cells, np.int64)
        self.refs[arr] -= 1
        freed = arr[self.refs[arr] == 0]
        if freed.size:
            self.positions[freed] = FREE_CELL
            self.used -= len(freed)
            self._lowest_free = min(self._lowest_free, int(freed.min()))
            self._top_exact = False

    # ---- cache management ------------------------------------------------------------------------
    def can_resume(self, seq: int, position: int) -> bool:
        """True iff a one-token batch ``(seq, position)`` would be accepted now (see `CausalCache`)."""
        batch = group_batch([seq], [position])
        try:
            self.plan_batch(batch)
        except (PositionError, TooManySequences, CacheFull):
            return False
        return True

    def remove(self, seq: int, begin: int = 0, end: int | None = None) -> int:
        """Drop `seq`'s cells with positions in ``[begin, end)`` (end None: no upper bound); returns how many.

        A sequence left without cells is forgotten. Raises `UnknownSequence`, or `PositionError` when
        ``begin < 0`` or ``end < begin``.
        """
        slot = self._slot(seq)
        if begin < 0 or (end is not None and end < begin):
            raise PositionError(f"remove needs 0 <= begin <= end, got [{begin}, {end})")
        cells = self.tables.cells(slot)
        pos = self.positions[cells]
        drop = pos >= begin
        if end is not None:
            drop &= pos < end
        if not drop.any():
            return 0
        self._release(cells[drop].copy())
        self.tables.keep(slot, ~drop)
        if self.tables.length[slot] == 0:
            self.tables.drop(int(seq))
        self.generation += 1
        return int(drop.sum())

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Share the first `length` cells of `src`'s table with the new sequence `dst` (no data moves).

        Raises `UnknownSequence` (src), `PositionError` (length < 0 or longer than src),
        `SequenceExists` (dst holds cells), `TooManySequences`.
        """
        table = self.table(src)
        if length < 0 or length > len(table):
            held = len(table)
            raise PositionError(f"copy_prefix of {length} cells from sequence {src}, which holds {held}")
        if int(dst) in self.tables:
            raise SequenceExists(f"copy_prefix target {dst} already holds {self.length(dst)} cells")
        if length == 0:
            return
        if len(self.tables) >= self.max_sequences:
            live = len(self.tables)
            raise TooManySequences(f"{live} sequences are live; max_sequences is {self.max_sequences}")
        cells = table[:length].copy()
        self.refs[cells] += 1
        self.tables.add(int(dst), cells)
        self.generation += 1

    def shift(self, seq: int, delta: int, begin: int = 0) -> ShiftPlan:
        """Add `delta` to the position of each of `seq`'s cells with position >= `begin`.

        Shared cells among them are first replaced by fresh cells (the returned plan says which to copy).
        Raises `UnknownSequence`, `PositionError` (a position would fall below 0 or reach a kept cell's),
        `CacheFull` (no room for the copies).
        """
        slot = self._slot(seq)
        cells = self.tables.cells(slot)
        pos = self.positions[cells]
        first = int(np.searchsorted(pos, begin, side="left"))
        empty = np.empty(0, np.int64)
        if first == len(cells) or delta == 0:
            return ShiftPlan(empty, empty, empty, empty)
        floor = int(pos[first - 1]) + 1 if first else 0
        if int(pos[first]) + delta < floor:
            raise PositionError(
                f"shifting sequence {seq}'s positions >= {begin} by {delta} would move position "
                f"{int(pos[first])} to {int(pos[first]) + delta}, below {floor}"
            )
        moved = cells[first:].copy()
        shared = moved[self.refs[moved] > 1]
        if len(shared) > self.free:
            raise CacheFull(len(shared), self.free)
        fresh = self._take_lowest(len(shared))
        if len(shared):
            self.refs[shared] -= 1
            moved[np.isin(moved, shared)] = fresh
            self.tables.write(slot, first, moved)
            self._top = max(self._top, int(fresh.max()) + 1)
        self.positions[moved] = pos[first:] + delta
        self.generation += 1
        deltas = np.full(len(moved), delta, np.int64)
        return ShiftPlan(shared.astype(np.int64), fresh.astype(np.int64), moved.astype(np.int64), deltas)

    # ---- defragmentation and state (kvarray.cellstate) -------------------------------------------
    def plan_defrag(self) -> DefragPlan:
        """The moves that compact used cells to the front, sequences in order (`cellstate.plan_defrag`)."""
        from . import cellstate

        return cellstate.plan_defrag(self)

    def apply_defrag(self, plan: DefragPlan) -> None:
        """Renumber the bookkeeping after the pools moved by `plan` (`plan_defrag`'s, nothing in between)."""
        from . import cellstate

        cellstate.apply_defrag(self, plan)

    def export(self) -> dict[str, np.ndarray]:
        """The bookkeeping as arrays (`cellstate.export`)."""
        from . import cellstate

        return cellstate.export(self)

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Replace the bookkeeping with `export`'s arrays, checked by `check_state` (`cellstate.restore`)."""
        from . import cellstate

        cellstate.restore(self, state)

    def check_state(self, state: dict[str, np.ndarray]) -> str:
        """Why `state` is not a consistent bookkeeping for these cells, or "" when it is."""
        from . import cellstate

        return cellstate.check_state(self, state)

    def checkpoint(self) -> tuple[dict[str, np.ndarray], CellTables]:
        """The bookkeeping as it is, for `rollback`: the export plus a copy of the tables (their slots too,
        which the current plan's page table reads)."""
        return self.export(), self.tables.copy()

    def rollback(self, point: tuple[dict[str, np.ndarray], CellTables]) -> None:
        """Put back the bookkeeping of `checkpoint` exactly (bumps `generation`, as `restore`)."""
        state, tables = point
        self.restore(state)
        self.tables = tables

    def reset_hints(self, lowest_free: int, top: int | None) -> None:
        """After a bulk rewrite of `refs` (defrag, restore): no free cell below `lowest_free`, no used cell
        at or above `top` (None: unknown, recomputed when asked); bumps `generation`."""
        self._lowest_free = lowest_free
        self._top, self._top_exact = (self.capacity, False) if top is None else (top, True)
        self.generation += 1

    def check(self) -> None:
        """Assert the invariants (for tests): refs count the owners, no cell leaks, tables are sorted."""
        why = self.check_state(self.export())
        assert not why, why
        assert self.used == int(np.count_nonzero(self.refs)), "used count drifted"
        assert not self.refs[: self._lowest_free].__eq__(0).any(), "free cell below the lowest-free hint"
        assert not self.refs[self._top :].any(), "used cell above the top"


@numba.njit(nogil=True, cache=True)
def _plain_decode(
    positions: np.ndarray,
    refs: np.ndarray,
    store: np.ndarray,
    offset: np.ndarray,
    length: np.ndarray,
    room: np.ndarray,
    slots: np.ndarray,
    batch_positions: np.ndarray,
    lowest_free: int,
    slot_mapping: np.ndarray,
) -> tuple[int, int, int]:
    """`Cells.commit_decode` in one compiled call: ``(status, lowest free, top)``.

    Checks first, changing nothing unless every check passes: each table (``slots [S]`` into the
    `CellTables` arrays ``store``, ``offset``, ``length``, ``room``) has room for one more entry
    (else `_TABLE_FULL`) and ends at position ``batch_positions[s] - 1`` (else `_NOT_PLAIN`). Then each
    sequence takes the cell after its last one when ``refs`` says it is free, the others the lowest free
    cells from `lowest_free` up, in batch order; ``slot_mapping [S]`` gets the cells, ``positions`` and
    ``refs`` the new owners, each table its new cell. The caller has checked that S cells are free.
    Returns the new `lowest_free` bound and one past the highest cell taken.
    """
    count = slots.shape[0]
    capacity = refs.shape[0]
    for s in range(count):
        k = slots[s]
        if length[k] >= room[k]:
            return _TABLE_FULL, lowest_free, 0
        if positions[store[offset[k] + length[k] - 1]] != batch_positions[s] - 1:
            return _NOT_PLAIN, lowest_free, 0
    behind = 0
    for s in range(count):
        k = slots[s]
        cell = store[offset[k] + length[k] - 1] + 1
        if cell < capacity and refs[cell] == 0:  # a second sequence ending on the same cell finds it taken
            refs[cell] = 1
            slot_mapping[s] = cell
        else:
            slot_mapping[s] = -1
            behind += 1
    low = lowest_free
    if behind:
        for s in range(count):
            if slot_mapping[s] < 0:
                while low < capacity and refs[low] != 0:
                    low += 1
                if low == capacity:
                    raise AssertionError("the free count and the refs disagree")
                refs[low] = 1
                slot_mapping[s] = low
                low += 1
    top = 0
    for s in range(count):
        k, cell = slots[s], slot_mapping[s]
        positions[cell] = batch_positions[s]
        store[offset[k] + length[k]] = cell
        length[k] += 1
        top = max(top, cell + 1)
    return _DONE, low, top

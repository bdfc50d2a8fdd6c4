"""Every sequence's cell table in one shared int32 store: host NumPy bookkeeping for `kvarray.cells`.

One store instead of one array per sequence, so that what a decode step asks of all of its sequences at
once is one pass over a few arrays, not a Python loop over sequences: each one's last cell and a one-cell
append to each (`Cells.commit_decode` reads and writes ``store``, ``offset``, ``length`` and ``room`` in
one compiled call, after `make_room`), the page table (`csr`, a few vectorised NumPy calls).

Layout: sequence ids map to dense *slots* (the lowest free one is reused); slot k's table, its cells in
increasing position order, is ``store[offset[k] : offset[k] + length[k]]``, with room for ``room[k]``
entries there. A table that outgrows its room gets twice the entries it needs, at the end of the used part
of the store (``[0, end)``), or in place when it is the last region and the store has room. When the store
has no room left at its end, the live tables are compacted to its front, each keeping its room, into a
store twice as large when they would fill more than half of it. Free slots have length and room 0.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np

__all__ = ["MIN_ROOM", "CellTables", "expand_runs"]

#: The room a new table gets at least (entries).
MIN_ROOM = 16


def expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The rows ``[starts[m], starts[m] + lengths[m])`` of every run, concatenated, int64.

    Example: ``expand_runs([10, 3], [2, 3])`` is ``[10, 11, 3, 4, 5]``.
    """
    lengths = np.asarray(lengths, np.int64)
    first = np.cumsum(lengths) - lengths  # where each run begins in the output
    shift = np.asarray(starts, np.int64) - first
    return np.repeat(shift, lengths) + np.arange(int(first[-1] + lengths[-1]) if len(lengths) else 0)


class CellTables:
    """The cell tables of a cache's live sequences, keyed by sequence id, in one int32 store.

    Iterating gives the sequence ids in insertion order. Views returned by `cells` are valid until the
    next call that changes a table's length or room (copy one to keep it).
    """

    __slots__ = ("store", "offset", "length", "room", "_slots", "_free", "_end")

    def __init__(self, sequences: int = 16, entries: int = 256) -> None:
        self._reset(sequences, entries)

    def _reset(self, sequences: int, entries: int) -> None:
        self.store = np.empty(entries, np.int32)
        self.offset = np.zeros(sequences, np.int64)  # [slots] first entry of each slot's table
        self.length = np.zeros(sequences, np.int32)  # [slots] entries in use
        self.room = np.zeros(sequences, np.int32)  # [slots] entries reserved
        self._slots: dict[int, int] = {}  # sequence id -> slot, in insertion order
        self._free = list(range(sequences))  # free slots, a heap (the lowest is taken first)
        self._end = 0  # no table entry at or after store[end]

    # ---- queries ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, seq: int) -> bool:
        return seq in self._slots

    def __iter__(self) -> Iterator[int]:
        return iter(self._slots)

    def items(self) -> Iterator[tuple[int, int]]:
        """``(sequence id, slot)`` of the live sequences, in insertion order."""
        return iter(self._slots.items())

    def slot(self, seq: int) -> int | None:
        """The slot of sequence `seq`, or None when it holds no cells."""
        return self._slots.get(seq)

    def slots(self, seqs: list[int]) -> np.ndarray | None:
        """``[S]`` int64 the slot of each of `seqs`, or None when one of them holds no cells."""
        try:
            return np.fromiter(map(self._slots.__getitem__, seqs), np.int64, len(seqs))
        except KeyError:
            return None

    def cells(self, slot: int) -> np.ndarray:
        """Slot `slot`'s table ``[length]`` int32 (a view into the store)."""
        start = int(self.offset[slot])
        return self.store[start : start + int(self.length[slot])]

    def total(self) -> int:
        """Entries over all tables (a cell shared by k sequences counts k times)."""
        return int(self.length.sum(dtype=np.int64))

    def csr(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tables of ``slots [S]`` in CSR form: ``indptr [S + 1]`` int32 and ``indices [indptr[S]]``
        int32, slot ``slots[s]``'s table at ``indices[indptr[s]:indptr[s + 1]]``."""
        lengths = self.length[slots]
        indptr = np.zeros(len(slots) + 1, np.int32)
        np.add.accumulate(lengths, out=indptr[1:])  # cumsum, without its cast to int64 and back
        # expand_runs(offset[slots], lengths), with the run starts in the output taken from indptr
        rows = np.repeat(self.offset[slots] - indptr[:-1], lengths)
        rows += np.arange(len(rows))
        return indptr, self.store[rows]

    def live_slots(self) -> np.ndarray:
        """``[S]`` int64 the slots of the live sequences, in insertion order."""
        return np.fromiter(self._slots.values(), np.int64, len(self._slots))

    # ---- changes ---------------------------------------------------------------------------------
    def add(self, seq: int, cells: np.ndarray) -> int:
        """Start the table of the new sequence `seq` with ``cells [n]``; returns its slot."""
        assert seq not in self._slots, "the sequence already has a table"
        if not self._free:
            self._grow_slots()
        slot = heapq.heappop(self._free)
        self._slots[seq] = slot
        self.length[slot] = 0
        self.room[slot] = 0
        self.extend(slot, cells)
        return slot

    def drop(self, seq: int) -> None:
        """Forget sequence `seq`'s table (its slot becomes free)."""
        slot = self._slots.pop(seq)
        self.length[slot] = 0
        self.room[slot] = 0
        heapq.heappush(self._free, slot)

    def extend(self, slot: int, cells: np.ndarray) -> None:
        """Append ``cells [n]`` to slot `slot`'s table (their positions follow its last one)."""
        n = len(cells)
        self._reserve(slot, n)
        start = int(self.offset[slot] + self.length[slot])
        self.store[start : start + n] = cells
        self.length[slot] += n

    def make_room(self, slots: np.ndarray) -> None:
        """Make room for one more entry in each table of ``slots [S]`` that has none (a decode step's
        append, `Cells.commit_decode`, writes that entry into the arrays itself)."""
        for slot in slots[self.length[slots] >= self.room[slots]].tolist():
            self._reserve(slot, 1)

    def write(self, slot: int, start: int, cells: np.ndarray) -> None:
        """Overwrite entries ``[start, start + n)`` of slot `slot`'s table with ``cells [n]``."""
        assert start + len(cells) <= self.length[slot]
        first = int(self.offset[slot]) + start
        self.store[first : first + len(cells)] = cells

    def delete(self, slot: int, start: int, count: int) -> None:
        """Drop `count` entries from index `start` of slot `slot`'s table."""
        if count:
            table = self.cells(slot)
            table[start : len(table) - count] = table[start + count :].copy()
            self.length[slot] -= count

    def keep(self, slot: int, mask: np.ndarray) -> None:
        """Keep the entries of slot `slot`'s table where ``mask [length]`` is true, in order."""
        table = self.cells(slot)
        kept = table[mask]
        table[: len(kept)] = kept
        self.length[slot] = len(kept)

    def remap(self, mapping: np.ndarray) -> None:
        """Replace every entry c of every table with ``mapping[c]`` (``mapping [capacity]``, integers)."""
        live = self.live_slots()
        if len(live):
            rows = expand_runs(self.offset[live], self.length[live])
            self.store[rows] = mapping[self.store[rows]]

    def load(self, seq_ids: list[int], indptr: np.ndarray, cells: np.ndarray) -> None:
        """Replace every table with those of ``seq_ids [S]``: ``cells[indptr[s]:indptr[s + 1]]``."""
        self._reset(max(16, len(seq_ids)), max(256, 4 * len(cells)))
        for i, seq in enumerate(seq_ids):
            self.add(seq, cells[indptr[i] : indptr[i + 1]])

    def copy(self) -> CellTables:
        """An independent copy (same slots, same layout)."""
        other = CellTables.__new__(CellTables)
        other.store, other.offset = self.store.copy(), self.offset.copy()
        other.length, other.room = self.length.copy(), self.room.copy()
        other._slots, other._free, other._end = dict(self._slots), list(self._free), self._end
        return other

    # ---- room ------------------------------------------------------------------------------------
    def _reserve(self, slot: int, more: int) -> None:
        """Make room in slot `slot`'s region for `more` entries after its last."""
        length, room = int(self.length[slot]), int(self.room[slot])
        if length + more <= room:
            return
        new_room = max(MIN_ROOM, 2 * (length + more))
        offset = int(self.offset[slot])
        if room and offset + room == self._end and offset + new_room <= len(self.store):
            self.room[slot] = new_room  # the last region grows in place
            self._end = offset + new_room
            return
        if self._end + new_room > len(self.store):
            self._compact(new_room)
        offset, start = int(self.offset[slot]), self._end
        self.store[start : start + length] = self.store[offset : offset + length]
        self.offset[slot], self.room[slot] = start, new_room
        self._end = start + new_room

    def _compact(self, extra: int) -> None:
        """Move the live tables to the front of the store, each with its room, leaving `extra` entries
        free at the end (the store doubles until the tables fill at most half of it)."""
        live = self.live_slots()
        rooms = self.room[live].astype(np.int64)
        used = int(rooms.sum())
        size = len(self.store)
        while 2 * (used + extra) > size:
            size *= 2
        store = np.empty(size, np.int32)
        offsets = np.cumsum(rooms) - rooms
        if len(live):
            lengths = self.length[live]
            store[expand_runs(offsets, lengths)] = self.store[expand_runs(self.offset[live], lengths)]
            self.offset[live] = offsets
        self.store = store
        self._end = used

    def _grow_slots(self) -> None:
        """Double the slot arrays (every slot is taken)."""
        old = len(self.offset)
        for name in ("offset", "length", "room"):
            array = getattr(self, name)
            grown = np.zeros(2 * old, array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        self._free = list(range(old, 2 * old))

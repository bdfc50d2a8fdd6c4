"""Encoder-cache bookkeeping: free rows as extents, entries, first-fit placement. Host Python, no K/V data.

Each storage dtype of an `kvarray.encoder.EncoderCache` has pools of `capacity` rows; a sequence's
*entry* is one contiguous extent ``[start, start + M)`` of them, the same rows in every layer. This
module decides where entries go (`ExtentList`, `place`) and what an entry is (`Entry`, `EntryInfo`), and
checks the bookkeeping of a saved state (`check_entries`); the cache joins it with the pools.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import CacheFull

#: `ExtentList.first_fit` when no free extent is long enough.
NO_EXTENT = -1


class ExtentList:
    """Free rows of one pool as sorted, coalesced ``[start, length]`` extents; first-fit allocation.

    The representation is canonical (sorted by start, no two extents touching), so allocating and freeing
    the same extent restores it exactly.
    """

    __slots__ = ("capacity", "starts", "lengths")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.starts: list[int] = [0]
        self.lengths: list[int] = [capacity]

    @property
    def free(self) -> int:
        """Free rows in all extents."""
        return sum(self.lengths)

    @property
    def largest(self) -> int:
        """The longest free extent (0 when full)."""
        return max(self.lengths, default=0)

    def first_fit(self, n: int) -> int:
        """The start of the first free extent holding `n` rows, or `NO_EXTENT`; changes nothing."""
        return next((s for s, m in zip(self.starts, self.lengths, strict=True) if m >= n), NO_EXTENT)

    def take(self, start: int, n: int) -> None:
        """Mark ``[start, start + n)`` used; it must lie at the front of a free extent (`first_fit`'s)."""
        i = bisect.bisect_left(self.starts, start)
        assert self.starts[i] == start and self.lengths[i] >= n, "take() of rows that are not free"
        if self.lengths[i] == n:
            del self.starts[i], self.lengths[i]
        else:
            self.starts[i] += n
            self.lengths[i] -= n

    def release(self, start: int, n: int) -> None:
        """Mark ``[start, start + n)`` free again, coalescing with the neighbouring free extents."""
        i = bisect.bisect_left(self.starts, start)
        joins_prev = i > 0 and self.starts[i - 1] + self.lengths[i - 1] == start
        joins_next = i < len(self.starts) and start + n == self.starts[i]
        if joins_prev and joins_next:
            self.lengths[i - 1] += n + self.lengths[i]
            del self.starts[i], self.lengths[i]
        elif joins_prev:
            self.lengths[i - 1] += n
        elif joins_next:
            self.starts[i], self.lengths[i] = start, self.lengths[i] + n
        else:
            self.starts.insert(i, start)
            self.lengths.insert(i, n)

    def reset(self, used: Sequence[tuple[int, int]]) -> None:
        """Rebuild the free extents as the complement of the disjoint used ``(start, length)`` extents."""
        self.starts, self.lengths = [], []
        cursor = 0
        for start, n in sorted(used):
            if start > cursor:
                self.starts.append(cursor)
                self.lengths.append(start - cursor)
            cursor = start + n
        if cursor < self.capacity:
            self.starts.append(cursor)
            self.lengths.append(self.capacity - cursor)


@dataclass(slots=True)
class Entry:
    """One encoder output: rows ``[start, start + length)`` of the `dtype` pools of every layer.

    Attributes:
        dtype: storage precision of the pools holding it; modality: what it encodes.
        written: ``[num_layers]`` bool, the layers whose K/V have been put.
        refs: sequences pointing at it (> 1 after `fork`).
        serial: unique per entry ever made (staging buffers remember what they hold by serial).
    """

    dtype: str
    start: int
    length: int
    modality: str
    written: np.ndarray
    refs: int
    serial: int

    @property
    def complete(self) -> bool:
        """Every layer written."""
        return bool(self.written.all())


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """A read-only description of a sequence's entry (for inspection and tests)."""

    dtype: str
    start: int
    length: int
    modality: str
    layers_written: tuple[int, ...]
    refs: int


def place(free: ExtentList, lengths: Sequence[int], what: str) -> list[int]:
    """Take an extent for each of `lengths` (rows) from `free` and return their starts: side by side, in
    order, when one free extent holds them all, first fit one by one otherwise.

    Raises `CacheFull` (asked = the rows summed, free = the free rows; `what` names the rows in the
    message) with `free` unchanged.
    """
    total = sum(lengths)
    block = free.first_fit(total)
    starts: list[int] = []
    for n in lengths:
        start = block + sum(lengths[: len(starts)]) if block != NO_EXTENT else free.first_fit(n)
        if start == NO_EXTENT:
            for a, m in zip(starts, lengths, strict=False):
                free.release(a, m)
            raise CacheFull(total, free.free, f"{what} (largest free extent {free.largest})")
        free.take(start, n)
        starts.append(start)
    return starts


def check_entries(
    arrays: Mapping[str, np.ndarray], dtypes: Sequence[str], modality_dtypes: Mapping[str, str],
    capacity: Mapping[str, int], num_layers: int, max_sequences: int,
) -> str:
    """Why the ``entries.*`` arrays of a saved state are not a consistent bookkeeping, or "".

    ``entries.table [E, 4]`` (dtype index into `dtypes`, start, length, modality index into the sorted
    modalities), ``entries.written [E, num_layers]``, ``entries.seq_ids [n]``, ``entries.seq_entry [n]``.
    """
    table, written, ids, rows = (arrays.get(f"entries.{k}") for k in ("table", "written", "seq_ids",
                                                                        "seq_entry"))
    if table is None or written is None or ids is None or rows is None:
        return "entries.table, entries.written, entries.seq_ids and entries.seq_entry are needed"
    wanted = (("table", table, "i", 2), ("written", written, "ub", 2), ("seq_ids", ids, "i", 1),
              ("seq_entry", rows, "i", 1))
    for name, arr, kinds, rank in wanted:
        flags = name == "written" and arr.size and arr.max() > 1
        if arr.dtype.kind not in kinds or arr.ndim != rank or flags:
            what = "0/1 uint8" if name == "written" else "int64"
            return f"entries.{name} must be {what} of rank {rank}, got {arr.dtype} {tuple(arr.shape)}"
    n = len(table)
    if table.shape != (n, 4) or written.shape != (n, num_layers) or ids.shape != rows.shape:
        return "entries arrays of mismatched shapes"
    if len(ids) > max_sequences or len(np.unique(ids)) != len(ids):
        return "too many or repeated sequence ids"
    if len(rows) and (rows.min() < 0 or rows.max() >= n) or len(np.unique(rows)) != n:
        return "every entry needs a sequence, and every sequence an entry"
    if n and ((table[:, 0] < 0).any() or (table[:, 0] >= len(dtypes)).any()
              or (table[:, 3] < 0).any() or (table[:, 3] >= len(modality_dtypes)).any()):
        return "dtype or modality index out of range"
    modalities = sorted(modality_dtypes)
    for d_index, dtype in enumerate(dtypes):
        ext = table[table[:, 0] == d_index][:, 1:3] if n else np.empty((0, 2), np.int64)
        ext = ext[np.argsort(ext[:, 0])]
        ends = ext.sum(1)
        if len(ext) and ((ext[:, 1] <= 0).any() or ext[0, 0] < 0 or (ends > capacity[dtype]).any()
                         or (ext[1:, 0] < ends[:-1]).any()):
            return f"{dtype} extents out of range or overlapping"
    if any(modality_dtypes[modalities[int(t[3])]] != dtypes[int(t[0])] for t in table):
        return "an entry stored in another precision than its modality's"
    return ""

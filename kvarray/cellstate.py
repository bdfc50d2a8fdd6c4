"""Whole-state operations on the bookkeeping of `kvarray.cells.Cells`: defragmentation (a plan of moves
that compacts used cells to the front, and the renumbering after the pools moved) and the state
(export as arrays, restore, consistency check). Host NumPy integers only, never K/V data; `Cells`
exposes each function as a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .cells import FREE_CELL, round_up
from .celltables import expand_runs

if TYPE_CHECKING:
    from .cells import Cells


@dataclass(frozen=True, slots=True)
class DefragPlan:
    """Runs of cell moves: rows ``[src[m], src[m] + length[m])`` go to ``[dst[m], ...)``, int64 ``[M]`` each.

    `cells_moved` is ``length.sum()``; `n_kv_before` / `n_kv_after` the pool view length around it.
    """

    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray
    cells_moved: int
    n_kv_before: int
    n_kv_after: int



def plan_defrag(cells: Cells) -> DefragPlan:
    """Compact used cells to the front, each sequence's cells in position order (a shared prefix goes
    with the first sequence that holds it; sequences in order of their first cell), merged into runs."""
    n_kv_before = cells.n_kv
    new_index = np.full(cells.capacity, FREE_CELL, np.int64)
    nxt = 0
    tables = sorted((rows for _, rows in cells.sequences()), key=lambda rows: int(rows[0]))
    for rows in tables:
        unplaced = rows[new_index[rows] == FREE_CELL]
        new_index[unplaced] = np.arange(nxt, nxt + len(unplaced))
        nxt += len(unplaced)
    assert nxt == cells.used
    old = np.flatnonzero(new_index != FREE_CELL)
    new = new_index[old]
    by_new = np.argsort(new, kind="stable")
    old, new = old[by_new], new[by_new]
    moving = old != new
    old, new = old[moving], new[moving]
    if old.size == 0:
        empty = np.empty(0, np.int64)
        return DefragPlan(empty, empty, empty, 0, n_kv_before, n_kv_before)
    breaks = np.flatnonzero((np.diff(old) != 1) | (np.diff(new) != 1)) + 1
    run_starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((run_starts, [len(old)])))
    return DefragPlan(
        old[run_starts], new[run_starts], lengths.astype(np.int64), int(len(old)),
        n_kv_before, min(round_up(cells.used), cells.capacity),
    )


def apply_defrag(cells: Cells, plan: DefragPlan) -> None:
    """Renumber the bookkeeping after the pools moved by `plan` (`plan_defrag`'s, nothing in between)."""
    if plan.cells_moved == 0:
        return
    old = expand_runs(plan.src, plan.length)
    new = expand_runs(plan.dst, plan.length)
    remap = np.arange(cells.capacity, dtype=np.int64)
    remap[old] = new
    positions, refs = cells.positions.copy(), cells.refs.copy()
    cells.positions[:] = FREE_CELL
    cells.refs[:] = 0
    used = np.flatnonzero(refs)
    cells.positions[remap[used]] = positions[used]
    cells.refs[remap[used]] = refs[used]
    cells.tables.remap(remap)
    cells.reset_hints(lowest_free=cells.used, top=cells.used)


def export(cells: Cells) -> dict[str, np.ndarray]:
    """The bookkeeping as arrays: ``positions [capacity]`` int64, ``refs [capacity]`` int32, ``seq_ids
    [S]`` int64, ``seq_indptr [S + 1]`` int64 and ``seq_cells [nnz]`` int32 (CSR of the cell tables)."""
    indptr, owned = cells.tables.csr(cells.tables.live_slots())
    return {
        "positions": cells.positions.copy(),
        "refs": cells.refs.copy(),
        "seq_ids": np.asarray(list(cells.tables), np.int64),
        "seq_indptr": indptr.astype(np.int64),
        "seq_cells": owned.astype(np.int32),
    }


def restore(cells: Cells, state: dict[str, np.ndarray]) -> None:
    """Replace the bookkeeping with `export`'s arrays. The caller has checked them with `check_state`."""
    cells.positions[:] = state["positions"]
    cells.refs[:] = state["refs"]
    cells.tables.load(state["seq_ids"].tolist(), state["seq_indptr"], state["seq_cells"])
    cells.used = int(np.count_nonzero(cells.refs))
    free = np.flatnonzero(cells.refs == 0)
    cells.reset_hints(lowest_free=int(free[0]) if free.size else cells.capacity, top=None)


def check_state(cells: Cells, state: dict[str, np.ndarray]) -> str:
    """Why `state` is not a consistent bookkeeping for these cells, or "" when it is."""
    want = {"positions": (np.int64, (cells.capacity,)), "refs": (np.int32, (cells.capacity,))}
    for name, (dtype, shape) in want.items():
        arr = state.get(name)
        if arr is None or arr.dtype != dtype or arr.shape != shape:
            return f"{name} must be {np.dtype(dtype)} {shape}"
    ids, indptr, owned = state.get("seq_ids"), state.get("seq_indptr"), state.get("seq_cells")
    if ids is None or indptr is None or owned is None or ids.ndim != 1 or indptr.shape != (len(ids) + 1,):
        return "seq_ids [S], seq_indptr [S + 1] and seq_cells [nnz] are needed"
    if len(ids) > cells.max_sequences or len(np.unique(ids)) != len(ids):
        return "too many or repeated sequence ids"
    if indptr[0] != 0 or indptr[-1] != len(owned) or (np.diff(indptr) <= 0).any():
        return "seq_indptr must rise from 0 to len(seq_cells), every sequence holding a cell"
    if len(owned) and (owned.min() < 0 or owned.max() >= cells.capacity):
        return "seq_cells outside [0, capacity)"
    counts = np.bincount(owned.astype(np.int64), minlength=cells.capacity)
    if not np.array_equal(counts, state["refs"]):
        return "refs do not count the sequences owning each cell"
    if not np.array_equal(state["refs"] == 0, state["positions"] == FREE_CELL):
        return "free cells and FREE_CELL positions disagree"
    for i in range(len(ids)):
        pos = state["positions"][owned[indptr[i] : indptr[i + 1]]]
        if (np.diff(pos) <= 0).any():
            return f"sequence {int(ids[i])}'s cells are not in increasing position order"
    return ""

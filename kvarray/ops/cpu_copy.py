"""Copies of many byte pieces, shared by the calling thread and one helper thread: the ``@numba.njit`` kernel
behind `kvarray.ops.cpu.copy_runs` and the thread that helps it.

Why not ``prange`` (as the other kernels): a parallel region ends at a barrier that waits for every thread
of the team, also one the OS has not scheduled yet. On a busy machine (more runnable threads than cores)
that wait is a time slice of some other process, longer than a copy of several megabytes takes. Here the
work list is a pair of counters instead: every thread running `copy_pieces` on one list takes the next
piece with an atomic fetch-and-add until none is left, and the caller then waits only for the pieces
another thread took and has not finished. The helper is an extra pair of hands, never needed: when it
comes late, the caller has copied everything and the helper finds the list empty. Small calls run on the
calling thread alone (the serial path: no thread is woken).

Numba's on-disk cache notices edits only to the file of a cached function: after editing a helper in
`cpu_njit.py` that these kernels use, touch this file too (or clear ``__pycache__``).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_njit import _move_bytes, _store_fence

_njit = numba.njit(nogil=True, cache=True, error_model="numpy")

#: Bytes one piece copies at most: the most a caller may wait for after the work list is empty.
PIECE_BYTES = 256 << 10
#: Width of one non-temporal store (a cache line): the destination is written around the caches in whole
#: lines, never read first.
LINE_BYTES = 64
#: A streamed copy goes through blocks of `BLOCK_PAGES` pages of `PAGE_BYTES`, `STEP_BYTES` from each page
#: per step (all loads of a step before its stores, the source `PREFETCH_BYTES` ahead prefetched): the loop
#: of glibc's memcpy for copies above its non-temporal threshold (a line-by-line loop was ~15 % slower).
PAGE_BYTES, BLOCK_PAGES, STEP_BYTES, PREFETCH_BYTES = 4096, 4, 128, 256
#: Slots of a work list's ``counters [2]`` int64: the next piece to take, the pieces finished.
TAKEN, FINISHED = 0, 1


@intrinsic
def _fetch_add(typingctx, counters, slot, value):
    """``counters[slot] += value`` atomically (sequentially consistent); returns the value before."""
    if not (
        isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1
        and isinstance(slot, types.Integer) and isinstance(value, types.Integer)
    ):
        return None

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        pointer = cgutils.get_item_pointer(context, builder, sig.args[0], array, [index])
        amount = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, amount, "seq_cst")

    return types.int64(counters, slot, value), codegen


@intrinsic
def _stream_line(typingctx, dst, src):
    """Copy `LINE_BYTES` from address `src` to the `LINE_BYTES`-aligned address `dst` with a non-temporal
    store (one 64-byte store with AVX-512, split by LLVM into narrower ones on other targets)."""
    if not (isinstance(dst, types.Integer) and isinstance(src, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vector = ir.VectorType(ir.IntType(64), LINE_BYTES // 8)
        value = builder.load(builder.inttoptr(args[1], vector.as_pointer()), align=1)
        store = builder.store(value, builder.inttoptr(args[0], vector.as_pointer()), align=LINE_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.none(dst, src), codegen


@intrinsic
def _stream_step(typingctx, dst, src):
    """One step of a streamed block: load `STEP_BYTES` at address ``src + p * PAGE_BYTES`` for each of the
    `BLOCK_PAGES` pages p, then store them at ``dst + p * PAGE_BYTES`` (`LINE_BYTES`-aligned) with
    non-temporal stores."""
    if not (isinstance(dst, types.Integer) and isinstance(src, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vector, address = ir.VectorType(ir.IntType(64), STEP_BYTES // 8), ir.IntType(64)
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        offsets = [ir.Constant(address, p * PAGE_BYTES) for p in range(BLOCK_PAGES)]
        values = [
            builder.load(builder.inttoptr(builder.add(args[1], at), vector.as_pointer()), align=1)
            for at in offsets
        ]
        for at, value in zip(offsets, values, strict=True):
            store = builder.store(value, builder.inttoptr(builder.add(args[0], at), vector.as_pointer()),
                                  align=LINE_BYTES)
            store.set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()

    return types.none(dst, src), codegen


@intrinsic
def _prefetch(typingctx, address):
    """Prefetch the cache line at integer `address` into every cache level (``prefetcht0`` on x86-64)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32])
        )
        read, keep, data = ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)
        builder.call(prefetch, [builder.inttoptr(args[0], byte_pointer), read, keep, data])
        return context.get_dummy_value()

    return types.none(address), codegen


@_njit
def _stream_lines(dst, src, nbytes):
    """Copy `nbytes` from address `src` to address `dst` (all uint64): whole-line non-temporal stores
    between memmoved unaligned head and tail bytes (a plain memmove below two lines)."""
    line = np.uint64(LINE_BYTES)
    if nbytes < np.uint64(2 * LINE_BYTES):
        _move_bytes(dst, src, nbytes)
        return
    head = (line - dst % line) % line
    if head:
        _move_bytes(dst, src, head)
    lines = (nbytes - head) // line
    for i in range(lines):
        at = head + np.uint64(i) * line
        _stream_line(dst + at, src + at)
    done = head + lines * line
    if done < nbytes:
        _move_bytes(dst + done, src + done, nbytes - done)


@_njit
def _copy_piece(dst, src, nbytes, stream):
    """Copy `nbytes` from address `src` to address `dst` (all uint64, not overlapping): memmove, or with
    `stream` non-temporal stores, in blocks of `BLOCK_PAGES` destination pages (`_stream_step`) between
    an unaligned head and tail copied line by line."""
    if not stream:
        _move_bytes(dst, src, nbytes)
        return
    page, block = np.uint64(PAGE_BYTES), np.uint64(BLOCK_PAGES * PAGE_BYTES)
    head = min(nbytes, (page - dst % page) % page)
    _stream_lines(dst, src, head)
    blocks = (nbytes - head) // block
    step, ahead = np.uint64(STEP_BYTES), np.uint64(PREFETCH_BYTES)
    for b in range(blocks):
        first = head + np.uint64(b) * block
        for j in range(PAGE_BYTES // STEP_BYTES):
            at = first + np.uint64(j) * step
            for p in range(BLOCK_PAGES):
                _prefetch(src + at + np.uint64(p) * page + ahead)
            _stream_step(dst + at, src + at)
    done = head + blocks * block
    _stream_lines(dst + done, src + done, nbytes - done)


@_njit
def copy_pieces(counters, dst, dst_bytes, src, src_bytes, dst_at, src_at, size, stream):
    """Take pieces from a work list and copy them until none is left; any number of threads may run it at
    once on one list, each piece is copied by exactly one of them.

    Piece k (``dst_at``, ``src_at``, ``size``: ``[K]`` int64) copies ``size[k]`` bytes from address
    ``src + src_at[k]`` to ``dst + dst_at[k]``; `dst`, `src` are uint64 addresses of buffers of
    `dst_bytes`, `src_bytes` bytes (a piece reaching outside them is skipped, but counted as finished).
    ``counters [2]`` int64, zero before the first thread starts: `TAKEN`, `FINISHED`. `stream`:
    non-temporal stores, fenced before a piece counts as finished.
    """
    n_pieces = dst_at.shape[0]
    while True:
        k = _fetch_add(counters, TAKEN, 1)
        if k >= n_pieces:
            return
        n = size[k]
        if 0 <= dst_at[k] and dst_at[k] + n <= dst_bytes and 0 <= src_at[k] and src_at[k] + n <= src_bytes:
            _copy_piece(dst + np.uint64(dst_at[k]), src + np.uint64(src_at[k]), np.uint64(n), stream)
            if stream:
                _store_fence()
        _fetch_add(counters, FINISHED, 1)


@_njit
def pieces_finished(counters):
    """The work list's finished pieces (an atomic read of ``counters[FINISHED]``)."""
    return _fetch_add(counters, FINISHED, 0)


class CopyHelper:
    """One daemon thread that joins `copy_pieces` calls: `run` hands it the work list, copies on the
    calling thread, then waits for the pieces the helper took. Started at the first helped call (and again
    in a child process after ``fork``, which does not inherit threads)."""

    __slots__ = ("_jobs", "_pid", "_lock")

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...]] | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def run(self, args: tuple[Any, ...], helped: bool) -> None:
        """Copy the work list ``args`` (`copy_pieces`'s arguments, zeroed ``counters`` first): on this
        thread alone, or with `helped` together with the helper thread. Returns when every piece is copied."""
        if helped:
            self._queue().put(args)
        copy_pieces(*args)
        counters, n_pieces = args[0], args[5].shape[0]  # counters, ..., dst_at [K]
        while pieces_finished(counters) < n_pieces:  # the helper is finishing a piece it took
            os.sched_yield()

    def _queue(self) -> queue.SimpleQueue[tuple[Any, ...]]:
        with self._lock:
            if self._jobs is None or self._pid != os.getpid():
                self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(target=_serve, args=(self._jobs,), name="kvarray-copy", daemon=True).start()
            return self._jobs


def _serve(jobs: queue.SimpleQueue[tuple[Any, ...]]) -> None:
    """The helper thread: join each work list handed over (a late one is already empty: nothing to do)."""
    while True:
        copy_pieces(*jobs.get())

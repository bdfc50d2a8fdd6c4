"""`CausalCache`: preallocated K/V pools plus the bookkeeping of `kvarray.cells`, behind the cache interface.

The cache joins two halves that never meet otherwise: `Cells` decides which cells a batch writes (host
NumPy integers), the kernels of `kvarray.ops` move the data (`scatter_rows` on `put`, `gather_rows` for
the gathered view, `move_rows` for defragmentation and copy-on-write, `rope_shift` for `shift`).
See docs/causal.md for the design, the mask rule and examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import ops
from .batch import group_batch
from .buffers import DeviceCopies, StagingBuffers, check_layer, check_rows
from .cells import Cells, round_up
from .cellstate import DefragPlan, expand_runs
from .errors import CacheClosed, ConfigError, NoForwardPass, PositionError, ShapeMismatch, SpecMismatch
from .guard import (
    INT64_MAX,
    MAX_POSITION,
    BookkeepingUndo,
    RowBackup,
    as_int,
    as_int_array,
    check_batch_values,
    check_finite_kv,
    check_layer_type,
    exclusive,
    exclusive_checked,
    new_guard,
    position,
    seq_id,
)
from .spec import (
    DEFAULT_GROUP_SIZE,
    SCALE_DTYPE,
    KVDtypeArg,
    KVSpec,
    RopeSpec,
    check_group_size,
    kv_dtype_pair,
)
from .state import (
    STATE_FORMAT,
    build_state,
    check_cell_arrays,
    check_cell_positions,
    check_common,
    config_json,
    load_state,
    save_state,
    write_pools,
)
from .views import ForwardPlan, GatheredView, PageTable, PoolView, View
from .xp import default_namespace, resident_zeros, to_numpy

__all__ = ["STATE_FORMAT", "CacheStats", "CausalCache"]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a cache's occupancy.

    Attributes:
        capacity: cells in the pools.
        cells_used: cells owned by at least one sequence; cells_free: the rest.
        cells_shared: cells owned by more than one sequence (prefix sharing).
        tokens: the sequences' cell counts summed (a shared cell counts once per owner).
        sequences: live sequences.
        n_kv: the pool view's length; fragmentation: ``1 - cells_used / n_kv``.
        bytes_per_token: bytes one cell takes over all layers, keys plus values, scales included.
        bytes_in_use: ``cells_used * bytes_per_token``.
        defrags, cells_moved: defragmentations so far and the cells they moved.
    """

    capacity: int
    cells_used: int
    cells_free: int
    cells_shared: int
    tokens: int
    sequences: int
    n_kv: int
    fragmentation: float
    bytes_per_token: int
    bytes_in_use: int
    defrags: int
    cells_moved: int


class CausalCache:
    """A causal (decoder self-attention) KV cache over preallocated pools, one per layer.

    Args:
        spec: what one token costs per layer (`KVSpec`); `put` takes K/V in ``spec.dtype``.
        capacity: cells per pool (tokens the cache can hold, shared cells once).
        max_sequences: live sequences at most.
        window: sliding window W (a token at position p sees positions > p - W) or None. With a window
            a sequence keeps its first `sinks` cells and the last W; a decode token overwrites the oldest
            non-sink cell in place (ring write).
        sinks: K attention-sink cells kept at the start of every sequence (needs a window).
        kv_dtype: storage, "float32", "float16" or "int8", or a ``(key_dtype, value_dtype)`` pair;
            None: ``spec.dtype`` (float16 for the default spec).
        group_size: values per int8 scale (must divide ``num_kv_heads * head_dim``).
        defrag_threshold: fragmentation above which `start_forward` compacts the pools first (None: never).
        xp: array namespace of the pools (numpy or cupy); None: `kvarray.xp.default_namespace()`.
        check_finite: `put` refuses keys or values holding NaN or infinity (`NonFiniteValues`); on the
            host the scan runs in the kernel call that writes (about 3 microseconds for a decode step's
            ``[64, 8, 64]`` float16 keys and values), on a device it is a reduction and a synchronisation.
            False skips the check for float pools; int8 pools always check (a NaN or infinity would
            quantize to garbage). See docs/reliability.md.

    One thread at a time: a call made while another thread is inside the cache raises `ConcurrentUse`.
    Refused calls change nothing; `defrag` and `shift` are all-or-nothing; a `put` that fails inside
    its kernel drops the pass's tokens (`abort_forward`). See docs/reliability.md.

    Pools, per layer: keys and values ``[capacity, H, D]`` (NHD) in their storage dtype; an int8 pool adds
    scales ``[capacity, H * D // group_size]`` float16.
    """

    # ---- construction ----------------------------------------------------------------------------
    def __init__(
        self,
        spec: KVSpec,
        capacity: int,
        max_sequences: int,
        *,
        window: int | None = None,
        sinks: int = 0,
        kv_dtype: KVDtypeArg | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        defrag_threshold: float | None = 0.1,
        xp: ModuleType | None = None,
        check_finite: bool = True,
    ) -> None:
        self._guard = new_guard()  # `exclusive`: one thread at a time
        if defrag_threshold is not None and not 0.0 <= defrag_threshold <= 1.0:
            raise ConfigError(f"defrag_threshold must be in [0, 1] or None, got {defrag_threshold}")
        self.spec = spec
        self.kv_dtype = kv_dtype_pair(spec.dtype if kv_dtype is None else kv_dtype)
        self.group_size = int(group_size)
        if "int8" in self.kv_dtype:
            check_group_size(spec.row_values, self.group_size)
        self.defrag_threshold = defrag_threshold
        self.xp = default_namespace() if xp is None else xp
        self.check_finite = bool(check_finite)
        self._row_shape, self._row_dtype = (spec.num_kv_heads, spec.head_dim), np.dtype(spec.dtype)
        self._cells = Cells(capacity, max_sequences, window, sinks)
        # storage: one entry per layer
        shape = (capacity, spec.num_kv_heads, spec.head_dim)
        scale_shape = (capacity, spec.row_values // self.group_size)
        self._pools: list[list[Any]] = [[], []]  # keys, values
        self._scales: list[list[Any | None]] = [[], []]
        for which, name in enumerate(self.kv_dtype):
            for _ in range(spec.num_layers):
                self._pools[which].append(resident_zeros(self.xp, shape, name))
                scales = resident_zeros(self.xp, scale_shape, SCALE_DTYPE) if name == "int8" else None
                self._scales[which].append(scales)
        # each layer's put: one prepared writer for its two pools, which refuses NaN and infinity (int8
        # pools always) before writing (one kernel call scans and writes where the backend can)
        self._writers = [
            ops.kv_writer(self._pools[0][i], self._pools[1][i], self._scales[0][i], self._scales[1][i],
                          finite=self.check_finite)
            for i in range(spec.num_layers)
        ]
        # `put_layers`: one kernel call for every layer where the backend has one (float host pools)
        self._layers_writer = ops.kv_layers_writer(self._pools[0], self._pools[1], finite=self.check_finite)
        # which of a put's keys and values are scanned for NaN and infinity (int8 pools: always)
        scanned = [self.check_finite or name == "int8" for name in self.kv_dtype]
        self._finite = (scanned[0], scanned[1])
        # this forward pass
        self._plan: ForwardPlan | None = None
        self._aborted: ForwardPlan | None = None  # the last pass `abort_forward` dropped
        self._slots = np.empty(0, np.int64)  # the plan's slot_mapping as the kernels' index dtype
        self._device = DeviceCopies(self.xp)
        self._heads: tuple[int, Any, list[PoolView]] = (0, None, [])  # (n_kv, bias, each layer's PoolView)
        self._pages: PageTable | None = None  # this plan's page table, once asked for
        self._staging = StagingBuffers(self.xp)
        self._biases = StagingBuffers(np)  # the plans' biases: host arrays reused from pass to pass
        # counters
        self._defrags = 0
        self._cells_moved = 0
        self._closed = False

    @property
    def capacity(self) -> int:
        """Cells per pool."""
        return self._cells.capacity

    @property
    def max_sequences(self) -> int:
        """Live sequences (sequences holding at least one cell) at most."""
        return self._cells.max_sequences

    @property
    def window(self) -> int | None:
        """The sliding window in positions, or None."""
        return self._cells.window

    @property
    def sinks(self) -> int:
        """Attention-sink cells kept per sequence."""
        return self._cells.sinks

    @property
    def plan(self) -> ForwardPlan | None:
        """The current forward pass's plan (None before the first `start_forward`)."""
        return self._plan

    # ---- used by models --------------------------------------------------------------------------
    @exclusive_checked(lambda cache, layer, keys, values: check_layer_type(layer),
                       lambda cache: cache._abort_after_fault())
    def put(self, layer: int, keys: Any, values: Any) -> None:
        """Write this pass's keys and values of `layer` into the cells of ``plan.slot_mapping``.

        Args:
            layer: in ``[0, num_layers)``.
            keys, values: ``[T, num_kv_heads, head_dim]`` (NHD) in ``spec.dtype``, any DLPack producer on
                the cache's side (keys after RoPE). Quantized on the way into an int8 pool.

        Raises `NoForwardPass` (no current plan; `StalePlan` after a management call), `IndexOutOfRange`
        (layer), `ShapeMismatch` (rank, head shape or row count), `DTypeMismatch`, `NonFiniteValues` (NaN
        or infinity, see ``check_finite``). Nothing is written unless both arrays pass.
        """
        plan = self._current_plan()
        check_layer(layer, self.spec.num_layers)
        count = plan.num_tokens
        arrays = [self._check_rows("keys", keys, count), self._check_rows("values", values, count)]
        if count == 0:
            return
        # The plan's slot mapping was checked once in start_forward (distinct, in range) and the pools at
        # construction, so the layer's writer runs directly: no per-layer scan of the indices. It scans
        # the rows for NaN and infinity in the call that writes them (NonFiniteValues: nothing written).
        self._writers[layer](arrays[0], arrays[1], self._device.get("slot_mapping", self._slots))

    @exclusive_checked(lambda cache, keys, values: None, lambda cache: cache._abort_after_fault())
    def put_layers(self, keys: Any, values: Any) -> None:
        """`put` of every layer in one call, ``put(i, keys[i], values[i])`` for each layer i: for a model that
        has every layer's rows before it writes any (an ONNX graph of the whole decoder step).

        Args:
            keys, values: ``[num_layers, T, num_kv_heads, head_dim]`` in ``spec.dtype``, any DLPack producer
                on the cache's side. C-contiguous host NumPy rows into float pools take one kernel call for
                all layers (a decode step's writes: 2 x num_layers copies of T rows); the others are written
                layer by layer.

        Raises what `put` raises, `ShapeMismatch` also for a leading axis other than num_layers. Nothing is
        written unless every layer's keys and values pass, NaN and infinity included.
        """
        self._current_plan()
        self._check_layer_rows("put_layers", keys, values)
        self._write_layers(keys, values, self._device.get("slot_mapping", self._slots))

    @exclusive
    def write_rows(self, seq_ids: Any, positions: Any, keys: Any, values: Any) -> None:
        """Overwrite the keys and values of positions the sequences already hold, outside a forward pass:
        for a model that keeps a pass's rows itself and writes them back later (the engine's decode-view
        runner: docs/engine.md, "Deferred writes").

        Args:
            seq_ids, positions: ``[T]`` integers: token t is position ``positions[t]`` of ``seq_ids[t]``.
            keys, values: ``[num_layers, T, num_kv_heads, head_dim]`` in ``spec.dtype`` (as `put_layers`).

        A cell shared by several sequences (prefix sharing) is written for all of them: they hold the same
        token there. The bookkeeping does not change, so the current plan stays current.

        Raises `UnknownSequence`, `PositionError` (a position the sequence does not hold, or one cell named
        twice), `DTypeMismatch`, `ShapeMismatch`, `NonFiniteValues`, `CacheClosed`; nothing is written then.
        """
        self._check_open()
        seqs, where = as_int_array("seq_ids", seq_ids), as_int_array("positions", positions)
        if seqs.shape != where.shape:
            raise ShapeMismatch(f"seq_ids and positions must be [T] each, got {seqs.shape} and {where.shape}")
        self._check_layer_rows("write_rows", keys, values)
        cells = self._cells.cells_at(seqs, where)
        if len(np.unique(cells)) != len(cells):
            raise PositionError("write_rows names one cell twice (a token twice, or a shared cell twice)")
        self._write_layers(keys, values, self.xp.asarray(cells))

    def _check_layer_rows(self, what: str, keys: Any, values: Any) -> None:
        """Refuse keys and values whose leading axis is not the layers (`ShapeMismatch`)."""
        layers = self.spec.num_layers
        for name, arr in (("keys", keys), ("values", values)):
            shape = tuple(getattr(arr, "shape", ()))
            if len(shape) != 4 or shape[0] != layers:
                raise ShapeMismatch(
                    f"{what} {name} must be [num_layers = {layers}, T, kv_heads, head_dim], got "
                    f"{list(shape) if shape else type(arr).__name__}"
                )

    def _write_layers(self, keys: Any, values: Any, cells: Any) -> None:
        """Write ``keys[i]``, ``values[i]`` ``[T, H, D]`` of every layer i into ``cells [T]`` (int64,
        distinct, on the cache's side): every layer's rows checked and scanned before the first write."""
        count = len(cells)
        whole = (count, *self._row_shape)
        if self._layers_writer is not None and type(keys) is np.ndarray and type(values) is np.ndarray and \
                keys.shape[1:] == whole and values.shape[1:] == whole and keys.flags.c_contiguous and \
                values.flags.c_contiguous and count:
            if self._layers_writer(keys, values, cells):
                return
        rows = [(self._check_rows("keys", keys[i], count), self._check_rows("values", values[i], count))
                for i in range(self.spec.num_layers)]
        if count == 0:
            return
        for layer_keys, layer_values in rows:  # every layer's rows scanned before the first write
            check_finite_kv(layer_keys, layer_values, self._finite)
        for layer, (layer_keys, layer_values) in enumerate(rows):
            self._writers[layer](layer_keys, layer_values, cells)

    @exclusive_checked(lambda cache, layer, view: check_layer_type(layer))
    def get(self, layer: int, view: View | str = View.POOL) -> PoolView | GatheredView | PageTable:
        """What `layer` reads in this pass: every cell the batch's tokens may attend to, their own included.

        Args:
            layer: in ``[0, num_layers)``.
            view: `View.POOL` ("pool"): a `PoolView`, zero-copy ``[n_kv, H, D]`` slices and the bias
                ``[T, n_kv]``; `View.GATHERED` ("gathered"): a `GatheredView`, ``[S, H, L, D]`` copies
                (dequantized) and the bias ``[T, L]``; `View.PAGES` ("pages"): the `PageTable`.

        Raises `NoForwardPass` / `StalePlan`, `IndexOutOfRange` (layer), `ConfigError` (view).
        """
        plan = self._current_plan()
        check_layer(layer, self.spec.num_layers)
        kind = View.parse(view)
        if kind is View.POOL:  # the layers' views are kept while n_kv and the bias buffer stay the same
            return self._pool_views(plan.n_kv, self._device.get("bias", plan.bias))[layer]
        if kind is View.PAGES:  # built once per plan
            if self._pages is None:
                self._pages = self._page_table(plan)
            return self._pages
        pages = plan.page_table
        lengths = plan.gathered_lengths
        width = int(lengths.max(initial=0))
        indptr = self._device.get("kv_indptr", pages.kv_indptr)
        indices = self._device.get("kv_indices", pages.kv_indices)
        out = []
        for which in (0, 1):
            pool, scales = self._pools[which][layer], self._scales[which][layer]
            dtype = self.spec.dtype if scales is not None else pool.dtype
            shape = (plan.num_sequences, pool.shape[1], width, pool.shape[2])
            buf = self._staging.get((layer, which), shape, dtype)
            ops.gather_rows(pool, indptr, indices, buf, scales=scales)
            out.append(buf)
        bias = self._device.get("gathered_bias", plan.gathered_bias)
        return GatheredView(out[0], out[1], self._device.get("lengths", lengths), bias)

    # ---- cache management ------------------------------------------------------------------------
    @exclusive_checked(lambda cache, seq_ids, positions, defrag=True: check_batch_values(seq_ids, positions))
    def start_forward(self, seq_ids: Any, positions: Any, defrag: bool = True) -> ForwardPlan:
        """Assign a cell to every token of a batch and return the pass's `ForwardPlan`.

        Args:
            seq_ids: ``[T]`` integer sequence id of each token (any mix of sequences, prefill and decode).
            positions: ``[T]`` integer position of each token. A sequence's tokens are consecutive in batch
                order, and its first one is at the sequence's last position + 1 (a new sequence may start
                at any position >= 0).
            defrag: may defragment first: when fragmentation exceeds `defrag_threshold` and compaction
                would lower n_kv. False for a pass that reads no pool view (the engine's decode-view and
                gathered-view passes), which compaction would not make faster.

        Raises `ShapeMismatch`, `PositionError`, `TooManySequences`, `CacheFull` (with `asked` and
        `free`); a refused batch changes nothing.
        """
        self._check_open()
        batch = group_batch(to_numpy(seq_ids), to_numpy(positions))
        cells = self._cells
        defrag = defrag and self._should_defrag()
        decode = None if defrag else cells.commit_decode(batch)  # a plain decode step, allocated at once
        if decode is None:  # validate in full (a refused batch changes nothing: no compaction either)
            plans = cells.plan_batch(batch)
            if defrag:
                self._defrag()
                plans = cells.plan_batch(batch)
            slot_mapping = cells.commit_batch(batch, plans)
        else:
            slot_mapping = decode.slot_mapping
        _check_slots(slot_mapping, cells.capacity)
        slot_mapping.flags.writeable = False
        self._slots = slot_mapping.astype(np.int64)
        self._plan = ForwardPlan(
            batch.seq_ids, batch.positions, slot_mapping, batch.sequences, batch.token_seq,
            cells.n_kv, cells.window, cells.sinks, cells, cells.generation, self._biases,
            None if decode is None else decode.slots,
        )
        self._device.clear()
        self._pages = None
        return self._plan

    @exclusive
    def remove(self, seq: int, begin: int = 0, end: int | None = None) -> int:
        """Drop `seq`'s tokens at positions ``[begin, end)`` (end None: to the end); returns how many.

        A cell returns to the free list when its last owner leaves; a sequence left empty is forgotten.
        Raises `UnknownSequence`, `PositionError` (``begin < 0`` or ``end < begin``), `DTypeMismatch` (an
        argument that is not an integer).
        """
        self._check_open()
        seq, begin = seq_id(seq), position("begin", begin)
        end = None if end is None else as_int("end", end, 0, INT64_MAX, PositionError)
        return self._cells.remove(seq, begin, end)

    @exclusive
    def abort_forward(self) -> int:
        """Drop the current pass's tokens from their sequences; returns how many were dropped.

        For a pass that cannot complete (the model, an ONNX Runtime run or the sampler failed after some
        `put` calls): each sequence of the batch loses its positions from its first one in the batch, a
        sequence the batch started is forgotten, and the plan becomes stale. A `put` whose kernel fails
        does this itself before re-raising; calling it again then returns 0. With a window, the ring
        cells the pass overwrote held tokens that are gone: fail those sequences (or prefill them again).

        Raises `NoForwardPass` (no pass yet), `StalePlan` (the cache changed since the pass started).
        """
        self._check_open()
        plan = self._plan
        if plan is None:
            raise NoForwardPass("no forward pass to abort: start_forward has not been called")
        if plan is self._aborted:
            return 0
        plan.check_current()
        return self._drop_pass(plan)

    @exclusive
    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Share the first `length` cells of `src`'s cell table with the new sequence `dst` (no data copy).

        Raises `UnknownSequence` (src), `PositionError` (length < 0 or more than src holds),
        `SequenceExists` (dst holds cells), `TooManySequences`, `DTypeMismatch` / `IndexOutOfRange` (ids
        that are not int64 integers).
        """
        self._check_open()
        src, dst = seq_id(src, "src"), seq_id(dst, "dst")
        self._cells.copy_prefix(src, dst, as_int("length", length, error=PositionError))

    @exclusive
    def can_resume(self, seq: int, position: int) -> bool:
        """True iff a token of `seq` at `position` would be accepted by `start_forward` now.

        That is: `seq` holds no cells and position >= 0 and a new sequence fits `max_sequences`, or
        position is `seq`'s last position + 1; and a cell is free for it, or (window) it overwrites a ring
        cell. To resume at an earlier position, `remove(seq, position)` first. Positions outside
        ``[0, MAX_POSITION)`` are never accepted; arguments that are not integers raise `DTypeMismatch`.
        """
        self._check_open()
        seq, where = seq_id(seq), as_int("position", position, -math.inf, math.inf)
        return 0 <= where < MAX_POSITION and self._cells.can_resume(seq, where)

    @exclusive
    def shift(self, seq: int, delta: int, rope: RopeSpec | None, begin: int = 0) -> None:
        """Add `delta` to the positions of `seq`'s cells at positions >= `begin`, re-rotating their keys.

        Args:
            seq: a live sequence.
            delta: position change (negative after `remove(seq, a, b)`: ``shift(seq, a - b, rope, begin=b)``).
            rope: the model's `RopeSpec`: keys are rotated by `delta` with `ops.rope_shift` (int8 keys are
                dequantized, rotated and re-quantized); None changes positions only (no rotary embedding).
            begin: the first position that moves.

        Cells shared with other sequences are copied first (copy-on-write). Raises `UnknownSequence`,
        `PositionError` (a position would drop below 0, onto a kept position, or reach `MAX_POSITION`;
        a negative `begin`), `CacheFull` (no free cell for a copy), `ShapeMismatch` (rope's rotary_dim
        against head_dim), `ConfigError` (rope not a `RopeSpec`), `DTypeMismatch` (arguments that are not
        integers).

        All or nothing: when a kernel fails halfway (the copy or the rotation of some layer), the rotated
        key rows are written back from a copy taken first and the bookkeeping is restored, so every
        sequence reads what it read before; the exception then propagates.
        """
        self._check_open()
        seq, begin = seq_id(seq), position("begin", begin)
        delta = as_int("delta", delta, 1 - MAX_POSITION, MAX_POSITION - 1, PositionError)
        if rope is not None:
            if not isinstance(rope, RopeSpec):
                raise ConfigError(f"rope must be a RopeSpec or None, got {type(rope).__name__}")
            rope.rotary_dims(self.spec.head_dim)
        last = self._cells.last_position(seq)
        if last is not None and last >= begin and last + delta >= MAX_POSITION:
            raise PositionError(f"shifting sequence {seq} by {delta} would move position {last} past "
                                f"{MAX_POSITION - 1}")
        undo = BookkeepingUndo(self._cells)
        plan = self._cells.shift(seq, delta, begin)
        rotated: RowBackup | None = None
        try:
            if len(plan.copy_src):  # copy-on-write into fresh cells: no live row is overwritten
                ones = np.ones(len(plan.copy_src), np.int64)
                moves = (self._device.convert(a) for a in (plan.copy_src, plan.copy_dst, ones))
                ops.move_rows(self._all_pools(), *moves)
            if rope is not None and len(plan.cells):
                cells, deltas = self._device.convert(plan.cells), self._device.convert(plan.deltas)
                keys = [*self._pools[0], *(s for s in self._scales[0] if s is not None)]
                rotated = RowBackup(keys, cells)
                for layer in range(self.spec.num_layers):
                    ops.rope_shift(self._pools[0][layer], cells, deltas, rope, scales=self._scales[0][layer])
        except BaseException:
            if rotated is not None:
                rotated.restore()
            undo.restore()
            raise

    @exclusive
    def defrag(self) -> DefragPlan:
        """Compact used cells to the front now (each sequence's cells in order) and return the moves made.

        One `ops.move_rows` call moves keys, values and scales of every layer. Ends the current pass
        (its plan becomes stale); call it between passes. All or nothing: when the move fails halfway, the
        live rows it overwrote are written back from a copy taken first and the bookkeeping is left as it
        was (the current plan stays current); the exception then propagates.
        """
        self._check_open()
        return self._defrag()

    @exclusive
    def stats(self) -> CacheStats:
        """Occupancy, fragmentation and memory (`CacheStats`)."""
        self._check_open()
        c = self._cells
        per_token = self.spec.bytes_per_token(self.kv_dtype, self.group_size)
        return CacheStats(
            capacity=c.capacity, cells_used=c.used, cells_free=c.free, cells_shared=c.shared,
            tokens=c.tokens, sequences=len(c.tables), n_kv=c.n_kv, fragmentation=c.fragmentation,
            bytes_per_token=per_token, bytes_in_use=c.used * per_token,
            defrags=self._defrags, cells_moved=self._cells_moved,
        )

    @exclusive
    def length(self, seq: int) -> int:
        """Cells in `seq`'s cell table (its tokens, shared ones included; 0 for a sequence holding none),
        without copying the table. Raises `DTypeMismatch` / `IndexOutOfRange` (not an int64 integer)."""
        self._check_open()
        return self._cells.length(seq_id(seq))

    @exclusive
    def lengths(self, seqs: Any) -> np.ndarray:
        """``[S]`` int64 the `length` of each of ``seqs [S]`` (sequence ids), in one call. Raises
        `DTypeMismatch` / `IndexOutOfRange` (ids that are not int64 integers)."""
        self._check_open()
        return self._cells.lengths(as_int_array("seqs", seqs))

    @exclusive
    def cell_table(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """`seq`'s cells ``[n]`` int32 and their positions ``[n]`` int64, in position order (copies).

        For inspection and tests. Raises `UnknownSequence`, `DTypeMismatch` / `IndexOutOfRange`.
        """
        self._check_open()
        cells = self._cells.table(seq_id(seq)).copy()
        return cells, self._cells.positions[cells]

    @exclusive
    def sequences(self) -> list[int]:
        """The live sequence ids."""
        self._check_open()
        return list(self._cells.tables)

    @exclusive
    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole cache as host NumPy arrays (copies): configuration, bookkeeping, every pool.

        Keys: ``meta.config`` (uint8 JSON), ``cells.*`` (see `Cells.export`), ``layer.{i}.keys``,
        ``layer.{i}.values`` ``[capacity, H, D]``, and for int8 pools ``layer.{i}.key_scales`` /
        ``layer.{i}.value_scales`` ``[capacity, H * D // g]`` float16.
        """
        self._check_open()
        bookkeeping = {f"cells.{k}": v for k, v in self._cells.export().items()}
        return build_state(self._config_json(), bookkeeping, self._named_pools())

    @exclusive
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` bit for bit (sharing, positions, ring order, scales included).

        Raises `SpecMismatch` for a state made for another configuration (spec, capacity, max_sequences,
        window, sinks, storage dtypes, group size) or an inconsistent one (`StateFormatMismatch` for
        another layout version); the cache is then unchanged. Pool values are restored as they are.
        """
        self._check_open()
        check_common(state, self._config_json(), "cache", self._named_pools())
        cells_state = {k[len("cells.") :]: to_numpy(v) for k, v in state.items() if k.startswith("cells.")}
        why = check_cell_arrays(cells_state) or self._cells.check_state(cells_state)
        why = why or check_cell_positions(cells_state, MAX_POSITION)
        if why:
            raise SpecMismatch(f"inconsistent cache state: {why}")
        write_pools(state, self._named_pools(), self.xp)
        self._cells.restore(cells_state)

    @exclusive
    def save(self, path: str) -> None:
        """Write `state_dict` to a safetensors file (kind, configuration, layout version and a SHA-256 of
        the tensors in its metadata), atomically: an interrupted save leaves the previous file intact."""
        save_state(path, self.state_dict(), "causal")

    @exclusive
    def load(self, path: str) -> None:
        """Restore a file written by `save`. Raises `SpecMismatch` (cache unchanged) for another config,
        `CorruptFile` (truncated, garbled, checksum mismatch), `StateFormatMismatch` (another version)."""
        self._check_open()
        self.load_state_dict(load_state(path, "causal"))

    @exclusive
    def close(self) -> None:
        """Release the pools and staging buffers; any later use raises `CacheClosed`. Idempotent."""
        self._pools = [[], []]
        self._scales = [[], []]
        self._writers = []
        self._layers_writer = None
        self._staging.clear()
        self._device.clear()
        self._heads = (0, None, [])
        self._pages = None
        self._plan = None
        self._closed = True

    def __enter__(self) -> CausalCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosed("this cache was closed")

    def _abort_after_fault(self) -> None:
        """`put` failed after its checks (a kernel fault): drop the pass's tokens, maybe half written."""
        plan = self._plan
        if plan is not None and plan is not self._aborted and plan.is_current():
            self._drop_pass(plan)

    def _drop_pass(self, plan: ForwardPlan) -> int:
        """Remove the tokens of `plan` (current) from their sequences: each sequence's positions from its
        first one in the batch. Returns the tokens dropped; the plan becomes stale."""
        first = np.full(plan.num_sequences, INT64_MAX, np.int64)
        np.minimum.at(first, plan.token_seq, plan.positions)
        dropped = 0
        for seq, begin in zip(plan.sequences.tolist(), first.tolist(), strict=True):
            if seq in self._cells.tables:
                dropped += self._cells.remove(seq, begin)
        self._aborted = plan
        return dropped

    def _current_plan(self) -> ForwardPlan:
        plan = self._plan
        if plan is not None and not self._closed and plan.is_current():
            return plan  # the common case, in one test (put and get call this once per layer)
        self._check_open()
        if plan is None:
            raise NoForwardPass("call start_forward(seq_ids, positions) before put or get")
        plan.check_current()
        return plan

    def _check_rows(self, name: str, arr: Any, count: int) -> Any:
        fast = type(arr) is np.ndarray and self.xp is np and arr.dtype == self._row_dtype
        if fast and arr.shape == (count, *self._row_shape) and arr.flags.c_contiguous:
            return arr  # what a model loop passes: nothing to convert or report
        spec = self.spec
        dtypes = (np.dtype(spec.dtype),)
        return check_rows(name, arr, self.xp, count, spec.num_kv_heads, spec.head_dim, dtypes)

    def _page_table(self, plan: ForwardPlan) -> PageTable:
        pages = plan.page_table
        return PageTable(
            self._device.get("kv_indptr", pages.kv_indptr),
            self._device.get("kv_indices", pages.kv_indices),
            self._device.get("kv_last_page_len", pages.kv_last_page_len),
        )

    def _pool_views(self, n: int, bias: Any) -> list[PoolView]:
        """Each layer's `PoolView`: ``keys[:n]``, ``values[:n]``, the scales' ``[:n]`` and `bias`, kept while
        n_kv and the bias array stay the same (the plans of a decode loop share one bias buffer: the loop
        slices the pools once, not once per layer and step)."""
        if self._heads[0] != n or self._heads[1] is not bias or not self._heads[2]:
            views = [
                PoolView(self._pools[0][i][:n], self._pools[1][i][:n], _head(self._scales[0][i], n),
                         _head(self._scales[1][i], n), bias)
                for i in range(self.spec.num_layers)
            ]
            self._heads = (n, bias, views)
        return self._heads[2]

    def _all_pools(self) -> list[Any]:
        return [arr for _, arr in self._named_pools()]

    def _named_pools(self) -> list[tuple[str, Any]]:
        named = []
        for layer in range(self.spec.num_layers):
            for which, kind in enumerate(("key", "value")):
                named.append((f"layer.{layer}.{kind}s", self._pools[which][layer]))
                if self._scales[which][layer] is not None:
                    named.append((f"layer.{layer}.{kind}_scales", self._scales[which][layer]))
        return named

    def _should_defrag(self) -> bool:
        c = self._cells
        if self.defrag_threshold is None or c.used == 0 or c.fragmentation <= self.defrag_threshold:
            return False
        return min(round_up(c.used), c.capacity) < c.n_kv

    def _defrag(self) -> DefragPlan:
        """Plan and apply a compaction, all or nothing (docs/reliability.md): the destination rows that
        hold live data (sources of other moves) are copied first, so a move that fails halfway is undone
        by writing them back; rows that were free need no copy. The bookkeeping changes only after the
        move succeeded, and is restored if renumbering it fails."""
        cells = self._cells
        plan = cells.plan_defrag()
        if not plan.cells_moved:
            return plan
        targets = expand_runs(plan.dst, plan.length)
        overwritten = RowBackup(self._all_pools(), self._device.convert(targets[cells.refs[targets] > 0]))
        undo: BookkeepingUndo | None = None
        try:
            runs = (self._device.convert(a) for a in (plan.src, plan.dst, plan.length))
            ops.move_rows(self._all_pools(), *runs)
            undo = BookkeepingUndo(cells)
            cells.apply_defrag(plan)
        except BaseException:
            overwritten.restore()
            if undo is not None:
                undo.restore()
            raise
        self._defrags += 1
        self._cells_moved += plan.cells_moved
        return plan

    def _config_json(self) -> str:
        s, c = self.spec, self._cells
        return config_json({
            "num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
            "dtype": s.dtype, "capacity": c.capacity, "max_sequences": c.max_sequences,
            "window": c.window, "sinks": c.sinks, "kv_dtype": list(self.kv_dtype),
            "group_size": self.group_size,
        })


def _check_slots(slot_mapping: np.ndarray, capacity: int) -> None:
    """Assert what `put` relies on without checking it again per layer: the cells are distinct and in
    ``[0, capacity)`` (the bookkeeping chose them; a failure is a bug in kvarray)."""
    if len(slot_mapping):
        cells = slot_mapping.tolist()
        assert 0 <= min(cells) and max(cells) < capacity, "slot_mapping outside the pools"
        assert len(set(cells)) == len(cells), "slot_mapping writes a cell twice"


def _head(arr: Any | None, n: int) -> Any | None:
    """``arr[:n]``, or None for None."""
    return None if arr is None else arr[:n]

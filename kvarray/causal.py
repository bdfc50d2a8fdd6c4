"""`CausalCache`: preallocated K/V pools plus the bookkeeping of `kvarray.cells`, behind the cache interface.

The cache joins two halves that never meet otherwise: `Cells` decides which cells a batch writes (host
NumPy integers), the kernels of `kvarray.ops` move the data (`scatter_rows` on `put`, `gather_rows` for
the gathered view, `move_rows` for defragmentation and copy-on-write, `rope_shift` for `shift`).
See docs/causal.md for the design, the mask rule and examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import ops
from .batch import group_batch
from .buffers import DeviceCopies, StagingBuffers, check_layer, check_rows
from .cells import Cells, round_up
from .cellstate import DefragPlan
from .errors import CacheClosed, ConfigError, NoForwardPass, SpecMismatch
from .spec import (
    DEFAULT_GROUP_SIZE,
    SCALE_DTYPE,
    KVDtypeArg,
    KVSpec,
    RopeSpec,
    check_group_size,
    kv_dtype_pair,
)
from .state import STATE_FORMAT, build_state, check_common, config_json, load_state, save_state, write_pools
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
    ) -> None:
        if defrag_threshold is not None and not 0.0 <= defrag_threshold <= 1.0:
            raise ConfigError(f"defrag_threshold must be in [0, 1] or None, got {defrag_threshold}")
        self.spec = spec
        self.kv_dtype = kv_dtype_pair(spec.dtype if kv_dtype is None else kv_dtype)
        self.group_size = int(group_size)
        if "int8" in self.kv_dtype:
            check_group_size(spec.row_values, self.group_size)
        self.defrag_threshold = defrag_threshold
        self.xp = default_namespace() if xp is None else xp
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
        # each layer's put: one prepared writer for its two pools (one kernel call where the backend can)
        self._writers = [
            ops.kv_writer(self._pools[0][i], self._pools[1][i], self._scales[0][i], self._scales[1][i])
            for i in range(spec.num_layers)
        ]
        # this forward pass
        self._plan: ForwardPlan | None = None
        self._slots = np.empty(0, np.int64)  # the plan's slot_mapping as the kernels' index dtype
        self._device = DeviceCopies(self.xp)
        self._heads: tuple[int, list[tuple[Any, Any, Any, Any]]] = (0, [])  # (n_kv, each layer's slices)
        self._views: dict[int, PoolView | PageTable] = {}  # this plan's: layer -> PoolView, -1 -> PageTable
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
    def put(self, layer: int, keys: Any, values: Any) -> None:
        """Write this pass's keys and values of `layer` into the cells of ``plan.slot_mapping``.

        Args:
            layer: in ``[0, num_layers)``.
            keys, values: ``[T, num_kv_heads, head_dim]`` (NHD) in ``spec.dtype``, any DLPack producer on
                the cache's side (keys after RoPE). Quantized on the way into an int8 pool.

        Raises `NoForwardPass` (no current plan; `StalePlan` after a management call), `IndexOutOfRange`
        (layer), `ShapeMismatch` (rank, head shape or row count), `DTypeMismatch`. Nothing is written
        unless both arrays pass.
        """
        plan = self._current_plan()
        check_layer(layer, self.spec.num_layers)
        count = plan.num_tokens
        arrays = [self._check_rows("keys", keys, count), self._check_rows("values", values, count)]
        if count == 0:
            return
        # The plan's slot mapping was checked once in start_forward (distinct, in range) and the pools at
        # construction, so the layer's writer runs directly: no per-layer scan of the indices.
        self._writers[layer](arrays[0], arrays[1], self._device.get("slot_mapping", self._slots))

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
        kind = View.POOL if view is View.POOL or view == "pool" else View.parse(view)
        if kind is not View.GATHERED:  # built once per plan: the pool view per layer, the page table once
            key = layer if kind is View.POOL else -1
            found = self._views.get(key)
            if found is None:
                found = self._pool_view(plan, layer) if key >= 0 else self._page_table(plan)
                self._views[key] = found
            return found
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
    def start_forward(self, seq_ids: Any, positions: Any) -> ForwardPlan:
        """Assign a cell to every token of a batch and return the pass's `ForwardPlan`.

        Args:
            seq_ids: ``[T]`` integer sequence id of each token (any mix of sequences, prefill and decode).
            positions: ``[T]`` integer position of each token. A sequence's tokens are consecutive in batch
                order, and its first one is at the sequence's last position + 1 (a new sequence may start
                at any position >= 0).

        Defragments first when fragmentation exceeds `defrag_threshold` and compaction would lower n_kv.
        Raises `ShapeMismatch`, `PositionError`, `TooManySequences`, `CacheFull` (with `asked` and
        `free`); a refused batch changes nothing.
        """
        self._check_open()
        batch = group_batch(to_numpy(seq_ids), to_numpy(positions))
        cells = self._cells
        decode = cells.decode_tables(batch)  # the fast path of a plain decode step, else validate in full
        plans = cells.plan_batch(batch) if decode is None else []
        if self._should_defrag():
            self._defrag()
            decode = cells.decode_tables(batch)
            plans = cells.plan_batch(batch) if decode is None else []
        if decode is not None:
            slot_mapping = cells.commit_decode(batch, decode)
        else:
            slot_mapping = cells.commit_batch(batch, plans)
        _check_slots(slot_mapping, cells.capacity)
        slot_mapping.flags.writeable = False
        self._slots = slot_mapping.astype(np.int64)
        self._plan = ForwardPlan(
            batch.seq_ids, batch.positions, slot_mapping, batch.sequences, batch.token_seq,
            cells.n_kv, cells.window, cells.sinks, cells, cells.generation, self._biases,
        )
        self._device.clear()
        self._views.clear()
        return self._plan

    def remove(self, seq: int, begin: int = 0, end: int | None = None) -> int:
        """Drop `seq`'s tokens at positions ``[begin, end)`` (end None: to the end); returns how many.

        A cell returns to the free list when its last owner leaves; a sequence left empty is forgotten.
        Raises `UnknownSequence`, `PositionError` (``begin < 0`` or ``end < begin``).
        """
        self._check_open()
        return self._cells.remove(seq, begin, end)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Share the first `length` cells of `src`'s cell table with the new sequence `dst` (no data copy).

        Raises `UnknownSequence` (src), `PositionError` (length < 0 or more than src holds),
        `SequenceExists` (dst holds cells), `TooManySequences`.
        """
        self._check_open()
        self._cells.copy_prefix(src, dst, length)

    def can_resume(self, seq: int, position: int) -> bool:
        """True iff a token of `seq` at `position` would be accepted by `start_forward` now.

        That is: `seq` holds no cells and position >= 0 and a new sequence fits `max_sequences`, or
        position is `seq`'s last position + 1; and a cell is free for it, or (window) it overwrites a ring
        cell. To resume at an earlier position, `remove(seq, position)` first.
        """
        self._check_open()
        return self._cells.can_resume(seq, position)

    def shift(self, seq: int, delta: int, rope: RopeSpec | None, begin: int = 0) -> None:
        """Add `delta` to the positions of `seq`'s cells at positions >= `begin`, re-rotating their keys.

        Args:
            seq: a live sequence.
            delta: position change (negative after `remove(seq, a, b)`: ``shift(seq, a - b, rope, begin=b)``).
            rope: the model's `RopeSpec`: keys are rotated by `delta` with `ops.rope_shift` (int8 keys are
                dequantized, rotated and re-quantized); None changes positions only (no rotary embedding).
            begin: the first position that moves.

        Cells shared with other sequences are copied first (copy-on-write). Raises `UnknownSequence`,
        `PositionError` (a position would drop below 0 or onto a kept position), `CacheFull` (no free
        cell for a copy), `ShapeMismatch` (rope's rotary_dim against head_dim).
        """
        self._check_open()
        if rope is not None:
            rope.rotary_dims(self.spec.head_dim)
        plan = self._cells.shift(seq, delta, begin)
        if len(plan.copy_src):
            ones = np.ones(len(plan.copy_src), np.int64)
            moves = (self._device.convert(a) for a in (plan.copy_src, plan.copy_dst, ones))
            ops.move_rows(self._all_pools(), *moves)
        if rope is not None and len(plan.cells):
            cells, deltas = self._device.convert(plan.cells), self._device.convert(plan.deltas)
            for layer in range(self.spec.num_layers):
                ops.rope_shift(self._pools[0][layer], cells, deltas, rope, scales=self._scales[0][layer])

    def defrag(self) -> DefragPlan:
        """Compact used cells to the front now (each sequence's cells in order) and return the moves made.

        One `ops.move_rows` call moves keys, values and scales of every layer. Ends the current pass
        (its plan becomes stale); call it between passes.
        """
        self._check_open()
        return self._defrag()

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

    def length(self, seq: int) -> int:
        """Cells in `seq`'s cell table (its tokens, shared ones included; 0 for a sequence holding none),
        without copying the table."""
        self._check_open()
        table = self._cells.tables.get(int(seq))
        return 0 if table is None else table.n

    def cell_table(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """`seq`'s cells ``[n]`` int32 and their positions ``[n]`` int64, in position order (copies).

        For inspection and tests. Raises `UnknownSequence`.
        """
        self._check_open()
        cells = self._cells.table(seq).copy()
        return cells, self._cells.positions[cells]

    def sequences(self) -> list[int]:
        """The live sequence ids."""
        self._check_open()
        return list(self._cells.tables)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole cache as host NumPy arrays (copies): configuration, bookkeeping, every pool.

        Keys: ``meta.config`` (uint8 JSON), ``cells.*`` (see `Cells.export`), ``layer.{i}.keys``,
        ``layer.{i}.values`` ``[capacity, H, D]``, and for int8 pools ``layer.{i}.key_scales`` /
        ``layer.{i}.value_scales`` ``[capacity, H * D // g]`` float16.
        """
        self._check_open()
        bookkeeping = {f"cells.{k}": v for k, v in self._cells.export().items()}
        return build_state(self._config_json(), bookkeeping, self._named_pools())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` bit for bit (sharing, positions, ring order, scales included).

        Raises `SpecMismatch` for a state made for another configuration (spec, capacity, max_sequences,
        window, sinks, storage dtypes, group size) or an inconsistent one; the cache is then unchanged.
        """
        self._check_open()
        check_common(state, self._config_json(), "cache", self._named_pools())
        cells_state = {k[len("cells.") :]: to_numpy(v) for k, v in state.items() if k.startswith("cells.")}
        why = self._cells.check_state(cells_state)
        if why:
            raise SpecMismatch(f"inconsistent cache state: {why}")
        write_pools(state, self._named_pools(), self.xp)
        self._cells.restore(cells_state)

    def save(self, path: str) -> None:
        """Write `state_dict` to a safetensors file (kind, configuration and version in its metadata)."""
        save_state(path, self.state_dict(), "causal")

    def load(self, path: str) -> None:
        """Restore a file written by `save`. Raises `SpecMismatch` (cache unchanged) for another config."""
        self._check_open()
        self.load_state_dict(load_state(path, "causal"))

    def close(self) -> None:
        """Release the pools and staging buffers; any later use raises `CacheClosed`. Idempotent."""
        self._pools = [[], []]
        self._scales = [[], []]
        self._writers = []
        self._staging.clear()
        self._device.clear()
        self._heads = (0, [])
        self._views.clear()
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

    def _current_plan(self) -> ForwardPlan:
        self._check_open()
        if self._plan is None:
            raise NoForwardPass("call start_forward(seq_ids, positions) before put or get")
        self._plan.check_current()
        return self._plan

    def _check_rows(self, name: str, arr: Any, count: int) -> Any:
        fast = type(arr) is np.ndarray and self.xp is np and arr.dtype == self._row_dtype
        if fast and arr.shape == (count, *self._row_shape) and arr.flags.c_contiguous:
            return arr  # what a model loop passes: nothing to convert or report
        spec = self.spec
        dtypes = (np.dtype(spec.dtype),)
        return check_rows(name, arr, self.xp, count, spec.num_kv_heads, spec.head_dim, dtypes)

    def _pool_view(self, plan: ForwardPlan, layer: int) -> PoolView:
        return PoolView(*self._pool_slices(plan.n_kv)[layer], self._device.get("bias", plan.bias))

    def _page_table(self, plan: ForwardPlan) -> PageTable:
        pages = plan.page_table
        return PageTable(
            self._device.get("kv_indptr", pages.kv_indptr),
            self._device.get("kv_indices", pages.kv_indices),
            self._device.get("kv_last_page_len", pages.kv_last_page_len),
        )

    def _pool_slices(self, n: int) -> list[tuple[Any, Any, Any, Any]]:
        """Each layer's ``(keys[:n], values[:n], key_scales[:n], value_scales[:n])`` (views, kept while n_kv
        stays the same: a decode loop slices the pools once, not once per layer and step)."""
        if self._heads[0] != n or not self._heads[1]:
            slices = [
                (self._pools[0][i][:n], self._pools[1][i][:n], _head(self._scales[0][i], n),
                 _head(self._scales[1][i], n))
                for i in range(self.spec.num_layers)
            ]
            self._heads = (n, slices)
        return self._heads[1]

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
        plan = self._cells.plan_defrag()
        if plan.cells_moved:
            runs = (self._device.convert(a) for a in (plan.src, plan.dst, plan.length))
            ops.move_rows(self._all_pools(), *runs)
            self._cells.apply_defrag(plan)
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

"""`EncoderCache`: static cross-attention K/V, written once per sequence and read by every decoder step.

Storage: for each storage dtype the modalities use ("float16", "float32", "int8") and each decoder layer,
one keys and one values pool ``[capacity, H, D]`` (NHD), plus scales ``[capacity, H * D // g]`` float16
for int8. A sequence's *entry* is one contiguous extent ``[start, start + M)`` of the pools of its
modality's dtype, the same rows in every layer, allocated first-fit from a free-extent list (neighbours
coalesce on free; no defragmentation, no eviction). The bookkeeping (`kvarray.extents`) never touches
the pools; the pools are written with `ops.scatter_rows` and read with slices, `ops.dequantize_int8`
and `ops.gather_rows`; the plan and the views are in `kvarray.views` (`CrossPlan`, `CrossView`). The
design, the cross bias and the zero-copy rule are in docs/encoder.md.

Shapes: T decoder tokens in a batch, S sequences in it, E distinct entries among them (beams forked from
one parent share an entry), M the cross view's length (the distinct entries' lengths summed), L the
longest entry of the batch, H kv heads, D head_dim, g values per int8 group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import ops
from .batch import group_batch
from .buffers import DeviceCopies, StagingBuffers, check_layer, check_rows
from .errors import (
    CacheClosed,
    ConfigError,
    EntryWritten,
    NoEncoderEntry,
    NoForwardPass,
    SequenceExists,
    ShapeMismatch,
    SpecMismatch,
    StalePlan,
    TooManySequences,
    UnknownModality,
    UnknownSequence,
)
from .extents import NO_EXTENT, Entry, EntryInfo, ExtentList, check_entries, place
from .guard import (
    MAX_POSITION,
    as_int_array,
    check_batch_values,
    check_finite,
    check_layer_type,
    exclusive,
    exclusive_checked,
    new_guard,
    seq_id,
)
from .spec import DEFAULT_GROUP_SIZE, SCALE_DTYPE, KVSpec, check_group_size, row_bytes, storage_dtype
from .state import STATE_FORMAT, build_state, check_common, config_json, load_state, save_state, write_pools
from .views import CrossPlan, CrossView, GatheredView, View, frozen
from .xp import default_namespace, resident_zeros, to_numpy

__all__ = [
    "DEFAULT_MODALITY_DTYPES", "NO_EXTENT", "STATE_FORMAT", "CrossPlan", "CrossView", "EncoderCache",
    "EncoderStats", "Entry", "EntryInfo", "ExtentList",
]

#: Storage precision of each modality unless the constructor is told otherwise.
DEFAULT_MODALITY_DTYPES: Mapping[str, str] = {"text": "float16", "audio": "float16", "image": "int8"}
_FLOAT_INPUTS = (np.dtype(np.float16), np.dtype(np.float32))
_KV = ("keys", "values")


@dataclass(frozen=True, slots=True)
class EncoderStats:
    """A snapshot of an encoder cache's occupancy.

    Attributes:
        capacity, cells_used, cells_free, largest_free: rows per storage dtype (pool of each layer).
        sequences: sequences holding an entry; entries: distinct entries (forks share one).
        bytes_per_token: bytes one encoder token of each modality takes, all layers, keys plus values,
            int8 scales included.
        bytes_in_use: the entries' rows times their row cost, summed.
    """

    capacity: dict[str, int]
    cells_used: dict[str, int]
    cells_free: dict[str, int]
    largest_free: dict[str, int]
    sequences: int
    entries: int
    bytes_per_token: dict[str, int]
    bytes_in_use: int


class EncoderCache:
    """Static cross-attention K/V of many sequences, each with its own length and modality.

    Args:
        spec: the decoder's `KVSpec` (layers, kv heads, head_dim; ``spec.dtype`` is the staging dtype).
        capacity: rows per pool: one number for every storage dtype, or a mapping dtype -> rows.
        max_sequences: sequences holding an entry at most (forks included).
        modality_dtypes: modality -> storage precision ("float32", "float16" or "int8"); default
            `DEFAULT_MODALITY_DTYPES`.
        group_size: values per int8 scale g (must divide ``H * D``).
        xp: array namespace of the pools (numpy or cupy); None: `kvarray.xp.default_namespace()`.
        check_finite: puts refuse keys or values holding NaN or infinity (`NonFiniteValues`); False skips
            the check for float pools (int8 pools always check). See `CausalCache`, docs/reliability.md.

    One thread at a time (`ConcurrentUse`); a refused call changes nothing, and a put whose kernel fails
    releases the entries it allocated (docs/reliability.md).

    Raises `ConfigError` (sizes), `DTypeMismatch` (an unknown precision), `ShapeMismatch` (group size).
    """

    # ---- construction ----------------------------------------------------------------------------
    def __init__(
        self,
        spec: KVSpec,
        capacity: int | Mapping[str, int],
        max_sequences: int,
        modality_dtypes: Mapping[str, str] | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        xp: ModuleType | None = None,
        check_finite: bool = True,
    ) -> None:
        self._guard = new_guard()  # `exclusive`: one thread at a time
        self.spec = spec
        self.modality_dtypes = dict(DEFAULT_MODALITY_DTYPES if modality_dtypes is None else modality_dtypes)
        if not self.modality_dtypes:
            raise ConfigError("modality_dtypes must name at least one modality")
        for name in self.modality_dtypes.values():
            storage_dtype(name)
        self.dtypes = tuple(sorted(set(self.modality_dtypes.values())))
        self.group_size = int(group_size)
        if "int8" in self.dtypes:
            check_group_size(spec.row_values, self.group_size)
        rows = dict(capacity) if isinstance(capacity, Mapping) else {d: int(capacity) for d in self.dtypes}
        if set(rows) != set(self.dtypes) or any(int(n) <= 0 for n in rows.values()) or max_sequences <= 0:
            raise ConfigError(
                f"capacity must be a positive row count, or one per storage dtype {self.dtypes}, and "
                f"max_sequences positive; got {capacity!r}, {max_sequences!r}"
            )
        self.capacity = {d: int(rows[d]) for d in self.dtypes}
        self.max_sequences = int(max_sequences)
        self.xp = default_namespace() if xp is None else xp
        self.check_finite = bool(check_finite)
        # bookkeeping
        self._free = {d: ExtentList(n) for d, n in self.capacity.items()}
        self._entries: dict[int, Entry] = {}  # serial -> entry
        self._seq_entry: dict[int, int] = {}  # sequence -> serial
        self._serials = itertools.count()
        self._generation = 0
        # storage: (dtype, which, layer) -> array; scales only for int8
        self._pools: dict[tuple[str, int, int], Any] = {}
        self._scales: dict[tuple[str, int, int], Any] = {}
        heads, dim = spec.num_kv_heads, spec.head_dim
        for d, which, layer in itertools.product(self.dtypes, (0, 1), range(spec.num_layers)):
            n = self.capacity[d]
            self._pools[d, which, layer] = resident_zeros(self.xp, (n, heads, dim), d)
            if d == "int8":
                groups = spec.row_values // self.group_size
                self._scales[d, which, layer] = resident_zeros(self.xp, (n, groups), SCALE_DTYPE)
        # this forward pass
        self._plan: CrossPlan | None = None
        self._device = DeviceCopies(self.xp)
        self._staging = StagingBuffers(self.xp)  # held: staging key -> the entry serials it holds
        self._closed = False

    @property
    def plan(self) -> CrossPlan | None:
        """The current pass's plan (None before the first `start_forward`)."""
        return self._plan

    # ---- written by the encoder pass -------------------------------------------------------------
    @exclusive
    def put_sequence(self, seq: int, layer: int, keys: Any, values: Any, modality: str = "text") -> None:
        """Write one sequence's cross K/V of `layer`, once.

        Args:
            seq: the sequence id; its first put allocates its entry (M rows, every layer).
            layer: in ``[0, num_layers)``, not yet written for `seq`.
            keys, values: ``[M, num_kv_heads, head_dim]`` (NHD) float16/float32, any DLPack producer on
                the cache's side; stored in the modality's precision (int8 quantized per group of g).
            modality: one of `modality_dtypes`; the same for every layer of `seq`.

        Raises `UnknownModality`, `ShapeMismatch` (rank, heads, head_dim, an M other than the entry's),
        `DTypeMismatch`, `EntryWritten` (layer written before), `ConfigError` (another modality than the
        entry's), `TooManySequences`, `CacheFull` (asked = M, free = free rows of that dtype), `CacheClosed`,
        `NonFiniteValues`, `DTypeMismatch` / `IndexOutOfRange` (a seq that is not an int64 integer).
        A refused call changes nothing.
        """
        self.put_batch([seq_id(seq)], layer, keys, values, [_rows_of(keys)], modality)

    @exclusive_checked(lambda cache, seq_ids, layer, keys, values, lengths, modality: check_layer_type(layer))
    def put_batch(
        self, seq_ids: Any, layer: int, keys: Any, values: Any, lengths: Any, modality: str = "text"
    ) -> None:
        """Write the cross K/V of `layer` for a whole encoder batch (sequences concatenated), once each.

        Args:
            seq_ids: ``[S]`` distinct sequence ids; lengths: ``[S]`` positive encoder lengths M_s.
            layer: in ``[0, num_layers)``.
            keys, values: ``[sum(lengths), num_kv_heads, head_dim]`` (NHD) float16/float32, sequence s
                in rows ``[sum(lengths[:s]), sum(lengths[:s + 1]))``.
            modality: one of `modality_dtypes`, for every sequence of the call.

        New sequences get their extents side by side in `seq_ids` order when one free extent holds them
        all (so the batch's cross view is zero-copy), first-fit one by one otherwise. Errors as
        `put_sequence`, with ``CacheFull.asked`` the new sequences' rows summed; nothing is written then.
        An empty batch (S = 0, keys ``[0, H, D]``) writes nothing. When a kernel fails halfway, the entries
        this call allocated are released and no layer is marked written, then the exception propagates.
        """
        self._check_open()
        check_layer(layer, self.spec.num_layers)
        dtype = self._dtype_of(modality)
        ids = as_int_array("seq_ids", seq_ids).tolist()
        lens = as_int_array("lengths", lengths).tolist()
        if len(ids) != len(lens) or len(set(ids)) != len(ids) or any(not 0 < n < MAX_POSITION for n in lens):
            raise ShapeMismatch(f"seq_ids, lengths must be [S], ids distinct, lengths > 0; got {ids}, {lens}")
        arrays = [self._check_rows(_KV[w], arr, sum(lens), dtype) for w, arr in enumerate((keys, values))]
        if not ids:
            return
        fresh = []
        for seq, n in zip(ids, lens, strict=True):
            serial = self._seq_entry.get(seq)
            if serial is None:
                fresh.append((seq, n))
                continue
            entry = self._entries[serial]
            if entry.modality != modality:
                raise ConfigError(f"sequence {seq}'s entry is {entry.modality!r}, not {modality!r}")
            if entry.length != n:
                raise ShapeMismatch(f"sequence {seq}'s entry has M = {entry.length} rows; this put has {n}")
            if entry.written[layer]:
                raise EntryWritten(f"sequence {seq} layer {layer} is written already; entries are static")
        if len(self._seq_entry) + len(fresh) > self.max_sequences:
            raise TooManySequences(f"{len(fresh)} new sequences exceed max_sequences={self.max_sequences}")
        self._allocate(dtype, modality, fresh)
        starts = [self._entries[self._seq_entry[s]].start for s in ids]
        spans = zip(starts, lens, strict=True)
        cells = np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in spans])
        try:
            for which, rows in enumerate(arrays):
                pool = self._pools[dtype, which, layer]
                scales = self._scales.get((dtype, which, layer))
                ops.scatter_rows(pool, rows, self._device.convert(cells), scales=scales)
        except BaseException:
            self._release_fresh([seq for seq, _ in fresh])
            raise
        for seq in ids:
            self._entries[self._seq_entry[seq]].written[layer] = True

    # ---- read by decoder steps -------------------------------------------------------------------
    @exclusive
    def start_forward(self, seq_ids: Any, positions: Any) -> CrossPlan:
        """Plan the cross view of a decoder batch and make it the current pass: `make_plan` then `use`.

        Args:
            seq_ids: ``[T]`` integer sequence of each decoder token; positions: ``[T]`` integer positions
                (a sequence's tokens consecutive in batch order).

        Raises `ShapeMismatch`, `PositionError`, `NoEncoderEntry` (a sequence without an entry with every
        layer written). Changes nothing but the current plan.
        """
        plan = self.make_plan(seq_ids, positions)
        self.use(plan)
        return plan

    @exclusive
    def use(self, plan: CrossPlan | None) -> CrossPlan | None:
        """Make `plan` (from `make_plan`, or a previous `plan`) the current pass; returns it.

        Raises `StalePlan` for a plan of another cache or made before the cache changed.
        """
        self._check_open()
        if plan is not None:
            if not isinstance(plan, CrossPlan):
                raise ConfigError(f"use() takes make_plan's CrossPlan or None, not {type(plan).__name__}")
            if plan._owner is not self:
                raise StalePlan("this plan was made by another encoder cache")
            plan.check_current()
        self._plan = plan
        self._device.clear()
        return plan

    @exclusive_checked(lambda cache, seq_ids, positions: check_batch_values(seq_ids, positions))
    def make_plan(self, seq_ids: Any, positions: Any) -> CrossPlan:
        """The `CrossPlan` of a decoder batch (as `start_forward`) without making it current."""
        self._check_open()
        batch = group_batch(to_numpy(seq_ids), to_numpy(positions))
        serials = []
        for seq in batch.sequences.tolist():
            serial = self._seq_entry.get(seq)
            if serial is None or not self._entries[serial].complete:
                state = "no encoder entry" if serial is None else "an entry with layers unwritten"
                raise NoEncoderEntry(f"decoder step for sequence {seq}, which has {state}")
            serials.append(serial)
        distinct = list(dict.fromkeys(serials))
        entries = [self._entries[s] for s in distinct]
        starts = np.cumsum([0] + [e.length for e in entries])[:-1]
        where = {s: i for i, s in enumerate(distinct)}
        seq_entry = np.asarray([where[s] for s in serials], np.int32)
        adjacent = all(a.start + a.length == b.start for a, b in zip(entries, entries[1:], strict=False))
        one_float = len({e.dtype for e in entries}) <= 1 and all(e.dtype != "int8" for e in entries)
        return CrossPlan(
            batch.seq_ids, batch.positions, batch.sequences, batch.token_seq,
            frozen(np.asarray([self._entries[s].length for s in serials], np.int32)), frozen(seq_entry),
            frozen(starts[seq_entry].astype(np.int32)),
            tuple((e.dtype, e.start, e.length, e.serial) for e in entries), adjacent and one_float,
            self, self._generation,
        )

    @exclusive_checked(lambda cache, layer, view: check_layer_type(layer))
    def get(self, layer: int, view: View | str = View.POOL) -> CrossView | GatheredView:
        """What cross-attention `layer` reads in this pass.

        Args:
            layer: in ``[0, num_layers)``.
            view: `View.POOL` ("pool"): a `CrossView`, ``[M, H, D]`` keys/values (zero-copy when the batch's
                entries are adjacent, in order, of one float dtype) and the bias ``[T, M]``;
                `View.GATHERED` ("gathered"): a `GatheredView`, ``[S, H, L, D]`` copies (dequantized, spec
                dtype), lengths ``[S]`` and bias ``[T, L]``, for graphs taking per-sequence cross K/V.

        Raises `NoForwardPass` / `StalePlan`, `IndexOutOfRange` (layer), `ConfigError` (view).
        """
        plan = self._current_plan()
        check_layer(layer, self.spec.num_layers)
        kind = View.parse(view)
        if kind is View.GATHERED:
            return self._gathered(plan, layer)
        if kind is not View.POOL:
            raise ConfigError(f"the encoder cache has the 'pool' and 'gathered' views, not {kind.value!r}")
        if plan.zero_copy and plan.extents:
            dtype, start = plan.extents[0][:2]
            end = start + plan.cross_length
            keys, values = (self._pools[dtype, which, layer][start:end] for which in (0, 1))
        else:
            keys, values = (self._stage(plan, layer, which) for which in (0, 1))
        return CrossView(
            keys, values, self._device.get("bias", plan.bias), self._device.get("offsets", plan.offsets),
            self._device.get("lengths", plan.lengths), plan.zero_copy,
        )

    # ---- cache management ------------------------------------------------------------------------
    @exclusive
    def remove(self, seq: int) -> None:
        """Drop `seq`'s reference to its entry; the entry's rows are freed when no sequence holds it.

        Raises `UnknownSequence`. Makes the current plan stale.
        """
        self._check_open()
        seq = seq_id(seq)
        serial = self._seq_entry.get(seq)
        if serial is None:
            raise UnknownSequence(f"sequence {seq} has no encoder entry")
        del self._seq_entry[seq]
        entry = self._entries[serial]
        entry.refs -= 1
        if entry.refs == 0:
            del self._entries[serial]
            self._free[entry.dtype].release(entry.start, entry.length)
        self._generation += 1

    @exclusive
    def fork(self, src: int, dst: int) -> None:
        """Let sequence `dst` share `src`'s entry (a reference, no copy): beams of one request.

        Raises `NoEncoderEntry` (src without a complete entry), `SequenceExists` (dst has an entry),
        `TooManySequences`.
        """
        self.check_fork(src, dst)
        serial = self._seq_entry[seq_id(src, "src")]
        self._seq_entry[seq_id(dst, "dst")] = serial
        self._entries[serial].refs += 1

    @exclusive
    def check_fork(self, src: int, dst: int) -> None:
        """Raise what `fork(src, dst)` would raise; changes nothing."""
        self._check_open()
        src, dst = seq_id(src, "src"), seq_id(dst, "dst")
        serial = self._seq_entry.get(src)
        if serial is None or not self._entries[serial].complete:
            raise NoEncoderEntry(f"cannot fork sequence {src}: it has no complete encoder entry")
        if dst in self._seq_entry:
            raise SequenceExists(f"sequence {dst} already has an encoder entry")
        if len(self._seq_entry) >= self.max_sequences:
            raise TooManySequences(f"a fork would exceed max_sequences={self.max_sequences}")

    @exclusive
    def entry(self, seq: int) -> EntryInfo:
        """`seq`'s entry: dtype, rows, modality, layers written, references. Raises `UnknownSequence`."""
        self._check_open()
        serial = self._seq_entry.get(seq_id(seq))
        if serial is None:
            raise UnknownSequence(f"sequence {seq} has no encoder entry")
        e = self._entries[serial]
        layers = tuple(int(i) for i in np.flatnonzero(e.written))
        return EntryInfo(e.dtype, e.start, e.length, e.modality, layers, e.refs)

    @exclusive
    def shares_entry(self, a: int, b: int) -> bool:
        """True when sequences `a` and `b` hold the same entry (one forked from the other)."""
        serial = self._seq_entry.get(seq_id(a, "a"))
        return serial is not None and serial == self._seq_entry.get(seq_id(b, "b"))

    @exclusive
    def sequences(self) -> list[int]:
        """The sequence ids holding an entry, ascending."""
        self._check_open()
        return sorted(self._seq_entry)

    @exclusive_checked(lambda cache, layer, dtype: check_layer_type(layer))
    def pools(self, layer: int, dtype: str) -> tuple[Any, Any, Any | None, Any | None]:
        """Layer `layer`'s pools of storage `dtype`: keys, values ``[capacity, H, D]``, and their scales
        ``[capacity, H * D // g]`` float16 (None unless int8). The cache's own arrays: read only."""
        self._check_open()
        check_layer(layer, self.spec.num_layers)
        if not isinstance(dtype, str) or dtype not in self.dtypes:
            raise ConfigError(f"no {dtype!r} pools; this cache stores {self.dtypes}")
        keys, values = (self._pools[dtype, w, layer] for w in (0, 1))
        key_scales, value_scales = (self._scales.get((dtype, w, layer)) for w in (0, 1))
        return keys, values, key_scales, value_scales

    @exclusive
    def bytes_per_token(self, modality: str) -> int:
        """Bytes one encoder token of `modality` takes over all layers, keys plus values, scales included."""
        dtype = self._dtype_of(modality)
        return 2 * self.spec.num_layers * row_bytes(self.spec.row_values, dtype, self.group_size)

    @exclusive
    def stats(self) -> EncoderStats:
        """Occupancy per storage dtype and memory per encoder token per modality (`EncoderStats`)."""
        self._check_open()
        used = {d: self.capacity[d] - self._free[d].free for d in self.dtypes}
        row = {d: 2 * self.spec.num_layers * row_bytes(self.spec.row_values, d, self.group_size)
               for d in self.dtypes}
        return EncoderStats(
            capacity=dict(self.capacity), cells_used=used,
            cells_free={d: self._free[d].free for d in self.dtypes},
            largest_free={d: self._free[d].largest for d in self.dtypes}, sequences=len(self._seq_entry),
            entries=len(self._entries),
            bytes_per_token={m: self.bytes_per_token(m) for m in self.modality_dtypes},
            bytes_in_use=sum(used[d] * row[d] for d in self.dtypes),
        )

    @exclusive
    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole cache as host NumPy arrays (copies).

        Keys: ``meta.config`` (uint8 JSON); ``entries.table`` ``[E, 4]`` int64 (dtype index into `dtypes`,
        start, length, modality index into the sorted modalities) in (dtype, start) order;
        ``entries.written`` ``[E, num_layers]`` uint8; ``entries.seq_ids`` ``[n]`` int64 ascending and
        ``entries.seq_entry`` ``[n]`` int64 (row of the table); ``{dtype}.layer.{i}.keys`` / ``.values``
        ``[capacity, H, D]`` and for int8 ``.key_scales`` / ``.value_scales`` ``[capacity, H * D // g]``.
        """
        self._check_open()
        modalities = sorted(self.modality_dtypes)
        order = sorted(self._entries, key=lambda s: (self.dtypes.index(self._entries[s].dtype),
                                                     self._entries[s].start))
        row = {s: i for i, s in enumerate(order)}
        table = [(self.dtypes.index(e.dtype), e.start, e.length, modalities.index(e.modality))
                 for e in (self._entries[s] for s in order)]
        seqs = sorted(self._seq_entry)
        bookkeeping: dict[str, np.ndarray] = {
            "entries.table": np.asarray(table, np.int64).reshape(-1, 4),
            "entries.written": np.asarray([self._entries[s].written for s in order], np.uint8).reshape(
                -1, self.spec.num_layers),
            "entries.seq_ids": np.asarray(seqs, np.int64),
            "entries.seq_entry": np.asarray([row[self._seq_entry[s]] for s in seqs], np.int64),
        }
        return build_state(self._config_json(), bookkeeping, self._named_pools())

    @exclusive
    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise `SpecMismatch` unless `state` is a consistent `state_dict` of a cache configured as this."""
        check_common(state, self._config_json(), "encoder cache", self._named_pools())
        arrays = {k: to_numpy(v) for k, v in state.items() if k.startswith("entries.")}
        why = check_entries(arrays, self.dtypes, self.modality_dtypes, self.capacity, self.spec.num_layers,
                            self.max_sequences)
        if why:
            raise SpecMismatch(f"inconsistent encoder cache state: {why}")

    @exclusive
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` bit for bit. Raises `SpecMismatch` (cache unchanged) for another
        configuration or an inconsistent state. Makes the current plan stale."""
        self._check_open()
        self.check_state(state)
        write_pools(state, self._named_pools(), self.xp)
        table, written = to_numpy(state["entries.table"]), to_numpy(state["entries.written"]).astype(bool)
        modalities = sorted(self.modality_dtypes)
        serials = [next(self._serials) for _ in range(len(table))]
        self._entries = {
            s: Entry(self.dtypes[int(t[0])], int(t[1]), int(t[2]), modalities[int(t[3])], w.copy(), 0, s)
            for s, t, w in zip(serials, table, written, strict=True)
        }
        seq_ids, seq_rows = (to_numpy(state[f"entries.{k}"]).tolist() for k in ("seq_ids", "seq_entry"))
        self._seq_entry = {int(q): serials[r] for q, r in zip(seq_ids, seq_rows, strict=True)}
        for serial in self._seq_entry.values():
            self._entries[serial].refs += 1
        for d in self.dtypes:
            self._free[d].reset([(e.start, e.length) for e in self._entries.values() if e.dtype == d])
        self._staging.held.clear()
        self._generation += 1

    @exclusive
    def save(self, path: str) -> None:
        """Write `state_dict` to a safetensors file, atomically, with a SHA-256 of the tensors
        (`kvarray.state.save_state`)."""
        save_state(path, self.state_dict(), "encoder")

    @exclusive
    def load(self, path: str) -> None:
        """Restore a file written by `save`. Raises `SpecMismatch` (cache unchanged) for another config,
        `CorruptFile` (truncated, garbled, checksum mismatch), `StateFormatMismatch` (another version)."""
        self._check_open()
        self.load_state_dict(load_state(path, "encoder"))

    @exclusive
    def close(self) -> None:
        """Release the pools and staging buffers; any later use raises `CacheClosed`. Idempotent."""
        self._pools, self._scales = {}, {}
        self._staging.clear()
        self._device.clear()
        self._plan = None
        self._closed = True

    def __enter__(self) -> EncoderCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals: bookkeeping ------------------------------------------------------------------
    def _allocate(self, dtype: str, modality: str, fresh: list[tuple[int, int]]) -> None:
        """Give each new ``(seq, rows)`` an extent: side by side when one free extent holds them all."""
        if not fresh:
            return
        starts = place(self._free[dtype], [n for _, n in fresh], f"{dtype} rows")
        for (seq, n), start in zip(fresh, starts, strict=True):
            serial = next(self._serials)
            written = np.zeros(self.spec.num_layers, bool)
            self._entries[serial] = Entry(dtype, start, n, modality, written, 1, serial)
            self._seq_entry[seq] = serial

    # ---- internals: data movement ----------------------------------------------------------------
    def _stage(self, plan: CrossPlan, layer: int, which: int) -> Any:
        """The batch's entries copied (dequantized) side by side into the layer's staging ``[M, H, D]``;
        no copy when the buffer already holds exactly these entries."""
        shape = (plan.cross_length, self.spec.num_kv_heads, self.spec.head_dim)
        buf = self._staging.get(("cross", which, layer), shape, self.spec.dtype)
        held = tuple(e[3] for e in plan.extents)
        if self._staging.held.get(("cross", which, layer)) == held:
            return buf
        self._staging.held.pop(("cross", which, layer), None)  # a copy that fails halfway holds nothing
        offset = 0
        for dtype, group in itertools.groupby(plan.runs, key=lambda run: run[0]):
            runs = list(group)
            starts = np.asarray([start for _, start, _ in runs], np.int64)
            counts = np.asarray([n for _, _, n in runs], np.int64)
            total = int(counts.sum())
            pool, scales = self._pools[dtype, which, layer], self._scales.get((dtype, which, layer))
            dst = buf[offset : offset + total]
            if scales is None:  # float rows: every run in one call
                self._copy_runs(pool, starts, counts, dst)
            else:  # int8 rows: one dequantizing kernel call for every run
                self._dequantize_runs(pool, scales, starts, counts, dst)
            offset += total
        self._staging.held["cross", which, layer] = held
        return buf

    def _copy_runs(self, pool: Any, starts: np.ndarray, counts: np.ndarray, out: Any) -> None:
        """Rows ``[starts[r], starts[r] + counts[r])`` of the float ``pool [N, H, D]`` copied side by side
        into ``out [sum(counts), H, D]`` (``starts``, ``counts``: ``[R]`` int64).

        Host pools of out's dtype: one `kvarray.ops.cpu.copy_runs` call (pieces shared by two threads,
        non-temporal stores when large: many runs cost what one long copy does). Otherwise (device pools,
        float32 rows staged as float16) one ``copyto`` a run."""
        at = np.cumsum(counts) - counts
        if self.xp is np and pool.dtype == out.dtype:
            from .ops.cpu import copy_runs  # here: kvarray loads Numba only when a host kernel runs

            copy_runs(pool, out, starts, at, counts)
            return
        for start, to, n in zip(starts.tolist(), at.tolist(), counts.tolist(), strict=True):
            self.xp.copyto(out[to : to + n], pool[start : start + n])

    def _dequantize_runs(
        self, pool: Any, scales: Any, starts: np.ndarray, counts: np.ndarray, out: Any
    ) -> None:
        """Rows ``[starts[r], starts[r] + counts[r])`` of the int8 ``pool [N, H, D]`` (``scales [N, C // g]``)
        dequantized side by side into ``out [sum(counts), H, D]``, in one kernel call.

        A gather with one sequence and one "head" of all C = H * D values: its HND output ``[1, 1, L, C]``
        is exactly the NHD rows wanted, and the kernel dequantizes every run in one parallel call."""
        rows, values = pool.shape[0], math.prod(pool.shape[1:])
        total = int(counts.sum())
        indices = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(total, dtype=np.int64)
        indptr = np.array([0, total], np.int64)
        ops.gather_rows(
            pool.reshape(rows, 1, values),
            self._device.convert(indptr),
            self._device.convert(indices),
            out.reshape(1, 1, total, values),
            scales=scales,
        )

    def _gathered(self, plan: CrossPlan, layer: int) -> GatheredView:
        """Each sequence's entry into ``[S, H, L, D]`` buffers (spec dtype) with `ops.gather_rows`, one call
        per storage dtype (a mixed batch gathers each dtype's sequences apart, then places them)."""
        count, heads, dim = len(plan.sequences), self.spec.num_kv_heads, self.spec.head_dim
        shape = (count, heads, int(plan.lengths.max(initial=0)), dim)
        seq_dtype = [plan.extents[e][0] for e in plan.seq_entry]
        seq_start = np.asarray([plan.extents[e][1] for e in plan.seq_entry], np.int64)
        out = []
        for which in (0, 1):
            buf = self._staging.get(("gathered", which, layer), shape, self.spec.dtype)
            for dtype in sorted(set(seq_dtype)):
                rows = np.asarray([s for s in range(count) if seq_dtype[s] == dtype], np.int64)
                lengths = plan.lengths[rows].astype(np.int64)
                indptr = np.concatenate(([0], np.cumsum(lengths)))
                indices = np.repeat(seq_start[rows] - indptr[:-1], lengths) + np.arange(indptr[-1])
                pool, scales = self._pools[dtype, which, layer], self._scales.get((dtype, which, layer))
                direct = len(rows) == count and (scales is not None or pool.dtype == buf.dtype)
                part_dtype = buf.dtype if scales is not None else pool.dtype
                part = buf if direct else self.xp.empty((len(rows), *shape[1:]), part_dtype)
                page_table = (self._device.convert(indptr), self._device.convert(indices))
                ops.gather_rows(pool, *page_table, part, scales=scales)
                if not direct:
                    buf[self._device.convert(rows)] = part
            out.append(buf)
        return GatheredView(out[0], out[1], self._device.get("lengths", plan.lengths),
                            self._device.get("gathered_bias", plan.gathered_bias))

    # ---- internals: checks and helpers -----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosed("this encoder cache was closed")

    def _current_plan(self) -> CrossPlan:
        self._check_open()
        if self._plan is None:
            raise NoForwardPass("call start_forward(seq_ids, positions) before get")
        self._plan.check_current()
        return self._plan

    def _dtype_of(self, modality: str) -> str:
        dtype = self.modality_dtypes.get(modality) if isinstance(modality, str) else None
        if dtype is None:
            known = sorted(self.modality_dtypes)
            raise UnknownModality(f"unknown modality {modality!r}; this cache stores {known}")
        return dtype

    def _check_rows(self, name: str, arr: Any, count: int, dtype: str) -> Any:
        """`arr` as ``[count, H, D]`` rows for pools of storage `dtype`, finite where they must be."""
        spec = self.spec
        rows = check_rows(name, arr, self.xp, count, spec.num_kv_heads, spec.head_dim, _FLOAT_INPUTS, "M")
        if self.check_finite or dtype == "int8":
            check_finite(name, rows)
        return rows

    def _release_fresh(self, seqs: list[int]) -> None:
        """Undo `_allocate` for `seqs` (a put that failed halfway): forget their entries, free their rows."""
        for seq in seqs:
            entry = self._entries.pop(self._seq_entry.pop(seq))
            self._free[entry.dtype].release(entry.start, entry.length)

    def _named_pools(self) -> list[tuple[str, Any]]:
        named = []
        for (dtype, which, layer), arr in sorted(self._pools.items()):
            prefix = f"{dtype}.layer.{layer}"
            named.append((f"{prefix}.{_KV[which]}", arr))
            if (dtype, which, layer) in self._scales:
                named.append((f"{prefix}.{_KV[which][:-1]}_scales", self._scales[dtype, which, layer]))
        return named

    def _config_json(self) -> str:
        s = self.spec
        return config_json({
            "kind": "encoder", "num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim, "dtype": s.dtype, "capacity": self.capacity,
            "max_sequences": self.max_sequences, "modality_dtypes": self.modality_dtypes,
            "group_size": self.group_size,
        })


# ---- module helpers -----------------------------------------------------------------------------------
def _rows_of(arr: Any) -> int:
    shape = getattr(arr, "shape", None)
    if not shape:
        raise ShapeMismatch("keys must be [M, kv_heads, head_dim]")
    return int(shape[0])

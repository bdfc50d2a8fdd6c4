"""`EncoderCache`: static cross-attention K/V, written once per sequence and read by every decoder step.

Storage: for each storage dtype the modalities use ("float16", "float32", "int8") and each decoder layer,
one keys and one values pool ``[capacity, H, D]`` (NHD), plus scales ``[capacity, H * D // g]`` float16
for int8. A sequence's *entry* is one contiguous extent ``[start, start + M)`` of the pools of its
modality's dtype, the same rows in every layer, allocated first-fit from a free-extent list (neighbours
coalesce on free; no defragmentation, no eviction). Bookkeeping (`ExtentList`, `Entry`) never touches
the pools; the pools are written with `ops.scatter_rows` and read with slices, `ops.dequantize_int8`
and `ops.gather_rows`. The design, the cross bias and the zero-copy rule are in docs/encoder.md.

Shapes: T decoder tokens in a batch, S sequences in it, E distinct entries among them (beams forked from
one parent share an entry), M the cross view's length (the distinct entries' lengths summed), L the
longest entry of the batch, H kv heads, D head_dim, g values per int8 group.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import ModuleType
from typing import Any

import numpy as np

from . import ops
from .cells import group_batch
from .errors import (
    CacheClosed,
    CacheFull,
    ConfigError,
    DTypeMismatch,
    EntryWritten,
    IndexOutOfRange,
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
from .spec import DEFAULT_GROUP_SIZE, SCALE_DTYPE, KVSpec, check_group_size, row_bytes, storage_dtype
from .views import NEG_INF, GatheredView, View
from .xp import default_namespace, from_dlpack, to_numpy

#: Storage precision of each modality unless the constructor is told otherwise.
DEFAULT_MODALITY_DTYPES: Mapping[str, str] = {"text": "float16", "audio": "float16", "image": "int8"}
#: `ExtentList.first_fit` when no free extent is long enough.
NO_EXTENT = -1
#: Version of the `state_dict` / file layout.
STATE_FORMAT = 1
_CONFIG_KEY = "meta.config"
_FLOAT_INPUTS = (np.dtype(np.float16), np.dtype(np.float32))
_KV = ("keys", "values")


# ---- bookkeeping (host, no K/V data) ------------------------------------------------------------------
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


# ---- what models read -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CrossView:
    """The cross view of one layer: every encoder row the batch's tokens attend to, and the bias.

    Attributes:
        keys, values: ``[M, H, D]`` (NHD). With `zero_copy`, slices of the layer's pools (storage dtype);
            otherwise the layer's staging buffers in the spec's dtype (int8 dequantized), valid until the
            next cross `get` of this layer that has to copy.
        bias: ``[T, M]`` float32, 0 over the rows of the token's own sequence's entry, -inf elsewhere.
        offsets: ``[S]`` int32 first row of each sequence's entry in the view; lengths: ``[S]`` int32.
        zero_copy: the keys/values are the pools' own memory (no copy was made).
    """

    keys: Any
    values: Any
    bias: Any
    offsets: Any
    lengths: Any
    zero_copy: bool


@dataclass(frozen=True)
class CrossPlan:
    """The encoder side of one forward pass (host NumPy, read-only; the biases are built once, lazily).

    Attributes:
        seq_ids, positions: ``[T]`` int64 as given; sequences: ``[S]`` int64 in order of first appearance;
        token_seq: ``[T]`` int32 index into `sequences` of each token.
        lengths: ``[S]`` int32 entry length of each sequence; seq_entry: ``[S]`` int32 index of its entry
            among the batch's E distinct entries; offsets: ``[S]`` int32 its first row in the cross view.
        extents: ``(dtype, start, length, serial)`` of the E distinct entries in view order.
        zero_copy: one float dtype, and the extents adjacent in view order.
    """

    seq_ids: np.ndarray
    positions: np.ndarray
    sequences: np.ndarray
    token_seq: np.ndarray
    lengths: np.ndarray
    seq_entry: np.ndarray
    offsets: np.ndarray
    extents: tuple[tuple[str, int, int, int], ...]
    zero_copy: bool
    _owner: EncoderCache = field(repr=False, compare=False)
    _generation: int = field(repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        """T."""
        return len(self.seq_ids)

    @property
    def cross_length(self) -> int:
        """M, the cross view's rows."""
        return sum(e[2] for e in self.extents)

    def check_current(self) -> None:
        """Raise `StalePlan` when the cache changed (`remove`, `load_state_dict`, a later plan) since."""
        if self._owner._generation != self._generation:
            raise StalePlan("this cross plan is stale: the encoder cache changed since its start_forward")

    @cached_property
    def bias(self) -> np.ndarray:
        """``[T, M]`` float32 cross bias: token t sees its own sequence's entry rows (no causal mask)."""
        bias = np.full((self.num_tokens, self.cross_length), NEG_INF, np.float32)
        cols = np.arange(self.cross_length)
        seq = self.token_seq
        begin, end = self.offsets[seq, None], (self.offsets + self.lengths)[seq, None]
        bias[(cols >= begin) & (cols < end)] = 0.0
        return _frozen(bias)

    @cached_property
    def runs(self) -> tuple[tuple[str, int, int], ...]:
        """``(dtype, start, length)`` copies that stage the view: `extents` with neighbours in one pool
        merged (a batch adjacent but for one sequence stages in two copies)."""
        runs: list[tuple[str, int, int]] = []
        for dtype, start, n, _ in self.extents:
            if runs and runs[-1][0] == dtype and runs[-1][1] + runs[-1][2] == start:
                runs[-1] = (dtype, runs[-1][1], runs[-1][2] + n)
            else:
                runs.append((dtype, start, n))
        return tuple(runs)

    @cached_property
    def gathered_bias(self) -> np.ndarray:
        """``[T, L]`` float32 bias over the gathered view: token t sees its sequence's first lengths rows."""
        width = int(self.lengths.max(initial=0))
        bias = np.where(np.arange(width) < self.lengths[self.token_seq, None], np.float32(0), NEG_INF)
        return _frozen(bias.astype(np.float32))


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
    ) -> None:
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
            self._pools[d, which, layer] = self.xp.zeros((n, heads, dim), dtype=d)
            if d == "int8":
                groups = spec.row_values // self.group_size
                self._scales[d, which, layer] = self.xp.zeros((n, groups), SCALE_DTYPE)
        # this forward pass
        self._plan: CrossPlan | None = None
        self._device: dict[str, Any] = {}
        self._staging: dict[tuple[str, int, int], Any] = {}
        self._staged: dict[tuple[str, int, int], tuple[int, ...]] = {}  # staging key -> entry serials held
        self._closed = False

    @property
    def plan(self) -> CrossPlan | None:
        """The current pass's plan (None before the first `start_forward`)."""
        return self._plan

    # ---- written by the encoder pass -------------------------------------------------------------
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
        entry's), `TooManySequences`, `CacheFull` (asked = M, free = free rows of that dtype), `CacheClosed`.
        A refused call changes nothing.
        """
        self.put_batch([seq], layer, keys, values, [_rows_of(keys)], modality)

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
        """
        self._check_open()
        self._check_layer(layer)
        dtype = self._dtype_of(modality)
        ids = [int(s) for s in np.asarray(seq_ids, np.int64).reshape(-1)]
        lens = [int(n) for n in np.asarray(lengths, np.int64).reshape(-1)]
        if len(ids) != len(lens) or len(set(ids)) != len(ids) or any(n <= 0 for n in lens):
            raise ShapeMismatch(f"seq_ids, lengths must be [S], ids distinct, lengths > 0; got {ids}, {lens}")
        arrays = [self._check_rows(_KV[w], arr, sum(lens)) for w, arr in enumerate((keys, values))]
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
        for which, rows in enumerate(arrays):
            pool = self._pools[dtype, which, layer]
            ops.scatter_rows(pool, rows, self._to_xp(cells), scales=self._scales.get((dtype, which, layer)))
        for seq in ids:
            self._entries[self._seq_entry[seq]].written[layer] = True

    # ---- read by decoder steps -------------------------------------------------------------------
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

    def use(self, plan: CrossPlan | None) -> CrossPlan | None:
        """Make `plan` (from `make_plan`, or a previous `plan`) the current pass; returns it.

        Raises `StalePlan` for a plan of another cache or made before the cache changed.
        """
        self._check_open()
        if plan is not None:
            if plan._owner is not self:
                raise StalePlan("this plan was made by another encoder cache")
            plan.check_current()
        self._plan = plan
        self._device = {}
        return plan

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
            _frozen(np.asarray([self._entries[s].length for s in serials], np.int32)), _frozen(seq_entry),
            _frozen(starts[seq_entry].astype(np.int32)),
            tuple((e.dtype, e.start, e.length, e.serial) for e in entries), adjacent and one_float,
            self, self._generation,
        )

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
        self._check_layer(layer)
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
            keys, values, self._on_device("bias", plan.bias), self._on_device("offsets", plan.offsets),
            self._on_device("lengths", plan.lengths), plan.zero_copy,
        )

    # ---- cache management ------------------------------------------------------------------------
    def remove(self, seq: int) -> None:
        """Drop `seq`'s reference to its entry; the entry's rows are freed when no sequence holds it.

        Raises `UnknownSequence`. Makes the current plan stale.
        """
        self._check_open()
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

    def fork(self, src: int, dst: int) -> None:
        """Let sequence `dst` share `src`'s entry (a reference, no copy): beams of one request.

        Raises `NoEncoderEntry` (src without a complete entry), `SequenceExists` (dst has an entry),
        `TooManySequences`.
        """
        self.check_fork(src, dst)
        serial = self._seq_entry[src]
        self._seq_entry[dst] = serial
        self._entries[serial].refs += 1

    def check_fork(self, src: int, dst: int) -> None:
        """Raise what `fork(src, dst)` would raise; changes nothing."""
        self._check_open()
        serial = self._seq_entry.get(src)
        if serial is None or not self._entries[serial].complete:
            raise NoEncoderEntry(f"cannot fork sequence {src}: it has no complete encoder entry")
        if dst in self._seq_entry:
            raise SequenceExists(f"sequence {dst} already has an encoder entry")
        if len(self._seq_entry) >= self.max_sequences:
            raise TooManySequences(f"a fork would exceed max_sequences={self.max_sequences}")

    def entry(self, seq: int) -> EntryInfo:
        """`seq`'s entry: dtype, rows, modality, layers written, references. Raises `UnknownSequence`."""
        self._check_open()
        serial = self._seq_entry.get(seq)
        if serial is None:
            raise UnknownSequence(f"sequence {seq} has no encoder entry")
        e = self._entries[serial]
        layers = tuple(int(i) for i in np.flatnonzero(e.written))
        return EntryInfo(e.dtype, e.start, e.length, e.modality, layers, e.refs)

    def shares_entry(self, a: int, b: int) -> bool:
        """True when sequences `a` and `b` hold the same entry (one forked from the other)."""
        serial = self._seq_entry.get(a)
        return serial is not None and serial == self._seq_entry.get(b)

    def sequences(self) -> list[int]:
        """The sequence ids holding an entry, ascending."""
        self._check_open()
        return sorted(self._seq_entry)

    def pools(self, layer: int, dtype: str) -> tuple[Any, Any, Any | None, Any | None]:
        """Layer `layer`'s pools of storage `dtype`: keys, values ``[capacity, H, D]``, and their scales
        ``[capacity, H * D // g]`` float16 (None unless int8). The cache's own arrays: read only."""
        self._check_open()
        self._check_layer(layer)
        if dtype not in self.dtypes:
            raise ConfigError(f"no {dtype!r} pools; this cache stores {self.dtypes}")
        keys, values = (self._pools[dtype, w, layer] for w in (0, 1))
        key_scales, value_scales = (self._scales.get((dtype, w, layer)) for w in (0, 1))
        return keys, values, key_scales, value_scales

    def bytes_per_token(self, modality: str) -> int:
        """Bytes one encoder token of `modality` takes over all layers, keys plus values, scales included."""
        dtype = self._dtype_of(modality)
        return 2 * self.spec.num_layers * row_bytes(self.spec.row_values, dtype, self.group_size)

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
        state = {
            _CONFIG_KEY: np.frombuffer(self._config_json().encode(), np.uint8).copy(),
            "entries.table": np.asarray(table, np.int64).reshape(-1, 4),
            "entries.written": np.asarray([self._entries[s].written for s in order], np.uint8).reshape(
                -1, self.spec.num_layers),
            "entries.seq_ids": np.asarray(seqs, np.int64),
            "entries.seq_entry": np.asarray([row[self._seq_entry[s]] for s in seqs], np.int64),
        }
        for name, arr in self._named_pools():
            state[name] = np.array(to_numpy(arr), copy=True)
        return state

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise `SpecMismatch` unless `state` is a consistent `state_dict` of a cache configured as this."""
        config = state.get(_CONFIG_KEY)
        if config is None:
            raise SpecMismatch("not a kvarray encoder cache state: meta.config is missing")
        theirs, ours = bytes(np.asarray(config, np.uint8)).decode(), self._config_json()
        if json.loads(theirs) != json.loads(ours):
            raise SpecMismatch(f"the state was made for {theirs}; this cache is {ours}")
        why = self._check_entries({k: to_numpy(v) for k, v in state.items() if k.startswith("entries.")})
        if why:
            raise SpecMismatch(f"inconsistent encoder cache state: {why}")
        for name, arr in self._named_pools():
            saved = state.get(name)
            if saved is None or (tuple(saved.shape), np.dtype(saved.dtype)) != (tuple(arr.shape), arr.dtype):
                raise SpecMismatch(f"{name} is missing or not {np.dtype(arr.dtype)} {tuple(arr.shape)}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` bit for bit. Raises `SpecMismatch` (cache unchanged) for another
        configuration or an inconsistent state. Makes the current plan stale."""
        self._check_open()
        self.check_state(state)
        for name, arr in self._named_pools():
            arr[...] = self.xp.asarray(state[name])
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
        self._staged = {}
        self._generation += 1

    def save(self, path: str) -> None:
        """Write `state_dict` to a safetensors file."""
        save_state(path, self.state_dict(), "encoder")

    def load(self, path: str) -> None:
        """Restore a file written by `save`. Raises `SpecMismatch` (cache unchanged) for another config."""
        self.load_state_dict(load_state(path, "encoder"))

    def close(self) -> None:
        """Release the pools and staging buffers; any later use raises `CacheClosed`. Idempotent."""
        self._pools, self._scales, self._staging, self._staged, self._device = {}, {}, {}, {}, {}
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
        free = self._free[dtype]
        total = sum(n for _, n in fresh)
        block = free.first_fit(total)
        taken: list[tuple[int, int]] = []
        for _, n in fresh:
            start = block + sum(m for _, m in taken) if block != NO_EXTENT else free.first_fit(n)
            if start == NO_EXTENT:
                for a, m in taken:
                    free.release(a, m)
                raise CacheFull(total, free.free, f"{dtype} rows (largest free extent {free.largest})")
            free.take(start, n)
            taken.append((start, n))
        for (seq, n), (start, _) in zip(fresh, taken, strict=True):
            serial = next(self._serials)
            written = np.zeros(self.spec.num_layers, bool)
            self._entries[serial] = Entry(dtype, start, n, modality, written, 1, serial)
            self._seq_entry[seq] = serial

    def _check_entries(self, s: dict[str, np.ndarray]) -> str:
        """Why the ``entries.*`` arrays are not a consistent bookkeeping, or ""."""
        table, written, ids, rows = (s.get(f"entries.{k}") for k in ("table", "written", "seq_ids",
                                                                       "seq_entry"))
        if table is None or written is None or ids is None or rows is None:
            return "entries.table, entries.written, entries.seq_ids and entries.seq_entry are needed"
        n = len(table)
        if table.shape != (n, 4) or written.shape != (n, self.spec.num_layers) or ids.shape != rows.shape:
            return "entries arrays of mismatched shapes"
        if len(ids) > self.max_sequences or len(np.unique(ids)) != len(ids):
            return "too many or repeated sequence ids"
        if len(rows) and (rows.min() < 0 or rows.max() >= n) or len(np.unique(rows)) != n:
            return "every entry needs a sequence, and every sequence an entry"
        if n and ((table[:, 0] < 0).any() or (table[:, 0] >= len(self.dtypes)).any()
                  or (table[:, 3] < 0).any() or (table[:, 3] >= len(self.modality_dtypes)).any()):
            return "dtype or modality index out of range"
        modalities = sorted(self.modality_dtypes)
        for d_index, dtype in enumerate(self.dtypes):
            ext = table[table[:, 0] == d_index][:, 1:3] if n else np.empty((0, 2), np.int64)
            ext = ext[np.argsort(ext[:, 0])]
            ends = ext.sum(1)
            if len(ext) and ((ext[:, 1] <= 0).any() or ext[0, 0] < 0 or (ends > self.capacity[dtype]).any()
                             or (ext[1:, 0] < ends[:-1]).any()):
                return f"{dtype} extents out of range or overlapping"
        if any(self.modality_dtypes[modalities[int(t[3])]] != self.dtypes[int(t[0])] for t in table):
            return "an entry stored in another precision than its modality's"
        return ""

    # ---- internals: data movement ----------------------------------------------------------------
    def _stage(self, plan: CrossPlan, layer: int, which: int) -> Any:
        """The batch's entries copied (dequantized) side by side into the layer's staging ``[M, H, D]``;
        no copy when the buffer already holds exactly these entries."""
        shape = (plan.cross_length, self.spec.num_kv_heads, self.spec.head_dim)
        buf = self._staging_buffer(("cross", which, layer), shape, self.spec.dtype)
        held = tuple(e[3] for e in plan.extents)
        if self._staged.get(("cross", which, layer)) == held:
            return buf
        offset = 0
        for dtype, start, n in plan.runs:
            src, dst = self._pools[dtype, which, layer][start : start + n], buf[offset : offset + n]
            if dtype == "int8":
                ops.dequantize_int8(src, self._scales[dtype, which, layer][start : start + n], dst)
            else:
                self.xp.copyto(dst, src)
            offset += n
        self._staged["cross", which, layer] = held
        return buf

    def _gathered(self, plan: CrossPlan, layer: int) -> GatheredView:
        """Each sequence's entry into ``[S, H, L, D]`` buffers (spec dtype) with `ops.gather_rows`, one call
        per storage dtype (a mixed batch gathers each dtype's sequences apart, then places them)."""
        count, heads, dim = len(plan.sequences), self.spec.num_kv_heads, self.spec.head_dim
        shape = (count, heads, int(plan.lengths.max(initial=0)), dim)
        seq_dtype = [plan.extents[e][0] for e in plan.seq_entry]
        seq_start = np.asarray([plan.extents[e][1] for e in plan.seq_entry], np.int64)
        out = []
        for which in (0, 1):
            buf = self._staging_buffer(("gathered", which, layer), shape, self.spec.dtype)
            for dtype in sorted(set(seq_dtype)):
                rows = np.asarray([s for s in range(count) if seq_dtype[s] == dtype], np.int64)
                lengths = plan.lengths[rows].astype(np.int64)
                indptr = np.concatenate(([0], np.cumsum(lengths)))
                indices = np.repeat(seq_start[rows] - indptr[:-1], lengths) + np.arange(indptr[-1])
                pool, scales = self._pools[dtype, which, layer], self._scales.get((dtype, which, layer))
                direct = len(rows) == count and (scales is not None or pool.dtype == buf.dtype)
                part_dtype = buf.dtype if scales is not None else pool.dtype
                part = buf if direct else self.xp.empty((len(rows), *shape[1:]), part_dtype)
                ops.gather_rows(pool, self._to_xp(indptr), self._to_xp(indices), part, scales=scales)
                if not direct:
                    buf[self._to_xp(rows)] = part
            out.append(buf)
        return GatheredView(out[0], out[1], self._on_device("lengths", plan.lengths),
                            self._on_device("gathered_bias", plan.gathered_bias))

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

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.spec.num_layers:
            raise IndexOutOfRange(f"layer must be in [0, {self.spec.num_layers}), got {layer!r}")

    def _dtype_of(self, modality: str) -> str:
        dtype = self.modality_dtypes.get(modality)
        if dtype is None:
            known = sorted(self.modality_dtypes)
            raise UnknownModality(f"unknown modality {modality!r}; this cache stores {known}")
        return dtype

    def _check_rows(self, name: str, arr: Any, count: int) -> Any:
        rows = from_dlpack(arr, self.xp)
        want = (count, self.spec.num_kv_heads, self.spec.head_dim)
        if rows.ndim != 3 or tuple(rows.shape) != want:
            raise ShapeMismatch(f"{name} must be [M, kv_heads, head_dim] = {want}, got {tuple(rows.shape)}")
        if np.dtype(rows.dtype) not in _FLOAT_INPUTS:
            raise DTypeMismatch(f"{name} must be float16 or float32, got {rows.dtype}")
        return self.xp.ascontiguousarray(rows)

    def _to_xp(self, arr: np.ndarray) -> Any:
        return arr if self.xp is np else self.xp.asarray(arr)

    def _on_device(self, name: str, arr: np.ndarray) -> Any:
        """`arr` on the cache's side, copied once per plan for CuPy pools."""
        if self.xp is np:
            return arr
        if name not in self._device:
            self._device[name] = self.xp.asarray(arr)
        return self._device[name]

    def _staging_buffer(self, key: tuple[str, int, int], shape: tuple[int, ...], dtype: str) -> Any:
        """A C-contiguous `shape` array over the storage kept under `key`, grown (x1.5) when too small."""
        size = math.prod(shape)
        buf = self._staging.get(key)
        if buf is None or buf.size < size:
            buf = self.xp.empty(max(size, int(1.5 * (0 if buf is None else buf.size))), dtype=dtype)
            self._staging[key] = buf
            self._staged.pop(key, None)
        return buf[:size].reshape(shape)

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
        config = {
            "format": STATE_FORMAT, "kind": "encoder", "num_layers": s.num_layers,
            "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "dtype": s.dtype,
            "capacity": self.capacity, "max_sequences": self.max_sequences,
            "modality_dtypes": self.modality_dtypes, "group_size": self.group_size,
        }
        return json.dumps(config, sort_keys=True)


# ---- module helpers -----------------------------------------------------------------------------------
def save_state(path: str, state: Mapping[str, np.ndarray], kind: str) -> None:
    """Write a cache's `state_dict` (``meta.config`` uint8 tensors included) to a safetensors file."""
    from safetensors.numpy import save_file

    from . import __version__

    save_file(dict(state), str(path), metadata={"kvarray.kind": kind, "kvarray.version": __version__})


def load_state(path: str, kind: str) -> dict[str, np.ndarray]:
    """The `state_dict` in a file written by `save_state` for a cache of `kind`; `SpecMismatch` otherwise."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        found = (handle.metadata() or {}).get("kvarray.kind")
    if found != kind:
        raise SpecMismatch(f"{path} is not a kvarray {kind} cache file (kind {found!r})")
    return dict(load_file(str(path)))


def _rows_of(arr: Any) -> int:
    shape = getattr(arr, "shape", None)
    if not shape:
        raise ShapeMismatch("keys must be [M, kv_heads, head_dim]")
    return int(shape[0])


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr

"""The engine's runners for kvarray's native decoder-step graphs (docs/export.md): pool, gathered or decode
view.

`NativeStepRunner` is the IO binding every native decoder step shares (Llama's here, T5's and Whisper's in
`kvarray.ort.seq2seq`): the small integer inputs, the past of every layer, the attention bias, and the
preallocated outputs. The graph's view (`GraphView`, from its metadata) says how the past is read
(DESIGN.md, "view"):

- pool: ``past_key.{i}`` / ``past_value.{i}`` are the pool view ``keys[:n_kv]`` ``[n_kv, H, D]``, bound
  zero-copy, with ``attention_bias [T, n_kv + T]`` (the plan's ``bias_before_put``). Every token scores
  every one of the n_kv cells: O(T * n_kv) per layer, which grows with the batch.
- gathered: ``past_key.{i}`` / ``past_value.{i}`` are the cache's gathered view ``[S, H, L, D]`` (each
  sequence's cells copied, in position order, by ``gather_rows``), ``token_sequence [T]`` names each
  token's row and ``attention_bias [T, L + T]`` is `gathered_bias_before_put`. Every token scores the L
  cells of its own sequence: O(T * L), plus the copies.
- decode: passes where every sequence feeds one token (T = S) only. A gathered view again, read by
  ONNX Runtime's GroupQueryAttention with ``seqlens_k [S]`` int32 (each sequence's past length, no bias);
  its outputs ``present_key.{i}`` / ``present_value.{i}`` are bound to the same buffers, so the pass's
  rows are written in place, and read back from there (row ``seqlens_k`` of each sequence) for `put`.
  Over a float32 cache without a window these buffers are a `DecodeMirror` kept across passes: a pass
  copies only the rows a sequence gained since its last decode pass (its prompt, once), not its whole
  past; otherwise they are the cache's gathered view.

`ViewSwitch` runs a model's pool-view graph and a gathered- or decode-view twin over one cache and picks
the graph per pass (`pick_view`).
"""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from ..causal import CausalCache
from ..errors import ConfigError, GraphMismatch, NoForwardPass, ShapeMismatch, UnsupportedModel
from ..export import GraphInfo
from ..export.attention import View as GraphView
from ..spec import KVSpec
from ..views import NEG_INF, ForwardPlan, GatheredView, PoolView
from .binding import Binder, OutputBuffers
from .names import DECODE_NAMES, check_names, convention
from .runner import Runner
from .scheduler import Batch

__all__ = [
    "DECODE_NAMES",
    "TWIN_MIN_SEQUENCES",
    "DecodeMirror",
    "GraphView",
    "NativeRunner",
    "NativeStepRunner",
    "ViewSwitch",
    "gathered_bias_before_put",
    "pick_view",
    "pool_window",
    "row_mismatches",
]

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}
#: the cache storages a gathered- or decode-view graph of a given past dtype reads (the gather dequantizes
#: int8 to the spec's float32)
GATHERED_STORAGE = {"float32": ("float32", "int8"), "float16": ("float16",)}


def row_mismatches(spec: KVSpec, args: list[Any]) -> list[str]:
    """``name [shape] (expected [*, H, D])`` for each graph input / output (ONNX Runtime `NodeArg`) of
    `args` whose shape is not ``[*, spec.num_kv_heads, spec.head_dim]``."""
    heads, dim = spec.num_kv_heads, spec.head_dim
    return [
        f"{arg.name} {list(arg.shape)} (expected [*, {heads}, {dim}])"
        for arg in args
        if list(arg.shape)[1:] != [heads, dim]
    ]


def step_mismatches(
    spec: KVSpec,
    vocab_size: int,
    ins: dict[str, Any],
    outs: dict[str, Any],
    view: GraphView = GraphView.POOL,
) -> list[str]:
    """What of a native decoder step does not fit `spec`: ``past_key.{i}`` / ``past_value.{i}`` inputs
    (pool ``[*, H, D]``, gathered and decode ``[*, H, *, D]``), ``new_key.{i}`` / ``new_value.{i}``
    outputs ``[*, H, D]`` (decode: ``present_key.{i}`` / ``present_value.{i}`` ``[*, H, *, D]``),
    ``logits [*, vocab_size]`` (names already checked with `check_names`)."""
    heads, dim = spec.num_kv_heads, spec.head_dim
    past, rows = [], []
    for i in range(spec.num_layers):
        past += [ins[f"past_key.{i}"], ins[f"past_value.{i}"]]
        if view is GraphView.DECODE:
            past += [outs[f"present_key.{i}"], outs[f"present_value.{i}"]]
        else:
            rows += [outs[f"new_key.{i}"], outs[f"new_value.{i}"]]
    if view is GraphView.POOL:
        wrong = row_mismatches(spec, past + rows)
    else:
        wrong = row_mismatches(spec, rows)
        wrong += [
            f"{arg.name} {list(arg.shape)} (expected [*, {heads}, *, {dim}])"
            for arg in past
            if len(arg.shape) != 4 or arg.shape[1] != heads or arg.shape[3] != dim
        ]
    logits = list(outs["logits"].shape)
    if logits[-1] != vocab_size:
        wrong.append(f"logits {logits} (expected [*, {vocab_size}])")
    return wrong


class DecodeMirror:
    """The decode view's past, kept across passes: per layer, keys and values ``[slots, H, Lcap, D]``
    (float32, HND, zero-filled), each sequence of the last decode pass in a slot of its own.

    Invariant: rows ``[0, valid[s])`` of slot s are the first cells of sequence ``sequences[s]`` (row j:
    position j), and rows ``[0, written[s])`` are in the pool too. A pass (`stage`) of S sequences runs
    over slots ``[0, S)``: a sequence keeps its slot while that slot is below S, and a sequence of a
    higher slot (others left) or new to the mirror takes a free one, so when requests leave only the
    sequences of the top slots move. A kept sequence copies from the pool only the rows it gained since
    (none in a run of decode passes); a new one its whole past, once. The buffers ``[S, H, Lcap, D]``
    keep their memory and shape (no rebinding) until S or Lcap changes. The graph's row t is slot t, so
    the runner binds the pass's inputs in slot order (`slot_of`). GroupQueryAttention then writes
    each sequence's new row ``past`` in place, the same float32 values `put` would write into the pool,
    so after a successful pass (`commit`) ``valid = past + 1``.

    Deferred writes: a pass's rows are not put into the pool when it runs. The mirror holds them, and
    `write_back` writes the rows ``[written, valid)`` of the slots whose sequence still holds them in one
    `CausalCache.write_rows` call: when the slots change (`stage`: every slot's when a sequence new to the
    mirror joins, else those of the sequences that leave it) and whenever the runner is asked to
    (`NativeStepRunner.flush`: before any pass that reads the pool, and the engine's `flush`). Rows of
    requests that finished meanwhile are dropped (their cells are free).

    Valid while the pool's cells keep their data and order: a float32 cache (an int8 pool holds quantized
    rows) without a window (ring writes reorder a cell table) that only the engine's passes write; the
    runner checks the first two per pass. Rolled-back tokens shorten ``past``, which caps ``valid``. A
    restage that fails (the pool could not be read, memory ran out) writes the rows held back into the
    pool and empties every slot: the next pass copies its pasts from the pool again.

    Args:
        layers, heads, dim: the spec's layers, kv heads and head_dim.
    """

    def __init__(self, layers: int, heads: int, dim: int) -> None:
        self.layers, self.heads, self.dim = layers, heads, dim
        self._all: tuple[np.ndarray, np.ndarray] | None = None  # keys, values [layers, slots, H, Lcap, D]
        self.keys: list[np.ndarray] = []  # each layer's [slots, H, Lcap, D] (views of the one array)
        self.values: list[np.ndarray] = []
        self.sequences = np.empty(0, np.int64)  # sequence id of each slot (last pass)
        self.valid = np.empty(0, np.int64)  # rows of each slot that hold the sequence's first tokens
        self.written = np.empty(0, np.int64)  # rows of each slot that the pool holds too (<= valid)
        self.slot_of: np.ndarray | None = None  # [S] each sequence's slot in the staged pass (None: slot i)
        self._order: np.ndarray | None = None  # [S] the staged pass's sequence in each slot (None: t)
        self._batch = np.empty(0, np.int64)  # the staged pass's sequences, in its order
        self._past = np.empty(0, np.int64)  # the staged pass's past lengths, per slot
        self._views: tuple[Any, Any] = (None, None)  # the last stage's [S, H, Lcap, D] views per layer
        self.copied_rows = 0  # rows copied from the pool since construction (for tests and reports)
        self.moved_rows = 0  # rows moved between slots since construction
        self.written_rows = 0  # rows written back into the pool since construction

    def stage(self, cache: CausalCache, plan: ForwardPlan) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Bring the slots of `plan`'s sequences up to their past; each layer's ``[S, H, Lcap, D]`` keys and
        values (views of the mirror, C-contiguous), the pass's sequence i in slot ``slot_of[i]`` (None:
        slot i). ``plan`` must be a pass of one token per sequence."""
        seqs = plan.sequences  # int64, read-only
        count = len(seqs)
        past = plan.gathered_lengths.astype(np.int64) - 1  # [S] rows before this pass's token
        width = int(past.max(initial=0)) + 1
        fits = bool(self.keys) and self.keys[0].shape[0] >= count and self.keys[0].shape[2] >= width
        # a run of decode passes: the same sequences in the same slots, each one row further (nothing to copy)
        steady = fits and count == len(self._batch) and bool((self._batch == seqs).all())
        if steady:
            slot_past = past if self._order is None else past[self._order]
            steady = bool((self.valid == slot_past).all())
        if not steady:
            try:
                slot_past = self._restage(cache, plan, past, not fits)
            except BaseException:
                self._forget(cache)  # slabs may have moved: the slot records no longer hold
                raise
        self._batch, self.valid, self._past = seqs, slot_past, slot_past
        if self._views[0] is None or len(self._views[0][0]) != count:  # the same view objects while S stays
            self._views = ([k[:count] for k in self.keys], [v[:count] for v in self.values])
        return self._views[0], self._views[1]

    def write_back(self, cache: CausalCache, slots: np.ndarray | None = None) -> None:
        """Write the rows ``[written, valid)`` of each slot (of `slots` ``[n]``, None: every slot) into
        `cache`, as far as its sequence still holds them (none for a finished request), in one
        `CausalCache.write_rows` call."""
        every = np.arange(len(self.valid)) if slots is None else slots
        pending = every[self.written[every] < self.valid[every]]
        if not len(pending):
            return
        seqs, written = self.sequences[pending], self.written[pending]
        count = np.maximum(np.minimum(self.valid[pending], cache.lengths(seqs)) - written, 0)
        total = int(count.sum())
        if total:
            slot = np.repeat(pending, count)
            first = np.repeat(np.cumsum(count) - count, count)  # each slot's first pending row in the list
            row = np.arange(total) - first + np.repeat(written, count)
            cache.write_rows(self.sequences[slot], row, *self._rows(slot, row))  # row j is position j
            self.written_rows += total
        self.written = self.written.copy()
        self.written[pending] = self.valid[pending]  # rows a sequence no longer holds left the cache too

    def _forget(self, cache: CausalCache) -> None:
        """Write the rows held back into `cache` and empty every slot, so the next pass copies its
        sequences' pasts from the pool again (after a failed restage)."""
        try:
            self.write_back(cache)
        finally:
            self.sequences = self.valid = self.written = self._batch = self._past = np.empty(0, np.int64)
            self.slot_of = self._order = None

    def _restage(self, cache: CausalCache, plan: ForwardPlan, past: np.ndarray, grow: bool) -> np.ndarray:
        """Give each of `plan`'s S sequences a slot below S and fill it with the sequence's rows
        ``[0, past)`` (``past [S]`` int64, the pass's order); the past of each slot ``[S]``.

        A sequence of the last pass keeps its slot if it is below S, else moves its rows to a free one; it
        copies from the pool only what it gained since. A new sequence takes a free slot and copies its
        whole past. Rows held back go to the pool first where the pool will be read: all of them when a
        sequence is new (its past may share cells with another's), else those of sequences that leave
        the mirror (alive, they come back through the pool)."""
        seqs, count = plan.sequences, len(plan.sequences)
        if grow:  # new buffers, more slots or rows
            self._grow(count, int(past.max(initial=0)) + 1)
        slot_of = {seq: slot for slot, seq in enumerate(self.sequences.tolist())}
        source = np.fromiter((slot_of.get(seq, -1) for seq in seqs.tolist()), np.int64, count)
        kept = np.flatnonzero(source >= 0)
        if len(kept) < count:
            self.write_back(cache)
        else:
            self.write_back(cache, np.setdiff1d(np.arange(len(self.sequences)), source))
        every = np.arange(count)
        target = np.where(source < count, source, -1)  # kept slots, then the free ones in order
        target[target < 0] = np.setdiff1d(every, target)
        valid = np.zeros(count, np.int64)
        valid[kept] = np.minimum(self.valid[source[kept]], past[kept])
        written = past.copy()  # rows copied from the pool are in the pool
        written[kept] = np.minimum(self.written[source[kept]], valid[kept])
        moved = kept[(source[kept] != target[kept]) & (valid[kept] > 0)]
        for i in moved.tolist():  # slabs [layers, H, rows, D], from a slot >= S to a free one below
            rows = int(valid[i])
            for array in self._all or ():
                array[:, target[i], :, :rows] = array[:, source[i], :, :rows]
            self.moved_rows += rows
        missing = past - valid
        total = int(missing.sum())
        if total:
            indptr = plan.page_table.kv_indptr.astype(np.int64)
            which = np.repeat(np.arange(count), missing)
            first = np.repeat(np.cumsum(missing) - missing, missing)
            rank = np.arange(total, dtype=np.int64) - first + np.repeat(valid, missing)
            cells = plan.page_table.kv_indices[indptr[which] + rank]
            slot = target[which]
            for layer in range(self.layers):
                pool = cast(PoolView, cache.get(layer, "pool"))
                self.keys[layer][slot, :, rank] = pool.keys[cells]
                self.values[layer][slot, :, rank] = pool.values[cells]
            self.copied_rows += total
        order = np.empty(count, np.int64)
        order[target] = every
        identity = bool((target == every).all())
        self.slot_of, self._order = (None, None) if identity else (target, order)
        self.sequences, self.written = seqs[order], written[order]
        return past[order]

    def commit(self) -> None:
        """The staged pass ran: its rows (written in place by the graph) are valid too."""
        self.valid = self._past + 1

    def advance(self) -> None:
        """Stage the committed pass again, each sequence one row further: its past is the rows now valid."""
        self._past = self.valid

    def rows_left(self) -> int:
        """Rows each slot of the staged pass can still take before the buffers must grow (Lcap - most
        rows held)."""
        return self.keys[0].shape[2] - int(self.valid.max(initial=0)) if self.keys else 0

    def new_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The staged pass's own rows, which the graph wrote at row ``past`` of each slot: keys and values
        ``[layers, S, H, D]`` in the pass's order (C-contiguous, fresh arrays; ``keys[i]`` is layer i's
        ``[S, H, D]``)."""
        slots = np.arange(len(self._past)) if self.slot_of is None else self.slot_of
        return self._rows(slots, self._past[slots])

    def _rows(self, slots: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row ``rows[t]`` of slot ``slots[t]`` (``[T]`` each) in every layer: keys and values
        ``[layers, T, H, D]`` (C-contiguous, fresh arrays)."""
        assert self._all is not None
        keys, values = (np.ascontiguousarray(a[:, slots, :, rows].transpose(1, 0, 2, 3)) for a in self._all)
        return keys, values

    def _grow(self, count: int, width: int) -> None:
        """Room for `count` slots (the next power of two) of `width` rows (Lcap: the next multiple of 256),
        never less than before; the rows held stay in their slots."""
        held = self._all
        slots = max(1 << max(count - 1, 0).bit_length(), held[0].shape[1] if held else 0)
        rows = max(-(-width // 256) * 256, held[0].shape[3] if held else 0)
        shape = (self.layers, slots, self.heads, rows, self.dim)
        grown = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        if held is not None:
            used, valid = held[0].shape[1], int(self.valid.max(initial=0))
            for new, old in zip(grown, held, strict=True):
                new[:, :used, :, :valid] = old[:, :, :, :valid]
        self._all = grown
        self.keys, self.values = list(grown[0]), list(grown[1])
        self._views = (None, None)


def gathered_bias_before_put(plan: ForwardPlan, out: np.ndarray | None = None) -> np.ndarray:
    """``[T, L + T]`` float32 bias of a gathered-view graph, which reads the past before `put`.

    Columns ``[0, L)`` are the rows of each token's own sequence in the gathered view: row j of sequence s
    is visible (0) when the plan's after-put `gathered_bias` says so and j is below the sequence's past
    length ``past_s = lengths[s] - new_s`` (the last ``new_s`` rows of a table are this pass's cells, not
    written yet: a cell table is in position order and this pass's tokens have the highest positions).
    Columns ``[L, L + T)`` are this pass's tokens: token t sees token u when both feed one sequence and
    u's row ``past_s + (u - first token of s)`` is visible to t after `put` (causal, window and sinks
    alike). Example, one sequence of 3 cached tokens and one new token, and a second sequence's first
    two tokens (T = 3, L = 4 = 3 + 1)::

        token 0 (seq a, pos 3):  0    0    0  -inf | 0    -inf -inf
        token 1 (seq b, pos 0): -inf -inf -inf -inf | -inf 0    -inf
        token 2 (seq b, pos 1): -inf -inf -inf -inf | -inf 0    0

    Args:
        plan: the current `ForwardPlan` (its sequences' tokens are consecutive, in order of appearance).
        out: optional buffer of at least ``T * (L + T)`` float32 elements to write into (flat or any shape).
    """
    after = plan.gathered_bias  # [T, L] after put
    count, width = after.shape
    seq = plan.token_seq.astype(np.int64)
    new = np.bincount(seq, minlength=plan.num_sequences)  # [S] tokens each sequence feeds
    past = plan.gathered_lengths.astype(np.int64) - new  # [S]
    first = np.cumsum(new) - new  # [S] its first token in the batch
    rank = past[seq] + np.arange(count, dtype=np.int64) - first[seq]  # [T] the gathered row of token t
    size = count * (width + count)
    bias = np.empty(size, np.float32) if out is None else out.reshape(-1)[:size]
    bias = bias.reshape(count, width + count)
    np.copyto(bias[:, :width], after)
    bias[:, :width][np.arange(width)[None, :] >= past[seq][:, None]] = NEG_INF
    own = after[:, rank]  # [T, T]: token t over the row of token u (of t's sequence or not)
    bias[:, width:] = np.where(seq[:, None] == seq[None, :], own, NEG_INF)
    return bias


def pool_window(plan: ForwardPlan, multiple: int = 32) -> tuple[int, int]:
    """The pool cells ``[lo, hi)`` a pool-view pass needs: from the lowest to the highest cell that the
    batch's sequences held before this pass (this pass's own cells are masked in the past block anyway),
    rounded out to `multiple`, within ``[0, n_kv)``; the first `multiple` cells when they held none (a
    pass of new prompts: its past block is masked whole); ``(0, n_kv)`` unless the window saves at least
    a quarter of the n_kv columns.

    A pool-view graph scores every token against every past column it is given, so a pass over a few of
    many sequences (a prompt chunk while others run, a prefill pass of 4 of 16 new prompts) reads a slice
    of the pool: the cells it skips all belong to other sequences or to this pass, and are masked anyway.
    The slice is still the pool's own memory (zero-copy); the bias is cut to match.
    """
    cells = plan.page_table.kv_indices
    if len(cells) > plan.num_tokens:  # some past: the cells of the tables that this pass did not take
        cells = cells[~np.isin(cells, plan.slot_mapping, assume_unique=True)]
    else:  # every cell of the batch's tables is this pass's (new prompts, or their first chunks)
        cells = cells[:0]
    if cells.size == 0:  # no past: the first `multiple` cells, all masked (no zero-length tensors)
        return 0, min(multiple, plan.n_kv)
    lo = int(cells.min()) // multiple * multiple
    hi = min(plan.n_kv, -(-(int(cells.max()) + 1) // multiple) * multiple)
    return (lo, hi) if 4 * (hi - lo) <= 3 * plan.n_kv else (0, plan.n_kv)


class NativeStepRunner(Runner):
    """The IO binding of a native decoder step in any view, rebinding only what changed (docs/engine.md).

    Inputs ``input_ids``, ``position_ids``, ``logits_index`` (gathered: ``token_sequence``) ``[T]`` int64
    (decode: ``seqlens_k [S]`` int32) are copied into fixed buffers; the past and ``attention_bias`` are
    bound per `view` (module docstring); outputs ``new_key.{i}`` / ``new_value.{i}`` ``[T, H, D]`` and
    ``logits [S, vocab]`` float32 are preallocated. Subclasses set `session`, `spec`, `vocab_size`,
    `kv_dtype`, `view`, check their graph and bind their own extra inputs (the cross view of T5 / Whisper)
    before `_run_step`.
    """

    session: ort.InferenceSession
    view: GraphView = GraphView.POOL
    pool_window: bool = False  # bind only the pool cells of the batch's sequences (`pool_window`)

    def _setup_binding(self, max_rows: int) -> None:
        """Make the binder and the buffers (``max_rows``: initial rows of the output buffers)."""
        layers = self.spec.num_layers
        row: tuple[tuple[int, ...], Any] = ((self.spec.num_kv_heads, self.spec.head_dim), np.float32)
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {
            f"new_{kind}.{i}": row for i in range(layers) for kind in ("key", "value")
        }
        shapes["logits"] = ((self.vocab_size,), np.float32)
        self.binder = Binder(self.session)
        self.outputs = OutputBuffers(np, shapes, rows=max(64, max_rows))
        small: dict[str, tuple[tuple[int, ...], Any]] = {
            n: ((), np.int64) for n in ("input_ids", "position_ids", "logits_index")
        }
        if self.view is GraphView.GATHERED:
            small["token_sequence"] = ((), np.int64)
        if self.view is GraphView.DECODE:
            small["seqlens_k"] = ((), np.int32)
        self._inputs = OutputBuffers(np, small, rows=max(64, max_rows))
        self._past_names = [
            [f"past_key.{i}", f"past_value.{i}", f"past_key_scale.{i}", f"past_value_scale.{i}"]
            for i in range(layers)
        ]
        self._small: dict[str, np.ndarray] = {}
        self._bias = np.empty(0, np.float32)  # the gathered view's bias, grown to the next power of two
        self.mirror = DecodeMirror(layers, self.spec.num_kv_heads, self.spec.head_dim)  # decode view only
        self._staged: DecodeMirror | None = None  # the mirror staged for the pass being bound
        self._present: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])  # decode: what the graph writes
        self._bound_cells = (-1, -1)  # the pool cells [lo, hi) bound as the past
        self._bound_tokens = -1
        self._bound_rows = -1
        self._held_back = False  # the last pass's rows are in the mirror only (`new_keys` reads them there)
        self.new_keys = []
        self.new_values = []
        self._logits = np.empty((0, self.vocab_size), np.float32)

    def _run_step(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Bind the pass (`_bind_step`), run it, `put` the new rows into `cache`; logits and run seconds."""
        self._bind_step(cache, plan, batch)
        start = time.perf_counter()
        self.binder.run()
        seconds = time.perf_counter() - start
        self._held_back = self._staged is not None
        if self._staged is not None:  # the decode view over the mirror: its rows stay there for now
            self._staged.commit()  # (`DecodeMirror.write_back` puts them into the pool later)
            return self._logits, seconds
        if self.view is GraphView.DECODE:  # this pass's rows, written into the present buffers
            row, rank = np.arange(plan.num_sequences), plan.gathered_lengths - 1
            self.new_keys = [keys[row, :, rank] for keys in self._present[0]]
            self.new_values = [values[row, :, rank] for values in self._present[1]]
        for layer in range(self.spec.num_layers):
            cache.put(layer, self.new_keys[layer], self.new_values[layer])
        return self._logits, seconds

    def reads_pool(self, cache: CausalCache, batch: Batch) -> bool:
        """A pool-view graph reads the pool view; gathered and decode views copy each sequence's cells."""
        return self.view is GraphView.POOL

    def repeat_room(self, cache: CausalCache) -> int:
        """The rows left in the mirror after a decode pass over it (`DecodeMirror.rows_left`); else 0."""
        return self.mirror.rows_left() if self._staged is not None and self._held_back else 0

    def decode_again(self, tokens: np.ndarray) -> tuple[np.ndarray, float]:
        """The last decode pass again over the mirror, each sequence one row further, fed ``tokens [S]``
        (the pass's order): the bound ``input_ids`` take the tokens and ``position_ids`` and
        ``seqlens_k`` one more, in place (nothing is rebound); see `Runner.decode_again`."""
        mirror = self._staged
        if mirror is None or not self._held_back:
            raise NoForwardPass("decode_again repeats a decode pass over the mirror: the last pass was none")
        small = self._small
        if mirror.slot_of is None:
            small["input_ids"][:] = tokens
        else:
            small["input_ids"][mirror.slot_of] = tokens
        small["position_ids"] += 1
        small["seqlens_k"] += 1
        mirror.advance()
        start = time.perf_counter()
        self.binder.run()
        seconds = time.perf_counter() - start
        mirror.commit()
        return self._logits, seconds

    def flush(self, cache: CausalCache) -> None:
        """Write the rows the decode view's mirror holds back into `cache` (`DecodeMirror.write_back`)."""
        self.mirror.write_back(cache)

    @property
    def new_keys(self) -> list[np.ndarray] | np.ndarray:
        """The last pass's new keys: ``[T, H, D]`` per layer, or ``[L, S, H, D]`` read back from the
        mirror after a decode pass over it."""
        return self.mirror.new_rows()[0] if self._held_back else self._new_keys

    @new_keys.setter
    def new_keys(self, keys: list[np.ndarray] | np.ndarray) -> None:
        self._new_keys = keys

    @property
    def new_values(self) -> list[np.ndarray] | np.ndarray:
        """The last pass's new values, as `new_keys`."""
        return self.mirror.new_rows()[1] if self._held_back else self._new_values

    @new_values.setter
    def new_values(self, values: list[np.ndarray] | np.ndarray) -> None:
        self._new_values = values

    def close(self) -> None:
        """Forget the bindings."""
        self.binder.clear()
        self._present = ([], [])

    def _bind_step(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> None:
        """Bind what changed since the last pass: the small int64 inputs are copied into fixed buffers
        (bound once per length), the past per view, the outputs once per token / row count."""
        binder, count, rows = self.binder, len(batch.tokens), len(batch.logits_index)
        small = [
            ("input_ids", batch.tokens),
            ("position_ids", batch.positions),
            ("logits_index", batch.logits_index),
        ]
        if self.view is GraphView.GATHERED:
            small.append(("token_sequence", plan.token_seq))
        if self.view is GraphView.DECODE:
            if count != plan.num_sequences:
                raise ShapeMismatch(
                    f"a decode-view graph runs passes of one token per sequence; this pass has {count} "
                    f"tokens of {plan.num_sequences} sequences (run it on the pool or gathered view)"
                )
            small.append(("seqlens_k", plan.gathered_lengths - 1))
        if self.view is GraphView.POOL:
            self._bind_pool(cache, plan)
        else:
            self._bind_gathered(cache, plan)
        slot_of = None if self._staged is None else self._staged.slot_of  # the mirror's slots
        for name, values in small:
            buf = self._small.get(name)
            if buf is None or len(buf) != len(values):  # the same view object while the length stays
                buf = self._small[name] = self._inputs.view(name, len(values))
            if slot_of is None:
                buf[:] = values
            elif name == "logits_index":  # the pass's row t is the graph's row slot_of[t]
                np.take(slot_of, values, out=buf)
            else:
                buf[slot_of] = values
            binder.bind_input(name, buf)
        if count != self._bound_tokens and self.view is not GraphView.DECODE:
            out = self.outputs
            self.new_keys = [out.view(f"new_key.{i}", count) for i in range(self.spec.num_layers)]
            self.new_values = [out.view(f"new_value.{i}", count) for i in range(self.spec.num_layers)]
            for i in range(self.spec.num_layers):
                binder.bind_output(f"new_key.{i}", self.new_keys[i])
                binder.bind_output(f"new_value.{i}", self.new_values[i])
            self._bound_tokens = count
        if rows != self._bound_rows:
            self._logits = self.outputs.view("logits", rows)
            binder.bind_output("logits", self._logits)
            self._bound_rows = rows

    def _bind_pool(self, cache: CausalCache, plan: ForwardPlan) -> None:
        """The pool view of every layer (rebound when its cells change; int8 with its scales) and the
        plan's ``bias_before_put [T, n_kv + T]``; with `pool_window`, only the cells ``[lo, hi)`` that
        hold the batch's sequences (`pool_window`) and the matching columns of the bias."""
        lo, hi = pool_window(plan) if self.pool_window else (0, plan.n_kv)
        bias = plan.bias_before_put
        if (lo, hi) != (0, plan.n_kv):  # the past block's columns [lo, hi), then this pass's T
            count, width = plan.num_tokens, hi - lo
            size = count * (width + count)
            if self._bias.size < size:
                self._bias = np.empty(1 << max(size - 1, 1).bit_length(), np.float32)
            window = self._bias[:size].reshape(count, width + count)
            window[:, :width] = bias[:, lo:hi]
            window[:, width:] = bias[:, plan.n_kv :]
            bias = window
        self.binder.bind_input("attention_bias", bias)
        if (lo, hi) != self._bound_cells:
            int8 = self.kv_dtype == "int8"
            for layer, names in enumerate(self._past_names):
                view = cast(PoolView, cache.get(layer, "pool"))
                self.binder.bind_input(names[0], view.keys[lo:hi])
                self.binder.bind_input(names[1], view.values[lo:hi])
                if int8:
                    assert view.key_scales is not None and view.value_scales is not None  # an int8 pool's
                    self.binder.bind_input(names[2], view.key_scales[lo:hi])
                    self.binder.bind_input(names[3], view.value_scales[lo:hi])
            self._bound_cells = (lo, hi)

    def _bind_gathered(self, cache: CausalCache, plan: ForwardPlan) -> None:
        """The gathered view of every layer ``[S, H, L, D]`` (the cache's staging buffers, copied by
        ``gather_rows`` on each `get`) with `gathered_bias_before_put` ``[T, L + T]``; decode view: the
        same buffers also as ``present_key.{i}`` / ``present_value.{i}`` (written in place), no bias."""
        binder, decode = self.binder, self.view is GraphView.DECODE
        if not decode:
            count, width = plan.num_tokens, int(plan.gathered_lengths.max(initial=0))
            size = count * (width + count)
            if self._bias.size < size:
                self._bias = np.empty(1 << max(size - 1, 1).bit_length(), np.float32)
            binder.bind_input("attention_bias", gathered_bias_before_put(plan, self._bias))
        self._staged = None
        if decode and cache.window is None and cache.kv_dtype == ("float32", "float32"):
            self._staged = self.mirror
            keys, values = self.mirror.stage(cache, plan)
        else:
            views = [
                cast(GatheredView, cache.get(layer, "gathered")) for layer in range(self.spec.num_layers)
            ]
            keys, values = [v.keys for v in views], [v.values for v in views]
        if keys is not self._present[0] or values is not self._present[1]:  # the mirror's, while S stays
            for layer, names in enumerate(self._past_names):
                binder.bind_input(names[0], keys[layer])
                binder.bind_input(names[1], values[layer])
                if decode:
                    binder.bind_output(f"present_key.{layer}", keys[layer])
                    binder.bind_output(f"present_value.{layer}", values[layer])
        self._present = (keys, values)
        self._bound_cells = (-1, -1)  # the pool view is no longer bound


class NativeRunner(NativeStepRunner):
    """Runs kvarray's native Llama decoder step (docs/export.md) in the graph's own view.

    Pool view: the pool view ``keys[:n_kv]`` of every layer and the plan's ``bias_before_put
    [T, n_kv + T]`` are bound zero-copy. Gathered view: the cache's gathered view ``[S, H, L, D]``,
    ``token_sequence [T]`` and `gathered_bias_before_put` ``[T, L + T]``. Decode view (passes of one token
    per sequence; others raise `ShapeMismatch`): the gathered view as past and present, ``seqlens_k``.
    The pool and gathered views write ``new_key.{i}`` / ``new_value.{i}`` ``[T, H, D]`` and
    ``logits [S, vocab]`` into preallocated buffers (the decode view: ``logits`` and its present
    buffers, whose new rows are read back), and `put` scatters the new rows.

    Args:
        session: the graph's session; info: its kvarray metadata; spec: the cache spec (None: the graph's).
        max_rows: initial rows of the output buffers.
        kv_dtype: the cache's storage (None: the graph's past dtype). A pool-view graph reads its own
            storage; a gathered- or decode-view float32 graph reads a float32 or int8 cache (the gather
            dequantizes), a float16 one a float16 cache.

    Raises `UnsupportedModel` (not a Llama decoder step), `GraphMismatch` (names, shapes or dtypes
    against the spec, listed), `ConfigError` (a storage the graph cannot read).
    """

    kind = "native"
    pool_window = True

    def __init__(
        self,
        session: ort.InferenceSession,
        info: GraphInfo,
        spec: KVSpec | None,
        max_rows: int,
        kv_dtype: str | None = None,
    ) -> None:
        if info.architecture != "llama" or info.view not in [v.value for v in GraphView]:
            raise UnsupportedModel(
                f"the engine runs decoder-only Llama graphs; got {info.architecture!r} "
                f"({info.graph}, view {info.view!r}): not supported yet"
            )
        self.session, self.info = session, info
        self.view = GraphView(info.view)
        self.spec = spec or info.spec
        self.vocab_size = info.vocab_size
        self.kv_dtype = kv_dtype or info.kv_dtype
        pool = self.view is GraphView.POOL
        allowed = (info.kv_dtype,) if pool else GATHERED_STORAGE[info.kv_dtype]
        if self.kv_dtype not in allowed:
            raise ConfigError(
                f"a {info.view}-view {info.kv_dtype} graph reads a cache stored as {' or '.join(allowed)}, "
                f"not {self.kv_dtype}"
            )
        self.group_size = info.group_size
        self.tokens = dict(info.tokens)
        self._check_graph()
        self._setup_binding(max_rows)

    def forward(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Bind, run, `put`; see `Runner`."""
        return self._run_step(cache, plan, batch)

    def _check_graph(self) -> None:
        """Names against the native convention of the view for the spec's layers; shapes and dtypes."""
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        if self.view is GraphView.DECODE:
            names = DECODE_NAMES
        elif self.view is GraphView.GATHERED:
            names = convention("native-gathered")
        else:
            names = convention("native-int8" if self.info.kv_dtype == "int8" else "native")
        check_names(names, self.spec.num_layers, list(ins), list(outs))
        wrong = step_mismatches(self.spec, self.vocab_size, ins, outs, self.view)
        for i in range(self.spec.num_layers):
            for name in (f"past_key.{i}", f"past_value.{i}"):
                stored = _ORT_DTYPES.get(ins[name].type, ins[name].type)
                if stored != self.info.kv_dtype:
                    wrong.append(f"{name} {ins[name].type} (expected {self.info.kv_dtype})")
        if wrong:
            raise GraphMismatch(f"the graph does not match the cache spec {self.spec}: " + "; ".join(wrong))


def pick_view(batch: Batch, min_sequences: int, twin: GraphView = GraphView.GATHERED) -> GraphView:
    """The view of a pass in "auto" mode: the `twin` (gathered or decode view) for a pass where every
    sequence feeds one token and that holds at least `min_sequences` sequences, pool otherwise.

    The pool view scores each token against all n_kv cells (about S * L when S sequences of L cells share
    the pool), the gathered and decode views each token against its own L cells after copying them: they
    win once the batch holds enough sequences (the measured crossovers: docs/engine_benchmarks.md). A
    prefill chunk of C tokens would make the gathered graph gather C * L rows per layer (and the decode
    graph takes one token per sequence), so passes with prompt chunks stay on the pool view.
    """
    sequences = len(batch.logits_index)
    one_token_each = len(batch.tokens) == sequences
    return twin if one_token_each and sequences >= min_sequences else GraphView.POOL


#: the default crossover of each twin (`ViewSwitch`): passes of one token per sequence and at least this
#: many sequences read it (measured: docs/engine_benchmarks.md)
TWIN_MIN_SEQUENCES = {GraphView.GATHERED: 8, GraphView.DECODE: 1}


class ViewSwitch(Runner):
    """Two `NativeRunner` s of one model over one cache, the pool-view graph and a twin (gathered- or
    decode-view graph); each pass runs on the view `pick_view` chooses.

    Args:
        pool, twin: the runners of the model's pool-view graph and of its gathered- or decode-view graph
            (the same spec, vocabulary and cache storage).
        min_sequences: passes of one token per sequence and at least this many sequences read the twin
            (None: `TWIN_MIN_SEQUENCES`, the measured crossover).

    Attributes: passes, a count of the passes run on each view (``{GraphView.POOL: n, twin.view: m}``).

    Raises `GraphMismatch` when the two graphs are not a pool-view graph and a twin of one model.
    """

    kind = "native"
    # a pass mixing prompt chunks with decode tokens would run on the pool graph, each decode token scoring
    # every past cell of the pool window: decode passes of their own run on the twin
    split_prefill = True

    def __init__(self, pool: NativeRunner, twin: NativeRunner, min_sequences: int | None = None) -> None:
        if pool.view is not GraphView.POOL or twin.view is GraphView.POOL:
            raise GraphMismatch(
                f"a view switch needs a pool-view graph and a gathered- or decode-view twin; got "
                f"{pool.view.value!r} and {twin.view.value!r}"
            )
        mine = (pool.spec, pool.vocab_size, pool.kv_dtype)
        theirs = (twin.spec, twin.vocab_size, twin.kv_dtype)
        if mine != theirs:
            raise GraphMismatch(
                f"the pool-view graph (spec, vocabulary, storage {mine}) and the {twin.view.value}-view "
                f"graph ({theirs}) are not of one model"
            )
        self.runners = {GraphView.POOL: pool, twin.view: twin}
        self.twin = twin.view
        self.min_sequences = TWIN_MIN_SEQUENCES[twin.view] if min_sequences is None else int(min_sequences)
        self.spec, self.vocab_size, self.kv_dtype = pool.spec, pool.vocab_size, pool.kv_dtype
        self.group_size, self.tokens, self.info = pool.group_size, pool.tokens, pool.info
        self.passes = {GraphView.POOL: 0, twin.view: 0}
        self._last = pool

    @property
    def binder(self) -> Binder:  # type: ignore[override]
        """The binding of the runner that ran the last pass."""
        return self._last.binder

    @property
    def new_keys(self) -> list[np.ndarray] | np.ndarray:  # type: ignore[override]
        """The last pass's new keys ``[T, H, D]`` per layer."""
        return self._last.new_keys

    @property
    def view(self) -> GraphView:
        """The view of the last pass."""
        return self._last.view

    def forward(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Run the pass on the view `_pick` chooses; see `Runner`."""
        view = self._pick(cache, batch)
        if view is not self.twin:  # a pool-view pass reads the rows a decode twin still holds back
            self.flush(cache)
        self._last = self.runners[view]
        result = self._last.forward(cache, plan, batch)
        self.passes[view] += 1
        return result

    def reads_pool(self, cache: CausalCache, batch: Batch) -> bool:
        """Whether `batch`'s pass runs on the pool-view graph."""
        return self._pick(cache, batch) is GraphView.POOL

    def flush(self, cache: CausalCache) -> None:
        """Write the rows the twin holds back into `cache` (`NativeStepRunner.flush`)."""
        self.runners[self.twin].flush(cache)

    def repeat_room(self, cache: CausalCache) -> int:
        """That of the runner of the last pass (`NativeStepRunner.repeat_room`)."""
        return self._last.repeat_room(cache)

    def decode_again(self, tokens: np.ndarray) -> tuple[np.ndarray, float]:
        """The last pass again on its view (`NativeStepRunner.decode_again`)."""
        result = self._last.decode_again(tokens)
        self.passes[self._last.view] += 1
        return result

    def _pick(self, cache: CausalCache, batch: Batch) -> GraphView:
        """`pick_view`, but the pool view for a decode twin over a cache with a window (positions then go
        past its rope tables' rows, ``max_position_embeddings``)."""
        view = pick_view(batch, self.min_sequences, self.twin)
        return GraphView.POOL if view is GraphView.DECODE and cache.window is not None else view

    def close(self) -> None:
        """Forget both runners' bindings."""
        for runner in self.runners.values():
            runner.close()

"""The forward plans and what models read: pool view, gathered view, page table, cross view, their biases.

`CausalCache.start_forward` returns a `ForwardPlan`; `CausalCache.get` wraps its metadata with the pool
arrays into a `PoolView`, a `GatheredView` or a `PageTable`. `EncoderCache.start_forward` returns a
`CrossPlan`; its `get` returns a `CrossView` (or a `GatheredView`); their shapes are named in
`kvarray.encoder`. Everything here is host bookkeeping (NumPy); the metadata is built lazily, once per
plan, and is shared by every layer.

Shapes: T tokens in the batch, S sequences in it, n_kv the pool view's length, L the longest sequence
of the batch (cells), H kv heads, D head_dim, g values per int8 group. Biases are float32, 0 where a
token may attend and -inf where it may not; the rule is in `docs/causal.md`:
    token at position p of sequence s sees cell c  iff  s owns c, pos(c) <= p, and
    (no window, or pos(c) > p - window, or c is one of the first `sinks` cells of s's cell table).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from .buffers import StagingBuffers
from .cells import Cells
from .errors import ConfigError, StalePlan

if TYPE_CHECKING:
    from .encoder import EncoderCache

NEG_INF = np.float32(-np.inf)


class View(str, enum.Enum):
    """What `get(layer, view)` returns: the pool view, the gathered view, or the page table."""

    POOL = "pool"
    GATHERED = "gathered"
    PAGES = "pages"

    @classmethod
    def parse(cls, view: View | str) -> View:
        """The `View` named by `view`; raises `ConfigError` for an unknown name."""
        if type(view) is str or type(view) is View:  # the common case: one dict lookup
            found = _VIEWS.get(view)
            if found is not None:
                return found
        try:
            return cls(view)
        except ValueError:
            names = ", ".join(repr(v.value) for v in cls)
            raise ConfigError(f"unknown view {view!r}; expected one of {names}") from None


_VIEWS: dict[str, View] = {**{v.value: v for v in View}, **{v: v for v in View}}


@dataclass(frozen=True, slots=True)
class PageTable:
    """The batch's cell tables in CSR form: FlashInfer's paged-KV convention with page size 1.

    Attributes:
        kv_indptr: ``[S + 1]`` int32; sequence s (``plan.sequences[s]``) owns
            ``kv_indices[kv_indptr[s]:kv_indptr[s + 1]]``.
        kv_indices: ``[kv_indptr[S]]`` int32 cells (pool rows), each sequence's in position order.
        kv_last_page_len: ``[S]`` int32, all 1 (a page is one cell; every sequence of a batch holds one).
    """

    kv_indptr: Any
    kv_indices: Any
    kv_last_page_len: Any

    @property
    def page_size(self) -> int:
        """Cells per page: 1."""
        return 1


@dataclass(frozen=True, slots=True)
class PoolView:
    """The pool view of one layer: zero-copy slices of the pools plus the bias (read after `put`).

    Attributes:
        keys, values: ``[n_kv, H, D]`` (NHD) slices of the layer's pools, in their storage dtype.
        key_scales, value_scales: ``[n_kv, H * D // g]`` float16 for an int8 pool, else None.
        bias: ``[T, n_kv]`` float32, 0 or -inf; this pass's tokens are already in the pool.
    """

    keys: Any
    values: Any
    key_scales: Any | None
    value_scales: Any | None
    bias: Any


@dataclass(frozen=True, slots=True)
class GatheredView:
    """The gathered view of one layer: each sequence's cells copied (dequantized) into staging buffers.

    Attributes:
        keys, values: ``[S, H, L, D]`` (HND), float16 for a float16 pool, else float32 (an int8 pool is
            dequantized to the spec's dtype); rows past a sequence's length are 0. The buffers are the
            layer's staging buffers: valid until the next gathered `get` of the same layer.
        lengths: ``[S]`` int32 cells of each sequence.
        bias: ``[T, L]`` float32: token t over the gathered row of its own sequence.
    """

    keys: Any
    values: Any
    lengths: Any
    bias: Any


@dataclass(frozen=True)
class ForwardPlan:
    """One forward pass: where each token goes, and the metadata of the views (built lazily, once).

    Attributes:
        seq_ids: ``[T]`` int64 sequence of each token, as given.
        positions: ``[T]`` int64 position of each token, as given.
        slot_mapping: ``[T]`` int32 the cell each token is written to by `put`.
        sequences: ``[S]`` int64 the batch's sequences in order of first appearance.
        token_seq: ``[T]`` int32 index into `sequences` of each token.
        n_kv: the pool view's length (a multiple of 32, at most the capacity).
        window, sinks: the cache's window (None: none) and sink count.

    Lazily built attributes (host NumPy; read-only): `page_table`, `bias`, `bias_before_put`,
    `gathered_lengths`, `gathered_bias`, `logits_index`, `cell_positions`. Reading one after the cache
    moved on (the next `start_forward`, or `remove`, `copy_prefix`, `shift`, `defrag`, `load_state_dict`)
    raises `StalePlan`. The biases live in buffers the cache reuses from pass to pass (a fresh
    ``[T, n_kv]`` array each pass would cost page faults on every step), so they are valid until the next
    `start_forward`: copy one to keep it longer.
    """

    seq_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    sequences: np.ndarray
    token_seq: np.ndarray
    n_kv: int
    window: int | None
    sinks: int
    _cells: Cells = field(repr=False, compare=False)
    _generation: int = field(repr=False, compare=False)
    _scratch: StagingBuffers = field(repr=False, compare=False)
    #: ``[S]`` int64 the slots of `sequences` in the cells' `CellTables` when the cache knew them (a
    #: decode step looked them up), else None (`page_table` looks them up)
    _table_slots: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        """T, the batch's tokens."""
        return len(self.slot_mapping)

    @property
    def num_sequences(self) -> int:
        """S, the batch's sequences."""
        return len(self.sequences)

    def is_current(self) -> bool:
        """True while the cache's bookkeeping is the one this plan was made for."""
        return self._cells.generation == self._generation

    def check_current(self) -> None:
        """Raise `StalePlan` unless `is_current()`."""
        if not self.is_current():
            raise StalePlan("this forward plan is stale: the cache changed since its start_forward")

    @cached_property
    def page_table(self) -> PageTable:
        """The batch's cell tables, `PageTable` (host arrays)."""
        self.check_current()
        if self._table_slots is not None:
            indptr, indices = self._cells.tables.csr(self._table_slots)
        else:
            indptr, indices = self._cells.page_table(self.sequences)
        return PageTable(frozen(indptr), frozen(indices), frozen(np.ones(self.num_sequences, np.int32)))

    @property
    def is_plain_decode(self) -> bool:
        """One token per sequence and no window: token t is sequence t's newest token and sees every cell
        of its table (the views' fast paths)."""
        return self.window is None and self.num_tokens == self.num_sequences

    @cached_property
    def gathered_lengths(self) -> np.ndarray:
        """``[S]`` int32 cells of each sequence of the batch (the gathered view's lengths)."""
        if self._table_slots is None or "page_table" in self.__dict__:
            return frozen(np.diff(self.page_table.kv_indptr).astype(np.int32))
        self.check_current()  # a plain decode step: the table lengths, without building the page table
        return frozen(self._cells.tables.length[self._table_slots])

    @cached_property
    def logits_index(self) -> np.ndarray:
        """``[S]`` int64 the batch index of each sequence's last token (the rows whose logits are wanted)."""
        last = np.zeros(self.num_sequences, np.int64)
        np.maximum.at(last, self.token_seq, np.arange(self.num_tokens, dtype=np.int64))
        return frozen(last)

    @cached_property
    def cell_positions(self) -> np.ndarray:
        """``[n_kv]`` int64 the position each cell of the pool view holds (`FREE_CELL` when free)."""
        self.check_current()
        return frozen(self._cells.positions[: self.n_kv].copy())

    @cached_property
    def _pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (token t, entry j of its sequence's cell table) the token may see: ``(t, j, cell)``, int64
        ``[P]`` each (`visible_pairs`, with a shortcut for a plain decode step)."""
        if not self.is_plain_decode:
            return self.visible_pairs()
        pages = self.page_table  # token t is sequence t and sees its whole table
        indptr = pages.kv_indptr.astype(np.int64)
        lens = np.diff(indptr)
        rows = np.repeat(np.arange(self.num_tokens, dtype=np.int64), lens)
        rank = np.arange(len(rows), dtype=np.int64) - np.repeat(indptr[:-1], lens)
        return rows, rank, pages.kv_indices.astype(np.int64)

    def visible_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_pairs` by the mask rule for any batch: each token against every entry of its sequence's table
        (the reference of the plain-decode shortcuts)."""
        pages = self.page_table
        self.check_current()
        indptr = pages.kv_indptr.astype(np.int64)
        lens = np.diff(indptr)[self.token_seq]
        rows = np.repeat(np.arange(self.num_tokens, dtype=np.int64), lens)
        first = np.repeat(np.cumsum(lens) - lens, lens)
        rank = np.arange(len(rows), dtype=np.int64) - first
        cells = pages.kv_indices[np.repeat(indptr[self.token_seq], lens) + rank]
        cell_pos = self._cells.positions[cells]
        token_pos = self.positions[rows]
        visible = cell_pos <= token_pos
        if self.window is not None:
            visible &= (cell_pos > token_pos - self.window) | (rank < self.sinks)
        return rows[visible], rank[visible], cells[visible]

    @cached_property
    def bias(self) -> np.ndarray:
        """``[T, n_kv]`` float32 pool-view bias, read after `put` (this pass's cells hold its tokens)."""
        width = self.n_kv
        if self.is_plain_decode:  # row t is 0 over sequence t's cells: kv_indices shifted by t * n_kv
            pages = self.page_table
            indptr = pages.kv_indptr
            row_starts = np.arange(self.num_tokens, dtype=np.int64) * width
            flat = np.repeat(row_starts, indptr[1:] - indptr[:-1]) + pages.kv_indices
        else:
            rows, _, cells = self._pairs
            flat = rows * width + cells
        return frozen(self._mask("bias", (self.num_tokens, width), flat))

    def _past_block(self, name: str, extra: int) -> np.ndarray:
        """``[T, n_kv + extra]`` float32 from the reused buffer `name`: 0 where token t sees cell c (after
        `put`), -inf elsewhere, including the `extra` columns."""
        rows, _, cells = self._pairs
        width = self.n_kv + extra
        return self._mask(name, (self.num_tokens, width), rows * width + cells)

    def _mask(self, name: str, shape: tuple[int, int], flat: np.ndarray) -> np.ndarray:
        """`shape` float32 from the reused buffer `name`: 0 at the flat indices ``flat [P]``, -inf
        elsewhere. The buffer remembers its array and where its zeros are (``held[name]``): when the
        previous mask had the same shape, the same array is returned with only those zeros reset, not
        the whole buffer filled (a ``[64, 2112]`` fill is ~30 us)."""
        held = self._scratch.held.get(name)
        if held is not None and held[0] == shape:
            buf = held[2]
            buf.flags.writeable = True  # the previous plan's (frozen) mask: valid until this pass
            buf.reshape(-1)[held[1]] = NEG_INF
        else:
            buf = self._scratch.get(name, shape, np.float32)
            buf.fill(NEG_INF)
        buf.reshape(-1)[flat] = 0.0
        self._scratch.held[name] = (shape, flat, buf)
        return buf

    @cached_property
    def bias_before_put(self) -> np.ndarray:
        """``[T, n_kv + T]`` float32: the past block (cells as they were before this pass: the cells this
        pass writes, fresh or a ring cell being overwritten, are masked) then this pass's tokens (causal
        within each sequence, window and sinks applied). For graphs that read the pool before `put`."""
        n_kv = self.n_kv
        out = self._past_block("bias_before_put", self.num_tokens)
        self._scratch.held.pop("bias_before_put")  # written below: its zeros are no longer `held`'s
        out[:, self.slot_mapping] = NEG_INF
        # this pass's block: token t sees token u of its sequence at an earlier or equal position
        same = self.token_seq[:, None] == self.token_seq[None, :]
        p_t, p_u = self.positions[:, None], self.positions[None, :]
        visible = same & (p_u <= p_t)
        if self.window is not None:
            visible &= (p_u > p_t - self.window) | self._new_token_is_sink()[None, :]
        out[:, n_kv:][visible] = 0.0
        return frozen(out)

    def _new_token_is_sink(self) -> np.ndarray:
        """``[T]`` bool: the token's cell is among the first `sinks` of its sequence's table."""
        lengths = self.gathered_lengths.astype(np.int64)
        counts = np.bincount(self.token_seq, minlength=self.num_sequences)
        order = np.argsort(self.token_seq, kind="stable")
        rank = np.empty(self.num_tokens, np.int64)
        starts = np.cumsum(counts) - counts
        rank[order] = np.arange(self.num_tokens) - np.repeat(starts, counts)
        rank += (lengths - counts)[self.token_seq]
        return rank < self.sinks

    @cached_property
    def gathered_bias(self) -> np.ndarray:
        """``[T, L]`` float32 bias of each token over its own sequence's gathered row."""
        rows, rank, _ = self._pairs
        width = int(self.gathered_lengths.max(initial=0))
        bias = self._scratch.get("gathered_bias", (self.num_tokens, width), np.float32)
        bias.fill(NEG_INF)
        bias[rows, rank] = 0.0
        return frozen(bias)


# ---- the encoder cache's cross view (kvarray.encoder) ---------------------------------------------
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
        return frozen(bias)

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
        return frozen(bias.astype(np.float32))


def frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr

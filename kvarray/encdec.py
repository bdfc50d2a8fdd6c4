"""`EncoderDecoderCache`: one `CausalCache` (decoder self attention) and one `EncoderCache` (cross attention)
behind the cache interface, for T5, Whisper and multimodal encoder-decoder models.

One `start_forward` plans both sides: the encoder side is planned first without changing anything
(`EncoderCache.make_plan`), then the causal side assigns cells, and only when that succeeded does the
encoder plan become current, so a refused batch leaves both caches as they were. Beam search: `fork`
shares the parent's encoder entry (a reference) and its decoder prefix (`copy_prefix`, no copy);
`reorder` re-points the decoder prefixes of beams and never touches their cross entries. See
docs/encoder.md. Shapes: T decoder tokens, S sequences, M cross rows, H kv heads, D head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .causal import CacheStats, CausalCache
from .encoder import EncoderCache, EncoderStats
from .errors import ConfigError, SpecMismatch, UnknownSequence
from .guard import as_int_array, exclusive, new_guard, seq_id
from .state import load_state, save_state
from .views import CrossPlan, CrossView, ForwardPlan, GatheredView, PageTable, PoolView, View

_SELF, _CROSS = "self.", "cross."


@dataclass(frozen=True, slots=True)
class EncDecPlan:
    """One forward pass of an encoder-decoder model.

    Attributes:
        self_plan: the causal cache's `ForwardPlan` (``slot_mapping [T]`` int32, self-attention views).
        cross: the encoder cache's `CrossPlan` (cross bias ``[T, M]``, entry lengths ``[S]``).
    """

    self_plan: ForwardPlan
    cross: CrossPlan

    @property
    def slot_mapping(self) -> np.ndarray:
        """``[T]`` int32 the cell each decoder token is written to."""
        return self.self_plan.slot_mapping


@dataclass(frozen=True, slots=True)
class EncDecStats:
    """Both caches' figures: `self_attention` (`CacheStats`) and `cross` (`EncoderStats`)."""

    self_attention: CacheStats
    cross: EncoderStats


class EncoderDecoderCache:
    """A decoder's self-attention cache and its cross-attention cache, managed as one.

    Args:
        causal: the decoder self-attention `CausalCache`.
        encoder: the cross-attention `EncoderCache`, with as many layers as `causal`.

    Raises `ConfigError` when the two disagree on the number of layers or array namespace.

    One thread at a time (`ConcurrentUse`), as each of the two caches; a refused call changes neither
    (docs/reliability.md).
    """

    def __init__(self, causal: CausalCache, encoder: EncoderCache) -> None:
        self._guard = new_guard()  # `exclusive`: one thread at a time
        if not isinstance(causal, CausalCache) or not isinstance(encoder, EncoderCache):
            raise ConfigError(
                f"EncoderDecoderCache takes a CausalCache and an EncoderCache, got {type(causal).__name__} "
                f"and {type(encoder).__name__}"
            )
        if causal.spec.num_layers != encoder.spec.num_layers or causal.xp is not encoder.xp:
            raise ConfigError(
                f"the causal cache ({causal.spec.num_layers} layers, {causal.xp.__name__}) and the encoder "
                f"cache ({encoder.spec.num_layers} layers, {encoder.xp.__name__}) must match"
            )
        self.causal = causal
        self.encoder = encoder
        self._plan: EncDecPlan | None = None

    @property
    def plan(self) -> EncDecPlan | None:
        """The current pass (None before the first `start_forward`)."""
        return self._plan

    # ---- used by models --------------------------------------------------------------------------
    @exclusive
    def put(self, layer: int, keys: Any, values: Any) -> None:
        """Store this pass's self-attention ``keys``, ``values [T, H, D]`` of `layer` (`CausalCache.put`)."""
        self.causal.put(layer, keys, values)

    @exclusive
    def get(self, layer: int, view: View | str = View.POOL) -> PoolView | GatheredView | PageTable:
        """The self-attention view of `layer` (`CausalCache.get`: pool, gathered or pages)."""
        return self.causal.get(layer, view)

    @exclusive
    def get_cross(self, layer: int, view: View | str = View.POOL) -> CrossView | GatheredView:
        """The cross-attention view of `layer` (`EncoderCache.get`): `CrossView` ``[M, H, D]`` with
        ``bias [T, M]``, or a `GatheredView` ``[S, H, L, D]``."""
        return self.encoder.get(layer, view)

    @exclusive
    def put_cross(self, seq: int, layer: int, keys: Any, values: Any, modality: str = "text") -> None:
        """Write `seq`'s cross K/V ``[M, H, D]`` of `layer` once (`EncoderCache.put_sequence`)."""
        self.encoder.put_sequence(seq, layer, keys, values, modality)

    @exclusive
    def put_cross_batch(
        self, seq_ids: Any, layer: int, keys: Any, values: Any, lengths: Any, modality: str = "text"
    ) -> None:
        """Write an encoder batch's cross K/V ``[sum(lengths), H, D]`` of `layer` (`put_batch`)."""
        self.encoder.put_batch(seq_ids, layer, keys, values, lengths, modality)

    # ---- cache management ------------------------------------------------------------------------
    @exclusive
    def start_forward(self, seq_ids: Any, positions: Any, defrag: bool = True) -> EncDecPlan:
        """Plan a decoder pass over ``seq_ids [T]``, ``positions [T]`` on both caches (`defrag`: whether the
        decoder cache may defragment first, `CausalCache.start_forward`).

        Raises `NoEncoderEntry` (a sequence without a complete encoder entry), and whatever
        `CausalCache.start_forward` raises (`CacheFull`, `PositionError`, ...); then neither cache changed.
        """
        cross = self.encoder.make_plan(seq_ids, positions)  # validates, changes nothing
        self_plan = self.causal.start_forward(seq_ids, positions, defrag)
        self.encoder.use(cross)
        self._plan = EncDecPlan(self_plan, cross)
        return self._plan

    @exclusive
    def abort_forward(self) -> int:
        """Drop the current pass's decoder tokens (`CausalCache.abort_forward`, which a failed `put` does
        itself); encoder entries stay. Returns the tokens dropped."""
        return self.causal.abort_forward()

    @exclusive
    def remove(self, seq: int, begin: int = 0, end: int | None = None) -> int:
        """Drop `seq`'s decoder tokens at positions ``[begin, end)``; the whole range also drops its encoder
        entry reference. Returns the decoder tokens dropped.

        Raises `UnknownSequence` when neither cache holds `seq`, `PositionError` (range).
        """
        seq = seq_id(seq)
        in_causal, in_encoder = self.causal.length(seq) > 0, seq in self.encoder.sequences()
        if not in_causal and not in_encoder:
            raise UnknownSequence(f"sequence {seq} is in neither the decoder nor the encoder cache")
        whole = begin == 0 and end is None
        dropped = self.causal.remove(seq, begin, end) if in_causal else 0
        if whole and in_encoder:
            self.encoder.remove(seq)
        return dropped

    @exclusive
    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Start the new sequence `dst` with `src`'s first `length` decoder tokens and `src`'s encoder entry,
        both shared (no data copied).

        Raises `NoEncoderEntry` (src), `SequenceExists` (dst), `TooManySequences`, and
        `CausalCache.copy_prefix`'s errors; a refused call changes nothing.
        """
        self.encoder.check_fork(src, dst)
        if length or self.causal.length(src):
            self.causal.copy_prefix(src, dst, length)
        self.encoder.fork(src, dst)

    @exclusive
    def fork(self, src: int, dst: int) -> None:
        """A new beam: `dst` shares all of `src`'s decoder tokens and its encoder entry (`copy_prefix`)."""
        self.copy_prefix(src, dst, self.causal.length(src))

    @exclusive
    def reorder(self, beams: Sequence[int], parents: Sequence[int]) -> None:
        """After a beam-search step, beam ``beams[i]`` continues from ``parents[i]``'s decoder prefix.

        Each changed beam drops its decoder cells and shares all of its parent's (as they were before the
        call; swaps and cycles are handled with one temporary sequence). Cross entries are untouched:
        every beam must already share its parent's encoder entry.

        Raises `ConfigError` (lengths differ, repeated beams, a parent with another encoder entry),
        `UnknownSequence`, `TooManySequences` (no room for the temporary); a refused call changes nothing.
        """
        beams, parents = as_int_array("beams", beams).tolist(), as_int_array("parents", parents).tolist()
        if len(beams) != len(parents) or len(set(beams)) != len(beams):
            raise ConfigError(f"beams and parents must pair up, beams distinct; got {beams}, {parents}")
        known = set(self.encoder.sequences())
        for beam, parent in zip(beams, parents, strict=True):
            for seq in (beam, parent):
                if seq not in known:
                    raise UnknownSequence(f"sequence {seq} has no encoder entry")
            if not self.encoder.shares_entry(beam, parent):
                raise ConfigError(f"beam {beam} and parent {parent} hold different encoder entries")
        pending = {int(b): int(p) for b, p in zip(beams, parents, strict=True) if b != p}
        decoded = set(self.causal.sequences())
        temp = min([0, *decoded, *known]) - 1
        for op, *args in _reorder_ops(pending, temp):
            src, dst = args if op == "copy" else (None, args[0])
            if dst in decoded:
                self.causal.remove(dst)
                decoded.discard(dst)
            if op == "copy" and src in decoded:
                self.causal.copy_prefix(src, dst, self.causal.length(src))
                decoded.add(dst)

    @exclusive
    def can_resume(self, seq: int, position: int) -> bool:
        """True iff `seq` has a complete encoder entry and `CausalCache.can_resume(seq, position)`."""
        try:
            complete = len(self.encoder.entry(seq).layers_written) == self.encoder.spec.num_layers
        except UnknownSequence:
            return False
        return complete and self.causal.can_resume(seq, position)

    @exclusive
    def shift(self, seq: int, delta: int, rope: Any, begin: int = 0) -> None:
        """Shift `seq`'s decoder positions (`CausalCache.shift`); its cross entry has no positions to move."""
        self.causal.shift(seq, delta, rope, begin)

    @exclusive
    def defrag(self) -> Any:
        """Compact the decoder pools (`CausalCache.defrag`); encoder entries never move."""
        return self.causal.defrag()

    @exclusive
    def stats(self) -> EncDecStats:
        """Both caches' occupancy and memory."""
        return EncDecStats(self.causal.stats(), self.encoder.stats())

    @exclusive
    def state_dict(self) -> dict[str, np.ndarray]:
        """Both caches' `state_dict`s, keys prefixed ``self.`` and ``cross.`` (host NumPy copies)."""
        state = {_SELF + k: v for k, v in self.causal.state_dict().items()}
        state.update({_CROSS + k: v for k, v in self.encoder.state_dict().items()})
        return state

    @exclusive
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore both caches bit for bit; `SpecMismatch` (both unchanged) when either part does not fit."""
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise SpecMismatch(f"an encoder-decoder state must be a mapping of names (str) to arrays, "
                               f"got {type(state).__name__}")
        parts = {p: {k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for p in (_SELF, _CROSS)}
        if not parts[_SELF] or not parts[_CROSS]:
            raise SpecMismatch("not an encoder-decoder cache state: self.* and cross.* entries are needed")
        self.encoder.check_state(parts[_CROSS])
        self.causal.load_state_dict(parts[_SELF])
        self.encoder.load_state_dict(parts[_CROSS])
        self._plan = None

    @exclusive
    def save(self, path: str) -> None:
        """Write both caches to one safetensors file, atomically, with a SHA-256 of the tensors."""
        save_state(path, self.state_dict(), "encdec")

    @exclusive
    def load(self, path: str) -> None:
        """Restore a file written by `save`; `SpecMismatch` (both unchanged) for another configuration."""
        self.load_state_dict(load_state(path, "encdec"))

    @exclusive
    def close(self) -> None:
        """Close both caches."""
        self.causal.close()
        self.encoder.close()
        self._plan = None

    def __enter__(self) -> EncoderDecoderCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reorder_ops(pending: dict[int, int], temp: int) -> list[tuple[Any, ...]]:
    """The steps that give each beam ``dst`` of ``pending {dst: src}`` the prefix ``src`` held before.

    Returns ``("copy", src, dst)`` (dst drops its cells, then shares src's) and ``("drop", seq)`` steps. A
    beam is overwritten only after every beam copying from it is done; a cycle is broken by first copying
    one of its beams to `temp` (the very first step when there is a cycle, so that a refused temporary
    changes nothing), dropped once its last reader is done.
    """
    pending = dict(pending)
    readers: dict[int, int] = {}
    for src in pending.values():
        readers[src] = readers.get(src, 0) + 1
    ops: list[tuple[Any, ...]] = []
    temp_live = False
    cycle = _node_on_cycle(pending)
    while pending:
        ready = [d for d in pending if not readers.get(d)]
        if cycle is not None or not ready:  # break a cycle through the temporary sequence
            first = cycle if cycle is not None else next(iter(pending))
            cycle = None
            ops.append(("copy", first, temp))
            for d, s in pending.items():
                if s == first:
                    pending[d] = temp
            readers[temp], readers[first], temp_live = readers.pop(first), 0, True
            continue
        for dst in ready:
            src = pending.pop(dst)
            ops.append(("copy", src, dst))
            readers[src] -= 1
            if src == temp and temp_live and not readers[src]:
                ops.append(("drop", temp))
                temp_live = False
    return ops


def _node_on_cycle(pending: dict[int, int]) -> int | None:
    """A beam on a cycle of ``pending {dst: src}`` (a swap, a rotation), or None when there is none."""
    for start in pending:
        seen, node = set(), start
        while node in pending and node not in seen:
            seen.add(node)
            node = pending[node]
        if node == start:
            return start
    return None

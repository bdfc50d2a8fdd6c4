"""The cache interface shared by the causal, encoder and encoder-decoder caches.

Two groups of methods, as in Ollama's kvcache: those a model implementation calls inside a forward pass,
and those the engine calls to manage the cache between passes. Ranges are half-open ``[begin, end)`` in
token positions. Every failure is a named `kvarray.errors` exception raised before anything changes.
Shapes: T tokens in the batch, S sequences in it, H kv heads, D head_dim.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .views import ForwardPlan, View


@runtime_checkable
class Cache(Protocol):
    """What a model and an engine see of any kvarray cache."""

    # ---- used by models --------------------------------------------------------------------------
    def put(self, layer: int, keys: Any, values: Any) -> None:
        """Store this pass's ``keys``, ``values [T, H, D]`` (NHD, the spec's dtype, any DLPack array) of
        `layer` in the cells the current plan assigned.

        Raises `NoForwardPass` (no current plan, `StalePlan` for an outdated one), `IndexOutOfRange`
        (layer), `ShapeMismatch` (rank, head shape, row count), `DTypeMismatch`; nothing is written then.
        """
        ...

    def get(self, layer: int, view: View | str = View.POOL) -> Any:
        """What `layer` reads in the current pass: a view of everything the batch's tokens may attend to,
        this pass's own tokens included (`PoolView`, `GatheredView` or `PageTable`; see kvarray.views).

        Raises `NoForwardPass` / `StalePlan`, `IndexOutOfRange` (layer), `ConfigError` (unknown view).
        """
        ...

    # ---- cache management ------------------------------------------------------------------------
    def start_forward(self, seq_ids: Any, positions: Any) -> ForwardPlan:
        """Plan a forward pass over ``seq_ids [T]``, ``positions [T]`` (flat, any mix of sequences) and make
        it current; returns the plan (``slot_mapping [T]`` int32 and the views' metadata).

        Raises `ShapeMismatch`, `PositionError`, `TooManySequences`, `CacheFull` (asked, free); a refused
        batch changes nothing.
        """
        ...

    def remove(self, seq: int, begin: int = 0, end: int | None = None) -> int:
        """Drop `seq`'s tokens at positions ``[begin, end)`` (end None: through the last); returns how many.

        Raises `UnknownSequence`, `PositionError` (``begin < 0`` or ``end < begin``).
        """
        ...

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Make the first `length` tokens of `src` the start of the new sequence `dst`, sharing storage.

        Raises `UnknownSequence` (src), `PositionError` (length out of ``[0, len(src)]``),
        `SequenceExists` (dst holds tokens), `TooManySequences`.
        """
        ...

    def can_resume(self, seq: int, position: int) -> bool:
        """True iff a token of `seq` at `position` would be accepted by `start_forward` now."""
        ...

    def shift(self, seq: int, delta: int, rope: Any, begin: int = 0) -> None:
        """Move `seq`'s tokens at positions ``[begin, inf)`` by `delta` positions, re-rotating keys by `rope`.

        Raises `UnknownSequence`, `PositionError` (positions would collide or go negative), `CacheFull`
        (no room for copy-on-write).
        """
        ...

    def defrag(self) -> Any:
        """Compact storage now, between passes; returns what was moved."""
        ...

    def stats(self) -> Any:
        """Occupancy and memory figures (a dataclass)."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole cache as host NumPy arrays (copies), for `load_state_dict`."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` bit for bit. Raises `SpecMismatch` (cache unchanged) for another config."""
        ...

    def close(self) -> None:
        """Release the storage; later calls raise `CacheClosed`."""
        ...

"""The runner interface: the model-specific part of the engine (`kvarray.ort.engine.EngineCore`).

A runner runs one forward pass of its graph over the cache's current plan. Runners of encoder-decoder
models also take part in a request's lifecycle through three hooks (no-ops by default, so a decoder-only
runner defines none):

    waiting ──admit_limit──> admitted ──on_admit──> running ── ... ──> finished ──on_finish
                                 (cells and the runner's own room)       (or cancelled, waiting or running)

The engine calls them in that order: `admit_limit` before the scheduler admits, `on_admit` with the
requests it just admitted (before the pass that first feeds them), `on_finish` after a finished or
cancelled request's decoder cells are freed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import NoForwardPass
from ..export import GraphInfo
from ..spec import KVSpec
from .binding import Binder
from .scheduler import Batch, Request

__all__ = ["Runner"]


class Runner(Protocol):
    """What the engine needs of a graph family (runners subclass it to inherit the no-op hooks).

    `forward` runs the pass the cache's current plan describes (``plan`` from the cache's `start_forward`
    over ``batch.seq_ids`` / ``batch.positions``), writes every layer's new keys and values with the
    cache's `put` (or keeps them and writes them later, before anything reads them from the pools: see
    `flush`), and returns ``logits [len(batch.logits_index), vocab]`` float32 (rows of the flat
    token indices ``batch.logits_index``) with the seconds spent inside ``session.run``. ``cache`` and
    ``plan`` are a `CausalCache` and its `ForwardPlan` for decoder-only runners, an `EncoderDecoderCache`
    and its `EncDecPlan` for encoder-decoder ones.
    """

    kind: str  # "native", "optimum" or "native-seq2seq"
    spec: KVSpec
    vocab_size: int
    kv_dtype: str  # the decoder cache's storage
    group_size: int
    tokens: dict[str, Any]  # bos / eos / pad (/ decoder_start) ids from the graph's metadata or folder
    binder: Binder
    info: GraphInfo | None  # kvarray's metadata of the (decoder) graph; None for Optimum exports
    # the last pass's new keys [T, H, D] per layer, as put into the cache (a list, or one [L, T, H, D] array)
    new_keys: list[np.ndarray] | np.ndarray
    # keep prompt chunks and decode tokens in passes of their own (`Scheduler`'s split_prefill): for a
    # runner whose decode passes read a cheaper graph than mixed passes do
    split_prefill: bool = False

    def forward(self, cache: Any, plan: Any, batch: Batch) -> tuple[np.ndarray, float]: ...

    def reads_pool(self, cache: Any, batch: Batch) -> bool:
        """Whether the pass of `batch` reads the pool view, whose length n_kv a defragmentation shortens:
        the engine lets the cache defragment (past its threshold) only before such a pass."""
        return True

    def flush(self, cache: Any) -> None:
        """Write into `cache` the rows of earlier passes the runner has kept back (`CausalCache.write_rows`),
        so that its pools hold every token of every live sequence (the engine's `flush`, for readers of
        the pools between steps). Runners that `put` in every pass keep nothing back."""
        return None

    def repeat_room(self, cache: Any) -> int:
        """How many more passes `decode_again` can run after the last one (a decode pass): 0 for runners
        without one, or when the last pass was not a decode pass they can repeat."""
        return 0

    def decode_again(self, tokens: np.ndarray) -> tuple[np.ndarray, float]:
        """Run the last pass again over the same sequences, each one position further, fed ``tokens [S]``
        (one per sequence, in the pass's order) without a plan: the cells of those positions are already
        the sequences' (the engine's decode bursts, `EngineConfig.decode_burst`). Returns ``logits
        [S, vocab]`` and the seconds inside ``session.run``, as `forward`. Only after `repeat_room` said
        there is room."""
        raise NoForwardPass(f"{type(self).__name__} repeats no pass: its repeat_room is 0")

    def close(self) -> None: ...

    # ---- lifecycle hooks (encoder-decoder runners) -------------------------------------------------
    def admit_limit(self, cache: Any, waiting: Sequence[Request]) -> int | None:
        """How many of the `waiting` requests (in order) the runner has room for (None: no limit)."""
        return None

    def on_admit(self, cache: Any, requests: list[Request]) -> None:
        """The scheduler just admitted `requests` (in order); none of them has been fed yet."""
        return None

    def on_finish(self, cache: Any, request: Request) -> None:
        """`request` finished or was cancelled (waiting or running); its decoder cells are already freed."""
        return None

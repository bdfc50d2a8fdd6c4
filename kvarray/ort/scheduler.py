"""Requests and the continuous-batching scheduler: admission, prefix sharing, batch composition.

The scheduler is bookkeeping only (no arrays of K/V, no session): it decides which requests run, which
tokens each contributes to the next forward pass, and which of them want logits. The engine
(`kvarray.ort.engine`) runs the pass and feeds the sampled tokens back with `Scheduler.commit`.

Admission is first come, first served, and never over-commits the cache: a request is admitted when the
cells it may still need (``need - cells held``, summed over the running requests plus the newcomer) fit
in the free cells, so a running request never meets `CacheFull`. ``need`` is
``min(prompt + max_new_tokens - 1, context)`` cells, or with a window at most
``sinks + window - 1 + prefill_chunk`` (a pass of n tokens keeps the ``sinks + window - 1`` cells its first
token sees plus its n; a decode pass writes in place once a sequence holds ``sinks + window``).

A request that fails (its pass or its sampler raised: see `EngineCore.step`) finishes with
`FinishReason.ERROR` and keeps the exception in `Request.error`; its event carries no token.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .sampling import SamplingParams

__all__ = ["Batch", "FinishReason", "Request", "RequestState", "Scheduler", "TokenEvent"]


class RequestState(str, enum.Enum):
    """Where a request is: waiting for admission, running (holds cells), or finished."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request finished."""

    STOP = "stop"  # a stop token was generated (and emitted)
    LENGTH = "length"  # max_new_tokens, or the model's context
    CANCELLED = "cancelled"
    ERROR = "error"  # its forward pass or its sampler failed; `Request.error` holds the exception


@dataclass(eq=False)
class Request:
    """One generation request.

    Attributes:
        id: the request id, also its sequence id in the cache.
        prompt: ``[P]`` int64 prompt token ids.
        params: its `SamplingParams`.
        output: the generated token ids so far (stop token included).
        computed: tokens of ``prompt + output`` already in the cache (the next token's position).
        shared: prompt tokens whose cells were shared from another request (not recomputed).
        need: cells the request may hold at most (see the module docstring).
        error: the exception that failed the request (`FinishReason.ERROR`), else None.
    """

    id: int
    prompt: np.ndarray
    params: SamplingParams
    need: int
    stop: frozenset[int]
    rng: np.random.Generator
    on_token: Callable[[TokenEvent], None] | None = None
    state: RequestState = RequestState.WAITING
    output: list[int] = field(default_factory=list)
    computed: int = 0
    shared: int = 0
    fed_at: int = 0  # the last committed pass that fed it (`Scheduler.next_batch`'s order when over budget)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None

    @property
    def prefilled(self) -> bool:
        """True once every prompt token is in the cache."""
        return self.computed >= len(self.prompt)

    @property
    def finished(self) -> bool:
        """True once the request finished (stopped, reached its length, was cancelled or failed)."""
        return self.state is RequestState.FINISHED

    def fed_tokens(self) -> np.ndarray:
        """``[computed]`` int64 the tokens in the cache, in position order."""
        if self.computed <= len(self.prompt):
            return self.prompt[: self.computed]
        extra = self.output[: self.computed - len(self.prompt)]
        return np.concatenate([self.prompt, np.asarray(extra, np.int64)])


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A token produced by a request; `finished` is set on its last one (`reason` says why).

    A request that fails gets one last event with ``token`` None, ``reason`` `FinishReason.ERROR` (the
    exception is ``request.error``).
    """

    request: Request
    token: int | None
    finished: bool
    reason: FinishReason | None = None


@dataclass(slots=True)
class Batch:
    """One forward pass, flat: ``tokens [T]``, ``seq_ids [T]``, ``positions [T]`` int64 (each request's
    tokens consecutive), ``logits_index [S]`` the rows whose logits are sampled for ``sampled [S]``."""

    tokens: np.ndarray
    seq_ids: np.ndarray
    positions: np.ndarray
    logits_index: np.ndarray
    sampled: list[Request]
    fed: list[tuple[Request, int]]  # (request, tokens it feeds this pass)
    prefill_tokens: int
    decode_tokens: int


class Scheduler:
    """Continuous batching over a cache of `capacity` cells and `max_sequences` sequences.

    Args:
        capacity, max_sequences: the cache's.
        prefill_chunk: prompt tokens one request feeds per pass at most.
        max_batch_tokens: tokens per pass at most (decode tokens first, then prefill chunks).
        prefix_sharing: share the cells of the longest common prefix a running request holds.
        split_prefill: never mix decode tokens and prompt chunks in one pass: while some requests decode
            and others prefill, a turn of prompt passes that feeds `max_batch_tokens` prompt tokens (or
            every prompt token left) comes before each decode pass. For runners whose decode passes read
            a cheaper graph than their prompt passes (the engine's "auto" view: a mixed pass runs on the
            pool-view graph, where each decode token scores every past cell of the window); False: each
            pass takes every decode token, then prompt chunks.
        prompt_pass_tokens: tokens a pass without decode tokens feeds at most (None: max_batch_tokens).
            A pool-view graph scores every token of a pass against every other one, so packing the
            prompts of several requests into one long pass wastes attention on pairs of tokens of
            different requests, which grows with the square of the pass (docs/engine.md, "Prompt
            passes").
    """

    def __init__(
        self,
        capacity: int,
        max_sequences: int,
        prefill_chunk: int,
        max_batch_tokens: int,
        prefix_sharing: bool,
        split_prefill: bool = False,
        prompt_pass_tokens: int | None = None,
    ) -> None:
        self.capacity = capacity
        self.max_sequences = max_sequences
        self.prefill_chunk = max(1, int(prefill_chunk))  # the engine refuses values < 1 (ConfigError)
        self.max_batch_tokens = max(1, int(max_batch_tokens))
        self.prefix_sharing = prefix_sharing
        self.split_prefill = split_prefill
        self.prompt_pass_tokens = (
            self.max_batch_tokens if prompt_pass_tokens is None else max(1, int(prompt_pass_tokens))
        )
        self._turn = 0  # split_prefill: prompt tokens fed since the last decode pass
        self._passes = 0  # passes committed
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def has_work(self) -> bool:
        """True while a request waits or runs."""
        return bool(self.waiting or self.running)

    def admit(
        self, free_cells: int, held: Callable[[int], int], limit: int | None = None
    ) -> list[tuple[Request, Request, int]]:
        """Move waiting requests to running while they fit; return the prefix shares to make
        ``(source, newcomer, length)`` (the engine calls the cache's `copy_prefix` for them).

        Args:
            free_cells: the cache's free cells now.
            held: sequence id -> cells it holds now.
            limit: admit at most this many (the runner's own room, e.g. encoder rows); None: no limit.
        """
        shares: list[tuple[Request, Request, int]] = []
        if not self.waiting:
            return shares
        growth = sum(r.need - held(r.id) for r in self.running)
        stop = len(self.running) + (len(self.waiting) if limit is None else limit)
        while self.waiting and len(self.running) < min(self.max_sequences, stop):
            req = self.waiting[0]
            source, length = self._longest_prefix(req) if self.prefix_sharing else (None, 0)
            if req.need - length > free_cells - growth:
                break
            self.waiting.popleft()
            growth += req.need - length
            req.state = RequestState.RUNNING
            if source is not None and length:
                shares.append((source, req, length))
                req.computed = req.shared = length
            self.running.append(req)
        return shares

    def _longest_prefix(self, req: Request) -> tuple[Request | None, int]:
        """The running request holding the longest prefix of ``req.prompt[:-1]`` (the last prompt token
        is always computed, for its logits), and that prefix's length."""
        best, best_len = None, 0
        want = req.prompt[:-1]
        for other in self.running:
            fed = other.fed_tokens()
            m = min(len(fed), len(want))
            if m <= best_len:
                continue
            diff = np.flatnonzero(fed[:m] != want[:m])
            length = int(diff[0]) if len(diff) else m
            if length > best_len:
                best, best_len = other, length
        return best, best_len

    def next_batch(self, only: list[Request] | None = None) -> Batch | None:
        """The next pass: one token of every decoding request, then prompt chunks while the budget lasts.

        Args:
            only: make the pass of these running requests alone (the engine's retries after a failed
                pass, `EngineCore.step`); None: every running request.
        """
        budget = self.max_batch_tokens
        running = self.running if only is None else [r for r in only if r.state is RequestState.RUNNING]
        decoding = [r for r in running if r.prefilled]
        prompting = [r for r in running if not r.prefilled]
        feed_prompts = bool(prompting)
        if self.split_prefill and decoding and prompting:  # a turn of prompt passes, then a decode pass
            feed_prompts = self._turn < self.max_batch_tokens
        if decoding and not feed_prompts and len(decoding) <= budget:
            self._turn = 0
            return self._decode_batch(decoding)  # the common step: one token per request
        if len(decoding) > budget:  # not every decode token fits: the longest-waiting ones first
            decoding.sort(key=lambda r: r.fed_at)
        parts: list[tuple[Request, np.ndarray]] = []
        for req in decoding if not (self.split_prefill and feed_prompts) else ():
            if budget > 0:
                parts.append((req, np.asarray(req.output[-1:], np.int64)))
                budget -= 1
        decode_tokens = len(parts)
        if not decode_tokens:
            budget = min(budget, self.prompt_pass_tokens)
        for req in prompting if feed_prompts else ():
            if budget > 0:
                n = min(self.prefill_chunk, len(req.prompt) - req.computed, budget)
                parts.append((req, req.prompt[req.computed : req.computed + n]))
                budget -= n
        if not parts:
            return None
        lengths = [len(tokens) for _, tokens in parts]
        tokens = np.concatenate([t for _, t in parts])
        self._turn = 0 if decode_tokens else self._turn + len(tokens)
        seq_ids = np.repeat(np.fromiter((r.id for r, _ in parts), np.int64, len(parts)), lengths)
        starts = np.fromiter((r.computed for r, _ in parts), np.int64, len(parts))
        offsets = np.arange(len(tokens), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.repeat(starts, lengths) + offsets
        ends = np.cumsum(lengths) - 1
        sampled, rows = [], []
        for k, (req, chunk) in enumerate(parts):
            if req.computed + len(chunk) >= len(req.prompt):  # decode, or the prompt's last chunk
                sampled.append(req)
                rows.append(ends[k])
        return Batch(
            tokens,
            seq_ids,
            positions,
            np.asarray(rows, np.int64),
            sampled,
            [(r, len(t)) for r, t in parts],
            len(tokens) - decode_tokens,
            decode_tokens,
        )

    def _decode_batch(self, running: list[Request]) -> Batch:
        count = len(running)
        tokens = np.fromiter((r.output[-1] for r in running), np.int64, count)
        seq_ids = np.fromiter((r.id for r in running), np.int64, count)
        positions = np.fromiter((r.computed for r in running), np.int64, count)
        rows = np.arange(count, dtype=np.int64)
        return Batch(tokens, seq_ids, positions, rows, list(running), [(r, 1) for r in running], 0, count)

    def commit(
        self, batch: Batch, tokens: list[int] | list[int | None], context: int | None
    ) -> list[TokenEvent]:
        """Advance the requests of `batch` by its tokens and the sampled `tokens` ``[S]``; return the
        events, finished requests last marked (the engine frees their cells).

        Requests of the batch that finished while it ran (cancelled, or failed: their token is None) are
        skipped: they get no event here and their cells are the engine's to free.

        Args:
            context: positions the model takes (None: unbounded, e.g. with a window).
        """
        self._passes += 1
        for req, n in batch.fed:
            if not req.finished:
                req.computed += n
                req.fed_at = self._passes
        events = []
        for req, token in zip(batch.sampled, tokens, strict=True):
            if req.finished or token is None:
                continue
            req.output.append(token)
            reason = None
            if token in req.stop:
                reason = FinishReason.STOP
            elif len(req.output) >= req.params.max_new_tokens:
                reason = FinishReason.LENGTH
            elif context is not None and req.computed >= context:
                reason = FinishReason.LENGTH
            if reason is not None:
                self.finish(req, reason)
            events.append(TokenEvent(req, token, reason is not None, reason))
        return events

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Mark `req` finished and drop it from the queues (its cells are the engine's to free)."""
        if req.state is RequestState.RUNNING:
            self.running.remove(req)
        elif req.state is RequestState.WAITING:
            self.waiting.remove(req)
        req.state = RequestState.FINISHED
        req.finish_reason = reason

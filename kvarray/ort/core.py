"""The request lifecycle every generation engine shares: `EngineCore` over a runner and its cache.

`EngineCore` validates requests (`check_tokens`), admits them (`Scheduler`), makes one forward pass per
`step` (schedule, `Runner.forward`, sample, commit; or a burst of decode passes, `decode_burst`), streams
token events, cancels, rolls back failed passes, and counts (`EngineMetrics`). It knows nothing of a
graph: the decoder-only `Engine` (`kvarray.ort.engine`) and the encoder-decoder `Seq2SeqEngine`
(`kvarray.ort.seq2seq`) build the runner and the cache, read their model folders and say what a request
is.

Details: docs/engine.md.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from ..causal import CausalCache
from ..encdec import EncDecPlan, EncoderDecoderCache
from ..errors import (
    CacheClosed,
    CacheFull,
    ConfigError,
    DTypeMismatch,
    EmptyPrompt,
    EngineBusy,
    ModelFileError,
    PromptTooLong,
    RequestFailed,
    ShapeMismatch,
    UnknownRequest,
    UnknownToken,
)
from ..export import GraphInfo, read_config
from ..ops.cpu import swap_thread_limit
from .binding import Binder
from .runner import Runner
from .sampling import SamplingParams, sample_each
from .scheduler import Batch, FinishReason, Request, RequestState, Scheduler, TokenEvent

__all__ = ["EngineCore", "EngineMetrics", "EngineOptions", "check_tokens", "read_context"]


@dataclass
class EngineMetrics:
    """Counters since the engine was made. Times in seconds; `run_seconds` is inside `session.run`."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    shared_tokens: int = 0
    step_seconds: float = 0.0
    run_seconds: float = 0.0
    peak_cells: int = 0
    peak_n_kv: int = 0

    @property
    def overhead_share(self) -> float:
        """Share of step time spent outside `session.run` (Python, binding, cache bookkeeping, sampling)."""
        return 0.0 if self.step_seconds == 0 else 1.0 - self.run_seconds / self.step_seconds


class EngineOptions(Protocol):
    """What `EngineCore` reads of an engine's config (`EngineConfig`, `Seq2SeqConfig`)."""

    @property
    def capacity(self) -> int: ...  # decoder self-attention cells
    @property
    def max_sequences(self) -> int: ...
    @property
    def prefill_chunk(self) -> int: ...
    @property
    def max_batch_tokens(self) -> int: ...
    @property
    def kernel_threads(self) -> int: ...
    @property
    def prompt_pass_tokens(self) -> int: ...


#: the cache a runner works on: decoder-only (`CausalCache`) or encoder-decoder (`EncoderDecoderCache`)
C = TypeVar("C", CausalCache, EncoderDecoderCache)


class EngineCore(Generic[C]):
    """The request lifecycle over a runner and its cache: validation, admission, one step per forward pass
    (schedule, run, sample, commit; or a decode burst, `_burst`), streaming, cancel and metrics.
    `Engine` (decoder-only graphs) and `Seq2SeqEngine` (T5, Whisper) build the runner and the cache and
    say what a request is.

    Threads: one thread steps (`step`, `stream`, `generate`); any thread may `add_request` (the
    subclasses' entry point to `_queue`), `cancel`, `request` and `pop` at any time. A lock guards the
    request table and the queues; `step` holds it only for bookkeeping (admission, composing the pass,
    commit), not while the graph runs. A request cancelled while its pass runs gets no more events and
    its cells are freed when that pass ends. `step` entered by a second thread raises `EngineBusy`. The
    cache is touched by one thread at a time: the stepping thread during a step, otherwise a thread
    holding the lock.

    Faults (docs/reliability.md): a pass whose plan, run or `put` raises is rolled back (each sequence's
    tokens of the pass leave the cache: ``remove(seq, first position of the pass)``) and its requests are
    retried within the same `step`, in halves, down to one request a pass; a request whose pass fails
    alone finishes with `FinishReason.ERROR`, the exception in `Request.error`, its cells freed; the
    others go on as if nothing happened. Under a window the failed pass may have evicted cells for good
    (ring writes), but only cells out of sight of the pass's first token, hence of every later one: the
    engine checks that each sequence still holds every position its next token sees and retries it; one
    that does not is failed. A sampler that raises, or a logits row with NaN / +inf (`NonFiniteLogits`),
    fails that row's request alone. An `on_token` callback that raises fails its own request. An error
    while rolling back propagates from `step` (the cache is then suspect).

    Args:
        runner: the model-specific part (`Runner`); its lifecycle hooks are called at admission and finish.
        cache: what `runner.forward` reads and writes; its decoder self-attention `CausalCache` (the
            cache itself, or ``cache.causal``) is what admission counts and finished requests free.
        options: capacity, max_sequences, prefill_chunk, max_batch_tokens, prompt_pass_tokens,
            kernel_threads (`EngineOptions`).
        prefix_sharing: share a running request's cells of a common prompt prefix (off with a window).
        context: the model's context (max decoder positions); None: unbounded.
        eos_token_id: default stop token (None: the runner's eos, if any).
        tokenizer: optional (`Engine.generate_text`, `cli_transcribe`).
        metrics: the counters to update (`EngineMetrics`, or a subclass the runner also updates).
        decode_burst: passes one `step` may make (`EngineConfig.decode_burst`; `_burst`); 1: one pass.

    Attributes (besides `metrics`): passes_failed (forward passes that raised, retries included),
    requests_failed (requests finished with `FinishReason.ERROR`).

    Raises `ConfigError` for options that are not ints >= 1 (kernel_threads: >= 0), decode_burst included.
    """

    def __init__(
        self,
        runner: Runner,
        cache: C,
        options: EngineOptions,
        *,
        prefix_sharing: bool,
        context: int | None,
        eos_token_id: int | None,
        tokenizer: Any,
        metrics: EngineMetrics,
        decode_burst: int = 1,
    ) -> None:
        self._check_options(options, decode_burst)
        self._decode_burst = int(decode_burst)
        self.runner = runner
        self.cache: C = cache
        self._cells: CausalCache = cache if isinstance(cache, CausalCache) else cache.causal
        self.info: GraphInfo | None = runner.info
        self.spec = runner.spec
        self.vocab_size = runner.vocab_size
        self.context = context
        self.tokenizer = tokenizer
        eos = runner.tokens.get("eos_token_id") if eos_token_id is None else eos_token_id
        self.eos: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        capacity, window = options.capacity, self._cells.window
        chunk = options.prefill_chunk if window is None else min(options.prefill_chunk, window)
        sharing = prefix_sharing and window is None
        self.scheduler = Scheduler(
            capacity, options.max_sequences, chunk, options.max_batch_tokens, sharing, runner.split_prefill,
            options.prompt_pass_tokens,
        )
        self._capacity = capacity
        self._window, self._sinks = window, self._cells.sinks
        self._kernel_threads = options.kernel_threads
        # positions a request may reach: the model's context and, without a window, the cache
        self._limit = None if window is not None else min(context or capacity, capacity)
        self.requests: dict[int, Request] = {}
        self.metrics = metrics
        self.passes_failed = 0
        self.requests_failed = 0
        self._next_id = 0
        self._lock = threading.RLock()  # the request table, the queues, the pass flag
        self._stepping = threading.RLock()  # one stepping thread (re-entered by its own callbacks)
        self._in_pass = False  # a step is using the cache: cancels defer their frees to its end
        self._deferred: list[Request] = []
        self._closed = False

    @staticmethod
    def _check_options(options: EngineOptions, decode_burst: int) -> None:
        values = {
            name: getattr(options, name)
            for name in (
                "capacity", "max_sequences", "prefill_chunk", "max_batch_tokens", "prompt_pass_tokens",
                "kernel_threads",
            )
        }  # fmt: skip
        values["decode_burst"] = decode_burst
        for name, value in values.items():
            least = 0 if name == "kernel_threads" else 1
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")

    @property
    def binder(self) -> Binder:
        """The runner's IO binding (what each graph name is bound to)."""
        return self.runner.binder

    @property
    def _new_keys(self) -> list[np.ndarray] | np.ndarray:
        """The last pass's new keys ``[T, H, D]`` per layer, as put into the cache."""
        return self.runner.new_keys

    # ---- requests ----------------------------------------------------------------------------------
    def _queue(
        self,
        prompt: Sequence[int] | np.ndarray,
        params: SamplingParams | None,
        on_token: Callable[[TokenEvent], None] | None,
        what: str = "prompt",
        keep: Callable[[int], None] | None = None,
    ) -> Request:
        """Validate a request's decoder prompt ``[P]`` (named `what` in errors) and queue it.

        `keep(request_id)` is called under the lock before the request can be admitted (a runner's
        per-request state, e.g. `Seq2SeqRunner.keep_source`, must exist by then in a threaded engine).

        Raises `EmptyPrompt`, `ShapeMismatch` / `DTypeMismatch` / `UnknownToken` (`check_tokens`, also
        for ``params.stop_tokens``), `PromptTooLong` (longer than the model's context or the cache),
        `ConfigError` (params not a `SamplingParams`, on_token not callable), `CacheClosed`; nothing is
        queued then. Thread-safe.
        """
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be a SamplingParams, got {type(params).__name__}")
        if on_token is not None and not callable(on_token):
            raise ConfigError(f"on_token must be callable or None, got {type(on_token).__name__}")
        ids = check_tokens(prompt, self.vocab_size, "token" if what == "prompt" else what)
        if ids.size == 0:
            raise EmptyPrompt(f"a request needs at least one {what} token")
        if self.context is not None and ids.size > self.context:
            raise PromptTooLong(int(ids.size), self.context, "model context")
        window = self._window
        if window is None and ids.size > self._capacity:
            raise PromptTooLong(int(ids.size), self._capacity, "cache")
        if params.stop_tokens is None:
            stop = self.eos
        else:
            stop = frozenset(check_tokens(list(params.stop_tokens), self.vocab_size, "stop token").tolist())
        need = ids.size + params.max_new_tokens - 1
        if window is None:
            need = min(need, self._limit or need)
        else:  # a pass of n tokens keeps what its first token sees: sinks + window - 1 cells, plus the n
            need = min(need, self._sinks + window - 1 + self.scheduler.prefill_chunk)
        rng = np.random.default_rng(params.seed)
        with self._lock:
            self._check_open()
            req = Request(self._next_id, ids, params, need, stop, rng, on_token)
            if keep is not None:
                keep(req.id)
            self._next_id += 1
            self.requests[req.id] = req
            self.scheduler.waiting.append(req)
        return req

    def cancel(self, request_id: int) -> None:
        """Stop a waiting or running request now and free what it holds (others are unaffected).

        Called while another thread's pass runs the request, its cells are freed when that pass ends (it
        gets no more events either way). Raises `UnknownRequest` for an id never added or already
        finished. Thread-safe.
        """
        with self._lock:
            req = self._get(request_id)
            if req is None or req.finished:
                raise UnknownRequest(f"request {request_id!r} is not waiting or running")
            self._finish_now(req, FinishReason.CANCELLED)

    def request(self, request_id: int) -> Request:
        """The `Request` with this id (kept after it finished, until `pop`). Thread-safe."""
        with self._lock:
            req = self._get(request_id)
        if req is None:
            raise UnknownRequest(f"no request {request_id!r}")
        return req

    def pop(self, request_id: int) -> Request:
        """Forget a finished request and return it. Thread-safe."""
        with self._lock:
            req = self.request(request_id)
            if not req.finished:
                raise UnknownRequest(f"request {request_id!r} has not finished")
            return self.requests.pop(req.id)

    @property
    def has_work(self) -> bool:
        """True while a request waits or runs."""
        with self._lock:
            return self.scheduler.has_work

    # ---- running -----------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One forward pass over the running requests (admitting waiting ones first); its token events.

        A pass that fails is rolled back and retried in smaller groups within this call (class
        docstring), so the events may come from several passes; a failed request's last event has no
        token (`FinishReason.ERROR`). Raises `EngineBusy` while another thread is inside `step`,
        `CacheClosed` after `close`.
        """
        if not self._stepping.acquire(blocking=False):
            raise EngineBusy("another thread is stepping this engine: step it from one thread at a time")
        try:
            self._check_open()
            start = time.perf_counter()
            outer = swap_thread_limit(self._kernel_threads)
            try:
                events = self._step()
            finally:
                swap_thread_limit(outer)
            self.metrics.step_seconds += time.perf_counter() - start
            return self._deliver(events)
        finally:
            self._stepping.release()

    def _step(self) -> list[TokenEvent]:
        sched = self.scheduler
        with self._lock:
            self._in_pass = True
        try:
            events = self._admit() if sched.waiting else []
            with self._lock:
                batch = sched.next_batch()
            if batch is not None:
                failed = self.passes_failed
                events += self._run(batch)
                if self._decode_burst > 1 and self.passes_failed == failed:  # not after a retried pass
                    events += self._burst(batch, events)
            if not sched.has_work or any(e.finished for e in events):
                self._note_peak()  # cells in use only fall when requests leave: measure just before
            for event in events:
                if event.finished and event.reason is not FinishReason.ERROR:
                    self._free(event.request)  # failed ones were freed when they failed
        finally:
            with self._lock:
                self._in_pass = False
                deferred, self._deferred = self._deferred, []
                if deferred:
                    self._note_peak()
                for req in deferred:
                    self._free(req)
        return events

    def _admit(self) -> list[TokenEvent]:
        """Admit the waiting requests that fit (the runner's room, then the scheduler's rule on decoder
        cells), share their prompt prefixes, and hand the admitted ones to the runner; the events of
        those whose admission failed."""
        sched, cells = self.scheduler, self._cells
        with self._lock:
            limit = self.runner.admit_limit(self.cache, sched.waiting)
            before = len(sched.running)
            shares = sched.admit(cells.stats().cells_free, cells.length, limit)
            admitted = sched.running[before:]
        for src, dst, length in shares:
            try:
                cells.copy_prefix(src.id, dst.id, length)
                self.metrics.shared_tokens += length
            except Exception:  # noqa: BLE001 - the cache is unchanged: compute the prefix instead
                dst.computed = dst.shared = 0
        if not admitted:
            return []
        try:
            self.runner.on_admit(self.cache, admitted)
        except Exception as exc:  # noqa: BLE001 - fail the requests handed to the runner, not the engine
            return [e for e in (self._fail(r, exc) for r in admitted) if e is not None]
        return []

    def _run(self, batch: Batch) -> list[TokenEvent]:
        """Make the pass of `batch`; when it raises, roll it back and retry its requests in halves."""
        # cells each request holds before the pass: its computed tokens, but fewer under a window
        held = {req.id: req.computed for req, _ in batch.fed}
        if self._window is not None:
            held = dict(zip(held, self._cells.lengths(list(held)).tolist(), strict=True))
        try:
            return self._pass(batch)
        except Exception as exc:  # noqa: BLE001 - isolated below: the culprits fail, the others retry
            self.passes_failed += 1
            failure = exc
        events: list[TokenEvent] = []
        kept = []
        for req, _ in batch.fed:
            if req.finished:  # cancelled while the pass ran: freed when the step ends
                continue
            if self._roll_back(req, held[req.id]):
                kept.append(req)
            else:
                events += [e for e in [self._fail(req, failure)] if e is not None]
        if len(batch.fed) == 1:
            return events + [e for e in (self._fail(r, failure) for r in kept) if e is not None]
        half = (len(kept) + 1) // 2
        for group in (kept[:half], kept[half:]):
            with self._lock:
                retry = self.scheduler.next_batch(only=group) if group else None
            if retry is not None:
                events += self._run(retry)
        return events

    def _burst(self, batch: Batch, events: list[TokenEvent]) -> list[TokenEvent]:
        """More decode passes of `batch`'s requests right after its pass, up to ``decode_burst - 1``, run
        by `Runner.decode_again` without scheduling or planning each: their events.

        Only after a decode pass of every running request in which none finished, while none waits. The
        cells of the burst's positions are taken at once (one `start_forward`); each pass samples and
        commits as a step would. The burst stops after a pass in which a request finished (stop token,
        length, a failed row), or when a request arrives or is cancelled meanwhile; a pass that raises
        ends it uncommitted (counted in `passes_failed`: the next step runs it again as a plain pass).
        The cells no pass used are then given back.
        """
        sched, cells, reqs = self.scheduler, self._cells, batch.sampled
        every_one = len(reqs) == len(batch.fed) == len(sched.running) == len(events)
        if not every_one or batch.prefill_tokens or sched.waiting or any(e.finished for e in events):
            return []
        room = [self._decode_burst - 1, self.runner.repeat_room(self.cache)]
        room += [cells.stats().cells_free // len(reqs)]
        room += [r.params.max_new_tokens - len(r.output) for r in reqs]
        if self._limit is not None:
            room += [self._limit - r.computed for r in reqs]
        count = min(room)
        if count < 1:
            return []
        first = np.fromiter((r.computed for r in reqs), np.int64, len(reqs))
        ids = np.fromiter((r.id for r in reqs), np.int64, len(reqs))
        try:
            cells.start_forward(np.repeat(ids, count), (first[:, None] + np.arange(count)).ravel(), False)
        except CacheFull:  # counted above; should the cache refuse all the same, no burst (nothing taken)
            return []
        tokens = np.fromiter((r.output[-1] for r in reqs), np.int64, len(reqs))
        out: list[TokenEvent] = []
        try:
            for _ in range(count):
                if sched.waiting:
                    break
                logits, run_time = self.runner.decode_again(tokens)
                new = self._commit(batch, logits, run_time)
                out += new
                if len(new) < len(reqs) or any(e.finished for e in new):
                    break  # a request finished, failed or was cancelled during the pass
                tokens = np.array([e.token for e in new], np.int64)  # one per request, in the pass's order
        except Exception:  # noqa: BLE001 - that pass did not happen: the next step makes it plainly
            self.passes_failed += 1
        finally:
            for req in reqs:  # give back the cells of the positions no pass fed
                if not req.finished and cells.length(req.id) > req.computed:
                    cells.remove(req.id, req.computed)
        return out

    def _roll_back(self, req: Request, held: int) -> bool:
        """Remove `req`'s tokens of a failed pass (positions >= ``req.computed``) from the cache; whether
        it can be retried exactly: it holds the `held` cells it held before the pass, or (a window) every
        position its next token sees, the pass having evicted only cells out of that token's sight (at
        or before ``computed - window``: no later token of the sequence sees them either)."""
        cells = self._cells
        if cells.length(req.id):
            cells.remove(req.id, req.computed)
        if cells.length(req.id) == held:
            return True
        window = cells.window
        if window is None or not cells.length(req.id):
            return False
        positions = cells.cell_table(req.id)[1].tolist()
        sight = range(max(positions[0], req.computed - window + 1), req.computed)
        return set(sight) <= set(positions)

    def _pass(self, batch: Batch) -> list[TokenEvent]:
        """One forward pass of `batch`: plan, run (`put` included), sample, commit. Raises, with nothing
        committed, when the plan, the run or the logits' shape fails; a row whose sampling fails fails
        its request alone."""
        # compaction shortens the pool view only: the cache may defragment before a pass that reads it
        pool = self.runner.reads_pool(self.cache, batch)
        plan = self.cache.start_forward(batch.seq_ids, batch.positions, pool)
        logits, run_time = self.runner.forward(self.cache, plan, batch)
        rows = len(batch.sampled)
        if logits.ndim != 2 or logits.shape[0] < rows:
            raise ShapeMismatch(f"the runner returned logits {list(logits.shape)} for {rows} sampled rows")
        events = self._commit(batch, logits, run_time)
        m = self.metrics
        m.peak_n_kv = max(m.peak_n_kv, (plan.self_plan if isinstance(plan, EncDecPlan) else plan).n_kv)
        return events

    def _commit(self, batch: Batch, logits: np.ndarray, run_time: float) -> list[TokenEvent]:
        """Sample a token for each of ``batch.sampled`` from ``logits [>= S, vocab]``, fail the requests
        whose row raised, commit the others' tokens (`Scheduler.commit`) and count the pass; the events."""
        sampled = batch.sampled
        tokens = sample_each(logits[: len(sampled)], [r.params for r in sampled], [r.rng for r in sampled])
        events: list[TokenEvent] = []
        for req, token in zip(sampled, tokens, strict=True):
            if isinstance(token, Exception):
                events += [e for e in [self._fail(req, token)] if e is not None]
        with self._lock:
            kept = [None if isinstance(t, Exception) else int(t) for t in tokens]
            events += self.scheduler.commit(batch, kept, self._limit)
        m = self.metrics
        m.steps += 1
        m.prefill_tokens += batch.prefill_tokens
        m.decode_tokens += batch.decode_tokens
        m.generated_tokens += sum(e.token is not None for e in events)
        m.run_seconds += run_time
        return events

    def _deliver(self, events: list[TokenEvent]) -> list[TokenEvent]:
        """Call each event's `on_token`; a callback that raises fails its request (its error event is
        added to the events returned) or, on the request's last event, is kept in ``request.error``."""
        extra = []
        for event in events:
            callback = event.request.on_token
            if callback is None:
                continue
            try:
                callback(event)
            except Exception as exc:  # noqa: BLE001 - the request's own failure
                req = event.request
                with self._lock:
                    if req.finished:
                        req.error = req.error or exc
                        continue
                    req.error = exc
                    self.requests_failed += 1
                    self._finish_now(req, FinishReason.ERROR)
                extra.append(TokenEvent(req, None, True, FinishReason.ERROR))
        return events + extra

    def stream(self) -> Iterator[TokenEvent]:
        """Step until no request waits or runs, yielding every token event (requests may be added or
        cancelled between events, from any thread)."""
        while self.has_work:
            yield from self.step()

    def _run_all(self, ids: list[int]) -> list[list[int]]:
        """Step until no request waits or runs; the new tokens of requests `ids`, in order (popped).

        Raises `RequestFailed` (the first failed request's exception as its cause) when one of them
        finished with `FinishReason.ERROR`, after every request has finished.
        """
        for _ in self.stream():
            pass
        done = [self.pop(i) for i in ids]
        outputs = [r.output for r in done]
        for req in done:
            if req.finish_reason is FinishReason.ERROR:
                error = req.error
                raise RequestFailed(
                    f"request {req.id} failed: {type(error).__name__}: {error}", req.id, outputs
                ) from error
        return outputs

    def flush(self) -> None:
        """Write into the cache every row the runner still holds back (waits for a step in progress).

        The decode view's runner keeps a decode pass's new keys and values in its mirror and writes them
        into the cache's pools later, before any pass that reads the pools (docs/engine.md, "Deferred
        writes"), so between steps the pools may lack the newest tokens of running requests: call this
        before reading them (`cache.get`, `state_dict`, `save`). The cell bookkeeping is always current.
        """
        with self._stepping, self._lock:
            self._check_open()
            self.runner.flush(self.cache)

    def close(self) -> None:
        """Release the cache's pools and the bindings (waits for a step in progress); later calls of
        `add_request` or `step` raise `CacheClosed`. Idempotent."""
        with self._stepping, self._lock:
            if self._closed:
                return
            self._closed = True
            self.runner.close()
            self.cache.close()

    # ---- internals ---------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosed("this engine was closed")

    def _get(self, request_id: Any) -> Request | None:
        try:
            return self.requests.get(request_id)
        except TypeError:  # an unhashable id
            return None

    def _finish_now(self, req: Request, reason: FinishReason) -> None:
        """Finish `req` (under the lock) and free it now, or when the pass in progress ends."""
        running = req.state is RequestState.RUNNING
        self.scheduler.finish(req, reason)
        if self._in_pass:  # only other threads get here during a pass: its cache work is not done yet
            self._deferred.append(req)
            return
        if running:
            self._note_peak()
        self._free(req)

    def _fail(self, req: Request, error: BaseException) -> TokenEvent | None:
        """Finish `req` with `FinishReason.ERROR` keeping `error`, and free its cells; its last event (no
        token), or None when it had already finished (a cancel while its pass ran)."""
        with self._lock:
            if req.finished:
                return None
            req.error = error
            self.requests_failed += 1
            self.scheduler.finish(req, FinishReason.ERROR)
        self._note_peak()
        self._free(req)
        return TokenEvent(req, None, True, FinishReason.ERROR)

    def _note_peak(self) -> None:
        self.metrics.peak_cells = max(self.metrics.peak_cells, self._cells.stats().cells_used)

    def _free(self, req: Request) -> None:
        """Free a finished or cancelled request's decoder cells, then let the runner free its own part."""
        if self._cells.length(req.id):
            self._cells.remove(req.id)
        self.runner.on_finish(self.cache, req)


def read_context(config_json: Any, key: str) -> int | None:
    """The model's context, `key` of a config.json (``max_position_embeddings``, Whisper's
    ``max_target_positions``), or None when the file has none. Raises `ModelFileError` (a file that is
    not a JSON object, or a context that is not a positive integer), `MissingModelFile`."""
    value = read_config(config_json).get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelFileError(f"{config_json}: {key} must be a positive integer, got {value!r}")
    return value


def check_tokens(ids: Any, vocab_size: int, what: str) -> np.ndarray:
    """``ids`` as ``[N]`` int64 token ids, each checked to be in ``[0, vocab_size)`` (`what` names them).

    Args:
        ids: ``[N]`` integers: a sequence of ints or a 1-D array of any integer dtype. An empty one gives
            an empty array (the caller decides whether that is allowed).

    Raises `ShapeMismatch` (not one flat sequence: a scalar, nested or ragged lists, a 2-D array),
    `DTypeMismatch` (not integers: floats, even integral ones, bools, text, bytes, None),
    `UnknownToken` (ids outside the vocabulary, listed; huge ones beyond int64 included).
    """
    if isinstance(ids, (str, bytes, bytearray)):
        raise DTypeMismatch(
            f"{what} ids must be integers, got {type(ids).__name__} (encode text with the model's tokenizer)"
        )
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise ShapeMismatch(f"{what} ids must be one flat sequence [N] of integers: {exc}") from None
    if arr.ndim != 1:
        raise ShapeMismatch(f"{what} ids must be one flat sequence [N], got shape {list(arr.shape)}")
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.dtype == object:  # Python ints beyond int64, or something else mixed in
        values = arr.tolist()
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            kinds = sorted({type(v).__name__ for v in values})
            raise DTypeMismatch(f"{what} ids must be integers, got {', '.join(kinds)}")
        bad_list = [int(v) for v in values if not 0 <= v < vocab_size]
        if bad_list:
            raise UnknownToken(f"{what} ids {bad_list[:8]} are outside the vocabulary [0, {vocab_size})")
        return np.asarray(values, np.int64)
    if arr.dtype.kind not in "iu":
        raise DTypeMismatch(f"{what} ids must be integers, got dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= vocab_size)]  # compared in the array's own dtype: no wrap-around
    if bad.size:
        raise UnknownToken(f"{what} ids {bad[:8].tolist()} are outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int64, copy=False)

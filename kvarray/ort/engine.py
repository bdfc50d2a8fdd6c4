"""The generation engine: a decoder graph, a `CausalCache` and a continuous-batching scheduler.

    from kvarray.ort import Engine, EngineConfig, SamplingParams
    engine = Engine.from_model_dir("models/tiny-llama", EngineConfig(max_sequences=16))
    for event in engine.stream_text(["The with statement"], SamplingParams(max_new_tokens=32)):
        print(event.text, end="")

Each `step` is one forward pass over a flat batch (decode tokens of every running request plus prompt
chunks): the scheduler picks the tokens, `CausalCache.start_forward` assigns cells, a *runner* runs the
graph and `put`s the new rows, and the sampled tokens go back to the scheduler. The runner is the only
model-specific part (`kvarray.ort.runner.Runner`), chosen from the graph's names
(`names.match_convention`):

- `NativeRunner` (`kvarray.ort.native`): kvarray's native pool-view graph; the pool view ``keys[:n_kv]``
  of every layer and the plan's ``bias_before_put [T, n_kv + T]`` are bound zero-copy, the session writes
  ``new_key`` / ``new_value`` ``[T, H, D]`` and ``logits [S, vocab]`` into preallocated buffers.
- `OptimumRunner` (`kvarray.ort.optimum`): an Optimum decoder-only export; the batch's past is read from
  the cache's gathered view into ``past_key_values.{i}.*`` and the new rows of ``present.{i}.*`` are put
  back.

The request lifecycle (validation, admission, the step loop, sampling, streaming, cancel, metrics) is
`EngineCore`, shared with the encoder-decoder `Seq2SeqEngine` (`kvarray.ort.seq2seq`), whose runner also
encodes the requests it admits and frees their cross entries (the runner's lifecycle hooks).

Details: docs/engine.md.
"""

from __future__ import annotations

import enum
import json
import numbers
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numba
import numpy as np
import onnxruntime as ort

from ..causal import CacheStats, CausalCache
from ..encdec import EncDecPlan, EncoderDecoderCache
from ..errors import (
    CacheClosed,
    ConfigError,
    DTypeMismatch,
    EmptyPrompt,
    EngineBusy,
    PromptTooLong,
    RequestFailed,
    ShapeMismatch,
    UnknownRequest,
    UnknownToken,
    UnsupportedModel,
)
from ..export import GraphInfo, MissingModelFile, ModelFileError, read_metadata
from ..spec import KVSpec
from .binding import Binder
from .names import match_convention
from .native import NativeRunner, ViewSwitch
from .optimum import OptimumRunner, read_tokens
from .runner import Runner
from .sampling import SamplingParams, sample_each
from .scheduler import Batch, FinishReason, Request, RequestState, Scheduler, TokenEvent
from .tokenizer import load_tokenizer

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineMetrics",
    "GraphKind",
    "KVDtype",
    "NativeRunner",
    "Runner",
    "ViewChoice",
    "check_tokens",
    "open_session",
]


class KVDtype(str, enum.Enum):
    """Storage of the cache (and which native graph a model folder's engine loads)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"


class GraphKind(str, enum.Enum):
    """Which graph of a model folder `Engine.from_model_dir` loads."""

    AUTO = "auto"  # native/ when it has the kv_dtype's graph, else optimum/
    NATIVE = "native"  # native/decoder_step.pool.{kv_dtype}.onnx
    OPTIMUM = "optimum"  # optimum/model.onnx (the cache stores kv_dtype; the runner gathers float32)


class ViewChoice(str, enum.Enum):
    """Which view of the cache a native graph reads (DESIGN.md, "view"; docs/engine.md, "Views")."""

    POOL = "pool"  # decoder_step.pool.{kv_dtype}.onnx for every pass: zero-copy, O(T * n_kv) attention
    GATHERED = "gathered"  # decoder_step.gathered.*.onnx for every pass: a copy, O(T * L) attention
    AUTO = "auto"  # the pool graph and a twin (decode- or gathered-view graph), picked per pass
    # (`kvarray.ort.native.pick_view`); the pool graph alone when the folder has no twin


@dataclass(frozen=True)
class EngineConfig:
    """Options of an `Engine`.

    Attributes:
        capacity: cache cells (tokens held at once over all requests, shared cells once).
        max_sequences: requests running at once.
        prefill_chunk: prompt tokens one request feeds per pass at most.
        max_batch_tokens: tokens per pass at most.
        kv_dtype: float32, float16 or int8 storage. A native graph takes its own storage dtype
            (`Engine.from_model_dir` loads the matching graph); under an Optimum graph the cache stores
            kv_dtype and the gathered view converts it to the graph's dtype.
        window, sinks: sliding window and attention sinks of the cache (None: no window).
        prefix_sharing: share the cells of a common prompt prefix with a running request (off with a window).
        threads: ONNX Runtime intra-op threads (0: its default).
        kernel_threads: Numba threads of the cache's kernels during a step (`put`, defragmentation); 1 by
            default: a step's writes are small, and waking parallel workers costs more than the copy
            (measured: 16 rows of a 4-layer model, 0.1 ms with 1 thread, 4-20 ms with 2 on a busy machine).
            0: leave Numba's setting alone.
        defrag_threshold: the cache's (None: never defragment).
        view: `ViewChoice` of a native graph: "pool", "gathered" or "auto" (`Engine.from_model_dir` loads
            the graphs it needs; ignored for Optimum graphs, which always read the gathered view).
        gathered_min_sequences: with "auto", passes of one token per sequence and at least this many
            sequences run on the twin graph, the others on the pool graph (None: the twin's measured
            crossover, `kvarray.ort.native.TWIN_MIN_SEQUENCES`: 1 for the decode view, 8 for the gathered
            view; docs/engine_benchmarks.md).
    """

    capacity: int = 4096
    max_sequences: int = 16
    prefill_chunk: int = 256
    max_batch_tokens: int = 512
    kv_dtype: KVDtype = KVDtype.FLOAT32
    window: int | None = None
    sinks: int = 0
    prefix_sharing: bool = True
    threads: int = 0
    kernel_threads: int = 1
    defrag_threshold: float | None = 0.1
    view: ViewChoice = ViewChoice.AUTO
    gathered_min_sequences: int | None = None


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


#: the cache a runner works on: decoder-only (`CausalCache`) or encoder-decoder (`EncoderDecoderCache`)
C = TypeVar("C", CausalCache, EncoderDecoderCache)


class EngineCore(Generic[C]):
    """The request lifecycle over a runner and its cache: validation, admission, one step per forward pass
    (schedule, run, sample, commit), streaming, cancel and metrics. `Engine` (decoder-only graphs) and
    `Seq2SeqEngine` (T5, Whisper) build the runner and the cache and say what a request is.

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
        options: capacity, max_sequences, prefill_chunk, max_batch_tokens, kernel_threads (`EngineOptions`).
        prefix_sharing: share a running request's cells of a common prompt prefix (off with a window).
        context: the model's context (max decoder positions); None: unbounded.
        eos_token_id: default stop token (None: the runner's eos, if any).
        tokenizer: optional (`Engine.generate_text`, `cli_transcribe`).
        metrics: the counters to update (`EngineMetrics`, or a subclass the runner also updates).

    Attributes (besides `metrics`): passes_failed (forward passes that raised, retries included),
    requests_failed (requests finished with `FinishReason.ERROR`).

    Raises `ConfigError` for options that are not ints >= 1 (kernel_threads: >= 0).
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
    ) -> None:
        self._check_options(options)
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
        self.scheduler = Scheduler(capacity, options.max_sequences, chunk, options.max_batch_tokens, sharing)
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
    def _check_options(options: EngineOptions) -> None:
        for name in ("capacity", "max_sequences", "prefill_chunk", "max_batch_tokens", "kernel_threads"):
            value = getattr(options, name)
            least = 0 if name == "kernel_threads" else 1
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")

    @property
    def binder(self) -> Binder:
        """The runner's IO binding (what each graph name is bound to)."""
        return self.runner.binder

    @property
    def _new_keys(self) -> list[np.ndarray]:
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
            outer = numba.get_num_threads()
            inner = min(self._kernel_threads, outer) if self._kernel_threads else outer
            if inner != outer:
                numba.set_num_threads(inner)
            try:
                events = self._step()
            finally:
                if inner != outer:
                    numba.set_num_threads(outer)
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
                events += self._run(batch)
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
        held = {req.id: self._cells.length(req.id) for req, _ in batch.fed}
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
        plan = self.cache.start_forward(batch.seq_ids, batch.positions)
        logits, run_time = self.runner.forward(self.cache, plan, batch)
        rows = len(batch.sampled)
        if logits.ndim != 2 or logits.shape[0] < rows:
            raise ShapeMismatch(f"the runner returned logits {list(logits.shape)} for {rows} sampled rows")
        params, rngs = [r.params for r in batch.sampled], [r.rng for r in batch.sampled]
        tokens = sample_each(logits[:rows], params, rngs)
        events: list[TokenEvent] = []
        for req, token in zip(batch.sampled, tokens, strict=True):
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
        m.peak_n_kv = max(m.peak_n_kv, (plan.self_plan if isinstance(plan, EncDecPlan) else plan).n_kv)
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


class Engine(EngineCore[CausalCache]):
    """Generation over a decoder graph (Llama: kvarray's native graphs, or an Optimum export) with a
    `CausalCache`; the runner is chosen from the graph's names.

    Args:
        graph: a native ``decoder_step.{pool,gathered}.{float32,float16,int8}.onnx`` exported by kvarray,
            or an Optimum decoder-only ``model.onnx`` (its folder's config.json / generation_config.json
            give the eos).
        config: `EngineConfig`; its `view` must agree with the graphs (a pool-view `graph` for "pool", a
            gathered-view one for "gathered"; "auto" takes either, and `twin_graph` with a pool one).
            A gathered-view float32 graph reads a float32 or int8 cache (``config.kv_dtype``).
        twin_graph: for "auto", a twin of a native pool-view `graph` (same model): its decode-view graph
            (``decoder_step.decode.float32.onnx``, exported with ``--view decode``) or its gathered-view
            graph. Both sessions are opened (twice the weights in memory) and each pass runs on the graph
            `kvarray.ort.native.pick_view` chooses.
        context: the model's context (max positions); None: unbounded.
        spec: the cache spec (None: the graph's own); a spec the graph does not match raises `GraphMismatch`.
        eos_token_id: default stop token (None: the graph's eos, if any).
        tokenizer: optional, for `stream_text` / `generate_text`.
        providers: ONNX Runtime execution providers (default CPU).

    Raises `GraphMismatch` (names or shapes against the spec, names listed; names of no known convention;
    two graphs of different models), `UnsupportedModel` (an encoder-decoder graph: `Seq2SeqEngine` runs T5
    and Whisper), `ConfigError` (a view the graphs do not provide, a storage the graph cannot read).
    """

    def __init__(
        self,
        graph: str | Path,
        config: EngineConfig | None = None,
        *,
        twin_graph: str | Path | None = None,
        context: int | None = None,
        spec: KVSpec | None = None,
        eos_token_id: int | None = None,
        tokenizer: Any = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.config = config = config or EngineConfig()
        self.session = open_session(graph, config.threads, providers)
        self.twin_session = None
        twin = None
        if twin_graph is not None:
            self.twin_session = open_session(twin_graph, config.threads, providers)
            twin = (self.twin_session, Path(twin_graph))
        runner = _make_runner(self.session, Path(graph), config, spec, twin)
        cache = CausalCache(
            runner.spec,
            config.capacity,
            config.max_sequences,
            window=config.window,
            sinks=config.sinks,
            kv_dtype=runner.kv_dtype,
            group_size=runner.group_size,
            defrag_threshold=config.defrag_threshold,
            xp=np,
        )
        super().__init__(
            runner,
            cache,
            config,
            prefix_sharing=config.prefix_sharing,
            context=context,
            eos_token_id=eos_token_id,
            tokenizer=tokenizer,
            metrics=EngineMetrics(),
        )

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        graph: GraphKind | str = GraphKind.AUTO,
        **kwargs: Any,
    ) -> Engine:
        """An engine over a model folder's graph, with the tokenizer and context
        (``max_position_embeddings``) of ``MODEL_DIR/checkpoint/``.

        `graph` (`GraphKind`): "native" loads the native graphs of ``config.view`` (`model_graphs`),
        "optimum" ``optimum/model.onnx``, "auto" the native graphs when the folder has them, else the
        Optimum export. Raises `UnsupportedModel` (no such graph; the message says how to export it).
        """
        config = config or EngineConfig()
        folder = Path(model_dir)
        kind = GraphKind(graph)
        path, twin = model_graphs(folder, KVDtype(config.kv_dtype), kind, ViewChoice(config.view))
        if twin is not None:
            kwargs.setdefault("twin_graph", twin)
        checkpoint = folder / "checkpoint"
        context = None
        if (checkpoint / "config.json").is_file():
            context = json.loads((checkpoint / "config.json").read_text()).get("max_position_embeddings")
        if "tokenizer" not in kwargs and (checkpoint / "tokenizer.json").is_file():
            kwargs["tokenizer"] = load_tokenizer(checkpoint)
        kwargs.setdefault("context", context)
        return cls(path, config, **kwargs)

    def add_request(
        self,
        prompt: Sequence[int] | np.ndarray,
        params: SamplingParams | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> int:
        """Queue a request (it joins the next `step` that has room); return its id.

        Args:
            prompt: ``[P]`` token ids, each in ``[0, vocab_size)``.
            params: `SamplingParams` (default: greedy, 32 new tokens, the model's eos).
            on_token: called with each `TokenEvent` of this request as it is produced.

        Raises `EmptyPrompt`, `UnknownToken`, `PromptTooLong` (longer than the model's context or the
        cache); nothing is queued then.
        """
        return self._queue(prompt, params, on_token).id

    def generate(
        self, prompts: Iterable[Sequence[int]], params: SamplingParams | None = None
    ) -> list[list[int]]:
        """Generate for every prompt (all queued at once, continuous batching); their new tokens, in order."""
        return self._run_all([self.add_request(p, params) for p in prompts])

    def generate_text(self, prompts: Iterable[str], params: SamplingParams | None = None) -> list[str]:
        """`generate` over text prompts, with the model folder's tokenizer."""
        tok = self._tokenizer()
        return [tok.decode(out) for out in self.generate([tok.encode(p) for p in prompts], params)]

    def stats(self) -> CacheStats:
        """The cache's `CacheStats`."""
        return self.cache.stats()

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError(
                "this engine has no tokenizer: build it with Engine.from_model_dir or tokenizer="
            )
        return self.tokenizer


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


def model_graphs(
    folder: Path, kv_dtype: KVDtype, kind: GraphKind, view: ViewChoice = ViewChoice.AUTO
) -> tuple[Path, Path | None]:
    """The graph files of a model folder for `kv_dtype`, `kind` and `view`: (graph, twin or None).

    Native graphs: "pool" ``native/decoder_step.pool.{kv_dtype}.onnx``; "gathered"
    ``native/decoder_step.gathered.{float16 for a float16 cache, else float32}.onnx`` (an int8 cache is
    dequantized by the gather); "auto" the pool graph with a twin when the folder has one: the decode-view
    graph ``decoder_step.decode.float32.onnx`` (float32 and int8 caches), else the gathered-view graph;
    a folder without the pool graph gives its gathered one alone. Optimum: ``optimum/model.onnx`` (no
    twin). See `Engine.from_model_dir`.
    """
    kv = KVDtype(kv_dtype).value
    read = "float16" if kv == "float16" else "float32"
    pool = folder / "native" / f"decoder_step.pool.{kv}.onnx"
    gathered = folder / "native" / f"decoder_step.gathered.{read}.onnx"
    decode = folder / "native" / "decoder_step.decode.float32.onnx"
    optimum = folder / "optimum" / "model.onnx"
    view = ViewChoice(view)
    twin = decode if read == "float32" and decode.is_file() else gathered
    if view is ViewChoice.AUTO:
        native = [pool, twin] if pool.is_file() or not gathered.is_file() else [gathered]
    else:
        native = [gathered if view is ViewChoice.GATHERED else pool]
    found = [path for path in native if path.is_file()]
    if kind is GraphKind.NATIVE or (kind is GraphKind.AUTO and (found or not optimum.is_file())):
        if not found:
            gathered_only = view is ViewChoice.GATHERED
            option = f"--kv-dtype {read} --view gathered" if gathered_only else f"--kv-dtype {kv}"
            raise UnsupportedModel(
                f"{native[0]} not found: export it with `kvarray export --arch llama "
                f"{folder / 'checkpoint'} {folder / 'native'} {option}`"
            )
        return found[0], (found[1] if len(found) == 2 else None)
    if not optimum.is_file():
        raise UnsupportedModel(f"{optimum} not found: export it with `optimum-cli export onnx --model ...`")
    return optimum, None


def open_session(graph: str | Path, threads: int, providers: Sequence[str]) -> ort.InferenceSession:
    """A sequential session over `graph` with `threads` intra-op threads (0: ONNX Runtime's default).

    Raises `ConfigError` (threads not an int >= 0), `MissingModelFile` (no such file),
    `ModelFileError` (a file ONNX Runtime cannot load: empty, truncated, not an ONNX protobuf, missing
    external weights; ONNX Runtime's own message is quoted and chained).
    """
    if not isinstance(threads, numbers.Integral) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"threads must be an int >= 0 (0: ONNX Runtime's default), got {threads!r}")
    path = Path(graph)
    if not path.is_file():
        raise MissingModelFile(f"no ONNX graph at {path}{' (a folder)' if path.is_dir() else ''}")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path} is empty: expected an ONNX graph (export it with `kvarray export`)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"{path} ({size} bytes) cannot be loaded as an ONNX graph (truncated or corrupted? expected an "
            f"ONNX model protobuf as `kvarray export` writes): {said}"
        ) from exc


def _make_runner(
    session: ort.InferenceSession,
    graph: Path,
    config: EngineConfig,
    spec: KVSpec | None,
    twin: tuple[ort.InferenceSession, Path] | None = None,
) -> Runner:
    """The runner of the convention the session's names match: native (kvarray metadata; with a twin, the
    session and path of its decode- or gathered-view graph, a `ViewSwitch` over both) or Optimum. Raises
    `ConfigError` when ``config.view`` and the graphs disagree."""
    match = match_convention([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    name = match.convention.name
    view = ViewChoice(config.view)
    if name in ("native", "native-int8", "native-gathered"):
        info = read_metadata(graph)
        if (view is not ViewChoice.AUTO and info.view != view.value) or (twin and info.view != "pool"):
            with_twin = f" with a twin {twin[1].name}" if twin else ""
            raise ConfigError(
                f"view {view.value!r} cannot run {graph.name} ({info.view} view){with_twin}: pass the "
                f"{view.value}-view graph, or view 'auto'"
            )
        storage = KVDtype(config.kv_dtype).value if info.view == "gathered" else None
        runner = NativeRunner(session, info, spec, config.max_sequences, storage)
        if twin is None:
            return runner
        twin_info = read_metadata(twin[1])
        second = NativeRunner(twin[0], twin_info, runner.spec, config.max_sequences, runner.kv_dtype)
        return ViewSwitch(runner, second, config.gathered_min_sequences)
    if twin is not None:
        raise ConfigError(f"a twin graph goes with a native pool-view graph, not {name!r} names")
    if name == "optimum":
        return OptimumRunner(
            session,
            match.num_layers,
            spec=spec,
            kv_dtype=KVDtype(config.kv_dtype).value,
            tokens=read_tokens(graph.parent),
        )
    raise UnsupportedModel(
        f"the engine runs decoder-only graphs (native or Optimum); {graph.name} has the "
        f"{name!r} names: not supported yet"
    )

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
    ConfigError,
    EmptyPrompt,
    PromptTooLong,
    UnknownRequest,
    UnknownToken,
    UnsupportedModel,
)
from ..export import GraphInfo, read_metadata
from ..spec import KVSpec
from .binding import Binder
from .names import match_convention
from .native import NativeRunner
from .optimum import OptimumRunner, read_tokens
from .runner import Runner
from .sampling import SamplingParams, sample_rows
from .scheduler import FinishReason, Request, RequestState, Scheduler, TokenEvent
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
        self._kernel_threads = options.kernel_threads
        # positions a request may reach: the model's context and, without a window, the cache
        self._limit = None if window is not None else min(context or capacity, capacity)
        self.requests: dict[int, Request] = {}
        self.metrics = metrics
        self._next_id = 0

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
    ) -> Request:
        """Validate a request's decoder prompt ``[P]`` (named `what` in errors) and queue it.

        Raises `EmptyPrompt`, `UnknownToken`, `PromptTooLong` (longer than the model's context or the
        cache); nothing is queued then.
        """
        params = params or SamplingParams()
        ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise EmptyPrompt(f"a request needs at least one {what} token")
        check_tokens(ids, self.vocab_size, "token" if what == "prompt" else what)
        if self.context is not None and ids.size > self.context:
            raise PromptTooLong(int(ids.size), self.context, "model context")
        window = self._cells.window
        if window is None and ids.size > self._capacity:
            raise PromptTooLong(int(ids.size), self._capacity, "cache")
        need = ids.size + params.max_new_tokens - 1
        if window is None:
            need = min(need, self._limit or need)
        else:
            need = min(need, window + self._cells.sinks)
        stop = self.eos if params.stop_tokens is None else frozenset(params.stop_tokens)
        req = Request(self._next_id, ids, params, need, stop, np.random.default_rng(params.seed), on_token)
        self._next_id += 1
        self.requests[req.id] = req
        self.scheduler.waiting.append(req)
        return req

    def cancel(self, request_id: int) -> None:
        """Stop a waiting or running request now and free what it holds (others are unaffected).

        Raises `UnknownRequest` for an id never added or already finished.
        """
        req = self.requests.get(request_id)
        if req is None or req.finished:
            raise UnknownRequest(f"request {request_id} is not waiting or running")
        if req.state is RequestState.RUNNING:
            self._note_peak()
        self.scheduler.finish(req, FinishReason.CANCELLED)
        self._free(req)

    def request(self, request_id: int) -> Request:
        """The `Request` with this id (kept after it finished, until `pop`)."""
        try:
            return self.requests[request_id]
        except KeyError:
            raise UnknownRequest(f"no request {request_id}") from None

    def pop(self, request_id: int) -> Request:
        """Forget a finished request and return it."""
        req = self.request(request_id)
        if not req.finished:
            raise UnknownRequest(f"request {request_id} has not finished")
        return self.requests.pop(request_id)

    @property
    def has_work(self) -> bool:
        """True while a request waits or runs."""
        return self.scheduler.has_work

    # ---- running -----------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One forward pass over the running requests (admitting waiting ones first); its token events."""
        start = time.perf_counter()
        outer = numba.get_num_threads()
        inner = min(self._kernel_threads, outer) if self._kernel_threads else outer
        if inner != outer:
            numba.set_num_threads(inner)
        try:
            return self._step(start)
        finally:
            if inner != outer:
                numba.set_num_threads(outer)

    def _step(self, start: float) -> list[TokenEvent]:
        sched = self.scheduler
        if sched.waiting:
            self._admit()
        batch = sched.next_batch()
        if batch is None:
            return []
        plan = self.cache.start_forward(batch.seq_ids, batch.positions)
        logits, run_time = self.runner.forward(self.cache, plan, batch)
        rows = len(batch.sampled)
        tokens = sample_rows(logits[:rows], [r.params for r in batch.sampled], [r.rng for r in batch.sampled])
        events = sched.commit(batch, tokens, self._limit)
        if not sched.has_work or any(e.finished for e in events):
            self._note_peak()  # cells in use only fall when requests leave: measure just before
        for event in events:
            if event.finished:
                self._free(event.request)
        m = self.metrics
        m.steps += 1
        m.prefill_tokens += batch.prefill_tokens
        m.decode_tokens += batch.decode_tokens
        m.generated_tokens += len(events)
        m.peak_n_kv = max(m.peak_n_kv, (plan.self_plan if isinstance(plan, EncDecPlan) else plan).n_kv)
        m.run_seconds += run_time
        m.step_seconds += time.perf_counter() - start
        for event in events:
            if event.request.on_token is not None:
                event.request.on_token(event)
        return events

    def _admit(self) -> None:
        """Admit the waiting requests that fit (the runner's room, then the scheduler's rule on decoder
        cells), share their prompt prefixes, and hand the admitted ones to the runner."""
        sched, cells = self.scheduler, self._cells
        limit = self.runner.admit_limit(self.cache, sched.waiting)
        before = len(sched.running)
        for src, dst, length in sched.admit(cells.stats().cells_free, cells.length, limit):
            cells.copy_prefix(src.id, dst.id, length)
            self.metrics.shared_tokens += length
        if len(sched.running) > before:
            self.runner.on_admit(self.cache, sched.running[before:])

    def stream(self) -> Iterator[TokenEvent]:
        """Step until no request waits or runs, yielding every token event (requests may be added or
        cancelled between events)."""
        while self.has_work:
            yield from self.step()

    def _run_all(self, ids: list[int]) -> list[list[int]]:
        """Step until no request waits or runs; the new tokens of requests `ids`, in order (popped)."""
        for _ in self.stream():
            pass
        return [self.pop(i).output for i in ids]

    def close(self) -> None:
        """Release the cache's pools and the bindings."""
        self.runner.close()
        self.cache.close()

    # ---- internals ---------------------------------------------------------------------------------
    def _note_peak(self) -> None:
        self.metrics.peak_cells = max(self.metrics.peak_cells, self._cells.stats().cells_used)

    def _free(self, req: Request) -> None:
        """Free a finished or cancelled request's decoder cells, then let the runner free its own part."""
        if self._cells.length(req.id):
            self._cells.remove(req.id)
        self.runner.on_finish(self.cache, req)


class Engine(EngineCore[CausalCache]):
    """Generation over one decoder graph (Llama: kvarray's native pool view, or an Optimum export) with a
    `CausalCache`; the runner is chosen from the graph's names.

    Args:
        graph: a native ``decoder_step.pool.{float32,float16,int8}.onnx`` exported by kvarray, or an Optimum
            decoder-only ``model.onnx`` (its folder's config.json / generation_config.json give the eos).
        config: `EngineConfig`.
        context: the model's context (max positions); None: unbounded.
        spec: the cache spec (None: the graph's own); a spec the graph does not match raises `GraphMismatch`.
        eos_token_id: default stop token (None: the graph's eos, if any).
        tokenizer: optional, for `stream_text` / `generate_text`.
        providers: ONNX Runtime execution providers (default CPU).

    Raises `GraphMismatch` (names or shapes against the spec, names listed; names of no known convention),
    `UnsupportedModel` (an encoder-decoder or gathered-view graph: `Seq2SeqEngine` runs T5 and Whisper).
    """

    def __init__(
        self,
        graph: str | Path,
        config: EngineConfig | None = None,
        *,
        context: int | None = None,
        spec: KVSpec | None = None,
        eos_token_id: int | None = None,
        tokenizer: Any = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.config = config = config or EngineConfig()
        self.session = open_session(graph, config.threads, providers)
        runner = _make_runner(self.session, Path(graph), config, spec)
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

        `graph` (`GraphKind`): "native" loads ``native/decoder_step.pool.{kv_dtype}.onnx``, "optimum"
        ``optimum/model.onnx``, "auto" the native graph when the folder has it, else the Optimum export.
        Raises `UnsupportedModel` (no such graph; the message says how to export it).
        """
        config = config or EngineConfig()
        folder = Path(model_dir)
        kind = GraphKind(graph)
        path = model_graph(folder, KVDtype(config.kv_dtype), kind)
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


def check_tokens(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """Raise `UnknownToken` naming `what` when an id of ``ids [N]`` is outside ``[0, vocab_size)``."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise UnknownToken(f"{what} ids {bad[:8].tolist()} are outside the vocabulary [0, {vocab_size})")


def model_graph(folder: Path, kv_dtype: KVDtype, kind: GraphKind) -> Path:
    """The graph file of a model folder for `kv_dtype` and `kind` (see `Engine.from_model_dir`)."""
    kv = KVDtype(kv_dtype).value
    native = folder / "native" / f"decoder_step.pool.{kv}.onnx"
    optimum = folder / "optimum" / "model.onnx"
    if kind is GraphKind.NATIVE or (kind is GraphKind.AUTO and (native.is_file() or not optimum.is_file())):
        if not native.is_file():
            raise UnsupportedModel(
                f"{native} not found: export it with `kvarray export --arch llama "
                f"{folder / 'checkpoint'} {folder / 'native'} --kv-dtype {kv}`"
            )
        return native
    if not optimum.is_file():
        raise UnsupportedModel(f"{optimum} not found: export it with `optimum-cli export onnx --model ...`")
    return optimum


def open_session(graph: str | Path, threads: int, providers: Sequence[str]) -> ort.InferenceSession:
    """A sequential session over `graph` with `threads` intra-op threads (0: ONNX Runtime's default)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(graph), options, providers=list(providers))


def _make_runner(
    session: ort.InferenceSession, graph: Path, config: EngineConfig, spec: KVSpec | None
) -> Runner:
    """The runner of the convention the session's names match: native (kvarray metadata) or Optimum."""
    match = match_convention([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    name = match.convention.name
    if name in ("native", "native-int8"):
        return NativeRunner(session, read_metadata(graph), spec, config.max_sequences)
    if name == "optimum":
        return OptimumRunner(
            session,
            match.num_layers,
            spec=spec,
            kv_dtype=KVDtype(config.kv_dtype).value,
            tokens=read_tokens(graph.parent),
        )
    raise UnsupportedModel(
        f"the engine runs decoder-only graphs (native pool view or Optimum); {graph.name} has the "
        f"{name!r} names: not supported yet"
    )

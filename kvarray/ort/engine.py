"""The generation engine: a native decoder-step graph, a `CausalCache` and a continuous-batching scheduler.

    from kvarray.ort import Engine, EngineConfig, SamplingParams
    engine = Engine.from_model_dir("models/tiny-llama", EngineConfig(max_sequences=16))
    for event in engine.stream_text(["The with statement"], SamplingParams(max_new_tokens=32)):
        print(event.text, end="")

Each `step` is one forward pass over a flat batch (decode tokens of every running request plus prompt
chunks): `CausalCache.start_forward` assigns cells, the pool view ``keys[:n_kv]`` of every layer and the
plan's ``bias_before_put [T, n_kv + T]`` are bound zero-copy to the graph, the session writes ``new_key`` /
``new_value`` ``[T, H, D]`` and ``logits [S, vocab]`` into preallocated buffers, and `put` scatters the new
rows into the cache. Details: docs/engine.md.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import onnxruntime as ort

from ..causal import CacheStats, CausalCache
from ..errors import (
    ConfigError,
    EmptyPrompt,
    GraphMismatch,
    PromptTooLong,
    UnknownRequest,
    UnknownToken,
    UnsupportedModel,
)
from ..export import GraphInfo, read_metadata
from ..spec import KVSpec
from .binding import Binder, OutputBuffers
from .names import check_names, convention
from .sampling import SamplingParams, sample_rows
from .scheduler import FinishReason, Request, RequestState, Scheduler, TokenEvent
from .tokenizer import load_tokenizer

__all__ = ["Engine", "EngineConfig", "EngineMetrics", "KVDtype"]

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}


class KVDtype(str, enum.Enum):
    """Storage of the cache (and which native graph a model folder's engine loads)."""

    FLOAT32 = "float32"
    INT8 = "int8"


@dataclass(frozen=True)
class EngineConfig:
    """Options of an `Engine`.

    Attributes:
        capacity: cache cells (tokens held at once over all requests, shared cells once).
        max_sequences: requests running at once.
        prefill_chunk: prompt tokens one request feeds per pass at most.
        max_batch_tokens: tokens per pass at most.
        kv_dtype: float32 or int8 storage (`Engine.from_model_dir` loads the matching graph).
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


class Engine:
    """Generation over one native decoder-step graph (Llama, pool view) with a `CausalCache`.

    Args:
        graph: path of a ``decoder_step.pool.{float32,int8}.onnx`` exported by kvarray.
        config: `EngineConfig`.
        context: the model's context (max positions); None: unbounded.
        spec: the cache spec (None: the graph's own); a spec the graph does not match raises `GraphMismatch`.
        eos_token_id: default stop token (None: the graph metadata's eos, if any).
        tokenizer: optional, for `stream_text` / `generate_text`.
        providers: ONNX Runtime execution providers (default CPU).

    Raises `GraphMismatch` (names or shapes against the spec, names listed), `UnsupportedModel` (an
    encoder-decoder or gathered-view graph: not supported by the engine yet).
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
        self.info: GraphInfo = read_metadata(graph)
        if self.info.architecture != "llama" or self.info.view != "pool":
            raise UnsupportedModel(
                f"the engine runs decoder-only pool-view graphs; got {self.info.architecture!r} "
                f"({self.info.graph}, view {self.info.view!r}): not supported yet"
            )
        self.spec = spec or self.info.spec
        self.vocab_size = self.info.vocab_size
        self.context = context
        self.tokenizer = tokenizer
        eos = self.info.tokens.get("eos_token_id") if eos_token_id is None else eos_token_id
        self.eos: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        options = ort.SessionOptions()
        if config.threads:
            options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(graph), options, providers=list(providers))
        self._check_graph()
        window = config.window
        self.cache = CausalCache(
            self.spec,
            config.capacity,
            config.max_sequences,
            window=window,
            sinks=config.sinks,
            kv_dtype=self.info.kv_dtype,
            group_size=self.info.group_size,
            defrag_threshold=config.defrag_threshold,
            xp=np,
        )
        chunk = config.prefill_chunk if window is None else min(config.prefill_chunk, window)
        self.scheduler = Scheduler(
            config.capacity,
            config.max_sequences,
            chunk,
            config.max_batch_tokens,
            config.prefix_sharing and window is None,
        )
        # positions a request may reach: the model's context and, without a window, the cache
        self._limit = None if window is not None else min(context or config.capacity, config.capacity)
        self.requests: dict[int, Request] = {}
        self.metrics = EngineMetrics()
        self._next_id = 0
        self._setup_binding()

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, config: EngineConfig | None = None, **kwargs: Any
    ) -> Engine:
        """An engine over ``MODEL_DIR/native/decoder_step.pool.{kv_dtype}.onnx``, with the tokenizer and
        context (``max_position_embeddings``) of ``MODEL_DIR/checkpoint/``."""
        config = config or EngineConfig()
        folder = Path(model_dir)
        kv = KVDtype(config.kv_dtype).value
        graph = folder / "native" / f"decoder_step.pool.{kv}.onnx"
        if not graph.is_file():
            raise UnsupportedModel(
                f"{graph} not found: export it with `kvarray export --arch llama "
                f"{folder / 'checkpoint'} {folder / 'native'} --kv-dtype {kv}`"
            )
        checkpoint = folder / "checkpoint"
        context = None
        if (checkpoint / "config.json").is_file():
            context = json.loads((checkpoint / "config.json").read_text()).get("max_position_embeddings")
        if "tokenizer" not in kwargs and (checkpoint / "tokenizer.json").is_file():
            kwargs["tokenizer"] = load_tokenizer(checkpoint)
        kwargs.setdefault("context", context)
        return cls(graph, config, **kwargs)

    # ---- requests ----------------------------------------------------------------------------------
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
        params = params or SamplingParams()
        ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise EmptyPrompt("a request needs at least one prompt token")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise UnknownToken(
                f"token ids {bad[:8].tolist()} are outside the vocabulary [0, {self.vocab_size})"
            )
        if self.context is not None and ids.size > self.context:
            raise PromptTooLong(int(ids.size), self.context, "model context")
        window = self.config.window
        if window is None and ids.size > self.config.capacity:
            raise PromptTooLong(int(ids.size), self.config.capacity, "cache")
        need = ids.size + params.max_new_tokens - 1
        if window is None:
            need = min(need, self._limit or need)
        else:
            need = min(need, window + self.config.sinks)
        stop = self.eos if params.stop_tokens is None else frozenset(params.stop_tokens)
        req = Request(self._next_id, ids, params, need, stop, np.random.default_rng(params.seed), on_token)
        self._next_id += 1
        self.requests[req.id] = req
        self.scheduler.waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stop a waiting or running request now and free its cells (others are unaffected).

        Raises `UnknownRequest` for an id never added or already finished.
        """
        req = self.requests.get(request_id)
        if req is None or req.finished:
            raise UnknownRequest(f"request {request_id} is not waiting or running")
        self._finish(req, FinishReason.CANCELLED)

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
        inner = min(self.config.kernel_threads, outer) if self.config.kernel_threads else outer
        if inner != outer:
            numba.set_num_threads(inner)
        try:
            return self._step(start)
        finally:
            if inner != outer:
                numba.set_num_threads(outer)

    def _step(self, start: float) -> list[TokenEvent]:
        cache, sched = self.cache, self.scheduler
        if sched.waiting:
            for src, dst, length in sched.admit(cache.stats().cells_free, cache.length):
                cache.copy_prefix(src.id, dst.id, length)
                self.metrics.shared_tokens += length
        batch = sched.next_batch()
        if batch is None:
            return []
        plan = cache.start_forward(batch.seq_ids, batch.positions)
        self._bind_step(plan, batch)
        run_start = time.perf_counter()
        self.binder.run()
        run_time = time.perf_counter() - run_start
        for layer in range(self.spec.num_layers):
            cache.put(layer, self._new_keys[layer], self._new_values[layer])
        rows = len(batch.sampled)
        tokens = sample_rows(
            self._logits[:rows], [r.params for r in batch.sampled], [r.rng for r in batch.sampled]
        )
        events = sched.commit(batch, tokens, self._limit)
        if not sched.waiting and not sched.running or any(e.finished for e in events):
            self._note_peak()  # cells in use only fall when requests leave: measure just before
        for event in events:
            if event.finished:
                self._free(event.request)
        m = self.metrics
        m.steps += 1
        m.prefill_tokens += batch.prefill_tokens
        m.decode_tokens += batch.decode_tokens
        m.generated_tokens += len(events)
        m.peak_n_kv = max(m.peak_n_kv, plan.n_kv)
        m.run_seconds += run_time
        m.step_seconds += time.perf_counter() - start
        for event in events:
            if event.request.on_token is not None:
                event.request.on_token(event)
        return events

    def stream(self) -> Iterator[TokenEvent]:
        """Step until no request waits or runs, yielding every token event (requests may be added or
        cancelled between events)."""
        while self.has_work:
            yield from self.step()

    def generate(
        self, prompts: Iterable[Sequence[int]], params: SamplingParams | None = None
    ) -> list[list[int]]:
        """Generate for every prompt (all queued at once, continuous batching); their new tokens, in order."""
        ids = [self.add_request(p, params) for p in prompts]
        for _ in self.stream():
            pass
        return [self.pop(i).output for i in ids]

    def generate_text(self, prompts: Iterable[str], params: SamplingParams | None = None) -> list[str]:
        """`generate` over text prompts, with the model folder's tokenizer."""
        tok = self._tokenizer()
        return [tok.decode(out) for out in self.generate([tok.encode(p) for p in prompts], params)]

    def stats(self) -> CacheStats:
        """The cache's `CacheStats`."""
        return self.cache.stats()

    def close(self) -> None:
        """Release the cache's pools and the bindings."""
        self.binder.clear()
        self.cache.close()

    # ---- internals ---------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError(
                "this engine has no tokenizer: build it with Engine.from_model_dir or tokenizer="
            )
        return self.tokenizer

    def _note_peak(self) -> None:
        self.metrics.peak_cells = max(self.metrics.peak_cells, self.cache.stats().cells_used)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        running = req.state is RequestState.RUNNING
        if running:
            self._note_peak()
        self.scheduler.finish(req, reason)
        if running:
            self._free(req)

    def _free(self, req: Request) -> None:
        if self.cache.length(req.id):
            self.cache.remove(req.id)

    def _check_graph(self) -> None:
        """Names against the native convention for the spec's layers; shapes and dtypes against the spec."""
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        conv = convention("native-int8" if self.info.kv_dtype == "int8" else "native")
        check_names(conv, self.spec.num_layers, list(ins), list(outs))
        heads, dim = self.spec.num_kv_heads, self.spec.head_dim
        wrong = []
        for i in range(self.spec.num_layers):
            for name, where in (
                (f"past_key.{i}", ins),
                (f"past_value.{i}", ins),
                (f"new_key.{i}", outs),
                (f"new_value.{i}", outs),
            ):
                shape = list(where[name].shape)
                if shape[1:] != [heads, dim]:
                    wrong.append(f"{name} {shape} (expected [*, {heads}, {dim}])")
            for name in (f"past_key.{i}", f"past_value.{i}"):
                stored = _ORT_DTYPES.get(ins[name].type, ins[name].type)
                if stored != self.info.kv_dtype:
                    wrong.append(f"{name} {ins[name].type} (expected {self.info.kv_dtype})")
        logits = list(outs["logits"].shape)
        if logits[-1] != self.vocab_size:
            wrong.append(f"logits {logits} (expected [*, {self.vocab_size}])")
        if wrong:
            raise GraphMismatch(f"the graph does not match the cache spec {self.spec}: " + "; ".join(wrong))

    def _setup_binding(self) -> None:
        layers = self.spec.num_layers
        row = ((self.spec.num_kv_heads, self.spec.head_dim), np.float32)
        shapes = {f"new_{kind}.{i}": row for i in range(layers) for kind in ("key", "value")}
        shapes["logits"] = ((self.vocab_size,), np.float32)
        self.binder = Binder(self.session)
        self.outputs = OutputBuffers(np, shapes, rows=max(64, self.config.max_sequences))
        self._inputs = OutputBuffers(
            np, {n: ((), np.int64) for n in ("input_ids", "position_ids", "logits_index")}
        )
        self._past_names = [
            [f"past_key.{i}", f"past_value.{i}", f"past_key_scale.{i}", f"past_value_scale.{i}"]
            for i in range(layers)
        ]
        self._small: dict[str, np.ndarray] = {}
        self._bound_n_kv = -1
        self._bound_tokens = -1
        self._bound_rows = -1
        self._new_keys: list[np.ndarray] = []
        self._new_values: list[np.ndarray] = []
        self._logits = np.empty((0, self.vocab_size), np.float32)

    def _bind_step(self, plan: Any, batch: Any) -> None:
        """Bind what changed since the last pass: the small int64 inputs are copied into fixed buffers
        (bound once per length), the pools once per n_kv, the outputs once per token / row count."""
        binder, count, rows = self.binder, len(batch.tokens), len(batch.logits_index)
        for name, values in (
            ("input_ids", batch.tokens),
            ("position_ids", batch.positions),
            ("logits_index", batch.logits_index),
        ):
            buf = self._small.get(name)
            if buf is None or len(buf) != len(values):  # the same view object while the length stays
                buf = self._small[name] = self._inputs.view(name, len(values))
            buf[:] = values
            binder.bind_input(name, buf)
        binder.bind_input("attention_bias", plan.bias_before_put)
        if plan.n_kv != self._bound_n_kv:
            int8 = self.info.kv_dtype == "int8"
            for layer, names in enumerate(self._past_names):
                view = self.cache.get(layer, "pool")
                binder.bind_input(names[0], view.keys)
                binder.bind_input(names[1], view.values)
                if int8:
                    binder.bind_input(names[2], view.key_scales)
                    binder.bind_input(names[3], view.value_scales)
            self._bound_n_kv = plan.n_kv
        if count != self._bound_tokens:
            out = self.outputs
            self._new_keys = [out.view(f"new_key.{i}", count) for i in range(self.spec.num_layers)]
            self._new_values = [out.view(f"new_value.{i}", count) for i in range(self.spec.num_layers)]
            for i in range(self.spec.num_layers):
                binder.bind_output(f"new_key.{i}", self._new_keys[i])
                binder.bind_output(f"new_value.{i}", self._new_values[i])
            self._bound_tokens = count
        if rows != self._bound_rows:
            self._logits = self.outputs.view("logits", rows)
            binder.bind_output("logits", self._logits)
            self._bound_rows = rows

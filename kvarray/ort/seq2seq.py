"""The encoder-decoder engine: native T5 / Whisper graphs, an `EncoderDecoderCache` and continuous batching.

    from kvarray.ort.seq2seq import Seq2SeqEngine
    engine = Seq2SeqEngine.from_model_dir("models/tiny-t5-random")
    (tokens,) = engine.generate([[95, 108, 34]], params=SamplingParams(max_new_tokens=16))

A request carries its encoder input (T5: source token ids ``[M]``; Whisper: log-mel ``input_features
[n_mels, 3000]``) and a decoder prompt (default ``[decoder_start_token_id]``). When requests are admitted,
one encoder pass runs over all of them (T5 flat with a block-diagonal bias, Whisper batched) and its
``cross_key.{i}`` / ``cross_value.{i}`` ``[sum M, H, D]`` go straight into the `EncoderCache`
(`put_cross_batch`, modality "text" or "audio"), side by side. Each decoder step then mixes prompt chunks
and decode tokens of every running request (the Llama engine's `Scheduler`), binds the self-attention pool
view ``[n_kv, H, D]`` and ``attention_bias [T, n_kv + T]`` (before-put form), the cross view ``[M, H, D]``
and ``cross_bias [T, M]`` and, for T5, ``past_position_ids [n_kv]`` (the cells' positions). A finished
request is removed from both caches at once. Details: docs/engine.md, "T5 and Whisper".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numba
import numpy as np
import onnxruntime as ort

from ..causal import CausalCache
from ..encdec import EncDecPlan, EncDecStats, EncoderDecoderCache
from ..encoder import EncoderCache
from ..errors import (
    ConfigError,
    EmptyPrompt,
    GraphMismatch,
    PromptTooLong,
    ShapeMismatch,
    UnknownRequest,
    UnknownToken,
    UnsupportedModel,
)
from ..export import GraphInfo, read_metadata
from ..views import NEG_INF, CrossView, PoolView
from .binding import Binder, OutputBuffers
from .engine import EngineMetrics
from .names import check_names, convention
from .sampling import SamplingParams, sample_rows
from .scheduler import Batch, FinishReason, Request, Scheduler, TokenEvent

__all__ = ["ARCHITECTURES", "Seq2SeqConfig", "Seq2SeqEngine", "Seq2SeqMetrics"]

#: architecture -> (modality of its encoder entries, encoder rows per sequence or None when it varies)
ARCHITECTURES: dict[str, tuple[str, int | None]] = {"t5": ("text", None), "whisper": ("audio", 1500)}
WHISPER_FRAMES = 3000  # input_features frames: 30 s at a hop of 10 ms


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Options of a `Seq2SeqEngine`.

    Attributes:
        capacity: decoder self-attention cells (all requests' decoder tokens at once).
        encoder_capacity: cross rows of the encoder cache (None: ``max_sequences * 1500`` for Whisper,
            ``max_sequences * 512`` for T5).
        max_sequences: requests running at once (each holds one encoder entry).
        prefill_chunk, max_batch_tokens: as `EngineConfig` (decoder prompt tokens).
        max_encoder_batch: sequences per encoder pass at most (admitted requests are encoded in chunks).
        cross_dtype: storage of the cross K/V: "float32" is bound zero-copy into the float32 graphs;
            "float16" / "int8" halve / quarter the memory and are converted to float32 each step.
        threads, kernel_threads, defrag_threshold: as `EngineConfig`.
    """

    capacity: int = 4096
    encoder_capacity: int | None = None
    max_sequences: int = 16
    prefill_chunk: int = 256
    max_batch_tokens: int = 512
    max_encoder_batch: int = 8
    cross_dtype: str = "float32"
    threads: int = 0
    kernel_threads: int = 1
    defrag_threshold: float | None = 0.1


@dataclass
class Seq2SeqMetrics(EngineMetrics):
    """`EngineMetrics` plus the encoder side: passes, sequences and rows encoded, time inside the encoder
    `session.run`, and decoder steps whose cross view was bound zero-copy or staged (copied)."""

    encoder_passes: int = 0
    encoded_sequences: int = 0
    encoder_rows: int = 0
    encoder_seconds: float = 0.0
    cross_zero_copy_steps: int = 0
    cross_staged_steps: int = 0


class Seq2SeqEngine:
    """Generation over a native encoder graph and decoder-step graph (pool view) of T5 or Whisper.

    Args:
        encoder: path of ``encoder.onnx``; decoder: path of ``decoder_step.pool.float32.onnx``.
        config: `Seq2SeqConfig`.
        context: decoder positions the model takes (Whisper's ``max_target_positions``); None: unbounded.
        eos_token_id: default stop token (None: the graph metadata's eos, if any).
        decoder_start_token_id: the default decoder prompt (None: the metadata's).
        tokenizer: optional, kept for callers (`cli_transcribe` prints text with it).
        providers: ONNX Runtime execution providers (default CPU).

    Raises `UnsupportedModel` (not a T5 / Whisper pool-view float32 pair), `GraphMismatch` (names or
    shapes of the decoder graph against its spec, or an encoder that does not emit every layer's cross K/V).
    """

    def __init__(
        self,
        encoder: str | Path,
        decoder: str | Path,
        config: Seq2SeqConfig | None = None,
        *,
        context: int | None = None,
        eos_token_id: int | None = None,
        decoder_start_token_id: int | None = None,
        tokenizer: Any = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.config = config = config or Seq2SeqConfig()
        self.encoder_info: GraphInfo = read_metadata(encoder)
        self.info: GraphInfo = read_metadata(decoder)
        arch = self.info.architecture
        if arch not in ARCHITECTURES or self.encoder_info.architecture != arch:
            raise UnsupportedModel(
                "the seq2seq engine runs t5 and whisper graphs; got encoder "
                f"{self.encoder_info.architecture!r} and decoder {arch!r}"
            )
        if self.info.view != "pool" or self.info.kv_dtype != "float32":
            raise UnsupportedModel(
                f"the seq2seq engine runs the pool-view float32 decoder step; got view {self.info.view!r}, "
                f"kv_dtype {self.info.kv_dtype!r}"
            )
        self.architecture = arch
        self.modality, self._rows_per_sequence = ARCHITECTURES[arch]
        self.spec = self.info.spec
        self.vocab_size = self.info.vocab_size
        self.context = context
        self.tokenizer = tokenizer
        tokens = self.info.tokens
        eos = tokens.get("eos_token_id") if eos_token_id is None else eos_token_id
        self.eos: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        start = decoder_start_token_id
        if start is None:
            start = tokens.get("decoder_start_token_id")
        if start is None:
            raise ConfigError("no decoder_start_token_id in the graph metadata: pass decoder_start_token_id=")
        self.decoder_start_token_id = int(start)
        options = ort.SessionOptions()
        if config.threads:
            options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.encoder_session = ort.InferenceSession(str(encoder), options, providers=list(providers))
        self.session = ort.InferenceSession(str(decoder), options, providers=list(providers))
        self._check_graphs()
        enc_rows = config.encoder_capacity or config.max_sequences * (self._rows_per_sequence or 512)
        causal = CausalCache(
            self.spec, config.capacity, config.max_sequences, defrag_threshold=config.defrag_threshold, xp=np
        )
        cross = EncoderCache(
            self.spec, enc_rows, config.max_sequences, {self.modality: config.cross_dtype}, xp=np
        )
        self.cache = EncoderDecoderCache(causal, cross)
        self._cross_dtype = config.cross_dtype
        self.scheduler = Scheduler(
            config.capacity, config.max_sequences, config.prefill_chunk, config.max_batch_tokens, False
        )
        self._limit = min(context or config.capacity, config.capacity)
        self.requests: dict[int, Request] = {}
        self.metrics = Seq2SeqMetrics()
        self._sources: dict[int, np.ndarray] = {}  # encoder input of requests not encoded yet
        self._encoded: set[int] = set()
        self._next_id = 0
        self._setup_binding()

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, config: Seq2SeqConfig | None = None, **kwargs: Any
    ) -> Seq2SeqEngine:
        """An engine over ``MODEL_DIR/native/encoder.onnx`` and ``decoder_step.pool.float32.onnx``, with the
        context (Whisper's ``max_target_positions``) of ``MODEL_DIR/checkpoint/config.json``."""
        folder = Path(model_dir)
        native = folder / "native"
        encoder, decoder = native / "encoder.onnx", native / "decoder_step.pool.float32.onnx"
        for graph in (encoder, decoder):
            if not graph.is_file():
                raise UnsupportedModel(
                    f"{graph} not found: export it with `kvarray export --arch t5|whisper "
                    f"{folder / 'checkpoint'} {native}`"
                )
        config_json = folder / "checkpoint" / "config.json"
        if "context" not in kwargs and config_json.is_file():
            kwargs["context"] = json.loads(config_json.read_text()).get("max_target_positions")
        return cls(encoder, decoder, config, **kwargs)

    # ---- requests ----------------------------------------------------------------------------------
    @property
    def n_mels(self) -> int | None:
        """Mel bins of Whisper's ``input_features`` (None for T5)."""
        ins = {i.name: i for i in self.encoder_session.get_inputs()}
        feat = ins.get("input_features")
        return None if feat is None else int(feat.shape[1])

    def add_request(
        self,
        source: Sequence[int] | np.ndarray,
        prompt: Sequence[int] | np.ndarray | None = None,
        params: SamplingParams | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> int:
        """Queue a request (it is encoded when admitted); return its id.

        Args:
            source: T5: ``[M]`` source token ids in ``[0, vocab_size)``; Whisper: ``[n_mels, 3000]``
                float32 log-mel features (`kvarray.ort.audio.log_mel`).
            prompt: ``[P]`` decoder prompt ids (default ``[decoder_start_token_id]``).
            params: `SamplingParams` (default: greedy, 32 new tokens, the model's eos).
            on_token: called with each `TokenEvent` of this request as it is produced.

        Raises `EmptyPrompt` (empty source or prompt), `UnknownToken`, `ShapeMismatch` (features),
        `PromptTooLong` (a prompt over the context or cache, a source over the encoder cache); nothing is
        queued then.
        """
        params = params or SamplingParams()
        src = self._check_source(source)
        ids = np.asarray([self.decoder_start_token_id] if prompt is None else prompt, np.int64).reshape(-1)
        if ids.size == 0:
            raise EmptyPrompt("a request needs at least one decoder prompt token")
        self._check_ids(ids, "decoder prompt")
        if ids.size > self._limit:
            by_context = self.context is not None and self.context <= self.config.capacity
            what = "model context" if by_context else "cache"
            raise PromptTooLong(int(ids.size), self._limit, what)
        need = min(ids.size + params.max_new_tokens - 1, self._limit)
        stop = self.eos if params.stop_tokens is None else frozenset(params.stop_tokens)
        req = Request(self._next_id, ids, params, need, stop, np.random.default_rng(params.seed), on_token)
        self._next_id += 1
        self.requests[req.id] = req
        self._sources[req.id] = src
        self.scheduler.waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stop a waiting or running request now and free its cells and encoder rows (others unaffected).

        Raises `UnknownRequest` for an id never added or already finished.
        """
        req = self.requests.get(request_id)
        if req is None or req.finished:
            raise UnknownRequest(f"request {request_id} is not waiting or running")
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
        """Admit and encode waiting requests that fit, then one decoder pass; its token events."""
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

    def stream(self) -> Iterator[TokenEvent]:
        """Step until no request waits or runs, yielding every token event."""
        while self.has_work:
            yield from self.step()

    def generate(
        self,
        sources: Iterable[Sequence[int] | np.ndarray],
        prompts: Iterable[Sequence[int]] | None = None,
        params: SamplingParams | None = None,
    ) -> list[list[int]]:
        """Generate for every source (all queued at once); their new tokens, in order."""
        sources = list(sources)
        prompt_list = [None] * len(sources) if prompts is None else list(prompts)
        ids = [self.add_request(s, p, params) for s, p in zip(sources, prompt_list, strict=True)]
        for _ in self.stream():
            pass
        return [self.pop(i).output for i in ids]

    def stats(self) -> EncDecStats:
        """Both caches' `EncDecStats` (self attention and cross)."""
        return self.cache.stats()

    def close(self) -> None:
        """Release the caches and the bindings."""
        self.binder.clear()
        self.cache.close()

    # ---- internals: a step -------------------------------------------------------------------------
    def _step(self, start: float) -> list[TokenEvent]:
        sched = self.scheduler
        if sched.waiting:
            self._admit()
        batch = sched.next_batch()
        if batch is None:
            return []
        plan = self.cache.start_forward(batch.seq_ids, batch.positions)
        self._bind_step(plan, batch)
        run_start = time.perf_counter()
        self.binder.run()
        run_time = time.perf_counter() - run_start
        for layer in range(self.spec.num_layers):
            self.cache.put(layer, self._new_keys[layer], self._new_values[layer])
        rows = len(batch.sampled)
        tokens = sample_rows(
            self._logits[:rows], [r.params for r in batch.sampled], [r.rng for r in batch.sampled]
        )
        events = sched.commit(batch, tokens, self._limit)
        m = self.metrics
        if any(e.finished for e in events) or not sched.has_work:
            m.peak_cells = max(m.peak_cells, self.cache.causal.stats().cells_used)
        for event in events:
            if event.finished:
                self._free(event.request)
        m.steps += 1
        m.prefill_tokens += batch.prefill_tokens
        m.decode_tokens += batch.decode_tokens
        m.generated_tokens += len(events)
        m.peak_n_kv = max(m.peak_n_kv, plan.self_plan.n_kv)
        m.run_seconds += run_time
        m.step_seconds += time.perf_counter() - start
        for event in events:
            if event.request.on_token is not None:
                event.request.on_token(event)
        return events

    def _admit(self) -> None:
        """Admit the waiting requests whose encoder rows fit side by side in the encoder cache's largest
        free extent (and whose decoder cells fit: `Scheduler.admit`), then encode them."""
        sched, enc = self.scheduler, self.cache.encoder
        room = enc.stats().largest_free[self._cross_dtype]
        fits = 0
        for req in sched.waiting:
            rows = self._source_rows(self._sources[req.id])
            if rows > room:
                break
            room -= rows
            fits += 1
        held_back = [sched.waiting.pop() for _ in range(len(sched.waiting) - fits)]
        try:
            sched.admit(self.cache.causal.stats().cells_free, self.cache.causal.length)
        finally:
            sched.waiting.extend(reversed(held_back))
        fresh = [r for r in sched.running if r.id not in self._encoded]
        step = max(1, self.config.max_encoder_batch)
        for k in range(0, len(fresh), step):
            self._encode(fresh[k : k + step])

    def _encode(self, reqs: list[Request]) -> None:
        """One encoder pass over `reqs`; every layer's cross K/V ``[sum M, H, D]`` into the encoder cache."""
        sources = [self._sources[r.id] for r in reqs]
        if self.architecture == "whisper":
            feeds = {"input_features": np.ascontiguousarray(np.stack(sources), np.float32)}
        else:
            lengths = [len(s) for s in sources]
            owner = np.repeat(np.arange(len(sources)), lengths)
            feeds = {
                "input_ids": np.concatenate(sources),
                "position_ids": np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]),
                "attention_bias": np.where(owner[:, None] == owner[None, :], 0.0, NEG_INF).astype(np.float32),
            }
        names = self._cross_names
        run_start = time.perf_counter()
        outputs = dict(zip(names, self.encoder_session.run(names, feeds), strict=True))
        self.metrics.encoder_seconds += time.perf_counter() - run_start
        total = outputs[names[0]].shape[0]
        lengths = [self._source_rows(s) for s in sources]
        if sum(lengths) != total:
            raise GraphMismatch(f"the encoder emitted {total} cross rows for sequences of {lengths} rows")
        seq_ids = [r.id for r in reqs]
        for layer in range(self.spec.num_layers):
            keys, values = outputs[f"cross_key.{layer}"], outputs[f"cross_value.{layer}"]
            self.cache.put_cross_batch(seq_ids, layer, keys, values, lengths, self.modality)
        for req in reqs:
            self._encoded.add(req.id)
            del self._sources[req.id]
        m = self.metrics
        m.encoder_passes += 1
        m.encoded_sequences += len(reqs)
        m.encoder_rows += total

    def _free(self, req: Request) -> None:
        """Drop `req` from both caches (decoder cells and encoder entry at once) and its pending source."""
        self._sources.pop(req.id, None)
        if req.id in self._encoded:
            self._encoded.discard(req.id)
            self.cache.remove(req.id)

    # ---- internals: checks -------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray, what: str) -> None:
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise UnknownToken(
                f"{what} ids {bad[:8].tolist()} are outside the vocabulary [0, {self.vocab_size})"
            )

    def _check_source(self, source: Any) -> np.ndarray:
        """The request's encoder input as the encoder graph takes it (validated)."""
        if self.architecture == "whisper":
            feats = np.asarray(source, np.float32)
            want = (self.n_mels, WHISPER_FRAMES)
            if feats.shape != want:
                raise ShapeMismatch(
                    f"Whisper input_features must be [n_mels, frames] = {list(want)} (30 s, padded: "
                    f"kvarray.ort.audio.log_mel); got {list(feats.shape)}"
                )
            return feats
        ids = np.asarray(source, np.int64).reshape(-1)
        if ids.size == 0:
            raise EmptyPrompt("a T5 request needs at least one source token")
        self._check_ids(ids, "source token")
        rows = self.config.encoder_capacity or self.config.max_sequences * 512
        if ids.size > rows:
            raise PromptTooLong(int(ids.size), rows, "encoder cache")
        return ids

    def _source_rows(self, source: np.ndarray) -> int:
        return self._rows_per_sequence or len(source)

    def _check_graphs(self) -> None:
        """Decoder names (native-seq2seq) and shapes against the spec; encoder outputs = the cross names."""
        layers, heads, dim = self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        check_names(convention("native-seq2seq"), layers, list(ins), list(outs))
        self._cross_names = [f"cross_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
        enc_outs = {o.name: o for o in self.encoder_session.get_outputs()}
        wrong = [f"encoder output {n} missing" for n in self._cross_names if n not in enc_outs]
        for i in range(layers):
            for name, where in (
                (f"past_key.{i}", ins), (f"past_value.{i}", ins), (f"cross_key.{i}", ins),
                (f"cross_value.{i}", ins), (f"new_key.{i}", outs), (f"new_value.{i}", outs),
                (f"cross_key.{i}", enc_outs), (f"cross_value.{i}", enc_outs),
            ):
                if name in where and list(where[name].shape)[1:] != [heads, dim]:
                    wrong.append(f"{name} {list(where[name].shape)} (expected [*, {heads}, {dim}])")
        if list(outs["logits"].shape)[-1] != self.vocab_size:
            wrong.append(f"logits {list(outs['logits'].shape)} (expected [*, {self.vocab_size}])")
        if wrong:
            raise GraphMismatch(f"the graphs do not match the cache spec {self.spec}: " + "; ".join(wrong))
        self._t5_positions = "past_position_ids" in ins

    # ---- internals: binding ------------------------------------------------------------------------
    def _setup_binding(self) -> None:
        layers = self.spec.num_layers
        row: tuple[tuple[int, ...], Any] = ((self.spec.num_kv_heads, self.spec.head_dim), np.float32)
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {
            f"new_{kind}.{i}": row for i in range(layers) for kind in ("key", "value")
        }
        shapes["logits"] = ((self.vocab_size,), np.float32)
        self.binder = Binder(self.session)
        self.outputs = OutputBuffers(np, shapes, rows=max(64, self.config.max_sequences))
        self._inputs = OutputBuffers(
            np, {n: ((), np.int64) for n in ("input_ids", "position_ids", "logits_index")}
        )
        self._small: dict[str, np.ndarray] = {}
        self._bound_n_kv = -1
        self._bound_tokens = -1
        self._bound_rows = -1
        self._new_keys: list[np.ndarray] = []
        self._new_values: list[np.ndarray] = []
        self._logits = np.empty((0, self.vocab_size), np.float32)

    def _bind_step(self, plan: EncDecPlan, batch: Batch) -> None:
        """Bind this pass: small int64 inputs copied into fixed buffers, the self pools once per n_kv, the
        cross view of every layer (zero-copy when the batch's entries are adjacent float32 rows; a staging
        buffer otherwise) and its bias, T5's cell positions, and the outputs once per token / row count."""
        binder, layers = self.binder, self.spec.num_layers
        for name, values in (
            ("input_ids", batch.tokens),
            ("position_ids", batch.positions),
            ("logits_index", batch.logits_index),
        ):
            buf = self._small.get(name)
            if buf is None or len(buf) != len(values):
                buf = self._small[name] = self._inputs.view(name, len(values))
            buf[:] = values
            binder.bind_input(name, buf)
        self_plan = plan.self_plan
        binder.bind_input("attention_bias", self_plan.bias_before_put)
        if self._t5_positions:
            binder.bind_input("past_position_ids", self_plan.cell_positions)
        if self_plan.n_kv != self._bound_n_kv:
            for layer in range(layers):
                view = cast(PoolView, self.cache.get(layer, "pool"))
                binder.bind_input(f"past_key.{layer}", view.keys)
                binder.bind_input(f"past_value.{layer}", view.values)
            self._bound_n_kv = self_plan.n_kv
        zero_copy = True
        for layer in range(layers):
            cross = cast(CrossView, self.cache.get_cross(layer))
            keys, values = cross.keys, cross.values
            if keys.dtype != np.float32:  # a float16 pool read zero-copy: the float32 graph needs a copy
                keys, values = keys.astype(np.float32), values.astype(np.float32)
            zero_copy = zero_copy and cross.zero_copy and keys is cross.keys
            binder.bind_input(f"cross_key.{layer}", keys)
            binder.bind_input(f"cross_value.{layer}", values)
            if layer == 0:
                binder.bind_input("cross_bias", cross.bias)
        if zero_copy:
            self.metrics.cross_zero_copy_steps += 1
        else:
            self.metrics.cross_staged_steps += 1
        count, rows = len(batch.tokens), len(batch.logits_index)
        if count != self._bound_tokens:
            out = self.outputs
            self._new_keys = [out.view(f"new_key.{i}", count) for i in range(layers)]
            self._new_values = [out.view(f"new_value.{i}", count) for i in range(layers)]
            for i in range(layers):
                binder.bind_output(f"new_key.{i}", self._new_keys[i])
                binder.bind_output(f"new_value.{i}", self._new_values[i])
            self._bound_tokens = count
        if rows != self._bound_rows:
            self._logits = self.outputs.view("logits", rows)
            binder.bind_output("logits", self._logits)
            self._bound_rows = rows


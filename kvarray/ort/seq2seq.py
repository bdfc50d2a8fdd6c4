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
request is removed from both caches at once.

`Seq2SeqEngine` is the Llama engine's request lifecycle (`kvarray.ort.core.EngineCore`: admission,
steps, sampling, streaming, cancel, metrics) over a `Seq2SeqRunner`, which adds what differs: the encoder
pass of admitted requests, the cross binding, and freeing encoder entries (the `Runner` hooks). Details:
docs/engine.md, "T5 and Whisper".
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from ..causal import CausalCache
from ..encdec import EncDecPlan, EncDecStats, EncoderDecoderCache
from ..encoder import EncoderCache
from ..errors import (
    ConfigError,
    DTypeMismatch,
    EmptyPrompt,
    GraphMismatch,
    NonFiniteValues,
    PromptTooLong,
    ShapeMismatch,
    UnsupportedModel,
)
from ..export import GraphInfo, read_metadata
from ..views import NEG_INF, CrossView
from .audio import log_mel, split_windows
from .core import EngineCore, EngineMetrics, check_tokens, read_context
from .engine import GraphKind, open_session
from .names import check_names, convention, match_convention
from .native import NativeStepRunner, row_mismatches, step_mismatches
from .runner import Runner
from .sampling import SamplingParams
from .scheduler import Batch, Request, TokenEvent

__all__ = ["ARCHITECTURES", "Seq2SeqConfig", "Seq2SeqEngine", "Seq2SeqMetrics", "Seq2SeqRunner"]

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
        prefill_chunk, max_batch_tokens, prompt_pass_tokens: as `EngineConfig` (decoder prompt tokens).
        max_encoder_batch: sequences per encoder pass at most (admitted requests are encoded in chunks).
        cross_dtype: storage of the cross K/V: "float32" is bound zero-copy into the float32 graphs;
            "float16" / "int8" halve / quarter the memory and are converted to float32 each step.
        threads, spin, kernel_threads, defrag_threshold: as `EngineConfig`.
    """

    capacity: int = 4096
    encoder_capacity: int | None = None
    max_sequences: int = 16
    prefill_chunk: int = 256
    max_batch_tokens: int = 512
    max_encoder_batch: int = 8
    cross_dtype: str = "float32"
    threads: int = 0
    spin: bool = True
    kernel_threads: int = 1
    defrag_threshold: float | None = 0.1
    prompt_pass_tokens: int = 128


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


def check_pair(encoder_info: GraphInfo, info: GraphInfo) -> str:
    """The architecture of an encoder / decoder-step pair; `UnsupportedModel` unless both are T5 or both
    Whisper, the decoder step a pool-view float32 graph."""
    arch = info.architecture
    if arch not in ARCHITECTURES or encoder_info.architecture != arch:
        raise UnsupportedModel(
            "the seq2seq engine runs t5 and whisper graphs; got encoder "
            f"{encoder_info.architecture!r} and decoder {arch!r}"
        )
    if info.view != "pool" or info.kv_dtype != "float32":
        raise UnsupportedModel(
            f"the seq2seq engine runs the pool-view float32 decoder step; got view {info.view!r}, "
            f"kv_dtype {info.kv_dtype!r}"
        )
    return arch


class EncoderSide(Runner):
    """The encoder half every seq2seq runner shares (native graphs here, Optimum exports in
    `kvarray.ort.optimum_seq2seq`): a request's encoder input, admission by encoder-cache room, the
    encoder pass of admitted requests, and freeing their encoder entries.

    Lifecycle (`Runner` hooks): a request's encoder input is kept from `keep_source` until it is encoded;
    `admit_limit` admits waiting requests while their cross rows fit side by side in the encoder cache's
    largest free extent; `on_admit` encodes the admitted requests in chunks of `max_encoder_batch` into
    the encoder cache (`_encode`, which a runner defines, hands every layer's cross K/V to `_store_cross`);
    `on_finish` frees a request's encoder entry (the engine has freed its decoder cells) and drops a
    source never encoded. A runner calls `_setup_encoder_side` in its constructor.
    """

    architecture: str
    encoder_session: ort.InferenceSession

    def _setup_encoder_side(self, architecture: str, config: Seq2SeqConfig, metrics: Seq2SeqMetrics) -> None:
        """Set the architecture's modality and rows per sequence, the encoder cache's rows and the queues."""
        self.architecture = architecture
        self.modality, self._rows_per_sequence = ARCHITECTURES[architecture]
        self.metrics = metrics
        self.encoder_rows = config.encoder_capacity or config.max_sequences * (self._rows_per_sequence or 512)
        self._max_encoder_batch = max(1, config.max_encoder_batch)
        self._cross_dtype = config.cross_dtype
        self._sources: dict[int, np.ndarray] = {}  # encoder input of requests not encoded yet
        self._encoded: set[int] = set()

    @property
    def n_mels(self) -> int | None:
        """Mel bins of Whisper's ``input_features`` (None for T5)."""
        ins = {i.name: i for i in self.encoder_session.get_inputs()}
        feat = ins.get("input_features")
        return None if feat is None else int(feat.shape[1])

    # ---- requests ----------------------------------------------------------------------------------
    def check_source(self, source: Any) -> np.ndarray:
        """A request's encoder input as the encoder graph takes it: T5 ``[M]`` int64 token ids, Whisper
        ``[n_mels, 3000]`` float32. Raises `ShapeMismatch`, `EmptyPrompt`, `UnknownToken`, `PromptTooLong`
        (more T5 tokens than the encoder cache's rows), `DTypeMismatch` (Whisper features that are not
        numbers), `NonFiniteValues` (Whisper features holding NaN or infinity)."""
        if self.architecture == "whisper":
            try:
                feats = np.asarray(source, np.float32)
            except (TypeError, ValueError) as exc:  # ragged nesting, strings, objects
                raise DTypeMismatch(
                    "Whisper input_features must be a float32 [n_mels, frames] array; NumPy cannot read the "
                    f"{type(source).__name__} given as one ({exc})"
                ) from None
            want = (self.n_mels, WHISPER_FRAMES)
            if feats.shape != want:
                raise ShapeMismatch(
                    f"Whisper input_features must be [n_mels, frames] = {list(want)} (30 s, padded: "
                    f"kvarray.ort.audio.log_mel); got {list(feats.shape)}"
                )
            if not np.isfinite(feats).all():
                raise NonFiniteValues("Whisper input_features hold NaN or infinity")
            return feats
        ids = check_tokens(source, self.vocab_size, "source token")
        if ids.size == 0:
            raise EmptyPrompt("a T5 request needs at least one source token")
        if ids.size > self.encoder_rows:
            raise PromptTooLong(int(ids.size), self.encoder_rows, "encoder cache")
        return ids

    def keep_source(self, request_id: int, source: np.ndarray) -> None:
        """Hold a queued request's checked encoder input until it is admitted and encoded."""
        self._sources[request_id] = source

    def admit_limit(self, cache: EncoderDecoderCache, waiting: Sequence[Request]) -> int:
        """How many of the `waiting` requests (in order) fit side by side in the encoder cache's largest
        free extent."""
        room = cache.encoder.stats().largest_free[self._cross_dtype]
        fits = 0
        for req in waiting:
            rows = self._source_rows(self._sources[req.id])
            if rows > room:
                break
            room -= rows
            fits += 1
        return fits

    def on_admit(self, cache: EncoderDecoderCache, requests: list[Request]) -> None:
        """Encode the admitted requests, `max_encoder_batch` per encoder pass."""
        step = self._max_encoder_batch
        for k in range(0, len(requests), step):
            self._encode(cache, requests[k : k + step])

    def on_finish(self, cache: EncoderDecoderCache, request: Request) -> None:
        """Free `request`'s encoder entry (or drop its source, if it was never encoded)."""
        self._sources.pop(request.id, None)
        if request.id in self._encoded:
            self._encoded.discard(request.id)
            cache.encoder.remove(request.id)

    # ---- the encoder pass --------------------------------------------------------------------------
    def _encode(self, cache: EncoderDecoderCache, reqs: list[Request]) -> None:
        """One encoder pass over `reqs` (their sources are ``self._sources[r.id]``), ending in
        `_store_cross`."""
        raise NotImplementedError

    def _store_cross(
        self, cache: EncoderDecoderCache, reqs: list[Request], cross: list[tuple[Any, Any]], seconds: float
    ) -> None:
        """Put an encoder pass's cross K/V into the encoder cache and count it.

        Args:
            reqs: the encoded requests, in order.
            cross: per layer ``(keys, values)`` ``[sum M, H, D]``, the requests' rows one after the other
                (``M`` rows each: `_source_rows`).
            seconds: time spent running the encoder (and, for Optimum, the decoder's first branch).
        """
        lengths = [self._source_rows(self._sources[r.id]) for r in reqs]
        total = int(cross[0][0].shape[0]) if cross else 0
        if sum(lengths) != total:
            raise GraphMismatch(f"the encoder emitted {total} cross rows for sequences of {lengths} rows")
        seq_ids = [r.id for r in reqs]
        for layer, (keys, values) in enumerate(cross):
            cache.put_cross_batch(seq_ids, layer, keys, values, lengths, self.modality)
        for req in reqs:
            self._encoded.add(req.id)
            del self._sources[req.id]
        m = self.metrics
        m.encoder_seconds += seconds
        m.encoder_passes += 1
        m.encoded_sequences += len(reqs)
        m.encoder_rows += total

    def _source_rows(self, source: np.ndarray) -> int:
        return self._rows_per_sequence or len(source)


class Seq2SeqRunner(EncoderSide, NativeStepRunner):
    """The engine's runner for a native T5 / Whisper pair: the encoder pass of newly admitted requests
    (`EncoderSide`), and the decoder step over an `EncoderDecoderCache` (the pool-view binding of
    `NativeStepRunner` plus the cross view, its bias and T5's cell positions).

    Args:
        encoder_session, session: the sessions of ``encoder.onnx`` and ``decoder_step.pool.float32.onnx``.
        encoder_info, info: their kvarray metadata.
        config: `Seq2SeqConfig` (max_sequences, encoder_capacity, max_encoder_batch, cross_dtype).
        metrics: the engine's `Seq2SeqMetrics` (the runner counts the encoder side and the cross view).

    Raises `UnsupportedModel` (not a T5 / Whisper pool-view float32 pair), `GraphMismatch` (names or
    shapes of the decoder graph against its spec, or an encoder that does not emit every layer's cross K/V).
    """

    kind = "native-seq2seq"

    def __init__(
        self,
        encoder_session: ort.InferenceSession,
        session: ort.InferenceSession,
        encoder_info: GraphInfo,
        info: GraphInfo,
        config: Seq2SeqConfig,
        metrics: Seq2SeqMetrics,
    ) -> None:
        arch = check_pair(encoder_info, info)
        self.encoder_session, self.session = encoder_session, session
        self.encoder_info, self.info = encoder_info, info
        self.spec = info.spec
        self.vocab_size = info.vocab_size
        self.kv_dtype = info.kv_dtype
        self.group_size = info.group_size
        self.tokens = dict(info.tokens)
        self._setup_encoder_side(arch, config, metrics)
        self._check_graphs()
        self._setup_binding(config.max_sequences)

    # ---- passes ------------------------------------------------------------------------------------
    def forward(self, cache: EncoderDecoderCache, plan: EncDecPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Bind the cross side, then the pool-view step (bind, run, `put`); see `Runner`."""
        self._bind_cross(cache, plan)
        return self._run_step(cache.causal, plan.self_plan, batch)

    def _encode(self, cache: EncoderDecoderCache, reqs: list[Request]) -> None:
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
        seconds = time.perf_counter() - run_start
        layers = range(self.spec.num_layers)
        cross = [(outputs[f"cross_key.{i}"], outputs[f"cross_value.{i}"]) for i in layers]
        self._store_cross(cache, reqs, cross, seconds)

    def _bind_cross(self, cache: EncoderDecoderCache, plan: EncDecPlan) -> None:
        """Bind T5's cell positions and every layer's cross view (zero-copy when the batch's entries are
        adjacent float32 rows; a staging buffer otherwise) with its bias; count the step as either."""
        binder = self.binder
        if self._t5_positions:
            binder.bind_input("past_position_ids", plan.self_plan.cell_positions)
        zero_copy = True
        for layer in range(self.spec.num_layers):
            cross = cast(CrossView, cache.get_cross(layer))
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

    # ---- checks ------------------------------------------------------------------------------------
    def _check_graphs(self) -> None:
        """Decoder names (native-seq2seq) and shapes against the spec; encoder outputs = the cross names."""
        layers = self.spec.num_layers
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        check_names(convention("native-seq2seq"), layers, list(ins), list(outs))
        self._cross_names = [f"cross_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
        enc_outs = {o.name: o for o in self.encoder_session.get_outputs()}
        wrong = [f"encoder output {n} missing" for n in self._cross_names if n not in enc_outs]
        wrong += step_mismatches(self.spec, self.vocab_size, ins, outs)
        cross = [ins[n] for n in self._cross_names]
        wrong += row_mismatches(self.spec, cross + [enc_outs[n] for n in self._cross_names if n in enc_outs])
        if wrong:
            raise GraphMismatch(f"the graphs do not match the cache spec {self.spec}: " + "; ".join(wrong))
        self._t5_positions = "past_position_ids" in ins


def _make_seq2seq_runner(
    encoder_session: ort.InferenceSession,
    session: ort.InferenceSession,
    encoder: Path,
    decoder: Path,
    config: Seq2SeqConfig,
    metrics: Seq2SeqMetrics,
) -> EncoderSide:
    """The runner of the decoder's names: native-seq2seq (kvarray metadata of both graphs) or an Optimum
    merged decoder (its folder's config). Raises `UnsupportedModel` for any other names."""
    match = match_convention([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    name = match.convention.name
    if name == "native-seq2seq":
        return Seq2SeqRunner(
            encoder_session, session, read_metadata(encoder), read_metadata(decoder), config, metrics
        )
    if name in ("optimum-seq2seq", "optimum-whisper"):
        from .optimum_seq2seq import OptimumSeq2SeqRunner  # it builds on this module's EncoderSide

        return OptimumSeq2SeqRunner(encoder_session, session, decoder.parent, config, metrics)
    raise UnsupportedModel(
        f"the seq2seq engine runs T5 / Whisper decoders (native-seq2seq or Optimum names); {decoder.name} "
        f"has the {name!r} names"
    )


class Seq2SeqEngine(EngineCore[EncoderDecoderCache]):
    """Generation over an encoder graph and a decoder graph of T5 or Whisper: the `EngineCore` lifecycle
    with an `EncoderSide` runner and an `EncoderDecoderCache`; a request is ``(source, prompt)``.

    The runner is chosen from the decoder's names: kvarray's native pair (``encoder.onnx``,
    ``decoder_step.pool.float32.onnx``: `Seq2SeqRunner`) or an Optimum export (``encoder_model.onnx``,
    ``decoder_model_merged.onnx``: `kvarray.ort.optimum_seq2seq.OptimumSeq2SeqRunner`).

    Args:
        encoder, decoder: paths of the two graphs.
        config: `Seq2SeqConfig`.
        context: decoder positions the model takes (Whisper's ``max_target_positions``); None: unbounded.
        eos_token_id: default stop token (None: the graph metadata's or export folder's eos, if any).
        decoder_start_token_id: the default decoder prompt (None: the metadata's or export folder's).
        tokenizer: optional, kept for callers (`cli_transcribe` prints text with it).
        providers: ONNX Runtime execution providers (default CPU).

    Raises `UnsupportedModel` (not a T5 / Whisper pair: native pool-view float32, or Optimum merged),
    `GraphMismatch` (names or shapes of the graphs against their spec, or an encoder that does not emit
    every layer's cross K/V), `ConfigError` (no decoder start token anywhere).
    """

    runner: EncoderSide
    metrics: Seq2SeqMetrics

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
        self.encoder_session = open_session(encoder, config.threads, providers, spin=config.spin)
        self.session = open_session(decoder, config.threads, providers, spin=config.spin)
        metrics = Seq2SeqMetrics()
        runner = _make_seq2seq_runner(
            self.encoder_session, self.session, Path(encoder), Path(decoder), config, metrics
        )
        start = runner.tokens.get("decoder_start_token_id")
        if decoder_start_token_id is not None:
            start = decoder_start_token_id
        if start is None:
            raise ConfigError(
                "no decoder_start_token_id in the graph metadata or export folder: pass "
                "decoder_start_token_id="
            )
        self.decoder_start_token_id = int(start)
        spec, sequences, defrag = runner.spec, config.max_sequences, config.defrag_threshold
        causal = CausalCache(spec, config.capacity, sequences, defrag_threshold=defrag, xp=np)
        storage = {runner.modality: config.cross_dtype}
        cross = EncoderCache(spec, runner.encoder_rows, sequences, storage, xp=np)
        super().__init__(
            runner,
            EncoderDecoderCache(causal, cross),
            config,
            prefix_sharing=False,  # two requests with the same decoder prompt have different sources
            context=context,
            eos_token_id=eos_token_id,
            tokenizer=tokenizer,
            metrics=metrics,
        )
        self.encoder_info: GraphInfo | None = getattr(runner, "encoder_info", None)
        self.architecture = runner.architecture
        self.modality = runner.modality

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        config: Seq2SeqConfig | None = None,
        graph: GraphKind | str = GraphKind.AUTO,
        **kwargs: Any,
    ) -> Seq2SeqEngine:
        """An engine over a model folder's graphs, with the context (Whisper's ``max_target_positions``) of
        ``MODEL_DIR/checkpoint/config.json`` (else ``optimum/config.json``).

        `graph` (`GraphKind`): "native" loads ``native/encoder.onnx`` and ``decoder_step.pool.float32.onnx``,
        "optimum" ``optimum/encoder_model.onnx`` and ``decoder_model_merged.onnx``, "auto" the native pair
        when the folder has it, else the Optimum one.

        Raises `UnsupportedModel` (no such graphs; the message says how to export them), `ModelFileError`
        (a config.json that is not a JSON object: cut short, not UTF-8, a list;
        `kvarray.export.read_config`; or whose ``max_target_positions`` is not a positive integer), and
        what the constructor raises.
        """
        folder = Path(model_dir)
        kind = GraphKind(graph)
        native = [folder / "native" / "encoder.onnx", folder / "native" / "decoder_step.pool.float32.onnx"]
        optimum = [
            folder / "optimum" / "encoder_model.onnx",
            folder / "optimum" / "decoder_model_merged.onnx",
        ]
        have_native = all(p.is_file() for p in native)
        use_optimum = kind is GraphKind.OPTIMUM or (
            kind is GraphKind.AUTO and not have_native and all(p.is_file() for p in optimum)
        )
        pair = optimum if use_optimum else native
        for path in pair:
            if not path.is_file():
                how = (
                    f"`optimum-cli export onnx --model {folder / 'checkpoint'} {path.parent}` (with past)"
                    if use_optimum
                    else f"`kvarray export --arch t5|whisper {folder / 'checkpoint'} {path.parent}`"
                )
                raise UnsupportedModel(f"{path} not found: export it with {how}")
        if "context" not in kwargs:
            for config_json in (folder / "checkpoint" / "config.json", folder / "optimum" / "config.json"):
                if config_json.is_file():
                    kwargs["context"] = read_context(config_json, "max_target_positions")
                    break
        return cls(pair[0], pair[1], config, **kwargs)

    @property
    def n_mels(self) -> int | None:
        """Mel bins of Whisper's ``input_features`` (None for T5)."""
        return self.runner.n_mels

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
        src = self.runner.check_source(source)
        ids = [self.decoder_start_token_id] if prompt is None else prompt
        keep = functools.partial(self.runner.keep_source, source=src)  # before the request can be admitted
        return self._queue(ids, params, on_token, "decoder prompt", keep).id

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
        return self._run_all(ids)

    def transcribe(
        self,
        samples: np.ndarray,
        prompt: Sequence[int] | None = None,
        params: SamplingParams | None = None,
    ) -> list[list[int]]:
        """Whisper over 16 kHz mono audio of any length: the 30 s windows of `split_windows`, one request
        each (their `log_mel` features, the same decoder `prompt`), all queued at once (continuous
        batching); the new tokens of each window, in window order. `join_windows` makes them one transcript
        (docs/engine.md, "Audio longer than 30 s").

        Args:
            samples: ``[n]`` float32 samples in [-1, 1] at 16 kHz (`kvarray.ort.audio.read_wav`).
            prompt: ``[P]`` decoder prompt ids of every window (default ``[decoder_start_token_id]``).
            params: `SamplingParams` of every window.

        Raises `UnsupportedModel` (a T5 engine), and what `add_request` raises.
        """
        if self.architecture != "whisper":
            raise UnsupportedModel(f"transcribe needs a Whisper model; this engine runs {self.architecture}")
        features = [log_mel(window, self.n_mels or 80) for window in split_windows(samples)]
        prompts = None if prompt is None else [list(prompt)] * len(features)
        return self.generate(features, prompts, params)

    def stats(self) -> EncDecStats:
        """Both caches' `EncDecStats` (self attention and cross)."""
        return self.cache.stats()

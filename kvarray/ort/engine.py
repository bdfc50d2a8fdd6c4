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
`EngineCore` (`kvarray.ort.core`, re-exported here), shared with the encoder-decoder `Seq2SeqEngine`
(`kvarray.ort.seq2seq`), whose runner also encodes the requests it admits and frees their cross entries
(the runner's lifecycle hooks). This module holds the decoder-only `Engine`, its `EngineConfig`, and the
loading of a model folder's graphs (`model_graphs`, `open_session`).

Details: docs/engine.md.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..causal import CacheStats, CausalCache
from ..errors import ConfigError, UnsupportedModel
from ..export import MissingModelFile, ModelFileError, read_metadata
from ..spec import KVSpec
from .core import EngineCore, EngineMetrics, EngineOptions, check_tokens, read_context
from .names import match_convention
from .native import NativeRunner, ViewSwitch
from .optimum import OptimumRunner, read_tokens
from .runner import Runner
from .sampling import SamplingParams
from .scheduler import TokenEvent
from .tokenizer import load_tokenizer

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineMetrics",
    "EngineOptions",
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
        max_batch_tokens: tokens per pass at most; with prompt passes kept apart from decode passes (view
            "auto"), also the prompt tokens fed between two decode passes.
        prompt_pass_tokens: tokens a pass of prompt chunks alone (no decode token) feeds at most. A
            pool-view pass scores each of its tokens against all the others, those of other requests
            included, so a long pass of several prompts wastes attention: 128 prefilled 16 prompts of
            128 tokens in 0.84 s, 512 in 0.97-1.16 s (docs/engine.md, "Prompt passes").
        kv_dtype: float32, float16 or int8 storage. A native graph takes its own storage dtype
            (`Engine.from_model_dir` loads the matching graph); under an Optimum graph the cache stores
            kv_dtype and the gathered view converts it to the graph's dtype.
        window, sinks: sliding window and attention sinks of the cache (None: no window).
        prefix_sharing: share the cells of a common prompt prefix with a running request (off with a window).
        threads: ONNX Runtime intra-op threads (0: its default).
        spin: ONNX Runtime's idle intra-op threads spin-wait for the next piece of work (its default)
            instead of sleeping. Spinning answers a few microseconds sooner on an idle machine but keeps
            the cores busy between passes, and on a loaded one it takes CPU from the engine's own Python
            and from other processes (docs/engine_benchmarks.md, "Spinning").
        kernel_threads: Numba threads of the cache's kernels during a step (`put`, defragmentation), the
            stepping thread's `kvarray.ops.cpu.swap_thread_limit` while the step runs; 1 by default (the
            serial kernels): a step's writes are small, and waking parallel workers costs more than the
            copy (measured: 16 rows of a 4-layer model, 0.1 ms with 1 thread, 4-20 ms with 2 on a busy
            machine). 0: no limit, Numba's own thread count.
        defrag_threshold: the cache's (None: never defragment). The engine lets the cache defragment only
            before a pass that reads the pool view (`Runner.reads_pool`): compaction shortens that view
            and nothing else, so decode-view and gathered-view passes skip it.
        view: `ViewChoice` of a native graph: "pool", "gathered" or "auto" (`Engine.from_model_dir` loads
            the graphs it needs; ignored for Optimum graphs, which always read the gathered view).
        gathered_min_sequences: with "auto", passes of one token per sequence and at least this many
            sequences run on the twin graph, the others on the pool graph (None: the twin's measured
            crossover, `kvarray.ort.native.TWIN_MIN_SEQUENCES`: 1 for the decode view, 8 for the gathered
            view; docs/engine_benchmarks.md).
        decode_burst: decode passes one `step` may make back to back (1: one pass a step). After a decode
            pass of every running request over the decode view's mirror, up to ``decode_burst - 1`` more
            run without scheduling or planning each (`Runner.decode_again`): the same tokens, fewer
            Python calls per pass. A burst ends early when a request finishes, arrives or is cancelled,
            so admission waits at most for the passes under way; its tokens reach ``on_token`` and
            `stream` when the step ends (docs/engine.md, "Decode bursts").
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
    spin: bool = True
    kernel_threads: int = 1
    defrag_threshold: float | None = 0.1
    view: ViewChoice = ViewChoice.AUTO
    gathered_min_sequences: int | None = None
    prompt_pass_tokens: int = 128
    decode_burst: int = 1


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
    and Whisper), `ConfigError` (a view the graphs do not provide, a decode-view `graph` without its
    pool-view graph, a storage the graph cannot read).
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
        self.session = open_session(graph, config.threads, providers, spin=config.spin)
        self.twin_session = None
        twin = None
        if twin_graph is not None:
            self.twin_session = open_session(twin_graph, config.threads, providers, spin=config.spin)
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
            decode_burst=config.decode_burst,
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
        Optimum export.

        Raises `UnsupportedModel` (no such graph; the message says how to export it), `ModelFileError`
        (a ``checkpoint/config.json`` that is not a JSON object: cut short, not UTF-8, a list;
        `kvarray.export.read_config`; or whose ``max_position_embeddings`` is not a positive integer),
        `TokenizerError` (a ``checkpoint/tokenizer.json`` that cannot be
        read), and what the constructor raises.
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
            context = read_context(checkpoint / "config.json", "max_position_embeddings")
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


def open_session(
    graph: str | Path, threads: int, providers: Sequence[str], *, spin: bool = True
) -> ort.InferenceSession:
    """A sequential session over `graph` with `threads` intra-op threads (0: ONNX Runtime's default) that
    spin-wait between pieces of work (`spin`, ONNX Runtime's default) or sleep.

    Raises `ConfigError` (threads not an int >= 0, spin not a bool), `MissingModelFile` (no such file),
    `ModelFileError` (a file ONNX Runtime cannot load: empty, truncated, not an ONNX protobuf, missing
    external weights; ONNX Runtime's own message is quoted and chained).
    """
    if not isinstance(threads, numbers.Integral) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"threads must be an int >= 0 (0: ONNX Runtime's default), got {threads!r}")
    if not isinstance(spin, bool):
        raise ConfigError(f"spin must be True or False, got {spin!r}")
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
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
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
    if name == "native-decode":
        raise ConfigError(
            f"{graph.name} is a decode-view graph (one token per sequence: it cannot run prompts); pass it "
            f"as the twin_graph of the model's pool-view graph, with view 'auto'"
        )
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

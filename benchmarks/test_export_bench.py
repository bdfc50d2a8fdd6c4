"""Native-graph targets (issue 5) on the bench Llama: export time, graph size, decode-step latency.

The bench Llama (models/build.py ``--bench``: hidden 512, 8 layers, 8 heads over 2 kv heads of 64,
vocab 32000) lives in models/bench-llama/ (git-ignored); it is built on demand, which needs the
`reference` extra (torch, transformers, optimum-onnx). Figures: docs/export.md, "Benchmarks".

- ``test_export``: ``kvarray.export.export`` time (best of 2) for pool float32, pool int8 and gathered
  float32, and Optimum's ``optimum-cli export onnx`` of the same checkpoint (one round); graph bytes and
  node count before and after ONNX Runtime's optimizations (ORT_ENABLE_ALL).
- ``test_decode_step``: one decode step of B sequences (1, 4, 16) with 128 cached tokens each (seeded
  random past, the same for every graph), ``session.run_with_iobinding`` only: inputs and outputs are bound
  once to NumPy buffers (zero-copy OrtValues), so no Python copy is timed. Native graphs are timed
  interleaved with Optimum's (one Optimum step before each native step, in the benchmark's setup), so the
  ratio native / Optimum compares medians measured in the same minutes of the same run. Every session
  has ``intra_op_num_threads = 2`` and idle threads that sleep rather than spin (two sessions take turns).
  The pool view holds sequence s in cells ``[128 s, 128 (s + 1))`` (n_kv = 128 B); the gathered view's
  staging buffer is filled by ``kvarray.ops.gather_rows``, whose time over all layers is reported apart
  (``gather_ms``, not in ms/step). Before timing, the float32 graphs' logits must match Optimum's.

    python -m pytest benchmarks/test_export_bench.py --benchmark-enable
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kvarray import ops
from kvarray.export import GraphInfo, export, read_metadata
from kvarray.ops.reference import quantize_int8

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "models" / "bench-llama"
THREADS = 2
PAST = 128  # cached tokens per sequence before the measured step
SEED = 5
#: rounds of the timed step per batch size (each native round also runs one Optimum step)
ROUNDS = {1: 100, 4: 60, 16: 40}
WARMUP = 3
GATHER_ROUNDS = 9
#: benchmark id -> (kv_dtype, view) of the native graphs
NATIVE = {
    "pool-float32": ("float32", "pool"),
    "pool-int8": ("int8", "pool"),
    "gathered-float32": ("float32", "gathered"),
}
OPTIMUM = "optimum"
#: logits of a float32 native graph and of Optimum's graph on the same past must agree this closely
LOGITS_ATOL = 1e-3
REFERENCE_MODULES = ("torch", "transformers", "optimum.exporters.onnx")

_ROWS: list[tuple[str, str]] = []


def load_build() -> ModuleType:
    """models/build.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("kvarray_models_build", ROOT / "models" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_reference() -> list[str]:
    """The modules of the `reference` extra that are not importable here (empty when it is installed)."""
    missing = []
    for name in REFERENCE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def skip_without_reference(what: str) -> None:
    """Skip, saying why, when `what` (a part of models/bench-llama) cannot be built here."""
    missing = missing_reference()
    if missing:
        reason = (
            f"{what} is missing and building it needs the `reference` extra "
            f"(pip install -e '.[reference]'); not importable: {', '.join(missing)}"
        )
        print(f"skipping: {reason}")
        pytest.skip(reason)


def graph_path(kv_dtype: str, view: str, folder: Path = BENCH / "native") -> Path:
    return folder / f"decoder_step.{view}.{kv_dtype}.onnx"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    return load_build()


@pytest.fixture(scope="module")
def checkpoint(build: ModuleType) -> Path:
    """models/bench-llama/checkpoint, built (with the native and Optimum exports) when missing."""
    folder = BENCH / "checkpoint"
    if not (folder / "config.json").exists():
        skip_without_reference("models/bench-llama")
        print("building models/bench-llama (checkpoint, native graphs, Optimum export)")
        build.build_bench(True)
    return folder


@pytest.fixture(scope="module")
def graphs(build: ModuleType, checkpoint: Path) -> dict[str, Path]:
    """Benchmark id -> graph file: the native graphs and Optimum's, exported when missing."""
    missing = [(dt, view) for dt, view in NATIVE.values() if not graph_path(dt, view).exists()]
    if missing:
        build.native_exports(BENCH, [("native", dt, view) for dt, view in missing])
    optimum = BENCH / "optimum" / "model.onnx"
    if not optimum.exists():
        skip_without_reference("models/bench-llama/optimum")
        start = time.perf_counter()
        build.optimum_export(BENCH)
        print(f"optimum export of models/bench-llama: {time.perf_counter() - start:.1f} s")
    return {name: graph_path(dt, view) for name, (dt, view) in NATIVE.items()} | {OPTIMUM: optimum}


@pytest.fixture(scope="module", autouse=True)
def summary(print_table: Callable[[str, list[tuple[str, str]], int], None]) -> Iterator[None]:
    """Print the module's figures as one table when it is done (also in each benchmark's extra_info)."""
    yield
    title = f"bench-llama: export and decode step (ORT {ort.__version__}, {THREADS} threads)"
    print_table(title, _ROWS, 36)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def session_options(optimized: Path | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # idle pool threads sleep instead of spinning: the sessions are timed in turn, and one session's
    # spinning threads would otherwise take the cores from the next one
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return opts


def node_counts(path: Path, scratch: Path) -> tuple[int, int]:
    """Nodes of the graph file and of ONNX Runtime's optimized graph (ORT_ENABLE_ALL, CPU)."""
    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    scratch.mkdir()
    optimized = scratch / "optimized.onnx"
    ort.InferenceSession(str(path), session_options(optimized), providers=["CPUExecutionProvider"])
    after = len(onnx.load(str(optimized), load_external_data=False).graph.node)
    shutil.rmtree(scratch)
    return before, after


def graph_bytes(folder: Path) -> int:
    """Bytes of the graph files in `folder` (the .onnx and any external-data side file)."""
    return sum(f.stat().st_size for f in folder.iterdir() if ".onnx" in f.name)


@pytest.mark.parametrize("variant", [*NATIVE, OPTIMUM])
def test_export(benchmark: Any, build: ModuleType, checkpoint: Path, tmp_path: Path, variant: str) -> None:
    """Export time (s), graph bytes and node counts before / after ORT's optimizations."""
    load = load_average()
    if variant == OPTIMUM:
        skip_without_reference("an Optimum export")
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "checkpoint").symlink_to(checkpoint, target_is_directory=True)
        benchmark.pedantic(lambda: build.optimum_export(folder), rounds=1, iterations=1)
        out, path = folder / "optimum", folder / "optimum" / "model.onnx"
    else:
        kv_dtype, view = NATIVE[variant]
        out = tmp_path / "native"
        benchmark.pedantic(
            lambda: export("llama", checkpoint, out, kv_dtype=kv_dtype, view=view), rounds=2, iterations=1
        )
        path = graph_path(kv_dtype, view, out)
    size = graph_bytes(out)
    before, after = node_counts(path, tmp_path / "optimized")
    shutil.rmtree(out)  # 211 MiB a graph: pytest keeps its last temporary folders
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        export_s=round(seconds, 2),
        bytes=size,
        mib=round(size / 2**20, 1),
        nodes=before,
        nodes_optimized=after,
        load_1min=[load, load_average()],
    )
    _ROWS.append(
        (
            f"export[{variant}]",
            f"{seconds:6.2f} s  {size / 2**20:6.1f} MiB  nodes {before} -> {after} optimized",
        )
    )


@dataclass
class Step:
    """One decode step bound once: `run` executes it; `logits [B, vocab]` is where it writes its logits."""

    session: ort.InferenceSession
    binding: ort.IOBinding
    logits: np.ndarray
    buffers: list[np.ndarray] = field(default_factory=list)  # keeps every bound buffer alive

    def bind_input(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)  # a no-op for every buffer here: OrtValue then wraps it
        self.buffers.append(array)
        value = ort.OrtValue.ortvalue_from_numpy(array)
        assert value.data_ptr() == array.ctypes.data, f"{name} was copied"
        self.binding.bind_ortvalue_input(name, value)

    def bind_output(self, name: str, array: np.ndarray) -> None:
        self.buffers.append(array)
        self.binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


@dataclass(frozen=True)
class Past:
    """The batch: `tokens [B]` at position PAST, each sequence's cached `keys` / `values` per layer, every
    one ``[B, KV, PAST, D]`` float32 (keys after RoPE, as both graph families cache them)."""

    tokens: np.ndarray
    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])


def make_past(info: GraphInfo, batch: int) -> Past:
    spec = info.spec
    rng = np.random.default_rng(SEED + batch)
    shape = (batch, spec.num_kv_heads, PAST, spec.head_dim)
    keys = [rng.standard_normal(shape, dtype=np.float32) for _ in range(spec.num_layers)]
    values = [rng.standard_normal(shape, dtype=np.float32) for _ in range(spec.num_layers)]
    return Past(rng.integers(0, info.vocab_size, batch, dtype=np.int64), keys, values)


def new_block_bias(batch: int) -> np.ndarray:
    """``[B, B]``: each decode token sees itself only (one token per sequence)."""
    return np.where(np.eye(batch, dtype=bool), 0, -np.inf).astype(np.float32)


def to_pool(rows: np.ndarray, kv_dtype: str, capacity: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``[B, KV, PAST, D]`` -> a pool ``[capacity, KV, D]`` holding sequence s in cells
    ``[s * PAST, (s + 1) * PAST)`` (contiguous, as after prefill or defrag), int8 with float16 scales."""
    batch, heads, past, dim = rows.shape
    cells = rows.transpose(0, 2, 1, 3).reshape(batch * past, heads, dim)
    pool = np.zeros((capacity, heads, dim), np.float32)
    pool[: batch * past] = cells
    if kv_dtype != "int8":
        return pool, None
    q = np.zeros(pool.shape, np.int8)
    scales = np.ones((capacity, heads * dim // 32), np.float16)
    quantize_int8(pool, q, scales)
    return q, scales


def native_step(session: ort.InferenceSession, info: GraphInfo, past: Past) -> tuple[Step, float | None]:
    """The native graph's decode step, bound once; also the ms of the gather copy for a gathered view."""
    batch, spec = past.batch, info.spec
    step = Step(session, session.io_binding(), np.empty((batch, info.vocab_size), np.float32))
    step.bind_input("input_ids", past.tokens)
    step.bind_input("position_ids", np.full(batch, PAST, np.int64))
    step.bind_input("logits_index", np.arange(batch, dtype=np.int64))
    n_kv = batch * PAST  # a multiple of 32: the pool view is exactly the used cells
    capacity = n_kv + batch  # room for this pass's rows, written after the step
    copies: list[tuple[np.ndarray, np.ndarray]] = []  # (pool, staging) of every layer's K and V
    if info.view == "pool":
        own = np.repeat(np.arange(batch), PAST)  # the sequence of each pool cell
        past_bias = np.where(own[None, :] == np.arange(batch)[:, None], 0, -np.inf).astype(np.float32)
        for i in range(spec.num_layers):
            for name, rows in (("past_key", past.keys[i]), ("past_value", past.values[i])):
                pool, scales = to_pool(rows, info.kv_dtype, capacity)
                step.bind_input(f"{name}.{i}", pool[:n_kv])  # a contiguous view of the pool: zero-copy
                if scales is not None:
                    step.bind_input(f"{name}_scale.{i}", scales[:n_kv])
    else:
        past_bias = np.zeros((batch, PAST), np.float32)
        step.bind_input("token_sequence", np.arange(batch, dtype=np.int64))
        for i in range(spec.num_layers):
            for name, rows in (("past_key", past.keys[i]), ("past_value", past.values[i])):
                copies.append((to_pool(rows, "float32", capacity)[0], np.empty_like(rows)))
                step.bind_input(f"{name}.{i}", copies[-1][1])
    step.bind_input("attention_bias", np.concatenate([past_bias, new_block_bias(batch)], axis=1))
    step.bind_output("logits", step.logits)
    for i in range(spec.num_layers):
        for name in ("new_key", "new_value"):
            step.bind_output(f"{name}.{i}", np.empty((batch, spec.num_kv_heads, spec.head_dim), np.float32))
    if not copies:
        return step, None
    indptr = np.arange(batch + 1, dtype=np.int32) * PAST
    indices = np.arange(n_kv, dtype=np.int32)

    def gather_all() -> None:
        for pool, staging in copies:
            ops.gather_rows(pool, indptr, indices, staging)

    gather_all()  # compiles the kernel (first use in the process) and fills the staging buffers
    times: list[float] = []
    for _ in range(GATHER_ROUNDS):
        timed(gather_all, times)
    return step, statistics.median(times) * 1e3


def optimum_step(session: ort.InferenceSession, info: GraphInfo, past: Past) -> Step:
    """Optimum's decode step (``text-generation-with-past``), its usual inputs bound once."""
    batch, spec = past.batch, info.spec
    logits = np.empty((batch, 1, info.vocab_size), np.float32)
    step = Step(session, session.io_binding(), logits[:, 0])
    step.bind_input("input_ids", past.tokens[:, None])
    step.bind_input("attention_mask", np.ones((batch, PAST + 1), np.int64))
    step.bind_input("position_ids", np.full((batch, 1), PAST, np.int64))
    present = (batch, spec.num_kv_heads, PAST + 1, spec.head_dim)
    for i in range(spec.num_layers):
        step.bind_input(f"past_key_values.{i}.key", past.keys[i])
        step.bind_input(f"past_key_values.{i}.value", past.values[i])
        step.bind_output(f"present.{i}.key", np.empty(present, np.float32))
        step.bind_output(f"present.{i}.value", np.empty(present, np.float32))
    step.bind_output("logits", logits)
    return step


@dataclass(frozen=True)
class Graph:
    session: ort.InferenceSession
    info: GraphInfo


@pytest.fixture(scope="module")
def sessions(graphs: dict[str, Path]) -> Callable[[str], Graph]:
    """Benchmark id -> its ORT session (CPU, THREADS intra-op threads) and metadata, made on first use."""
    made: dict[str, Graph] = {}

    def get(name: str) -> Graph:
        if name not in made:
            path = graphs[name]
            opts, cpu = session_options(), ["CPUExecutionProvider"]
            info = read_metadata(graphs["pool-float32" if name == OPTIMUM else name])
            made[name] = Graph(ort.InferenceSession(str(path), opts, providers=cpu), info)
        return made[name]

    return get


def timed(call: Callable[[], None], into: list[float]) -> None:
    start = time.perf_counter()
    call()
    into.append(time.perf_counter() - start)


@pytest.mark.parametrize("graph", [OPTIMUM, *NATIVE])
@pytest.mark.parametrize("batch", sorted(ROUNDS))
def test_decode_step(
    benchmark: Any,
    sessions: Callable[[str], Graph],
    batch: int,
    graph: str,
) -> None:
    """ms per decode step of `batch` sequences with PAST cached tokens each; native / Optimum ratio."""
    load = load_average()
    reference_graph = sessions(OPTIMUM)  # Optimum's graph has no kvarray metadata: pool-float32's spec
    past = make_past(reference_graph.info, batch)
    optimum = optimum_step(reference_graph.session, reference_graph.info, past)
    rounds = ROUNDS[batch]
    extra: dict[str, Any] = dict(sequences=batch, past_tokens=PAST, threads=THREADS, rounds=rounds)
    if graph == OPTIMUM:
        for _ in range(WARMUP):
            optimum.run()
        benchmark.pedantic(optimum.run, rounds=rounds, iterations=1)
        reference: list[float] = []
    else:
        kv_dtype, _ = NATIVE[graph]
        native = sessions(graph)
        step, gather_ms = native_step(native.session, native.info, past)
        optimum.run()
        step.run()
        difference = float(np.abs(step.logits - optimum.logits).max())
        extra["max_abs_logits_difference"] = float(f"{difference:.2e}")
        if kv_dtype == "float32":  # same weights, same past: the comparison is of the same computation
            assert difference < LOGITS_ATOL, (
                f"{graph} and Optimum disagree: max |logits difference| {difference}"
            )
        if gather_ms is not None:
            extra["gather_ms"] = round(gather_ms, 3)  # gather_rows of every layer's K and V, not in ms/step
        for _ in range(WARMUP):
            optimum.run()
            step.run()
        reference = []
        benchmark.pedantic(step.run, setup=lambda: timed(optimum.run, reference), rounds=rounds, iterations=1)
    if benchmark.disabled:
        return
    ms = benchmark.stats.stats.median * 1e3
    extra.update(ms_per_step=round(ms, 3), min_ms=round(benchmark.stats.stats.min * 1e3, 3))
    line = f"B={batch:2}  {ms:7.2f} ms/step (median)"
    if reference:
        optimum_ms = statistics.median(reference) * 1e3
        extra.update(
            optimum_ms_per_step=round(optimum_ms, 3),
            optimum_min_ms=round(min(reference) * 1e3, 3),
            ratio_to_optimum=round(ms / optimum_ms, 3),
            ratio_to_optimum_of_minima=round(benchmark.stats.stats.min / min(reference), 3),
        )
        line += f"  Optimum {optimum_ms:7.2f} ms  ratio {ms / optimum_ms:5.2f}"
        if "gather_ms" in extra:
            line += f"  (+ gather {extra['gather_ms']:.2f} ms)"
    extra["load_1min"] = [load, load_average()]
    benchmark.extra_info.update(extra)
    _ROWS.append((f"decode[{graph}]", line))

"""Engine targets (issue 6) on the bench Llama: kvarray's engine against onnxruntime-genai, Optimum's ORT
model and transformers, same checkpoint, same prompts, one run. Figures: docs/engine_benchmarks.md.

- ``test_equal_batch[B]``: B = 1, 4, 16 prompts of 128 byte tokens (seeded), 128 new tokens, greedy, no stop
  token; tokens/s = B * 128 / the whole call's seconds (prefill included), median of `REPEATS`. Rounds are
  interleaved: each kvarray round is preceded (benchmark setup) by one round of every peer, so the
  ratios kvarray / peer compare medians from the same minutes. kvarray: ``Engine.from_model_dir`` on the
  native graphs with ``EngineConfig(threads=2, decode_burst=8)`` and the default view "auto" (passes of
  one token per sequence on the decode-view graph, up to 8 a step in decode bursts, the others on the
  pool-view graph; the passes each view ran are reported); "kvarray-pool" is the same engine on the
  pool-view graph alone (no bursts: they need the decode view), run as one more peer. Its per-step Python
  overhead (everything outside ``session.run``, from ``Engine.metrics``) is reported for all steps and
  for decode-only steps, and the median time of a decode pass (a step's time over its passes).
  Greedy agreement: per sequence, the common prefix of each peer's tokens with kvarray's.
- ``test_serving``: the serving workload of benchmarks/peers/workload.py (64 requests, prompts 16-512 and
  outputs 16-256 tokens uniform, Poisson arrivals at 4 requests/s, seed 6), in real time: kvarray's
  continuous batching (16 running at most; also "kvarray-pool"), Optimum and transformers as static
  batches of 16 in arrival
  order (a batch starts when its last request has arrived and the previous batch is done), and
  onnxruntime-genai through its own ``og.Engine`` scheduler. Time to finish all (from the first
  arrival), time to first token (median, p90) and request latency.

Peers: transformers and Optimum run in this process (the `reference` extra); onnxruntime-genai needs
transformers 5 for its model builder and runs in its own venv (benchmarks/peers/setup_genai.sh, made on
first use at ``.venv-genai``, or ``KVARRAY_GENAI_VENV``) as a subprocess (benchmarks/peers/run_genai.py).
A peer that cannot be set up or run is recorded with the reason (a row in the table and
``extra_info["unavailable"]``), never dropped. Every peer has 2 intra-op threads.

    python -m pytest benchmarks/test_engine_bench.py --benchmark-enable \
        --benchmark-json=engine-bench.json -p no:randomly -s

``KVARRAY_BENCH_QUICK=1``: 1 repeat and a serving workload of 32 requests (prompts 16-256, outputs
16-128); ``KVARRAY_BENCH_REPEATS=N`` sets the repeats.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "models" / "bench-llama"
PEERS = Path(__file__).resolve().parent / "peers"
THREADS = 2
QUICK = os.environ.get("KVARRAY_BENCH_QUICK", "") not in ("", "0")
REPEATS = int(os.environ.get("KVARRAY_BENCH_REPEATS", "1" if QUICK else "3"))
STATIC_BATCH = 16
MAX_SEQUENCES = 16
DECODE_BURST = 8  # kvarray ("auto" view): decode passes a step may make (EngineConfig.decode_burst)

_ROWS: list[tuple[str, str]] = []


def _load(name: str) -> ModuleType:
    """A module of benchmarks/peers (importable by the genai runner from its own venv as well)."""
    if str(PEERS) not in sys.path:
        sys.path.insert(0, str(PEERS))  # peers/hf.py imports `workload` as the runner does
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PEERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


workload = _load("workload")


def serving_spec() -> Any:
    if QUICK:
        return workload.ServingSpec(requests=32, prompt=(16, 256), output=(16, 128))
    return workload.ServingSpec()


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


class Peer(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]: ...


# ---- kvarray -----------------------------------------------------------------------------------------
@dataclass
class StepTimes:
    """Per-step seconds inside `Engine.step` and inside ``session.run``, the passes the step made (several in
    a decode burst), and whether the step prefilled."""

    step: list[float] = field(default_factory=list)
    run: list[float] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    prefill: list[bool] = field(default_factory=list)

    def decode_pass_ms(self) -> float:
        """Median over the decode steps of the step time per pass, in ms."""
        steps = zip(self.step, self.passes, self.prefill, strict=True)
        per_pass = [seconds / n for seconds, n, prefill in steps if n and not prefill]
        return round(statistics.median(per_pass) * 1e3, 2)

    def overhead(self, decode_only: bool = False) -> float:
        keep = [i for i in range(len(self.step)) if not (decode_only and self.prefill[i])]
        total = sum(self.step[i] for i in keep)
        return 0.0 if total == 0 else 1.0 - sum(self.run[i] for i in keep) / total


class KvarrayPeer:
    """kvarray's engine on the bench Llama's native graphs; `view`: "auto" (pool and gathered graphs, the
    view picked per pass) or "pool"."""

    def __init__(self, view: str = "auto") -> None:
        from kvarray.ort import Engine, EngineConfig, SamplingParams

        self.name = "kvarray" if view == "auto" else f"kvarray-{view}"
        self.params = SamplingParams
        self.config = EngineConfig(
            capacity=MAX_SEQUENCES * 768,
            max_sequences=MAX_SEQUENCES,
            threads=THREADS,
            prefix_sharing=True,
            view=view,  # type: ignore[arg-type]
            decode_burst=DECODE_BURST if view == "auto" else 1,
        )
        self.engine = Engine.from_model_dir(BENCH, self.config, graph="native")
        self.steps = StepTimes()

    def passes_by_view(self) -> dict[str, int]:
        """Passes run on each view since the engine was made (one view unless "auto")."""
        from kvarray.ort.native import ViewSwitch

        runner = self.engine.runner
        if isinstance(runner, ViewSwitch):
            return {view.value: count for view, count in runner.passes.items()}
        return {runner.view.value: self.engine.metrics.steps}

    def greedy(self, new: int) -> Any:
        return self.params(max_new_tokens=new, stop_tokens=())  # the bench Llama has no eos: none here

    def _step(self) -> list[Any]:
        m = self.engine.metrics
        step, run, prefill, passes = m.step_seconds, m.run_seconds, m.prefill_tokens, m.steps
        events = self.engine.step()
        self.steps.step.append(m.step_seconds - step)
        self.steps.run.append(m.run_seconds - run)
        self.steps.passes.append(m.steps - passes)
        self.steps.prefill.append(m.prefill_tokens > prefill)
        return events

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
        self.steps = StepTimes()
        start = time.perf_counter()
        ids = [self.engine.add_request(p, self.greedy(new)) for p in prompts]
        first = 0.0
        while self.engine.has_work:
            events = self._step()
            if events and not first:
                first = time.perf_counter() - start
        return [self.engine.pop(i).output for i in ids], first

    def serve(self, arrivals: list[Any]) -> dict[str, Any]:
        """The serving workload in real time through continuous batching."""
        engine, n = self.engine, len(arrivals)
        self.steps = StepTimes()
        outputs: list[list[int]] = [[] for _ in arrivals]
        first, finish = [0.0] * n, [0.0] * n
        index: dict[int, int] = {}
        start = time.perf_counter()
        done = nxt = 0
        while done < n:
            now = time.perf_counter() - start
            while nxt < n and arrivals[nxt].at <= now:
                a = arrivals[nxt]
                index[engine.add_request(a.prompt, self.greedy(a.max_new_tokens))] = nxt
                nxt += 1
            if not engine.has_work:
                time.sleep(max(0.0, arrivals[nxt].at - (time.perf_counter() - start)))
                continue
            events = self._step()
            t = time.perf_counter() - start
            for event in events:
                k = index[event.request.id]
                if not outputs[k]:
                    first[k] = t - arrivals[k].at
                outputs[k].append(int(event.token))
                if event.finished:
                    finish[k] = t - arrivals[k].at
                    engine.pop(event.request.id)
                    done += 1
        total = time.perf_counter() - start
        m = engine.metrics
        return workload.summarize(
            arrivals, total, first, finish, outputs, steps=len(self.steps.step), peak_cells=m.peak_cells,
            overhead_share=round(self.steps.overhead(), 4),
        )  # fmt: skip


# ---- onnxruntime-genai (subprocess) ------------------------------------------------------------------
class GenaiPeer:
    """Client of benchmarks/peers/run_genai.py in the genai venv (JSON lines over stdin / stdout)."""

    name = "genai"

    def __init__(self, python: Path) -> None:
        command = [str(python), str(PEERS / "run_genai.py"), str(BENCH), "--threads", str(THREADS)]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"genai runner did not start: {self.info}")

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"genai runner exited (code {self.process.wait()})")
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"genai runner: {reply['error']}")
        return reply

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
        reply = self.ask(dict(op="generate", prompts=prompts, new=new))
        self.seconds = float(reply["seconds"])  # the runner's own timing (no pipe traffic)
        return reply["outputs"], float(reply["ttft_s"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def genai_python() -> Path:
    """The genai venv's python, made with benchmarks/peers/setup_genai.sh when missing."""
    venv = Path(os.environ.get("KVARRAY_GENAI_VENV", ROOT / ".venv-genai"))
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import onnxruntime_genai, onnx_ir, transformers"]
    if not python.is_file() or subprocess.run(probe, capture_output=True).returncode != 0:
        setup = subprocess.run(
            ["bash", str(PEERS / "setup_genai.sh"), str(venv)], capture_output=True, text=True, timeout=900
        )
        if setup.returncode != 0:
            raise RuntimeError(f"setup_genai.sh failed: {setup.stderr.strip().splitlines()[-1:]}")
    return python


# ---- fixtures ----------------------------------------------------------------------------------------
@dataclass
class Peers:
    kvarray: KvarrayPeer
    others: dict[str, Peer]
    unavailable: dict[str, str]
    versions: dict[str, str]


def twin_graphs() -> None:
    """The bench Llama's decode- and gathered-view graphs ("auto"'s twins), exported by kvarray when the
    folder lacks them (seconds each)."""
    for view in ("decode", "gathered"):
        if not (BENCH / "native" / f"decoder_step.{view}.float32.onnx").is_file():
            from kvarray.export import export

            export("llama", BENCH / "checkpoint", BENCH / "native", kv_dtype="float32", view=view)


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    if not (BENCH / "native" / "decoder_step.pool.float32.onnx").is_file():
        pytest.skip("models/bench-llama is missing: python models/build.py --bench")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    twin_graphs()
    kv = KvarrayPeer()
    pool = KvarrayPeer("pool")
    others: dict[str, Peer] = {pool.name: pool}
    unavailable: dict[str, str] = {}
    versions = {"onnxruntime": ort.__version__, "numpy": np.__version__}
    try:
        python = genai_python()
        genai = GenaiPeer(python)
        others["genai"] = genai
        versions["onnxruntime-genai"] = str(genai.info.get("version"))
    except Exception as error:  # a peer that cannot run is reported, not dropped
        unavailable["genai"] = f"{type(error).__name__}: {error}"
    try:
        hf = _load("hf")
        versions.update(hf.versions())
        others["optimum"] = hf.OptimumPeer(BENCH / "optimum", THREADS)
        others["transformers"] = hf.TransformersPeer(BENCH / "checkpoint", THREADS)
    except Exception as error:
        for name in ("optimum", "transformers"):
            if name not in others:
                unavailable[name] = f"{type(error).__name__}: {error}"
    for name, reason in unavailable.items():
        _ROWS.append((f"unavailable[{name}]", reason))
    yield Peers(kv, others, unavailable, versions)
    for peer in others.values():
        if isinstance(peer, GenaiPeer):
            peer.close()
        elif isinstance(peer, KvarrayPeer):
            peer.engine.close()
    kv.engine.close()


@pytest.fixture(scope="module", autouse=True)
def summary(print_table: Callable[[str, list[tuple[str, str]], int], None]) -> Iterator[None]:
    """Print the module's figures as one table when it is done (also in each benchmark's extra_info)."""
    yield
    print_table(f"bench-llama engine: kvarray against its peers ({THREADS} threads each)", _ROWS, 24)


def timed_generate(peer: Peer, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outputs, _ = peer.generate(prompts, new)
    seconds = time.perf_counter() - start
    if isinstance(peer, GenaiPeer):
        seconds = peer.seconds
    return outputs, seconds


# ---- equal-length batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch", workload.SIZES)
def test_equal_batch(benchmark: Any, peers: Peers, batch: int) -> None:
    """tok/s (prefill included) at `batch` sequences of 128 + 128 tokens; ratios kvarray / peer."""
    load = load_average()
    prompts = workload.equal_prompts(batch)
    new = workload.NEW_TOKENS
    live = dict(peers.others)
    failed: dict[str, str] = {}
    for name, peer in [("kvarray", peers.kvarray), *live.items()]:  # warm-up: sessions, allocations
        try:
            peer.generate(prompts, 4)
        except Exception as error:
            failed[name] = f"{type(error).__name__}: {error}"
            live.pop(name, None)
    times: dict[str, list[float]] = {name: [] for name in live}
    outputs: dict[str, list[list[int]]] = {}

    def others() -> None:
        for name, peer in list(live.items()):
            try:
                outputs[name], seconds = timed_generate(peer, prompts, new)
            except Exception as error:
                failed[name] = f"{type(error).__name__}: {error}"
                live.pop(name)
                continue
            times[name].append(seconds)

    mine: list[list[int]] = []

    def kvarray() -> None:
        mine[:] = peers.kvarray.generate(prompts, new)[0]

    views_before = peers.kvarray.passes_by_view()
    benchmark.pedantic(kvarray, setup=others, rounds=REPEATS, iterations=1)
    steps = peers.kvarray.steps  # the last round's steps
    if benchmark.disabled:
        return
    views = {k: v - views_before.get(k, 0) for k, v in peers.kvarray.passes_by_view().items()}
    tokens = batch * new
    kv_tps = tokens / benchmark.stats.stats.median
    extra: dict[str, Any] = dict(
        sequences=batch,
        prompt_tokens=workload.PROMPT,
        new_tokens=new,
        threads=THREADS,
        repeats=REPEATS,
        kvarray_tok_s=round(kv_tps, 1),
        kvarray_seconds=[round(s, 3) for s in benchmark.stats.stats.data],
        overhead_share=round(steps.overhead(), 4),
        overhead_share_decode=round(steps.overhead(decode_only=True), 4),
        step_ms_decode_median=steps.decode_pass_ms(),
        decode_burst=peers.kvarray.config.decode_burst,
        kvarray_passes_by_view=views,
        versions=peers.versions,
    )
    line = f"B={batch:2}  kvarray {kv_tps:6.1f} tok/s"
    for name, seconds in times.items():
        if name in failed or not seconds:
            continue
        tps = tokens / statistics.median(seconds)
        agree, total = workload.agreement(mine, outputs[name])
        extra[f"{name}_tok_s"] = round(tps, 1)
        extra[f"{name}_seconds"] = [round(s, 3) for s in seconds]
        extra[f"ratio_to_{name}"] = round(kv_tps / tps, 3)
        extra[f"{name}_agreeing_tokens"] = [agree, total]
        line += f"  {name} {tps:6.1f} (x{kv_tps / tps:4.2f}, agree {agree}/{total})"
    unavailable = {**peers.unavailable, **failed}
    if unavailable:
        extra["unavailable"] = unavailable
    extra["load_1min"] = [load, load_average()]
    benchmark.extra_info.update(extra)
    _ROWS.append((f"equal[{batch}]", line))
    _ROWS.append(
        (
            f"overhead[{batch}]",
            f"Python outside session.run: {extra['overhead_share']:.1%} of step time "
            f"(decode steps {extra['overhead_share_decode']:.1%}, "
            f"{extra['step_ms_decode_median']} ms/decode pass)",
        )
    )
    for name, reason in failed.items():
        _ROWS.append((f"failed[{name}]", reason))


# ---- serving workload --------------------------------------------------------------------------------
def test_serving(benchmark: Any, peers: Peers) -> None:
    """Time to finish all and time to first token: kvarray (continuous batching) against static batches
    of 16 (Optimum, transformers) and genai's engine."""
    load = load_average()
    spec = serving_spec()
    arrivals = workload.serving_workload(spec)
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name, peer in peers.others.items():
        try:
            if isinstance(peer, GenaiPeer):
                results[name] = peer.ask(dict(op="serving", spec=spec.as_dict(), mode="engine"))
            elif isinstance(peer, KvarrayPeer):
                results[name] = dict(peer.serve(arrivals), mode=f"continuous, {peer.config.view} view")
            else:
                results[name] = dict(
                    workload.run_static(arrivals, peer.generate, STATIC_BATCH), mode="static 16"
                )
        except Exception as error:
            failed[name] = f"{type(error).__name__}: {error}"
    mine: dict[str, Any] = {}

    views_before = peers.kvarray.passes_by_view()

    def kvarray() -> None:
        mine.clear()
        mine.update(peers.kvarray.serve(arrivals), mode="continuous")

    benchmark.pedantic(kvarray, rounds=1, iterations=1)
    if benchmark.disabled:
        return
    mine["passes_by_view"] = {
        k: v - views_before.get(k, 0) for k, v in peers.kvarray.passes_by_view().items()
    }
    extra: dict[str, Any] = dict(
        workload=spec.as_dict(),
        threads=THREADS,
        max_sequences=MAX_SEQUENCES,
        static_batch=STATIC_BATCH,
        kvarray={k: v for k, v in mine.items() if k != "outputs"},
    )
    _ROWS.append(("serving", f"{spec.requests} requests, prompts {spec.prompt}, outputs {spec.output}, "
                  f"Poisson {spec.rate}/s, seed {spec.seed}"))  # fmt: skip
    _ROWS.append(("serving[kvarray]", serving_line(mine)))
    for name, result in results.items():
        agree, total = workload.agreement(mine["outputs"], result["outputs"])
        ratio = result["finish_all_s"] / mine["finish_all_s"]
        extra[name] = {k: v for k, v in result.items() if k != "outputs"}
        extra[name]["agreeing_tokens"] = [agree, total]
        extra[f"speedup_over_{name}"] = round(ratio, 3)
        _ROWS.append(
            (f"serving[{name}]", serving_line(result) + f"  kvarray x{ratio:4.2f}, agree {agree}/{total}")
        )
    unavailable = {**peers.unavailable, **failed}
    if unavailable:
        extra["unavailable"] = unavailable
    for name, reason in failed.items():
        _ROWS.append((f"failed[{name}]", reason))
    extra["load_1min"] = [load, load_average()]
    benchmark.extra_info.update(extra)


def serving_line(result: dict[str, Any]) -> str:
    return (
        f"{result['mode']:12} all done {result['finish_all_s']:7.1f} s  {result['tokens_per_s']:6.1f} tok/s  "
        f"TTFT median {result['ttft_median_s']:6.2f} s p90 {result['ttft_p90_s']:6.2f} s  "
        f"latency median {result['latency_median_s']:6.1f} s"
    )

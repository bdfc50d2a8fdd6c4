"""Quality figures of the cache's storage and eviction choices on the trained tiny Llama's held-out text.

    python -m benchmarks.quality [--quick] [--out docs/]

Writes ``OUT/quality.md`` and ``OUT/img/quality_long_text.png`` (docs/quality.md explains every choice).

The model is models/tiny-llama (a byte-level Llama, 0.82 M parameters, trained on 256-byte crops), run
as its native pool-view decoder-step graph over a `CausalCache`, and the text is the held-out last tenth of
``pydoc_data.topics`` that models/train_tiny_llama.py defines. Every figure is teacher forced: each byte's
next-byte log-likelihood comes from a pass that reads all earlier bytes from the cache, so what the cache
stores (float16, int8) and what it keeps (a window, sinks) is what is measured.

- **Storage**: the held-out text in the training script's windows (256 predicted bytes each, no BOS), fed
  one byte per pass: bits/byte, perplexity per byte and argmax agreement with float32 storage, plus the
  agreement of free-running greedy generations.
- **Long texts**: consecutive held-out slices far beyond the training crops and the model's context, with
  the full cache, a window alone, and a window with 4 attention sinks (StreamingLLM) at the same cell
  budget; sinks either keep their true positions or the sequence is re-rotated to positions within the
  cache with `CausalCache.shift` (StreamingLLM's scheme).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

import kvarray
from kvarray import CausalCache, PoolView
from kvarray.export import GraphInfo, read_metadata
from kvarray.ops import dequantize_int8

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-llama"
SINKS = 4  # StreamingLLM's attention sinks
CROP = 256  # the training crops (models/train_tiny_llama.py CONTEXT): also its evaluation windows
LN2 = math.log(2.0)

#: (label, (key dtype, value dtype)) of each storage measured.
STORAGES: tuple[tuple[str, tuple[str, str]], ...] = (
    ("float32", ("float32", "float32")),
    ("float16", ("float16", "float16")),
    ("int8 keys and values", ("int8", "int8")),
    ("int8 values only (float16 keys)", ("float16", "int8")),
)


@dataclass(frozen=True)
class Settings:
    """What one run measures (`FULL` or `QUICK`)."""

    windows: int | None  # held-out evaluation windows for the storage table (None: all)
    batch: int  # evaluation windows fed side by side as sequences of one pass
    prompts: int  # greedy generations per storage
    prompt_bytes: int
    new_tokens: int
    long_texts: int  # long texts at most (as many as the held-out text holds)
    long_length: int  # bytes predicted per long text
    budget: int  # cells per sequence of the windowed caches
    bucket: int  # positions per point of the plot


FULL = Settings(
    windows=None, batch=8, prompts=32, prompt_bytes=64, new_tokens=128,
    long_texts=11, long_length=4096, budget=128, bucket=128,
)
QUICK = Settings(
    windows=16, batch=8, prompts=8, prompt_bytes=64, new_tokens=64,
    long_texts=2, long_length=1024, budget=128, bucket=64,
)


# ---- data ------------------------------------------------------------------------------------------------
def heldout() -> np.ndarray:
    """The held-out bytes ``[n]`` uint8 of models/train_tiny_llama.py (its `corpus()`, second part)."""
    path = ROOT / "models" / "train_tiny_llama.py"
    spec = importlib.util.spec_from_file_location("kvarray_models_train_tiny_llama", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(np.ndarray, module.corpus()[1])


def eval_windows(data: np.ndarray, count: int | None = None) -> list[np.ndarray]:
    """The training script's evaluation windows of `data`: ``data[s : s + CROP + 1]`` for s = 0, CROP, ...
    (each ``[n + 1]`` int64 predicts its last n bytes; the last one may be shorter), the first `count`."""
    starts = range(0, len(data) - 1, CROP)
    windows = [data[s : s + CROP + 1].astype(np.int64) for s in starts]
    return [w for w in windows if len(w) >= 2][:count]


def long_texts(data: np.ndarray, count: int, length: int) -> list[np.ndarray]:
    """Up to `count` consecutive, disjoint slices ``[length + 1]`` int64 of `data`."""
    stride = length + 1
    return [data[s : s + stride].astype(np.int64) for s in range(0, len(data) - stride + 1, stride)][:count]


# ---- the model over a cache ------------------------------------------------------------------------------
class TinyLlama:
    """The native pool-view decoder-step graphs of a model folder, run over `CausalCache` pools.

    A cache whose keys and values share a storage that has an exported graph
    (``native/decoder_step.pool.{kv_dtype}.onnx``: float32 and int8 for models/tiny-llama) is read by
    that graph as it is stored; any other storage (float16, mixed pairs) is decoded to float32 (the pool
    view, ``[n_kv, H, D]``) and read by the float32 graph, which is what an exported float16 graph does
    inside (`Cast`, then float32 arithmetic) and, for int8, the graph's own dequantization.
    """

    def __init__(self, folder: Path = MODEL, threads: int = 1) -> None:
        self.folder = folder
        self.threads = threads
        self._graphs: dict[str, tuple[ort.InferenceSession, GraphInfo]] = {}
        self.info = self._graph("float32")[1]
        self.spec = self.info.spec  # float32: what the graph computes K/V in, what `put` takes
        self.rope = self.info.rope
        config = json.loads((folder / "checkpoint" / "config.json").read_text())
        self.max_positions = int(config["max_position_embeddings"])

    def _graph(self, kv_dtype: str) -> tuple[ort.InferenceSession, GraphInfo]:
        if kv_dtype not in self._graphs:
            path = self.folder / "native" / f"decoder_step.pool.{kv_dtype}.onnx"
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._graphs[kv_dtype] = (session, read_metadata(path))
        return self._graphs[kv_dtype]

    def graph_for(self, kv_dtype: tuple[str, str]) -> str:
        """The storage of the graph that reads a cache of `kv_dtype` (key, value): its own, or float32."""
        key, value = kv_dtype
        own = self.folder / "native" / f"decoder_step.pool.{key}.onnx"
        return key if key == value and own.is_file() else "float32"

    def cache(
        self, capacity: int, max_sequences: int, kv_dtype: tuple[str, str],
        window: int | None = None, sinks: int = 0,
    ) -> CausalCache:
        """A cache for this model (no defragmentation: the figures do not depend on cell placement)."""
        return CausalCache(
            self.spec, capacity, max_sequences, window=window, sinks=sinks, kv_dtype=kv_dtype,
            defrag_threshold=None,
        )

    def step(
        self, cache: CausalCache, seq_ids: Sequence[int], positions: Sequence[int], tokens: Sequence[int],
        logits_index: Sequence[int],
    ) -> np.ndarray:
        """One pass: ``seq_ids``, ``positions``, ``tokens`` ``[T]`` -> ``logits [len(logits_index), vocab]``.

        Plans the pass (`start_forward`), runs the graph over the pool view read before `put` (the plan's
        ``bias_before_put [T, n_kv + T]``), and writes every layer's new keys and values with `put`.
        """
        plan = cache.start_forward(np.asarray(seq_ids, np.int64), np.asarray(positions, np.int64))
        storage = self.graph_for(cache.kv_dtype)
        session, info = self._graph(storage)
        feeds: dict[str, Any] = {
            "input_ids": np.asarray(tokens, np.int64),
            "position_ids": plan.positions,
            "logits_index": np.asarray(logits_index, np.int64),
            "attention_bias": plan.bias_before_put,
        }
        for layer in range(self.spec.num_layers):
            view = cast(PoolView, cache.get(layer, "pool"))
            sides = (("key", view.keys, view.key_scales), ("value", view.values, view.value_scales))
            for kind, rows, scales in sides:
                if storage == "int8":
                    feeds[f"past_{kind}_scale.{layer}"] = scales
                    feeds[f"past_{kind}.{layer}"] = rows
                else:
                    feeds[f"past_{kind}.{layer}"] = as_float32(rows, scales)
        out = dict(zip(info.outputs, session.run(info.outputs, feeds), strict=True))
        for layer in range(self.spec.num_layers):
            cache.put(layer, out[f"new_key.{layer}"], out[f"new_value.{layer}"])
        return out["logits"]

    def no_cache_logits(self, tokens: np.ndarray) -> np.ndarray:
        """``logits [n, vocab]`` of every position of ``tokens [n]`` in one pass over an empty past.

        No cache is involved: the past inputs are ``[0, H, D]`` and the bias is the causal ``[n, n]``.
        """
        session, info = self._graph("float32")
        n = len(tokens)
        empty = np.zeros((0, self.spec.num_kv_heads, self.spec.head_dim), np.float32)
        causal = np.where(np.tril(np.ones((n, n), bool)), 0.0, -np.inf).astype(np.float32)
        feeds = {
            "input_ids": np.asarray(tokens, np.int64),
            "position_ids": np.arange(n, dtype=np.int64),
            "logits_index": np.arange(n, dtype=np.int64),
            "attention_bias": causal,
        }
        for layer in range(self.spec.num_layers):
            feeds[f"past_key.{layer}"] = feeds[f"past_value.{layer}"] = empty
        return cast(np.ndarray, session.run(["logits"], feeds)[0])


def as_float32(rows: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """A pool view ``[n_kv, H, D]`` as float32: itself (float32), widened (float16), or dequantized (int8,
    with its ``scales [n_kv, H * D // g]``)."""
    if scales is not None:
        out = np.empty(rows.shape, np.float32)
        dequantize_int8(rows, scales, out)
        return out
    return rows if rows.dtype == np.float32 else rows.astype(np.float32)


# ---- teacher forcing -------------------------------------------------------------------------------------
@dataclass
class Scored:
    """Per-byte results of one text ``[n + 1]`` bytes: ``nats [n]`` next-byte negative log-likelihood
    (natural log) and ``argmax [n]`` the most likely next byte."""

    nats: np.ndarray
    argmax: np.ndarray


def score_logits(logits: np.ndarray, targets: np.ndarray) -> Scored:
    """`Scored` of ``logits [n, vocab]`` against ``targets [n]``."""
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    nats = log_z - logits[np.arange(len(targets)), targets]
    return Scored(nats.astype(np.float64), logits.argmax(axis=1))


def teacher_forced(
    model: TinyLlama, cache: CausalCache, texts: Sequence[np.ndarray], chunk: int = 1,
    reposition: bool = False,
) -> list[Scored]:
    """Feed ``texts`` (each ``[n_k + 1]`` int64) side by side, sequence k = text k, `chunk` bytes of each
    per pass, and score every predicted byte.

    reposition: StreamingLLM's positions within the cache (needs ``chunk == 1`` and a window): once a
    sequence's window is full, every pass drops the oldest non-sink cell (the ring write) and then shifts
    the later cells back by one (`CausalCache.shift`, keys re-rotated), so the newest token always sits at
    position ``sinks + window - 1`` and sinks stay at ``0 .. sinks - 1``. Otherwise positions are true.
    """
    assert not reposition or (chunk == 1 and cache.window is not None)
    full = None if cache.window is None else cache.sinks + cache.window
    targets = [t[1:] for t in texts]
    logits = [np.empty((len(t), model.info.vocab_size), np.float32) for t in targets]
    done = [0] * len(texts)
    position = [0] * len(texts)
    while True:
        live = [k for k in range(len(texts)) if done[k] < len(targets[k])]
        if not live:
            break
        seq_ids: list[int] = []
        positions: list[int] = []
        tokens: list[int] = []
        fed: list[int] = []
        for k in live:
            n = min(chunk, len(targets[k]) - done[k])
            seq_ids += [k] * n
            positions += range(position[k], position[k] + n)
            tokens += texts[k][done[k] : done[k] + n].tolist()
            fed.append(n)
        rows = model.step(cache, seq_ids, positions, tokens, range(len(tokens)))
        start = 0
        for k, n in zip(live, fed, strict=True):
            logits[k][done[k] : done[k] + n] = rows[start : start + n]
            start += n
            done[k] += n
            position[k] += n
            if reposition and full is not None and position[k] > full:
                cache.shift(k, -1, model.rope, begin=cache.sinks + 1)
                position[k] -= 1
    return [score_logits(lg, t) for lg, t in zip(logits, targets, strict=True)]


def greedy(
    model: TinyLlama, cache: CausalCache, prompts: Sequence[np.ndarray], new_tokens: int
) -> np.ndarray:
    """Greedy continuations ``[P, new_tokens]`` of ``prompts`` (each ``[p]`` int64, same length): one
    prefill pass over all prompts, then one decode pass per token for all of them."""
    length = len(prompts[0])
    seq_ids = [k for k in range(len(prompts)) for _ in range(length)]
    positions = [p for _ in prompts for p in range(length)]
    tokens = [int(t) for prompt in prompts for t in prompt]
    last = [k * length + length - 1 for k in range(len(prompts))]
    out = np.empty((len(prompts), new_tokens), np.int64)
    chosen = model.step(cache, seq_ids, positions, tokens, last).argmax(axis=1)
    for i in range(new_tokens):
        out[:, i] = chosen
        if i + 1 < new_tokens:
            batch = range(len(prompts))
            logits = model.step(cache, batch, [length + i] * len(prompts), chosen.tolist(), batch)
            chosen = logits.argmax(axis=1)
    return out


# ---- the measurements ------------------------------------------------------------------------------------
@dataclass
class StorageRow:
    """One row of the storage table."""

    label: str
    kv_dtype: tuple[str, str]
    graph: str
    bytes_per_token: int
    nats: float  # mean per predicted byte
    argmax_agreement: float  # with float32 storage, teacher forced
    greedy_agreement: float  # generated tokens equal to float32 storage's at the same index
    greedy_prefix: float  # mean tokens before the first difference


def bits(nats: float) -> float:
    """Nats per byte as bits per byte."""
    return nats / LN2


def measure_storage(model: TinyLlama, data: np.ndarray, settings: Settings) -> tuple[list[StorageRow], float]:
    """The storage table over the held-out windows, and the no-cache float32 mean nats (one pass per
    window, the training script's own evaluation)."""
    windows = eval_windows(data, settings.windows)
    no_cache = [score_logits(model.no_cache_logits(w[:-1]), w[1:]) for w in windows]
    no_cache_nats = float(np.concatenate([s.nats for s in no_cache]).mean())
    prompts = [w[: settings.prompt_bytes] for w in eval_windows(data)[: settings.prompts]]
    rows: list[StorageRow] = []
    reference: tuple[np.ndarray, np.ndarray] | None = None
    for label, kv_dtype in STORAGES:
        scored: list[Scored] = []
        for first in range(0, len(windows), settings.batch):
            group = windows[first : first + settings.batch]
            cache = model.cache(sum(len(w) for w in group), len(group), kv_dtype)
            scored += teacher_forced(model, cache, group)
        per_prompt = settings.prompt_bytes + settings.new_tokens
        cache = model.cache(len(prompts) * per_prompt, len(prompts), kv_dtype)
        generated = greedy(model, cache, prompts, settings.new_tokens)
        argmax = np.concatenate([s.argmax for s in scored])
        if reference is None:
            reference = (argmax, generated)
        same = generated == reference[1]
        prefix = np.where(same.all(axis=1), same.shape[1], (~same).argmax(axis=1))
        rows.append(
            StorageRow(
                label, kv_dtype, model.graph_for(kv_dtype), model.spec.bytes_per_token(kv_dtype),
                nats=float(np.concatenate([s.nats for s in scored]).mean()),
                argmax_agreement=float((argmax == reference[0]).mean()),
                greedy_agreement=float(same.mean()), greedy_prefix=float(prefix.mean()),
            )
        )
    return rows, no_cache_nats


@dataclass
class LongRun:
    """One configuration over the long texts: ``nats [texts, length]`` per predicted byte."""

    label: str
    nats: np.ndarray = field(repr=False)


def long_configs(budget: int) -> list[tuple[str, int | None, int, bool]]:
    """(label, window, sinks, reposition) of the long-text runs; windowed caches hold `budget` cells."""
    return [
        ("full cache", None, 0, False),
        (f"window {budget}", budget, 0, False),
        (f"{SINKS} sinks + window {budget - SINKS}, true positions", budget - SINKS, SINKS, False),
        (f"{SINKS} sinks + window {budget - SINKS}, positions in cache", budget - SINKS, SINKS, True),
    ]


def crop_reference(model: TinyLlama, texts: Sequence[np.ndarray]) -> np.ndarray:
    """``nats [texts, length]`` of `texts` (each ``[length + 1]``) cut into the training crops, each
    scored in one pass without a cache: what the model does in its training distribution on those bytes."""
    out = np.empty((len(texts), len(texts[0]) - 1))
    for k, text in enumerate(texts):
        for begin in range(0, len(text) - 1, CROP):
            crop = text[begin : begin + CROP + 1]
            out[k, begin : begin + len(crop) - 1] = score_logits(
                model.no_cache_logits(crop[:-1]), crop[1:]
            ).nats
    return out


def measure_long(model: TinyLlama, data: np.ndarray, settings: Settings) -> list[LongRun]:
    """The crop reference, then every `long_configs` run over the long texts, float32 storage.

    The full cache feeds each text on its own, 64 bytes per pass (in float32 the logits are those of one
    byte per pass, and the pool view's cost grows with sequences times cells); the windowed caches feed all
    texts side by side, one byte per pass.
    """
    texts = long_texts(data, settings.long_texts, settings.long_length)
    runs = [LongRun(f"reference: {CROP}-byte crops, no cache", crop_reference(model, texts))]
    f32 = ("float32", "float32")
    for label, window, sinks, reposition in long_configs(settings.budget):
        if window is None:
            scored = []
            for text in texts:
                scored += teacher_forced(model, model.cache(len(text), 1, f32), [text], chunk=64)
        else:
            cache = model.cache(len(texts) * (window + sinks), len(texts), f32, window, sinks)
            scored = teacher_forced(model, cache, texts, reposition=reposition)
        runs.append(LongRun(label, np.stack([s.nats for s in scored])))
    return runs


# ---- report ----------------------------------------------------------------------------------------------
@dataclass
class Results:
    """Everything one run measured, and where."""

    settings: Settings
    command: str
    environment: dict[str, str]
    heldout_bytes: int
    max_positions: int
    storage: list[StorageRow]
    no_cache_nats: float
    long: list[LongRun]
    wall_s: float
    cpu_s: float


def measure(settings: Settings, command: str, threads: int = 1) -> Results:
    """Run both measurements, printing each table as it is done."""
    wall, cpu = time.perf_counter(), time.process_time()
    model = TinyLlama(threads=threads)
    data = heldout()
    storage, no_cache_nats = measure_storage(model, data, settings)
    print("\n".join(storage_table(storage, no_cache_nats)), flush=True)
    runs = measure_long(model, data, settings)
    print("\n".join(long_table(runs, settings, model.max_positions)), flush=True)
    return Results(
        settings,
        command,
        environment(),
        len(data),
        model.max_positions,
        storage,
        no_cache_nats,
        runs,
        wall_s=time.perf_counter() - wall,
        cpu_s=time.process_time() - cpu,
    )


def environment() -> dict[str, str]:
    """Machine and versions, for every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import matplotlib
    import numba

    return {
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}",
        "versions": (
            f"Python {platform.python_version()}, kvarray {kvarray.__version__}, NumPy {np.__version__}, "
            f"ONNX Runtime {ort.__version__}, Numba {numba.__version__}, Matplotlib {matplotlib.__version__}"
        ),
    }


def spans(settings: Settings, max_positions: int) -> list[tuple[int, int]]:
    """The position ranges ``[begin, end)`` of the long-text table: cut at the cell budget, the training
    crops and the model's context."""
    edges = sorted({0, settings.budget, CROP, max_positions, settings.long_length})
    edges = [e for e in edges if e <= settings.long_length]
    return list(zip(edges[:-1], edges[1:], strict=True))


def span_bits(run: LongRun, begin: int, end: int) -> float:
    """Mean bits/byte of `run` over positions ``[begin, end)`` of every text."""
    return bits(float(run.nats[:, begin:end].mean()))


def storage_table(rows: list[StorageRow], no_cache_nats: float) -> list[str]:
    """Markdown lines of the storage table."""
    base = rows[0].nats
    lines = [
        "| storage (keys, values) | graph read | bytes/token | bits/byte | perplexity/byte | vs float32 "
        "| argmax agreement | greedy agreement | greedy prefix |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| no cache (one pass per window) | float32 | - | {bits(no_cache_nats):.4f} "
        f"| {math.exp(no_cache_nats):.4f} | - | - | - | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.graph} | {r.bytes_per_token} | {bits(r.nats):.4f} | {math.exp(r.nats):.4f} "
            f"| {relative(r.nats, base)} | {100 * r.argmax_agreement:.2f} % "
            f"| {100 * r.greedy_agreement:.1f} % | {r.greedy_prefix:.1f} |"
        )
    return lines


def relative(nats: float, base: float) -> str:
    """The perplexity of `nats` relative to that of `base`, as a signed percentage."""
    return f"{100 * math.expm1(nats - base):+.3f} %"


def long_table(runs: list[LongRun], settings: Settings, max_positions: int) -> list[str]:
    """Markdown lines of the long-text table: bits/byte per position range."""
    ranges = spans(settings, max_positions)
    head = " | ".join(f"[{a}, {b})" for a, b in ranges)
    lines = [f"| cache | {head} | all |", "|---|" + "---:|" * (len(ranges) + 1)]
    for run in runs:
        cells = " | ".join(f"{span_bits(run, a, b):.3f}" for a, b in ranges)
        lines.append(f"| {run.label} | {cells} | {bits(float(run.nats.mean())):.3f} |")
    return lines


def plot_long(results: Results, path: Path) -> None:
    """Bits/byte against position (mean over texts, buckets of ``settings.bucket`` positions), one line per
    run, and below it each sink variant's difference from the window alone, into the PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, runs = results.settings, results.long
    edges = np.arange(0, settings.long_length + 1, settings.bucket)
    centers = (edges[:-1] + edges[1:]) / 2

    def curve(run: LongRun) -> np.ndarray:
        return np.array([span_bits(run, a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)])

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    styles = [("grey", "--"), ("C3", "-"), ("C0", "-"), ("C1", ":"), ("C2", "-.")]
    for run, (color, style) in zip(runs, styles, strict=True):
        top.plot(centers, curve(run), linestyle=style, color=color, marker="o", markersize=3, label=run.label)
    window = curve(runs[2])
    for run, (color, style) in zip(runs[3:], styles[3:], strict=True):
        bottom.plot(centers, curve(run) - window, linestyle=style, color=color, marker="o", markersize=3)
    bottom.axhline(0, color=styles[2][0], linewidth=1)
    for ax in (top, bottom):
        for x in (CROP, results.max_positions):
            if x < settings.long_length:
                ax.axvline(x, color="grey", linewidth=0.8)
        ax.grid(True, alpha=0.3)
    for x, what in ((CROP, "training crops"), (results.max_positions, "max_position_embeddings")):
        if x < settings.long_length:
            top.annotate(
                what, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8, color="grey",
            )
    top.set_ylabel("bits / byte (teacher forced)")
    top.set_title(
        f"tiny Llama, {len(runs[0].nats)} held-out texts: caches of {settings.budget} cells per sequence "
        "against the full cache"
    )
    top.legend(fontsize=8)
    bottom.set_ylabel(f"minus {runs[2].label}")
    bottom.set_xlabel(f"position in the text (bytes; mean over texts in buckets of {settings.bucket})")
    caption = f"{results.command}  |  {results.environment['machine']}  |  {results.environment['versions']}"
    fig.text(0.01, 0.005, caption, fontsize=6.5, color="dimgrey", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Results, out: Path) -> None:
    """``out/quality.md`` and ``out/img/quality_long_text.png``."""
    plot_long(results, out / "img" / "quality_long_text.png")
    settings, rows, runs = results.settings, results.storage, results.long
    metrics = json.loads((MODEL / "metrics.json").read_text())
    windows = eval_windows(np.zeros(results.heldout_bytes, np.uint8), settings.windows)
    by_label = {r.label: r for r in rows}
    int8, values = by_label["int8 keys and values"], by_label["int8 values only (float16 keys)"]
    late = (min(results.max_positions, settings.long_length // 2), settings.long_length)
    reference, full, window, true_sinks, cache_sinks = (span_bits(run, *late) for run in runs)
    env = results.environment
    text = REPORT.format(
        command=results.command, wall_min=results.wall_s / 60, cpu_min=results.cpu_s / 60,
        quick=" (`--quick`: a subset; the committed page is the full run)" if settings == QUICK else "",
        machine=env["machine"], versions=env["versions"], crop=CROP, max_positions=results.max_positions,
        heldout_bytes=results.heldout_bytes, windows=len(windows), batch=settings.batch,
        scored_bytes=sum(len(w) - 1 for w in windows),
        storage_table="\n".join(storage_table(rows, results.no_cache_nats)),
        train_bits=metrics["heldout_bits_per_byte"], train_torch=metrics.get("torch", "?"),
        prompts=settings.prompts, prompt_bytes=settings.prompt_bytes, new_tokens=settings.new_tokens,
        worst=max(abs(100 * math.expm1(r.nats - rows[0].nats)) for r in rows),
        int8_disagree=100 * (1 - int8.argmax_agreement), int8_greedy=100 * int8.greedy_agreement,
        int8_prefix=int8.greedy_prefix, values_greedy=100 * values.greedy_agreement,
        float16_greedy=100 * by_label["float16"].greedy_agreement,
        texts=len(runs[0].nats), length=settings.long_length, budget=settings.budget,
        window=settings.budget - SINKS, sinks=SINKS, sinks_last=SINKS - 1, budget_last=settings.budget - 1,
        long_table="\n".join(long_table(runs, settings, results.max_positions)),
        late=f"[{late[0]}, {late[1]})", reference=reference, full=full,
        full_mid=span_bits(runs[1], CROP, results.max_positions), window_bits=window,
        true_delta=true_sinks - window, cache_delta=cache_sinks - window,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(text)


REPORT = """\
# Quality: what storage and eviction cost the model

Generated by `{command}`{quick}: {wall_min:.1f} minutes wall, {cpu_min:.1f} minutes of CPU (one ONNX
Runtime thread). Machine: {machine}. Versions: {versions}.

The model is the trained tiny byte-level Llama of `models/tiny-llama` (0.82 M parameters, 4 layers, 2 kv
heads of 32, trained on {crop}-byte crops; `max_position_embeddings` {max_positions}), run as its native
pool-view decoder-step graph over a `CausalCache` (`benchmarks/quality.py`, `TinyLlama.step`:
`start_forward`, bind the pool view as it is before `put` with the plan's `bias_before_put`, run, `put`).
The text is the held-out last tenth of `pydoc_data.topics` that `models/train_tiny_llama.py` defines
({heldout_bytes} bytes with this Python; the split depends on the Python release that ships
`pydoc_data`). Token ids are bytes, with no BOS token, as in training. Bits/byte is the mean next-byte
negative log-likelihood in bits; perplexity per byte is `2 ** bits/byte`.

Every number is teacher forced and **read from the cache**: the text is fed one byte per pass, so each
prediction attends to every earlier byte as the cache stores it. (A one-pass prefill attends to the
fresh float32 keys and values of its own tokens and would measure nothing of the cache.)

## Storage: float32, float16, int8

The training script's evaluation windows ({windows} windows of up to {crop} predicted bytes, {scored_bytes}
bytes in all), {batch} windows side by side as the sequences of each pass.

{storage_table}

- *no cache*: each window in one pass over an empty past: the training script's own evaluation, run
  with ONNX Runtime. The float32 cache gives the same numbers; the training script measured
  {train_bits} bits/byte on these windows with torch {train_torch}.
- *graph read*: models/tiny-llama ships native graphs for float32 and int8 pools. float16 and the mixed
  pair have no graph of their own: their pool view is widened (float16) or dequantized
  (`kvarray.ops.dequantize_int8`, the int8 graph's own arithmetic) to float32 and read by the float32
  graph, which is what an exported float16 graph computes inside. The cache stores and quantizes as
  configured either way (`tests/test_quality.py` checks that a dequantized int8 pool read by the float32
  graph scores like the int8 graph).
- *bytes/token*: cache memory per token over the 4 layers, keys plus values (int8: one float16 scale per
  32 values, q8_0's 8.5 bits).
- *vs float32*: perplexity relative to float32 storage.
- *argmax agreement*: predicted positions whose most likely byte equals float32 storage's.
- *greedy agreement* / *greedy prefix*: {prompts} prompts (the first {prompt_bytes} bytes of the first
  windows), {new_tokens} greedy bytes each; the fraction of generated bytes equal to float32 storage's at
  the same index, and the mean number of bytes before the first difference ({new_tokens}: none). After its
  first different byte a free-running generation goes its own way, so this is the strictest measure.

Every storage is within {worst:.3f} % of float32's perplexity: for this model even int8 keys and
values, at about a quarter of float32's memory, cost nothing measurable in likelihood. The most likely
byte changes at {int8_disagree:.2f} % of positions with int8 keys and values, and that is enough for
free-running greedy generations to part: {int8_greedy:.1f} % of generated bytes agree with float32
storage's (first difference after {int8_prefix:.0f} bytes on average), {values_greedy:.1f} % with int8
values only and {float16_greedy:.1f} % with float16.

## Long texts: full cache, window, window with attention sinks

{texts} consecutive disjoint held-out slices of {length} predicted bytes each, float32 storage, fed one
byte per pass, all texts side by side (the full cache: each text alone, 64 bytes per pass, which in
float32 gives the logits of one byte per pass; `tests/test_quality.py` checks it). The windowed caches
hold {budget} cells per sequence, the StreamingLLM comparison at equal memory: a window of {budget}, or
{sinks} sinks plus a window of {window}. A window W means a token at position p sees positions > p - W;
once a sequence holds `sinks + window` cells each new token overwrites its oldest non-sink cell (the
ring write). Two position schemes for the sinks:

- *true positions*: every token keeps its position in the text. RoPE scores depend on position
  differences only, so for a window alone the scheme makes no difference; sinks, though, end up
  thousands of positions away from the query, a distance never seen in training.
- *positions in cache* (StreamingLLM's scheme): after each ring write the later cells move back by one
  with `CausalCache.shift(seq, -1, rope, begin=sinks + 1)` (keys re-rotated by `ops.rope_shift`), so the
  sinks keep positions 0..{sinks_last} and the newest token sits at {budget_last}: no distance reaches
  {budget}.

The reference row cuts the same texts into the {crop}-byte training crops, each scored in one pass
without a cache: the model in its training distribution on the same bytes.

Bits/byte per range of positions (mean over texts):

{long_table}

![bits/byte over position](img/quality_long_text.png)

- The full cache fails beyond the training crops: {full_mid:.2f} bits/byte over [{crop}, {max_positions})
  and {full:.2f} over {late}, against {reference:.2f} for the crops. The model never attended over more
  than {crop} positions in training, so the context limit that matters is the training length, not
  `max_position_embeddings`.
- A window alone does not collapse when the first bytes leave it ({window_bits:.3f} bits/byte over
  {late}). Unlike the large models of the StreamingLLM paper, this one does not lean on its first
  tokens as attention sinks, likely because it was trained on crops cut at random offsets, with no BOS.
- Sinks at positions in the cache score like the window alone ({cache_delta:+.3f} bits/byte over
  {late}); sinks at true positions cost {true_delta:+.3f}, their RoPE distance to the query being far
  outside training. For this model sinks do not help: moved with the window (`shift`) they are harmless,
  left at their true positions they hurt.
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a subset, in about a minute")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of quality.md and img/")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.quality" + (" --quick" if args.quick else "")
    results = measure(QUICK if args.quick else FULL, command, args.threads)
    write_report(results, args.out)
    print(f"wrote {args.out / 'quality.md'} in {results.wall_s:.0f} s", flush=True)


if __name__ == "__main__":
    main()

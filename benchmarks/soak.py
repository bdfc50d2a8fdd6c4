"""A soak: a long random workload of the engine and of the cache state machine, checked while it runs.

    python -m benchmarks.soak --minutes 30                  # both parts, half the time each
    python -m benchmarks.soak --minutes 2 --part engine --json soak.json --seed 7

Engine part: the random tiny Llama's native graph (models/tiny-llama-random) under rotating configs
(float32 with prefix sharing, int8, a window with sinks, small prefill chunks). Requests arrive at random
(random prompts, some sharing a prefix; 1-24 new tokens; greedy or seeded sampling; some stop tokens), a
few are cancelled, a few are hostile (refused with a kvarray error, nothing queued), a few are poisoned
(every pass holding them raises) and some passes fail once at random (`EngineCore` retries them). Checks:
every 8 steps ``cells_used`` equals the distinct cells of the live sequences and each running request
holds its tokens (under a window: between ``sinks + window`` and that plus a prefill chunk); at every idle
moment ``cells_used`` is 0; half of the finished greedy requests must equal a run on an engine of their
own (cancelled ones: a prefix of it), or part from it only where that run's two logits are within 1e-4
(a near-tie that batching's float rounding, about 1e-6, may flip; counted apart); poisoned requests must
fail, others must not (under a window too: the engine retries a pass whose ring writes evicted cells out
of sight, docs/reliability.md). Sampled requests are not compared: float rounding moves a draw that falls
on a boundary.

Cache part: `CausalCache` under rotating configs (float16; int8 with a window and sinks; int8 keys with
float16 values and a window; float32 without automatic defragmentation) against a plain-Python model of
each sequence's tokens: random passes (`start_forward` + `put`), `remove` of ranges, `copy_prefix`,
`shift`, `defrag`, save/load through a file, hostile calls and drains. Errors the model predicts must be
raised, and leave ``state_dict`` unchanged; the bookkeeping is checked after every operation, the pools'
contents against the model every 10.

Report: operations, errors (expected by kind / unexpected), leaked cells, mismatches, RSS growth (from
/proc/self/statm, after warm-up), as a table on stdout and a JSON file. Exit status 1 when a leak, a
mismatch or an unexpected error was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvarray.attention import ModelToken, dequantized, int8_tolerance, shift_model
from kvarray.causal import CausalCache
from kvarray.errors import (
    CacheFull,
    KVArrayError,
    PositionError,
    SequenceExists,
    TooManySequences,
    UnknownSequence,
)
from kvarray.ort import Engine, EngineConfig, FinishReason, SamplingParams
from kvarray.spec import KVSpec, RopeSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-llama-random"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
EXAMPLES = 5  # messages kept per kind of problem


def rss_bytes() -> int:
    """Resident memory of this process (second field of /proc/self/statm, in pages); 0 where absent."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class Tally:
    """What one part of the soak saw."""

    operations: int = 0
    checks: int = 0
    expected: Counter = field(default_factory=Counter)  # expected errors by kind
    unexpected: int = 0
    leaked_cells: int = 0
    mismatches: int = 0
    examples: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # what the workload did
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    seconds: float = 0.0

    def problem(self, kind: str, message: str) -> None:
        """Count a leak, mismatch or unexpected error (`kind`) and keep its first messages."""
        if kind == "unexpected":
            self.unexpected += 1
        elif kind == "mismatch":
            self.mismatches += 1
        if sum(m.startswith(kind) for m in self.examples) < EXAMPLES:
            self.examples.append(f"{kind}: {message}")

    def leak(self, cells: int, where: str) -> None:
        if cells:
            self.leaked_cells += cells
            self.problem("leak", f"{cells} cells held {where}")

    def memory(self) -> None:
        self.rss_peak = max(self.rss_peak, rss_bytes())

    def as_dict(self) -> dict[str, Any]:
        growth = self.rss_end - self.rss_start
        return {
            "seconds": round(self.seconds, 1),
            "operations": self.operations,
            "checks": self.checks,
            "expected_errors": dict(sorted(self.expected.items())),
            "unexpected_errors": self.unexpected,
            "leaked_cells": self.leaked_cells,
            "mismatches": self.mismatches,
            "rss_start_mib": round(self.rss_start / 2**20, 1),
            "rss_peak_mib": round(self.rss_peak / 2**20, 1),
            "rss_end_mib": round(self.rss_end / 2**20, 1),
            "rss_growth_mib": round(growth / 2**20, 1),
            "workload": dict(sorted(self.counts.items())),
            "examples": self.examples,
        }


# ==== the engine ==========================================================================================
class InjectedFault(RuntimeError):
    """A failure the soak injects into a pass."""


ENGINE_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("float32", {}),
    ("int8", {"kv_dtype": "int8"}),
    ("window", {"window": 24, "sinks": 4}),
    ("chunked", {"prefill_chunk": 8, "max_batch_tokens": 40}),
]
VOCAB = 259
TIE = 1e-4  # logits closer than this are a near-tie: batching's rounding (about 1e-6) may flip them


def engine_config(options: dict[str, Any], sequences: int) -> EngineConfig:
    return EngineConfig(**{"capacity": 512, "max_sequences": sequences, "threads": 1, **options})


HOSTILE = [
    ("UnknownToken", lambda e: e.add_request([1, VOCAB + 5])),
    ("UnknownToken", lambda e: e.add_request([-3, 2])),
    ("UnknownToken", lambda e: e.add_request([2**70])),
    ("DTypeMismatch", lambda e: e.add_request([1.5, 2.0])),
    ("DTypeMismatch", lambda e: e.add_request("text")),
    ("ShapeMismatch", lambda e: e.add_request([[1, 2], [3, 4]])),
    ("EmptyPrompt", lambda e: e.add_request([])),
    ("PromptTooLong", lambda e: e.add_request([5] * 600)),
    ("ConfigError", lambda e: e.add_request([1], SamplingParams(temperature=float("nan")))),
    ("ConfigError", lambda e: e.add_request([1], SamplingParams(max_new_tokens=-1))),
    ("ConfigError", lambda e: e.add_request([1], SamplingParams(top_p=float("inf")))),
    ("UnknownRequest", lambda e: e.cancel(10**9)),
    ("InvalidUTF8", lambda e: e.generate_text([b"\xff\xfe"])),
]


@dataclass
class Live:
    prompt: list[int]
    params: SamplingParams
    poisoned: bool


class EngineSoak:
    """The engine workload of one config; `run` until a deadline, tallying into `tally`."""

    def __init__(self, name: str, options: dict[str, Any], rng: np.random.Generator, tally: Tally) -> None:
        self.name, self.options, self.rng, self.tally = name, options, rng, tally
        self.engine = Engine.from_model_dir(TINY, engine_config(options, 8), graph="native")
        self.isolated = Engine.from_model_dir(TINY, engine_config(options, 1), graph="native")
        self.logits: list[np.ndarray] = []  # the isolated run's logits rows, one per token
        alone_forward = self.isolated.runner.forward

        def keep(cache: Any, plan: Any, batch: Any) -> Any:
            logits, seconds = alone_forward(cache, plan, batch)
            self.logits.extend(np.array(logits[: len(batch.sampled)]))
            return logits, seconds

        self.isolated.runner.forward = keep  # type: ignore[method-assign]
        self.windowed = options.get("window") is not None
        self.live: dict[int, Live] = {}
        self.poisoned: set[int] = set()
        self.prefixes = [rng.integers(0, 256, int(rng.integers(16, 40))).tolist() for _ in range(4)]
        self.transient = 0.01
        forward = self.engine.runner.forward

        def faulty(cache: Any, plan: Any, batch: Any) -> Any:
            if any(req.id in self.poisoned for req, _ in batch.fed):
                raise InjectedFault("a poisoned request is in the pass")
            if len(batch.fed) > 1 and self.rng.random() < self.transient:
                tally.counts["transient faults"] += 1
                raise InjectedFault("a transient fault")
            return forward(cache, plan, batch)

        self.engine.runner.forward = faulty  # type: ignore[method-assign]

    # ---- the workload ----------------------------------------------------------------------------
    def request(self) -> tuple[list[int], SamplingParams]:
        rng = self.rng
        if rng.random() < 0.3:
            base = self.prefixes[int(rng.integers(len(self.prefixes)))]
            tail = rng.integers(0, 256, int(rng.integers(1, 8))).tolist()
            prompt = base[: int(rng.integers(8, len(base) + 1))] + tail
        else:
            prompt = rng.integers(0, 256, int(rng.integers(1, 49))).tolist()
        new = int(rng.integers(1, 25))
        stop = (int(rng.integers(0, 256)),) if rng.random() < 0.2 else None
        if rng.random() < 0.6:
            return prompt, SamplingParams(max_new_tokens=new, stop_tokens=stop)
        return prompt, SamplingParams(
            max_new_tokens=new,
            temperature=float(rng.uniform(0.3, 1.5)),
            top_k=int(rng.choice([0, 5, 40])),
            top_p=float(rng.choice([1.0, 0.9])),
            seed=int(rng.integers(0, 2**31)),
            stop_tokens=stop,
        )

    def add(self) -> None:
        prompt, params = self.request()
        rid = self.engine.add_request(prompt, params)
        poisoned = self.rng.random() < 0.03
        if poisoned:
            self.poisoned.add(rid)
        self.live[rid] = Live(prompt, params, poisoned)
        self.tally.counts["requests"] += 1

    def hostile(self) -> None:
        name, call = HOSTILE[int(self.rng.integers(len(HOSTILE)))]
        before = (len(self.engine.requests), len(self.engine.scheduler.waiting))
        try:
            call(self.engine)
        except KVArrayError as exc:
            if type(exc).__name__ != name:
                self.tally.problem("unexpected", f"hostile {name}: got {type(exc).__name__}: {exc}")
            else:
                self.tally.expected[name] += 1
        except Exception as exc:  # noqa: BLE001 - counted
            self.tally.problem("unexpected", f"hostile {name}: {type(exc).__name__}: {exc}")
        else:
            self.tally.problem("mismatch", f"hostile {name} was accepted")
        if (len(self.engine.requests), len(self.engine.scheduler.waiting)) != before:
            self.tally.problem("mismatch", f"hostile {name} queued something")

    def cancel(self) -> None:
        rid = int(self.rng.choice(list(self.live)))
        self.engine.cancel(rid)
        self.tally.counts["cancelled"] += 1
        self.finished(self.engine.pop(rid))

    def finished(self, req: Any) -> None:
        """Check a finished request and forget it."""
        info = self.live.pop(req.id)
        reason = req.finish_reason
        self.tally.counts[f"finished {reason.value}"] += 1
        if info.poisoned:
            self.poisoned.discard(req.id)
            if reason not in (FinishReason.ERROR, FinishReason.CANCELLED):
                self.tally.problem("mismatch", f"poisoned request {req.id} finished {reason.value}")
            elif reason is FinishReason.ERROR:
                self.tally.expected["InjectedFault (poisoned)"] += 1
            return
        if reason is FinishReason.ERROR:
            self.tally.problem("unexpected", f"request {req.id} failed: {req.error!r}")
            return
        if not info.params.greedy:  # a sampled token moves when float noise crosses its draw: not compared
            return
        if self.rng.random() >= 1 / 2:
            return
        if req.shared and self.options.get("kv_dtype") == "int8":
            # its shared prefix is read back quantized, where a run of its own attends to it in float32
            # within the pass: not comparable bit for bit
            self.tally.counts["not compared: int8 with a shared prefix"] += 1
            return
        self.verify(req, info)

    def verify(self, req: Any, info: Live) -> None:
        """A greedy request's tokens against a run of its own (a prefix of it when cancelled). Where they
        part, the isolated run's two logits must not be a near-tie (within `TIE` of each other: the
        batch's float rounding, about 1e-6 here, may then pick either)."""
        self.logits.clear()
        (alone,) = self.isolated.generate([info.prompt], info.params)
        self.tally.checks += 1
        self.tally.counts["compared with an isolated run"] += 1
        got = req.output
        cancelled = req.finish_reason is FinishReason.CANCELLED
        if got == (alone[: len(got)] if cancelled else alone):
            return
        part = next((k for k, (a, b) in enumerate(zip(got, alone, strict=False)) if a != b), None)
        if part is not None:
            row = self.logits[part]
            if abs(float(row[alone[part]]) - float(row[got[part]])) < TIE:
                self.tally.counts["greedy near-ties (equal up to rounding)"] += 1
                return
        self.tally.problem(
            "mismatch",
            f"{self.name}: request {req.id} (prompt {info.prompt}, {info.params}, shared {req.shared}) "
            f"gave {got}, alone {alone}",
        )

    def check(self) -> None:
        """cells_used against the live sequences' cells, each running request's cell count."""
        eng, cache = self.engine, self.engine.cache
        self.tally.checks += 1
        tables = [cache.cell_table(seq)[0] for seq in cache.sequences()]
        distinct = len(np.unique(np.concatenate(tables))) if tables else 0
        used = eng.stats().cells_used
        if used != distinct:
            self.tally.leak(abs(used - distinct), f"beyond the live sequences' ({self.name})")
        running = {r.id: r for r in eng.scheduler.running}
        for seq in cache.sequences():
            if seq not in running:
                self.tally.leak(cache.length(seq), f"by sequence {seq}, not running ({self.name})")
        ring = None if not self.windowed else self.options["window"] + self.options.get("sinks", 0)
        chunk = eng.scheduler.prefill_chunk
        for rid, req in running.items():
            held = cache.length(rid)
            if ring is None:
                low = high = req.computed
            else:  # after a pass of n tokens: the sinks + window - 1 cells its first token saw, plus n
                low, high = min(req.computed, ring), min(req.computed, ring - 1 + chunk)
            if not low <= held <= high:
                self.tally.problem("mismatch", f"request {rid} holds {held} cells, expected {low}..{high}")
        if not eng.has_work:
            self.tally.leak(used, f"with no request left ({self.name})")

    def run(self, deadline: float) -> None:
        eng, rng, steps = self.engine, self.rng, 0
        failed_before = eng.passes_failed
        draining = False
        while time.perf_counter() < deadline or eng.has_work:
            if time.perf_counter() >= deadline:
                draining = True
            if not draining:
                if len(self.live) < 12 and rng.random() < 0.45:
                    self.add()
                if rng.random() < 0.03:
                    self.hostile()
                if self.live and rng.random() < 0.03:
                    self.cancel()
                if rng.random() < 0.004:  # drain to idle now and then: every cell must come back
                    draining = True
            try:
                events = eng.step()
            except Exception as exc:  # noqa: BLE001 - counted; the soak goes on
                self.tally.problem("unexpected", f"step raised {type(exc).__name__}: {exc}")
                traceback.print_exc()
                break
            steps += 1
            self.tally.operations += 1
            for event in events:
                if event.finished:
                    self.finished(eng.pop(event.request.id))
            if steps % 8 == 0 or not eng.has_work:
                self.check()
            if draining and not eng.has_work:
                self.tally.counts["drains to idle"] += 1
                draining = time.perf_counter() >= deadline
                if draining:
                    break
            if steps % 256 == 0:
                self.tally.memory()
        self.tally.counts["steps"] += steps
        self.tally.counts["passes failed (retried)"] += eng.passes_failed - failed_before
        self.check()

    def close(self) -> None:
        self.engine.close()
        self.isolated.close()


def in_rounds(configs: list[tuple[str, dict[str, Any]]], make: Any, seconds: float, tally: Tally) -> Tally:
    """Run one ``make(name, options)`` part per config, kept for the whole soak (long-lived engines and
    caches), for `seconds` in all: first a short warm-up of each (kernels compiled, arenas grown) before
    the memory baseline, then rounds of about a minute each (at least one per config), rotating."""
    start = time.perf_counter()
    end = start + seconds
    warm = min(3.0, seconds / (5 * len(configs)))
    parts = {name: make(name, options) for name, options in configs}
    for part in parts.values():
        part.run(time.perf_counter() + warm)
    tally.rss_start = tally.rss_peak = rss_bytes()
    rounds = max(len(configs), int((end - time.perf_counter()) // 60))
    length = (end - time.perf_counter()) / rounds
    k = 0
    while time.perf_counter() < end:
        name, _ = configs[k % len(configs)]
        parts[name].run(min(end, time.perf_counter() + length))
        tally.counts[f"rounds {name}"] += 1
        k += 1
    tally.rss_end = rss_bytes()  # before closing: the parts' pools are part of the steady state
    for part in parts.values():
        part.close()
    tally.memory()
    tally.seconds = time.perf_counter() - start
    return tally


def soak_engine(seconds: float, seed: int) -> Tally:
    """Run the engine part for `seconds` (`in_rounds` over `ENGINE_CONFIGS`)."""
    tally, rng = Tally(), np.random.default_rng(seed)
    return in_rounds(ENGINE_CONFIGS, lambda name, opts: EngineSoak(name, opts, rng, tally), seconds, tally)


# ==== the cache ===========================================================================================
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
ROPE = RopeSpec(theta=100.0)
CACHE_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("float16", {"capacity": 48, "kv_dtype": "float16", "defrag_threshold": 0.3}),
    ("int8-window-sinks", {"capacity": 40, "kv_dtype": "int8", "window": 6, "sinks": 2,
                           "defrag_threshold": 0.3}),
    ("int8-keys-window", {"capacity": 32, "kv_dtype": ("int8", "float16"), "window": 5,
                          "defrag_threshold": 0.2}),
    ("float32-manual-defrag", {"capacity": 64, "kv_dtype": "float32", "defrag_threshold": None}),
]
SEQUENCES, MAX_SEQUENCES = 8, 4


def same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


class CacheSoak:
    """Random operations on one `CausalCache` config against the plain model ``seq -> position ->
    ModelToken``."""

    def __init__(self, name: str, options: dict[str, Any], rng: np.random.Generator, tally: Tally) -> None:
        self.name, self.options, self.rng, self.tally = name, dict(options), rng, tally
        self.window, self.sinks = options.get("window"), options.get("sinks", 0)
        self.cache = self.make()
        self.storage = self.cache.kv_dtype
        self.model: dict[int, dict[int, ModelToken]] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="kvarray-soak-")

    def make(self) -> CausalCache:
        opts = dict(self.options)
        capacity = opts.pop("capacity")
        return CausalCache(SPEC, capacity, MAX_SEQUENCES, group_size=8, xp=np, **opts)

    # ---- expected refusals ------------------------------------------------------------------------
    def refused(self, call: Any, errors: tuple[type[Exception], ...], what: str) -> bool:
        """Run `call`, which must raise one of `errors` and leave the state unchanged; True if it did."""
        before = self.cache.state_dict()
        try:
            call()
        except errors as exc:
            self.tally.expected[type(exc).__name__] += 1
            if not same_state(before, self.cache.state_dict()):
                self.tally.problem("mismatch", f"{self.name}: refused {what} changed the cache")
            return True
        except Exception as exc:  # noqa: BLE001 - counted
            self.tally.problem("unexpected", f"{self.name}: {what}: {type(exc).__name__}: {exc}")
            return True
        return False

    # ---- operations -------------------------------------------------------------------------------
    def forward(self) -> None:
        rng = self.rng
        seqs = rng.choice(SEQUENCES, size=int(rng.integers(1, 4)), replace=False).tolist()
        labels, starts = [], {}
        for seq in seqs:
            labels += [seq] * int(rng.integers(1, 5))
            last = max(self.model[seq]) if seq in self.model else None
            starts[seq] = last + 1 if last is not None else int(rng.integers(0, 4))
        labels = rng.permutation(labels).tolist()
        positions, nxt = [], dict(starts)
        for seq in labels:
            positions.append(nxt[seq])
            nxt[seq] += 1
        before = self.cache.state_dict()
        try:
            self.cache.start_forward(labels, positions)
        except (CacheFull, TooManySequences) as exc:
            self.tally.expected[type(exc).__name__] += 1
            if not same_state(before, self.cache.state_dict()):
                self.tally.problem("mismatch", f"{self.name}: a refused pass changed the cache")
            return
        count = len(labels)
        keys = rng.standard_normal((SPEC.num_layers, count, 2, 8)).astype(np.float16)
        values = rng.standard_normal((SPEC.num_layers, count, 2, 8)).astype(np.float16)
        for layer in range(SPEC.num_layers):
            self.cache.put(layer, keys[layer], values[layer])
        if self.window is not None:  # ring windows: what the batch's first token cannot see is gone
            for seq in seqs:
                for q in sorted(self.model.get(seq, {}))[self.sinks :]:
                    if q <= starts[seq] - self.window:
                        del self.model[seq][q]
        for t, (seq, pos) in enumerate(zip(labels, positions, strict=True)):
            k, v = keys[:, t].astype(np.float64), values[:, t].astype(np.float64)
            tol_k = int8_tolerance(keys[:, t], self.storage[0])
            tol_v = int8_tolerance(values[:, t], self.storage[1])
            self.model.setdefault(seq, {})[pos] = ModelToken(k, v, tol_k, tol_v)

    def remove(self) -> None:
        rng = self.rng
        seq = int(rng.integers(SEQUENCES))
        begin = int(rng.integers(0, 12))
        end = None if rng.random() < 0.4 else begin + int(rng.integers(0, 6))
        if seq not in self.model:
            if not self.refused(lambda: self.cache.remove(seq, begin, end), (UnknownSequence,), "remove"):
                self.tally.problem("mismatch", f"{self.name}: remove of unknown {seq} accepted")
            return
        removed = self.cache.remove(seq, begin, end)
        doomed = [q for q in self.model[seq] if q >= begin and (end is None or q < end)]
        if removed != len(doomed):
            self.tally.problem("mismatch", f"{self.name}: remove gave {removed}, model {len(doomed)}")
        for q in doomed:
            del self.model[seq][q]
        if not self.model[seq]:
            del self.model[seq]

    def copy_prefix(self) -> None:
        rng = self.rng
        src, dst, length = int(rng.integers(SEQUENCES)), int(rng.integers(SEQUENCES)), int(rng.integers(0, 9))
        if src not in self.model:
            expect: tuple[type[Exception], ...] | None = (UnknownSequence,)
        elif length > len(self.model[src]):
            expect = (PositionError,)
        elif dst in self.model:
            expect = (SequenceExists,)
        elif length and len(self.model) >= MAX_SEQUENCES:
            expect = (TooManySequences,)
        else:
            expect = None
        call = lambda: self.cache.copy_prefix(src, dst, length)  # noqa: E731
        if expect is not None:
            if not self.refused(call, expect, "copy_prefix"):
                self.tally.problem("mismatch", f"{self.name}: copy_prefix({src}, {dst}, {length}) accepted")
            return
        call()
        if length:
            self.model[dst] = {q: self.model[src][q] for q in sorted(self.model[src])[:length]}

    def shift(self) -> None:
        rng = self.rng
        seq, begin, delta = int(rng.integers(SEQUENCES)), int(rng.integers(0, 12)), int(rng.integers(-4, 5))
        call = lambda: self.cache.shift(seq, delta, ROPE, begin=begin)  # noqa: E731
        if seq not in self.model:
            if not self.refused(call, (UnknownSequence,), "shift"):
                self.tally.problem("mismatch", f"{self.name}: shift of unknown {seq} accepted")
            return
        cached = sorted(self.model[seq])
        moving = [q for q in cached if q >= begin]
        kept = [q for q in cached if q < begin]
        if moving and delta and moving[0] + delta < (kept[-1] + 1 if kept else 0):
            if not self.refused(call, (PositionError,), "shift"):
                self.tally.problem("mismatch", f"{self.name}: shift onto kept positions accepted")
            return
        before = self.cache.state_dict()
        try:
            call()
        except CacheFull:  # no free cell for the copy of a shared cell
            self.tally.expected["CacheFull"] += 1
            if not same_state(before, self.cache.state_dict()):
                self.tally.problem("mismatch", f"{self.name}: a refused shift changed the cache")
            return
        if not moving or not delta:
            return
        shift_model(self.model[seq], moving, delta, ROPE, self.storage[0])

    def defrag(self) -> None:
        self.cache.defrag()
        stats = self.cache.stats()
        capacity = self.options["capacity"]
        if stats.n_kv != min(-(-stats.cells_used // 32) * 32, capacity):
            used = stats.cells_used
            self.tally.problem("mismatch", f"{self.name}: n_kv {stats.n_kv} after defrag, {used} used")

    def save_and_load(self) -> None:
        state = self.cache.state_dict()
        fresh = self.make()
        path = str(Path(self.tmp.name) / "cache.safetensors")
        self.cache.save(path)
        fresh.load(path)
        if not same_state(state, fresh.state_dict()):
            self.tally.problem("mismatch", f"{self.name}: a saved and loaded cache differs")
        self.cache.close()
        self.cache = fresh

    def hostile(self) -> None:
        rng = self.rng
        seq = int(rng.integers(SEQUENCES))
        calls = [
            (lambda: self.cache.start_forward([seq], [-5]), "negative position"),
            (lambda: self.cache.start_forward([seq, seq], [0]), "seq_ids and positions of two lengths"),
            (lambda: self.cache.start_forward([[seq]], [[0]]), "2-D batch"),
            (lambda: self.cache.remove(seq if seq in self.model else -1, 5, 2), "bad range or sequence"),
            (lambda: self.cache.copy_prefix(seq, seq + 100, -1), "negative length"),
        ]
        call, what = calls[int(rng.integers(len(calls)))]
        if not self.refused(call, (KVArrayError,), what):
            self.tally.problem("mismatch", f"{self.name}: hostile {what} accepted")

    def drain(self) -> None:
        for seq in list(self.model):
            self.cache.remove(seq)
        self.model.clear()
        self.tally.counts["drains"] += 1
        self.tally.leak(self.cache.stats().cells_used, f"after removing every sequence ({self.name})")

    # ---- checks -----------------------------------------------------------------------------------
    def check(self, contents: bool) -> None:
        cache, tally = self.cache, self.tally
        tally.checks += 1
        stats = cache.stats()
        tables = {seq: cache.cell_table(seq) for seq in cache.sequences()}
        distinct = len(np.unique(np.concatenate([t[0] for t in tables.values()]))) if tables else 0
        if stats.cells_used != distinct or stats.cells_used + stats.cells_free != stats.capacity:
            tally.leak(abs(stats.cells_used - distinct) or 1, f"beyond the tables ({self.name})")
        if sorted(tables) != sorted(self.model):
            tally.problem("mismatch", f"{self.name}: sequences {sorted(tables)}, model {sorted(self.model)}")
            return
        for seq, (cells, positions) in tables.items():
            if positions.tolist() != sorted(self.model[seq]):
                tally.problem("mismatch", f"{self.name}: positions of {seq} differ from the model")
                return
            if not contents:
                continue
            for layer in range(SPEC.num_layers):
                for which in (0, 1):
                    pool = cache._pools[which][layer]  # noqa: SLF001 - the soak reads the pools
                    scales = cache._scales[which][layer]  # noqa: SLF001
                    stored = dequantized(pool[cells], None if scales is None else scales[cells])
                    for row, q in zip(stored, positions.tolist(), strict=True):
                        tok = self.model[seq][q]
                        want = (tok.keys if which == 0 else tok.values)[layer]
                        tol = tok.key_tol if which == 0 else tok.value_tol
                        if np.abs(row - want).max() > tol + 1e-9:
                            tally.problem("mismatch", f"{self.name}: seq {seq} position {q} layer {layer}")
                            return

    def run(self, deadline: float) -> None:
        ops = [
            (self.forward, 40), (self.remove, 12), (self.copy_prefix, 10), (self.shift, 10),
            (self.defrag, 5), (self.save_and_load, 3), (self.hostile, 6), (self.drain, 2),
        ]
        weights = np.array([w for _, w in ops], float)
        weights /= weights.sum()
        count = 0
        while time.perf_counter() < deadline:
            op = ops[int(self.rng.choice(len(ops), p=weights))][0]
            try:
                op()
            except Exception as exc:  # noqa: BLE001 - counted
                self.tally.problem("unexpected", f"{self.name}: {op.__name__}: {type(exc).__name__}: {exc}")
            self.tally.operations += 1
            self.tally.counts[op.__name__] += 1
            count += 1
            self.check(contents=count % 10 == 0)
            if count % 512 == 0:
                self.tally.memory()
        self.drain()

    def close(self) -> None:
        self.cache.close()
        self.tmp.cleanup()


def soak_cache(seconds: float, seed: int) -> Tally:
    """Run the cache part for `seconds` (`in_rounds` over `CACHE_CONFIGS`)."""
    tally, rng = Tally(), np.random.default_rng(seed + 1)
    return in_rounds(CACHE_CONFIGS, lambda name, opts: CacheSoak(name, opts, rng, tally), seconds, tally)


# ==== report ==============================================================================================
ROWS = [
    ("seconds", "seconds"),
    ("operations (engine: steps)", "operations"),
    ("checks", "checks"),
    ("expected errors", "expected_errors"),
    ("unexpected errors", "unexpected_errors"),
    ("leaked cells", "leaked_cells"),
    ("mismatches", "mismatches"),
    ("RSS after warm-up (MiB)", "rss_start_mib"),
    ("RSS peak (MiB)", "rss_peak_mib"),
    ("RSS growth (MiB)", "rss_growth_mib"),
]


def table(parts: dict[str, dict[str, Any]]) -> str:
    """The report as a Markdown table, one column per part."""
    names = list(parts)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, key in ROWS:
        cells = []
        for name in names:
            value = parts[name][key]
            cells.append(str(sum(value.values())) if isinstance(value, dict) else str(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="total duration (both parts together)")
    parser.add_argument("--part", choices=["both", "engine", "cache"], default="both")
    parser.add_argument("--engine-share", type=float, default=0.5, help="share of the time for the engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="soak.json", help="where to write the report (JSON)")
    args = parser.parse_args(argv)
    total = args.minutes * 60
    share = {"both": args.engine_share, "engine": 1.0, "cache": 0.0}[args.part]
    parts: dict[str, dict[str, Any]] = {}
    if share > 0:
        parts["engine"] = soak_engine(total * share, args.seed).as_dict()
    if share < 1:
        parts["cache"] = soak_cache(total * (1 - share), args.seed).as_dict()
    ok = all(not (p["leaked_cells"] or p["mismatches"] or p["unexpected_errors"]) for p in parts.values())
    report = {"minutes": args.minutes, "seed": args.seed, "ok": ok, "parts": parts}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(table(parts))
    for name, part in parts.items():
        print(f"\n{name}: expected errors {part['expected_errors']}")
        print(f"{name}: workload {part['workload']}")
        for example in part["examples"]:
            print(f"{name}: {example}")
    verdict = "no leak, no mismatch, no unexpected error" if ok else "PROBLEMS: see above"
    print(f"\nreport: {args.json}; {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

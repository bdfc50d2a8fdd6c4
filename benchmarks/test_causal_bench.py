"""CausalCache targets (issue 3): decode-step bookkeeping, bytes per token, defragmentation under churn.

Run: ``python -m pytest benchmarks/test_causal_bench.py --benchmark-enable`` (figures in docs/causal.md).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.capacity import run_churn
from kvarray.causal import CausalCache
from kvarray.spec import KVSpec

SPEC16 = KVSpec(num_layers=16, num_kv_heads=8, head_dim=64, dtype="float16")
CONTEXT = 32  # cached tokens per sequence before the measured decode step


@pytest.mark.parametrize("view", ["pages", "pool"])
@pytest.mark.parametrize("sequences", [8, 16, 32, 64])
def test_decode_step(benchmark, sequences: int, view: str) -> None:
    """start_forward + put + get over 16 layers for one decode token per sequence (us per step)."""
    cache = CausalCache(SPEC16, capacity=sequences * (CONTEXT + 2), max_sequences=sequences, xp=np)
    seqs = np.arange(sequences)
    for s in range(sequences):  # prefill one sequence at a time, then the batch decodes in lockstep
        cache.start_forward([s] * CONTEXT, list(range(CONTEXT)))
    rows = np.zeros((sequences, SPEC16.num_kv_heads, SPEC16.head_dim), np.float16)
    positions = np.full(sequences, CONTEXT)

    def rewind() -> None:
        for s in range(sequences):
            cache.remove(s, CONTEXT)

    def decode_step() -> None:
        cache.start_forward(seqs, positions)
        for layer in range(SPEC16.num_layers):
            cache.put(layer, rows, rows)
            cache.get(layer, view)

    benchmark.pedantic(decode_step, setup=rewind, rounds=60, warmup_rounds=5)
    benchmark.extra_info.update(sequences=sequences, view=view, n_kv=cache.stats().n_kv)


@pytest.mark.parametrize("sequences", [8, 16, 32, 64])
def test_decode_copy_floor(benchmark, sequences: int) -> None:
    """The bytes a decode step must move, without a cache: 16 layers x (keys, values) of one row per
    sequence written by NumPy fancy assignment into pools of the same size (us per step). Subtracted from
    `test_decode_step` it leaves the cache's own cost."""
    capacity = sequences * (CONTEXT + 2)
    shape = (capacity, SPEC16.num_kv_heads, SPEC16.head_dim)
    pools = [np.zeros(shape, np.float16) for _ in range(2 * SPEC16.num_layers)]
    rows = np.zeros((sequences, *shape[1:]), np.float16)
    cells = np.arange(sequences) * (CONTEXT + 2) + CONTEXT

    def copies() -> None:
        for pool in pools:
            pool[cells] = rows

    benchmark.pedantic(copies, rounds=60, warmup_rounds=5)
    benchmark.extra_info.update(sequences=sequences, bytes=2 * SPEC16.num_layers * rows.nbytes)


@pytest.mark.parametrize("sequences", [8, 16, 32, 64])
def test_decode_bookkeeping_only(benchmark, sequences: int) -> None:
    """start_forward + the plan's page table and pool bias, no kernel calls (us per step)."""
    cache = CausalCache(SPEC16, capacity=sequences * (CONTEXT + 2), max_sequences=sequences, xp=np)
    for s in range(sequences):
        cache.start_forward([s] * CONTEXT, list(range(CONTEXT)))
    seqs, positions = np.arange(sequences), np.full(sequences, CONTEXT)

    def rewind() -> None:
        for s in range(sequences):
            cache.remove(s, CONTEXT)

    def plan_step() -> None:
        plan = cache.start_forward(seqs, positions)
        _ = plan.page_table, plan.bias

    benchmark.pedantic(plan_step, setup=rewind, rounds=200, warmup_rounds=5)
    benchmark.extra_info.update(sequences=sequences, n_kv=cache.stats().n_kv)


@pytest.mark.parametrize(
    "kv_dtype", ["float16", "int8", ("int8", "float16")], ids=["float16", "int8", "k8v16"]
)
def test_bytes_per_token(benchmark, kv_dtype) -> None:
    """Bytes per token reported by stats(); int8 (group 32) must be <= 0.535 x float16."""
    cache = CausalCache(SPEC16, capacity=64, max_sequences=1, kv_dtype=kv_dtype, xp=np)
    stats = benchmark(cache.stats)
    ratio = stats.bytes_per_token / SPEC16.bytes_per_token("float16")
    benchmark.extra_info.update(bytes_per_token=stats.bytes_per_token, ratio_to_float16=ratio)
    if kv_dtype == "int8":
        assert ratio <= 0.535


def churn(cache: CausalCache, steps: int, seed: int = 0) -> float:
    """The churn workload (`benchmarks.capacity.run_churn`); returns the mean n_kv / used cells."""
    n_kv, used = run_churn(cache, steps, seed)
    return float(np.mean([n / max(u, 1) for n, u in zip(n_kv, used, strict=True)]))


@pytest.mark.parametrize("threshold", [None, 0.1], ids=["no-defrag", "defrag-0.1"])
def test_defrag_churn(benchmark, threshold) -> None:
    """n_kv / used cells on a churn workload with and without defragmentation; time per MiB moved."""
    spec = KVSpec(num_layers=16, num_kv_heads=2, head_dim=64, dtype="float16")
    cache = CausalCache(spec, capacity=4096, max_sequences=16, defrag_threshold=threshold, xp=np)
    start = time.perf_counter()
    mean_ratio = churn(cache, steps=300)
    churn_seconds = time.perf_counter() - start
    stats = cache.stats()
    snapshot = cache.state_dict()
    moved: list[int] = []

    def restore() -> None:
        cache.load_state_dict(snapshot)

    def forced_defrag() -> None:
        moved.append(cache.defrag().cells_moved)

    benchmark.pedantic(forced_defrag, setup=restore, rounds=10)
    mib = moved[-1] * stats.bytes_per_token / 2**20
    benchmark.extra_info.update(
        mean_n_kv_over_used=round(mean_ratio, 3), defrags_during_churn=stats.defrags,
        cells_moved_during_churn=stats.cells_moved, churn_seconds=round(churn_seconds, 3),
        forced_defrag_mib=round(mib, 3),
        forced_defrag_ms_per_mib=round(benchmark.stats.stats.median * 1e3 / mib, 3) if mib else None,
    )
    print(f"\n{threshold=}: mean n_kv/used {mean_ratio:.3f}, defrags {stats.defrags}, "
          f"forced defrag moved {mib:.2f} MiB in {benchmark.stats.stats.median * 1e3:.2f} ms")

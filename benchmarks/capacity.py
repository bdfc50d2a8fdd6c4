"""Figures of the benchmark report that are counts, not timings, measured with kvarray's own API.

- `memory_per_token`: bytes one token takes over all layers (keys + values, int8 scales included), read
  from `CacheStats.bytes_per_token` of a small cache of each spec and storage.
- `capacity`: requests that fit in a fixed memory budget. The budget buys ``budget // bytes_per_token``
  cells; requests (a prompt whose first `shared` tokens are one common system prompt, then their own
  tokens and their generated tokens) are started in a `CausalCache` of that many cells until it refuses
  one with `CacheFull`. With prefix sharing each request after the first takes the common prefix with
  `copy_prefix` (no cells) and allocates only its own tokens.
- `churn_series`: n_kv and used cells after every step of the churn workload of
  ``benchmarks/test_causal_bench.py::churn`` (same spec, capacity, rates and seed), with and without
  defragmentation: the timeline behind that benchmark's mean n_kv / used.

Deterministic: the same numbers on every machine, so no repeats or medians are needed.

    python -m benchmarks.capacity          # prints the three tables as JSON
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from kvarray import CacheFull, CausalCache, KVSpec, TooManySequences

#: The bench Llama's cache spec (models/build.py --bench: 8 layers, 2 kv heads of 64), stored float16.
BENCH_SPEC = KVSpec(num_layers=8, num_kv_heads=2, head_dim=64, dtype="float16")
#: A Llama-3-8B-shaped spec (32 layers, 8 kv heads of 128), for scale.
LLAMA8B_SPEC = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16")
SPECS = {"bench Llama (8 x 2 x 64)": BENCH_SPEC, "Llama-3-8B shape (32 x 8 x 128)": LLAMA8B_SPEC}
#: The fixed K/V budget of the capacity figure: 64 MiB.
BUDGET_BYTES = 64 << 20
#: Storage choices: a name and the `kv_dtype` argument of `CausalCache`.
STORAGES: dict[str, str | tuple[str, str]] = {
    "float32": "float32",
    "float16": "float16",
    "int8 keys, float16 values": ("int8", "float16"),
    "int8": "int8",
}


def bytes_per_token(spec: KVSpec, kv_dtype: str | tuple[str, str]) -> int:
    """Bytes per token over all layers (keys + values, scales included) from a 32-cell cache's stats."""
    with CausalCache(spec, capacity=32, max_sequences=1, kv_dtype=kv_dtype, xp=np) as cache:
        return cache.stats().bytes_per_token


def memory_per_token() -> list[dict[str, object]]:
    """One row per (spec, storage): bytes per token and the ratio to float16 storage of the same spec."""
    rows: list[dict[str, object]] = []
    for spec_name, spec in SPECS.items():
        half = bytes_per_token(spec, "float16")
        for storage, kv_dtype in STORAGES.items():
            n = bytes_per_token(spec, kv_dtype)
            rows.append(dict(spec=spec_name, storage=storage, bytes_per_token=n, ratio_to_float16=n / half))
    return rows


@dataclass(frozen=True)
class Requests:
    """The capacity workload: every request has `prompt` tokens, of which the first `shared` are the same
    system prompt, and generates `output` tokens; all of them are held in the cache at once."""

    prompt: int = 320
    shared: int = 256
    output: int = 128

    @property
    def tokens(self) -> int:
        return self.prompt + self.output


def requests_that_fit(
    cells: int,
    requests: Requests,
    sharing: bool,
    spec: KVSpec = BENCH_SPEC,
    kv_dtype: str | tuple[str, str] = "float16",
) -> int:
    """Requests of `requests` started in a cache of `cells` cells before it refuses one (`CacheFull`).

    Each request is one sequence allocated at its full length (prompt plus output). With `sharing`, every
    request after the first takes the first ``requests.shared`` cells of the first one (`copy_prefix`) and
    allocates the rest; without it, it allocates all ``requests.tokens``.
    """
    cache = CausalCache(spec, capacity=cells, max_sequences=cells, kv_dtype=kv_dtype, xp=np)
    fitted = 0
    try:
        while True:
            seq = fitted
            begin = requests.shared if sharing and seq > 0 else 0
            if begin:
                cache.copy_prefix(0, seq, begin)
            try:
                cache.start_forward([seq] * (requests.tokens - begin), np.arange(begin, requests.tokens))
            except (CacheFull, TooManySequences):
                return fitted
            fitted += 1
    finally:
        cache.close()


def capacity(
    budget_bytes: int = BUDGET_BYTES, requests: Requests = Requests(), spec: KVSpec = BENCH_SPEC
) -> list[dict[str, object]]:
    """Requests that fit in `budget_bytes` of K/V for float16 and int8 storage, with and without prefix
    sharing; one row each, with the cells the budget buys and the ratio to float16 without sharing."""
    rows: list[dict[str, object]] = []
    for storage in ("float16", "int8"):
        per_token = bytes_per_token(spec, storage)
        cells = budget_bytes // per_token
        for sharing in (False, True):
            fit = requests_that_fit(cells, requests, sharing, spec, storage)
            rows.append(
                dict(
                    storage=storage,
                    prefix_sharing=sharing,
                    bytes_per_token=per_token,
                    cells=cells,
                    requests=fit,
                    tokens_per_request=requests.tokens,
                )
            )
    base = rows[0]["requests"]
    for row in rows:
        row["ratio_to_float16"] = row["requests"] / base if base else float("nan")  # type: ignore[operator]
    return rows


#: The churn workload of benchmarks/test_causal_bench.py::test_defrag_churn.
CHURN_SPEC = KVSpec(num_layers=16, num_kv_heads=2, head_dim=64, dtype="float16")
CHURN_CAPACITY, CHURN_SEQUENCES, CHURN_STEPS = 4096, 16, 300


@dataclass
class ChurnSeries:
    """Per step of the churn workload: `n_kv [steps]` and `used [steps]` cells, and the defrags run."""

    threshold: float | None
    n_kv: list[int]
    used: list[int]
    defrags: int
    cells_moved: int

    @property
    def ratios(self) -> list[float]:
        """n_kv / used cells per step (1.0 is a compact pool up to the rounding to 32)."""
        return [n / max(u, 1) for n, u in zip(self.n_kv, self.used, strict=True)]

    @property
    def mean_ratio(self) -> float:
        return float(np.mean(self.ratios))


def run_churn(cache: CausalCache, steps: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """The churn workload on `cache`: sequences of random prompt lengths (8-119) start (up to 12 running),
    decode one token a step and finish (8 % a step). Returns n_kv ``[steps]`` and used cells ``[steps]``
    after every step. Also the workload of ``benchmarks/test_causal_bench.py::test_defrag_churn``."""
    rng = np.random.default_rng(seed)
    lengths: dict[int, int] = {}
    next_id = 0
    n_kv: list[int] = []
    used: list[int] = []
    for _ in range(steps):
        for seq in [s for s in lengths if rng.random() < 0.08]:  # finished sequences leave
            cache.remove(seq)
            del lengths[seq]
        while len(lengths) < 12:  # new ones arrive with a prompt
            prompt = int(rng.integers(8, 120))
            if cache.stats().cells_free < prompt + 32:
                break
            cache.start_forward([next_id] * prompt, list(range(prompt)))
            lengths[next_id] = prompt
            next_id += 1
        if lengths:
            seqs = list(lengths)
            cache.start_forward(seqs, [lengths[s] for s in seqs])
            for s in seqs:
                lengths[s] += 1
        stats = cache.stats()
        n_kv.append(stats.n_kv)
        used.append(stats.cells_used)
    return n_kv, used


def churn_series(threshold: float | None, steps: int = CHURN_STEPS, seed: int = 0) -> ChurnSeries:
    """Run the churn workload (`run_churn`) on a fresh cache with `threshold` as its defrag threshold,
    recording n_kv and used cells per step."""
    cache = CausalCache(CHURN_SPEC, CHURN_CAPACITY, CHURN_SEQUENCES, defrag_threshold=threshold, xp=np)
    n_kv, used = run_churn(cache, steps, seed)
    stats = cache.stats()
    cache.close()
    return ChurnSeries(threshold, n_kv, used, stats.defrags, stats.cells_moved)


def measure() -> dict[str, object]:
    """All three figures as one JSON-ready dict (the report's ``capacity.json``)."""
    churn = {name: churn_series(threshold) for name, threshold in (("no-defrag", None), ("defrag-0.1", 0.1))}
    return dict(
        memory_per_token=memory_per_token(),
        capacity=dict(
            budget_bytes=BUDGET_BYTES,
            spec="bench Llama (8 x 2 x 64)",
            workload=asdict(Requests()),
            rows=capacity(),
        ),
        churn={name: dict(asdict(s), mean_ratio=s.mean_ratio) for name, s in churn.items()},
    )


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1)[:4000])

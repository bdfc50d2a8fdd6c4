"""The engine benchmarks' workloads, shared by every peer (NumPy and the standard library only: the
onnxruntime-genai runner imports it from its own environment).

- `equal_prompts`: B seeded prompts of one length (byte tokens, ids 0-255 of the bench tokenizer).
- `serving_workload`: N requests with uniform prompt and output lengths and Poisson arrivals in seconds
  (exponential gaps of mean ``1 / rate``), all from one seed.
- `run_static`: the static-batching practice of the peers without continuous batching: requests are taken
  in arrival order, 16 at a time; a batch starts when its last request has arrived and the previous batch
  is done, is left-padded to its longest prompt and generates its longest output (each request keeps its
  own length); its requests finish when the batch returns.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SEED = 6
PROMPT = 128
NEW_TOKENS = 128
SIZES = (1, 4, 16)
STATIC_BATCH = 16
PAD = 258  # the bench tokenizer's <pad>; never a prompt token (prompts are bytes 0-255)


def equal_prompts(batch: int, length: int = PROMPT, seed: int = SEED) -> list[list[int]]:
    """`batch` prompts of `length` byte tokens (the same prompts for every peer)."""
    rng = np.random.default_rng([seed, batch, length])
    return rng.integers(0, 256, (batch, length)).tolist()


@dataclass(frozen=True)
class ServingSpec:
    """The serving workload: `requests` requests, prompt and output lengths uniform in the given closed
    ranges, arrivals a Poisson process of `rate` requests per second (the first at 0 s)."""

    requests: int = 64
    prompt: tuple[int, int] = (16, 512)
    output: tuple[int, int] = (16, 256)
    rate: float = 4.0
    seed: int = SEED

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the run
    prompt: list[int]
    max_new_tokens: int


def serving_workload(spec: ServingSpec) -> list[Arrival]:
    rng = np.random.default_rng([spec.seed, spec.requests])
    lengths = rng.integers(spec.prompt[0], spec.prompt[1] + 1, spec.requests)
    outputs = rng.integers(spec.output[0], spec.output[1] + 1, spec.requests)
    gaps = rng.exponential(1.0 / spec.rate, spec.requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    return [
        Arrival(float(t), rng.integers(0, 256, int(n)).tolist(), int(m))
        for t, n, m in zip(arrivals, lengths, outputs, strict=True)
    ]


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(tokens agreeing, tokens compared): per sequence, the common prefix of the two greedy outputs."""
    agree = total = 0
    for a, b in zip(reference, other, strict=True):
        n = min(len(a), len(b))
        total += len(a)
        k = next((i for i in range(n) if a[i] != b[i]), n)
        agree += k
    return agree, total


def left_pad(prompts: Sequence[Sequence[int]], pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids [B, L]`` left-padded with `pad` and ``attention_mask [B, L]`` (int64)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


#: ``generate(prompts, max_new_tokens) -> (outputs, seconds from the call to its first token)``
BatchGenerate = Callable[[list[list[int]], int], tuple[list[list[int]], float]]


def run_static(
    arrivals: Sequence[Arrival], generate: BatchGenerate, batch: int = STATIC_BATCH
) -> dict[str, Any]:
    """Serve `arrivals` in static batches of `batch` in real time; the figures of `summarize`."""
    start = time.perf_counter()
    finish: list[float] = []
    first: list[float] = []
    outputs: list[list[int]] = []
    for k in range(0, len(arrivals), batch):
        group = arrivals[k : k + batch]
        wait = group[-1].at - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        begin = time.perf_counter() - start
        longest = max(a.max_new_tokens for a in group)
        out, ttft = generate([a.prompt for a in group], longest)
        end = time.perf_counter() - start
        for a, tokens in zip(group, out, strict=True):
            outputs.append(list(tokens[: a.max_new_tokens]))
            first.append(begin + ttft - a.at)
            finish.append(end - a.at)
    total = time.perf_counter() - start
    return summarize(arrivals, total, first, finish, outputs, batches=-(-len(arrivals) // batch))


def summarize(
    arrivals: Sequence[Arrival],
    total: float,
    first: Sequence[float],
    finish: Sequence[float],
    outputs: Sequence[Sequence[int]],
    **extra: Any,
) -> dict[str, Any]:
    """Time to finish all (s, from the first arrival), time to first token and latency per request (s)."""
    generated = sum(a.max_new_tokens for a in arrivals)
    return dict(
        finish_all_s=round(total, 3),
        ttft_median_s=round(statistics.median(first), 3),
        ttft_p90_s=round(float(np.percentile(first, 90)), 3),
        latency_median_s=round(statistics.median(finish), 3),
        generated_tokens=generated,
        prompt_tokens=sum(len(a.prompt) for a in arrivals),
        tokens_per_s=round(generated / total, 1),
        outputs=[list(o) for o in outputs],
        **extra,
    )

"""Helpers of the engine-side reliability tests: the tiny models, engines, clean reference runs, and a
fault to inject (a module of its own: tests/reliability has no conftest; each test file puts this folder
on ``sys.path``)."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvarray.ort import Engine, EngineConfig, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
TINY = MODELS / "tiny-llama-random"  # random weights, byte vocabulary of 259, context 256
T5 = MODELS / "tiny-t5-random"
GRAPH = TINY / "native" / "decoder_step.pool.float32.onnx"
NEW_TOKENS = 16
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)


class InjectedFault(RuntimeError):
    """The failure the tests inject (a plain exception: the engine must not rely on kvarray's own)."""


def reference() -> tuple[list[list[int]], list[list[int]]]:
    """transformers' prompts (7, 12 and 3 tokens) and greedy tokens (16 each) of the random tiny Llama."""
    data = np.load(TINY / "reference.npz")
    count = len([n for n in data.files if n.startswith("prompt_")])
    return (
        [data[f"prompt_{k}"].tolist() for k in range(count)],
        [data[f"generated_{k}"].tolist() for k in range(count)],
    )


def config(**options: Any) -> EngineConfig:
    """A small engine config (128 cells, 4 sequences, one ONNX Runtime thread) with `options` changed."""
    base: dict[str, Any] = {"capacity": 128, "max_sequences": 4, "threads": 1}
    base.update(options)
    return EngineConfig(**base)


def engine(graph: str = "native", **options: Any) -> Engine:
    """An engine over the random tiny Llama (`config` options; graph "native" or "optimum")."""
    return Engine.from_model_dir(TINY, config(**options), graph=graph)


@functools.cache
def _alone(prompt: tuple[int, ...], max_new_tokens: int, graph: str, options: tuple) -> tuple[int, ...]:
    eng = engine(graph, max_sequences=1, **dict(options))
    try:
        (out,) = eng.generate([list(prompt)], SamplingParams(max_new_tokens=max_new_tokens))
    finally:
        eng.close()
    return tuple(out)


def alone(
    prompts: Sequence[Sequence[int]], max_new_tokens: int = NEW_TOKENS, graph: str = "native", **options: Any
) -> list[list[int]]:
    """Greedy tokens of each prompt run by itself on a fresh engine (the clean run to compare with)."""
    key = tuple(sorted(options.items()))
    return [list(_alone(tuple(int(t) for t in p), max_new_tokens, graph, key)) for p in prompts]


def random_prompts(count: int, seed: int, low: int = 2, high: int = 24) -> list[list[int]]:
    """`count` random prompts of `low`..`high` byte tokens (ids 0..255)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(low, high + 1))).tolist() for _ in range(count)]


def fail_when(eng: Engine, poisoned: Callable[[Any], bool]) -> list[int]:
    """Make ``eng.runner.forward`` raise `InjectedFault` for a batch where ``poisoned(batch)`` is true
    (after binding, before the run: the pass's cells are assigned). Returns the list of batch sizes
    that failed, appended to as it happens."""
    original = eng.runner.forward
    failures: list[int] = []

    def forward(cache: Any, plan: Any, batch: Any) -> Any:
        if poisoned(batch):
            failures.append(len(batch.fed))
            raise InjectedFault(f"injected: a pass of {len(batch.fed)} requests")
        return original(cache, plan, batch)

    eng.runner.forward = forward  # type: ignore[method-assign]
    return failures


def holds(batch: Any, *request_ids: int) -> bool:
    """True when one of `request_ids` feeds a token to `batch`."""
    return any(req.id in request_ids for req, _ in batch.fed)


def copy_model(tmp: Path, model: Path = TINY) -> Path:
    """A writable copy of a model folder (checkpoint/ and native/; optimum/ left out) under `tmp`."""
    out = tmp / model.name
    for part in ("checkpoint", "native"):
        shutil.copytree(model / part, out / part)
    return out


def live_cells(eng: Engine) -> int:
    """Distinct cells held by the engine's live sequences (what ``cells_used`` must equal)."""
    cache = eng.cache
    tables = [cache.cell_table(seq)[0] for seq in cache.sequences()]
    return len(np.unique(np.concatenate(tables))) if tables else 0

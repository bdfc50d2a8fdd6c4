"""Paths, constants and reference loaders shared by the engine tests (a module of their own: conftest
names collide)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODELS = Path(__file__).resolve().parents[2] / "models"
TINY = MODELS / "tiny-llama-random"
TRAINED = MODELS / "tiny-llama"
NEW_TOKENS = 16  # greedy tokens per prompt in reference.npz
T5 = MODELS / "tiny-t5-random"
WHISPER = MODELS / "tiny-whisper-random"


def seq2seq_reference(arch: str) -> tuple[str, list, list[list[int]], list[list[int]]]:
    """(architecture, encoder sources, decoder prompts, expected greedy tokens) of the tiny "t5" or
    "whisper" model, from its reference.npz (transformers' greedy `generate`)."""
    from kvarray.export.reference import reference_sources

    ref = dict(np.load({"t5": T5, "whisper": WHISPER}[arch] / "reference.npz"))
    count = len([n for n in ref if n.startswith("prompt_")])
    prompts = [ref[f"prompt_{k}"].tolist() for k in range(count)]
    expected = [ref[f"generated_{k}"].tolist() for k in range(count)]
    return arch, reference_sources(ref), prompts, expected


def run_arrivals(
    eng: Any,
    arrivals: dict[int, list[list[int]]],
    params: Any = None,
    after_step: Callable[[], None] | None = None,
) -> dict[int, list[int]]:
    """Step the engine, adding the prompts of `arrivals` (step -> prompts) at their steps with `params`
    (default: greedy, `NEW_TOKENS` new tokens), calling `after_step` after each step; the outputs, by
    request order."""
    from kvarray.ort import SamplingParams

    params = SamplingParams(max_new_tokens=NEW_TOKENS) if params is None else params
    ids: dict[int, int] = {}
    step = 0
    while step <= max(arrivals) or eng.has_work:
        for prompt in arrivals.get(step, []):
            ids[len(ids)] = eng.add_request(prompt, params)
        eng.step()
        step += 1
        if after_step is not None:
            after_step()
    return {k: eng.pop(rid).output for k, rid in ids.items()}


def eight_arrivals(prompts: list[list[int]]) -> dict[int, list[list[int]]]:
    """Request k (prompt k % 3) arrives at step [0, 0, 1, 2, 3, 5, 8, 13][k]."""
    arrivals: dict[int, list[list[int]]] = {}
    for k, step in enumerate([0, 0, 1, 2, 3, 5, 8, 13]):
        arrivals.setdefault(step, []).append(prompts[k % 3])
    return arrivals

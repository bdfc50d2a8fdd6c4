"""Paths, constants and reference loaders shared by the engine tests (a module of their own: conftest
names collide)."""

from __future__ import annotations

from pathlib import Path

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

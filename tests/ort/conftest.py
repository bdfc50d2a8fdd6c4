"""Fixtures of the engine tests: the committed tiny models and their transformers references."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ort_models (import-mode=importlib)

from ort_models import TINY, seq2seq_reference  # noqa: E402


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    """transformers' greedy outputs of the random tiny Llama (models/tiny-llama-random/reference.npz)."""
    return dict(np.load(TINY / "reference.npz"))


@pytest.fixture(scope="session")
def prompts(reference) -> list[list[int]]:
    """The reference prompts, in order (7, 12 and 3 tokens)."""
    count = len([name for name in reference if name.startswith("prompt_")])
    return [reference[f"prompt_{k}"].tolist() for k in range(count)]


@pytest.fixture(scope="session")
def expected(reference, prompts) -> list[list[int]]:
    """The reference greedy tokens of each prompt."""
    return [reference[f"generated_{k}"].tolist() for k in range(len(prompts))]


@pytest.fixture(scope="module", params=["t5", "whisper"])
def seq2seq_model(request: pytest.FixtureRequest) -> tuple[str, list, list[list[int]], list[list[int]]]:
    """(architecture, encoder sources, decoder prompts, expected greedy tokens) of the tiny T5, then of the
    tiny Whisper (`ort_models.seq2seq_reference`)."""
    return seq2seq_reference(request.param)

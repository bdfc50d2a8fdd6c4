"""Fixtures of the exporter tests: the committed tiny models, and graphs exported into a temporary folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_driver, numpy_llama (import-mode=importlib)

MODELS = Path(__file__).resolve().parents[2] / "models"
TINY = MODELS / "tiny-llama-random"
TRAINED = MODELS / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_reference() -> dict[str, np.ndarray]:
    """transformers' greedy continuations and logits of the committed random tiny Llama."""
    return dict(np.load(TINY / "reference.npz"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """export(kv_dtype, view) -> graph path of the random tiny Llama, exported once per session."""
    from kvarray.export import export

    out = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str], Path] = {}

    def get(kv_dtype: str = "float32", view: str = "pool") -> Path:
        if (kv_dtype, view) not in cache:
            (cache[kv_dtype, view],) = export("llama", TINY / "checkpoint", out, kv_dtype=kv_dtype, view=view)
        return cache[kv_dtype, view]

    return get


def prompts_of(reference: dict[str, np.ndarray]) -> list[list[int]]:
    """The prompts stored in a reference.npz, in order."""
    return [
        reference[f"prompt_{k}"].tolist()
        for k in range(len([n for n in reference if n.startswith("prompt_")]))
    ]

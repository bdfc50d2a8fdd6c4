"""Fixtures of the exporter tests: the committed tiny models and graphs exported into a temporary folder.
The helpers they use live in export_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers and drivers (import-mode=importlib)

from export_helpers import TINY, Exports, load_reference  # noqa: E402


@pytest.fixture(scope="session")
def tiny_reference() -> dict[str, np.ndarray]:
    """transformers' greedy continuations and logits of the committed random tiny Llama."""
    return load_reference(TINY)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """export(kv_dtype, view) -> graph path of the random tiny Llama, exported once per session."""
    exports = Exports("llama", TINY, tmp_path_factory.mktemp("exports"))

    def get(kv_dtype: str = "float32", view: str = "pool") -> Path:
        (graph,) = exports(kv_dtype, view)
        return graph

    return get

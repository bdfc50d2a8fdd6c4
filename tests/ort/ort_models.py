"""Paths and constants shared by the engine tests (a module of its own: conftest names collide)."""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"
TINY = MODELS / "tiny-llama-random"
TRAINED = MODELS / "tiny-llama"
NEW_TOKENS = 16  # greedy tokens per prompt in reference.npz
T5 = MODELS / "tiny-t5-random"
WHISPER = MODELS / "tiny-whisper-random"


def seq2seq_sources(reference: dict, n_mels: int = 80) -> list:
    """The encoder inputs of a seq2seq reference.npz, as tests/export/seq2seq_driver.py makes them: T5's
    ``encoder_{k}`` token ids, or Whisper's ``[n_mels, 3000]`` features drawn from ``features_seed + k``."""
    import numpy as np

    count = len([n for n in reference if n.startswith("prompt_")])
    if "features_seed" in reference:
        seed = int(reference["features_seed"])
        return [
            np.random.default_rng(seed + k).standard_normal((n_mels, 3000), dtype=np.float32)
            for k in range(count)
        ]
    return [reference[f"encoder_{k}"] for k in range(count)]

"""Paths and constants shared by the engine tests (a module of its own: conftest names collide)."""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"
TINY = MODELS / "tiny-llama-random"
TRAINED = MODELS / "tiny-llama"
NEW_TOKENS = 16  # greedy tokens per prompt in reference.npz
T5 = MODELS / "tiny-t5-random"
WHISPER = MODELS / "tiny-whisper-random"

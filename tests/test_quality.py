"""The quality figures' machinery (benchmarks/quality.py) on a few held-out bytes of the trained tiny Llama.

What is asserted is what the full run (docs/quality.md) shows with a wide margin; the thresholds are a
few times the measured differences, not tuned to pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / "quality.py"
F32 = ("float32", "float32")


@pytest.fixture(scope="module")
def quality(import_path: Callable[[str, Path], ModuleType]) -> ModuleType:
    """benchmarks/quality.py, imported from its path (benchmarks/ is not a package)."""
    return import_path("kvarray_benchmarks_quality", QUALITY)


@pytest.fixture(scope="module")
def model(quality: ModuleType) -> Any:
    return quality.TinyLlama()


@pytest.fixture(scope="module")
def data(quality: ModuleType) -> np.ndarray:
    return quality.heldout()


def mean_bits(scored: list[Any], positions: slice = slice(None)) -> float:
    """Mean bits/byte of `Scored` results over their `positions`."""
    return float(np.concatenate([s.nats[positions] for s in scored]).mean()) / math.log(2)


@pytest.fixture(scope="module")
def windows(quality: ModuleType, data: np.ndarray) -> list[np.ndarray]:
    """The first 4 held-out evaluation windows, cut to 128 predicted bytes."""
    return [w[:129] for w in quality.eval_windows(data, 4)]


@pytest.fixture(scope="module")
def float32_scored(quality: ModuleType, model: Any, windows: list[np.ndarray]) -> list[Any]:
    """`windows` fed side by side, one byte per pass, over a float32 cache."""
    return quality.teacher_forced(model, model.cache(4 * 129, 4, F32), windows)


def test_float32_cache_equals_the_no_cache_pass(
    quality: ModuleType, model: Any, windows: list[np.ndarray], float32_scored: list[Any]
) -> None:
    """Fed one byte per pass, each prediction reads every earlier byte from the float32 cache: the same
    log-likelihoods as one pass over the whole window with no cache (past inputs [0, H, D])."""
    for window, scored in zip(windows, float32_scored, strict=True):
        alone = quality.score_logits(model.no_cache_logits(window[:-1]), window[1:])
        np.testing.assert_allclose(scored.nats, alone.nats, atol=2e-4)  # measured: 3e-6
        assert (scored.argmax == alone.argmax).all()


def test_no_cache_pass_matches_the_training_scripts_evaluation(
    quality: ModuleType, model: Any, data: np.ndarray
) -> None:
    """The whole held-out text in the training windows, one pass each: the bits/byte that training
    measured with torch (models/tiny-llama/metrics.json), to its 4 decimals."""
    metrics = json.loads((ROOT / "models" / "tiny-llama" / "metrics.json").read_text())
    if len(data) != metrics["heldout_bytes"]:
        pytest.skip(f"this Python's pydoc_data gives {len(data)} held-out bytes: not the training text")
    scored = [quality.score_logits(model.no_cache_logits(w[:-1]), w[1:]) for w in quality.eval_windows(data)]
    assert mean_bits(scored) == pytest.approx(metrics["heldout_bits_per_byte"], abs=2e-4)


@pytest.mark.parametrize(
    ("kv_dtype", "bound"),
    [(("float16", "float16"), 1e-3), (("int8", "int8"), 5e-3), (("float16", "int8"), 5e-3)],
    ids=["float16", "int8", "int8-values"],
)
def test_quantized_storage_costs_little(
    quality: ModuleType,
    model: Any,
    windows: list[np.ndarray],
    float32_scored: list[Any],
    kv_dtype: tuple[str, str],
    bound: float,
) -> None:
    """Perplexity within a small relative bound of float32 storage's (measured over the whole held-out
    text: under 0.01 % for each), and the most likely byte nearly always the same."""
    scored = quality.teacher_forced(model, model.cache(4 * 129, 4, kv_dtype), windows)
    ratio = 2 ** (mean_bits(scored) - mean_bits(float32_scored))  # perplexity ratio
    assert abs(ratio - 1) < bound
    same = np.concatenate([a.argmax == b.argmax for a, b in zip(scored, float32_scored, strict=True)])
    assert same.mean() > 0.98


def test_decoded_int8_pool_reads_like_the_int8_graph(
    quality: ModuleType, model: Any, windows: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storages without a graph of their own are dequantized and read by the float32 graph: for int8
    that scores like the int8 graph, which dequantizes inside."""
    kv = ("int8", "int8")
    assert model.graph_for(kv) == "int8"
    native = quality.teacher_forced(model, model.cache(129, 1, kv), windows[:1])[0]
    monkeypatch.setattr(model, "graph_for", lambda kv_dtype: "float32")
    decoded = quality.teacher_forced(model, model.cache(129, 1, kv), windows[:1])[0]
    np.testing.assert_allclose(decoded.nats, native.nats, atol=2e-4)


def test_chunked_full_cache_equals_one_byte_per_pass(
    quality: ModuleType, model: Any, data: np.ndarray
) -> None:
    text = data[:201].astype(np.int64)
    one = quality.teacher_forced(model, model.cache(201, 1, F32), [text])[0]
    chunked = quality.teacher_forced(model, model.cache(201, 1, F32), [text], chunk=64)[0]
    np.testing.assert_allclose(chunked.nats, one.nats, atol=2e-4)


def test_positions_in_cache_keep_the_sinks_first(quality: ModuleType, model: Any, data: np.ndarray) -> None:
    """StreamingLLM's positions: after the window fills, the sinks hold positions 0..3 and the rest follow
    without gaps; with no sinks the scores equal true positions' (RoPE depends on differences only)."""
    text = data[:97].astype(np.int64)
    cache = model.cache(36, 1, F32, window=32, sinks=4)
    quality.teacher_forced(model, cache, [text], reposition=True)
    _, positions = cache.cell_table(0)
    assert positions.tolist() == list(range(36))
    true = quality.teacher_forced(model, model.cache(32, 1, F32, window=32), [text])[0]
    moved = quality.teacher_forced(model, model.cache(32, 1, F32, window=32), [text], reposition=True)[0]
    np.testing.assert_allclose(moved.nats, true.nats, atol=2e-4)


def test_long_text_windows_against_the_full_cache(quality: ModuleType, model: Any, data: np.ndarray) -> None:
    """One 512-byte text, caches of 64 cells, positions [320, 512): the full cache is far worse than a
    window (beyond the training crops), sinks at true positions are worse than at positions in the cache,
    and sinks at positions in the cache are close to a window alone. Measured on 8 such texts: margins of
    at least 0.8, 0.02 and differences of at most 0.06 bits/byte."""
    text = data[1000:1513].astype(np.int64)
    late = slice(320, 512)
    full = quality.teacher_forced(model, model.cache(513, 1, F32), [text], chunk=64)[0]

    def windowed(window: int, sinks: int, reposition: bool) -> float:
        cache = model.cache(window + sinks, 1, F32, window=window, sinks=sinks)
        return mean_bits(quality.teacher_forced(model, cache, [text], reposition=reposition), late)

    window = windowed(64, 0, False)
    true_sinks = windowed(60, 4, False)
    cache_sinks = windowed(60, 4, True)
    assert mean_bits([full], late) > window + 0.5
    assert true_sinks > cache_sinks
    assert abs(cache_sinks - window) < 0.1

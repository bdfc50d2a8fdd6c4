"""Optimum decoder-only exports and float16 pools through the engine, against transformers' greedy outputs.

float16 pools (a native graph exported with kv_dtype float16, K/V stored and read in float16): measured on
the random tiny Llama, the greedy tokens equal the reference for all k = 16 of 16 on the three prompts, and
the teacher-forced logits differ from transformers' float32 logits by at most 1.6e-3 (bound tested: 5e-3;
float32 pools: 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
from ort_models import NEW_TOKENS, TINY, eight_arrivals, run_arrivals

from kvarray.errors import GraphMismatch
from kvarray.export import export
from kvarray.ort import Engine, EngineConfig, GraphKind, KVDtype, SamplingParams
from kvarray.ort.optimum import OptimumRunner
from kvarray.ort.scheduler import Batch
from kvarray.spec import KVSpec

GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)
FLOAT16_TOKENS = 16  # greedy tokens of the float16 pool equal to the reference (of NEW_TOKENS)
FLOAT16_LOGITS = 5e-3  # max |logits - transformers' logits| with float16 pools
OPTIMUM = TINY / "optimum" / "model.onnx"


def optimum(**options) -> Engine:
    config = {"capacity": 512, "max_sequences": 8, "prefill_chunk": 4, "threads": 1, **options}
    return Engine.from_model_dir(TINY, EngineConfig(**config), graph=GraphKind.OPTIMUM)


def teacher_forced_logits(eng: Engine, tokens: list[int], seq: int) -> np.ndarray:
    """``[len(tokens), vocab]`` logits of feeding `tokens` one pass per token (every row sampled)."""
    rows = []
    for pos, token in enumerate(tokens):
        plan = eng.cache.start_forward(np.array([seq]), np.array([pos]))
        batch = Batch(np.array([token]), np.array([seq]), np.array([pos]), np.array([0]), [], [], 0, 1)
        logits, _ = eng.runner.forward(eng.cache, plan, batch)
        rows.append(logits[0].copy())
    eng.cache.remove(seq)
    return np.stack(rows)


def test_the_runner_is_picked_from_the_graph_names():
    eng = Engine(OPTIMUM, EngineConfig(threads=1))
    assert isinstance(eng.runner, OptimumRunner) and eng.info is None
    assert eng.spec == KVSpec(2, 2, 16, "float32") and eng.vocab_size == 259
    assert Engine.from_model_dir(TINY, EngineConfig(threads=1)).runner.kind == "native"  # auto: native first


@pytest.mark.parametrize("chunk", [256, 4])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_optimum_one_request_alone_equals_transformers(prompts, expected, k, chunk):
    eng = optimum(prefill_chunk=chunk)
    assert eng.generate([prompts[k]], GREEDY) == [expected[k]]
    assert eng.stats().cells_used == 0


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_optimum_eight_requests_arriving_at_different_steps_equal_transformers(
    prompts, expected, prefix_sharing
):
    """Prefill chunks (right-padded to [B, 4]) and decodes ([B, 1]) share each step's plan."""
    eng = optimum(prefix_sharing=prefix_sharing)
    outputs = run_arrivals(eng, eight_arrivals(prompts))
    assert [outputs[k] for k in range(8)] == [expected[k % 3] for k in range(8)]
    m = eng.metrics
    assert m.generated_tokens == 8 * NEW_TOKENS and m.steps < 8 * NEW_TOKENS
    assert (m.shared_tokens > 0) == prefix_sharing
    assert eng.stats().cells_used == 0


def test_optimum_logits_equal_transformers(reference, prompts, expected):
    eng = optimum()
    for k in range(3):
        logits = teacher_forced_logits(eng, prompts[k] + expected[k], seq=50 + k)
        np.testing.assert_allclose(logits, reference[f"logits_{k}"], atol=1e-4)


def test_optimum_with_int8_storage_keeps_the_reference_tokens(prompts, expected):
    """The cache stores int8; the gathered view dequantizes for the float32 graph (as test_modes, native)."""
    eng = optimum(kv_dtype=KVDtype.INT8, prefill_chunk=5)
    assert eng.cache.kv_dtype == ("int8", "int8")
    assert eng.generate(prompts, GREEDY) == expected


def test_optimum_with_a_window_is_exact_while_nothing_left_it(prompts, expected):
    """Window 16 + 4 sinks: a prompt of P tokens is exact for its first 16 + 4 - P + 1 tokens (test_modes)."""
    eng = optimum(window=16, sinks=4, capacity=128)
    outputs = eng.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, out, ref in zip(prompts, outputs, expected, strict=True):
        exact = min(NEW_TOKENS, 16 + 4 - len(prompt) + 1)
        assert out[:exact] == ref[:exact]


def test_optimum_graph_against_a_wrong_spec_is_listed():
    with pytest.raises(GraphMismatch, match=r"missing past_key_values\.2\.key"):
        Engine(OPTIMUM, spec=KVSpec(3, 2, 16, "float32"))
    with pytest.raises(GraphMismatch, match=r"past_key_values\.0\.key .* \(expected \[batch, 4, past, 8\]\)"):
        Engine(OPTIMUM, spec=KVSpec(2, 4, 8, "float32"))


@pytest.fixture(scope="module")
def float16_graph(tmp_path_factory):
    """The random tiny Llama's native graph with float16 past (not committed: exported here, ~1 s)."""
    out = tmp_path_factory.mktemp("float16")
    return export("llama", TINY / "checkpoint", out, kv_dtype="float16", view="pool")[0]


def test_float16_pools_keep_the_reference_greedy_tokens(float16_graph, reference, prompts, expected):
    config = EngineConfig(capacity=512, max_sequences=8, prefill_chunk=4, threads=1, kv_dtype=KVDtype.FLOAT16)
    eng = Engine(float16_graph, config)
    assert eng.cache.kv_dtype == ("float16", "float16")
    outputs = run_arrivals(eng, eight_arrivals(prompts))
    for k in range(8):
        assert outputs[k][:FLOAT16_TOKENS] == expected[k % 3][:FLOAT16_TOKENS]
    for k in range(3):
        logits = teacher_forced_logits(eng, prompts[k] + expected[k], seq=50 + k)
        assert np.abs(logits - reference[f"logits_{k}"]).max() < FLOAT16_LOGITS
    f32 = Engine.from_model_dir(TINY, EngineConfig(threads=1)).stats().bytes_per_token
    assert eng.stats().bytes_per_token * 2 == f32


def test_optimum_with_float16_storage_keeps_the_reference_tokens(prompts, expected):
    """float16 pools under the float32 Optimum graph: the gathered view is cast once per layer."""
    eng = optimum(kv_dtype=KVDtype.FLOAT16)
    assert eng.generate(prompts, GREEDY) == expected

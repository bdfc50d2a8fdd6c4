"""Named errors of the engine; a refused request or a cancel leaves the other requests unaffected."""

from __future__ import annotations

import pytest
from ort_models import NEW_TOKENS, TINY

from kvarray.errors import (
    EmptyPrompt,
    GraphMismatch,
    PromptTooLong,
    SpecMismatch,
    UnknownRequest,
    UnknownToken,
    UnsupportedModel,
)
from kvarray.ort import Engine, EngineConfig, FinishReason, SamplingParams
from kvarray.spec import KVSpec

GRAPH = TINY / "native" / "decoder_step.pool.float32.onnx"
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)


def engine(**options) -> Engine:
    return Engine.from_model_dir(TINY, EngineConfig(capacity=128, max_sequences=4, threads=1, **options))


def test_graph_names_against_the_spec_are_listed():
    with pytest.raises(GraphMismatch) as err:
        Engine(GRAPH, spec=KVSpec(3, 2, 16, "float32"))  # the graph has 2 layers
    message = str(err.value)
    assert "missing past_key.2, past_value.2, new_key.2, new_value.2" in message
    assert "found inputs: input_ids, position_ids, past_key.0" in message
    assert isinstance(err.value, SpecMismatch)


def test_graph_shapes_against_the_spec_are_listed():
    with pytest.raises(GraphMismatch, match=r"past_key\.0 \['past_cells', 2, 16\] \(expected \[\*, 4, 8\]\)"):
        Engine(GRAPH, spec=KVSpec(2, 4, 8, "float32"))


def test_encoder_decoder_graphs_are_not_supported_yet():
    with pytest.raises(UnsupportedModel, match="not supported yet"):
        Engine(TINY.parent / "tiny-t5-random" / "native" / "decoder_step.pool.float32.onnx")


def test_refused_requests_leave_running_ones_unaffected(prompts, expected):
    eng = engine()
    first = eng.add_request(prompts[0], GREEDY)
    for _ in range(3):
        eng.step()
    with pytest.raises(EmptyPrompt):
        eng.add_request([], GREEDY)
    with pytest.raises(UnknownToken, match=r"\[259, -1\] are outside the vocabulary \[0, 259\)"):
        eng.add_request([1, 259, 2, -1], GREEDY)
    with pytest.raises(PromptTooLong, match="longer than the model context") as err:
        eng.add_request([1] * 257, GREEDY)  # context 256
    assert (err.value.length, err.value.limit) == (257, 256)
    with pytest.raises(PromptTooLong, match=r"longer than the cache \(128 tokens\)"):
        eng.add_request([1] * 129, GREEDY)
    with pytest.raises(UnknownRequest):
        eng.cancel(12345)
    second = eng.add_request(prompts[1], GREEDY)
    list(eng.stream())
    assert eng.request(first).output == expected[0] and eng.request(second).output == expected[1]
    assert len(eng.requests) == 2


def test_cancel_mid_flight_frees_the_cells_and_others_continue(prompts, expected):
    eng = engine()
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    for _ in range(5):
        eng.step()
    held = eng.cache.length(ids[1])
    used = eng.stats().cells_used
    assert held > 0
    eng.cancel(ids[1])
    assert eng.cache.length(ids[1]) == 0 and eng.stats().cells_used == used - held
    list(eng.stream())
    assert eng.request(ids[1]).finish_reason is FinishReason.CANCELLED
    assert eng.request(ids[1]).output == expected[1][:5]  # one token a step, prompts in the first
    assert eng.request(ids[0]).output == expected[0] and eng.request(ids[2]).output == expected[2]
    with pytest.raises(UnknownRequest):
        eng.cancel(ids[1])  # already finished


def test_cancel_a_waiting_request(prompts, expected):
    eng = engine()
    eng.scheduler.max_sequences = 1
    a, b = eng.add_request(prompts[0], GREEDY), eng.add_request(prompts[1], GREEDY)
    eng.step()
    eng.cancel(b)
    list(eng.stream())
    assert eng.request(a).output == expected[0] and eng.request(b).output == []


def test_invalid_sampling_parameters():
    from kvarray.errors import ConfigError

    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)

"""Naming conventions: every committed graph is recognised; mismatches list what was expected and found."""

from __future__ import annotations

import onnx
import pytest
from ort_models import MODELS

from kvarray.errors import GraphMismatch
from kvarray.ort import CONVENTIONS, check_names, match_convention


@pytest.mark.parametrize(
    "graph, convention",
    [
        ("tiny-llama-random/native/decoder_step.pool.float32.onnx", "native"),
        ("tiny-llama-random/native/decoder_step.pool.int8.onnx", "native-int8"),
        ("tiny-t5-random/native/decoder_step.pool.float32.onnx", "native-seq2seq"),
        ("tiny-whisper-random/native/decoder_step.pool.float32.onnx", "native-seq2seq"),
        ("tiny-llama-random/optimum/model.onnx", "optimum"),
        ("tiny-t5-random/optimum/decoder_model_merged.onnx", "optimum-seq2seq"),
        ("tiny-whisper-random/optimum/decoder_model_merged.onnx", "optimum-whisper"),
    ],
)
def test_committed_graphs_match_their_convention(graph, convention):
    model = onnx.load(str(MODELS / graph), load_external_data=False)
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    match = match_convention(inputs, outputs)
    assert (match.convention.name, match.num_layers) == (convention, 2)
    check_names(convention, 2, inputs, outputs)


def test_expected_names_per_layer():
    ins, outs = CONVENTIONS["optimum"].expected(2)
    assert ins == [
        "input_ids",
        "attention_mask",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]


def test_mismatch_lists_expected_and_found_names():
    inputs = [
        "input_ids",
        "position_ids",
        "past_key.0",
        "past_value.0",
        "attention_bias",
        "logits_index",
        "extra",
    ]
    with pytest.raises(GraphMismatch) as err:
        check_names("native", 2, inputs, ["logits", "new_key.0", "new_value.0"])
    message = str(err.value)
    assert "missing past_key.1, past_value.1, new_key.1, new_value.1; unexpected inputs extra" in message
    assert "expected: inputs input_ids, position_ids, attention_bias, logits_index, past_key.0" in message
    assert "found inputs: input_ids, position_ids, past_key.0" in message
    with pytest.raises(GraphMismatch, match="match no known convention"):
        match_convention(["tokens"], ["scores"])
    with pytest.raises(GraphMismatch, match="unknown naming convention 'onnx-genai'"):
        check_names("onnx-genai", 1, [], [])

"""Naming conventions: every committed graph is recognised (and the decode-view graph, exported here);
mismatches list what was expected and found."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from ort_models import MODELS, TINY

from kvarray.errors import ConfigError, GraphMismatch
from kvarray.export import export
from kvarray.ort import CONVENTIONS, Engine, EngineConfig, check_names, match_convention
from kvarray.ort.names import DECODE_NAMES, convention


def names(graph: Path) -> tuple[list[str], list[str]]:
    """The input and output names of an ONNX graph file, in order."""
    model = onnx.load(str(graph), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


@pytest.fixture(scope="module")
def decode_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny Llama's decode-view graph (2 layers), exported here."""
    (path,) = export("llama", TINY / "checkpoint", tmp_path_factory.mktemp("decode"), view="decode")
    return path


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
    inputs, outputs = names(MODELS / graph)
    match = match_convention(inputs, outputs)
    assert (match.convention.name, match.num_layers) == (convention, 2)
    check_names(convention, 2, inputs, outputs)


def test_the_decode_view_graph_matches_the_native_decode_convention(decode_graph):
    inputs, outputs = names(decode_graph)
    match = match_convention(inputs, outputs)
    assert (match.convention, match.num_layers) == (DECODE_NAMES, 2)
    check_names("native-decode", 2, inputs, outputs)
    assert convention("native-decode") is DECODE_NAMES is CONVENTIONS["native-decode"]
    assert DECODE_NAMES.expected(2) == (
        ["input_ids", "position_ids", "seqlens_k", "logits_index"]
        + ["past_key.0", "past_value.0", "past_key.1", "past_value.1"],
        ["logits", "present_key.0", "present_value.0", "present_key.1", "present_value.1"],
    )


def test_the_native_decode_names_are_still_importable_from_native():
    from kvarray.ort import native

    assert native.DECODE_NAMES is DECODE_NAMES


# (case, change of the decode graph's names: inputs, outputs -> inputs, outputs; what the message says)
DECODE_MISMATCHES = [
    ("no seqlens_k", lambda i, o: ([n for n in i if n != "seqlens_k"], o), "missing seqlens_k"),
    ("a bias too", lambda i, o: ([*i, "attention_bias"], o), "unexpected inputs attention_bias"),
    ("new_key outputs", lambda i, o: (i, [n.replace("present_", "new_") for n in o]),
     "missing present_key.0, present_value.0, present_key.1, present_value.1"),
    ("a third layer's past", lambda i, o: ([*i, "past_key.2", "past_value.2"], o),
     "unexpected inputs past_key.2, past_value.2"),
]  # fmt: skip


@pytest.mark.parametrize("case", DECODE_MISMATCHES, ids=[c[0] for c in DECODE_MISMATCHES])
def test_a_decode_mismatch_lists_expected_and_found_names(decode_graph, case):
    _, change, says = case
    inputs, outputs = change(*names(decode_graph))
    with pytest.raises(GraphMismatch) as err:
        check_names(DECODE_NAMES, 2, inputs, outputs)
    message = str(err.value)
    assert "do not match the 'native-decode' convention with 2 layers" in message and says in message
    assert "expected: inputs input_ids, position_ids, seqlens_k, logits_index, past_key.0" in message
    assert f"found inputs: {', '.join(inputs)}" in message
    assert f"found outputs: {', '.join(outputs)}" in message


def test_the_decode_and_pool_names_are_told_apart(decode_graph):
    """A pool-view graph is not a decode graph (attention_bias, new_key), nor the reverse (seqlens_k)."""
    pool = names(TINY / "native" / "decoder_step.pool.float32.onnx")
    with pytest.raises(GraphMismatch, match="unexpected inputs attention_bias"):
        check_names(DECODE_NAMES, 2, *pool)
    with pytest.raises(GraphMismatch, match="missing attention_bias"):
        check_names("native", 2, *names(decode_graph))


def test_an_engine_over_a_decode_graph_alone_says_to_pass_it_as_a_twin(decode_graph):
    with pytest.raises(ConfigError, match="decode-view graph .* twin_graph of the model's pool-view graph"):
        Engine(decode_graph, EngineConfig(threads=1))


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

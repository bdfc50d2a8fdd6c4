"""The exporter without transformers: optimized graph shape, config variants, bad checkpoints, the CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_helpers import TINY, drop_tensor, edit_config, prompts_of
from graph_driver import GraphDriver
from numpy_llama import LLAMA3_ROPE, forward, write_checkpoint

from kvarray.cli import main
from kvarray.errors import DTypeMismatch, MissingTensor, ShapeMismatch, SpecMismatch, UnsupportedModel
from kvarray.export import export


def optimized(path, tmp_path) -> onnx.ModelProto:
    """The graph as ONNX Runtime's CPU provider runs it after all its optimizations."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def test_optimized_graph_reads_the_pool_in_place(tmp_path):
    """Every read of past_key/past_value is a FusedMatMul: no Transpose copy of the pool is made."""
    model = optimized(TINY / "native" / "decoder_step.pool.float32.onnx", tmp_path)
    readers = Counter()
    for node in model.graph.node:
        for name in node.input:
            if name.startswith(("past_key.", "past_value.")):
                readers[node.op_type] += 1
                if node.op_type == "FusedMatMul":
                    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
                    assert attrs.get("transBatchB") == 1, node
    layers = 2
    assert readers["FusedMatMul"] == 2 * layers  # one for keys (scores), one for values (output)
    assert set(readers) <= {"FusedMatMul", "Shape"}, readers
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["SimplifiedLayerNormalization"] == 2 * layers + 1  # RMSNorm fused too
    assert ops["Transpose"] <= 2 * layers  # only the query/output reorders remain


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"partial_rotary_factor": 0.5},
        {"head_dim": 32, "num_key_value_heads": 1},
        LLAMA3_ROPE,
        {"rope_scaling": {"type": "default"}},
    ],
    ids=["plain", "tied-head", "biases", "partial-rotary", "mqa-head-dim", "llama3", "default-rope"],
)
def test_config_variants_match_numpy_forward(tmp_path, overrides):
    write_checkpoint(tmp_path / "ckpt", seed=3, **overrides)
    (graph,) = export("llama", tmp_path / "ckpt", tmp_path / "out")
    tokens = [5, 80, 81, 200, 7, 7, 40, 3, 99, 120, 33]
    expected = forward(str(tmp_path / "ckpt"), tokens)
    driver = GraphDriver(graph, first_cell=2)
    prefill = driver.step([0] * 6, tokens[:6], range(6))  # prefill 6, then decode the rest one by one
    decoded = [driver.step([0], [tok], [0])[0] for tok in tokens[6:]]
    np.testing.assert_allclose(np.vstack([prefill, *decoded]), expected, rtol=0, atol=1e-4)


def test_numpy_forward_agrees_with_the_committed_transformers_reference(tiny_reference):
    """The NumPy forward used above is itself checked against transformers' committed logits."""
    for k, prompt in enumerate(prompts_of(tiny_reference)):
        tokens = prompt + tiny_reference[f"generated_{k}"].tolist()
        np.testing.assert_allclose(
            forward(str(TINY / "checkpoint"), tokens), tiny_reference[f"logits_{k}"], rtol=0, atol=1e-4
        )


def write_bf16_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of BF16 tensors given as raw uint16 bits (by hand: NumPy has no bfloat16)."""
    header, offset, blobs = {}, 0, []
    for name, bits in tensors.items():
        data = np.ascontiguousarray(bits, dtype="<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(bits.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_bfloat16_checkpoint_is_read_exactly(tmp_path, ckpt):
    from safetensors.numpy import load_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in tensors.items()}  # bf16 = top half
    write_bf16_safetensors(ckpt / "model.safetensors", bits)
    from kvarray.export import Checkpoint

    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(
        Checkpoint(ckpt).tensor(name), (bits[name].astype(np.uint32) << 16).view(np.float32)
    )
    (graph,) = export("llama", ckpt, tmp_path / "out")  # and the whole checkpoint exports
    assert GraphDriver(graph).step([0, 0], [1, 2], [1]).shape == (1, 259)


# -- bad checkpoints ------------------------------------------------------------------------------------
@pytest.fixture()
def ckpt(tmp_path):
    write_checkpoint(tmp_path / "ckpt", seed=0)
    return tmp_path / "ckpt"


def test_missing_tensor_is_named(ckpt, tmp_path):
    drop_tensor(ckpt, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(MissingTensor, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        export("llama", ckpt, tmp_path / "out")


def test_untied_head_needs_lm_head(ckpt, tmp_path):
    drop_tensor(ckpt, "lm_head.weight")
    with pytest.raises(MissingTensor, match="lm_head.weight"):
        export("llama", ckpt, tmp_path / "out")


def test_shapes_that_contradict_the_config(ckpt, tmp_path):
    edit_config(ckpt, intermediate_size=100)
    with pytest.raises(
        ShapeMismatch, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[96, 64\].*\[100, 64\]"
    ):
        export("llama", ckpt, tmp_path / "out")


def test_heads_not_a_multiple_of_kv_heads(ckpt, tmp_path):
    edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(SpecMismatch, match="not a multiple of 3 kv heads"):
        export("llama", ckpt, tmp_path / "out")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not a Llama-family model"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_unsupported_configs(ckpt, tmp_path, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(UnsupportedModel, match=message):
        export("llama", ckpt, tmp_path / "out")


def test_unsupported_architectures_and_options(ckpt, tmp_path):
    with pytest.raises(UnsupportedModel, match="no exporter for architecture 'gpt2'"):
        export("gpt2", ckpt, tmp_path / "out")
    with pytest.raises(DTypeMismatch, match="gathered view"):
        export("llama", ckpt, tmp_path / "out", kv_dtype="int8", view="gathered")
    with pytest.raises(DTypeMismatch, match="bfloat16"):
        export("llama", ckpt, tmp_path / "out", kv_dtype="bfloat16")
    with pytest.raises(UnsupportedModel, match="unknown view 'paged'"):
        export("llama", ckpt, tmp_path / "out", view="paged")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export("llama", tmp_path / "nowhere", tmp_path / "out")


def test_int8_needs_rows_that_groups_of_32_tile(tmp_path):
    write_checkpoint(
        tmp_path / "ckpt", hidden_size=48, num_attention_heads=4, num_key_value_heads=1
    )  # 1 * 12
    with pytest.raises(ShapeMismatch, match="groups of 32"):
        export("llama", tmp_path / "ckpt", tmp_path / "out", kv_dtype="int8")


# -- the command line ------------------------------------------------------------------------------------
def test_cli_export_writes_and_prints_the_graph(tmp_path, capsys):
    status = main(
        ["export", str(TINY / "checkpoint"), str(tmp_path), "--arch", "llama", "--kv-dtype", "int8"]
    )
    printed = capsys.readouterr().out.split()
    assert status == 0
    assert printed == [str(tmp_path / "decoder_step.pool.int8.onnx")]
    session = ort.InferenceSession(printed[0], providers=["CPUExecutionProvider"])
    assert "past_key_scale.0" in [i.name for i in session.get_inputs()]

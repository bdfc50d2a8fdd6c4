"""The graph inputs, outputs and metadata every architecture declares alike (llama, t5, whisper).

Shapes: T tokens of the pass, S sequences, N pool cells, M encoder rows, KV kv heads, D head_dim.

    decoder step, first inputs   input_ids [T] int64, position_ids [T] int64,
                                 (gathered view) token_sequence [T] int64,
                                 per layer i: past_key.{i}, past_value.{i} (+ int8 scales): `declare_past`
    decoder step, cross inputs   per layer i: cross_key.{i}, cross_value.{i} [M, KV, D] float32,
                                 cross_bias [T, M] float32 (encoder-decoder models)
    decoder step, outputs        logits [S, vocab] float32, per layer new_key.{i}, new_value.{i} [T, KV, D]
    decode view (Llama)          input_ids, position_ids [S], seqlens_k [S] int32, per layer past_key.{i},
                                 past_value.{i} [S, KV, L, D] float32: `declare_decode_inputs`; outputs
                                 logits and per layer present_key.{i}, present_value.{i} [S, KV, L, D]
    encoder, outputs             per decoder layer i: cross_key.{i}, cross_value.{i} [rows, KV, D] float32,
                                 every layer's k and v projections packed into one MatMul

The architecture modules declare what lies between (T5's past_position_ids, attention_bias, logits_index)
themselves, in the order their module docstrings give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import DTypeMismatch, UnsupportedModel
from ..spec import KVSpec, RopeSpec, check_group_size
from .attention import KVBlock, View, declare_cross, declare_decode_past, declare_past, past_input_names
from .checkpoint import Checkpoint
from .graph import Dim, GraphBuilder, linear
from .metadata import graph_metadata

#: config.json token ids a decoder-only graph's metadata records.
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
#: ... and an encoder-decoder model's (both of its graphs).
SEQ2SEQ_TOKEN_IDS = (*TOKEN_IDS, "decoder_start_token_id")
#: int8 values per float16 scale in an int8 pool.
INT8_GROUP = 32


@dataclass(frozen=True)
class StepInputs:
    """The first inputs of a decoder step (graph value names) and its past as float32 blocks."""

    input_ids: str  # [T] int64
    position_ids: str  # [T] int64
    token_sequence: str | None  # [T] int64, gathered view only
    pasts: list[KVBlock]  # one per layer


def declare_step_inputs(
    g: GraphBuilder, view: View, kv_dtype: str, layers: int, kv_heads: int, head_dim: int
) -> StepInputs:
    """Declare input_ids, position_ids, (gathered) token_sequence and every layer's past, in that order.

    Raises (before declaring anything):
        UnsupportedModel: the decode view (its inputs are `declare_decode_inputs`', for Llama).
        DTypeMismatch: int8 with the gathered view (it reads a float staging buffer).
        ShapeMismatch: int8 with rows of ``kv_heads * head_dim`` values that groups of 32 do not tile.
    """
    if view is View.DECODE:
        raise UnsupportedModel("the decode view (GroupQueryAttention) is exported for Llama only")
    if kv_dtype == "int8":
        if view is View.GATHERED:
            raise DTypeMismatch(
                "the gathered view reads a float staging buffer (gather_rows dequantizes int8 pools): "
                "export it with kv_dtype float32 or float16"
            )
        check_group_size(kv_heads * head_dim, INT8_GROUP)
    input_ids = g.input("input_ids", "int64", ["tokens"])
    position_ids = g.input("position_ids", "int64", ["tokens"])
    token_sequence = g.input("token_sequence", "int64", ["tokens"]) if view is View.GATHERED else None
    pasts = [declare_past(g, i, view, kv_dtype, kv_heads, head_dim, token_sequence) for i in range(layers)]
    return StepInputs(input_ids, position_ids, token_sequence, pasts)


@dataclass(frozen=True)
class DecodeInputs:
    """The inputs of a decode-view decoder step (graph value names)."""

    input_ids: str  # [S] int64, one token per sequence
    position_ids: str  # [S] int64
    seqlens_k: str  # [S] int32, each sequence's past length
    total: str  # int32 scalar: max(seqlens_k) + 1, the longest sequence with this pass's token
    pasts: list[KVBlock]  # one per layer, [S, KV, L, D]


def declare_decode_inputs(
    g: GraphBuilder, kv_dtype: str, layers: int, kv_heads: int, head_dim: int
) -> DecodeInputs:
    """Declare a decode-view step's input_ids, position_ids, seqlens_k and every layer's past, in that
    order (`declare_decode_past`).

    Raises (before declaring anything) DTypeMismatch: a kv_dtype other than float32 (the gathered staging
    buffer of a float32 or int8 cache; the float16 path is not written).
    """
    if kv_dtype != "float32":
        raise DTypeMismatch(
            f"the decode view reads the gathered view in float32 (a float32 or int8 cache: the gather "
            f"dequantizes); export it with kv_dtype float32, not {kv_dtype}"
        )
    input_ids = g.input("input_ids", "int64", ["tokens"])
    position_ids = g.input("position_ids", "int64", ["tokens"])
    seqlens_k = g.input("seqlens_k", "int32", ["tokens"])
    pasts = [declare_decode_past(g, i, kv_heads, head_dim) for i in range(layers)]
    # the longest sequence with this pass's token: what GroupQueryAttention reads and rotates up to (its
    # past buffers may be longer, and its cos / sin tables must have at least this many rows)
    total = g.op("Add", g.op("ReduceMax", seqlens_k, keepdims=0), g.const(1, np.int32))
    return DecodeInputs(input_ids, position_ids, seqlens_k, total, pasts)


def declare_cross_inputs(
    g: GraphBuilder, layers: int, kv_heads: int, head_dim: int
) -> tuple[list[KVBlock], str]:
    """Declare every layer's cross_key/cross_value ``[M, KV, D]``, then cross_bias ``[T, M]``."""
    crosses = [declare_cross(g, i, kv_heads, head_dim) for i in range(layers)]
    return crosses, g.input("cross_bias", "float32", ["tokens", "cross_rows"])


def step_model(
    g: GraphBuilder,
    ckpt: Checkpoint,
    architecture: str,
    spec: KVSpec,
    vocab_size: int,
    kv_dtype: str,
    view: View,
    *,
    rope: RopeSpec | None = None,
    token_ids: Sequence[str],
) -> onnx.ModelProto:
    """Declare the decoder step's outputs and return its model with metadata.

    A node must already produce ``logits [S, vocab_size]`` and, per layer of `spec`, ``new_key.{i}`` and
    ``new_value.{i}`` ``[T, spec.num_kv_heads, spec.head_dim]`` float32 (the decode view: instead
    ``present_key.{i}``, ``present_value.{i}`` ``[S, KV, L, D]``). `token_ids`: the config.json keys the
    metadata records (`TOKEN_IDS` or `SEQ2SEQ_TOKEN_IDS`).
    """
    outputs = ["logits"]
    g.output("logits", "float32", ["logits_rows", vocab_size])
    per_layer = ("present_key", "present_value") if view is View.DECODE else ("new_key", "new_value")
    shape: list[int | str] = ["tokens", spec.num_kv_heads, spec.head_dim]
    if view is View.DECODE:
        shape = ["tokens", spec.num_kv_heads, "past_length", spec.head_dim]
    for i in range(spec.num_layers):
        for kind in per_layer:
            g.output(f"{kind}.{i}", "float32", shape)
            outputs.append(f"{kind}.{i}")
    inputs = [v.name for v in g.inputs]
    meta = graph_metadata(
        architecture=architecture,
        graph="decoder_step",
        spec=spec,
        rope=rope,
        vocab_size=vocab_size,
        kv_dtype=kv_dtype,
        view=view.value,
        inputs=inputs,
        outputs=outputs,
        tokens={k: ckpt.config.get(k) for k in token_ids},
    )
    assert all(n in inputs for i in range(spec.num_layers) for n in past_input_names(i, kv_dtype))
    return g.model(meta)


def cross_outputs(
    g: GraphBuilder,
    h: str,
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray] | None,
    heads: int,
    head_dim: int,
    rows: Dim,
) -> list[str]:
    """Project ``h [rows, E]`` to every decoder layer's cross K/V in one MatMul and declare the outputs.

    Args:
        weights: ``[H * D, E]`` each, in output order: layer 0's k and v, layer 1's k and v, ...
        biases: ``[H * D]`` each in the same order, or None (no bias).
        rows: the outputs' symbolic first dimension.
    Returns: the output names ``cross_key.0, cross_value.0, cross_key.1, ...`` (``[rows, H, D]`` float32).
    """
    outputs = [f"{kind}.{i}" for i in range(len(weights) // 2) for kind in ("cross_key", "cross_value")]
    bias = None if biases is None else np.concatenate(biases)
    packed = linear(g, h, np.concatenate(weights), "cross_kv", bias)
    packed = g.op("Reshape", packed, g.const([0, len(outputs) * heads, head_dim]))
    parts = g.op("Split", packed, g.const([heads] * len(outputs)), axis=1, outputs=len(outputs))
    for part, name in zip(parts if len(outputs) > 1 else [parts], outputs, strict=True):
        g.op("Identity", part, outputs=[name])
        g.output(name, "float32", [rows, heads, head_dim])
    return outputs


def encoder_model(
    g: GraphBuilder, ckpt: Checkpoint, architecture: str, spec: KVSpec, vocab_size: int, outputs: list[str]
) -> onnx.ModelProto:
    """The encoder's model with metadata (float32, no view, no rope, `SEQ2SEQ_TOKEN_IDS`)."""
    meta = graph_metadata(
        architecture=architecture,
        graph="encoder",
        spec=spec,
        rope=None,
        vocab_size=vocab_size,
        kv_dtype="float32",
        view="none",
        inputs=[v.name for v in g.inputs],
        outputs=outputs,
        tokens={k: ckpt.config.get(k) for k in SEQ2SEQ_TOKEN_IDS},
    )
    return g.model(meta)


def export_encoder_decoder(
    build_encoder: Callable[[Checkpoint], onnx.ModelProto],
    build_decoder_step: Callable[[Checkpoint, str, View], onnx.ModelProto],
    ckpt: Checkpoint,
    out_dir: Path,
    kv_dtype: str,
    view: View,
) -> list[Path]:
    """Write ``encoder.onnx`` and ``decoder_step.{view}.{kv_dtype}.onnx`` into `out_dir`; return the paths.

    The decoder step is built first: it validates `kv_dtype` and `view` before anything is written.
    """
    from . import save_model

    step = build_decoder_step(ckpt, kv_dtype, view)
    encoder = build_encoder(ckpt)
    return [
        save_model(encoder, out_dir / "encoder.onnx"),
        save_model(step, out_dir / f"decoder_step.{view.value}.{kv_dtype}.onnx"),
    ]

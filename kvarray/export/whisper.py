"""Whisper: an encoder graph from log-mel features emitting the cross K/V, and a decoder-step graph.

Shapes: B audio sequences, F = 3000 frames, P = F / 2 = 1500 encoder positions (max_source_positions),
T decoder tokens, N pool cells, H decoder heads, D head_dim = d_model / H, E d_model.

    encoder.onnx
      inputs   input_features [B, n_mels, 3000] float32 (log-mel, padded to 3000 frames)
      outputs  per decoder layer i: cross_key.{i}, cross_value.{i} [B * 1500, H, D] float32, flat:
               sequence b in rows [b * 1500, (b + 1) * 1500): what `EncoderCache.put_batch` takes
    decoder_step.{view}.{kv_dtype}.onnx
      inputs   input_ids [T], position_ids [T] int64 (index the learned position table),
               (gathered view) token_sequence [T] int64,
               per layer i: past_key.{i}, past_value.{i} (+ int8 scales) as in llama.py,
               attention_bias [T, N + T] float32, per layer i: cross_key.{i}, cross_value.{i} [M, H, D],
               cross_bias [T, M] float32, logits_index [S] int64
      outputs  logits [S, vocab], per layer new_key.{i}, new_value.{i} [T, H, D] float32

The encoder: Conv1d(k=3, pad 1) + GELU, Conv1d(k=3, stride 2, pad 1) + GELU, plus the checkpoint's
(sinusoidal) position table, pre-LayerNorm layers, a final LayerNorm, then every decoder layer's
``encoder_attn`` k (no bias) and v projections packed into one MatMul. Attention is scaled by D ** -0.5
on the projected queries (as transformers does); the output head is the token embedding (tied).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import SpecMismatch, UnsupportedModel
from ..spec import KVSpec
from .attention import KVBlock, View, attention
from .checkpoint import Checkpoint
from .graph import GraphBuilder, gelu, layer_norm, linear
from .interface import (
    SEQ2SEQ_TOKEN_IDS,
    cross_outputs,
    declare_cross_inputs,
    declare_step_inputs,
    encoder_model,
    export_encoder_decoder,
    step_model,
)

ACTIVATIONS = ("gelu", "gelu_new", "relu")
FRAMES_PER_POSITION = 2  # conv2's stride


@dataclass(frozen=True)
class WhisperConfig:
    """The parts of a transformers `WhisperConfig` the graphs depend on (read from config.json)."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    n_mels: int
    source_positions: int
    target_positions: int
    vocab_size: int
    activation: str
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        """Decoder head size (self and cross attention)."""
        return self.d_model // self.decoder_heads

    @property
    def frames(self) -> int:
        """Input frames the encoder takes (3000 for max_source_positions 1500)."""
        return self.source_positions * FRAMES_PER_POSITION

    @property
    def spec(self) -> KVSpec:
        """Per decoder layer and token: H heads of head_dim values (self and cross attention alike)."""
        return KVSpec(self.decoder_layers, self.decoder_heads, self.head_dim, "float32")


def read_config(ckpt: Checkpoint) -> WhisperConfig:
    """Parse and validate a Whisper config.json.

    Raises:
        UnsupportedModel: another model_type, or an activation_function not in `ACTIVATIONS`.
        SpecMismatch: a missing size, or d_model not a multiple of a head count.
    """
    c = ckpt.config
    if c.get("model_type") != "whisper":
        raise UnsupportedModel(f"{ckpt.directory}: model_type {c.get('model_type')!r} is not whisper")
    act = c.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise UnsupportedModel(
            f"{ckpt.directory}: activation_function {act!r} is not supported ({', '.join(ACTIVATIONS)})"
        )
    d_model = ckpt.require("d_model")
    heads = {k: ckpt.require(k) for k in ("encoder_attention_heads", "decoder_attention_heads")}
    for key, n in heads.items():
        if d_model % n:
            raise SpecMismatch(f"{ckpt.directory}: d_model {d_model} is not a multiple of {key} {n}")
    return WhisperConfig(
        d_model=d_model,
        encoder_layers=ckpt.require("encoder_layers"),
        decoder_layers=ckpt.require("decoder_layers"),
        encoder_heads=heads["encoder_attention_heads"],
        decoder_heads=heads["decoder_attention_heads"],
        encoder_ffn=ckpt.require("encoder_ffn_dim"),
        decoder_ffn=ckpt.require("decoder_ffn_dim"),
        n_mels=ckpt.require("num_mel_bins"),
        source_positions=ckpt.require("max_source_positions"),
        target_positions=ckpt.require("max_target_positions"),
        vocab_size=ckpt.require("vocab_size"),
        activation=act,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


# -- layers ---------------------------------------------------------------------------------------------
def _activation(g: GraphBuilder, x: str, name: str) -> str:
    return g.op("Relu", x) if name == "relu" else gelu(g, x, approximate=name == "gelu_new")


def _norm(g: GraphBuilder, ckpt: Checkpoint, x: str, name: str, size: int) -> str:
    w, b = ckpt.tensor(f"{name}.weight", [size]), ckpt.tensor(f"{name}.bias", [size])
    return layer_norm(g, x, w, b, 1e-5, name)


def _proj(
    g: GraphBuilder, ckpt: Checkpoint, x: str, name: str, rows: int, cols: int, bias: bool = True
) -> str:
    b = ckpt.tensor(f"{name}.bias", [rows]) if bias else None
    return linear(g, x, ckpt.tensor(f"{name}.weight", [rows, cols]), name, b)


def _qkv_weights(ckpt: Checkpoint, p: str, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed ``[3E, E]`` weight and ``[3E]`` bias of q, k (no bias: zeros), v."""
    weight = np.concatenate([ckpt.tensor(f"{p}.{n}_proj.weight", [E, E]) for n in "qkv"])
    zeros = np.zeros(E, np.float32)
    bias = np.concatenate([ckpt.tensor(f"{p}.q_proj.bias", [E]), zeros, ckpt.tensor(f"{p}.v_proj.bias", [E])])
    return weight, bias


def _mlp(g: GraphBuilder, ckpt: Checkpoint, cfg: WhisperConfig, h: str, p: str, ffn: int) -> str:
    """``h + fc2(act(fc1(LayerNorm(h))))``."""
    E = cfg.d_model
    x = _norm(g, ckpt, h, f"{p}.final_layer_norm", E)
    x = _activation(g, _proj(g, ckpt, x, f"{p}.fc1", ffn, E), cfg.activation)
    return g.op("Add", h, _proj(g, ckpt, x, f"{p}.fc2", E, ffn))


def _encoder_self_attention(g: GraphBuilder, ckpt: Checkpoint, cfg: WhisperConfig, x: str, p: str) -> str:
    """Batched full attention of ``x [B, P, E]`` -> ``[B, P, E]`` (every position sees every position)."""
    E, H = cfg.d_model, cfg.encoder_heads
    D = E // H
    weight, bias = _qkv_weights(ckpt, p, E)
    qkv = g.op("Reshape", linear(g, x, weight, f"{p}.qkv_proj", bias), g.const([0, 0, 3 * H, D]))
    q, k, v = g.op("Split", qkv, g.const([H, H, H]), axis=2, outputs=3)  # [B, P, H, D] each
    q = g.op("Mul", g.op("Transpose", q, perm=[0, 2, 1, 3]), g.const(D**-0.5, np.float32))  # [B, H, P, D]
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 3, 1]))  # [B, H, P, P]
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Transpose", v, perm=[0, 2, 1, 3]))
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, E]))
    return _proj(g, ckpt, out, f"{p}.out_proj", E, E)


# -- graphs ---------------------------------------------------------------------------------------------
def build_encoder(ckpt: Checkpoint) -> onnx.ModelProto:
    """The encoder ModelProto: input_features -> every decoder layer's cross_key/value (flat rows)."""
    cfg = read_config(ckpt)
    E, H, D, P = cfg.d_model, cfg.decoder_heads, cfg.head_dim, cfg.source_positions
    g = GraphBuilder("kvarray_whisper_encoder")
    features = g.input("input_features", "float32", ["batch", cfg.n_mels, cfg.frames])
    with g.scope("front"):
        w1 = g.weight("conv1.weight", ckpt.tensor("model.encoder.conv1.weight", [E, cfg.n_mels, 3]))
        b1 = g.weight("conv1.bias", ckpt.tensor("model.encoder.conv1.bias", [E]))
        x = gelu(g, g.op("Conv", features, w1, b1, kernel_shape=[3], pads=[1, 1]))
        w2 = g.weight("conv2.weight", ckpt.tensor("model.encoder.conv2.weight", [E, E, 3]))
        b2 = g.weight("conv2.bias", ckpt.tensor("model.encoder.conv2.bias", [E]))
        x = gelu(g, g.op("Conv", x, w2, b2, kernel_shape=[3], pads=[1, 1], strides=[2]))  # [B, E, P]
        positions = ckpt.tensor("model.encoder.embed_positions.weight", [P, E])
        h = g.op("Add", g.op("Transpose", x, perm=[0, 2, 1]), g.weight("encoder.positions", positions))
    for i in range(cfg.encoder_layers):
        p = f"model.encoder.layers.{i}"
        with g.scope(f"encoder.{i}"):
            x = _norm(g, ckpt, h, f"{p}.self_attn_layer_norm", E)
            h = g.op("Add", h, _encoder_self_attention(g, ckpt, cfg, x, f"{p}.self_attn"))
            h = _mlp(g, ckpt, cfg, h, p, cfg.encoder_ffn)
    with g.scope("cross"):
        h = g.op("Reshape", _norm(g, ckpt, h, "model.encoder.layer_norm", E), g.const([-1, E]))  # [B * P, E]
        weights, biases = [], []
        for i in range(cfg.decoder_layers):
            p = f"model.decoder.layers.{i}.encoder_attn"
            weights += [ckpt.tensor(f"{p}.k_proj.weight", [E, E]), ckpt.tensor(f"{p}.v_proj.weight", [E, E])]
            biases += [np.zeros(E, np.float32), ckpt.tensor(f"{p}.v_proj.bias", [E])]
        outputs = cross_outputs(g, h, weights, biases, H, D, "encoder_rows")
    return encoder_model(g, ckpt, "whisper", cfg.spec, cfg.vocab_size, outputs)


def build_decoder_step(ckpt: Checkpoint, kv_dtype: str, view: View) -> onnx.ModelProto:
    """The decoder-step ModelProto of the Whisper checkpoint `ckpt` (see the module docstring)."""
    cfg = read_config(ckpt)
    E, H, D, V = cfg.d_model, cfg.decoder_heads, cfg.head_dim, cfg.vocab_size
    g = GraphBuilder("kvarray_whisper_decoder_step")
    inputs = declare_step_inputs(g, view, kv_dtype, cfg.decoder_layers, H, D)
    bias = g.input("attention_bias", "float32", ["tokens", "past_and_tokens"])
    crosses, cross_bias = declare_cross_inputs(g, cfg.decoder_layers, H, D)
    logits_index = g.input("logits_index", "int64", ["logits_rows"])

    embed = g.weight("embed_tokens.weight", ckpt.tensor("model.decoder.embed_tokens.weight", [V, E]))
    h = g.op("Gather", embed, inputs.input_ids, axis=0)  # [T, E]; scale_embedding ignored, as in transformers
    table = ckpt.tensor("model.decoder.embed_positions.weight", [cfg.target_positions, E])
    h = g.op("Add", h, g.op("Gather", g.weight("decoder.positions", table), inputs.position_ids, axis=0))
    scale = D**-0.5
    for i in range(cfg.decoder_layers):
        p = f"model.decoder.layers.{i}"
        with g.scope(f"decoder.{i}"):
            x = _norm(g, ckpt, h, f"{p}.self_attn_layer_norm", E)
            weight, qkv_bias = _qkv_weights(ckpt, f"{p}.self_attn", E)
            qkv = g.op(
                "Reshape", linear(g, x, weight, f"{p}.self_attn.qkv_proj", qkv_bias), g.const([0, 3 * H, D])
            )
            names = [f"{p}.query", f"new_key.{i}", f"new_value.{i}"]
            q, k, v = g.op("Split", qkv, g.const([H, H, H]), axis=1, outputs=names)
            out = attention(
                g, q, [inputs.pasts[i], KVBlock(k, v)], bias, kv_heads=H, group=1, head_dim=D, scale=scale
            )
            h = g.op("Add", h, _proj(g, ckpt, out, f"{p}.self_attn.out_proj", E, E))
            x = _norm(g, ckpt, h, f"{p}.encoder_attn_layer_norm", E)
            q = g.op("Reshape", _proj(g, ckpt, x, f"{p}.encoder_attn.q_proj", E, E), g.const([0, H, D]))
            out = attention(g, q, [crosses[i]], cross_bias, kv_heads=H, group=1, head_dim=D, scale=scale)
            h = g.op("Add", h, _proj(g, ckpt, out, f"{p}.encoder_attn.out_proj", E, E))
            h = _mlp(g, ckpt, cfg, h, p, cfg.decoder_ffn)
    with g.scope("head"):
        last = _norm(g, ckpt, g.op("Gather", h, logits_index, axis=0), "model.decoder.layer_norm", E)
        untied = not cfg.tie_word_embeddings and ckpt.has("proj_out.weight")
        head = g.weight("proj_out.weight", ckpt.tensor("proj_out.weight", [V, E])) if untied else embed
        g.op("Gemm", last, head, transB=1, outputs=["logits"])
    return step_model(g, ckpt, "whisper", cfg.spec, V, kv_dtype, view, token_ids=SEQ2SEQ_TOKEN_IDS)


def export_whisper(ckpt: Checkpoint, out_dir: Path, kv_dtype: str, view: View) -> list[Path]:
    """Write ``encoder.onnx`` and ``decoder_step.{view}.{kv_dtype}.onnx`` into `out_dir`; return the paths."""
    return export_encoder_decoder(build_encoder, build_decoder_step, ckpt, out_dir, kv_dtype, view)

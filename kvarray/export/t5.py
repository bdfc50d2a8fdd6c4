"""T5 (v1.0, v1.1, flan): a flat encoder graph emitting the cross K/V, and a decoder-step graph.

Shapes: M encoder tokens of the pass (flat, sequences concatenated), T decoder tokens, N pool cells,
H heads, D d_kv (any value: ``H * D`` need not be d_model), E d_model, L layers.

    encoder.onnx
      inputs   input_ids [M] int64, position_ids [M] int64 (position within its own sequence),
               attention_bias [M, M] float32 (0 within a sequence, -inf across: block diagonal)
      outputs  per decoder layer i: cross_key.{i}, cross_value.{i} [M, H, D] float32, sequence s in its
               own rows, in input order: what `EncoderCache.put_batch` takes
    decoder_step.{view}.{kv_dtype}.onnx
      inputs   input_ids [T], position_ids [T] int64 (the decoder start token is position 0),
               (gathered view) token_sequence [T] int64,
               per layer i: past_key.{i}, past_value.{i} (+ int8 scales) as in llama.py,
               past_position_ids [N] int64 (gathered view: [S, L]): the position held by each past cell,
               attention_bias [T, N + T] float32, per layer i: cross_key.{i}, cross_value.{i} [M, H, D],
               cross_bias [T, M] float32, logits_index [S] int64
      outputs  logits [S, vocab], per layer new_key.{i}, new_value.{i} [T, H, D] float32

Relative position buckets: the bucket of (key position - query position) is a function of that integer
alone, and saturates beyond ``relative_attention_max_distance``; the exporter tabulates each layer stack's
bias for every distance in ``[-max_distance, max_distance]`` (``[2 * max_distance + 1, H]``), and the
graph clips the distance and gathers. Attention is unscaled; the tied head (v1.0) multiplies the final
hidden state by ``E ** -0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import UnsupportedModel
from ..spec import KVSpec
from .attention import KVBlock, View, attention
from .checkpoint import Checkpoint
from .graph import GraphBuilder, gelu, linear, rms_norm, silu
from .interface import (
    SEQ2SEQ_TOKEN_IDS,
    cross_outputs,
    declare_cross_inputs,
    declare_step_inputs,
    encoder_model,
    export_encoder_decoder,
    step_model,
)

#: activations of the feed-forward (transformers' ACT2FN keys); gelu_new is the tanh approximation.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclass(frozen=True)
class T5Config:
    """The parts of a transformers `T5Config` the graphs depend on (read from config.json)."""

    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    encoder_layers: int
    decoder_layers: int
    vocab_size: int
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    tie_word_embeddings: bool

    @property
    def spec(self) -> KVSpec:
        """Per decoder layer and token: H heads of d_kv values (self and cross attention alike)."""
        return KVSpec(self.decoder_layers, self.num_heads, self.d_kv, "float32")


def read_config(ckpt: Checkpoint) -> T5Config:
    """Parse and validate a T5 config.json.

    Raises:
        UnsupportedModel: another model_type, or a feed_forward_proj activation not in `ACTIVATIONS`.
        SpecMismatch: a missing size.
    """
    c = ckpt.config
    if c.get("model_type") not in ("t5", "mt5"):
        raise UnsupportedModel(
            f"{ckpt.directory}: model_type {c.get('model_type')!r} is not T5 (the t5 exporter reads t5, mt5)"
        )
    proj = str(c.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    gated = parts[0] == "gated" and len(parts) == 2
    act = parts[-1]
    if act == "gelu" and gated:
        act = "gelu_new"  # transformers maps "gated-gelu" to gelu_new
    if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in ACTIVATIONS:
        raise UnsupportedModel(
            f"{ckpt.directory}: feed_forward_proj {proj!r} is not supported "
            f"(expected ACT or gated-ACT with ACT one of {', '.join(ACTIVATIONS)})"
        )
    layers = ckpt.require("num_layers")
    return T5Config(
        d_model=ckpt.require("d_model"),
        d_kv=ckpt.require("d_kv"),
        d_ff=ckpt.require("d_ff"),
        num_heads=ckpt.require("num_heads"),
        encoder_layers=layers,
        decoder_layers=c.get("num_decoder_layers") or layers,
        vocab_size=ckpt.require("vocab_size"),
        num_buckets=int(c.get("relative_attention_num_buckets", 32)),
        max_distance=int(c.get("relative_attention_max_distance", 128)),
        eps=float(c.get("layer_norm_epsilon", 1e-6)),
        activation=act,
        gated=gated,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


# -- relative position buckets --------------------------------------------------------------------------
def relative_position_bucket(
    relative: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """transformers' `T5Attention._relative_position_bucket` in NumPy (float32 like torch's).

    Args:
        relative: ``[...]`` int, key position minus query position.
    Returns: ``[...]`` int64 buckets in ``[0, num_buckets)``.
    """
    relative = np.asarray(relative, np.int64)
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(np.int64) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    ratio = np.maximum(relative, max_exact).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (scaled * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(relative < max_exact, relative, large)


def relative_bias_table(
    weight: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """``[2 * max_distance + 1, H]``: row ``r + max_distance`` is the bias of relative distance r.

    `weight` is a ``relative_attention_bias.weight [num_buckets, H]``. Beyond ``max_distance`` the bucket
    no longer changes, so clipping the distance to the table is exact.
    """
    distances = np.arange(-max_distance, max_distance + 1)
    return np.ascontiguousarray(
        weight[relative_position_bucket(distances, bidirectional, num_buckets, max_distance)]
    )


def position_bias(g: GraphBuilder, table: str, max_distance: int, query: str, keys: str) -> str:
    """``[H, T, n]`` bias of queries ``query [T]`` over keys `keys` ``[n]`` (or ``[T, n]``: per token)."""
    relative = g.op("Sub", keys, g.op("Unsqueeze", query, g.const([1])))  # [T, n]
    clipped = g.op("Min", g.op("Max", relative, g.const(-max_distance)), g.const(max_distance))
    index = g.op("Add", clipped, g.const(max_distance))
    return g.op("Transpose", g.op("Gather", table, index, axis=0), perm=[2, 0, 1])


# -- layers ---------------------------------------------------------------------------------------------
def _embedding(ckpt: Checkpoint, cfg: T5Config) -> np.ndarray:
    for name in EMBEDDING_NAMES:
        if ckpt.has(name):
            return ckpt.tensor(name, [cfg.vocab_size, cfg.d_model])
    return ckpt.tensor(EMBEDDING_NAMES[0], [cfg.vocab_size, cfg.d_model])  # raises MissingTensor


def _activation(g: GraphBuilder, x: str, name: str) -> str:
    if name == "relu":
        return g.op("Relu", x)
    if name == "silu":
        return silu(g, x)
    return gelu(g, x, approximate=name == "gelu_new")


def _feed_forward(g: GraphBuilder, ckpt: Checkpoint, cfg: T5Config, h: str, p: str) -> str:
    """``h + wo(act(wi_0 x) * wi_1 x)`` (gated) or ``h + wo(act(wi x))`` of ``x = norm(h)`` ``[T, E]``."""
    E, F = cfg.d_model, cfg.d_ff
    x = rms_norm(g, h, ckpt.tensor(f"{p}.layer_norm.weight", [E]), cfg.eps, f"{p}.layer_norm")
    if cfg.gated:
        w = np.concatenate([ckpt.tensor(f"{p}.DenseReluDense.wi_{k}.weight", [F, E]) for k in (0, 1)])
        gate, up = g.op(
            "Split", linear(g, x, w, f"{p}.DenseReluDense.wi"), g.const([F, F]), axis=-1, outputs=2
        )
        inner = g.op("Mul", _activation(g, gate, cfg.activation), up)
    else:
        inner = _activation(
            g, linear(g, x, ckpt.tensor(f"{p}.DenseReluDense.wi.weight", [F, E]), f"{p}.wi"), cfg.activation
        )
    out = linear(g, inner, ckpt.tensor(f"{p}.DenseReluDense.wo.weight", [E, F]), f"{p}.DenseReluDense.wo")
    return g.op("Add", h, out)


def _qkv(
    g: GraphBuilder, ckpt: Checkpoint, cfg: T5Config, x: str, p: str, names: int | list[str]
) -> list[str]:
    """Packed q/k/v projection of ``x [T, E]`` split into three ``[T, H, D]`` values (named `names`)."""
    H, D, E = cfg.num_heads, cfg.d_kv, cfg.d_model
    w = np.concatenate([ckpt.tensor(f"{p}.{n}.weight", [H * D, E]) for n in "qkv"])
    qkv = g.op("Reshape", linear(g, x, w, f"{p}.qkv"), g.const([0, 3 * H, D]))
    return g.op("Split", qkv, g.const([H, H, H]), axis=1, outputs=names)


def _out(g: GraphBuilder, ckpt: Checkpoint, cfg: T5Config, h: str, attended: str, p: str) -> str:
    w = ckpt.tensor(f"{p}.o.weight", [cfg.d_model, cfg.num_heads * cfg.d_kv])
    return g.op("Add", h, linear(g, attended, w, f"{p}.o"))


def _table(g: GraphBuilder, ckpt: Checkpoint, cfg: T5Config, stack: str, bidirectional: bool) -> str:
    name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    weight = ckpt.tensor(name, [cfg.num_buckets, cfg.num_heads])
    table = relative_bias_table(weight, bidirectional, cfg.num_buckets, cfg.max_distance)
    return g.weight(f"{stack}.relative_bias_table", table)


# -- graphs ---------------------------------------------------------------------------------------------
def build_encoder(ckpt: Checkpoint) -> onnx.ModelProto:
    """The flat encoder ModelProto: input_ids, position_ids, attention_bias -> every cross_key/value."""
    cfg = read_config(ckpt)
    H, D, E = cfg.num_heads, cfg.d_kv, cfg.d_model
    g = GraphBuilder("kvarray_t5_encoder")
    input_ids = g.input("input_ids", "int64", ["encoder_tokens"])
    position_ids = g.input("position_ids", "int64", ["encoder_tokens"])
    bias = g.input("attention_bias", "float32", ["encoder_tokens", "encoder_tokens"])

    h = g.op("Gather", g.weight("shared.weight", _embedding(ckpt, cfg)), input_ids, axis=0)  # [M, E]
    with g.scope("position_bias"):
        table = _table(g, ckpt, cfg, "encoder", bidirectional=True)
        head_bias = position_bias(g, table, cfg.max_distance, position_ids, position_ids)  # [H, M, M]
    for i in range(cfg.encoder_layers):
        p = f"encoder.block.{i}.layer"
        with g.scope(f"encoder.{i}"):
            x = rms_norm(g, h, ckpt.tensor(f"{p}.0.layer_norm.weight", [E]), cfg.eps, f"{p}.0.layer_norm")
            q, k, v = _qkv(g, ckpt, cfg, x, f"{p}.0.SelfAttention", 3)
            out = attention(
                g, q, [KVBlock(k, v)], bias, kv_heads=H, group=1, head_dim=D, scale=1.0, head_bias=head_bias
            )
            h = _out(g, ckpt, cfg, h, out, f"{p}.0.SelfAttention")
            h = _feed_forward(g, ckpt, cfg, h, f"{p}.1")
    with g.scope("cross"):
        h = rms_norm(
            g, h, ckpt.tensor("encoder.final_layer_norm.weight", [E]), cfg.eps, "encoder.final_layer_norm"
        )
        weights = [
            ckpt.tensor(f"decoder.block.{i}.layer.1.EncDecAttention.{kind}.weight", [H * D, E])
            for i in range(cfg.decoder_layers)
            for kind in "kv"
        ]
        outputs = cross_outputs(g, h, weights, None, H, D, "encoder_tokens")
    return encoder_model(g, ckpt, "t5", cfg.spec, cfg.vocab_size, outputs)


def build_decoder_step(ckpt: Checkpoint, kv_dtype: str, view: View) -> onnx.ModelProto:
    """The decoder-step ModelProto of the T5 checkpoint `ckpt` (see the module docstring)."""
    cfg = read_config(ckpt)
    H, D, E, V = cfg.num_heads, cfg.d_kv, cfg.d_model, cfg.vocab_size
    g = GraphBuilder("kvarray_t5_decoder_step")
    inputs = declare_step_inputs(g, view, kv_dtype, cfg.decoder_layers, H, D)
    input_ids, position_ids, token_sequence = inputs.input_ids, inputs.position_ids, inputs.token_sequence
    if view is View.POOL:
        past_positions = g.input("past_position_ids", "int64", ["past_cells"])
    else:
        past_positions = g.input("past_position_ids", "int64", ["sequences", "past_length"])
    bias = g.input("attention_bias", "float32", ["tokens", "past_and_tokens"])
    crosses, cross_bias = declare_cross_inputs(g, cfg.decoder_layers, H, D)
    logits_index = g.input("logits_index", "int64", ["logits_rows"])

    embed = g.weight("shared.weight", _embedding(ckpt, cfg))
    h = g.op("Gather", embed, input_ids, axis=0)  # [T, E]
    with g.scope("position_bias"):
        table = _table(g, ckpt, cfg, "decoder", bidirectional=False)
        if view is View.POOL:
            keys = g.op("Concat", past_positions, position_ids, axis=0)  # [N + T]
        else:  # [T, L] of each token's sequence, then this pass's [T, T]
            assert token_sequence is not None
            per_token = g.op("Gather", past_positions, token_sequence, axis=0)
            square = g.op("Concat", g.op("Shape", position_ids), g.op("Shape", position_ids), axis=0)
            fresh = g.op("Expand", g.op("Unsqueeze", position_ids, g.const([0])), square)  # [T, T]
            keys = g.op("Concat", per_token, fresh, axis=1)
        head_bias = position_bias(g, table, cfg.max_distance, position_ids, keys)  # [H, T, N + T]

    for i in range(cfg.decoder_layers):
        p = f"decoder.block.{i}.layer"
        with g.scope(f"decoder.{i}"):
            x = rms_norm(g, h, ckpt.tensor(f"{p}.0.layer_norm.weight", [E]), cfg.eps, f"{p}.0.layer_norm")
            q, k, v = _qkv(
                g, ckpt, cfg, x, f"{p}.0.SelfAttention", [f"{p}.0.query", f"new_key.{i}", f"new_value.{i}"]
            )
            out = attention(
                g,
                q,
                [inputs.pasts[i], KVBlock(k, v)],
                bias,
                kv_heads=H,
                group=1,
                head_dim=D,
                scale=1.0,
                head_bias=head_bias,
            )
            h = _out(g, ckpt, cfg, h, out, f"{p}.0.SelfAttention")
            x = rms_norm(g, h, ckpt.tensor(f"{p}.1.layer_norm.weight", [E]), cfg.eps, f"{p}.1.layer_norm")
            wq = ckpt.tensor(f"{p}.1.EncDecAttention.q.weight", [H * D, E])
            q = g.op("Reshape", linear(g, x, wq, f"{p}.1.EncDecAttention.q"), g.const([0, H, D]))
            out = attention(g, q, [crosses[i]], cross_bias, kv_heads=H, group=1, head_dim=D, scale=1.0)
            h = _out(g, ckpt, cfg, h, out, f"{p}.1.EncDecAttention")
            h = _feed_forward(g, ckpt, cfg, h, f"{p}.2")

    with g.scope("head"):
        last = g.op("Gather", h, logits_index, axis=0)  # [S, E]
        norm = ckpt.tensor("decoder.final_layer_norm.weight", [E])
        last = rms_norm(g, last, norm, cfg.eps, "decoder.final_layer_norm")
        if cfg.tie_word_embeddings:
            last, head = g.op("Mul", last, g.const(E**-0.5, np.float32)), embed
        else:
            head = g.weight("lm_head.weight", ckpt.tensor("lm_head.weight", [V, E]))
        g.op("Gemm", last, head, transB=1, outputs=["logits"])
    return step_model(g, ckpt, "t5", cfg.spec, V, kv_dtype, view, token_ids=SEQ2SEQ_TOKEN_IDS)


def export_t5(ckpt: Checkpoint, out_dir: Path, kv_dtype: str, view: View) -> list[Path]:
    """Write ``encoder.onnx`` and ``decoder_step.{view}.{kv_dtype}.onnx`` into `out_dir`; return the paths."""
    return export_encoder_decoder(build_encoder, build_decoder_step, ckpt, out_dir, kv_dtype, view)

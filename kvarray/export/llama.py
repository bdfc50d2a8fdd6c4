"""The Llama family's decoder-step graph: RMSNorm, RoPE, grouped-query attention, SwiGLU, lm_head.

One graph per model, flat over the pass's T tokens (any mix of sequences, prefill and decode):

    inputs   input_ids [T] int64, position_ids [T] int64,
             (gathered view) token_sequence [T] int64: the row of past_key.{i} token t reads,
             per layer i: past_key.{i}, past_value.{i}  pool view [N, KV, D] / gathered [S, KV, L, D]
                          (int8, pool view) past_key_scale.{i}, past_value_scale.{i} [N, KV * D // 32] float16
             attention_bias [T, N + T] (gathered: [T, L + T]) float32, 0 or -inf,
             logits_index [S] int64
    outputs  logits [S, vocab] float32, per layer new_key.{i}, new_value.{i} [T, KV, D] float32
             (keys after RoPE: what the cache stores)

The decode view (`View.DECODE`, passes where every sequence feeds one token: T = S) takes
input_ids, position_ids [S], seqlens_k [S] int32 (each sequence's past length), per layer past_key.{i},
past_value.{i} [S, KV, L, D] float32 (the gathered view), logits_index [S], no bias, and adds the outputs
present_key.{i}, present_value.{i} [S, KV, L, D]. It is built from ONNX Runtime's contrib ops (domain
com.microsoft, CPU and CUDA): GroupQueryAttention (`attention.group_query_attention`), RotaryEmbedding
over precomputed cos / sin tables of ``max_position_embeddings`` rows, and SkipSimplifiedLayerNormalization
(the residual Add joined to the next RMSNorm): about half the nodes of the standard-ops graphs, whose
per-node cost dominates a small decode pass on the CPU.

Checkpoint: transformers' `LlamaForCausalLM` names and layouts (``model.layers.{i}.self_attn.q_proj.weight``
``[H * D, E]``, ...). The q/k/v and gate/up projections are packed into one MatMul each at export time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import SpecMismatch, UnsupportedModel
from ..spec import KVSpec, Llama3Scaling, RopeSpec, RopeStyle
from .attention import KVBlock, View, attention, group_query_attention
from .checkpoint import Checkpoint
from .graph import CONTRIB_DOMAIN, GraphBuilder, apply_rope, linear, rms_norm, rotary_tables, silu
from .interface import (
    TOKEN_IDS,
    DecodeInputs,
    StepInputs,
    declare_decode_inputs,
    declare_step_inputs,
    step_model,
)

MODEL_TYPES = ("llama",)
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    """The parts of a transformers `LlamaConfig` the graph depends on (read from config.json)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def spec(self) -> KVSpec:
        """What one token costs per layer in the graph's K/V outputs (computed in float32)."""
        return KVSpec(self.num_layers, self.num_kv_heads, self.head_dim, "float32")


def read_config(ckpt: Checkpoint) -> LlamaConfig:
    """Parse and validate a Llama config.json.

    Raises:
        UnsupportedModel: another model_type, an activation other than SiLU, or a rope type other
            than default / llama3.
        SpecMismatch: missing or inconsistent sizes (heads not a multiple of kv heads, ...).
    """
    c = ckpt.config
    model_type = c.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModel(
            f"{ckpt.directory}: model_type {model_type!r} is not a Llama-family model "
            f"(the llama exporter reads model_type {', '.join(MODEL_TYPES)})"
        )
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(
            f"{ckpt.directory}: hidden_act {act!r} is not supported (Llama's MLP uses silu)"
        )
    hidden = ckpt.require("hidden_size")
    heads = ckpt.require("num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise SpecMismatch(
            f"{ckpt.directory}: {heads} attention heads are not a multiple of {kv_heads} kv heads"
        )
    if c.get("head_dim") is None and hidden % heads:
        raise SpecMismatch(f"{ckpt.directory}: hidden_size {hidden} is not a multiple of {heads} heads")
    rotary_dim = int(head_dim * float(c.get("partial_rotary_factor", 1.0)))
    return LlamaConfig(
        hidden_size=hidden,
        num_layers=ckpt.require("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=ckpt.require("intermediate_size"),
        vocab_size=ckpt.require("vocab_size"),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope=RopeSpec(
            theta=float(c.get("rope_theta", 10000.0)),
            rotary_dim=None if rotary_dim == head_dim else rotary_dim,
            style=RopeStyle.NEOX,
            scaling=_rope_scaling(ckpt),
        ),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
    )


def _rope_scaling(ckpt: Checkpoint) -> Llama3Scaling | None:
    scaling = ckpt.config.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModel(
            f"{ckpt.directory}: rope_scaling type {kind!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    return Llama3Scaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def build_decoder_step(ckpt: Checkpoint, kv_dtype: str, view: View) -> onnx.ModelProto:
    """The decoder-step ModelProto of the Llama checkpoint `ckpt` (see the module docstring)."""
    cfg = read_config(ckpt)
    E, KV, D, V = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    g = GraphBuilder("kvarray_llama_decoder_step")

    inputs: DecodeInputs | StepInputs
    if view is View.DECODE:
        inputs = declare_decode_inputs(g, kv_dtype, cfg.num_layers, KV, D)
        bias = ""  # GroupQueryAttention masks by seqlens_k
    else:
        inputs = declare_step_inputs(g, view, kv_dtype, cfg.num_layers, KV, D)
        bias = g.input("attention_bias", "float32", ["tokens", "past_and_tokens"])
    logits_index = g.input("logits_index", "int64", ["logits_rows"])

    embed = g.weight("model.embed_tokens.weight", ckpt.tensor("model.embed_tokens.weight", [V, E]))
    h = g.op("Gather", embed, inputs.input_ids, axis=0)  # [T, E]
    with g.scope("rope"):
        rope = _rope(g, ckpt, cfg, inputs.position_ids, fused=view is View.DECODE)

    norms = [f"model.layers.{i}.{n}" for i in range(cfg.num_layers) for n in NORMS] + ["model.norm"]
    weights = [ckpt.tensor(f"{n}.weight", [E]) for n in norms]
    if view is View.DECODE:  # residual Add + next RMSNorm as one SkipSimplifiedLayerNormalization
        x = rms_norm(g, h, weights[0], cfg.rms_norm_eps, norms[0])
        for k in range(2 * cfg.num_layers):
            i, p = divmod(k, 2)
            with g.scope(f"layers.{i}"):
                if p == 0:
                    out = _self_attention(g, ckpt, cfg, x, i, inputs, rope, bias)
                else:
                    out = _mlp(g, ckpt, cfg, x, f"model.layers.{i}")
                x, h = _skip_norm(g, out, h, weights[k + 1], cfg.rms_norm_eps, norms[k + 1])
        last = g.op("Gather", x, logits_index, axis=0)  # [S, E], final norm applied
    else:
        for i in range(cfg.num_layers):
            with g.scope(f"layers.{i}"):
                x = rms_norm(g, h, weights[2 * i], cfg.rms_norm_eps, norms[2 * i])
                h = g.op("Add", h, _self_attention(g, ckpt, cfg, x, i, inputs, rope, bias))
                x = rms_norm(g, h, weights[2 * i + 1], cfg.rms_norm_eps, norms[2 * i + 1])
                h = g.op("Add", h, _mlp(g, ckpt, cfg, x, f"model.layers.{i}"))
        with g.scope("head"):
            last = g.op("Gather", h, logits_index, axis=0)  # [S, E]
            last = rms_norm(g, last, weights[-1], cfg.rms_norm_eps, "model.norm")

    with g.scope("head"):
        if cfg.tie_word_embeddings:
            head = embed
        else:
            head = g.weight("lm_head.weight", ckpt.tensor("lm_head.weight", [V, E]))
        g.op("Gemm", last, head, transB=1, outputs=["logits"])
    return step_model(g, ckpt, "llama", cfg.spec, V, kv_dtype, view, rope=cfg.rope, token_ids=TOKEN_IDS)


#: each layer's RMSNorms, in order (the input one before attention, the other before the MLP)
NORMS = ("input_layernorm", "post_attention_layernorm")


def _rope(
    g: GraphBuilder, ckpt: Checkpoint, cfg: LlamaConfig, position_ids: str, *, fused: bool
) -> Callable[[str], str]:
    """The rotation of ``qk [T, heads, D]`` (queries and keys together) at ``position_ids [T]``.

    Standard ops (`fused` False): cos / sin computed in the graph from the positions (`rotary_tables`),
    `apply_rope`. Fused: com.microsoft RotaryEmbedding over ``[1, T, heads * D]`` with cos / sin tables
    ``[max_position_embeddings, R / 2]`` (float32 angles ``float32(p) * inv_freq``, as transformers
    computes them), stored in the graph.
    """
    D = cfg.head_dim
    rotary = cfg.rope.rotary_dims(D)
    inv_freq = cfg.rope.inv_freq(D).astype(np.float32)
    if not fused:
        cos, sin = rotary_tables(g, position_ids, inv_freq)
        return lambda qk: apply_rope(g, qk, cos, sin, rotary, D)
    rows = int(ckpt.require("max_position_embeddings"))
    angles = np.arange(rows, dtype=np.float32)[:, None] * inv_freq[None, :]  # [P, R / 2] float32
    cos = g.weight("rope.cos_cache", np.cos(angles).astype(np.float32))
    sin = g.weight("rope.sin_cache", np.sin(angles).astype(np.float32))
    positions = g.op("Unsqueeze", position_ids, g.const([0]))  # [1, T]
    heads = cfg.num_heads + cfg.num_kv_heads
    partial = {} if rotary == D else {"rotary_embedding_dim": rotary}

    def rotate(qk: str) -> str:
        flat = g.op("Reshape", qk, g.const([1, -1, heads * D]))
        flat = g.op(
            "RotaryEmbedding", flat, positions, cos, sin, domain=CONTRIB_DOMAIN, num_heads=heads, **partial
        )
        return g.op("Reshape", flat, g.const([-1, heads, D]))

    return rotate


def _skip_norm(
    g: GraphBuilder, x: str, residual: str, weight: np.ndarray, eps: float, name: str
) -> tuple[str, str]:
    """``(RMSNorm(residual + x), residual + x)`` of ``[T, E]`` rows as one com.microsoft
    SkipSimplifiedLayerNormalization (its 4th output is the sum)."""
    normed, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization",
        x,
        residual,
        g.weight(f"{name}.weight", weight),
        outputs=4,
        domain=CONTRIB_DOMAIN,
        epsilon=eps,
    )
    return normed, total


def _self_attention(
    g: GraphBuilder,
    ckpt: Checkpoint,
    cfg: LlamaConfig,
    x: str,
    i: int,
    inputs: DecodeInputs | StepInputs,
    rope: Callable[[str], str],
    bias: str,
) -> str:
    """Layer i's attention of the normed ``x [T, E]`` over its past (``inputs.pasts[i]``) and this pass ->
    ``[T, E]``: the block attention with `bias`, or (decode view) GroupQueryAttention.

    Produces the graph outputs ``new_key.{i}`` (after RoPE) and ``new_value.{i}`` ``[T, KV, D]``.
    """
    E, H, KV, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{i}"
    rows = (("q", H * D), ("k", KV * D), ("v", KV * D))
    weight = np.concatenate([ckpt.tensor(f"{p}.self_attn.{n}_proj.weight", [r, E]) for n, r in rows])
    bias_qkv = None
    if cfg.attention_bias:
        bias_qkv = np.concatenate([ckpt.tensor(f"{p}.self_attn.{n}_proj.bias", [r]) for n, r in rows])
    qkv = linear(g, x, weight, f"{p}.self_attn.qkv_proj", bias_qkv)  # [T, (H + 2 KV) D]
    qkv = g.op("Reshape", qkv, g.const([0, H + 2 * KV, D]))
    qk, value = g.op("Split", qkv, g.const([H + KV, KV]), axis=1, outputs=[f"{p}.qk", f"new_value.{i}"])
    qk = rope(qk)  # q and k rotate together
    query, key = g.op("Split", qk, g.const([H, KV]), axis=1, outputs=[f"{p}.query", f"new_key.{i}"])
    scale = 1.0 / math.sqrt(D)
    if isinstance(inputs, DecodeInputs):
        out = group_query_attention(
            g, i, query, key, value, inputs.pasts[i], inputs.seqlens_k, inputs.total,
            kv_heads=KV, group=cfg.group, head_dim=D, scale=scale,
        )  # fmt: skip
    else:
        blocks = [inputs.pasts[i], KVBlock(key, value)]  # past cells, then this pass's tokens
        out = attention(g, query, blocks, bias, kv_heads=KV, group=cfg.group, head_dim=D, scale=scale)
    o_bias = ckpt.tensor(f"{p}.self_attn.o_proj.bias", [E]) if cfg.attention_bias else None
    o_weight = ckpt.tensor(f"{p}.self_attn.o_proj.weight", [E, H * D])
    return linear(g, out, o_weight, f"{p}.self_attn.o_proj", o_bias)


def _mlp(g: GraphBuilder, ckpt: Checkpoint, cfg: LlamaConfig, x: str, p: str) -> str:
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` of the normed ``x [T, E]`` -> ``[T, E]``."""
    E, inner = cfg.hidden_size, cfg.intermediate_size
    gate_up = np.concatenate([ckpt.tensor(f"{p}.mlp.{n}_proj.weight", [inner, E]) for n in ("gate", "up")])
    bias = None
    if cfg.mlp_bias:
        bias = np.concatenate([ckpt.tensor(f"{p}.mlp.{n}_proj.bias", [inner]) for n in ("gate", "up")])
    packed = linear(g, x, gate_up, f"{p}.mlp.gate_up_proj", bias)  # [T, 2 inner]
    gate, up = g.op("Split", packed, g.const([inner, inner]), axis=-1, outputs=2)
    hidden = g.op("Mul", silu(g, gate), up)
    down_bias = ckpt.tensor(f"{p}.mlp.down_proj.bias", [E]) if cfg.mlp_bias else None
    down = ckpt.tensor(f"{p}.mlp.down_proj.weight", [E, inner])
    return linear(g, hidden, down, f"{p}.mlp.down_proj", down_bias)


def export_llama(ckpt: Checkpoint, out_dir: Path, kv_dtype: str, view: View) -> list[Path]:
    """Write ``decoder_step.{view}.{kv_dtype}.onnx`` into `out_dir` and return its path."""
    from . import save_model

    model = build_decoder_step(ckpt, kv_dtype, view)
    return [save_model(model, out_dir / f"decoder_step.{view.value}.{kv_dtype}.onnx")]

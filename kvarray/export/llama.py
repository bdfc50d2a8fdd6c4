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

The decode view (`View.DECODE`, passes where every sequence feeds one token: T = S; `build_decode_step`)
takes input_ids, position_ids [S], seqlens_k [S] int32 (each sequence's past length), per layer
past_key.{i}, past_value.{i} [S, KV, L, D] float32 (the gathered view), logits_index [S], no bias, and
outputs logits [S, vocab] and per layer present_key.{i}, present_value.{i} [S, KV, L, D] (the past with
this pass's rows written at row seqlens_k: the cache reads its new rows there; no new_key outputs). It
is built from ONNX Runtime's contrib ops (domain com.microsoft, CPU and CUDA), as onnxruntime-genai's
graphs are: GroupQueryAttention over the packed q/k/v projection, rotating q and k itself from cos / sin
tables of ``max_position_embeddings`` rows at ``position_ids`` (a RotaryEmbedding node first when the
rotary half-width is not a multiple of 8, which its kernel needs), SkipSimplifiedLayerNormalization (the
residual Add joined to the next RMSNorm), separate gate and up projections: 11 nodes a layer against the
standard graph's 40-odd, whose per-node cost dominates a small decode pass on the CPU.

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
from .attention import KVBlock, RopeTables, View, attention, group_query_attention
from .checkpoint import Checkpoint
from .graph import CONTRIB_DOMAIN, GraphBuilder, apply_rope, linear, rms_norm, rotary_tables, silu
from .interface import TOKEN_IDS, declare_decode_inputs, declare_step_inputs, step_model

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
    if view is View.DECODE:
        return build_decode_step(ckpt, cfg, kv_dtype)
    g = GraphBuilder("kvarray_llama_decoder_step")

    inputs = declare_step_inputs(g, view, kv_dtype, cfg.num_layers, KV, D)
    bias = g.input("attention_bias", "float32", ["tokens", "past_and_tokens"])
    logits_index = g.input("logits_index", "int64", ["logits_rows"])

    embed = g.weight("model.embed_tokens.weight", ckpt.tensor("model.embed_tokens.weight", [V, E]))
    h = g.op("Gather", embed, inputs.input_ids, axis=0)  # [T, E]
    with g.scope("rope"):
        cos, sin = rotary_tables(g, inputs.position_ids, cfg.rope.inv_freq(D))

    def rope(qk: str) -> str:
        return apply_rope(g, qk, cos, sin, cfg.rope.rotary_dims(D), D)

    for i in range(cfg.num_layers):
        with g.scope(f"layers.{i}"):
            x = _norm(g, ckpt, cfg, h, f"model.layers.{i}.input_layernorm")
            h = g.op("Add", h, _self_attention(g, ckpt, cfg, x, i, inputs.pasts[i], rope, bias))
            x = _norm(g, ckpt, cfg, h, f"model.layers.{i}.post_attention_layernorm")
            h = g.op("Add", h, _mlp(g, ckpt, cfg, x, f"model.layers.{i}"))

    with g.scope("head"):
        last = g.op("Gather", h, logits_index, axis=0)  # [S, E]
        last = _norm(g, ckpt, cfg, last, "model.norm")
        _head(g, ckpt, cfg, last, embed)
    return step_model(g, ckpt, "llama", cfg.spec, V, kv_dtype, view, rope=cfg.rope, token_ids=TOKEN_IDS)


def build_decode_step(ckpt: Checkpoint, cfg: LlamaConfig, kv_dtype: str) -> onnx.ModelProto:
    """The decode-view ModelProto (module docstring): ONNX Runtime's contrib ops, one token per sequence."""
    E, H, KV, D, V = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    g = GraphBuilder("kvarray_llama_decode_step")
    inputs = declare_decode_inputs(g, kv_dtype, cfg.num_layers, KV, D)
    logits_index = g.input("logits_index", "int64", ["logits_rows"])

    embed = g.weight("model.embed_tokens.weight", ckpt.tensor("model.embed_tokens.weight", [V, E]))
    h = g.op("Gather", embed, inputs.input_ids, axis=0)  # [S, E]
    rotary = cfg.rope.rotary_dims(D)
    inv_freq = cfg.rope.inv_freq(D).astype(np.float32)
    angles = np.arange(int(ckpt.require("max_position_embeddings")), dtype=np.float32)[:, None] * inv_freq
    tables = RopeTables(  # float32 angles float32(p) * inv_freq, as transformers computes them
        g.weight("rope.cos_cache", np.cos(angles).astype(np.float32)),
        g.weight("rope.sin_cache", np.sin(angles).astype(np.float32)),
        g.op("Unsqueeze", inputs.position_ids, g.const([1])),  # [S, 1]
    )
    inside = (rotary // 2) % 8 == 0  # GroupQueryAttention's kernel rotates half-widths of multiples of 8

    def rotate(qkv: str) -> str:  # RotaryEmbedding on q and k of the packed [S, (H + 2 KV) D] projection
        heads = g.op("Reshape", qkv, g.const([0, H + 2 * KV, D]))
        qk, v = g.op("Split", heads, g.const([H + KV, KV]), axis=1, outputs=2)
        flat = g.op("Reshape", qk, g.const([1, -1, (H + KV) * D]))
        partial = {} if rotary == D else {"rotary_embedding_dim": rotary}
        flat = g.op("RotaryEmbedding", flat, g.op("Unsqueeze", inputs.position_ids, g.const([0])),
                    tables.cos, tables.sin, domain=CONTRIB_DOMAIN, num_heads=H + KV, **partial)  # fmt: skip
        qkv = g.op("Concat", g.op("Reshape", flat, g.const([-1, H + KV, D])), v, axis=1)
        return g.op("Reshape", qkv, g.const([0, (H + 2 * KV) * D]))

    x = _norm(g, ckpt, cfg, h, "model.layers.0.input_layernorm")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        with g.scope(f"layers.{i}"):
            qkv = linear(g, x, *_qkv(ckpt, cfg, p))  # [S, (H + 2 KV) D]
            rope = tables if inside else None
            out = group_query_attention(
                g, i, qkv if inside else rotate(qkv), inputs.pasts[i], inputs.seqlens_k, inputs.total, rope,
                kv_heads=KV, group=cfg.group, head_dim=D, scale=1.0 / math.sqrt(D),
            )  # fmt: skip
            out = linear(g, out, *_o_proj(ckpt, cfg, p))
            x, h = _skip_norm(g, ckpt, cfg, out, h, f"{p}.post_attention_layernorm")
            out = _mlp(g, ckpt, cfg, x, p, packed=False)
            following = "model.norm" if i == cfg.num_layers - 1 else f"model.layers.{i + 1}.input_layernorm"
            x, h = _skip_norm(g, ckpt, cfg, out, h, following)
    with g.scope("head"):
        _head(g, ckpt, cfg, g.op("Gather", x, logits_index, axis=0), embed)  # x: the final norm's
    return step_model(
        g, ckpt, "llama", cfg.spec, V, kv_dtype, View.DECODE, rope=cfg.rope, token_ids=TOKEN_IDS
    )


def _norm(g: GraphBuilder, ckpt: Checkpoint, cfg: LlamaConfig, x: str, name: str) -> str:
    """The RMSNorm `name` (its ``{name}.weight [E]``) of ``x [T, E]``."""
    return rms_norm(g, x, ckpt.tensor(f"{name}.weight", [cfg.hidden_size]), cfg.rms_norm_eps, name)


def _head(g: GraphBuilder, ckpt: Checkpoint, cfg: LlamaConfig, last: str, embed: str) -> None:
    """``logits [S, V]`` of the normed ``last [S, E]`` (a tied head reuses the embedding initializer)."""
    V, E = cfg.vocab_size, cfg.hidden_size
    head = (
        embed
        if cfg.tie_word_embeddings
        else g.weight("lm_head.weight", ckpt.tensor("lm_head.weight", [V, E]))
    )
    g.op("Gemm", last, head, transB=1, outputs=["logits"])


def _qkv(ckpt: Checkpoint, cfg: LlamaConfig, p: str) -> tuple[np.ndarray, str, np.ndarray | None]:
    """`linear`'s arguments after the input of layer `p`'s packed q/k/v projection ``[(H + 2 KV) D, E]``."""
    E, H, KV, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rows = (("q", H * D), ("k", KV * D), ("v", KV * D))
    weight = np.concatenate([ckpt.tensor(f"{p}.self_attn.{n}_proj.weight", [r, E]) for n, r in rows])
    bias = None
    if cfg.attention_bias:
        bias = np.concatenate([ckpt.tensor(f"{p}.self_attn.{n}_proj.bias", [r]) for n, r in rows])
    return weight, f"{p}.self_attn.qkv_proj", bias


def _o_proj(ckpt: Checkpoint, cfg: LlamaConfig, p: str) -> tuple[np.ndarray, str, np.ndarray | None]:
    """`linear`'s arguments after the input of layer `p`'s output projection ``[E, H D]``."""
    E, HD = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    bias = ckpt.tensor(f"{p}.self_attn.o_proj.bias", [E]) if cfg.attention_bias else None
    return ckpt.tensor(f"{p}.self_attn.o_proj.weight", [E, HD]), f"{p}.self_attn.o_proj", bias


def _skip_norm(
    g: GraphBuilder, ckpt: Checkpoint, cfg: LlamaConfig, x: str, residual: str, name: str
) -> tuple[str, str]:
    """``(RMSNorm_name(residual + x), residual + x)`` of ``[T, E]`` rows as one com.microsoft
    SkipSimplifiedLayerNormalization (its 4th output is the sum)."""
    weight = g.weight(f"{name}.weight", ckpt.tensor(f"{name}.weight", [cfg.hidden_size]))
    normed, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization", x, residual, weight, outputs=4, domain=CONTRIB_DOMAIN,
        epsilon=cfg.rms_norm_eps,
    )  # fmt: skip
    return normed, total


def _self_attention(
    g: GraphBuilder,
    ckpt: Checkpoint,
    cfg: LlamaConfig,
    x: str,
    i: int,
    past: KVBlock,
    rope: Callable[[str], str],
    bias: str,
) -> str:
    """Layer i's attention of the normed ``x [T, E]`` over `past` and this pass -> ``[T, E]``.

    Produces the graph outputs ``new_key.{i}`` (after RoPE) and ``new_value.{i}`` ``[T, KV, D]``.
    """
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{i}"
    qkv = linear(g, x, *_qkv(ckpt, cfg, p))  # [T, (H + 2 KV) D]
    qkv = g.op("Reshape", qkv, g.const([0, H + 2 * KV, D]))
    qk, value = g.op("Split", qkv, g.const([H + KV, KV]), axis=1, outputs=[f"{p}.qk", f"new_value.{i}"])
    qk = rope(qk)  # q and k rotate together
    query, key = g.op("Split", qk, g.const([H, KV]), axis=1, outputs=[f"{p}.query", f"new_key.{i}"])
    blocks = [past, KVBlock(key, value)]  # past cells, then this pass's tokens
    scale = 1.0 / math.sqrt(D)
    out = attention(g, query, blocks, bias, kv_heads=KV, group=cfg.group, head_dim=D, scale=scale)
    return linear(g, out, *_o_proj(ckpt, cfg, p))


def _mlp(g: GraphBuilder, ckpt: Checkpoint, cfg: LlamaConfig, x: str, p: str, packed: bool = True) -> str:
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` of the normed ``x [T, E]`` -> ``[T, E]``; gate and up in
    one MatMul then a Split (`packed`), or in two MatMuls (no Split: the decode view)."""
    E, inner = cfg.hidden_size, cfg.intermediate_size
    weights = [ckpt.tensor(f"{p}.mlp.{n}_proj.weight", [inner, E]) for n in ("gate", "up")]
    biases = (
        [ckpt.tensor(f"{p}.mlp.{n}_proj.bias", [inner]) for n in ("gate", "up")] if cfg.mlp_bias else None
    )
    if packed:
        bias = None if biases is None else np.concatenate(biases)
        both = linear(g, x, np.concatenate(weights), f"{p}.mlp.gate_up_proj", bias)  # [T, 2 inner]
        gate, up = g.op("Split", both, g.const([inner, inner]), axis=-1, outputs=2)
    else:
        gate, up = (
            linear(g, x, w, f"{p}.mlp.{n}_proj", None if biases is None else biases[k])
            for k, (n, w) in enumerate(zip(("gate", "up"), weights, strict=True))
        )
    hidden = g.op("Mul", silu(g, gate), up)
    down_bias = ckpt.tensor(f"{p}.mlp.down_proj.bias", [E]) if cfg.mlp_bias else None
    down = ckpt.tensor(f"{p}.mlp.down_proj.weight", [E, inner])
    return linear(g, hidden, down, f"{p}.mlp.down_proj", down_bias)


def export_llama(ckpt: Checkpoint, out_dir: Path, kv_dtype: str, view: View) -> list[Path]:
    """Write ``decoder_step.{view}.{kv_dtype}.onnx`` into `out_dir` and return its path."""
    from . import save_model

    model = build_decoder_step(ckpt, kv_dtype, view)
    return [save_model(model, out_dir / f"decoder_step.{view.value}.{kv_dtype}.onnx")]

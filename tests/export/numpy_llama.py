"""A plain NumPy Llama forward pass over one whole sequence, written from the math (tests only).

It reads a checkpoint folder with `kvarray.export.Checkpoint` and returns logits for every position, so
configurations transformers' Llama cannot express (partial rotary) and checkpoints written without torch
can be checked. It is itself checked against the committed transformers reference.
"""

from __future__ import annotations

import numpy as np

from kvarray.export import Checkpoint
from kvarray.export.llama import read_config
from kvarray.export.reference import LLAMA3_ROPE, SMALL_LLAMA_SIZES

#: config.json sizes of the exporter tests' random Llamas, and a llama3-scaled rope's overrides (shared
#: with the live transformers comparisons)
SIZES, LLAMA3_ROPE = SMALL_LLAMA_SIZES, LLAMA3_ROPE


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(checkpoint: str, tokens: list[int]) -> np.ndarray:
    """Logits ``[len(tokens), vocab]`` float64 of one sequence at positions 0..len-1."""
    ckpt = Checkpoint(checkpoint)
    cfg = read_config(ckpt)
    t = lambda name: ckpt.tensor(name).astype(np.float64)  # noqa: E731
    H, KV, D, T = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, len(tokens)
    R = cfg.rope.rotary_dims(D)
    angles = np.arange(T)[:, None] * cfg.rope.inv_freq(D)[None, :]  # [T, R/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope(x: np.ndarray) -> np.ndarray:  # [T, heads, D], NeoX pairing on the first R values
        x1, x2, rest = x[..., : R // 2], x[..., R // 2 : R], x[..., R:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)

    def proj(x: np.ndarray, name: str, bias: bool) -> np.ndarray:
        y = x @ t(f"{name}.weight").T
        return y + t(f"{name}.bias") if bias else y

    h = t("model.embed_tokens.weight")[tokens]
    causal = np.where(np.tril(np.ones((T, T), bool)), 0.0, -np.inf)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        x = rms_norm(h, t(f"{p}.input_layernorm.weight"), cfg.rms_norm_eps)
        q = rope(proj(x, f"{p}.self_attn.q_proj", cfg.attention_bias).reshape(T, H, D))
        k = rope(proj(x, f"{p}.self_attn.k_proj", cfg.attention_bias).reshape(T, KV, D))
        v = proj(x, f"{p}.self_attn.v_proj", cfg.attention_bias).reshape(T, KV, D)
        k, v = (
            np.repeat(k, H // KV, axis=1),
            np.repeat(v, H // KV, axis=1),
        )  # query head h reads kv head h // G
        scores = np.einsum("thd,uhd->htu", q, k) / np.sqrt(D) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("htu,uhd->thd", probs, v).reshape(T, H * D)
        h = h + proj(out, f"{p}.self_attn.o_proj", cfg.attention_bias)
        x = rms_norm(h, t(f"{p}.post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate = proj(x, f"{p}.mlp.gate_proj", cfg.mlp_bias)
        up = proj(x, f"{p}.mlp.up_proj", cfg.mlp_bias)
        h = h + proj(gate / (1 + np.exp(-gate)) * up, f"{p}.mlp.down_proj", cfg.mlp_bias)
    h = rms_norm(h, t("model.norm.weight"), cfg.rms_norm_eps)
    head = t("model.embed_tokens.weight") if cfg.tie_word_embeddings else t("lm_head.weight")
    return h @ head.T


def write_checkpoint(directory, seed: int = 0, **overrides) -> dict:
    """Write a random Llama checkpoint (config.json + model.safetensors) with NumPy only; return its config.

    The base is `SIZES`; `overrides` are config.json keys (``tie_word_embeddings``, ``attention_bias``,
    ``partial_rotary_factor``, ``rope_scaling``, ...).
    """
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        **SIZES,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    config.update(overrides)
    E, H, KV, inner, V = (
        config[k]
        for k in (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
        )
    )
    D = config.get("head_dim") or E // H
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(V, E), "model.norm.weight": 1 + w(E)}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = w(V, E)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = 1 + w(E)
        tensors[f"{p}.post_attention_layernorm.weight"] = 1 + w(E)
        for name, rows, cols in (("q", H * D, E), ("k", KV * D, E), ("v", KV * D, E), ("o", E, H * D)):
            tensors[f"{p}.self_attn.{name}_proj.weight"] = w(rows, cols)
            if config.get("attention_bias"):
                tensors[f"{p}.self_attn.{name}_proj.bias"] = w(rows)
        for name, rows, cols in (("gate", inner, E), ("up", inner, E), ("down", E, inner)):
            tensors[f"{p}.mlp.{name}_proj.weight"] = w(rows, cols)
            if config.get("mlp_bias"):
                tensors[f"{p}.mlp.{name}_proj.bias"] = w(rows)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "model.safetensors"))
    return config

"""A Llama in plain PyTorch (CPU) keeping its K/V in a kvarray `CausalCache`: the example of docs/pytorch.md.

Run it with ``python docs/examples/pytorch_llama.py [CHECKPOINT_DIR]``; tests/test_pytorch_example.py checks
it against transformers. Shapes: T tokens of a pass, S sequences, n_kv cells of the pool view, Q query
heads, H kv heads, G = Q // H query heads per kv head, D head_dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from kvarray import KVSpec, Llama3Scaling, RopeSpec
from kvarray.causal import CausalCache

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "tiny-llama-random" / "checkpoint"


@dataclass
class Llama:
    """A Llama's config.json (as a dict) and its weights under Hugging Face's names, float32."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]

    @classmethod
    def load(cls, checkpoint: Path) -> Llama:
        """From a directory written by ``save_pretrained`` (config.json, model.safetensors)."""
        config = json.loads((checkpoint / "config.json").read_text())
        return cls(config, load_file(checkpoint / "model.safetensors"))

    def rope(self) -> RopeSpec:
        """The rotary embedding; a RopeSpec is also what ``cache.shift`` needs to re-rotate cached keys."""
        s = self.config.get("rope_scaling") or {}
        llama3 = None
        if s.get("rope_type") == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            llama3 = Llama3Scaling(*(s[k] for k in keys))
        return RopeSpec(theta=self.config["rope_theta"], scaling=llama3)

    def new_cache(self, capacity: int, max_sequences: int) -> CausalCache:
        """A float32 cache, NumPy pools ``[capacity, H, D]`` per layer (torch reads them through DLPack)."""
        c = self.config
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        spec = KVSpec(c["num_hidden_layers"], c["num_key_value_heads"], head_dim, "float32")
        return CausalCache(spec, capacity, max_sequences, xp=np)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, E] -> [T, E]."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with NeoX pairing (value i turns with value i + D/2): x [T, heads, D], cos/sin [T, 1, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [T, Q, D], keys/values [n_kv, H, D], bias [T, n_kv] -> [T, Q, D].

    Grouped-query attention by folding: query head j reads kv head j // G, so q is viewed as [T, H, G, D]
    and K/V are never repeated (no copy of the pool view).
    """
    t, heads, d = q.shape
    kv_heads = keys.shape[1]
    qg = q.view(t, kv_heads, heads // kv_heads, d)  # [T, H, G, D]
    scores = torch.einsum("thgd,nhd->hgtn", qg, keys) * d**-0.5 + bias  # [H, G, T, n_kv]
    out = torch.einsum("hgtn,nhd->thgd", scores.softmax(-1), values)  # [T, H, G, D]
    return out.reshape(t, heads, d)


@torch.inference_mode()
def forward(
    model: Llama, cache: CausalCache, tokens: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One pass over a flat batch: tokens, seq_ids, positions [T] int64 -> logits [T, V]."""
    c, w = model.config, model.weights
    cache.start_forward(seq_ids, positions)  # a cell for every token: cache.plan.slot_mapping [T]
    d, eps = cache.spec.head_dim, c["rms_norm_eps"]
    inv_freq = torch.from_numpy(model.rope().inv_freq(d)).float()  # [D/2]
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)[:, None, :]  # [T, 1, D]
    cos, sin = angles.cos(), angles.sin()
    h = w["model.embed_tokens.weight"][tokens]  # [T, E]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)  # [T, E]
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(len(tokens), -1, d)  # [T, Q, D]
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(len(tokens), -1, d)  # [T, H, D]
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(len(tokens), -1, d)  # [T, H, D]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache.put(layer, k, v)  # torch tensors, read through DLPack and scattered into their cells
        view = cache.get(layer, "pool")  # keys/values [n_kv, H, D]: slices of the pools, bias [T, n_kv]
        keys, values = torch.from_dlpack(view.keys), torch.from_dlpack(view.values)  # zero-copy
        bias = torch.from_dlpack(view.bias)  # 0 / -inf, shared by every layer: never write into it
        o = attend(q, keys, values, bias).flatten(1)  # [T, Q * D]
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T  # [T, I]
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T  # [T, V]


@dataclass
class Generation:
    """tokens: each sequence's new tokens; logits: each pass's [T, V] (prefill: every prompt token)."""

    tokens: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)


def generate(model: Llama, cache: CausalCache, prompts: list[list[int]], steps: int) -> Generation:
    """Greedy decoding of sequences 0, 1, ...: one prefill pass over all prompts in one flat batch, then
    `steps` decode passes of one token per sequence (steps + 1 new tokens each)."""
    seq_ids = torch.cat([torch.full((len(p),), s) for s, p in enumerate(prompts)])  # [T]
    positions = torch.cat([torch.arange(len(p)) for p in prompts])  # [T]
    tokens = torch.tensor([token for p in prompts for token in p])  # [T]
    out = Generation([[] for _ in prompts])
    for _ in range(steps + 1):
        logits = forward(model, cache, tokens, seq_ids, positions)  # [T, V]
        out.logits.append(logits)
        last = torch.tensor(cache.plan.logits_index)  # [S] each sequence's last row (copied: read-only)
        tokens = logits[last].argmax(-1)  # [S] greedy
        for s, token in enumerate(tokens.tolist()):
            out.tokens[s].append(token)
        seq_ids, positions = seq_ids[last], positions[last] + 1  # [S]: the next pass decodes
    return out


def main(checkpoint: Path = CHECKPOINT) -> None:
    model = Llama.load(checkpoint)
    cache = model.new_cache(capacity=256, max_sequences=4)
    result = generate(model, cache, [[1, 2, 3, 4, 5], [10, 20, 30, 40, 50, 60, 70, 80, 90]], steps=16)
    view = cache.get(0, "pool")
    keys = torch.from_dlpack(view.keys)
    print(f"pool view {tuple(keys.shape)}, zero-copy: {keys.data_ptr() == view.keys.ctypes.data}")
    for s, tokens in enumerate(result.tokens):
        print(f"sequence {s}: {tokens}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else CHECKPOINT)

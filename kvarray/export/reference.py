"""transformers as the oracle: random checkpoints and greedy references (needs the `reference` extra).

Used by models/build.py to write the committed references and by the tests' live comparisons. torch and
transformers are imported inside the functions, so importing this module costs nothing without them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: `LlamaConfig` sizes of the tests' small random Llamas: 2 layers, hidden 64, 4 heads of 16 over 2 kv heads,
#: the byte vocabulary (259).
SMALL_LLAMA_SIZES: dict[str, Any] = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
#: `random_llama` arguments of a small random Llama whose greedy choices are far from ties (weights of
#: std 0.1) and whose special tokens are none of the byte ids.
SMALL_LLAMA: dict[str, Any] = dict(
    SMALL_LLAMA_SIZES,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
#: config.json overrides of a llama3-scaled rope whose original context (16) the tests' positions pass.
LLAMA3_ROPE: dict[str, Any] = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}
#: overrides of `SMALL_LLAMA` that take the exporters' other branches (a tied head, q/k/v and MLP biases
#: with one kv head, llama3 rope scaling, a head_dim that is not hidden / heads), by test id.
LLAMA_VARIANTS: dict[str, dict[str, Any]] = {
    "tied-head": {"tie_word_embeddings": True},
    "biases-mqa": {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1},
    "llama3-rope": LLAMA3_ROPE,
    "mha-head-dim-32": {"head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 4},
}


def torch_unavailable_reason() -> str | None:
    """Why the live comparison with transformers cannot run here, or None when it can."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"torch/transformers not importable ({exc}); install the 'reference' extra"
    return None


def random_llama(directory: str | Path, seed: int, tokenizer: Any = None, **config: Any) -> Path:
    """Save a seeded random-weight `LlamaForCausalLM` (float32 safetensors) into `directory`.

    `config` holds `LlamaConfig` arguments. Weights are drawn with std `initializer_range` (pass a large
    one, e.g. 0.1, so that logits are spread and greedy choices are far from ties) and the RMSNorm
    weights are set to 1 + 0.1 * N(0, 1) so that they matter. `tokenizer` (optional) is saved alongside.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def greedy_reference(
    checkpoint: str | Path, prompts: Sequence[Sequence[int]], new_tokens: int = 16
) -> dict[str, np.ndarray]:
    """transformers' greedy continuation and logits of each prompt, computed in float32.

    Returns, for prompt k of P tokens: ``prompt_{k} [P]`` int64, ``generated_{k} [new_tokens]`` int64
    (`generate`, greedy) and ``logits_{k} [P + new_tokens, vocab]`` float32: one forward pass over the
    prompt and the generated tokens, so rows P-1 .. P+new_tokens-2 are the logits each greedy choice was
    made from, and the last row is the logits after the last generated token.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for k, prompt in enumerate(prompts):
            ids = torch.tensor([list(prompt)], dtype=torch.int64)
            full = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            if full.shape[1] != len(prompt) + new_tokens:
                raise RuntimeError(
                    f"generate stopped early (end-of-text token) on prompt {k}; "
                    "choose another prompt or a checkpoint without eos_token_id"
                )
            logits = model(input_ids=full).logits[0].float().numpy()
            out[f"prompt_{k}"] = np.asarray(prompt, dtype=np.int64)
            out[f"generated_{k}"] = full[0, len(prompt) :].numpy().astype(np.int64)
            out[f"logits_{k}"] = logits.astype(np.float32)
    return out


def greedy_margin(reference: dict[str, np.ndarray]) -> float:
    """The smallest gap between the best and second-best logit over every greedy choice in `reference`."""
    gaps = []
    k = 0
    while f"prompt_{k}" in reference:
        p = len(reference[f"prompt_{k}"])
        rows = np.sort(reference[f"logits_{k}"][p - 1 : -1], axis=1)
        gaps.append(float((rows[:, -1] - rows[:, -2]).min()))
        k += 1
    return min(gaps)


# -- encoder-decoder models (T5, Whisper) --------------------------------------------------------------
def random_seq2seq(arch: str, directory: str | Path, seed: int, half: bool = False, **config: Any) -> Path:
    """Save a seeded random-weight T5 (`arch` "t5") or Whisper ("whisper") into `directory`.

    `config` holds `T5Config` / `WhisperConfig` arguments. Matrices are redrawn with std 0.1 (T5's
    embedding and relative position biases with std 1), norm weights as ``1 + 0.1 N(0, 1)``, biases with
    std 0.1, so that logits are spread and greedy choices are far from ties. Whisper's sinusoidal encoder
    positions are kept. `half` stores float16 weights (what the tests read is then exactly those values).
    """
    import torch
    from transformers import (
        T5Config,
        T5ForConditionalGeneration,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if arch == "t5":
        model: Any = T5ForConditionalGeneration(T5Config(**config))
    else:
        model = WhisperForConditionalGeneration(WhisperConfig(**config))
    model = model.float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "encoder.embed_positions" in name:
                continue
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif arch == "t5" and any(k in name for k in ("relative_attention", "embed_tokens", "shared")):
                param.copy_(torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    if half:
        model = model.half()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def seq2seq_reference(
    checkpoint: str | Path,
    encoder_inputs: Sequence[np.ndarray],
    decoder_prompts: Sequence[Sequence[int]],
    new_tokens: int = 16,
) -> dict[str, np.ndarray]:
    """transformers' greedy continuation and logits of an encoder-decoder model, in float32.

    Args:
        encoder_inputs: per sequence, T5 token ids ``[M]`` or Whisper features ``[n_mels, 3000]``.
        decoder_prompts: per sequence, the decoder's forced start (``[decoder_start_token_id, ...]``).
    Returns, for sequence k with a P-token decoder prompt: ``prompt_{k} [P]``, ``generated_{k}
    [new_tokens]`` (`generate`, greedy) and ``logits_{k} [P + new_tokens, vocab]`` (one forward pass of
    the decoder over the prompt and the generated tokens), plus ``encoder_{k}`` for T5's token ids.
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM, GenerationMixin, WhisperForConditionalGeneration

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    whisper = config["model_type"] == "whisper"
    cls: Any = WhisperForConditionalGeneration if whisper else AutoModelForSeq2SeqLM
    model = cls.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for k, (source, prompt) in enumerate(zip(encoder_inputs, decoder_prompts, strict=True)):
            if whisper:
                inputs = {"input_features": torch.tensor(np.asarray(source, np.float32)[None])}
            else:
                ids = torch.tensor([list(source)], dtype=torch.int64)
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                out[f"encoder_{k}"] = np.asarray(source, np.int64)
            decoder_ids = torch.tensor([list(prompt)], dtype=torch.int64)
            # Whisper's own generate adds its task/language/timestamp logic: call the plain greedy search
            full = GenerationMixin.generate(
                model, **inputs, decoder_input_ids=decoder_ids, max_new_tokens=new_tokens, do_sample=False
            )
            if full.shape[1] != len(prompt) + new_tokens:
                raise RuntimeError(f"generate stopped early on sequence {k}: use a config without eos")
            logits = model(**inputs, decoder_input_ids=full).logits[0].float().numpy()
            out[f"prompt_{k}"] = np.asarray(prompt, dtype=np.int64)
            out[f"generated_{k}"] = full[0, len(prompt) :].numpy().astype(np.int64)
            out[f"logits_{k}"] = logits.astype(np.float32)
    return out


def whisper_features(n_mels: int, count: int, seed: int) -> list[np.ndarray]:
    """The Whisper references' input features, ``[n_mels, 3000]`` float32 each: ``count`` draws of
    ``numpy.random.default_rng(seed + k).standard_normal`` (regenerated, never committed)."""
    return [
        np.random.default_rng(seed + k).standard_normal((n_mels, 3000), dtype=np.float32)
        for k in range(count)
    ]


def reference_sources(reference: dict[str, np.ndarray], n_mels: int = 80) -> list[np.ndarray]:
    """The encoder inputs of a seq2seq reference.npz: T5's ``encoder_{k}`` token ids, or Whisper's features
    regenerated from its ``features_seed``."""
    count = len([n for n in reference if n.startswith("prompt_")])
    if "features_seed" in reference:
        return whisper_features(n_mels, count, int(reference["features_seed"]))
    return [reference[f"encoder_{k}"] for k in range(count)]

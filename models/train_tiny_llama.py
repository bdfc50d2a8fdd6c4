"""Train the tiny byte-level Llama on CPython's own reference text, on one CPU thread, in minutes.

    python models/train_tiny_llama.py                # train (11 minutes), evaluate, save, export
    python models/train_tiny_llama.py --finish-only  # redo the exports and references from the checkpoint

Data: `pydoc_data.topics` (every CPython ships it), topics joined in sorted-key order as UTF-8 bytes; the
last tenth of the bytes is held out for evaluation. Model: Llama with hidden 128, 4 layers, 4 query heads
of 32, 2 kv heads, SwiGLU 384, tied embeddings, byte vocabulary of 259 (see byte_tokenizer.py): about
0.82 M parameters. The checkpoint is stored in float16 (1.6 MiB) and the held-out perplexity is measured
on those rounded weights, computing in float32, which is what the exported graphs compute with.
Writes models/tiny-llama/{checkpoint,native,reference.npz,metrics.json}.
Needs torch and transformers (the `reference` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import byte_tokenizer  # noqa: E402

OUT = HERE / "tiny-llama"
SEED = 1234
CONTEXT = 256
BATCH = 16
PEAK_LR = 3e-3
WARMUP = 30
BUDGET_S = 11 * 60.0  # wall time of the training loop (evaluation, saving and exports add about a minute)
MAX_STEPS = 2000


def model_config() -> dict:
    """The transformers `LlamaConfig` arguments of the tiny trained Llama."""
    return dict(
        vocab_size=byte_tokenizer.VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=byte_tokenizer.BOS_ID,
        eos_token_id=byte_tokenizer.EOS_ID,
        pad_token_id=byte_tokenizer.PAD_ID,
    )


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, held-out bytes) as uint8 arrays: the first nine tenths and the last tenth."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    cut = len(data) * 9 // 10
    return data[:cut], data[cut:]


def evaluate(model, data: np.ndarray) -> float:
    """Mean next-byte cross-entropy (nats) over `data` in non-overlapping windows of CONTEXT + 1 bytes."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data) - 1, CONTEXT):
            chunk = torch.from_numpy(data[start : start + CONTEXT + 1].astype(np.int64))[None]
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total += float(loss)
            count += chunk.shape[1] - 1
    return total / count


def train() -> dict:
    """Train, save the float16 checkpoint and tokenizer, return the metrics."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    train_data, heldout = corpus()
    model = LlamaForCausalLM(LlamaConfig(**model_config()))
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)

    def batch() -> torch.Tensor:
        starts = rng.integers(0, len(train_data) - CONTEXT - 1, size=BATCH)
        return torch.from_numpy(np.stack([train_data[s : s + CONTEXT + 1] for s in starts]).astype(np.int64))

    def train_step(lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # The schedule runs on wall time, not steps: warmup, then a cosine from PEAK_LR down to a tenth of it
    # over BUDGET_S, so the run ends in time however busy the (shared) cores are; `steps` is recorded.
    start = time.perf_counter()
    model.train()
    losses: list[float] = []
    step = 0
    while step < MAX_STEPS:
        progress = (time.perf_counter() - start) / BUDGET_S
        if progress >= 1:
            break
        warm = min(1.0, (step + 1) / WARMUP)
        losses.append(train_step(PEAK_LR * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))))
        if step % 50 == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step} loss {np.mean(losses[-50:]):.3f} ({elapsed:.0f} s)", flush=True)
        step += 1
    steps = step
    train_s = time.perf_counter() - start
    model.eval()
    model = model.half().float()  # the committed weights are float16: evaluate exactly those
    eval_nats = evaluate(model, heldout)
    ckpt = OUT / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(str(ckpt), safe_serialization=True)
    byte_tokenizer.save_tokenizer(ckpt)
    model.float()
    prompt = "The with statement"
    ids = torch.tensor([byte_tokenizer.encode(prompt)])
    sample = model.generate(ids, max_new_tokens=120, do_sample=False)[0, ids.shape[1] :].tolist()
    return {
        "parameters": params,
        "steps": steps,
        "batch": BATCH,
        "context": CONTEXT,
        "train_bytes": int(len(train_data)),
        "heldout_bytes": int(len(heldout)),
        "train_seconds": round(train_s, 1),
        "threads": 1,
        "final_train_loss": round(float(np.mean(losses[-50:])), 4),
        "heldout_nats_per_byte": round(eval_nats, 4),
        "heldout_bits_per_byte": round(eval_nats / math.log(2), 4),
        "heldout_perplexity": round(math.exp(eval_nats), 3),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "greedy_sample": {"prompt": prompt, "continuation": byte_tokenizer.decode(sample)},
    }


def finish() -> None:
    """The native exports and the transformers reference of the saved checkpoint (see build.py)."""
    import build

    prompts = [byte_tokenizer.encode(text) for text in ("The with statement", "def f(x):\n    return")]
    build.finish_checkpoint(
        OUT,
        exports=(("native", "float32", "pool"), ("native", "int8", "pool")),
        optimum=False,
        reference_prompts=prompts,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--finish-only", action="store_true", help="skip training, redo exports and references"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    metrics = None if args.finish_only else train()
    finish()
    if metrics is not None:
        metrics["total_seconds"] = round(time.perf_counter() - start, 1)  # training, evaluation, exports
        (OUT / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics, indent=2), flush=True)


if __name__ == "__main__":
    main()

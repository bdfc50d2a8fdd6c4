"""Hugging Face peers of benchmarks/test_engine_bench.py, run in the benchmark's own process (the
`reference` extra): transformers' ``generate`` on the checkpoint and Optimum's
``ORTModelForCausalLM.generate`` on the Optimum export, both greedy, with `threads` intra-op threads.

``generate(prompts, new) -> (outputs, seconds to the first token)``: one batch, left-padded with the
bench tokenizer's pad id when the prompts differ in length; the first token's time is when the first
logits processor call happens (after the prefill forward).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from workload import PAD, left_pad


class _FirstToken:
    """A logits processor that only notes the time of its first call."""

    def __init__(self) -> None:
        self.at = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.at:
            self.at = time.perf_counter()
        return scores


class HFPeer:
    name = "hf"

    def __init__(self, model: Any) -> None:
        self.model = model

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
        from transformers import LogitsProcessorList

        ids, mask = left_pad(prompts)
        first = _FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                num_beams=1,
                pad_token_id=PAD,
                eos_token_id=None,
                logits_processor=LogitsProcessorList([first]),
            )
        tokens = np.asarray(out[:, ids.shape[1] :])
        return tokens.tolist(), first.at - start


class TransformersPeer(HFPeer):
    name = "transformers"

    def __init__(self, checkpoint: Path, threads: int) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
        super().__init__(model.eval())


class OptimumPeer(HFPeer):
    name = "optimum"

    def __init__(self, folder: Path, threads: int) -> None:
        from optimum.onnxruntime import ORTModelForCausalLM

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = ORTModelForCausalLM.from_pretrained(
            str(folder),
            provider="CPUExecutionProvider",
            session_options=opts,
            use_cache=True,
            use_io_binding=False,
        )
        super().__init__(model)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "optimum", "optimum-onnx")}

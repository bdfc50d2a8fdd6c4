"""docs/pytorch.md's example (docs/examples/pytorch_llama.py) against transformers, and its zero-copy claims.

The torch tests are marked `reference` and skip, with the reason, where torch/transformers are absent; the
check that the guide shows the example file verbatim runs everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from kvarray.export.reference import torch_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "pytorch_llama.py"
GUIDE = ROOT / "docs" / "pytorch.md"
CHECKPOINT = ROOT / "models" / "tiny-llama-random" / "checkpoint"
PROMPTS = [[1, 2, 3, 4, 5], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]]  # lengths 5 and 11
DECODE_STEPS = 16
TOLERANCE = 1e-4

REASON = torch_unavailable_reason()
needs_torch = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_guide_shows_the_example_verbatim() -> None:
    """The guide's ```python blocks, in order, are the example file (blank lines aside)."""
    blocks = re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(), flags=re.S | re.M)
    assert _code_lines("".join(blocks)) == _code_lines(EXAMPLE.read_text())


@pytest.fixture(scope="module")
def example(import_path: Callable[[str, Path], ModuleType]) -> ModuleType:
    """docs/examples/pytorch_llama.py, imported from its path (docs/ is not a package)."""
    return import_path("kvarray_pytorch_example", EXAMPLE)


@pytest.fixture(scope="module")
def hf_model() -> Any:
    """transformers' LlamaForCausalLM on the committed checkpoint (float32, eval mode)."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def generation(example: ModuleType) -> Any:
    """The example's `Generation`: a prefill of both prompts in one flat batch, then 16 decode passes."""
    model = example.Llama.load(CHECKPOINT)
    return example.generate(model, model.new_cache(capacity=128, max_sequences=4), PROMPTS, DECODE_STEPS)


@pytest.mark.reference
@needs_torch
def test_logits_and_tokens_equal_transformers(generation: Any, hf_model: Any) -> None:
    import torch

    assert len(generation.logits) == 1 + DECODE_STEPS
    assert generation.logits[0].shape == (sum(map(len, PROMPTS)), hf_model.config.vocab_size)
    start = 0
    for s, prompt in enumerate(PROMPTS):
        n, new = len(prompt), generation.tokens[s]
        assert len(new) == DECODE_STEPS + 1
        # ours, by position: the prefill rows of this sequence, then its row of each decode pass
        decode = [logits[s : s + 1] for logits in generation.logits[1:]]
        ours = torch.cat([generation.logits[0][start : start + n], *decode])  # [n + 16, V]
        start += n
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt + new])).logits[0]  # [n + 17, V]: teacher-forced, no cache
        torch.testing.assert_close(ours, ref[: n + DECODE_STEPS], rtol=0, atol=TOLERANCE)
        assert ref[n - 1 : n + DECODE_STEPS].argmax(-1).tolist() == new
        greedy = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            do_sample=False,
            max_new_tokens=DECODE_STEPS + 1,
            pad_token_id=0,
        )
        assert greedy[0, n:].tolist() == new


@pytest.mark.reference
@needs_torch
def test_weights_from_a_transformers_model_give_the_same_logits(
    example: ModuleType, generation: Any, hf_model: Any
) -> None:
    import torch

    model = example.Llama(hf_model.config.to_dict(), hf_model.state_dict())
    again = example.generate(model, model.new_cache(capacity=128, max_sequences=4), PROMPTS, 2)
    assert again.tokens == [t[:3] for t in generation.tokens]
    for ours, first in zip(again.logits, generation.logits[:3], strict=True):
        torch.testing.assert_close(ours, first, rtol=0, atol=0)


@pytest.mark.reference
@needs_torch
def test_zero_copy_both_ways(example: ModuleType) -> None:
    import torch

    from kvarray.xp import from_dlpack

    model = example.Llama.load(CHECKPOINT)
    cache = model.new_cache(capacity=64, max_sequences=2)
    example.forward(model, cache, torch.tensor([7, 8, 9]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    view = cache.get(1, "pool")
    # read: the torch tensors are the pool's memory, sliced to n_kv rows
    keys, values = torch.from_dlpack(view.keys), torch.from_dlpack(view.values)
    assert keys.data_ptr() == view.keys.ctypes.data and values.data_ptr() == view.values.ctypes.data
    assert view.keys.base is not None and view.keys.base.shape == (cache.capacity, 2, 16)
    assert view.keys.base.ctypes.data == view.keys.ctypes.data  # rows [0, n_kv) of the layer's pool
    assert torch.from_dlpack(view.bias).data_ptr() == view.bias.ctypes.data
    before = cache.state_dict()["layer.1.keys"]  # state_dict copies the pools
    keys[0, 0, 0] += 1.0  # a write through the torch tensor lands in the pool
    assert cache.state_dict()["layer.1.keys"][0, 0, 0] == before[0, 0, 0] + 1.0
    # write: put reads contiguous torch tensors through DLPack without a copy (inference tensors too)
    with torch.inference_mode():
        k = torch.randn(3, 2, 16)
    assert from_dlpack(k, np).ctypes.data == k.data_ptr()
    # a strided tensor (a slice of a fused projection) is accepted as it is: put copies it once itself
    fused = torch.randn(3, 3 * 32)
    v = fused[:, 32:64].view(3, 2, 16)
    assert not v.is_contiguous()
    plan = cache.start_forward(torch.tensor([0, 1, 1]), torch.tensor([2, 1, 2]))
    cache.put(0, k, v)
    rows = plan.slot_mapping.astype(np.int64)
    view = cache.get(0, "pool")
    assert torch.equal(torch.from_dlpack(view.keys)[rows], k)
    assert torch.equal(torch.from_dlpack(view.values)[rows], v)


def test_put_refuses_bfloat16_with_a_named_error():
    torch = pytest.importorskip("torch", reason="torch is not installed (the 'reference' extra)")
    from kvarray import DTypeMismatch, KVSpec
    from kvarray.causal import CausalCache

    cache = CausalCache(KVSpec(1, 2, 4, dtype="float32"), capacity=8, max_sequences=1)
    cache.start_forward([0], [0])
    before = cache.state_dict()
    rows = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    with pytest.raises(DTypeMismatch, match="bfloat16"):
        cache.put(0, rows, rows)
    after = cache.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)

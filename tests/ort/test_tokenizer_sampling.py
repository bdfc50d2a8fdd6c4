"""The byte tokenizer and the samplers (seeded reproducibility, top-k 1 = greedy)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from ort_models import TINY, TRAINED

from kvarray.errors import TokenizerError
from kvarray.ort import ByteTokenizer, Engine, EngineConfig, SamplingParams, load_tokenizer
from kvarray.ort.sampling import sample


def test_byte_tokenizer_reads_the_committed_tokenizer_json():
    tok = load_tokenizer(TRAINED / "checkpoint")
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("Hé!") == [72, 0xC3, 0xA9, 33] and tok.special == {
        "<s>": 256,
        "</s>": 257,
        "<pad>": 258,
    }
    assert tok.decode([72, 0xC3, 0xA9, 33, 257]) == "Hé!"  # special tokens dropped
    assert tok.decode([0xC3, 72]) == "\ufffdH"  # invalid UTF-8 replaced
    stream = tok.decoder()
    assert [stream.feed(t) for t in [0xE2, 0x82, 0xAC, 120]] == ["", "", "€", "x"]


def test_other_tokenizers_need_the_tokenizers_package(tmp_path):
    data = json.loads((TRAINED / "checkpoint" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["ab"] = max(vocab.values()) + 1  # one merge: no longer the plain byte-level vocabulary
    data["model"]["merges"] = [["a", "b"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    if importlib.util.find_spec("tokenizers") is None:
        with pytest.raises(TokenizerError, match="not installed"):
            load_tokenizer(tmp_path)
    else:
        assert load_tokenizer(tmp_path).encode("ab") == [vocab["ab"]]
        data["model"]["merges"] = [["a", "z"]]  # a merge whose result is not in the vocabulary
        (tmp_path / "tokenizer.json").write_text(json.dumps(data))
        with pytest.raises(TokenizerError, match="cannot be read"):
            load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_top_k_and_top_p_restrict_the_candidates():
    logits = np.array([0.0, 3.0, 2.9, -1.0, 2.8], np.float32)
    rng = np.random.default_rng(0)
    top2 = {sample(logits, SamplingParams(temperature=5.0, top_k=2), rng) for _ in range(200)}
    assert top2 == {1, 2}
    nucleus = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert nucleus <= {1, 2} and len(nucleus) == 2
    anything = {sample(logits, SamplingParams(temperature=100.0), rng) for _ in range(400)}
    assert anything == {0, 1, 2, 3, 4}


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(prompts, expected):
    eng = Engine.from_model_dir(TINY, EngineConfig(threads=1))
    hot = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = eng.generate(prompts, hot)
    assert eng.generate(prompts, hot) == first
    assert (
        eng.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)) != first
    )
    assert first != expected
    assert (
        eng.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1, seed=3)) == expected
    )

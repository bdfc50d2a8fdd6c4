"""Optimum T5 and Whisper exports (encoder_model.onnx + decoder_model_merged.onnx) through the seq2seq
engine, against transformers' greedy references (models/tiny-{t5,whisper}-random/reference.npz): alone,
all at once, and 8 requests arriving at different steps with prefill chunks.

The merged decoder computes the cross K/V only on its first branch (``use_cache_branch`` false), which
the runner runs once per admitted request for the `EncoderCache`; every engine pass then runs the second
branch, one sub-batch per past length (the decoder has no self-attention mask).
"""

from __future__ import annotations

import pytest
from ort_models import T5, WHISPER

from kvarray.errors import UnsupportedModel
from kvarray.ort import SamplingParams
from kvarray.ort.optimum_seq2seq import OptimumSeq2SeqRunner
from kvarray.ort.seq2seq import Seq2SeqConfig, Seq2SeqEngine, Seq2SeqRunner
from kvarray.spec import KVSpec

GREEDY = SamplingParams(max_new_tokens=16, stop_tokens=())
MODELS = {"t5": T5, "whisper": WHISPER}


def optimum(arch: str, **config: object) -> Seq2SeqEngine:
    options = {"threads": 1, **config}
    return Seq2SeqEngine.from_model_dir(MODELS[arch], Seq2SeqConfig(**options), graph="optimum")  # type: ignore[arg-type]


def test_the_runner_is_picked_from_the_decoder_names(seq2seq_model):
    arch = seq2seq_model[0]
    engine = optimum(arch)
    assert isinstance(engine.runner, OptimumSeq2SeqRunner) and engine.architecture == arch
    assert engine.spec == KVSpec(2, 4, 8, "float32") and engine.vocab_size == 259
    assert engine.decoder_start_token_id == {"t5": 258, "whisper": 256}[arch]  # generation_config.json
    assert engine.context == {"t5": None, "whisper": 64}[arch]
    assert isinstance(Seq2SeqEngine.from_model_dir(MODELS[arch]).runner, Seq2SeqRunner)  # auto: native first


@pytest.mark.parametrize("chunk", [256, 1])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_each_request_alone_equals_reference(seq2seq_model, k, chunk):
    arch, sources, prompts, expected = seq2seq_model
    engine = optimum(arch, prefill_chunk=chunk)
    assert engine.generate([sources[k]], [prompts[k]], GREEDY) == [expected[k]]
    stats = engine.stats()
    assert stats.self_attention.cells_used == 0 and stats.cross.sequences == 0  # both caches freed


def test_all_requests_at_once_equal_reference(seq2seq_model):
    """One encoder pass (and one first-branch decoder pass) for all three; their prompts of 1-3 tokens
    make three past lengths, so the first passes run as several sub-batches."""
    arch, sources, prompts, expected = seq2seq_model
    engine = optimum(arch)
    assert engine.generate(sources, prompts, GREEDY) == expected
    m = engine.metrics
    assert (m.encoder_passes, m.encoded_sequences) == (1, 3)
    rows = [1500] * 3 if arch == "whisper" else [len(s) for s in sources]
    assert m.encoder_rows == sum(rows)


def test_eight_requests_arriving_at_different_steps_equal_reference(seq2seq_model):
    """Request k (source and prompt k % 3) arrives at step [0, 0, 1, 2, 3, 5, 8, 13][k]; prompts are fed
    one token a pass, encoder passes of at most 2 requests."""
    arch, sources, prompts, expected = seq2seq_model
    engine = optimum(arch, prefill_chunk=1, max_encoder_batch=2)
    ids: dict[int, int] = {}
    step = 0
    schedule = [0, 0, 1, 2, 3, 5, 8, 13]
    while len(ids) < 8 or engine.has_work:
        for k, at in enumerate(schedule):
            if at == step:
                ids[k] = engine.add_request(sources[k % 3], prompts[k % 3], GREEDY)
        engine.step()
        step += 1
    assert [engine.pop(ids[k]).output for k in range(8)] == [expected[k % 3] for k in range(8)]
    m = engine.metrics
    assert m.encoded_sequences == 8 and m.steps < 8 * 16  # requests shared passes
    assert engine.stats().cross.sequences == 0


def test_cancel_frees_the_encoder_entry(seq2seq_model):
    arch, sources, prompts, expected = seq2seq_model
    engine = optimum(arch)
    keep = engine.add_request(sources[0], prompts[0], GREEDY)
    drop = engine.add_request(sources[1], prompts[1], GREEDY)
    engine.step()
    assert engine.stats().cross.sequences == 2
    engine.cancel(drop)
    assert engine.stats().cross.sequences == 1
    for _ in engine.stream():
        pass
    assert engine.pop(keep).output == expected[0]


def test_a_decoder_only_graph_is_refused():
    llama = T5.parent / "tiny-llama-random" / "optimum" / "model.onnx"
    encoder = T5 / "optimum" / "encoder_model.onnx"
    with pytest.raises(UnsupportedModel, match="'optimum' names"):
        Seq2SeqEngine(encoder, llama)


def test_missing_exports_say_how_to_make_them(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(UnsupportedModel, match="optimum-cli export onnx"):
        Seq2SeqEngine.from_model_dir(tmp_path, graph="optimum")

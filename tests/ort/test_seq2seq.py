"""The seq2seq engine (T5, Whisper) against transformers' greedy references, continuous batching, the
zero-copy cross view, freeing both caches, and `kvarray transcribe`.

The references (models/tiny-{t5,whisper}-random/reference.npz) are transformers' `generate`: 16 greedy
tokens per sequence after the decoder prompt, no stop token (the tiny checkpoints have no eos).
"""

from __future__ import annotations

import wave

import numpy as np
import pytest
from ort_models import T5, WHISPER

from kvarray.cli import main
from kvarray.errors import (
    DTypeMismatch,
    EmptyPrompt,
    NonFiniteValues,
    PromptTooLong,
    ShapeMismatch,
    UnknownRequest,
    UnknownToken,
)
from kvarray.ort import SamplingParams, is_zero_copy
from kvarray.ort.scheduler import FinishReason
from kvarray.ort.seq2seq import Seq2SeqConfig, Seq2SeqEngine

GREEDY = SamplingParams(max_new_tokens=16, stop_tokens=())
MODELS = {"t5": T5, "whisper": WHISPER}


def engine_of(arch: str, **config: object) -> Seq2SeqEngine:
    return Seq2SeqEngine.from_model_dir(MODELS[arch], Seq2SeqConfig(**config))  # type: ignore[arg-type]


def run_arrivals(
    engine: Seq2SeqEngine, sources: list, prompts: list, arrivals: list[int], params: SamplingParams = GREEDY
) -> list[list[int]]:
    """Add request k just before step ``arrivals[k]``; step until all finish; their tokens in order."""
    ids: dict[int, int] = {}
    step = 0
    while len(ids) < len(sources) or engine.has_work:
        for k, at in enumerate(arrivals):
            if at == step:
                ids[k] = engine.add_request(sources[k], prompts[k], params)
        engine.step()
        step += 1
    return [engine.pop(ids[k]).output for k in range(len(sources))]


# -- greedy outputs against transformers ------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2])
def test_each_request_alone_equals_reference(seq2seq_model, k):
    arch, sources, prompts, expected = seq2seq_model
    engine = engine_of(arch)
    assert engine.generate([sources[k]], [prompts[k]], GREEDY) == [expected[k]]


def test_all_requests_at_once_equal_reference(seq2seq_model):
    arch, sources, prompts, expected = seq2seq_model
    engine = engine_of(arch)
    assert engine.generate(sources, prompts, GREEDY) == expected
    m = engine.metrics
    assert (m.encoder_passes, m.encoded_sequences, m.steps) == (1, 3, 16)  # one encoder pass for all three
    assert m.cross_zero_copy_steps == 16 and m.cross_staged_steps == 0


@pytest.mark.parametrize(
    "arrivals, chunk",
    [([0, 2, 5], 256), ([4, 0, 1], 1), ([0, 0, 3], 2)],
    ids=["in-order", "reversed-chunk1", "pair-then-one-chunk2"],
)
def test_requests_arriving_at_different_steps_equal_reference(seq2seq_model, arrivals, chunk):
    arch, sources, prompts, expected = seq2seq_model
    engine = engine_of(arch, prefill_chunk=chunk, max_encoder_batch=1)
    assert run_arrivals(engine, sources, prompts, arrivals) == expected
    assert engine.metrics.encoded_sequences == 3


def test_more_requests_than_sequences_wait_for_room(seq2seq_model):
    """max_sequences=2 and a cross capacity of two entries: the third request waits, is encoded when the
    first finishes, and every output still equals the reference."""
    arch, sources, prompts, expected = seq2seq_model
    rows = 1500 if arch == "whisper" else 30
    engine = engine_of(arch, max_sequences=2, encoder_capacity=2 * rows)
    assert engine.generate(sources, prompts, GREEDY) == expected
    assert engine.metrics.encoder_passes >= 2


# -- the cross view: zero-copy by pointer, staged when entries are not adjacent --------------------------
def test_cross_view_is_bound_zero_copy_from_the_encoder_pool(seq2seq_model):
    arch, sources, prompts, _ = seq2seq_model
    engine = engine_of(arch)
    ids = [engine.add_request(s, p, GREEDY) for s, p in zip(sources, prompts, strict=True)]
    engine.step()
    engine.step()  # a decode step: the three entries side by side, in admission order
    first = engine.cache.encoder.entry(ids[0])
    total = sum(engine.cache.encoder.entry(i).length for i in ids)
    for layer in range(engine.spec.num_layers):
        keys, values, _, _ = engine.cache.encoder.pools(layer, "float32")
        row_bytes = keys[0].nbytes
        for name, pool in ((f"cross_key.{layer}", keys), (f"cross_value.{layer}", values)):
            bound = engine.binder.bound(name)
            assert bound.pointer == pool.ctypes.data + first.start * row_bytes
            assert bound.shape == (total, 4, 8)
            assert is_zero_copy(bound.value, pool[first.start : first.start + total])
    past = engine.binder.bound("past_key.0")
    assert past.pointer == engine.cache.causal.get(0, "pool").keys.ctypes.data  # self pool view, no copy


def test_cross_view_is_staged_when_entries_are_not_adjacent(seq2seq_model):
    """The middle request finishes first: the others' entries are no longer side by side, so the cross
    view is copied into staging buffers; the outputs are unchanged."""
    arch, sources, prompts, expected = seq2seq_model
    engine = engine_of(arch)
    short = SamplingParams(max_new_tokens=3, stop_tokens=())
    ids = [engine.add_request(s, p, short if k == 1 else GREEDY) for k, (s, p) in
           enumerate(zip(sources, prompts, strict=True))]
    for _ in engine.stream():
        pass
    outputs = [engine.pop(i).output for i in ids]
    assert outputs == [expected[0], expected[1][:3], expected[2]]
    assert engine.metrics.cross_staged_steps > 0
    pool = engine.cache.encoder.pools(0, "float32")[0]
    bound = engine.binder.bound("cross_key.0")
    assert not pool.ctypes.data <= bound.pointer < pool.ctypes.data + pool.nbytes  # a staging buffer


# -- both caches freed at once ----------------------------------------------------------------------------
def test_finished_and_cancelled_requests_free_both_caches(seq2seq_model):
    arch, sources, prompts, _ = seq2seq_model
    engine = engine_of(arch)
    ids = [engine.add_request(s, p, GREEDY) for s, p in zip(sources, prompts, strict=True)]
    engine.step()
    stats = engine.stats()
    rows = [engine.cache.encoder.entry(i).length for i in ids]
    assert stats.cross.sequences == 3 and stats.cross.cells_used["float32"] == sum(rows)
    assert stats.self_attention.sequences == 3
    engine.cancel(ids[1])
    stats = engine.stats()
    assert stats.cross.sequences == 2 and stats.cross.cells_used["float32"] == rows[0] + rows[2]
    assert stats.self_attention.sequences == 2
    assert engine.request(ids[1]).finish_reason is FinishReason.CANCELLED
    with pytest.raises(UnknownRequest):
        engine.cancel(ids[1])
    for _ in engine.stream():
        pass
    stats = engine.stats()
    assert (stats.cross.sequences, stats.cross.cells_used["float32"]) == (0, 0)
    assert (stats.self_attention.sequences, stats.self_attention.cells_used) == (0, 0)
    assert engine.metrics.peak_cells > 0


def test_cancel_a_waiting_request_frees_nothing_it_never_held(seq2seq_model):
    arch, sources, prompts, expected = seq2seq_model
    engine = engine_of(arch)
    keep = engine.add_request(sources[0], prompts[0], GREEDY)
    drop = engine.add_request(sources[1], prompts[1], GREEDY)
    engine.cancel(drop)
    for _ in engine.stream():
        pass
    assert engine.pop(keep).output == expected[0]
    assert engine.metrics.encoded_sequences == 1


# -- errors -----------------------------------------------------------------------------------------------
def test_bad_requests_are_refused():
    t5 = engine_of("t5", encoder_capacity=64)
    with pytest.raises(EmptyPrompt):
        t5.add_request([])
    with pytest.raises(EmptyPrompt):
        t5.add_request([5], [])
    with pytest.raises(UnknownToken, match="259"):
        t5.add_request([5, 259])
    with pytest.raises(PromptTooLong, match="encoder cache"):
        t5.add_request(np.arange(65) % 200)
    whisper = engine_of("whisper")
    with pytest.raises(ShapeMismatch, match=r"\[80, 3000\]"):
        whisper.add_request(np.zeros((80, 2999), np.float32))
    with pytest.raises(PromptTooLong, match="model context"):
        whisper.add_request(np.zeros((80, 3000), np.float32), [256] * 65)
    with pytest.raises(DTypeMismatch, match="NumPy cannot read the list given"):
        whisper.add_request([[0.0] * 3000, [0.0] * 2999])  # ragged
    with pytest.raises(DTypeMismatch, match="NumPy cannot read the str given"):
        whisper.add_request("features")
    poisoned = np.zeros((80, 3000), np.float32)
    poisoned[3, 7] = np.nan
    with pytest.raises(NonFiniteValues, match="NaN or infinity"):
        whisper.add_request(poisoned)
    assert not t5.has_work and not whisper.has_work


def test_default_prompt_is_the_decoder_start_token(seq2seq_model):
    arch, sources, prompts, expected = seq2seq_model
    engine = engine_of(arch)
    assert prompts[0] == [engine.decoder_start_token_id]
    assert engine.generate([sources[0]], params=GREEDY) == [expected[0]]


# -- kvarray transcribe -----------------------------------------------------------------------------------
def write_tone(path, seconds: float = 1.0, rate: int = 16_000, hz: float = 440.0, channels: int = 1) -> None:
    """A 16-bit PCM WAV of a sine tone."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.repeat(pcm, channels).tobytes())


def test_transcribe_prints_ids_text_and_a_summary(tmp_path, capsys):
    audio = tmp_path / "tone.wav"
    write_tone(audio, seconds=1.0)
    assert main(["transcribe", str(WHISPER), str(audio), "--max-new-tokens", "6", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    ids = [int(t) for t in out[0].removeprefix("ids: ").split()]
    assert out[0].startswith("ids: ") and len(ids) == 6 and all(0 <= t < 259 for t in ids)
    assert out[1].startswith("text: ")  # the tiny model's tokenizer.json is byte-level
    summary = "\n".join(out[2:])
    parts = ("audio 1.00 s", "padded to 30 s", "1500 cross rows", "6 tokens", "tok/s", "zero-copy in 6 of 6")
    for part in parts:
        assert part in summary
    # the same ids as the engine on the same features
    from kvarray.ort.audio import log_mel, read_wav

    engine = engine_of("whisper")
    assert engine.generate([log_mel(read_wav(audio))], params=SamplingParams(max_new_tokens=6)) == [ids]


def test_transcribe_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav file")
    assert main(["transcribe", str(WHISPER), str(bad)]) == 1
    assert "AudioFormatError" in capsys.readouterr().err
    good = tmp_path / "tone.wav"
    write_tone(good, seconds=0.5)
    assert main(["transcribe", str(T5), str(good)]) == 1
    assert "not Whisper" in capsys.readouterr().err

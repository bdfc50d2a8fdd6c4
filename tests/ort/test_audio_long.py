"""Audio longer than 30 s: fixed 30 s windows (`split_windows`), one request each, joined in order.

The 70 s test signal is three different windows (white noise, a 440 Hz tone, then a 10 s chirp), so the
random tiny Whisper answers each differently. The reference is transformers' greedy `generate` on each
window (its own `WhisperFeatureExtractor` features), concatenated: measured equal for all 16 tokens of
every window, through the native and the Optimum graphs.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from ort_models import WHISPER

from kvarray.cli import main
from kvarray.errors import ConfigError, UnsupportedModel
from kvarray.ort import SamplingParams
from kvarray.ort.audio import CHUNK_SAMPLES, SAMPLE_RATE, join_windows, log_mel, read_wav, split_windows
from kvarray.ort.seq2seq import Seq2SeqConfig, Seq2SeqEngine

NEW = 16
GREEDY = SamplingParams(max_new_tokens=NEW, stop_tokens=())


def seventy_seconds(seed: int = 7) -> np.ndarray:
    """``[70 * 16000]`` float32: 30 s of white noise, 30 s of a 440 Hz tone, 10 s of a 100-3100 Hz chirp."""
    rng = np.random.default_rng(seed)
    t = np.arange(30 * SAMPLE_RATE) / SAMPLE_RATE
    short = t[: 10 * SAMPLE_RATE]
    noise = 0.5 * rng.standard_normal(t.size)
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    chirp = 0.3 * np.sin(2 * np.pi * (100.0 + 150.0 * short) * short)
    return np.concatenate([noise, tone, chirp]).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray) -> None:
    """16-bit PCM mono at 16 kHz."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def audio_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long-audio") / "seventy.wav"
    write_wav(path, seventy_seconds())
    return path


# -- the windows ------------------------------------------------------------------------------------------
def test_split_windows_cuts_fixed_30_s_windows():
    samples = np.arange(70 * SAMPLE_RATE, dtype=np.float32)
    windows = split_windows(samples)
    assert [len(w) for w in windows] == [480_000, 480_000, 160_000]  # 30 s, 30 s, 10 s
    assert all(np.shares_memory(w, samples) for w in windows)  # views
    np.testing.assert_array_equal(np.concatenate(windows), samples)
    assert [len(w) for w in split_windows(np.zeros(CHUNK_SAMPLES))] == [CHUNK_SAMPLES]
    assert [len(w) for w in split_windows(np.zeros(CHUNK_SAMPLES + 1))] == [CHUNK_SAMPLES, 1]
    assert [len(w) for w in split_windows(np.zeros(0))] == [0]
    assert [len(w) for w in split_windows(np.zeros(10), window=4)] == [4, 4, 2]
    with pytest.raises(ConfigError):
        split_windows(np.zeros(10), window=0)


def test_join_windows_drops_each_windows_stop_token():
    eos = 9
    assert join_windows([[1, 2, eos], [3, eos], [4, 5]], {eos}) == [1, 2, 3, 4, 5]
    assert join_windows([[1, eos, 2], [], [eos]], {eos}) == [1, eos, 2]  # only a window's last token
    assert join_windows([[1, 2], [3]]) == [1, 2, 3]


# -- through the engine -----------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", ["native", "optimum"])
def test_transcribe_equals_each_window_alone(graph):
    """One request per window, all at once: each window's tokens are those of that window alone."""
    engine = Seq2SeqEngine.from_model_dir(WHISPER, Seq2SeqConfig(threads=1), graph=graph)
    samples = seventy_seconds()
    windows = engine.transcribe(samples, params=GREEDY)
    alone = [engine.generate([log_mel(w)], params=GREEDY)[0] for w in split_windows(samples)]
    assert windows == alone and len(windows) == 3
    assert len({tuple(w) for w in windows}) == 3  # the three windows differ
    assert engine.metrics.encoded_sequences == 6


def transformers_windows(samples: np.ndarray) -> tuple[list[list[int]] | None, str | None]:
    """transformers' greedy tokens of each 30 s window (its own feature extractor), or the reason why not."""
    try:
        import torch
        from transformers import GenerationMixin, WhisperFeatureExtractor, WhisperForConditionalGeneration
    except ImportError as exc:  # the `reference` extra is not installed
        return None, f"transformers / torch not importable ({exc}): pip install kvarray[reference]"
    checkpoint = str(WHISPER / "checkpoint")
    extractor = WhisperFeatureExtractor.from_pretrained(checkpoint)
    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    start = torch.tensor([[model.config.decoder_start_token_id]])
    outputs = []
    with torch.no_grad():
        for window in split_windows(samples):
            features = extractor(window, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            # Whisper's own generate adds its task/language/timestamp logic: the plain greedy search
            full = GenerationMixin.generate(
                model, input_features=features, decoder_input_ids=start, max_new_tokens=NEW, do_sample=False
            )
            outputs.append(full[0, 1:].tolist())
    return outputs, None


@pytest.mark.reference
@pytest.mark.parametrize("graph", ["native", "optimum"])
def test_seventy_seconds_equal_transformers_per_window(audio_file, graph):
    samples = read_wav(audio_file)
    expected, reason = transformers_windows(samples)
    if expected is None:
        print(reason)
        pytest.skip(reason)
    engine = Seq2SeqEngine.from_model_dir(WHISPER, Seq2SeqConfig(threads=1), graph=graph)
    windows = engine.transcribe(samples, params=GREEDY)
    assert windows == expected
    assert join_windows(windows, engine.eos) == [t for w in expected for t in w]


def test_transcribe_command_on_seventy_seconds(audio_file, capsys):
    assert (
        main(["transcribe", str(WHISPER), str(audio_file), "--max-new-tokens", str(NEW), "--threads", "1"])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    joined = [int(t) for t in out[0].removeprefix("ids: ").split()]
    engine = Seq2SeqEngine.from_model_dir(WHISPER, Seq2SeqConfig(threads=1))
    windows = engine.transcribe(read_wav(audio_file), params=SamplingParams(max_new_tokens=NEW))
    assert joined == join_windows(windows, engine.eos) and len(joined) == 3 * NEW
    assert out[2] == "window 1 (0.0-30.0 s): ids " + " ".join(map(str, windows[0]))
    assert out[4] == "window 3 (60.0-70.0 s): ids " + " ".join(map(str, windows[2]))
    summary = "\n".join(out[5:])
    assert "audio 70.00 s (3 windows of 30 s, the last padded)" in summary and "4500 cross rows" in summary


def test_transcribe_needs_whisper():
    engine = Seq2SeqEngine.from_model_dir(WHISPER.parent / "tiny-t5-random", Seq2SeqConfig(threads=1))
    with pytest.raises(UnsupportedModel, match="needs a Whisper model"):
        engine.transcribe(np.zeros(SAMPLE_RATE, np.float32))

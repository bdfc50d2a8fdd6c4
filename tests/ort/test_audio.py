"""Log-mel features and the WAV reader (kvarray.ort.audio): structure, a pure tone's mel bin, resampling,
and transformers' `WhisperFeatureExtractor` where it is importable (the `reference` marker)."""

from __future__ import annotations

import wave

import numpy as np
import pytest
from ort_models import WHISPER

from kvarray.errors import AudioFormatError
from kvarray.ort.audio import (
    CHUNK_SAMPLES,
    N_FFT,
    N_FRAMES,
    SAMPLE_RATE,
    hz_to_mel,
    log_mel,
    mel_filters,
    mel_to_hz,
    pad_or_trim,
    read_wav,
    resample,
)


def tone(hz: float, seconds: float = 2.0, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def write_wav(path, pcm: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())


# -- the mel scale and filters ----------------------------------------------------------------------------
def test_slaney_mel_scale_is_linear_below_1khz_and_logarithmic_above():
    np.testing.assert_allclose(hz_to_mel([0.0, 200.0, 1000.0]), [0.0, 3.0, 15.0])
    np.testing.assert_allclose(hz_to_mel(6400.0), 15.0 + 27.0)  # 27 mels per factor 6.4 above 1 kHz
    hz = np.array([0.0, 123.0, 999.0, 1000.0, 4321.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, rtol=1e-12, atol=1e-9)


def test_mel_filters_are_slaney_normalised_triangles():
    filters = mel_filters(80)
    assert filters.shape == (N_FFT // 2 + 1, 80) and (filters >= 0).all()
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(8000.0), 82))
    bins = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    for m in (0, 40, 79):
        nonzero = bins[filters[:, m] > 0]
        assert edges[m] < nonzero.min() and nonzero.max() < edges[m + 2]  # inside its triangle
        peak = 2.0 / (edges[m + 2] - edges[m])  # Slaney: the area-normalised height
        assert filters[:, m].max() <= peak + 1e-12


# -- log-mel features ------------------------------------------------------------------------------------
def test_features_are_80_by_3000_in_whisper_range():
    features = log_mel(tone(440.0))
    assert features.shape == (80, N_FRAMES) and features.dtype == np.float32
    assert features.flags.c_contiguous
    assert features.max() - features.min() <= 2.0 + 1e-6  # 8 log10 units clamp, divided by 4
    assert log_mel(tone(440.0), n_mels=128).shape == (128, N_FRAMES)


def test_a_pure_tone_peaks_in_its_mel_bin():
    filters = mel_filters(80)
    for hz in (300.0, 1000.0, 3000.0):
        features = log_mel(tone(hz, seconds=3.0))
        band = int(np.argmax(features[:, 50:250].mean(axis=1)))  # frames well inside the tone
        expected = int(np.argmax(filters[int(round(hz / (SAMPLE_RATE / N_FFT)))]))
        assert abs(band - expected) <= 1, (hz, band, expected)
        assert features[:, 400:].max() < features[band, 50:250].min()  # silence after 3 s is quieter


def test_padding_and_trimming_to_30_seconds():
    x = tone(440.0, seconds=1.0)
    assert pad_or_trim(x).shape == (CHUNK_SAMPLES,) and not pad_or_trim(x)[x.size :].any()
    long = np.concatenate([tone(440.0, seconds=30.0), tone(2000.0, seconds=5.0)])
    np.testing.assert_array_equal(log_mel(long), log_mel(long[:CHUNK_SAMPLES]))


#: transformers' WhisperFeatureExtractor (4.57) on `chirp()`: mel rows 0, 8, ..., 72 at frames 20, 100, 180
EXPECTED_CHIRP = np.array([
    [0.192183, 0.195503, 0.195533],
    [0.293271, 0.293219, 0.293216],
    [1.087086, 0.865578, 0.865578],
    [0.248540, 0.196644, 0.196674],
    [0.220533, 0.220619, 0.220607],
    [0.224053, 0.224043, 0.224046],
    [0.418178, 0.418201, 0.418179],
    [0.291255, 1.136731, 0.291256],
    [0.251034, 0.251040, 0.251034],
    [0.287306, 0.287306, 0.288999],
], np.float32)


def chirp() -> np.ndarray:
    """2 s: a sweep from 100 Hz to 6.1 kHz plus a 220 Hz square wave (energy in many mel bins)."""
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    sweep = 0.3 * np.sin(2 * np.pi * (100 * t + 1500 * t**2))
    return (sweep + 0.1 * np.sign(np.sin(2 * np.pi * 220 * t))).astype(np.float32)


def test_features_equal_committed_transformers_values():
    np.testing.assert_allclose(log_mel(chirp())[::8][:, [20, 100, 180]], EXPECTED_CHIRP, rtol=0, atol=2e-5)


# -- WAV reading and resampling --------------------------------------------------------------------------
def test_read_wav_mono_and_stereo(tmp_path):
    pcm = (tone(440.0, seconds=0.25) * 32767).astype("<i2")
    write_wav(tmp_path / "mono.wav", pcm, SAMPLE_RATE)
    mono = read_wav(tmp_path / "mono.wav")
    np.testing.assert_array_equal(mono, pcm.astype(np.float32) / 32768)
    stereo = np.stack([pcm, np.zeros_like(pcm)], axis=1)  # right channel silent: the mean halves
    write_wav(tmp_path / "stereo.wav", stereo, SAMPLE_RATE, channels=2)
    np.testing.assert_allclose(read_wav(tmp_path / "stereo.wav"), mono / 2, atol=1e-7)


def test_read_wav_resamples_linearly(tmp_path):
    pcm = (tone(440.0, seconds=0.5, rate=8000) * 32767).astype("<i2")
    write_wav(tmp_path / "8k.wav", pcm, 8000)
    samples = read_wav(tmp_path / "8k.wav")
    assert samples.shape == (8000,)  # 0.5 s at 16 kHz
    np.testing.assert_allclose(samples[::2], pcm.astype(np.float32) / 32768, atol=1e-7)  # the originals
    np.testing.assert_allclose(samples[1:-1:2], (samples[:-2:2] + samples[2::2]) / 2, atol=1e-6)  # midpoints
    np.testing.assert_array_equal(resample(samples, SAMPLE_RATE), samples)  # same rate: unchanged


def test_read_wav_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(AudioFormatError, match="not a PCM WAV"):
        read_wav(tmp_path / "text.wav")
    write_wav(tmp_path / "8bit.wav", np.zeros(100, np.uint8), SAMPLE_RATE, width=1)
    with pytest.raises(AudioFormatError, match="8-bit"):
        read_wav(tmp_path / "8bit.wav")
    write_wav(tmp_path / "quad.wav", np.zeros(400, "<i2"), SAMPLE_RATE, channels=4)
    with pytest.raises(AudioFormatError, match="4 channels"):
        read_wav(tmp_path / "quad.wav")


# -- against transformers --------------------------------------------------------------------------------
def _extractor_or_reason():
    try:
        from transformers import WhisperFeatureExtractor
    except ImportError as exc:  # the `reference` extra is not installed
        return None, f"transformers is not importable ({exc}): pip install kvarray[reference]"
    return WhisperFeatureExtractor.from_pretrained(str(WHISPER / "checkpoint")), None


@pytest.mark.reference
def test_features_equal_transformers_whisper_feature_extractor():
    extractor, reason = _extractor_or_reason()
    if extractor is None:
        print(reason)
        pytest.skip(reason)
    np.testing.assert_allclose(mel_filters(80), extractor.mel_filters, rtol=0, atol=1e-12)
    rng = np.random.default_rng(0)
    signals = [
        0.1 * rng.standard_normal(3 * SAMPLE_RATE).astype(np.float32),  # noise, padded
        tone(440.0),  # a tone: most bins near the clamp
        chirp(),
        0.01 * rng.standard_normal(31 * SAMPLE_RATE).astype(np.float32),  # longer than 30 s: trimmed
    ]
    for x in signals:
        theirs = extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        np.testing.assert_allclose(log_mel(x), theirs, rtol=0, atol=1e-4)

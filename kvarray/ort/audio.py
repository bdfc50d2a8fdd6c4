"""Audio input for Whisper in NumPy: a WAV reader, and log-mel features as Whisper's feature extractor makes.

    from kvarray.ort.audio import read_wav, log_mel
    samples = read_wav("speech.wav")          # [n] float32 in [-1, 1), 16 kHz mono
    features = log_mel(samples, n_mels=80)    # [80, 3000] float32: Whisper's input_features for 30 s
    windows = split_windows(samples)          # audio of any length: consecutive 30 s windows

`log_mel` follows transformers' `WhisperFeatureExtractor` (its NumPy path): the samples are zero-padded or
trimmed to 30 s (480,000 samples at 16 kHz), framed with a periodic Hann window of ``n_fft = 400`` samples
at a hop of 160 (centred: reflect-padded by 200 on each side, so 3001 frames, the last dropped), the power
spectrum ``|rfft|^2`` (201 bins) is projected on ``n_mels`` triangular filters between 0 and 8 kHz (Slaney
mel scale, Slaney area normalisation), floored at 1e-10, ``log10``, clamped from below at its maximum minus
8, then mapped by ``(x + 4) / 4``.

Audio longer than 30 s (Whisper's encoder takes exactly 30 s) is cut by `split_windows` into consecutive
fixed windows of 30 s, no overlap: sample k goes to window ``k // 480000``, the last window holds the
rest (``log_mel`` zero-pads it). Each window is transcribed alone (one request each:
`Seq2SeqEngine.transcribe`) and the transcript is their tokens in window order (`join_windows`, each
window's stop token dropped). A word cut by a window edge is heard by neither window whole; there is no
overlap or timestamp-driven re-alignment (what Whisper's own long-form decoding does).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from ..errors import AudioFormatError, ConfigError

__all__ = [
    "CHUNK_SAMPLES",
    "HOP_LENGTH",
    "N_FFT",
    "N_FRAMES",
    "SAMPLE_RATE",
    "hz_to_mel",
    "join_windows",
    "log_mel",
    "mel_filters",
    "mel_to_hz",
    "pad_or_trim",
    "read_wav",
    "resample",
    "split_windows",
]

SAMPLE_RATE = 16_000  # Hz, what Whisper takes
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # 480,000 samples: one 30 s chunk
N_FRAMES = CHUNK_SAMPLES // HOP_LENGTH  # 3000 frames
MEL_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the maximum (80 dB)

# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = 15.0
_LOG_STEP = 27.0 / np.log(6.4)


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Frequencies in Hz ``[...]`` to the Slaney mel scale ``[...]`` float64."""
    hz = np.asarray(hz, np.float64)
    mel = 3.0 * hz / 200.0
    log_region = hz >= _MIN_LOG_HZ
    return np.where(log_region, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-30) / _MIN_LOG_HZ) * _LOG_STEP, mel)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """The inverse of `hz_to_mel`: Slaney mels ``[...]`` to Hz ``[...]`` float64."""
    mel = np.asarray(mel, np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp((mel - _MIN_LOG_MEL) / _LOG_STEP), hz)


def mel_filters(
    n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_max: float = 8000.0
) -> np.ndarray:
    """Triangular mel filters ``[n_fft // 2 + 1, n_mels]`` float64 (frequency bins x filters).

    Filter m rises from centre m - 1 to centre m and falls to centre m + 1, the ``n_mels + 2`` centres
    equally spaced on the Slaney mel scale over ``[0, f_max]``; each is scaled by ``2 / (f[m + 2] - f[m])``
    (Slaney normalisation: equal area).
    """
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)
    slopes = edges[None, :] - bins[:, None]  # [bins, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]


def pad_or_trim(samples: np.ndarray, length: int = CHUNK_SAMPLES) -> np.ndarray:
    """``[n]`` samples zero-padded at the end or cut to ``[length]``."""
    samples = np.asarray(samples).reshape(-1)
    if samples.size >= length:
        return samples[:length]
    return np.pad(samples, (0, length - samples.size))


def split_windows(samples: np.ndarray, window: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """``[n]`` samples as consecutive windows ``samples[k * window : (k + 1) * window]`` (views, no
    overlap), ``ceil(n / window)`` of them; the last holds the remainder; an empty input gives one empty
    window. At 16 kHz with the default 30 s window, 70 s of audio (1,120,000 samples) gives windows of
    30 s, 30 s and 10 s (480,000 + 480,000 + 160,000)."""
    samples = np.asarray(samples).reshape(-1)
    if window < 1:
        raise ConfigError(f"window must be >= 1 sample, got {window}")
    count = max(1, -(-samples.size // window))
    return [samples[k * window : (k + 1) * window] for k in range(count)]


def join_windows(outputs: list[list[int]], stop_tokens: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """One transcript from the tokens of consecutive windows: ``outputs[0] + outputs[1] + ...``, each
    window's last token dropped when it is a stop token (the end of a window is not the end of the text)."""
    joined: list[int] = []
    for tokens in outputs:
        end = len(tokens) - 1 if tokens and tokens[-1] in stop_tokens else len(tokens)
        joined += tokens[:end]
    return joined


def log_mel(samples: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Whisper's log-mel ``input_features [n_mels, 3000]`` float32 of 16 kHz mono ``samples [n]``.

    Args:
        samples: ``[n]`` float samples in [-1, 1] at 16 kHz (`read_wav`); padded / trimmed to 30 s.
        n_mels: mel filters (80; 128 for large-v3), the model's ``num_mel_bins``.
    """
    audio = pad_or_trim(np.asarray(samples, np.float32)).astype(np.float64)
    half = N_FFT // 2
    padded = np.pad(audio, (half, half), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]  # [3001, 400], no copy
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    spectrum = np.fft.rfft(frames * window, axis=1).astype(np.complex64)  # as transformers stores it
    power = np.abs(spectrum).astype(np.float64) ** 2  # [3001, 201]
    mel = np.maximum(MEL_FLOOR, mel_filters(n_mels).T @ power.T)  # [n_mels, 3001]
    logs = np.log10(mel).astype(np.float32)[:, :-1]
    logs = np.maximum(logs, logs.max() - DYNAMIC_RANGE)
    return np.ascontiguousarray((logs + 4.0) / 4.0, dtype=np.float32)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``[n]`` samples at `rate` Hz to `target` Hz by linear interpolation (no anti-alias filter: fine for
    speech recorded at 22.05-48 kHz, a rough approximation for content above ``target / 2``)."""
    samples = np.asarray(samples, np.float32).reshape(-1)
    if rate == target or samples.size == 0:
        return samples
    count = int(round(samples.size * target / rate))
    times = np.arange(count, dtype=np.float64) * (rate / target)
    return np.interp(times, np.arange(samples.size, dtype=np.float64), samples).astype(np.float32)


def read_wav(path: str | Path, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The samples of a 16-bit PCM WAV file (mono, or stereo averaged to mono) as ``[n]`` float32 in
    [-1, 1), resampled to `target_rate` Hz by linear interpolation when the file has another rate.

    Raises `AudioFormatError` (not a WAV file, another sample width, more than two channels).
    """
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioFormatError(f"{path}: not a PCM WAV file ({exc})") from None
    if width != 2:
        raise AudioFormatError(f"{path}: {8 * width}-bit samples; kvarray reads 16-bit PCM WAV (convert it)")
    if channels not in (1, 2):
        raise AudioFormatError(f"{path}: {channels} channels; kvarray reads mono or stereo WAV")
    pcm = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).astype(np.float32) / 32768.0
    return resample(pcm.mean(axis=1), rate, target_rate)

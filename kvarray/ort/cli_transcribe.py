"""`kvarray transcribe WHISPER_DIR audio.wav ...`: the command's arguments and its run (imported lazily by
kvarray.cli).

Audio longer than 30 s is cut into consecutive 30 s windows (`kvarray.ort.audio.split_windows`: no
overlap, the last one zero-padded), transcribed as one request each, all at once (continuous batching, at
most `--max-batch` running), and joined in window order (`join_windows`: a window's stop token dropped).

Output: the generated token ids on one line (``ids: 50258 50259 ...``, all windows joined), then
``text: ...`` when the model folder's ``checkpoint/tokenizer.json`` has a byte-level vocabulary (the tiny
test models have no real Whisper vocabulary, so their ids are the useful output), then, for more than one
window, one line per window (``window 2 (30.0-60.0 s): ids ...``), then a summary: audio length, windows,
encoder and decoder times, tokens/s and both caches' memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kvarray transcribe`."""
    parser.add_argument("model_dir", help="Whisper model folder with checkpoint/ and native/ graphs")
    parser.add_argument("audio", help="a 16-bit PCM WAV file (mono or stereo; resampled to 16 kHz)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per 30 s window at most")
    parser.add_argument(
        "--prompt",
        type=int,
        nargs="*",
        default=None,
        help="decoder prompt token ids (default: the decoder start token)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=8, help="30 s windows transcribed at once at most (longer audio)"
    )


def _byte_tokenizer(model_dir: Path) -> Any:
    """The folder's byte-level tokenizer, or None (no tokenizer.json, or another kind of vocabulary)."""
    from .tokenizer import ByteTokenizer, read_tokenizer_json

    path = model_dir / "checkpoint" / "tokenizer.json"
    if not path.is_file():
        return None
    return ByteTokenizer.from_json(read_tokenizer_json(path))


def run_transcribe(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `kvarray transcribe`; returns the exit status (1 on a kvarray error, printed to `err`)."""
    from ..errors import ConfigError, KVArrayError
    from .audio import CHUNK_SAMPLES, SAMPLE_RATE, join_windows, log_mel, read_wav, split_windows
    from .sampling import SamplingParams
    from .seq2seq import Seq2SeqConfig, Seq2SeqEngine

    out = out or sys.stdout
    err = err or sys.stderr
    model_dir = Path(args.model_dir)
    try:
        if args.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
        start = time.perf_counter()
        samples = read_wav(args.audio)
        windows = split_windows(samples)
        config = Seq2SeqConfig(max_sequences=min(len(windows), args.max_batch), threads=args.threads)
        engine = Seq2SeqEngine.from_model_dir(model_dir, config)
        if engine.architecture != "whisper":
            print(f"kvarray transcribe: {model_dir} is a {engine.architecture} model, not Whisper", file=err)
            return 1
        features = [log_mel(window, engine.n_mels or 80) for window in windows]
        feature_seconds = time.perf_counter() - start
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        ids = [engine.add_request(f, args.prompt, params) for f in features]
        gen_start = time.perf_counter()
        for _ in engine.stream():
            pass
        elapsed = time.perf_counter() - gen_start
        reqs = [engine.pop(i) for i in ids]
    except KVArrayError as exc:
        print(f"kvarray transcribe: {type(exc).__name__}: {exc}", file=err)
        return 1
    joined = join_windows([r.output for r in reqs], engine.eos)
    print("ids: " + " ".join(str(t) for t in joined), file=out)
    tokenizer = _byte_tokenizer(model_dir)
    if tokenizer is not None:
        print("text: " + tokenizer.decode(joined), file=out)
    if len(reqs) > 1:
        for k, req in enumerate(reqs):
            begin, end = k * CHUNK_SAMPLES / SAMPLE_RATE, (k * CHUNK_SAMPLES + len(windows[k])) / SAMPLE_RATE
            words = " ".join(str(t) for t in req.output)
            print(f"window {k + 1} ({begin:.1f}-{end:.1f} s): ids {words}", file=out)
    m, stats = engine.metrics, engine.stats()
    seconds = len(samples) / SAMPLE_RATE
    decode_time = max(elapsed - m.encoder_seconds, 1e-9)
    if len(windows) == 1:
        layout = "padded to 30 s"
    else:
        layout = f"{len(windows)} windows of 30 s, the last padded"
    finish = sorted({r.finish_reason.value for r in reqs if r.finish_reason})
    print(
        f"audio {seconds:.2f} s ({layout}), features "
        f"{feature_seconds:.2f} s, encoder {m.encoder_seconds:.2f} s ({m.encoder_rows} cross rows), "
        f"{m.generated_tokens} tokens in {decode_time:.2f} s ({m.generated_tokens / decode_time:.1f} tok/s), "
        f"finish: {', '.join(finish) or '?'}\n"
        f"cache: decoder {stats.self_attention.bytes_per_token} B/token, peak cells {m.peak_cells}; "
        f"cross {stats.cross.bytes_per_token[engine.modality]} B/row, cross view zero-copy in "
        f"{m.cross_zero_copy_steps} of {m.steps} steps",
        file=out,
    )
    engine.close()
    return 0

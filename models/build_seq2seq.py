"""Build the tiny encoder-decoder models of models/ (T5, Whisper), offline and seeded.

    python models/build_seq2seq.py                    # tiny-t5-random and tiny-whisper-random
    python models/build_seq2seq.py tiny-t5-random     # one of them

For each model folder:
    checkpoint/      transformers `save_pretrained(safe_serialization=True)` in float16 (the tests read those
                     exact values, widened) + the byte tokenizer (+ Whisper's preprocessor_config.json)
    native/          kvarray.export graphs: encoder.onnx, decoder_step.pool.float32.onnx (other kv dtypes
                     and views are exported by the tests into a temporary folder)
    optimum/         `optimum-cli export onnx --task text2text-generation-with-past` (T5) /
                     `automatic-speech-recognition-with-past` (Whisper) of the checkpoint
    reference.npz    transformers' greedy continuations and logits (reference.seq2seq_reference)

Whisper's input features are not stored: sequence k's are
``numpy.random.default_rng(features_seed + k).standard_normal((n_mels, 3000), dtype=float32)``,
with ``features_seed`` in reference.npz. Needs the `reference` extra; HF_HUB_OFFLINE=1 is set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402  (sets HF_HUB_OFFLINE=1)
import byte_tokenizer  # noqa: E402
from build import NEW_TOKENS, SEED  # noqa: E402

FEATURES_SEED = 50

#: T5 v1.1 / flan style: gated-gelu, untied head, d_kv (8) != d_model / heads (6): attention is 4 * 8 = 32
#: wide (int8 groups of 32 tile it) over a 24-wide model. The decoder starts from <pad>.
TINY_T5 = dict(
    vocab_size=byte_tokenizer.VOCAB_SIZE,
    d_model=24,
    d_kv=8,
    d_ff=32,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,  # small, so the tests' distances reach the log buckets and beyond
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=byte_tokenizer.PAD_ID,
    pad_token_id=byte_tokenizer.PAD_ID,
    eos_token_id=None,  # no end-of-text: greedy references always run their 16 steps
    bos_token_id=None,
)
TINY_WHISPER = dict(
    vocab_size=byte_tokenizer.VOCAB_SIZE,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_mel_bins=80,
    max_source_positions=1500,
    max_target_positions=64,
    decoder_start_token_id=byte_tokenizer.BOS_ID,
    bos_token_id=byte_tokenizer.BOS_ID,
    pad_token_id=byte_tokenizer.PAD_ID,
    eos_token_id=None,
    suppress_tokens=None,
    begin_suppress_tokens=None,
)
#: encoder token counts of the T5 references (the 30-token one passes max_distance 20)
T5_SOURCE_LENGTHS = (7, 30, 3)


def decoder_prompts(start: int) -> list[list[int]]:
    """Forced decoder starts: the start token alone, and with two or one byte tokens after it."""
    return [[start], [start, 65, 66], [start, 9]]


def optimum_export(folder: Path, task: str) -> Path:
    """`build.optimum_export` of folder/checkpoint with `task`, keeping only the files listed below."""
    out = build.optimum_export(folder, task)
    # keep models/ small: the encoder and the merged decoder (with and without past, what Optimum's
    # ORTModelForSeq2SeqLM / ORTModelForSpeechSeq2Seq load by default); the tokenizer is in checkpoint/
    keep = ("encoder_model.onnx", "decoder_model_merged.onnx", "config.json", "generation_config.json")
    for extra in out.iterdir():
        if extra.name not in keep:
            extra.unlink()
    return out


def _finish(folder: Path, arch: str, task: str, sources: list, start: int) -> None:
    from kvarray.export import export
    from kvarray.export.reference import seq2seq_reference

    byte_tokenizer.save_tokenizer(folder / "checkpoint")
    export(arch, folder / "checkpoint", folder / "native", kv_dtype="float32", view="pool")
    optimum_export(folder, task)
    ref = seq2seq_reference(folder / "checkpoint", sources, decoder_prompts(start), NEW_TOKENS)
    if arch == "whisper":
        ref["features_seed"] = np.asarray(FEATURES_SEED, np.int64)
    build.save_reference(folder, ref)
    for k in range(len(sources)):
        print(f"  sequence {k}: generated {ref[f'generated_{k}'].tolist()}")


def build_t5(timing: bool = False) -> None:
    """tiny-t5-random: checkpoint, native + Optimum exports, reference.npz."""
    from kvarray.export.reference import random_seq2seq

    folder = HERE / "tiny-t5-random"
    shutil.rmtree(folder, ignore_errors=True)
    random_seq2seq("t5", folder / "checkpoint", SEED, half=True, **TINY_T5)
    rng = np.random.default_rng(SEED)
    sources = [rng.integers(32, 127, size=n) for n in T5_SOURCE_LENGTHS]
    _finish(folder, "t5", "text2text-generation-with-past", sources, byte_tokenizer.PAD_ID)


def build_whisper(timing: bool = False) -> None:
    """tiny-whisper-random: checkpoint (+ feature extractor config), exports, reference.npz."""
    from transformers import WhisperFeatureExtractor

    from kvarray.export.reference import random_seq2seq

    folder = HERE / "tiny-whisper-random"
    shutil.rmtree(folder, ignore_errors=True)
    random_seq2seq("whisper", folder / "checkpoint", SEED, half=True, **TINY_WHISPER)
    WhisperFeatureExtractor(feature_size=TINY_WHISPER["num_mel_bins"]).save_pretrained(
        str(folder / "checkpoint")
    )
    from kvarray.export.reference import whisper_features

    sources = whisper_features(TINY_WHISPER["num_mel_bins"], 3, FEATURES_SEED)
    _finish(folder, "whisper", "automatic-speech-recognition-with-past", sources, byte_tokenizer.BOS_ID)


BUILDERS: dict[str, Callable[[bool], None]] = {
    "tiny-t5-random": build_t5,
    "tiny-whisper-random": build_whisper,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"of {', '.join(BUILDERS)} (default: all)")
    args = parser.parse_args()
    for name in args.models or list(BUILDERS):
        if name not in BUILDERS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
        BUILDERS[name](False)
        size = sum(f.stat().st_size for f in (HERE / name).rglob("*") if f.is_file())
        print(json.dumps({name: f"{size / 2**20:.2f} MiB"}))


if __name__ == "__main__":
    main()

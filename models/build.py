"""Build the tiny checkpoints of models/ and everything derived from them, offline and seeded.

    python models/build.py            # tiny-llama-random: checkpoint, native + Optimum exports, reference
    python models/build.py --bench    # bench-llama (hidden 512, 8 layers, vocab 32000): not committed
    python models/build.py --timing   # also print export time and graph size

For each model folder:
    checkpoint/      transformers `save_pretrained(safe_serialization=True)` + the byte tokenizer files
    native/          kvarray.export graphs: decoder_step.{view}.{kv_dtype}.onnx
    optimum/         `optimum-cli export onnx --task text-generation-with-past` of the checkpoint
    reference.npz    transformers' greedy continuations and logits (see kvarray.export.reference)

Needs the `reference` extra (torch, transformers, optimum-onnx). HF_HUB_OFFLINE=1 is set: nothing is
downloaded. The trained tiny Llama has its own script, train_tiny_llama.py, which reuses
`finish_checkpoint`; T5 and Whisper are built by build_seq2seq.py (also reachable by name from here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import byte_tokenizer  # noqa: E402

SEED = 5
NEW_TOKENS = 16
#: (folder, kv_dtype, view) of the committed native exports of the random tiny Llama.
RANDOM_EXPORTS = (("native", "float32", "pool"), ("native", "int8", "pool"))
BENCH_EXPORTS = (("native", "float32", "pool"), ("native", "int8", "pool"), ("native", "float32", "gathered"))

TINY_RANDOM_LLAMA = dict(
    vocab_size=byte_tokenizer.VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    # llama3 frequency scaling with a short original context, so that all three of its regimes
    # (kept, slowed, blended) occur at the positions the tests use
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=0.1,
    bos_token_id=None,  # no end-of-text: greedy references always run their 16 steps
    eos_token_id=None,
    pad_token_id=None,
)
BENCH_LLAMA = dict(
    TINY_RANDOM_LLAMA,
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_scaling=None,
    rope_theta=500000.0,
    initializer_range=0.02,
)


def prompts(seed: int, lengths: Sequence[int] = (7, 12, 3)) -> list[list[int]]:
    """Seeded prompts of byte tokens (printable ASCII), one per length."""
    rng = np.random.default_rng(seed)
    return [rng.integers(32, 127, size=n).tolist() for n in lengths]


def native_exports(folder: Path, exports: Sequence[tuple[str, str, str]], timing: bool = False) -> list[Path]:
    """Export folder/checkpoint with kvarray for each (subfolder, kv_dtype, view); return the graph paths."""
    from kvarray.export import export

    paths = []
    for sub, kv_dtype, view in exports:
        start = time.perf_counter()
        written = export("llama", folder / "checkpoint", folder / sub, kv_dtype=kv_dtype, view=view)
        seconds = time.perf_counter() - start
        for path in written:
            if timing:
                print(
                    f"export {path.relative_to(HERE)}: {seconds:.2f} s, {path.stat().st_size / 2**20:.2f} MiB"
                )
        paths += written
    return paths


def optimum_export(folder: Path, task: str = "text-generation-with-past") -> Path:
    """`optimum-cli export onnx --task TASK` of folder/checkpoint into folder/optimum (offline)."""
    out = folder / "optimum"
    shutil.rmtree(out, ignore_errors=True)
    cli = Path(sys.executable).with_name("optimum-cli")
    command = [str(cli), "export", "onnx", "--model", str(folder / "checkpoint"), "--task", task, str(out)]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / extra).unlink(missing_ok=True)  # the checkpoint folder has them; keep models/ small
    return out


def finish_checkpoint(
    folder: Path,
    exports: Sequence[tuple[str, str, str]],
    optimum: bool,
    timing: bool = False,
    reference_prompts: Sequence[Sequence[int]] | None = None,
) -> None:
    """Native exports, optionally the Optimum export, and reference.npz of folder/checkpoint."""
    from kvarray.export.reference import greedy_reference

    native_exports(folder, exports, timing)
    if optimum:
        optimum_export(folder)
    save_reference(
        folder, greedy_reference(folder / "checkpoint", reference_prompts or prompts(SEED), NEW_TOKENS)
    )


def save_reference(folder: Path, ref: dict[str, np.ndarray]) -> None:
    """Print the smallest greedy margin of the reference `ref`, then write it to folder/reference.npz."""
    from kvarray.export.reference import greedy_margin

    margin = greedy_margin(ref)
    print(f"{folder.name}: smallest greedy margin {margin:.4f} (must be well above the 1e-4 tolerance)")
    np.savez_compressed(folder / "reference.npz", **ref)


def build_llama(
    folder: Path, config: dict, exports: Sequence[tuple[str, str, str]], optimum: bool, timing: bool
) -> None:
    """A random Llama checkpoint in folder/checkpoint, then `finish_checkpoint`."""
    from kvarray.export.reference import random_llama

    shutil.rmtree(folder, ignore_errors=True)
    random_llama(folder / "checkpoint", SEED, byte_tokenizer.build_tokenizer(), **config)
    finish_checkpoint(folder, exports, optimum, timing)


def build_tiny(timing: bool) -> None:
    build_llama(HERE / "tiny-llama-random", TINY_RANDOM_LLAMA, RANDOM_EXPORTS, optimum=True, timing=timing)


def build_bench(timing: bool) -> None:
    """The bench Llama (about 55 M parameters, 220 MB in float32): on demand, never committed."""
    folder = HERE / "bench-llama"
    from kvarray.export.reference import random_llama

    shutil.rmtree(folder, ignore_errors=True)
    random_llama(folder / "checkpoint", SEED, byte_tokenizer.build_tokenizer(), **BENCH_LLAMA)
    native_exports(folder, BENCH_EXPORTS, timing=True)
    start = time.perf_counter()
    optimum_export(folder)
    print(f"optimum export: {time.perf_counter() - start:.1f} s")


def seq2seq(name: str) -> Callable[[bool], None]:
    """The builder of an encoder-decoder model, which lives in build_seq2seq.py (T5, Whisper)."""

    def build(timing: bool) -> None:
        try:
            import build_seq2seq
        except ImportError:
            raise SystemExit(f"{name}: models/build_seq2seq.py is not there; nothing to build") from None
        build_seq2seq.BUILDERS[name](timing)

    return build


#: model folder -> builder (random checkpoint, exports, reference).
BUILDERS: dict[str, Callable[[bool], None]] = {
    "tiny-llama-random": build_tiny,
    "tiny-t5-random": seq2seq("tiny-t5-random"),
    "tiny-whisper-random": seq2seq("tiny-whisper-random"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help=f"committed models to rebuild, of {', '.join(BUILDERS)} (default: tiny-llama-random)",
    )
    parser.add_argument("--bench", action="store_true", help="build bench-llama instead (not committed)")
    parser.add_argument("--timing", action="store_true", help="print export time and graph size")
    args = parser.parse_args()
    if args.bench:
        build_bench(True)
        return
    for name in args.models or ["tiny-llama-random"]:
        if name not in BUILDERS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
        BUILDERS[name](args.timing)
    sizes = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in HERE.iterdir()
        if p.is_dir()
    }
    print(json.dumps({k: f"{v / 2**20:.2f} MiB" for k, v in sorted(sizes.items())}))


if __name__ == "__main__":
    main()

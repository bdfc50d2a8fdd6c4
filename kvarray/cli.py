"""The `kvarray` command."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
    """Print the backend found, devices, kernel targets compiled and versions."""
    import numba
    import numpy as np

    from . import __version__
    from .xp import cupy_unavailable_reason, default_namespace

    print(f"kvarray {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(
        f"numpy {np.__version__}, numba {numba.__version__}, "
        f"CPU threads for kernels: {numba.get_num_threads()}"
    )
    why = cupy_unavailable_reason()
    print(f"default backend: {default_namespace().__name__}")
    print(f"cuda backend: {'usable' if not why else 'not usable: ' + why}")
    start = time.perf_counter()
    from .ops.warmup import compile_cpu_kernels

    compiled = compile_cpu_kernels()
    print(f"cpu kernels ready in {time.perf_counter() - start:.2f} s: {', '.join(compiled)}")
    for name in ("onnx", "onnxruntime", "safetensors", "numba_cuda"):
        try:
            module = __import__(name)
            print(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"{name} not installed")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    paths = export(args.arch, args.checkpoint, args.out, kv_dtype=args.kv_dtype, view=args.view)
    for path in paths:
        print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Generate text for the prompts with the model folder's native graph (see docs/engine.md)."""
    from .ort.cli_generate import run_generate

    return run_generate(args)


def _transcribe(args: argparse.Namespace) -> int:
    """Transcribe a WAV file with a Whisper model folder's native graphs (see docs/engine.md)."""
    from .ort.cli_transcribe import run_transcribe

    return run_transcribe(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvarray", description="KV caches for transformer inference")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="backend, devices, compiled kernels and versions")
    info.set_defaults(run=_info)
    export = commands.add_parser(
        "export", help="export a Hugging Face checkpoint to kvarray's native ONNX graphs"
    )
    export.add_argument("checkpoint", help="folder with config.json and *.safetensors")
    export.add_argument("out", help="folder to write the graphs into")
    export.add_argument("--arch", required=True, choices=["llama", "t5", "whisper"])
    export.add_argument("--kv-dtype", default="float32", choices=["float32", "float16", "int8"])
    export.add_argument("--view", default="pool", choices=["pool", "gathered"])
    export.set_defaults(run=_export)
    from .ort.cli_generate import add_generate_arguments

    generate = commands.add_parser(
        "generate", help="generate text with a model folder's native or Optimum graph"
    )
    add_generate_arguments(generate)
    generate.set_defaults(run=_generate)
    from .ort.cli_transcribe import add_transcribe_arguments

    transcribe = commands.add_parser("transcribe", help="transcribe a WAV file with a Whisper model folder")
    add_transcribe_arguments(transcribe)
    transcribe.set_defaults(run=_transcribe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

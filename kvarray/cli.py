"""The `kvarray` command.

Errors a user can cause (a kvarray error: bad options, a damaged model file, a prompt that is not UTF-8;
an `OSError`: a file that is not there or cannot be read; a bad argument) end the command with one line
on stderr, ``kvarray COMMAND: ErrorName: what was expected``, and exit status 1 (2 for a bad argument,
130 on Ctrl-C), without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

#: exit statuses
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the message and where to find the usage (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def error_line(command: str, exc: BaseException) -> str:
    """``kvarray COMMAND: ErrorName: message``, the message's lines joined into one."""
    message = " ".join(str(exc).split()) or "no details"
    return f"kvarray {command}: {type(exc).__name__}: {message}"


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
    parser = _Parser(prog="kvarray", description="KV caches for transformer inference")
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
    export.add_argument(
        "--view",
        default="pool",
        choices=["pool", "gathered", "decode"],
        help="the past the graph reads: the pool view, the gathered view, or the decode view (Llama only: "
        "GroupQueryAttention, one token per sequence; the twin of the pool graph, see docs/export.md)",
    )
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
    """Run the command line `argv` (default ``sys.argv[1:]``); the exit status (see the module docstring)."""
    from .errors import KVArrayError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (KVArrayError, OSError) as exc:
        print(error_line(args.command, exc), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"kvarray {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

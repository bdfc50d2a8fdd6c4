"""`kvarray generate MODEL_DIR ...`: the command's arguments and its run (imported lazily by kvarray.cli).

Output: with one prompt, the generated text is streamed to stdout as it is produced (ended by a newline);
with several, each request's prompt and text is printed when it finishes (in finishing order, numbered by
input order). When stderr is a terminal a progress line is updated in place there (``\r``), and cleared
before the summary; when it is not (a pipe, a file, ``2>&1``), no progress is written, so it never mixes
with the text. The summary goes to stderr.

Errors: a prompt or batch file that is not UTF-8 (`InvalidUTF8`, with the line and column), a missing
file, a damaged model folder or options out of range end the command before generating, with one line on
stderr and status 1. A request that fails while generating (`FinishReason.ERROR`) is reported on stderr
(``request K failed: ...``) while the others go on; the status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kvarray generate`."""
    parser.add_argument(
        "model_dir", help="model folder with checkpoint/ (tokenizer, config) and native/ or optimum/ graphs"
    )
    parser.add_argument(
        "--graph",
        default="auto",
        choices=["auto", "native", "optimum"],
        help="native/decoder_step.pool.{kv-dtype}.onnx, optimum/model.onnx, or auto (native when present)",
    )
    parser.add_argument(
        "--view",
        default="auto",
        choices=["pool", "gathered", "auto"],
        help="the native graphs' view: pool (decoder_step.pool.*), gathered (decoder_step.gathered.*), or "
        "auto (the pool graph, and its decode- or gathered-view twin for decode passes when the folder has "
        "one); see docs/engine.md, Views",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--batch-file", help="a text file of prompts, one per line (empty lines skipped)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--kv-dtype", default="float32", choices=["float32", "float16", "int8"])
    parser.add_argument("--window", type=int, default=None, help="sliding window of the cache, in tokens")
    parser.add_argument("--sinks", type=int, default=0, help="attention-sink tokens kept with --window")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)"
    )
    parser.add_argument(
        "--no-spin",
        action="store_true",
        help="ONNX Runtime's idle threads sleep instead of spin-waiting (faster on a busy machine)",
    )
    parser.add_argument("--max-sequences", type=int, default=16, help="requests running at once")
    parser.add_argument("--capacity", type=int, default=4096, help="cache cells")
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument(
        "--decode-burst",
        type=int,
        default=1,
        help="decode passes a step may make back to back on the decode view (1: one); see docs/engine.md, "
        "Decode bursts",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress line on stderr (shown only on a terminal)"
    )


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompts: each --prompt (checked to be UTF-8), then the batch file's non-empty lines.

    Raises `InvalidUTF8` (naming the --prompt, or the batch file's line and column), `OSError`.
    """
    from .tokenizer import utf8_bytes

    prompts = [utf8_bytes(p, f"--prompt {k + 1}").decode("utf-8") for k, p in enumerate(args.prompt)]
    if args.batch_file:
        raw = Path(args.batch_file).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            from ..errors import InvalidUTF8

            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise InvalidUTF8(
                f"batch file {args.batch_file} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at line "
                f"{line}, column {column}",
                exc.start,
            ) from None
        prompts.extend(line for line in text.splitlines() if line.strip())
    return prompts


def _check_model_dir(model_dir: str) -> None:
    """Fail early, naming the file, on a model folder whose checkpoint/config.json is damaged."""
    from ..export import read_config

    config = Path(model_dir) / "checkpoint" / "config.json"
    if config.is_file():
        read_config(config)


def _views(runner: Any) -> str:
    """`` (view pool)`` for a native graph of one view, `` (views pool 3, decode 39)`` for a pool graph and
    its twin (the passes run on each), empty for an Optimum graph."""
    passes = getattr(runner, "passes", None)
    if passes:
        return " (views " + ", ".join(f"{view.value} {count}" for view, count in passes.items()) + ")"
    view = getattr(runner, "view", None)
    return f" (view {view.value})" if view is not None else ""


def run_generate(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `kvarray generate`; returns the exit status (2 without any prompt, 1 on an error or a failed
    request)."""
    from ..cli import error_line
    from ..errors import KVArrayError
    from .engine import Engine, EngineConfig, GraphKind, KVDtype, ViewChoice
    from .sampling import SamplingParams
    from .scheduler import FinishReason

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        prompts = _prompts(args)
    except (KVArrayError, OSError) as exc:
        print(error_line("generate", exc), file=err)
        return 1
    if not prompts:
        print("kvarray generate: give --prompt TEXT or --batch-file FILE", file=err)
        return 2
    try:
        _check_model_dir(args.model_dir)
        config = EngineConfig(
            capacity=args.capacity,
            max_sequences=args.max_sequences,
            prefill_chunk=args.prefill_chunk,
            kv_dtype=KVDtype(args.kv_dtype),
            window=args.window,
            sinks=args.sinks,
            threads=args.threads,
            spin=not args.no_spin,
            view=ViewChoice(args.view),
            decode_burst=args.decode_burst,
        )
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        engine = Engine.from_model_dir(args.model_dir, config, graph=GraphKind(args.graph))
        tok = engine._tokenizer()
        ids = [engine.add_request(tok.encode(p.encode("utf-8")), params) for p in prompts]
    except (KVArrayError, OSError) as exc:
        print(error_line("generate", exc), file=err)
        return 1
    index = {rid: k for k, rid in enumerate(ids)}
    decoders = {rid: tok.decoder() for rid in ids}
    single = len(prompts) == 1
    if single:
        out.write(prompts[0])
    start = time.perf_counter()
    total = len(prompts) * args.max_new_tokens
    progress = not args.quiet and err.isatty()
    ended = True  # the text written to `out` ends with a newline
    failed = 0
    for event in engine.stream():
        rid = event.request.id
        if event.reason is FinishReason.ERROR:
            failed += 1
            if not ended:
                out.write("\n")
                out.flush()
                ended = True
            line = error_line("generate", event.request.error or RuntimeError("unknown"))
            print(line.replace(": ", f": request {index[rid]} failed: ", 1), file=err)
            continue
        assert event.token is not None
        piece = decoders[rid].feed(event.token)
        if single:
            out.write(piece)
            out.flush()
            ended = False
        if event.finished:
            text = tok.decode(event.request.output)
            if single:
                out.write(decoders[rid].flush() + "\n")
            else:
                out.write(f"[{index[rid]}] {prompts[index[rid]]}{text}\n")
            out.flush()
            ended = True
        if progress and engine.metrics.steps % 16 == 0:
            line = f"{engine.metrics.generated_tokens}/{total} tokens, step {engine.metrics.steps}"
            print(f"\r{line}", end="", file=err, flush=True)
    if not ended:
        out.write("\n")
        out.flush()
    elapsed = time.perf_counter() - start
    m, stats = engine.metrics, engine.stats()
    mib = stats.bytes_per_token * stats.capacity / 2**20
    peak_mib = stats.bytes_per_token * m.peak_cells / 2**20
    if progress:
        print("\r\033[K", end="", file=err)  # clear the progress line
    print(
        f"{len(prompts)} requests, {m.generated_tokens} tokens generated in {elapsed:.2f} s: "
        f"{m.generated_tokens / elapsed:.1f} tok/s generated, "
        f"{(m.prefill_tokens + m.decode_tokens) / elapsed:.1f} tok/s processed\n"
        f"steps {m.steps}, prefill tokens {m.prefill_tokens} (shared, not recomputed: {m.shared_tokens}), "
        f"decode tokens {m.decode_tokens}, Python overhead {100 * m.overhead_share:.1f} % of step time\n"
        f"graph: {engine.runner.kind}{_views(engine.runner)}, cache: {args.kv_dtype}, "
        f"{stats.bytes_per_token} B/token, "
        f"pools {mib:.2f} MiB for {stats.capacity} cells, peak cells {m.peak_cells} ({peak_mib:.2f} MiB), "
        f"peak n_kv {m.peak_n_kv}, "
        f"fragmentation now {stats.fragmentation:.2f}, defrags {stats.defrags}",
        file=err,
    )
    engine.close()
    return 1 if failed else 0

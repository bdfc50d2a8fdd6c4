"""kvarray's engine in its storage and view variants on the bench Llama, in one process: tokens/s of the
pool-view graph with float32 storage, the gathered-view graph alone, and the pool-view int8 graph, on the
equal-length batches of ``benchmarks/test_engine_bench.py`` (B prompts of 128 byte tokens, 128 new tokens,
greedy, 2 intra-op threads), with rounds interleaved (each round runs every variant once) so the ratios to
the float32 pool variant compare medians of the same minutes. The engine suite measures the default
engine (view "auto") and the pool variant against the other systems; this adds the variants it does not
run. Also records the greedy tokens each variant shares with the float32 pool variant (int8 storage may
change late tokens).

    python -m benchmarks.engine_variants [--quick] [--out results.json]

The JSON has pytest-benchmark's shape (``{"benchmarks": [{"name", "extra_info", "stats"}]}``), one
entry per batch size, ``extra_info`` holding ``{variant}_tok_s``, ``{variant}_seconds`` and
``ratio_to_pool``, the form `benchmarks.report_sections` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "models" / "bench-llama"
THREADS = 2
SIZES = (1, 4, 16)
#: variant name -> EngineConfig options; "kvarray-pool" is the reference of every ratio.
VARIANTS: dict[str, dict[str, Any]] = {
    "kvarray-pool": dict(view="pool", kv_dtype="float32"),
    "kvarray-gathered": dict(view="gathered", kv_dtype="float32"),
    "kvarray-int8": dict(view="pool", kv_dtype="int8"),
}
REFERENCE = "kvarray-pool"


def workload() -> Any:
    """benchmarks/peers/workload.py, the engine suite's prompts."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    import workload as module

    return module


def engines() -> dict[str, Any]:
    from kvarray.ort import Engine, EngineConfig, KVDtype

    made = {}
    for name, options in VARIANTS.items():
        config = EngineConfig(
            capacity=16 * 768,
            max_sequences=16,
            threads=THREADS,
            view=options["view"],
            kv_dtype=KVDtype(options["kv_dtype"]),
        )
        made[name] = Engine.from_model_dir(BENCH, config, graph="native")
    return made


def generate(engine: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    """Greedy tokens of `prompts` (all running at once) and the seconds of the whole call."""
    from kvarray.ort import SamplingParams

    params = SamplingParams(max_new_tokens=new, stop_tokens=())
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_work:
        engine.step()
    seconds = time.perf_counter() - start
    return [engine.pop(i).output for i in ids], seconds


def measure(sizes: tuple[int, ...] = SIZES, repeats: int = 3, new: int = 128) -> list[dict[str, Any]]:
    """One pytest-benchmark-shaped entry per batch size (the reference variant's stats)."""
    prompts_of = workload().equal_prompts
    agreement = workload().agreement
    made = engines()
    entries = []
    try:
        for batch in sizes:
            prompts = prompts_of(batch)
            for engine in made.values():  # warm-up: sessions, allocations, kernels
                generate(engine, prompts, 4)
            seconds: dict[str, list[float]] = {name: [] for name in made}
            outputs: dict[str, list[list[int]]] = {}
            load = [round(os.getloadavg()[0], 2)]
            for _ in range(repeats):
                for name, engine in made.items():
                    outputs[name], took = generate(engine, prompts, new)
                    seconds[name].append(took)
            load.append(round(os.getloadavg()[0], 2))
            tokens = batch * new
            tps = {name: tokens / statistics.median(s) for name, s in seconds.items()}
            extra: dict[str, Any] = dict(sequences=batch, new_tokens=new, repeats=repeats, threads=THREADS)
            for name in made:
                extra[f"{name}_tok_s"] = round(tps[name], 1)
                extra[f"{name}_seconds"] = [round(s, 3) for s in seconds[name]]
                extra[f"{name}_ratio_to_pool"] = round(tps[name] / tps[REFERENCE], 3)
                extra[f"{name}_agreeing_tokens"] = list(agreement(outputs[REFERENCE], outputs[name]))
            extra["load_1min"] = load
            ref = sorted(seconds[REFERENCE])
            stats = dict(median=statistics.median(ref), min=ref[0], max=ref[-1], rounds=repeats, data=ref)
            entries.append(dict(name=f"engine_variants[{batch}]", extra_info=extra, stats=stats))
            print(
                f"[variants] B={batch}: " + ", ".join(f"{n} {t:.1f} tok/s" for n, t in tps.items()),
                flush=True,
            )
    finally:
        for engine in made.values():
            engine.close()
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round at 4 sequences, 32 new tokens")
    parser.add_argument("--out", type=Path, default=Path("engine_variants.json"))
    args = parser.parse_args(argv)
    if not (BENCH / "native" / "decoder_step.pool.float32.onnx").is_file():
        print("models/bench-llama is missing: python models/build.py --bench", file=sys.stderr)
        return 2
    if args.quick:
        entries = measure(sizes=(4,), repeats=1, new=32)
    else:
        entries = measure()
    args.out.write_text(json.dumps({"benchmarks": entries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

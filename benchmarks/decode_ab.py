"""The decode step of `benchmarks/test_causal_bench.py` measured for two (or more) source trees in turn,
with the copy floor measured in the same processes: how a change to the cache moves its own cost.

    python -m benchmarks.decode_ab before=PATH/TO/OLD/TREE after=.  [--runs 4] [--steps 200]

Each run is one child process per tree (``PYTHONPATH`` = the tree, ``NUMBA_NUM_THREADS=1``), trees
alternating run after run so that load changes hit both. A child times, at 8 / 16 / 32 / 64 sequences of
32 cached tokens on the 16-layer float16 spec, ``start_forward`` + 16 x (``put`` + ``get``) for the
"pages" and "pool" views (each sequence's decode token removed between steps), and the copy floor: the
same bytes written by NumPy fancy assignment into 32 pools of the same size. Printed per tree and case:
the best minimum and the best median over the runs (us per step), and the overhead, min(step) -
min(floor). Medians on a shared machine are unreliable; compare minima.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
from kvarray.causal import CausalCache
from kvarray.spec import KVSpec

SPEC = KVSpec(num_layers=16, num_kv_heads=8, head_dim=64, dtype="float16")
STEPS, WARMUP, CONTEXT = int(sys.argv[1]), 20, 32


def timed(step, reset):
    times = []
    for _ in range(WARMUP + STEPS):
        reset()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times = np.array(times[WARMUP:]) * 1e6
    return float(times.min()), float(np.median(times))


out = {}
for count in (8, 16, 32, 64):
    seqs, positions = np.arange(count), np.full(count, CONTEXT)
    rows = np.zeros((count, SPEC.num_kv_heads, SPEC.head_dim), np.float16)
    for view in ("pages", "pool"):
        cache = CausalCache(SPEC, capacity=count * (CONTEXT + 2), max_sequences=count, xp=np)
        for s in range(count):
            cache.start_forward([s] * CONTEXT, list(range(CONTEXT)))

        def step():
            cache.start_forward(seqs, positions)
            for layer in range(SPEC.num_layers):
                cache.put(layer, rows, rows)
                cache.get(layer, view)

        def rewind():
            for s in range(count):
                cache.remove(s, CONTEXT)

        out[f"{view}-{count}"] = timed(step, rewind)
    pools = [np.zeros((count * (CONTEXT + 2), *rows.shape[1:]), np.float16) for _ in range(32)]
    cells = np.arange(count) * (CONTEXT + 2) + CONTEXT

    def floor():
        for pool in pools:
            pool[cells] = rows

    out[f"floor-{count}"] = timed(floor, lambda: None)
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("trees", nargs="+", help="NAME=PATH of each source tree")
    parser.add_argument("--runs", type=int, default=4, help="child processes per tree")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per case")
    args = parser.parse_args(argv)
    trees = dict(tree.split("=", 1) for tree in args.trees)
    results: dict[str, list[dict[str, list[float]]]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, path in trees.items():
            env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONPATH=os.path.abspath(path))
            child = [sys.executable, "-c", CHILD, str(args.steps)]
            done = subprocess.run(child, cwd=path, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            results[name].append(json.loads(done.stdout))
    print(f"load average {os.getloadavg()[0]:.2f}; us per step, best min / best median over {args.runs} runs")
    for name, runs in results.items():
        best = {key: (min(r[key][0] for r in runs), min(r[key][1] for r in runs)) for key in runs[0]}
        for count in (8, 16, 32, 64):
            floor = best[f"floor-{count}"][0]
            cells = [f"floor {floor:.0f}"]
            for view in ("pages", "pool"):
                low, mid = best[f"{view}-{count}"]
                cells.append(f"{view} {low:.0f} / {mid:.0f} (overhead {low - floor:.0f})")
            print(f"{name:>8} {count:>2} seq: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

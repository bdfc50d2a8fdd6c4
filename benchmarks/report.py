"""The benchmark report: run the comparison set and write docs/benchmarks.md with tables and PNG plots.

    python -m benchmarks.report                 # full run of record (about 15 min on 2 cores)
    python -m benchmarks.report --quick         # smoke run: few rounds, small sizes, no serving run
    python -m benchmarks.report --only kernels  # re-run one suite, keep the others' results
    python -m benchmarks.report --no-run        # rewrite the report from the results on disk

Each suite of `SUITES` is one pytest process (``--benchmark-enable --benchmark-json=RESULTS/NAME.json``),
so every comparison inside a suite (a kernel against ``numpy.copyto``, kvarray's engine against Optimum
and transformers) is measured in one process and one run; onnxruntime-genai runs in its own environment
as a subprocess of the engine suite. The counts that no timing suite records (memory per token, requests
that fit a budget, n_kv over churn) come from `benchmarks.capacity`, in this process. Results land in
``benchmarks/results/`` (``benchmarks/results/quick/`` with ``--quick``): the pytest-benchmark JSON and
log of each suite, ``capacity.json``, and ``report.json`` (machine, versions, commands, times, load).
The report states, for every figure, the machine, the versions, the command and the rounds behind each
median; a suite or peer that could not run is listed as "not measured" with its reason.

Modules: this one runs the suites and writes the page (`write_report`) and the headline table the README
quotes (`headline_markdown`); `benchmarks.report_sections` says what each section shows,
`benchmarks.report_writer` reads the results and formats tables, the page and the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks import report_writer
from benchmarks.report_sections import SECTIONS, display, engine_rows
from benchmarks.report_writer import (
    Results,
    clean,
    draw_figures,
    load_range,
    load_results,
    machine_line,
    page,
    ratio,
    table,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_MODEL = ROOT / "models" / "bench-llama"
LOAD_SAMPLE_SECONDS = 10.0


@dataclass(frozen=True)
class Suite:
    """One process of the report: a pytest-benchmark file (`path`, a ``-k`` selection, what quick mode
    selects, markers), or a module of benchmarks/ run with ``--out JSON [--quick]`` (`module`)."""

    name: str
    path: str = ""
    select: str = ""
    quick_select: str = ""
    needs_bench_model: bool = False
    markers: str = ""
    module: str = ""


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("kernels", "benchmarks/test_kernels.py"),
        Suite("causal", "benchmarks/test_causal_bench.py"),
        Suite("encoder", "benchmarks/test_encoder_bench.py", quick_select="not reversed"),
        Suite(
            "graphs",
            "benchmarks/test_export_bench.py",
            select="test_decode_step",
            quick_select="test_decode_step and 4-",
            needs_bench_model=True,
        ),
        Suite(
            "engine",
            "benchmarks/test_engine_bench.py",
            quick_select="test_equal_batch and 4",
            needs_bench_model=True,
        ),
        Suite("variants", module="benchmarks.engine_variants", needs_bench_model=True),
        Suite("gpu", "benchmarks/test_kernels_gpu.py", markers="gpu"),
    )
}
#: Sections of the report that are not pytest suites.
EXTRA_SECTIONS = ("capacity",)
#: Distributions whose versions the report records (absent ones as "not installed").
DISTRIBUTIONS = (
    "numpy",
    "numba",
    "onnx",
    "onnxruntime",
    "safetensors",
    "pytest-benchmark",
    "matplotlib",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "cupy-cuda12x",
    "numba-cuda",
)


# ---- machine, versions, load -------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else `platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(
        cpu=cpu_model(),
        cores=cores,
        cpu_count=os.cpu_count(),
        memory_gib=memory_gib(),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
    )


def versions() -> dict[str, str]:
    """Versions of Python, kvarray and each of `DISTRIBUTIONS` in this environment ("not installed")."""
    found = {"python": platform.python_version()}
    for name in ("kvarray", *DISTRIBUTIONS):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def gpu_reason() -> str:
    """ "" when a CUDA device is usable through CuPy, else why not."""
    from kvarray.xp import cupy_unavailable_reason

    return cupy_unavailable_reason()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")


@dataclass
class LoadSampler:
    """1-minute load averages sampled every `every` seconds while a suite runs (the first at its start)."""

    every: float = LOAD_SAMPLE_SECONDS
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while True:
            self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(self.every):
                return

    @contextmanager
    def running(self) -> Iterator[LoadSampler]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.samples.append(round(os.getloadavg()[0], 2))


# ---- running -----------------------------------------------------------------------------------------
def suite_command(suite: Suite, json_path: Path, quick: bool) -> list[str]:
    """The command line of `suite` (``python`` standing for this interpreter)."""
    if suite.module:
        return ["python", "-m", suite.module, "--out", str(json_path), *(["--quick"] if quick else [])]
    command = ["python", "-m", "pytest", suite.path, "--benchmark-enable", f"--benchmark-json={json_path}"]
    select = suite.quick_select if quick and suite.quick_select else suite.select
    if select:
        command += ["-k", select]
    if suite.markers:
        command += ["-m", suite.markers]
    return command + ["-q", "-rs", "-p", "no:randomly"]


def shown(command: list[str]) -> str:
    """A command as the report prints it: repository-relative paths, arguments with spaces quoted."""
    parts = []
    for part in command:
        part = part.replace(str(ROOT) + os.sep, "")
        parts.append(f'"{part}"' if " " in part else part)
    return " ".join(parts)


def outcome(log: str) -> dict[str, Any]:
    """Skips (with reasons), failures and the summary line of a pytest log."""
    skipped = [m.group(1).strip() for m in re.finditer(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", log, re.M)]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)
    summary = [
        line.strip("= ") for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)
    ]
    return dict(skipped=skipped, failed=failed, summary=summary[-1] if summary else "")


def run_suite(suite: Suite, results: Path, quick: bool) -> dict[str, Any]:
    """Run one suite in its own process; its JSON and log go to `results`; returns its record."""
    json_path, log_path = results / f"{suite.name}.json", results / f"{suite.name}.log"
    json_path.unlink(missing_ok=True)
    command = suite_command(suite, json_path, quick)
    env = dict(os.environ, KVARRAY_BENCH_QUICK="1" if quick else "0")
    print(f"[report] {suite.name}: {shown(command)}", flush=True)
    start = time.perf_counter()
    with LoadSampler().running() as load, log_path.open("w") as log:
        done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, stdout=log, stderr=log)
    seconds = time.perf_counter() - start
    compact(json_path)
    record = dict(
        command=shown(command),
        seconds=round(seconds, 1),
        returncode=done.returncode,
        load_1min=load.samples,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        quick=quick,
        **outcome(log_path.read_text(errors="replace")),
    )
    if not record["summary"]:  # not pytest: the log's last line
        lines = log_path.read_text(errors="replace").strip().splitlines()
        record["summary"] = lines[-1] if lines else f"exit code {done.returncode}"
    print(f"[report] {suite.name}: {record['summary'] or 'no summary'} in {seconds:.0f} s", flush=True)
    return record


def compact(json_path: Path, keep: int = 200) -> None:
    """Drop the per-round timings (``stats.data``) of benchmarks with more than `keep` rounds, and the CPU
    flag list, from a pytest-benchmark JSON: the committed results stay small; every statistic stays."""
    if not json_path.is_file():
        return
    data = json.loads(json_path.read_text())
    data.get("machine_info", {}).get("cpu", {}).pop("flags", None)
    for bench in data.get("benchmarks", []):
        if len(bench.get("stats", {}).get("data", [])) > keep:
            bench["stats"]["data"] = f"{len(bench['stats']['data'])} rounds, dropped (see the statistics)"
    json_path.write_text(json.dumps(data, indent=1))


def build_bench_model() -> str:
    """Build models/bench-llama when its graphs are missing; "" when it is there, else why it is not."""
    if (BENCH_MODEL / "native" / "decoder_step.pool.float32.onnx").is_file():
        return ""
    print("[report] models/bench-llama is missing: python models/build.py --bench", flush=True)
    done = subprocess.run(
        [sys.executable, "models/build.py", "--bench"], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"the bench Llama could not be built (python models/build.py --bench: {last})"
    return ""


def run_capacity(results: Path) -> dict[str, Any]:
    from benchmarks import capacity

    print("[report] capacity: python -m benchmarks.capacity (in this process)", flush=True)
    start = time.perf_counter()
    with LoadSampler().running() as load:
        figures = capacity.measure()
    (results / "capacity.json").write_text(json.dumps(figures, indent=1))
    return dict(
        command="python -m benchmarks.capacity",
        seconds=round(time.perf_counter() - start, 1),
        returncode=0,
        load_1min=load.samples,
        quick=False,
    )


def run(args: argparse.Namespace, results: Path) -> dict[str, Any]:
    """Run the chosen sections; merge their records into ``results/report.json``; return it."""
    meta_path = results / "report.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("sections", {})
    chosen = args.only or [*EXTRA_SECTIONS, *SUITES]
    start = time.perf_counter()
    meta.update(
        machine=machine(),
        versions=versions(),
        commit=git_commit(),
        quick=args.quick,
        command=shown(["python", "-m", "benchmarks.report", *sys.argv[1:]]),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_before=[round(x, 2) for x in os.getloadavg()],
        gpu=gpu_reason() or "usable",
    )
    missing_model = ""
    for name in chosen:
        if name == "capacity":
            meta["sections"][name] = run_capacity(results)
            continue
        suite = SUITES[name]
        if suite.name == "gpu" and meta["gpu"] != "usable":
            (results / "gpu.json").unlink(missing_ok=True)
            meta["sections"][name] = dict(not_measured=f"no CUDA device ({meta['gpu']})", quick=args.quick)
            continue
        if suite.needs_bench_model and not args.no_build:
            missing_model = missing_model or build_bench_model()
        if suite.needs_bench_model and missing_model:
            (results / f"{name}.json").unlink(missing_ok=True)
            meta["sections"][name] = dict(not_measured=missing_model, quick=args.quick)
            continue
        meta["sections"][name] = run_suite(suite, results, args.quick)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


# ---- writing ----------------------------------------------------------------------------------------
def headline_rows(results: Results) -> list[list[str]]:
    """The few figures the README quotes, each with the ratio it is about."""
    rows: list[list[str]] = []
    sizes, tps, unavailable = engine_rows(results)
    for n in sizes[:1] + sizes[-1:] if len(sizes) > 1 else sizes:
        mine = tps.get("kvarray", {}).get(n)
        vs = ", ".join(
            f"{display(k)} {tps[k][n]:.0f} tok/s (kvarray {ratio(mine, tps[k][n]):.2f} x)"
            for k in tps
            if k != "kvarray" and tps[k].get(n) and mine
        )
        rows.append(
            [f"engine tokens/s, {n} sequence{'s' * (n > 1)}", f"{mine:.0f} tok/s" if mine else "-", vs]
        )
    serving = results.tests("engine", "test_serving")
    if serving:
        e = serving[0]["extra_info"]
        others = [k for k, v in e.items() if isinstance(v, dict) and "finish_all_s" in v and k != "kvarray"]
        vs = ", ".join(
            f"{display(k)} {e[k]['finish_all_s']:.1f} s ({e[f'speedup_over_{k}']:.2f} x kvarray's)"
            for k in others
            if f"speedup_over_{k}" in e
        )
        rows.append(
            [
                f"serving {e['workload']['requests']} requests: time to finish all",
                f"{e['kvarray']['finish_all_s']:.1f} s",
                vs,
            ]
        )
        ttft = ", ".join(f"{display(k)} {e[k]['ttft_median_s']:.2f} s" for k in others)
        rows.append(["serving: median time to first token", f"{e['kvarray']['ttft_median_s']:.2f} s", ttft])
    variants = results.tests("variants", "engine_variants")
    if variants:
        e = variants[-1]["extra_info"]
        names = [k.removesuffix("_tok_s") for k in e if k.endswith("_tok_s") and k != "kvarray-pool_tok_s"]
        rows.append(
            [
                f"engine variants, {e['sequences']} sequences (one process)",
                f"pool view {e.get('kvarray-pool_tok_s', 0):.0f} tok/s",
                ", ".join(
                    f"{display(k)} {e[f'{k}_tok_s']:.0f} tok/s ({e[f'{k}_ratio_to_pool']:.2f} x)"
                    for k in names
                ),
            ]
        )
    for system, reason in sorted(unavailable.items()):
        rows.append([f"{display(system)}", "not measured", reason])
    if results.capacity:
        cap = results.capacity["capacity"]
        counts = {(r["storage"], r["prefix_sharing"]): r["requests"] for r in cap["rows"]}
        rows.append(
            [
                f"requests that fit in {cap['budget_bytes'] / 2**20:.0f} MiB of K/V",
                f"{counts.get(('float16', False))} (float16)",
                f"int8 {counts.get(('int8', False))}, float16 + prefix sharing "
                f"{counts.get(('float16', True))}, int8 + sharing {counts.get(('int8', True))}",
            ]
        )
        churn = results.capacity.get("churn", {})
        if churn:
            rows.append(
                [
                    "n_kv / used cells over churn (mean)",
                    f"{churn['defrag-0.1']['mean_ratio']:.2f} with defrag",
                    f"{churn['no-defrag']['mean_ratio']:.2f} without",
                ]
            )
    kernels = {b["name"].removeprefix("test_"): b["extra_info"] for b in results.suites.get("kernels", [])}
    picked = [k for k in ("scatter_rows[float16]", "gather_rows", "move_rows[direct]") if k in kernels]
    if picked:
        rows.append(
            [
                "CPU kernels / numpy.copyto bandwidth",
                ", ".join(
                    f"{k} {kernels[k].get('ratio_median', kernels[k].get('ratio')):.2f}" for k in picked
                ),
                "medians, same process",
            ]
        )
    return rows


def headline_markdown(results: Results, source: bool = True) -> str:
    """The headline table; with `source`, a line saying where and how it was measured (the README's)."""
    rows = clean(table(["figure", "kvarray", "the others, same run"], headline_rows(results)))
    if not source:
        return rows
    m = results.meta
    mode = " (quick mode: not a run of record)" if m.get("quick") else ""
    samples = [x for r in m.get("sections", {}).values() for x in r.get("load_1min", [])]
    return (
        rows + f"\n{machine_line(m)}, 1-minute load average {load_range(samples)} during the run; "
        f"{m.get('date', '?')}, commit {m.get('commit', '?')}{mode}; `{m.get('command', '?')}`, details in "
        "[docs/benchmarks.md](docs/benchmarks.md).\n"
    )


def write_report(results_dir: Path, out: Path, meta: dict[str, Any]) -> list[Path]:
    """Write ``out/benchmarks.md`` and ``out/img/*.png`` from the results in `results_dir`."""
    results = load_results(results_dir, meta)
    sections = [build(results) for build in SECTIONS]
    out.mkdir(parents=True, exist_ok=True)
    images, plots = draw_figures(results, sections, out / "img")
    path = out / "benchmarks.md"
    path.write_text(clean(page(results, sections, headline_markdown(results, source=False), plots)))
    return [path, *images]


def update_readme(readme: Path, headline: str) -> None:
    """Replace the block between the README's benchmark markers with `headline`."""
    text = readme.read_text()
    begin, end = report_writer.README_BEGIN, report_writer.README_END
    if begin not in text or end not in text:
        raise SystemExit(f"{readme.name} has no {begin} ... {end} block to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{headline}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, small sizes (a smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the report and its img/ (default: docs/, or the results folder with --quick)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="folder of the JSON results (default: benchmarks/results[/quick])",
    )
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated sections to run, of {', '.join([*EXTRA_SECTIONS, *SUITES])}; "
        "the others keep their results on disk",
    )
    parser.add_argument("--no-run", action="store_true", help="write the report from the results on disk")
    parser.add_argument("--no-build", action="store_true", help="do not build models/bench-llama if missing")
    parser.add_argument("--readme", action="store_true", help="also update README.md's headline table")
    args = parser.parse_args(argv)
    for name in args.only or []:
        if name not in SUITES and name not in EXTRA_SECTIONS:
            parser.error(f"unknown section {name!r}")
    results = args.results or (RESULTS / "quick" if args.quick else RESULTS)
    out = args.out or (results if args.quick else ROOT / "docs")
    results.mkdir(parents=True, exist_ok=True)
    if args.no_run:
        meta = json.loads((results / "report.json").read_text())
    else:
        meta = run(args, results)
    written = write_report(results, out, meta)
    print(f"[report] wrote {shown([str(p) for p in written])}", flush=True)
    if args.readme:
        results_read = report_writer.load_results(results, meta)
        update_readme(ROOT / "README.md", headline_markdown(results_read))
    return 0


if __name__ == "__main__":
    sys.exit(main())

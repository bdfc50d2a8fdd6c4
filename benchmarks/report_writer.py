"""The pages of the benchmark report: tables (Markdown) and plots (PNG, matplotlib's Agg backend) from the
results that `benchmarks.report` wrote: each suite's pytest-benchmark JSON, ``capacity.json`` and
``report.json`` (machine, versions, commands, seconds and load of every section).

`benchmarks.report_sections` builds the sections from a `Results`; `page` joins them into Markdown and
`draw_figures` draws their figures. Ratios are always computed from figures of the same run (the same
JSON file), never across runs. Without matplotlib the tables are written and the page says the plots
were not drawn.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README_BEGIN = "<!-- benchmarks:begin (written by python -m benchmarks.report --readme) -->"
README_END = "<!-- benchmarks:end -->"
#: The versions that matter to each section (distribution names of report.json's ``versions``).
SECTION_VERSIONS = {
    "kernels": ("numpy", "numba"),
    "causal": ("numpy", "numba"),
    "encoder": ("numpy", "numba"),
    "capacity": ("numpy",),
    "graphs": ("onnxruntime", "onnx", "optimum-onnx"),
    "engine": ("onnxruntime", "onnxruntime-genai", "torch", "transformers", "optimum", "optimum-onnx"),
    "variants": ("onnxruntime",),
    "gpu": ("cupy-cuda12x", "numba-cuda"),
}

Draw = Callable[[Any], None]  # draws on a matplotlib Axes


@dataclass
class Results:
    """What the report reads: `meta` (report.json), each suite's benchmarks (pytest-benchmark's
    ``benchmarks`` list, keyed by suite name; absent when the suite wrote no JSON) and capacity.json."""

    meta: dict[str, Any]
    suites: dict[str, list[dict[str, Any]]]
    capacity: dict[str, Any] | None = None

    def tests(self, suite: str, test: str) -> list[dict[str, Any]]:
        """The benchmarks of `suite` whose test function is `test` (parametrized ids included)."""
        return [b for b in self.suites.get(suite, []) if b["name"].split("[")[0] == test]

    def section(self, name: str) -> dict[str, Any]:
        return self.meta.get("sections", {}).get(name, {})


def load_results(results: Path, meta: dict[str, Any]) -> Results:
    """The results in folder `results`; the versions a suite recorded of a peer in its own environment
    (onnxruntime-genai, in the engine suite's extra_info) join report.json's."""
    suites = {}
    for path in sorted(results.glob("*.json")):
        if path.stem in ("report", "capacity"):
            continue
        data = json.loads(path.read_text())
        suites[path.stem] = data.get("benchmarks", [])
    meta = dict(meta, versions=dict(meta.get("versions", {})))
    for bench in suites.get("engine", [])[:1]:
        for name, found in bench["extra_info"].get("versions", {}).items():
            meta["versions"].setdefault(name, found)
    capacity = results / "capacity.json"
    return Results(meta, suites, json.loads(capacity.read_text()) if capacity.is_file() else None)


# ---- formatting --------------------------------------------------------------------------------------
def clean(text: str) -> str:
    """`text` with this checkout's absolute path made relative (a reason quoted from a log may name it)."""
    return text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats keep 3 significant digits (2 decimals below 100), None reads "-"."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def load_range(samples: Sequence[float]) -> str:
    return "not sampled" if not samples else f"{min(samples):.1f}-{max(samples):.1f}"


def machine_line(meta: dict[str, Any]) -> str:
    m = meta.get("machine", {})
    memory = f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores{memory}, {m.get('system', '')}"


def versions_line(meta: dict[str, Any], names: Sequence[str], extra: dict[str, str] | None = None) -> str:
    found = {**meta.get("versions", {}), **(extra or {})}
    parts = [f"Python {found.get('python', '?')}", f"kvarray {found.get('kvarray', '?')}"]
    parts += [f"{n} {found[n]}" for n in dict.fromkeys(names) if n in found]
    return ", ".join(parts)


# ---- sections ----------------------------------------------------------------------------------------
@dataclass
class Figure:
    """A PNG of the report: its file name under img/, a title and what draws it."""

    name: str
    title: str
    draw: Draw
    xlabel: str = ""
    ylabel: str = ""


@dataclass
class Section:
    """A section of the page: the suite it reports (`name`, a key of report.json's sections), its title,
    Markdown paragraphs and figures. A section without paragraphs is reported as not measured, after
    `missing`, with the reason `not_measured` finds."""

    name: str
    title: str
    body: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    missing: str = "Not measured:"

    def add(self, text: str) -> None:
        self.body.append(text)


def provenance(results: Results, name: str, rounds: str, extra_versions: dict[str, str] | None = None) -> str:
    """The line under every table: machine, load while the suite ran, versions, command, rounds."""
    record = results.section(name)
    return (
        f"*Machine: {machine_line(results.meta)}; 1-minute load average "
        f"{load_range(record.get('load_1min', []))} while this ran. Versions: "
        f"{versions_line(results.meta, SECTION_VERSIONS.get(name, ()), extra_versions)}. Command: "
        f"`{record.get('command', '?')}` ({record.get('seconds', '?')} s). {rounds}*\n"
    )


def not_measured(results: Results, name: str) -> str:
    """Why section `name` has no figures: report.json's reason, else the suite's skips or log summary."""
    record = results.section(name)
    if "not_measured" in record:
        return str(record["not_measured"])
    if not record:
        return "this section was not run (python -m benchmarks.report --only ...)"
    if record.get("skipped"):
        return "; ".join(dict.fromkeys(record["skipped"]))
    why = record.get("summary") or "the suite wrote no results"
    return f"{why} (exit code {record.get('returncode')}; its log is {name}.log beside the results)"


def failures(results: Results, name: str) -> str:
    failed = results.section(name).get("failed", [])
    return (
        f"**Failed in this run:** {', '.join(f'`{f}`' for f in failed)} (see {name}.log).\n" if failed else ""
    )


def page(results: Results, sections: Sequence[Section], headline: str, plots: str) -> str:
    """The Markdown page: what was run where, the `headline` table, then every section."""
    m = results.meta
    minutes = sum(r.get("seconds", 0) for r in m.get("sections", {}).values()) / 60
    gpu = (
        "GPU figures: measured below"
        if m.get("gpu") == "usable"
        else f"GPU figures not measured: no CUDA device ({m.get('gpu')})"
    )
    quick = (
        "\n\n**Quick mode**: few rounds and small sizes, a smoke run; not the run of record."
        if m.get("quick")
        else ""
    )
    lines = [
        "# Benchmarks\n",
        "<!-- Written by `python -m benchmarks.report` from benchmarks/results/; do not edit by hand. -->\n",
        f"Command: `{m.get('command', '?')}`, {m.get('date', '?')}, commit {m.get('commit', '?')}, "
        f"{minutes:.1f} min of measurements in all.{quick}\n",
        f"Machine: {machine_line(m)}; 1-minute load average {', '.join(map(str, m.get('load_before', [])))} "
        f"(1, 5, 15 min) before the run, {', '.join(map(str, m.get('load_after', [])))} after it; each "
        "section states the range sampled every 10 s while it ran. The cores may be shared with other "
        "work: compare the ratios, which come from the same run and the same process, rather than the "
        "absolute figures.\n",
        f"Versions: {versions_line(m, [n for names in SECTION_VERSIONS.values() for n in names])}.\n",
        f"{gpu}. {plots}\n",
        "Quality of int8 storage, windows and attention sinks (perplexity, StreamingLLM): "
        "[quality.md](quality.md).\n",
        "## Headline\n",
        headline,
    ]
    for s in sections:
        lines.append(f"## {s.title}\n")
        if not s.body:
            lines.append(f"{s.missing} {not_measured(results, s.name)}.\n")
            continue
        lines.append(failures(results, s.name))
        lines.extend(s.body)
        for f in s.figures:
            lines.append(f"\n![{f.title}](img/{f.name})\n")
    lines.append(
        '## Reproduce\n\n```\npip install -e ".[cpu,test,reference,bench]"\npython -m benchmarks.report'
        "            # builds models/bench-llama and .venv-genai on first use\n```\n"
        "Results: `benchmarks/results/*.json` (pytest-benchmark JSON per suite, `extra_info` holds the "
        "ratios), `capacity.json`, `report.json` (machine, versions, commands, load); logs `*.log`.\n"
    )
    return "\n".join(line for line in lines if line)


def draw_figures(results: Results, sections: Sequence[Section], img: Path) -> tuple[list[Path], str]:
    """Draw every section's figures into `img`; the paths written and a sentence for the page."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots not drawn: matplotlib is not installed (pip install kvarray[bench])."
    img.mkdir(parents=True, exist_ok=True)
    written = []
    for s in sections:
        record = results.section(s.name)
        footer = (
            f"{machine_line(results.meta)} | load {load_range(record.get('load_1min', []))} | "
            f"{versions_line(results.meta, SECTION_VERSIONS.get(s.name, ())[:3])} | "
            f"{record.get('command', '')}"
        )
        for f in s.figures:
            fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
            f.draw(ax)
            ax.set_title(f.title)
            ax.set_xlabel(f.xlabel)
            ax.set_ylabel(f.ylabel)
            ax.grid(alpha=0.3)
            fig.text(0.01, 0.01, footer, fontsize=5.5, color="0.35", wrap=True)
            fig.tight_layout(rect=(0, 0.05, 1, 1))
            path = img / f.name
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return (
        written,
        "Plots: matplotlib (Agg), one PNG per figure under img/, machine and command in each footer.",
    )

"""The documentation covers the public API, its links resolve, and the benchmark report's writers turn
pytest-benchmark JSON into the tables, "not measured" lines and plots they promise.

The report itself (``python -m benchmarks.report --quick``) takes minutes, so it is not run here: its
writers are tested on a small fake result set, and its own measurements (`benchmarks.capacity`) on small
sizes.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from kvarray import CausalCache, KVSpec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def gen_api(import_path: Callable[[str, Path], ModuleType]) -> ModuleType:
    return import_path("kvarray_docs_gen_api", DOCS / "gen_api.py")


@pytest.fixture(scope="module")
def bench(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The `benchmarks` package (the repository root on sys.path while this module runs)."""
    sys.path.insert(0, str(ROOT))
    try:
        import benchmarks.report

        yield benchmarks
    finally:
        sys.path.remove(str(ROOT))


# ---- the API reference -------------------------------------------------------------------------------
def test_api_md_is_what_gen_api_writes(gen_api: ModuleType) -> None:
    expected = gen_api.render(gen_api.entries())
    actual = (DOCS / "api.md").read_text()
    assert actual == expected, "docs/api.md is out of date: run python docs/gen_api.py"


def test_every_public_name_has_its_entry_in_api_md(gen_api: ModuleType) -> None:
    """Each name of every ``__all__`` (and of the extra modules) is documented at its home anchor, and
    each module that re-exports it links there."""
    api = (DOCS / "api.md").read_text()
    entries = gen_api.entries()
    home = gen_api.documented(entries)
    assert {e.module for e in entries} >= {"kvarray", "kvarray.ops", "kvarray.ort", "kvarray.export"}
    names = {e.name for e in entries}
    import kvarray

    assert set(kvarray.__all__) <= names
    missing = []
    for e in entries:
        where = home[gen_api.key(e.name, e.obj)]
        target = f'id="{gen_api.anchor(where.module, where.name)}"'
        if target not in api:
            missing.append(f"{e.module}.{e.name}")
        elif where is not e and f"(#{gen_api.anchor(where.module, where.name)})" not in api:
            missing.append(f"{e.module}.{e.name} (re-export link)")
    assert not missing, missing


def test_every_public_method_of_a_public_class_is_in_api_md(gen_api: ModuleType) -> None:
    api = (DOCS / "api.md").read_text()
    entries = gen_api.entries()
    home = gen_api.documented(entries)
    classes = {id(e.obj): e.obj for e in entries if isinstance(e.obj, type)}
    missing, checked = [], 0
    for cls in classes.values():
        for name, owner, _ in gen_api.members(cls):
            shown = owner.__name__ if id(owner) in home else cls.__name__
            checked += 1
            if f"`{shown}.{name}" not in api and f"`classmethod {shown}.{name}" not in api:
                missing.append(f"{cls.__name__}.{name}")
    assert checked > 100  # the caches, engines, views, runners...
    assert not missing, missing


def test_gen_api_renders_signatures_and_docstring_sections(gen_api: ModuleType) -> None:
    def f(x: int, kind: str = "a") -> None:
        """Do a thing.

        Args:
            x: ``[T]`` tokens,
                continued.
            kind: one of a, b.

        Returns nothing.
        """

    assert gen_api.signature(f) == "(x: int, kind: str = 'a') -> None"
    text = gen_api.markdown_doc(inspect.getdoc(f) or "")
    assert "**Args**\n\n- x: ``[T]`` tokens, continued.\n- kind: one of a, b.\n\nReturns nothing." in text


# ---- links and guides --------------------------------------------------------------------------------
def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_index_links_every_page() -> None:
    index = (DOCS / "index.md").read_text()
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert not {p for p in pages if f"({p}" not in index}, "docs/index.md does not link these pages"


GUIDES = ["guide_ort_native.md", "guide_ort_optimum.md", "guide_own_model.md"]


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_python_blocks_run_and_print_what_they_say(guide: str) -> None:
    """Every ```python block of a guide runs (in order, one namespace, from the repository root); each
    ``# prints: X`` comment is checked against what its block printed. A page's ``<!-- needs: M -->``
    modules must import (else the test skips); a block whose first line says it needs a CUDA device runs
    only where CuPy sees one, and is compiled (syntax-checked) elsewhere."""
    import contextlib
    import io
    import os

    from kvarray.xp import cupy_unavailable_reason

    text = (DOCS / guide).read_text()
    pytest.importorskip("onnxruntime", reason="the guides run ONNX Runtime (kvarray[cpu])")
    for module in re.findall(r"<!-- needs: (\w+) -->", text):
        pytest.importorskip(module, reason=f"{guide} needs {module}")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"{guide} has no python block"
    namespace: dict[str, Any] = {"__name__": "guide"}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for block in blocks:
            code = compile(block, guide, "exec")
            if "needs a CUDA device" in block.splitlines()[0] and cupy_unavailable_reason():
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
            for expected in re.findall(r"# prints: (.*)", block):
                assert expected.strip() in out.getvalue(), (expected, out.getvalue())
    finally:
        os.chdir(cwd)


# ---- the benchmark report's writers on fake results --------------------------------------------------
def bench_entry(name: str, extra: dict[str, Any], median: float = 0.01, rounds: int = 5) -> dict[str, Any]:
    return {"name": name, "extra_info": extra, "stats": {"median": median, "rounds": rounds, "min": median}}


def fake_results(folder: Path) -> dict[str, Any]:
    """A result set: two kernels, an engine run with genai unavailable, capacity; causal skipped, gpu
    without a device. Returns report.json's content."""
    kernels = [
        bench_entry(
            "test_gather_rows", dict(bytes=2**21, gbps_median=4.0, copyto_gbps_median=16.0, ratio_median=0.25)
        ),
        bench_entry("test_move_rows[direct]", dict(bytes=2**21, gbps=9.0, copyto_gbps=10.0, ratio=0.9)),
    ]
    versions = {"onnxruntime-genai": "9.9"}
    engine = [
        bench_entry(
            f"test_equal_batch[{n}]",
            dict(
                sequences=n,
                repeats=3,
                versions=versions,
                kvarray_tok_s=tps,
                optimum_tok_s=opt,
                optimum_agreeing_tokens=[10, 12],
                unavailable={"genai": f"RuntimeError: no venv at {ROOT}/.venv-genai"},
            ),
        )
        for n, tps, opt in ((1, 90.0, 60.0), (16, 300.0, 200.0))
    ]
    serving = dict(
        finish_all_s=60.0, tokens_per_s=150.0, ttft_median_s=2.0, ttft_p90_s=3.0, latency_median_s=30.0
    )
    engine.append(
        bench_entry(
            "test_serving",
            dict(
                workload=dict(requests=64, prompt=[16, 512], output=[16, 256], rate=4.0, seed=6),
                max_sequences=16,
                static_batch=16,
                kvarray=dict(serving, mode="continuous"),
                optimum=dict(serving, finish_all_s=120.0, mode="static 16"),
                speedup_over_optimum=2.0,
                **{"kvarray-pool": dict(serving, finish_all_s=66.0, mode="continuous, pool view")},
                **{"speedup_over_kvarray-pool": 1.1},
            ),
        )
    )
    variants = [
        bench_entry(
            "engine_variants[16]",
            {
                "sequences": 16,
                "new_tokens": 128,
                "repeats": 3,
                "kvarray-pool_tok_s": 200.0,
                "kvarray-pool_ratio_to_pool": 1.0,
                "kvarray-pool_agreeing_tokens": [2048, 2048],
                "kvarray-int8_tok_s": 180.0,
                "kvarray-int8_ratio_to_pool": 0.9,
                "kvarray-int8_agreeing_tokens": [2000, 2048],
            },
        )
    ]
    for name, benches in (("kernels", kernels), ("engine", engine), ("variants", variants)):
        (folder / f"{name}.json").write_text(json.dumps({"benchmarks": benches}))
    capacity = dict(
        memory_per_token=[dict(spec="s", storage="float16", bytes_per_token=4096, ratio_to_float16=1.0)],
        capacity=dict(
            budget_bytes=64 << 20,
            spec="s",
            workload=dict(prompt=320, shared=256, output=128),
            rows=[
                dict(storage=s, prefix_sharing=p, cells=100, requests=n, ratio_to_float16=n / 36)
                for s, p, n in (
                    ("float16", False, 36),
                    ("float16", True, 84),
                    ("int8", False, 68),
                    ("int8", True, 159),
                )
            ],
        ),
        churn={
            k: dict(n_kv=[64, 96], used=[40, 90], defrags=d, cells_moved=d * 10, mean_ratio=r)
            for k, d, r in (("no-defrag", 0, 1.17), ("defrag-0.1", 3, 1.02))
        },
    )
    (folder / "capacity.json").write_text(json.dumps(capacity))
    load = [0.5, 1.5]
    return dict(
        machine=dict(cpu="Test CPU", cores=2, memory_gib=8.0, system="Linux"),
        versions=dict(python="3.11", kvarray="0.1.0", numpy="2.0", onnxruntime="1.32"),
        commit="abc123",
        quick=False,
        command="python -m benchmarks.report",
        date="2026-01-01",
        seconds=600,
        load_before=[0.1, 0.2, 0.3],
        load_after=[1.0, 1.0, 1.0],
        gpu="CuPy is not importable",
        sections=dict(
            kernels=dict(command="python -m pytest benchmarks/test_kernels.py", seconds=40, load_1min=load),
            engine=dict(
                command="python -m pytest benchmarks/test_engine_bench.py", seconds=500, load_1min=load
            ),
            capacity=dict(command="python -m benchmarks.capacity", seconds=9, load_1min=load),
            causal=dict(
                command="python -m pytest benchmarks/test_causal_bench.py",
                returncode=0,
                skipped=["models/bench-llama is missing"],
                summary="1 skipped",
            ),
            graphs=dict(not_measured="the bench Llama could not be built"),
            gpu=dict(not_measured="no CUDA device (CuPy is not importable)"),
        ),
    )


def test_report_tables_ratios_and_not_measured_lines(bench: ModuleType, tmp_path: Path) -> None:
    meta = fake_results(tmp_path)
    written = bench.report.write_report(tmp_path, tmp_path / "out", meta)
    page = (tmp_path / "out" / "benchmarks.md").read_text()
    assert written[0] == tmp_path / "out" / "benchmarks.md"
    # engine: tok/s per system and the ratio from the same run (300 / 200 = 1.50 at 16 sequences)
    assert "| 16 | 300 | 200 | 1.50 |" in page
    assert "| 1 | 90.00 | 60.00 | 1.50 |" in page
    assert "- onnxruntime-genai: not measured: RuntimeError: no venv at .venv-genai" in page
    assert str(ROOT) not in page  # the checkout's path never reaches the report
    assert "Optimum ORT 10/12" in page
    # kernels: median keys preferred, best-round keys as the fallback of older results
    assert "| gather_rows | 2.00 | 4.00 | 16.00 | 0.25 |" in page
    assert "| move_rows[direct] | 2.00 | 9.00 | 10.00 | 0.90 |" in page
    # serving: the speedup recorded by the suite, and both systems' rows
    assert "| Optimum ORT | static 16 | 120 |" in page and "| 2.00 |" in page
    # sections without figures say why
    assert (
        "## Causal cache: decode step and defragmentation\n\nNot measured: models/bench-llama is missing."
        in page
    )
    assert "Not measured: the bench Llama could not be built." in page
    assert "GPU figures not measured: no CUDA device (CuPy is not importable)" in page
    assert "Not measured: this section was not run" in page  # encoder: no record at all
    # variants: int8 against the float32 pool view, and its agreement, from the same rounds
    assert "| 16 | 200 | 180 | 0.90 | 2000/2048 |" in page
    # serving: a peer the writer does not know by name still gets its row
    assert "| kvarray, pool view | continuous, pool view | 66.00 |" in page
    # provenance: machine, load while the suite ran, versions, command
    assert "Test CPU, 2 cores, 8.0 GiB" in page and "load average 0.5-1.5 while this ran" in page
    assert "`python -m pytest benchmarks/test_kernels.py` (40 s)" in page
    assert "onnxruntime-genai 9.9" in page
    headline = bench.report.headline_markdown(bench.report_writer.load_results(tmp_path, meta))
    assert (
        "| engine tokens/s, 16 sequences | 300 tok/s | Optimum ORT 200 tok/s (kvarray 1.50 x) |" in headline
    )
    assert (
        "| serving 64 requests: time to finish all | 60.0 s | Optimum ORT 120.0 s (2.00 x kvarray's)"
        in headline
    )
    assert "| onnxruntime-genai | not measured | RuntimeError: no venv at .venv-genai |" in headline
    assert "int8 68, float16 + prefix sharing 84, int8 + sharing 159" in headline
    assert "kvarray, int8 pool view 180 tok/s (0.90 x)" in headline


def test_report_plots_are_pngs_with_the_figures(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the bench extra)")
    meta = fake_results(tmp_path)
    written = bench.report.write_report(tmp_path, tmp_path / "out", meta)
    names = {p.name for p in written[1:]}
    assert names == {
        "kernels.png",
        "engine_tokens_per_s.png",
        "engine_variants.png",
        "serving.png",
        "capacity.png",
        "churn.png",
    }
    for path in written[1:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"(img/{path.name})" in written[0].read_text()


def test_report_without_matplotlib_says_so(bench: ModuleType, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    written = bench.report.write_report(tmp_path, tmp_path / "out", fake_results(tmp_path))
    assert len(written) == 1
    assert "Plots not drawn: matplotlib is not installed" in written[0].read_text()


def test_report_reads_pytest_logs_and_builds_commands(bench: ModuleType, tmp_path: Path) -> None:
    report = bench.report
    log = (
        "..s.F\n"
        "SKIPPED [1] benchmarks/test_engine_bench.py:262: models/bench-llama is missing: build it\n"
        "FAILED benchmarks/test_encoder_bench.py::test_staged_batch_bandwidth[audio-rotated] - assert\n"
        "=========== 1 failed, 3 passed, 1 skipped in 9.1s ===========\n"
    )
    found = report.outcome(log)
    assert found["skipped"] == ["models/bench-llama is missing: build it"]
    assert found["failed"] == ["benchmarks/test_encoder_bench.py::test_staged_batch_bandwidth[audio-rotated]"]
    assert found["summary"] == "1 failed, 3 passed, 1 skipped in 9.1s"
    suite = report.SUITES["encoder"]
    quick = report.suite_command(suite, tmp_path / "encoder.json", quick=True)
    assert quick[:4] == ["python", "-m", "pytest", "benchmarks/test_encoder_bench.py"]
    assert "--benchmark-enable" in quick and quick[quick.index("-k") + 1] == "not reversed"
    assert "-k" not in report.suite_command(suite, tmp_path / "encoder.json", quick=False)
    variants = report.suite_command(report.SUITES["variants"], tmp_path / "variants.json", quick=True)
    assert variants == [
        "python",
        "-m",
        "benchmarks.engine_variants",
        "--out",
        str(tmp_path / "variants.json"),
        "--quick",
    ]
    raw = tmp_path / "raw.json"
    long, short = bench_entry("a", {}, rounds=300), bench_entry("b", {}, rounds=5)
    long["stats"]["data"], short["stats"]["data"] = [0.1] * 300, [0.1] * 5
    raw.write_text(json.dumps({"machine_info": {"cpu": {"flags": ["avx"]}}, "benchmarks": [long, short]}))
    report.compact(raw)
    kept = json.loads(raw.read_text())
    assert kept["machine_info"]["cpu"] == {}
    assert kept["benchmarks"][0]["stats"]["median"] == 0.01 and isinstance(
        kept["benchmarks"][0]["stats"]["data"], str
    )
    assert kept["benchmarks"][1]["stats"]["data"] == [0.1] * 5
    readme = tmp_path / "README.md"
    begin, end = bench.report_writer.README_BEGIN, bench.report_writer.README_END
    readme.write_text(f"intro\n{begin}\nold table\n{end}\nafter\n")
    report.update_readme(readme, "| new |\n")
    assert readme.read_text() == f"intro\n{begin}\n| new |\n{end}\nafter\n"


def test_readme_headline_is_the_committed_reports(bench: ModuleType) -> None:
    """README's benchmark block is the headline of the committed run (docs/benchmarks.md's)."""
    readme = (ROOT / "README.md").read_text()
    begin, end = bench.report_writer.README_BEGIN, bench.report_writer.README_END
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    page = (DOCS / "benchmarks.md").read_text()
    headline = page.split("## Headline\n", 1)[1].split("\n## ", 1)[0].strip()
    assert block.strip().startswith(headline)


# ---- the report's own measurements ---------------------------------------------------------------------
SMALL = KVSpec(num_layers=1, num_kv_heads=1, head_dim=32, dtype="float16")


@pytest.mark.parametrize(("sharing", "expected"), [(False, 2000 // 448), (True, 1 + (2000 - 448) // 192)])
def test_requests_that_fit_count_cells(bench: ModuleType, sharing: bool, expected: int) -> None:
    """448 cells a request; with sharing, each request after the first allocates 448 - 256 = 192."""
    from benchmarks.capacity import Requests, requests_that_fit

    assert requests_that_fit(2000, Requests(), sharing, SMALL) == expected


def test_memory_per_token_int8_is_0_53_of_float16(bench: ModuleType) -> None:
    from benchmarks.capacity import memory_per_token

    rows = {(r["spec"], r["storage"]): r for r in memory_per_token()}
    bench_int8 = rows[("bench Llama (8 x 2 x 64)", "int8")]
    # 8 layers x (keys + values) x (128 int8 + 4 float16 scales x 2 B) = 2176
    assert bench_int8["bytes_per_token"] == 2176 and bench_int8["ratio_to_float16"] == pytest.approx(17 / 32)


def test_churn_series_is_the_causal_suites_churn(
    bench: ModuleType, import_path: Callable[[str, Path], ModuleType]
) -> None:
    """The timeline's mean is the mean that benchmarks/test_causal_bench.py records (same workload)."""
    from benchmarks.capacity import CHURN_CAPACITY, CHURN_SEQUENCES, CHURN_SPEC, churn_series

    causal = import_path("kvarray_causal_bench", ROOT / "benchmarks" / "test_causal_bench.py")
    for threshold in (None, 0.1):
        series = churn_series(threshold, steps=60)
        cache = CausalCache(CHURN_SPEC, CHURN_CAPACITY, CHURN_SEQUENCES, defrag_threshold=threshold, xp=np)
        assert series.mean_ratio == pytest.approx(causal.churn(cache, steps=60))
        assert len(series.n_kv) == 60 and all(
            n % 32 == 0 and n >= u for n, u in zip(series.n_kv, series.used, strict=True)
        )

"""The soak (benchmarks/soak.py) for one minute: the engine and the cache state machine under a random
workload with faults and hostile calls, checked as they run: no leaked cell, no mismatch against the
plain-Python model or an isolated run, no unexpected error. The long run is `python -m benchmarks.soak
--minutes 30`, by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_one_minute_soak_leaks_nothing_and_matches_its_models(tmp_path):
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "1", "--seed", "1", "--json", str(report)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert report.is_file(), done.stdout + done.stderr
    result = json.loads(report.read_text())
    engine, cache = result["parts"]["engine"], result["parts"]["cache"]
    problems = engine["examples"] + cache["examples"]
    for part in (engine, cache):
        assert (part["leaked_cells"], part["mismatches"], part["unexpected_errors"]) == (0, 0, 0), problems
    assert result["ok"] and done.returncode == 0, done.stdout + done.stderr
    # the checks ran: requests compared with isolated runs, faults injected, hostile calls refused
    assert engine["workload"]["compared with an isolated run"] >= 20
    assert engine["expected_errors"].get("InjectedFault (poisoned)", 0) >= 1
    assert engine["workload"]["passes failed (retried)"] >= 2
    assert engine["workload"]["drains to idle"] >= 4
    assert cache["operations"] >= 1000 and cache["workload"]["drains"] >= 4
    assert sum(cache["expected_errors"].values()) >= 100
    assert "| leaked cells | 0 | 0 |" in done.stdout

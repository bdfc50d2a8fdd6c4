"""Benchmark helpers: kernel bandwidth against ``numpy.copyto`` of the same bytes, measured in one run.

Bandwidth counts bytes read plus bytes written, for the kernel and for copyto alike (copyto of B bytes
moves 2 B). Each result lands in ``benchmark.extra_info`` (``gbps``, ``copyto_gbps``, ``ratio`` from the
best rounds; ``gbps_median``, ``copyto_gbps_median``, ``ratio_median`` from the median rounds, which the
report uses) and in a table printed at the end of the session. pytest-benchmark is off by default
(setup.cfg); run with ``python -m pytest benchmarks/test_kernels.py --benchmark-enable -q``.

``KVARRAY_BENCH_QUICK=1`` (the report's ``--quick``) moves 16 MiB instead of 64 MiB in 3 rounds instead
of 5: a smoke run, whose buffers may sit in the CPU's caches.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

QUICK = os.environ.get("KVARRAY_BENCH_QUICK", "") not in ("", "0")
#: Bytes of rows each kernel benchmark moves: 64 MiB of 2 KiB rows (16 MiB in quick mode).
ROWS_BYTES = (16 if QUICK else 64) << 20
ROW_BYTES = 2048
ROUNDS = 3 if QUICK else 5

_RESULTS: list[tuple[str, float, float, float]] = []


def copyto_seconds(nbytes: int, rounds: int = ROUNDS) -> list[float]:
    """Seconds of `rounds` calls of ``numpy.copyto`` between two buffers of `nbytes` bytes (after one)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return [_timed(lambda: np.copyto(dst, src)) for _ in range(rounds)]


def copyto_gbps(nbytes: int, rounds: int = ROUNDS) -> float:
    """Best bandwidth of ``numpy.copyto`` between two buffers of `nbytes` bytes (read + write counted)."""
    return 2 * nbytes / min(copyto_seconds(nbytes, rounds)) / 1e9


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@pytest.fixture
def bandwidth(benchmark: Any, request: pytest.FixtureRequest) -> Callable[[Callable[[], Any], int], None]:
    """``bandwidth(call, nbytes)``: benchmark `call` (moving `nbytes` read + written) against copyto."""

    def measure(call: Callable[[], Any], nbytes: int) -> None:
        call()  # compile (or load from the cache) and touch every page before timing
        copies = copyto_seconds(ROWS_BYTES)  # before and after the kernel's rounds, in the same minutes
        benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        if benchmark.disabled:
            return
        copies += copyto_seconds(ROWS_BYTES)
        gbps = nbytes / benchmark.stats.stats.min / 1e9
        reference = 2 * ROWS_BYTES / min(copies) / 1e9
        gbps_median = nbytes / benchmark.stats.stats.median / 1e9
        reference_median = 2 * ROWS_BYTES / statistics.median(copies) / 1e9
        benchmark.extra_info.update(
            {
                "gbps": round(gbps, 2),
                "copyto_gbps": round(reference, 2),
                "ratio": round(gbps / reference, 2),
                "gbps_median": round(gbps_median, 2),
                "copyto_gbps_median": round(reference_median, 2),
                "ratio_median": round(gbps_median / reference_median, 2),
                "bytes": nbytes,
            }
        )
        _RESULTS.append((request.node.name, gbps, reference, gbps / reference))

    return measure


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    terminalreporter.write_sep("-", "kernel bandwidth (read + write) against numpy.copyto of the same bytes")
    terminalreporter.write_line(f"{'benchmark':44} {'GB/s':>7} {'copyto':>7} {'ratio':>6}")
    for name, gbps, reference, ratio in _RESULTS:
        terminalreporter.write_line(f"{name:44} {gbps:7.2f} {reference:7.2f} {ratio:6.2f}")


@pytest.fixture(scope="session")
def print_table(request: pytest.FixtureRequest) -> Callable[[str, list[tuple[str, str]], int], None]:
    """``print_table(title, rows, width)``: write ``(name, line)`` rows under `title` to the terminal, even
    from a fixture's teardown (whose output pytest captures unless capturing is suspended)."""

    def write(title: str, rows: list[tuple[str, str]], width: int) -> None:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if not rows or reporter is None:
            return
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line("")
            reporter.write_sep("-", title)
            for name, line in rows:
                reporter.write_line(f"{name:{width}} {line}")

    return write

"""Benchmark helpers: kernel bandwidth against ``numpy.copyto`` of the same bytes, measured in one run.

Bandwidth counts bytes read plus bytes written, for the kernel and for copyto alike (copyto of B bytes
moves 2 B). Each result lands in ``benchmark.extra_info`` (``gbps``, ``copyto_gbps``, ``ratio``) and in a
table printed at the end of the session. pytest-benchmark is off by default (setup.cfg); run with
``python -m pytest benchmarks/test_kernels.py --benchmark-enable -q``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

#: Bytes of rows each kernel benchmark moves: 64 MiB of 2 KiB rows.
ROWS_BYTES = 64 << 20
ROW_BYTES = 2048

_RESULTS: list[tuple[str, float, float, float]] = []


def copyto_gbps(nbytes: int, rounds: int = 5) -> float:
    """Best bandwidth of ``numpy.copyto`` between two buffers of `nbytes` bytes (read + write counted)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(rounds))
    return 2 * nbytes / best / 1e9


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@pytest.fixture
def bandwidth(benchmark: Any, request: pytest.FixtureRequest) -> Callable[[Callable[[], Any], int], None]:
    """``bandwidth(call, nbytes)``: benchmark `call` (moving `nbytes` read + written) against copyto."""

    def measure(call: Callable[[], Any], nbytes: int) -> None:
        call()  # compile (or load from the cache) and touch every page before timing
        reference = copyto_gbps(ROWS_BYTES)
        benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
        if benchmark.disabled:
            return
        gbps = nbytes / benchmark.stats.stats.min / 1e9
        reference = max(reference, copyto_gbps(ROWS_BYTES))
        benchmark.extra_info.update(
            {
                "gbps": round(gbps, 2),
                "copyto_gbps": round(reference, 2),
                "ratio": round(gbps / reference, 2),
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

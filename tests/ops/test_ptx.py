"""Every CUDA kernel compiled to PTX for sm_80 and sm_90 and assembled with ``ptxas -v``: no spills, and
registers within `REGISTER_BUDGET`. Needs no GPU (NVVM and ptxas come with numba-cuda's cu12 extra); runs
in its own pytest process because the CUDA simulator must be off: ``pytest -m ptx tests/ops/test_ptx.py``.

The register table is printed at the end of the session (``-s`` or the terminal summary) and recorded in
docs/cuda.md.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.ptx

#: Registers per thread a kernel may use: 64 keeps 4 blocks of 256 threads resident per SM (65536 registers).
REGISTER_BUDGET = 64
ARCHES = {(8, 0): "sm_80", (9, 0): "sm_90"}
_USAGE = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")

#: (kernel, signature, arch) -> registers, collected for the summary table.
REGISTERS: dict[tuple[str, str, str], int] = {}


def _ptxas() -> str:
    try:
        from cuda import pathfinder
    except ImportError:
        pytest.skip("cuda.pathfinder is not installed (pip install 'numba-cuda[cu12]')")
    path = pathfinder.find_nvidia_binary_utility("ptxas")
    if path is None:
        pytest.skip("ptxas was not found (pip install 'numba-cuda[cu12]' brings nvidia-cuda-nvcc)")
    return str(path)


def _cases() -> list:
    from kvarray.ops.cuda import kernel_specs

    return [
        pytest.param(spec, sig, cc, id=f"{spec.name}-{_short(sig)}-{ARCHES[cc]}")
        for spec in kernel_specs()
        for sig in spec.signatures
        for cc in ARCHES
    ]


def _short(signature: tuple) -> str:
    """A compact id of a signature: ``u32[2d],i64[1d],...``."""
    parts = []
    for arg in signature:
        dtype = getattr(arg, "dtype", arg)
        ndim = getattr(arg, "ndim", None)
        parts.append(f"{dtype}[{ndim}d]" if ndim else str(dtype))
    return ",".join(parts)


@pytest.mark.parametrize(("spec", "signature", "cc"), _cases())
def test_kernel_assembles_without_spills(spec, signature, cc, tmp_path: Path) -> None:
    from numba import cuda

    ptx, _ = cuda.compile_ptx(spec.py_func, signature, cc=cc)
    source = tmp_path / f"{spec.name}.ptx"
    source.write_text(ptx)
    arch = ARCHES[cc]
    result = subprocess.run(
        [_ptxas(), "-v", "--gpu-name", arch, str(source), "-o", str(tmp_path / f"{spec.name}.cubin")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = result.stderr + result.stdout
    usage = _USAGE.search(report)
    spills = _SPILLS.search(report)
    assert usage and spills, report
    registers = int(usage.group(1))
    REGISTERS[(spec.name, _short(signature), arch)] = registers
    assert (int(spills.group(1)), int(spills.group(2))) == (0, 0), f"{spec.name} spills on {arch}: {report}"
    assert registers <= REGISTER_BUDGET, (
        f"{spec.name} uses {registers} registers on {arch}, budget {REGISTER_BUDGET}"
    )


def test_float16_conversion_rounds_to_nearest() -> None:
    """Float32 -> float16 stores compile to ``cvt.rn.f16.f32`` (NumPy's astype rounding), the int8 rule's
    division to IEEE ``div.rn.f32``, and its rounding to ``cvt.rni`` (half to even)."""
    from numba import cuda

    from kvarray.ops.cuda import kernel_specs

    specs = {spec.name: spec for spec in kernel_specs()}
    quantize = specs["quantize_g32"]
    ptx, _ = cuda.compile_ptx(quantize.py_func, quantize.signatures[3], cc=(8, 0))  # float32 rows, no mapping
    assert "cvt.rn.f16.f32" in ptx
    assert "div.rn.f32" in ptx
    assert "cvt.rni." in ptx
    copy = specs["copy_rows"]
    f32_to_f16 = next(
        s for s in copy.signatures if str(s[0].dtype) == "float16" and str(s[2].dtype) == "float32"
    )
    ptx, _ = cuda.compile_ptx(copy.py_func, f32_to_f16, cc=(8, 0))
    assert "cvt.rn.f16.f32" in ptx


def pytest_terminal_summary_table() -> str:
    """The register table as Markdown: one row per kernel and signature, one column per architecture."""
    rows = sorted({(name, sig) for name, sig, _ in REGISTERS})
    lines = [
        "| kernel | signature | " + " | ".join(ARCHES.values()) + " |",
        "|---|---|" + "---:|" * len(ARCHES),
    ]
    for name, sig in rows:
        cells = [str(REGISTERS.get((name, sig, arch), "")) for arch in ARCHES.values()]
        lines.append(f"| {name} | {sig} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_print_register_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this file: prints the collected table (shown with ``-s`` or ``-rP``)."""
    if not REGISTERS:
        pytest.skip("no kernel was assembled in this session")
    with capsys.disabled():
        print(f"\nregisters per thread (ptxas -v, budget {REGISTER_BUDGET}, 0 bytes spilled):")
        print(pytest_terminal_summary_table())

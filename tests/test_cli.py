"""The `kvarray` command: `info` reports the backend, devices, compiled kernels and versions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvarray.cli import main


def test_info_reports_backend_kernels_and_versions(capsys, monkeypatch):
    monkeypatch.delenv("KVARRAY_BACKEND", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "default backend: numpy" in out or "default backend: cupy" in out
    assert "cuda backend: " in out
    assert "cpu kernels ready in" in out
    for kernel in (
        "scatter_rows",
        "gather_rows",
        "move_rows",
        "quantize_int8",
        "dequantize_int8",
        "rope_shift",
    ):
        assert kernel in out
    assert "onnx " in out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_console_script_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "kvarray.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "info" in done.stdout and "export" in done.stdout

"""The `kvarray` command: `info` reports the backend, devices, compiled kernels and versions; `export
--view` writes the graph of each view, and refuses the decode view for T5 and Whisper in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from kvarray.cli import build_parser, main
from kvarray.ort.names import DECODE_NAMES, match_convention

MODELS = Path(__file__).resolve().parents[1] / "models"


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


def test_export_writes_the_decode_view_graph_of_a_llama(tmp_path, capsys):
    argv = ["export", str(MODELS / "tiny-llama-random" / "checkpoint"), str(tmp_path), "--arch", "llama"]
    assert main([*argv, "--view", "decode"]) == 0
    graph = tmp_path / "decoder_step.decode.float32.onnx"
    assert capsys.readouterr().out == f"{graph}\n"
    model = onnx.load(str(graph), load_external_data=False)
    match = match_convention([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    assert (match.convention, match.num_layers) == (DECODE_NAMES, 2)


# (arch, --kv-dtype, the one line on stderr): nothing is written
DECODE_REFUSED = [
    ("t5", "float32", "kvarray export: UnsupportedModel: the decode view (GroupQueryAttention) is exported "
     "for Llama only"),
    ("whisper", "float32", "kvarray export: UnsupportedModel: the decode view (GroupQueryAttention) is "
     "exported for Llama only"),
    ("llama", "int8", "kvarray export: DTypeMismatch: the decode view reads the gathered view in float32"),
]  # fmt: skip


@pytest.mark.parametrize(
    "arch, kv_dtype, line", DECODE_REFUSED, ids=[f"{c[0]}-{c[1]}" for c in DECODE_REFUSED]
)
def test_export_refuses_a_decode_view_it_cannot_build_in_one_line(tmp_path, capsys, arch, kv_dtype, line):
    checkpoint = MODELS / f"tiny-{arch}-random" / "checkpoint"
    argv = ["export", str(checkpoint), str(tmp_path / "out"), "--arch", arch, "--kv-dtype", kv_dtype]
    assert main([*argv, "--view", "decode"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(line)
    assert not list(tmp_path.rglob("*.onnx"))


def test_export_and_generate_take_their_views():
    parser = build_parser()
    for view in ("pool", "gathered", "decode"):
        assert parser.parse_args(["export", "ckpt", "out", "--arch", "llama", "--view", view]).view == view
    assert parser.parse_args(["generate", "model"]).view == "auto"
    for view in ("pool", "gathered", "auto"):
        assert parser.parse_args(["generate", "model", "--view", view]).view == view
    with pytest.raises(SystemExit) as exit_info:  # the decode graph runs only as the pool graph's twin
        parser.parse_args(["generate", "model", "--view", "decode"])
    assert exit_info.value.code == 2

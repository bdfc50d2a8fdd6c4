"""Hostile command lines for `kvarray`: each ends with a non-zero exit status and exactly one line on
stderr, ``kvarray COMMAND: ErrorName: what was expected`` (or argparse's one-line usage error), and no
traceback."""

# ruff: noqa: E501 - table rows stay one per line

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers (no conftest here)

from engine_helpers import ROOT, TINY, copy_model  # noqa: E402

from kvarray.cli import main  # noqa: E402

MODEL = str(TINY)
FAST = ["--max-new-tokens", "2", "--threads", "1", "--quiet"]


def gen(*args: str) -> list[str]:
    return ["generate", MODEL, *args]


# each: tmp folder -> argv
def batch_file_of(data: bytes):
    def argv(tmp: Path) -> list[str]:
        path = tmp / "prompts.txt"
        path.write_bytes(data)
        return gen("--batch-file", str(path), *FAST)

    return argv


def damaged_model(damage):
    def argv(tmp: Path) -> list[str]:
        folder = copy_model(tmp)
        damage(folder)
        return ["generate", str(folder), "--prompt", "hi", *FAST]

    return argv


def cut(relative: str, keep: float):
    def damage(folder: Path) -> None:
        path = folder / relative
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return damage


def checkpoint_copy(damage):
    def argv(tmp: Path) -> list[str]:
        folder = copy_model(tmp) / "checkpoint"
        damage(folder)
        return ["export", str(folder), str(tmp / "out"), "--arch", "llama"]

    return argv


def out_is_a_file(tmp: Path) -> list[str]:
    (tmp / "out").write_text("a file")
    return ["export", str(TINY / "checkpoint"), str(tmp / "out"), "--arch", "llama"]


CASES = [
    ("batch file not UTF-8", batch_file_of(b"good line\nbad \xff\xfe line\n"), 1, r"InvalidUTF8: batch file .* byte 0xff at line 2, column 5"),
    ("batch file of random bytes", batch_file_of(np.random.default_rng(0).bytes(400)), 1, "InvalidUTF8"),
    ("batch file missing", lambda t: gen("--batch-file", str(t / "none.txt"), *FAST), 1, "FileNotFoundError: .*No such file"),
    ("batch file is a folder", lambda t: gen("--batch-file", str(t), *FAST), 1, "IsADirectoryError"),
    ("prompt with a lone surrogate", lambda t: gen("--prompt", "ok", "--prompt", "x\udcff", *FAST), 1, r"InvalidUTF8: --prompt 2 is not valid UTF-8: lone surrogate U\+DCFF"),
    ("NaN temperature", lambda t: gen("--prompt", "hi", "--temperature", "nan", *FAST), 1, "ConfigError: temperature must be a finite number"),
    ("inf temperature", lambda t: gen("--prompt", "hi", "--temperature", "inf", *FAST), 1, "ConfigError: temperature"),
    ("NaN top-p", lambda t: gen("--prompt", "hi", "--top-p", "nan", *FAST), 1, r"ConfigError: top_p must be a number in \(0, 1\]"),
    ("top-p 2", lambda t: gen("--prompt", "hi", "--top-p", "2", *FAST), 1, "ConfigError: top_p"),
    ("negative max-new-tokens", lambda t: gen("--prompt", "hi", "--max-new-tokens", "-3"), 1, "ConfigError: max_new_tokens must be an int >= 1, got -3"),
    ("zero max-new-tokens", lambda t: gen("--prompt", "hi", "--max-new-tokens", "0"), 1, "max_new_tokens"),
    ("negative top-k", lambda t: gen("--prompt", "hi", "--top-k", "-1", *FAST), 1, "ConfigError: top_k"),
    ("negative seed", lambda t: gen("--prompt", "hi", "--seed", "-1", *FAST), 1, "ConfigError: seed"),
    ("negative threads", lambda t: gen("--prompt", "hi", "--threads", "-2"), 1, "ConfigError: threads must be an int >= 0"),
    ("zero capacity", lambda t: gen("--prompt", "hi", "--capacity", "0", *FAST), 1, "ConfigError: capacity"),
    ("zero sequences", lambda t: gen("--prompt", "hi", "--max-sequences", "0", *FAST), 1, "ConfigError"),
    ("zero prefill chunk", lambda t: gen("--prompt", "hi", "--prefill-chunk", "0", *FAST), 1, "ConfigError: prefill_chunk"),
    ("zero window", lambda t: gen("--prompt", "hi", "--window", "0", *FAST), 1, "ConfigError: window"),
    ("sinks without window", lambda t: gen("--prompt", "hi", "--sinks", "3", *FAST), 1, "ConfigError: sinks"),
    ("prompt over the context", lambda t: gen("--prompt", "x" * 300, *FAST), 1, "PromptTooLong: prompt of 300 tokens"),
    ("max-new-tokens not a number", lambda t: gen("--prompt", "hi", "--max-new-tokens", "abc"), 2, "kvarray generate: error: argument --max-new-tokens: invalid int value: 'abc'"),
    ("unknown kv dtype", lambda t: gen("--prompt", "hi", "--kv-dtype", "int4"), 2, "invalid choice: 'int4'"),
    ("no prompt", lambda t: gen(), 2, "give --prompt TEXT or --batch-file FILE"),
    ("no model folder", lambda t: ["generate", str(t / "nowhere"), "--prompt", "hi"], 1, "UnsupportedModel: .* not found"),
    ("graph cut at half", damaged_model(cut("native/decoder_step.pool.float32.onnx", 0.5)), 1, "ModelFileError: .* cannot be loaded as an ONNX graph"),
    ("empty graph", damaged_model(cut("native/decoder_step.pool.float32.onnx", 0.0)), 1, "ModelFileError: .* is empty"),
    ("tokenizer cut at half", damaged_model(cut("checkpoint/tokenizer.json", 0.5)), 1, "TokenizerError: .* not a JSON tokenizer file"),
    ("config.json cut at half", damaged_model(cut("checkpoint/config.json", 0.5)), 1, "ModelFileError: .*config.json is not valid JSON"),
    ("export: no checkpoint", lambda t: ["export", str(t / "nowhere"), str(t / "out"), "--arch", "llama"], 1, "MissingModelFile: no checkpoint folder"),
    ("export: config cut", checkpoint_copy(cut("config.json", 0.5)), 1, "ModelFileError: .*not valid JSON"),
    ("export: weights cut at half", checkpoint_copy(cut("model.safetensors", 0.5)), 1, r"ModelFileError: .*model.safetensors: .*\(truncated\?\)"),
    ("export: empty weights", checkpoint_copy(cut("model.safetensors", 0.0)), 1, "ModelFileError: .*shorter than its header"),
    ("export: a T5 checkpoint as llama", lambda t: ["export", str(TINY.parent / "tiny-t5-random" / "checkpoint"), str(t / "o"), "--arch", "llama"], 1, "UnsupportedModel: .*model_type 't5'"),
    ("export: out is a file", out_is_a_file, 1, "FileExistsError"),
    ("export: unknown arch", lambda t: ["export", "a", "b", "--arch", "gpt2"], 2, "invalid choice: 'gpt2'"),
    ("transcribe: no audio file", lambda t: ["transcribe", str(TINY.parent / "tiny-whisper-random"), str(t / "none.wav")], 1, "FileNotFoundError"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_hostile_command_lines_36_cases(tmp_path, capsys, case):
    assert len(CASES) == 36
    _, argv, status, message = case
    args = argv(tmp_path)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == status, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kvarray {args[0]}: "), lines[0]
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]


def _run(*argv: str | bytes, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kvarray.cli", *argv], capture_output=True, cwd=tmp, env=env, timeout=120
    )


def test_a_command_line_argument_that_is_not_utf8_is_one_line_in_a_real_process(tmp_path):
    done = _run("generate", MODEL, "--prompt", b"caf\xe9", *FAST, tmp=tmp_path)  # Latin-1 bytes
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "kvarray generate: InvalidUTF8: --prompt 1 is not valid UTF-8: lone surrogate U+DCE9 at character 3 "
        "(undecodable byte 0xe9 when it came from the command line or a file name)"
    ]


def test_a_damaged_checkpoint_is_one_line_in_a_real_process(tmp_path):
    folder = copy_model(tmp_path) / "checkpoint"
    (folder / "model.safetensors").write_bytes(b"\x00" * 3)
    done = _run("export", str(folder), str(tmp_path / "out"), "--arch", "llama", tmp=tmp_path)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "ModelFileError" in err and "model.safetensors" in err


def test_a_failed_request_is_reported_and_the_others_printed(tmp_path, capsys, monkeypatch):
    from kvarray.ort.engine import EngineCore

    real = EngineCore._pass

    def failing(self, batch):  # the second prompt's passes fail
        if any(req.id == 1 for req, _ in batch.fed):
            raise RuntimeError("injected")
        return real(self, batch)

    monkeypatch.setattr(EngineCore, "_pass", failing)
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\nsecond\nthird\n")
    assert main(gen("--batch-file", str(prompts), *FAST)) == 1
    captured = capsys.readouterr()
    assert "[0] first" in captured.out and "[2] third" in captured.out and "[1]" not in captured.out
    assert "kvarray generate: request 1 failed: RuntimeError: injected" in captured.err
    assert "3 requests, 4 tokens generated" in captured.err  # the summary still follows

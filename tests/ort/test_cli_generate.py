"""`kvarray generate` on the trained tiny Llama, through kvarray.cli.main."""

from __future__ import annotations

import json

from ort_models import TRAINED

from kvarray.cli import main


def test_generate_streams_the_greedy_text_and_prints_a_summary(capsys):
    sample = json.loads((TRAINED / "metrics.json").read_text())["greedy_sample"]
    argv = [
        "generate",
        str(TRAINED),
        "--prompt",
        sample["prompt"],
        "--max-new-tokens",
        "40",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == sample["prompt"] + sample["continuation"][:40] + "\n"
    for part in (
        "1 requests, 40 tokens generated",
        "tok/s",
        "prefill tokens 18",
        "decode tokens 39",
        "peak cells",
        "fragmentation",
        "B/token",
    ):
        assert part in captured.err


def test_generate_a_batch_file_with_int8_and_a_window(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The with statement\n\nA function definition\nThe import system\n")
    argv = [
        "generate",
        str(TRAINED),
        "--batch-file",
        str(prompts),
        "--max-new-tokens",
        "12",
        "--kv-dtype",
        "int8",
        "--window",
        "32",
        "--sinks",
        "4",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--seed",
        "1",
        "--quiet",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    for k, prompt in enumerate(["The with statement", "A function definition", "The import system"]):
        assert f"[{k}] {prompt}" in captured.out  # generated text may hold newlines
    assert "3 requests, 36 tokens generated" in captured.err and "cache: int8" in captured.err


def test_generate_reports_errors(capsys):
    assert main(["generate", str(TRAINED)]) == 2
    assert main(["generate", str(TRAINED), "--prompt", "x" * 1100]) == 1
    assert "PromptTooLong" in capsys.readouterr().err

"""`kvarray generate` on the trained tiny Llama, through kvarray.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def views_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny Llama's folder (links to its checkpoint and pool graphs) plus its gathered- and
    decode-view graphs, exported with `kvarray export --view`."""
    root = tmp_path_factory.mktemp("tiny-llama-views")
    (root / "checkpoint").symlink_to(TRAINED / "checkpoint")
    (root / "native").mkdir()
    for graph in (TRAINED / "native").glob("decoder_step.pool.*.onnx"):
        (root / "native" / graph.name).symlink_to(graph)
    for view in ("gathered", "decode"):
        argv = ["export", str(root / "checkpoint"), str(root / "native"), "--arch", "llama", "--view", view]
        assert main(argv) == 0
    return root


# (--view, what the summary says of the passes: 18 prompt tokens in one pass, then 39 decode passes)
VIEWS = [
    ("pool", "graph: native (view pool), cache: float32"),
    ("gathered", "graph: native (view gathered), cache: float32"),
    ("auto", "graph: native (views pool 1, decode 39), cache: float32"),
]


@pytest.mark.parametrize("view, summary", VIEWS, ids=[v[0] for v in VIEWS])
def test_generate_gives_the_same_greedy_text_with_each_view(views_folder, capsys, view, summary):
    sample = json.loads((TRAINED / "metrics.json").read_text())["greedy_sample"]
    argv = ["generate", str(views_folder), "--prompt", sample["prompt"], "--max-new-tokens", "40"]
    assert main([*argv, "--threads", "1", "--view", view]) == 0
    captured = capsys.readouterr()
    assert captured.out == sample["prompt"] + sample["continuation"][:40] + "\n"
    assert summary in captured.err


def test_decode_bursts_give_the_same_text_in_the_same_passes(views_folder, capsys):
    """`--decode-burst 8`: the decode passes run in bursts of up to 8 a step, the same 39 of them."""
    sample = json.loads((TRAINED / "metrics.json").read_text())["greedy_sample"]
    argv = ["generate", str(views_folder), "--prompt", sample["prompt"], "--max-new-tokens", "40"]
    assert main([*argv, "--threads", "1", "--decode-burst", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == sample["prompt"] + sample["continuation"][:40] + "\n"
    assert VIEWS[2][1] in captured.err


def test_generate_with_a_view_the_folder_lacks_says_how_to_export_it(capsys):
    assert main(["generate", str(TRAINED), "--prompt", "x", "--view", "gathered", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("kvarray generate: UnsupportedModel: ")
    assert "decoder_step.gathered.float32.onnx not found" in err and "--view gathered" in err


@pytest.mark.parametrize("flags, spinning", [([], "1"), (["--no-spin"], "0")], ids=["spin", "no-spin"])
def test_no_spin_reaches_the_sessions(monkeypatch, capsys, flags, spinning):
    """`--no-spin` turns ONNX Runtime's spinning off on the engine's sessions; the text is the same."""
    from kvarray.ort import engine as engine_module

    seen = []
    opened = engine_module.open_session

    def recording(*args, **kwargs):
        session = opened(*args, **kwargs)
        seen.append(session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        return session

    monkeypatch.setattr(engine_module, "open_session", recording)
    sample = json.loads((TRAINED / "metrics.json").read_text())["greedy_sample"]
    argv = ["generate", str(TRAINED), "--prompt", sample["prompt"], "--max-new-tokens", "8", "--threads", "1"]
    assert main([*argv, *flags]) == 0
    assert capsys.readouterr().out == sample["prompt"] + sample["continuation"][:8] + "\n"
    assert seen and set(seen) == {spinning}

"""`kvarray generate`'s progress line (only on a terminal) and `--graph optimum`, through run_generate."""

from __future__ import annotations

import argparse
import io

from ort_models import NEW_TOKENS, TINY

from kvarray.ort.cli_generate import add_generate_arguments, run_generate
from kvarray.ort.tokenizer import load_tokenizer


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def generate(argv: list[str], err: io.StringIO) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    out = io.StringIO()
    status = run_generate(parser.parse_args(argv), out, err)
    return status, out.getvalue(), err.getvalue()


ARGS = [str(TINY), "--prompt", "The with statement", "--max-new-tokens", "40", "--threads", "1"]


def test_no_progress_when_stderr_is_not_a_terminal():
    """As with ``2>&1`` into a pipe: stderr holds the summary only, stdout the text and one newline."""
    status, out, err = generate(ARGS, io.StringIO())
    assert status == 0
    assert "tokens, step" not in err and "\r" not in err and "\r" not in out
    assert err.startswith("1 requests, 40 tokens generated")
    assert out.startswith("The with statement") and out.endswith("\n")


def test_progress_is_updated_in_place_on_a_terminal_and_cleared():
    status, out, err = generate(ARGS, Terminal())
    assert status == 0
    assert "\r16/40 tokens, step 16" in err and "\r32/40 tokens, step 32" in err
    assert "\r\033[K1 requests, 40 tokens generated" in err  # cleared before the summary
    assert "tokens, step" not in out


def test_graph_optimum_runs_the_optimum_export(expected, prompts):
    """The random tiny Llama's tokenizer is byte-level: its reference prompt 2 decodes to text."""
    tok = load_tokenizer(TINY / "checkpoint")
    prompt = tok.decode(prompts[2])
    assert tok.encode(prompt) == prompts[2]
    argv = [str(TINY), "--graph", "optimum", "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS)]
    status, out, err = generate(argv, io.StringIO())
    assert status == 0 and "graph: optimum" in err
    assert out == prompt + tok.decode(expected[2]) + "\n"

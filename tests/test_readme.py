"""The README's Python example runs and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_prints_its_commented_values():
    text = README.read_text()
    code = re.search(r"## Python in 20 lines\n```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    assert out.getvalue().splitlines() == ["[0 1 2 3]", "6"]


def test_readme_starts_with_the_two_fresh_machine_commands():
    lines = README.read_text().splitlines()
    assert lines[1].strip().endswith("# main job") and "kvarray generate models/tiny-llama" in lines[1]
    assert lines[2].strip().endswith("# tests") and "tests/run.sh" in lines[2]

"""Hostile inputs for the validated kernel wrappers of `kvarray.ops` (beyond tests/ops/test_wrappers.py):
unsigned, bool, float, 2-D, huge and repeated indices, overflowing runs, NaN and infinity into int8,
read-only and strided arrays, non-array arguments, host and device mixed. Each raises its named
`KVArrayError` before any write and leaves every array as it was. The host kernels are replaced by a
sentinel while these run, so an input the wrappers let through fails the test instead of reaching a
kernel (an out-of-range run would write outside the pools).

Cases the wrappers do not refuse yet are marked ``xfail(strict=True)`` with the exception they raise
today; fixing the wrapper turns them into failures that ask for the mark to go."""

# ruff: noqa: E501 - one case a line

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hostile_helpers (no conftest here)

from hostile_helpers import FakeDeviceArray  # noqa: E402

from kvarray import ops  # noqa: E402
from kvarray.errors import (  # noqa: E402
    DeviceMismatch,
    DTypeMismatch,
    IndexOutOfRange,
    KVArrayError,
    LayoutError,
    ShapeMismatch,
)
from kvarray.spec import RopeSpec  # noqa: E402

KERNELS = ("scatter_rows", "gather_rows", "move_rows", "quantize_int8", "dequantize_int8", "rope_shift", "kv_writer")


class KernelReached(AssertionError):
    """A hostile call got past the wrapper's checks to a host kernel."""


@pytest.fixture
def sentinel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace every host kernel by a function that raises `KernelReached`."""
    from kvarray.ops import cpu

    def reached(*args: Any, **kwargs: Any) -> None:
        raise KernelReached("a hostile call reached the kernel")

    for name in KERNELS:
        if hasattr(cpu, name):
            monkeypatch.setattr(cpu, name, reached)


def arrays() -> dict[str, np.ndarray]:
    """Valid arguments: float16 pool [6, 2, 32], int8 pool with groups of 32 and its scales, rows [2, 2, 32],
    cells [2], a gather output [2, 2, 3, 32], int8 rows [2, 64] with scales [2, 2]."""
    rng = np.random.default_rng(0)
    return {
        "pool": rng.standard_normal((6, 2, 32)).astype(np.float16),
        "qpool": rng.integers(-127, 128, (6, 2, 32)).astype(np.int8),
        "scales": rng.random((6, 2)).astype(np.float16),
        "rows": rng.standard_normal((2, 2, 32)).astype(np.float16),
        "cells": np.array([4, 1], np.int64),
        "out": np.zeros((2, 2, 3, 32), np.float16),
        "x": rng.standard_normal((2, 64)).astype(np.float32),
        "q": np.zeros((2, 64), np.int8),
        "qs": np.zeros((2, 2), np.float16),
    }


def read_only(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flags.writeable = False
    return x


def poisoned(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x.reshape(-1)[-1] = value
    return x


def indptr(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


Case = tuple[str, Callable[[dict[str, np.ndarray]], Any], type, str]

SCATTER: list[Case] = [
    ("scatter cells uint64", lambda a: ops.scatter_rows(a["pool"], a["rows"], a["cells"].astype(np.uint64)), DTypeMismatch, "cells must be int32 or int64, got uint64"),
    ("scatter cells bool", lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([True, False])), DTypeMismatch, "got bool"),
    ("scatter cells 2-D", lambda a: ops.scatter_rows(a["pool"], a["rows"], a["cells"][None]), ShapeMismatch, r"cells must be \[2\] \(rank 1\)"),
    ("scatter cells 2**62", lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([1, 2**62])), IndexOutOfRange, r"\[0, 6\)"),
    ("scatter cells int32 min", lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([1, -(2**31)], np.int32)), IndexOutOfRange, r"\[0, 6\)"),
    ("scatter duplicate token", lambda a: ops.scatter_rows(a["qpool"], a["rows"], np.array([3, 3]), a["scales"]), IndexOutOfRange, "distinct"),
    ("scatter rows float64", lambda a: ops.scatter_rows(a["pool"], a["rows"].astype(np.float64), a["cells"]), DTypeMismatch, "rows must be float16 or float32"),
    ("scatter rows rank 4", lambda a: ops.scatter_rows(a["pool"], a["rows"][None], a["cells"]), ShapeMismatch, r"\[tokens, kv_heads, head_dim\] \(rank 3\)"),
    ("scatter rows strided", lambda a: ops.scatter_rows(a["pool"], a["rows"][::-1], a["cells"]), LayoutError, "rows must be C-contiguous"),
    ("scatter pool read-only", lambda a: ops.scatter_rows(read_only(a["qpool"]), a["rows"], a["cells"], a["scales"]), LayoutError, "pool must be writable"),
    ("scatter scales read-only", lambda a: ops.scatter_rows(a["qpool"], a["rows"], a["cells"], read_only(a["scales"])), LayoutError, "scales must be writable"),
    ("scatter device rows", lambda a: ops.scatter_rows(a["pool"], FakeDeviceArray(a["rows"]), a["cells"]), DeviceMismatch, "host memory and a CUDA device"),
]
GATHER: list[Case] = [
    ("gather indptr uint64", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2).astype(np.uint64), a["cells"], a["out"]), DTypeMismatch, "indptr must be int32 or int64"),
    ("gather indptr from 1", lambda a: ops.gather_rows(a["pool"], indptr(1, 1, 2), a["cells"], a["out"]), IndexOutOfRange, "indptr must start at 0"),
    ("gather indptr 2-D", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2)[None], a["cells"], a["out"]), ShapeMismatch, r"indptr must be \[sequences \+ 1\]"),
    ("gather indices negative", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2), np.array([0, -1]), a["out"]), IndexOutOfRange, r"\[0, 6\)"),
    ("gather indices float", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2), np.array([0.0, 1.0]), a["out"]), DTypeMismatch, "indices must be int32 or int64"),
    ("gather indices short", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 3), a["cells"], a["out"]), ShapeMismatch, "indices must have 3 entries"),
    ("gather out read-only", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2), a["cells"], read_only(a["out"])), LayoutError, "out must be writable"),
    ("gather out strided", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2), a["cells"], np.zeros((2, 2, 6, 32), np.float16)[:, :, ::2]), LayoutError, "out must be C-contiguous"),
    ("gather out rank 3", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2), a["cells"], a["out"][0]), ShapeMismatch, "rank 4"),
    ("gather int8 into int8", lambda a: ops.gather_rows(a["qpool"], indptr(0, 1, 2), a["cells"], a["out"].astype(np.int8), a["scales"]), DTypeMismatch, "out must be float16 or float32"),
    ("gather device out", lambda a: ops.gather_rows(a["pool"], indptr(0, 1, 2), a["cells"], FakeDeviceArray(a["out"])), DeviceMismatch, "host memory and a CUDA device"),
]
MOVE: list[Case] = [
    ("move src uint64", lambda a: ops.move_rows([a["pool"]], np.array([0], np.uint64), np.array([1]), np.array([1])), DTypeMismatch, "src must be int32 or int64, got uint64"),
    ("move length bool", lambda a: ops.move_rows([a["pool"]], np.array([0]), np.array([1]), np.array([True])), DTypeMismatch, "length must be int32 or int64"),
    ("move dst 2-D", lambda a: ops.move_rows([a["pool"]], np.array([0]), np.array([[1]]), np.array([1])), ShapeMismatch, r"dst must be \[runs\]"),
    ("move dst past the end", lambda a: ops.move_rows([a["pool"]], np.array([0]), np.array([5]), np.array([2])), IndexOutOfRange, r"every dst run must lie in \[0, 6\)"),
    ("move src negative", lambda a: ops.move_rows([a["pool"]], np.array([-1]), np.array([3]), np.array([1])), IndexOutOfRange, r"every src run must lie in \[0, 6\)"),
    ("move length 2**62", lambda a: ops.move_rows([a["pool"]], np.array([0]), np.array([1]), np.array([2**62])), IndexOutOfRange, "must lie in"),
    ("move two runs into one row", lambda a: ops.move_rows([a["pool"]], np.array([0, 1]), np.array([4, 4]), np.array([1, 1])), IndexOutOfRange, "destination runs overlap"),
    ("move pools of different rows", lambda a: ops.move_rows([a["pool"], a["qs"]], np.array([0]), np.array([1]), np.array([1])), ShapeMismatch, r"pools\[1\] has 2 rows, pools\[0\] has 6"),
    ("move read-only pool", lambda a: ops.move_rows([read_only(a["pool"])], np.array([0]), np.array([1]), np.array([1])), LayoutError, "writable"),
    ("move device pools", lambda a: ops.move_rows([a["pool"], FakeDeviceArray(a["pool"].copy())], np.array([0]), np.array([1]), np.array([1])), DeviceMismatch, "host memory and a CUDA device"),
]
QUANT: list[Case] = [
    ("quantize x int", lambda a: ops.quantize_int8(a["x"].astype(np.int32), a["q"], a["qs"]), DTypeMismatch, "x must be float16 or float32"),
    ("quantize q read-only", lambda a: ops.quantize_int8(a["x"], read_only(a["q"]), a["qs"]), LayoutError, "q must be writable"),
    ("quantize scales float32", lambda a: ops.quantize_int8(a["x"], a["q"], a["qs"].astype(np.float32)), DTypeMismatch, "scales must be float16"),
    ("quantize scales rows", lambda a: ops.quantize_int8(a["x"], a["q"], a["qs"][:1]), ShapeMismatch, "scales of an int8 pool"),
    ("quantize rank 0", lambda a: ops.quantize_int8(np.float32(1), np.int8(1), a["qs"]), ShapeMismatch, "q must have a row axis first"),
    ("dequantize q float", lambda a: ops.dequantize_int8(a["x"], a["qs"], a["x"].copy()), DTypeMismatch, "q must be int8"),
    ("dequantize out strided", lambda a: ops.dequantize_int8(a["q"], a["qs"], np.zeros((2, 128), np.float32)[:, ::2]), LayoutError, "out must be C-contiguous"),
    ("dequantize out shape", lambda a: ops.dequantize_int8(a["q"], a["qs"], np.zeros((2, 32), np.float32)), ShapeMismatch, "one shape"),
]
ROPE: list[Case] = [
    ("rope deltas uint64", lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([1, 2], np.uint64), RopeSpec()), DTypeMismatch, "deltas must be int32 or int64, got uint64"),
    ("rope deltas bool", lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([True, True]), RopeSpec()), DTypeMismatch, "deltas must be int32 or int64"),
    ("rope duplicate cells", lambda a: ops.rope_shift(a["pool"], np.array([2, 2]), np.array([1, 1]), RopeSpec()), IndexOutOfRange, "distinct"),
    ("rope cells 2**40", lambda a: ops.rope_shift(a["pool"], np.array([2, 2**40]), np.array([1, 1]), RopeSpec()), IndexOutOfRange, r"\[0, 6\)"),
    ("rope int8 without scales", lambda a: ops.rope_shift(a["qpool"], a["cells"], np.array([1, 1]), RopeSpec()), DTypeMismatch, "needs its scales"),
    ("rope rotary_dim 0", lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([1, 1]), RopeSpec(rotary_dim=0)), ShapeMismatch, "rotary_dim must be even"),
    ("rope rotary_dim past head_dim", lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([1, 1]), RopeSpec(rotary_dim=64)), ShapeMismatch, r"\[2, head_dim=32\]"),
    ("rope pool read-only", lambda a: ops.rope_shift(read_only(a["pool"]), a["cells"], np.array([1, 1]), RopeSpec()), LayoutError, "writable"),
]
REFUSED = SCATTER + GATHER + MOVE + QUANT + ROPE

#: Inputs the wrappers once let through (NaN into int8, wrapping run ends, non-arrays): refused now too.
FORMER_GAPS: list[Case] = [
    ("scatter NaN into int8", lambda a: ops.scatter_rows(a["qpool"], poisoned(a["rows"], np.nan), a["cells"], a["scales"]), KVArrayError, "finite"),
    ("scatter inf into int8", lambda a: ops.scatter_rows(a["qpool"], poisoned(a["rows"], np.inf), a["cells"], a["scales"]), KVArrayError, "finite"),
    ("quantize NaN", lambda a: ops.quantize_int8(poisoned(a["x"], np.nan), a["q"], a["qs"]), KVArrayError, "finite"),
    ("move overflowing runs", lambda a: ops.move_rows([a["pool"]], np.array([2**62]), np.array([2**62]), np.array([2**62])), IndexOutOfRange, "must lie in"),
    ("move pools not a list", lambda a: ops.move_rows(a["pool"], np.array([0]), np.array([1]), np.array([1])), KVArrayError, "pools"),
    ("rope None", lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([1, 1]), None), KVArrayError, "RopeSpec"),
    ("scatter rows as a list", lambda a: ops.scatter_rows(a["pool"], a["rows"].tolist(), a["cells"]), KVArrayError, "rows"),
]
REFUSED += FORMER_GAPS


def refused(call: Callable[[dict[str, np.ndarray]], Any], error: type, match: str) -> None:
    """`call` on fresh arrays raises `error` matching `match` and changes no array."""
    a = arrays()
    before = {k: v.tobytes() for k, v in a.items()}
    with pytest.raises(error, match=match):
        call(a)
    assert {k: v.tobytes() for k, v in a.items()} == before, "a refused call changed an array"


@pytest.mark.parametrize("call, error, match", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_kernel_hostile_inputs_56_cases(sentinel: None, call: Callable, error: type, match: str) -> None:
    assert len(REFUSED) == 56 and len({c[0] for c in REFUSED}) == 56  # the battery's size, visible
    refused(call, error, match)


def test_empty_calls_are_valid_no_ops() -> None:
    """Zero rows, zero sequences and zero runs are accepted and change nothing (the kernels run)."""
    a = arrays()
    before = {k: v.tobytes() for k, v in a.items()}
    empty = np.empty(0, np.int64)
    ops.scatter_rows(a["pool"], a["rows"][:0], empty)
    ops.scatter_rows(a["qpool"], a["rows"][:0], empty, a["scales"])
    ops.gather_rows(a["pool"], indptr(0), empty, np.zeros((0, 2, 3, 32), np.float16))
    ops.move_rows([a["pool"], a["qpool"]], empty, empty, empty)
    ops.rope_shift(a["pool"], empty, empty, RopeSpec())
    ops.quantize_int8(a["x"][:0], a["q"][:0], a["qs"][:0])
    assert {k: v.tobytes() for k, v in a.items()} == before

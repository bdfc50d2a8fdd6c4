"""The public kernel wrappers of `kvarray.ops`: each refusal raises its named error, says what was expected,
and leaves every array exactly as it was; host arrays dispatch to `kvarray.ops.cpu`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvarray import ops
from kvarray.errors import DeviceMismatch, DTypeMismatch, IndexOutOfRange, LayoutError, ShapeMismatch
from kvarray.spec import RopeSpec


class FakeDeviceArray:
    """A NumPy array dressed as a CUDA array (``__cuda_array_interface__``): mixing host and device."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str, "version": 3}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)


def arrays() -> dict[str, np.ndarray]:
    """A small valid set of arguments: float16 pool [6, 2, 32], int8 pool with groups of 32, rows, indices."""
    rng = np.random.default_rng(0)
    return {
        "pool": rng.standard_normal((6, 2, 32)).astype(np.float16),
        "qpool": rng.integers(-127, 128, (6, 2, 32)).astype(np.int8),
        "scales": rng.random((6, 2)).astype(np.float16),
        "rows": rng.standard_normal((2, 2, 32)).astype(np.float16),
        "cells": np.array([4, 1], np.int32),
        "out": np.full((2, 2, 3, 32), 5, np.float16),
        "q": np.zeros((6, 2, 32), np.int8),
        "qscales": np.zeros((6, 2), np.float16),
    }


def refused(call: Callable[[dict[str, np.ndarray]], None], error: type[Exception], match: str) -> None:
    """`call` on fresh arrays raises `error` with `match` in its message and changes no array."""
    a = arrays()
    before = {k: v.copy() for k, v in a.items()}
    with pytest.raises(error, match=match):
        call(a)
    for name, value in a.items():
        assert value.tobytes() == before[name].tobytes(), f"{name} was changed by a refused call"


def read_only(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flags.writeable = False
    return x


CASES = [
    # scatter_rows
    (
        "pool float64",
        lambda a: ops.scatter_rows(a["pool"].astype(np.float64), a["rows"], a["cells"]),
        DTypeMismatch,
        "pool must be float16 or float32",
    ),
    (
        "rows int",
        lambda a: ops.scatter_rows(a["pool"], a["rows"].astype(np.int32), a["cells"]),
        DTypeMismatch,
        "rows must be float16 or float32",
    ),
    (
        "pool rank 2",
        lambda a: ops.scatter_rows(a["pool"].reshape(6, 64), a["rows"], a["cells"]),
        ShapeMismatch,
        r"\[cells, kv_heads, head_dim\]",
    ),
    (
        "rows heads",
        lambda a: ops.scatter_rows(a["pool"], a["rows"].reshape(2, 4, 16), a["cells"]),
        ShapeMismatch,
        r"the pool's are \(2, 32\)",
    ),
    (
        "pool strided",
        lambda a: ops.scatter_rows(a["pool"][::2], a["rows"], a["cells"]),
        LayoutError,
        "C-contiguous",
    ),
    (
        "pool read-only",
        lambda a: ops.scatter_rows(read_only(a["pool"]), a["rows"], a["cells"]),
        LayoutError,
        "writable",
    ),
    (
        "cells out of range",
        lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([1, 6])),
        IndexOutOfRange,
        r"\[0, 6\)",
    ),
    (
        "cells negative",
        lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([-1, 2])),
        IndexOutOfRange,
        r"\[0, 6\)",
    ),
    (
        "cells repeated",
        lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([2, 2])),
        IndexOutOfRange,
        "distinct",
    ),
    (
        "cells float",
        lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([1.0, 2.0])),
        DTypeMismatch,
        "cells must be int32 or int64",
    ),
    (
        "cells count",
        lambda a: ops.scatter_rows(a["pool"], a["rows"], np.array([1, 2, 3])),
        ShapeMismatch,
        "cells must have 2 entries",
    ),
    (
        "int8 without scales",
        lambda a: ops.scatter_rows(a["qpool"], a["rows"], a["cells"]),
        DTypeMismatch,
        "needs its scales",
    ),
    (
        "scales for float pool",
        lambda a: ops.scatter_rows(a["pool"], a["rows"], a["cells"], a["scales"]),
        DTypeMismatch,
        "not int8",
    ),
    (
        "scales shape",
        lambda a: ops.scatter_rows(a["qpool"], a["rows"], a["cells"], a["scales"][:, :1].copy()[:5]),
        ShapeMismatch,
        r"must be \[6, 64 // group_size\]",
    ),
    (
        "scales float32",
        lambda a: ops.scatter_rows(a["qpool"], a["rows"], a["cells"], a["scales"].astype(np.float32)),
        DTypeMismatch,
        "scales must be float16",
    ),
    (
        "host pool, device cells",
        lambda a: ops.scatter_rows(a["pool"], a["rows"], FakeDeviceArray(a["cells"])),
        DeviceMismatch,
        "host memory and a CUDA device",
    ),
    # gather_rows
    (
        "gather out dtype",
        lambda a: ops.gather_rows(a["pool"], np.array([0, 1, 2]), a["cells"], a["out"].astype(np.float32)),
        DTypeMismatch,
        "out must be float16",
    ),
    (
        "gather L too short",
        lambda a: ops.gather_rows(a["pool"], np.array([0, 4, 4]), np.array([0, 1, 2, 3]), a["out"]),
        ShapeMismatch,
        "longest sequence has 4",
    ),
    (
        "gather indptr decreasing",
        lambda a: ops.gather_rows(a["pool"], np.array([0, 2, 1]), a["cells"], a["out"]),
        IndexOutOfRange,
        "never decrease",
    ),
    (
        "gather indptr length",
        lambda a: ops.gather_rows(a["pool"], np.array([0, 2]), a["cells"], a["out"]),
        ShapeMismatch,
        "S \\+ 1 = 3 entries",
    ),
    (
        "gather indices range",
        lambda a: ops.gather_rows(a["pool"], np.array([0, 1, 2]), np.array([0, 9]), a["out"]),
        IndexOutOfRange,
        r"\[0, 6\)",
    ),
    (
        "gather out heads",
        lambda a: ops.gather_rows(a["pool"], np.array([0, 1, 2]), a["cells"], a["out"].reshape(2, 1, 6, 32)),
        ShapeMismatch,
        r"\(H, D\)",
    ),
    # move_rows
    (
        "move pools rows",
        lambda a: ops.move_rows([a["pool"], a["scales"][:5].copy()], *np.array([[0], [1], [1]])),
        ShapeMismatch,
        "pools\\[1\\] has 5 rows, pools\\[0\\] has 6",
    ),
    (
        "move overlapping destinations",
        lambda a: ops.move_rows([a["pool"], a["q"]], np.array([0, 3]), np.array([1, 2]), np.array([2, 2])),
        IndexOutOfRange,
        "destination runs overlap",
    ),
    (
        "move past the end",
        lambda a: ops.move_rows([a["pool"]], np.array([5]), np.array([0]), np.array([2])),
        IndexOutOfRange,
        r"every src run must lie in \[0, 6\)",
    ),
    (
        "move negative length",
        lambda a: ops.move_rows([a["pool"]], np.array([0]), np.array([1]), np.array([-1])),
        IndexOutOfRange,
        ">= 0",
    ),
    (
        "move run counts",
        lambda a: ops.move_rows([a["pool"]], np.array([0, 1]), np.array([2]), np.array([1])),
        ShapeMismatch,
        "one entry per run",
    ),
    (
        "move strided pool",
        lambda a: ops.move_rows([a["pool"][:, :1]], np.array([0]), np.array([1]), np.array([1])),
        LayoutError,
        "C-contiguous",
    ),
    # quantize_int8 / dequantize_int8
    (
        "quantize q dtype",
        lambda a: ops.quantize_int8(a["rows"], a["rows"].copy(), a["qscales"][:2]),
        DTypeMismatch,
        "q must be int8",
    ),
    (
        "quantize shapes",
        lambda a: ops.quantize_int8(a["rows"], a["q"], a["qscales"]),
        ShapeMismatch,
        "one shape",
    ),
    (
        "quantize groups",
        lambda a: ops.quantize_int8(a["rows"], a["q"][:2], np.zeros((2, 3), np.float16)),
        ShapeMismatch,
        "group_size",
    ),
    (
        "dequantize out dtype",
        lambda a: ops.dequantize_int8(a["qpool"], a["scales"], a["qpool"].astype(np.int16)),
        DTypeMismatch,
        "out must be float16 or float32",
    ),
    # rope_shift
    (
        "rope odd rotary_dim",
        lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([1, 1]), RopeSpec(rotary_dim=7)),
        ShapeMismatch,
        "rotary_dim must be even",
    ),
    (
        "rope deltas count",
        lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([1]), RopeSpec()),
        ShapeMismatch,
        "one entry per cell",
    ),
    (
        "rope deltas float",
        lambda a: ops.rope_shift(a["pool"], a["cells"], np.array([1.0, 2.0]), RopeSpec()),
        DTypeMismatch,
        "deltas must be int32 or int64",
    ),
    (
        "rope cells range",
        lambda a: ops.rope_shift(a["pool"], np.array([0, 6]), np.array([1, 1]), RopeSpec()),
        IndexOutOfRange,
        r"\[0, 6\)",
    ),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refusals_raise_named_errors_and_change_nothing(
    call: Callable, error: type[Exception], match: str
) -> None:
    refused(call, error, match)


def test_host_arrays_dispatch_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvarray.ops import cpu

    a = arrays()
    assert ops.backend_for(a["pool"], a["rows"], None) is cpu
    calls: list[str] = []
    for name in (
        "scatter_rows",
        "gather_rows",
        "move_rows",
        "quantize_int8",
        "dequantize_int8",
        "rope_shift",
    ):
        monkeypatch.setattr(cpu, name, lambda *args, _n=name, **kw: calls.append(_n))
    ops.scatter_rows(a["pool"], a["rows"], a["cells"])
    ops.gather_rows(a["pool"], np.array([0, 1, 2]), a["cells"], a["out"])
    ops.move_rows([a["pool"]], np.array([0]), np.array([1]), np.array([1]))
    ops.quantize_int8(a["rows"], a["q"][:2], a["qscales"][:2])
    ops.dequantize_int8(a["qpool"], a["scales"], a["pool"])
    ops.rope_shift(a["pool"], a["cells"], np.array([1, 2]), RopeSpec())
    assert calls == [
        "scatter_rows",
        "gather_rows",
        "move_rows",
        "quantize_int8",
        "dequantize_int8",
        "rope_shift",
    ]


def test_mixed_host_and_device_is_refused() -> None:
    a = arrays()
    with pytest.raises(DeviceMismatch, match="split between host memory and a CUDA device"):
        ops.backend_for(a["pool"], FakeDeviceArray(a["rows"]))


def test_valid_calls_write_through_the_wrappers() -> None:
    a = arrays()
    ops.scatter_rows(a["qpool"], a["rows"], a["cells"], a["scales"])
    out = np.zeros((1, 2, 2, 32), np.float32)
    ops.gather_rows(a["qpool"], np.array([0, 2]), a["cells"], out, a["scales"])
    err = np.abs(out[0].transpose(1, 0, 2) - a["rows"].astype(np.float32))
    assert (
        err <= np.repeat(a["scales"][a["cells"]].astype(np.float32), 32, axis=1).reshape(2, 2, 32) / 2
    ).all()

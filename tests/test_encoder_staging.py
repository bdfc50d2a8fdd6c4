"""EncoderCache staging of float entries: the staged cross view is the batch's entries side by side, bit for
bit, whichever way the copy goes (one `ops.cpu.copy_runs` call for host pools of the staging dtype, helped
and streamed or not; one ``copyto`` a run when float32 rows are staged as float16).

Rows are random finite float16 bit patterns (subnormals and -0 included), so a converted, shifted or
missing row shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvarray.encoder import CrossView, EncoderCache
from kvarray.ops import cpu
from kvarray.spec import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
LENGTHS = {0: 5, 1: 3, 2: 7, 3: 1}  # put side by side in this order


def rows(seq: int, layer: int, which: int, m: int, dtype: str) -> np.ndarray:
    """``[m, 2, 8]`` of `dtype`: random finite bit patterns for float16 (the cache refuses inf and NaN),
    random float32 values otherwise."""
    rng = np.random.default_rng(100 * seq + 10 * layer + which)
    if dtype == "float16":
        bits = rng.integers(0, 1 << 16, (m, 2, 8), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] ^= 0x0400  # exponent all ones (inf, NaN) -> the largest finite binade
        return bits.view(np.float16)
    return rng.standard_normal((m, 2, 8)).astype(np.float32)


def make_cache(dtype: str) -> EncoderCache:
    cache = EncoderCache(SPEC, 32, 8, {"audio": dtype}, xp=np)
    for layer in range(SPEC.num_layers):
        for seq, m in LENGTHS.items():
            keys, values = (rows(seq, layer, which, m, dtype) for which in (0, 1))
            cache.put_sequence(seq, layer, keys, values, "audio")
    return cache


@pytest.mark.parametrize("helped", [False, True], ids=["serial", "helped-streamed"])
@pytest.mark.parametrize(
    "order", [[3, 2, 1, 0], [1, 2, 3, 0], [2, 0], [3, 1]], ids=["reversed", "rotated", "two", "gap"]
)
def test_staged_view_is_the_entries_side_by_side(order, helped, monkeypatch) -> None:
    if helped:  # what a Whisper-sized batch does, on a small one
        monkeypatch.setattr(cpu, "PARALLEL_BYTES", 0)
        monkeypatch.setattr(cpu, "STREAM_BYTES", 0)
    cache = make_cache("float16")
    cache.start_forward(order, [0] * len(order))
    for layer in range(SPEC.num_layers):
        view = cache.get(layer)
        assert isinstance(view, CrossView) and not view.zero_copy and view.keys.dtype == np.float16
        for which, got in enumerate((view.keys, view.values)):
            expected = np.concatenate([rows(s, layer, which, LENGTHS[s], "float16") for s in order])
            assert got.tobytes() == expected.tobytes()
            pool = cache.pools(layer, "float16")[which]
            assert not np.shares_memory(got, pool)


def test_float32_entries_staged_as_float16_are_rounded_per_run() -> None:
    cache = make_cache("float32")
    order = [2, 0, 3]
    cache.start_forward(order, [0] * len(order))
    view = cache.get(1)
    assert isinstance(view, CrossView)
    expected = np.concatenate([rows(s, 1, 1, LENGTHS[s], "float32") for s in order]).astype(np.float16)
    assert view.values.dtype == np.float16 and view.values.tobytes() == expected.tobytes()

"""Helpers of the cache-side reliability tests: small caches holding some state, a byte-for-byte snapshot
of a cache, the refusal check every hostile case runs, what each sequence reads, a fake device array and
an injected fault (a module of its own: tests/reliability has no conftest; each test file puts this
folder on ``sys.path``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvarray import KVSpec
from kvarray.causal import CausalCache
from kvarray.encdec import EncoderDecoderCache
from kvarray.encoder import EncoderCache
from kvarray.errors import KVArrayError, StalePlan

#: Two layers, two kv heads of 32 values: one int8 group of 32 per head.
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16")
HEADS, DIM = SPEC.num_kv_heads, SPEC.head_dim


class InjectedFault(RuntimeError):
    """The failure a test injects into a kernel (a plain exception, not one of kvarray's)."""


class FakeDeviceArray:
    """A NumPy array dressed as a CUDA array (``__cuda_array_interface__``): what a CuPy or torch CUDA
    tensor looks like to kvarray, without a device."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str, "version": 3}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)


def rows(seq: int, positions: list[int] | range, layer: int = 0, dtype: Any = np.float16) -> np.ndarray:
    """``[T, H, D]`` K rows of a sequence's tokens: value = seq + position / 8 + layer / 64 + (h, d) / 4096,
    all finite and distinct per token (V rows are their negation)."""
    pos = np.asarray(list(positions), np.float32)[:, None, None]
    h, d = np.meshgrid(np.arange(HEADS), np.arange(DIM), indexing="ij")
    return (seq + pos / 8 + layer / 64 + (h * DIM + d)[None] / 4096).astype(dtype)


def put_all(cache: CausalCache | EncoderDecoderCache, seq_ids: list[int], positions: list[int]) -> None:
    """``start_forward`` then a put of every layer (keys = `rows`, values = -keys)."""
    cache.start_forward(seq_ids, positions)
    for layer in range(SPEC.num_layers):
        keys = np.concatenate([rows(s, [p], layer) for s, p in zip(seq_ids, positions, strict=True)])
        cache.put(layer, keys, -keys)


def causal_cache(**options: Any) -> CausalCache:
    """A causal cache (capacity 48, 4 sequences, float16 keys and int8 values unless told otherwise)
    holding: sequence 0 with 6 tokens, sequence 1 sharing its first 3 then 2 of its own, sequence 2 with
    4 tokens; the current pass (a decode step of 0 and 2) is put."""
    config: dict[str, Any] = {"capacity": 48, "max_sequences": 4, "kv_dtype": ("float16", "int8"),
                              "defrag_threshold": None, "xp": np}
    config.update(options)
    cache = CausalCache(SPEC, **config)
    put_all(cache, [0] * 5 + [2] * 3, [0, 1, 2, 3, 4, 0, 1, 2])
    cache.copy_prefix(0, 1, 3)
    put_all(cache, [1, 1], [3, 4])
    put_all(cache, [0, 2], [5, 3])
    return cache


def encoder_cache(**options: Any) -> EncoderCache:
    """An encoder cache (text float16, image int8, 32 rows each, 4 sequences) holding a complete text entry
    for sequence 10 (M = 3), a complete image entry for 11 (M = 2, forked to 12), a text entry for 13 with
    layer 0 only; the current pass is a decoder step of 10 and 11."""
    config: dict[str, Any] = {"capacity": 32, "max_sequences": 5,
                              "modality_dtypes": {"text": "float16", "image": "int8"}, "xp": np}
    config.update(options)
    cache = EncoderCache(SPEC, **config)
    for layer in range(SPEC.num_layers):
        keys = rows(10, range(3), layer)
        cache.put_sequence(10, layer, keys, -keys, "text")
        keys = rows(11, range(2), layer)
        cache.put_sequence(11, layer, keys, -keys, "image")
    cache.put_sequence(13, 0, rows(13, range(4)), -rows(13, range(4)), "text")
    cache.fork(11, 12)
    cache.start_forward([10, 11], [0, 0])
    return cache


def encdec_cache() -> EncoderDecoderCache:
    """An encoder-decoder cache over a small causal cache and `encoder_cache`: sequences 10 and 11 have
    decoded 3 tokens each; the current pass (one more token each) is put."""
    causal = CausalCache(SPEC, capacity=32, max_sequences=5, defrag_threshold=None, xp=np)
    cache = EncoderDecoderCache(causal, encoder_cache())
    for step in range(4):
        put_all(cache, [10, 11], [step, step])
    return cache


def snapshot(cache: Any) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every array of ``cache.state_dict()`` as (dtype, shape, bytes)."""
    return {name: (arr.dtype.str, arr.shape, arr.tobytes()) for name, arr in cache.state_dict().items()}


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Two snapshots are identical, array by array and byte by byte."""
    assert before.keys() == after.keys()
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"changed by a refused call: {changed}"


def plan_of(cache: Any) -> Any:
    """The cache's current plan, or None (an encoder-decoder cache's self-attention plan)."""
    plan = cache.plan
    return getattr(plan, "self_plan", plan)


def is_current(plan: Any) -> bool:
    """True when `plan` (a forward or cross plan) is not stale."""
    try:
        plan.check_current()
    except StalePlan:
        return False
    return True


def assert_refused(cache: Any, call: Callable[[Any], Any], error: type[KVArrayError], match: str) -> None:
    """``call(cache)`` raises `error` (a `KVArrayError`) whose message matches `match`, and leaves
    `state_dict` byte for byte as it was, the current plan as current as it was."""
    assert issubclass(error, KVArrayError)
    before = snapshot(cache)
    plan = plan_of(cache)
    current = plan is not None and is_current(plan)
    with pytest.raises(error, match=match):
        call(cache)
    assert_same(before, snapshot(cache))
    plan_after = plan_of(cache)
    assert plan_after is plan and (plan is not None and is_current(plan)) == current


def views(cache: CausalCache) -> dict[int, list[np.ndarray]]:
    """What each live sequence reads: per sequence, for every layer, its keys and values ``[n, H, D]``
    float32 (dequantized) in position order, and its positions ``[n]``."""
    out: dict[int, list[np.ndarray]] = {}
    state = cache.state_dict()
    for seq in sorted(cache.sequences()):
        cells, positions = cache.cell_table(seq)
        read = [positions.astype(np.float32)]
        for layer in range(SPEC.num_layers):
            for kind in ("key", "value"):
                pool = state[f"layer.{layer}.{kind}s"][cells].astype(np.float32)
                scales = state.get(f"layer.{layer}.{kind}_scales")
                if scales is not None:
                    groups = scales.shape[1]
                    pool = (pool.reshape(len(cells), groups, -1)
                            * scales[cells].astype(np.float32)[:, :, None]).reshape(pool.shape)
                read.append(pool)
        out[seq] = read
    return out


def assert_same_views(before: dict[int, list[np.ndarray]], after: dict[int, list[np.ndarray]]) -> None:
    """Every sequence reads exactly what it read before (same positions, same bits)."""
    assert before.keys() == after.keys()
    for seq in before:
        for a, b in zip(before[seq], after[seq], strict=True):
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), f"sequence {seq} reads other K/V"


def bookkeeping(cache: CausalCache) -> dict[str, bytes]:
    """The ``cells.*`` arrays of the state, as bytes."""
    return {k: v.tobytes() for k, v in cache.state_dict().items() if k.startswith("cells.")}

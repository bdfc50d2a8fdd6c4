"""EncoderCache: extents, cross views and biases written out, zero-copy, attention, errors, state.

Values encode their coordinates: key[m, h, :] = 100 * seq + 10 * layer + m + 0.5 * h (exact in float16),
values are the negatives. Grids use x = -inf.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvarray.attention import attend, attend_gathered, attend_list
from kvarray.encoder import EncoderCache, ExtentList
from kvarray.errors import (
    CacheFull,
    ConfigError,
    DTypeMismatch,
    EntryWritten,
    IndexOutOfRange,
    NoEncoderEntry,
    NoForwardPass,
    SequenceExists,
    ShapeMismatch,
    SpecMismatch,
    StalePlan,
    TooManySequences,
    UnknownModality,
    UnknownSequence,
)
from kvarray.spec import KVSpec

x = -np.inf
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32")
MODALITIES = {"text": "float32", "audio": "float16", "image": "int8"}
# (seq, modality, encoder length M): put in this order, so float16 rows are seq 2 at 0..4, seq 4 at 5..6
ENTRIES = [(1, "text", 3), (2, "audio", 5), (3, "image", 4), (4, "audio", 2)]
LENGTH = {seq: m for seq, _, m in ENTRIES}


def coords(seq: int, layer: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values ``[m, 2, 32]`` float32 encoding (seq, layer, row, head)."""
    keys = 100.0 * seq + 10.0 * layer + np.arange(m)[:, None, None] + 0.5 * np.arange(2)[None, :, None]
    keys = np.broadcast_to(keys, (m, 2, 32)).astype(np.float32)
    return keys, -keys


def make_cache(capacity: int = 16, max_sequences: int = 8) -> EncoderCache:
    cache = EncoderCache(SPEC, capacity, max_sequences, MODALITIES, xp=np)
    for seq, modality, m in ENTRIES:
        for layer in range(SPEC.num_layers):
            cache.put_sequence(seq, layer, *coords(seq, layer, m), modality=modality)
    return cache


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name


def data_ptr(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


# ---- the free-extent list: exact extents after each step ----------------------------------------------
def test_extent_list_first_fit_and_coalescing() -> None:
    free = ExtentList(16)
    for n in (4, 3, 5):  # A [0, 4), B [4, 7), C [7, 12)
        free.take(free.first_fit(n), n)
    assert (free.starts, free.lengths) == ([12], [4])
    free.release(4, 3)  # B
    assert (free.starts, free.lengths) == ([4, 12], [3, 4])
    assert free.first_fit(4) == 12 and free.first_fit(2) == 4 and free.first_fit(5) == -1
    free.take(4, 2)  # D [4, 6)
    free.release(0, 4)  # A
    assert (free.starts, free.lengths) == ([0, 6, 12], [4, 1, 4])
    free.release(4, 2)  # D: joins both neighbours
    assert (free.starts, free.lengths) == ([0, 12], [7, 4])
    free.release(7, 5)  # C: everything free again, one extent
    assert (free.starts, free.lengths, free.free, free.largest) == ([0], [16], 16, 16)


def test_entries_sit_side_by_side_per_dtype() -> None:
    cache = make_cache()
    entries = {seq: cache.entry(seq) for seq, _, _ in ENTRIES}
    table = {seq: (e.dtype, e.start, e.length) for seq, e in entries.items()}
    assert table == {1: ("float32", 0, 3), 2: ("float16", 0, 5), 3: ("int8", 0, 4), 4: ("float16", 5, 2)}
    assert cache.entry(2).layers_written == (0, 1) and cache.entry(2).refs == 1
    stats = cache.stats()
    assert stats.cells_used == {"float16": 7, "float32": 3, "int8": 4}
    assert stats.cells_free == {"float16": 9, "float32": 13, "int8": 12}
    # 2 layers x (keys + values) x a row of 64 values: float32 256 B, float16 128 B, int8 64 + 2 scales x 2 B
    assert stats.bytes_per_token == {"text": 1024, "audio": 512, "image": 272}
    assert stats.bytes_in_use == 3 * 1024 + 7 * 512 + 4 * 272
    assert (stats.sequences, stats.entries) == (4, 4)


def test_removed_space_is_reused_first_fit() -> None:
    cache = make_cache()
    cache.remove(2)  # float16 [0, 5) free again
    for layer in range(2):
        cache.put_sequence(5, layer, *coords(5, layer, 4), modality="audio")
    assert cache.entry(5).start == 0
    cache.remove(4)
    cache.remove(5)
    assert cache.stats().cells_free["float16"] == 16 and cache.stats().largest_free["float16"] == 16


# ---- cross views: bias grids, zero-copy, contents -------------------------------------------------
CROSS_CASES = [
    # seq_ids, positions, zero_copy, expected bias [T, M]
    pytest.param([2, 4], [0, 0], True, [[0, 0, 0, 0, 0, x, x],
                                        [x, x, x, x, x, 0, 0]], id="adjacent-audio-zero-copy"),
    pytest.param([4, 2], [0, 0], False, [[0, 0, x, x, x, x, x],
                                         [x, x, 0, 0, 0, 0, 0]], id="out-of-order-staged"),
    pytest.param([2, 2, 4], [3, 4, 7], True, [[0, 0, 0, 0, 0, x, x],
                                              [0, 0, 0, 0, 0, x, x],
                                              [x, x, x, x, x, 0, 0]], id="prefill-and-decode"),
    pytest.param([1, 3], [0, 0], False, [[0, 0, 0, x, x, x, x],
                                         [x, x, x, 0, 0, 0, 0]], id="text-and-image-mixed-dtypes"),
    pytest.param([3], [5], False, [[0, 0, 0, 0]], id="int8-alone-dequantized"),
]


@pytest.mark.parametrize(("seq_ids", "positions", "zero_copy", "bias"), CROSS_CASES)
def test_cross_view(seq_ids: list[int], positions: list[int], zero_copy: bool, bias: list) -> None:
    cache = make_cache()
    cache.start_forward(seq_ids, positions)
    order = list(dict.fromkeys(seq_ids))
    for layer in range(SPEC.num_layers):
        view = cache.get(layer)
        np.testing.assert_array_equal(view.bias, np.asarray(bias, np.float32))
        assert view.zero_copy is zero_copy
        assert view.lengths.tolist() == [LENGTH[s] for s in order]
        assert view.offsets.tolist() == np.cumsum([0] + [LENGTH[s] for s in order])[:-1].tolist()
        want_k = np.concatenate([coords(s, layer, LENGTH[s])[0] for s in order])
        tol = 0.5 * max(abs(want_k).max() / 127, 1e-6) if 3 in order else 0  # int8: half a step
        np.testing.assert_allclose(view.keys, want_k, atol=tol, rtol=0)
        np.testing.assert_allclose(view.values, -want_k, atol=tol, rtol=0)
        pool_keys = cache.pools(layer, "float16")[0]
        if zero_copy:  # the view is the pool's own memory, at the first entry's row
            start = cache.entry(order[0]).start
            assert np.shares_memory(view.keys, pool_keys)
            assert data_ptr(view.keys) == data_ptr(pool_keys) + start * pool_keys.strides[0]
        else:
            assert not np.shares_memory(view.keys, pool_keys)


def test_staging_buffer_reused_across_steps_and_layers_kept_apart() -> None:
    cache = make_cache()
    cache.start_forward([4, 2], [0, 0])
    first = [cache.get(layer).keys for layer in range(2)]
    assert not np.shares_memory(first[0], first[1])  # every layer keeps its own staging
    cache.start_forward([4, 2], [1, 1])  # next decoder step, same batch: same buffers, no copy
    again = cache.get(0)
    assert data_ptr(again.keys) == data_ptr(first[0])
    cache.start_forward([1, 3], [0, 0])  # another batch of no more rows: same storage, new contents
    other = cache.get(0)
    assert data_ptr(other.keys) == data_ptr(first[0])
    np.testing.assert_array_equal(other.keys[:3], coords(1, 0, 3)[0])


def test_bias_built_once_per_plan_and_shared_by_layers() -> None:
    cache = make_cache()
    cache.start_forward([4, 2], [0, 0])
    assert cache.get(0).bias is cache.get(1).bias
    assert not cache.get(0).bias.flags.writeable


def test_gathered_view_pads_each_sequence() -> None:
    cache = make_cache()
    plan = cache.start_forward([4, 1, 3], [0, 0, 0])
    view = cache.get(1, view="gathered")
    assert view.keys.shape == (3, 2, 4, 32) and view.keys.dtype == np.float32
    assert view.lengths.tolist() == [2, 3, 4]
    np.testing.assert_array_equal(view.bias, [[0, 0, x, x],
                                              [0, 0, 0, x],
                                              [0, 0, 0, 0]])
    np.testing.assert_array_equal(view.keys[0, :, :2], coords(4, 1, 2)[0].transpose(1, 0, 2))
    np.testing.assert_array_equal(view.keys[0, :, 2:], 0)
    np.testing.assert_array_equal(view.values[1, :, :3], coords(1, 1, 3)[1].transpose(1, 0, 2))
    np.testing.assert_allclose(view.keys[2].transpose(1, 0, 2), coords(3, 1, 4)[0], atol=1.3)
    assert plan.token_seq.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "seq_ids", [[2, 4], [4, 2], [1, 3, 2, 4], [3]], ids=["zero-copy", "staged", "all", "int8"]
)
def test_attention_over_cross_view_equals_attention_over_own_entry(seq_ids: list[int]) -> None:
    rng = np.random.default_rng(7)
    cache = EncoderCache(SPEC, 16, 8, MODALITIES, xp=np)
    inputs = {}
    for seq, modality, m in ENTRIES:
        inputs[seq] = [rng.standard_normal((2, m, 2, 32)).astype(np.float32) for _ in range(SPEC.num_layers)]
        for layer in range(SPEC.num_layers):
            cache.put_sequence(seq, layer, inputs[seq][layer][0], inputs[seq][layer][1], modality=modality)
    seq_ids_t = np.repeat(seq_ids, 2)  # two decoder tokens per sequence
    positions = np.tile([0, 1], len(seq_ids))
    plan = cache.start_forward(seq_ids_t, positions)
    queries = rng.standard_normal((len(seq_ids_t), 4, 32))  # 4 query heads over 2 kv heads (GQA)
    for layer in range(SPEC.num_layers):
        view, gathered = cache.get(layer), cache.get(layer, view="gathered")
        got = attend(queries, view.keys, view.values, view.bias)
        got_gathered = attend_gathered(queries, gathered.keys, gathered.values, gathered.bias, plan.token_seq)
        for t, seq in enumerate(seq_ids_t.tolist()):
            keys, values = inputs[seq][layer]
            want = attend_list(queries[t], keys, values)
            tol = {"float32": 1e-5, "float16": 2e-3, "int8": 5e-2}[MODALITIES[cache.entry(seq).modality]]
            np.testing.assert_allclose(got[t], want, atol=tol)
            np.testing.assert_allclose(got_gathered[t], got[t], atol=1e-6)


def test_put_batch_places_new_sequences_side_by_side() -> None:
    cache = EncoderCache(SPEC, 16, 8, MODALITIES, xp=np)
    lengths = [3, 5, 2]
    for layer in range(2):
        keys = np.concatenate([coords(s, layer, m)[0] for s, m in zip([7, 5, 6], lengths, strict=True)])
        cache.put_batch([7, 5, 6], layer, keys, -keys, lengths, modality="audio")
    assert [cache.entry(s).start for s in (7, 5, 6)] == [0, 3, 8]
    cache.start_forward([7, 5, 6], [0, 0, 0])
    view = cache.get(1)
    assert view.zero_copy and view.keys.shape == (10, 2, 32)
    np.testing.assert_array_equal(view.keys[3:8], coords(5, 1, 5)[0])


class DLPackOnly:
    """An array producer that offers nothing but the DLPack protocol (as torch or JAX would)."""

    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()

    @property
    def shape(self) -> tuple[int, ...]:
        return self._arr.shape


def test_dlpack_producers_are_accepted() -> None:
    cache = EncoderCache(SPEC, 16, 8, MODALITIES, xp=np)
    keys, values = coords(1, 0, 3)
    cache.put_sequence(1, 0, DLPackOnly(keys), DLPackOnly(values), modality="text")
    np.testing.assert_array_equal(cache.pools(0, "float32")[0][:3], keys)


# ---- errors: named, and the cache bit-identical afterwards ----------------------------------------
def _put_layer0(seq: int, m: int, modality: str = "text"):
    return lambda c: c.put_sequence(seq, 0, *coords(seq, 0, m), modality=modality)


def _plan(seq_ids: list[int]):
    return lambda c: c.start_forward(seq_ids, [0] * len(seq_ids))


def _zeros(*shape: int, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(shape, dtype), np.zeros(shape, dtype)


ERROR_CASES = [
    # name, setup(cache) before the snapshot (or None), call(cache), exception
    ("no-entry", None, _plan([2, 9]), NoEncoderEntry),
    ("entry-missing-a-layer", _put_layer0(9, 2), _plan([9]), NoEncoderEntry),
    ("length-differs-in-another-layer", _put_layer0(9, 2), lambda c: c.put_sequence(9, 1, *coords(9, 1, 3)),
     ShapeMismatch),
    ("layer-written-twice", None, lambda c: c.put_sequence(2, 1, *coords(2, 1, 5), modality="audio"),
     EntryWritten),
    ("wrong-head-count", None, lambda c: c.put_sequence(9, 0, *_zeros(2, 3, 32)), ShapeMismatch),
    ("wrong-head-dim", None, lambda c: c.put_sequence(9, 0, *_zeros(2, 2, 16)), ShapeMismatch),
    ("keys-values-differ", None, lambda c: c.put_sequence(9, 0, _zeros(2, 2, 32)[0], _zeros(3, 2, 32)[0]),
     ShapeMismatch),
    ("integer-keys", None, lambda c: c.put_sequence(9, 0, *_zeros(2, 2, 32, dtype=np.int32)), DTypeMismatch),
    ("unknown-modality", None, _put_layer0(9, 2, "video"), UnknownModality),
    ("other-modality-same-sequence", _put_layer0(9, 2, "image"),
     lambda c: c.put_sequence(9, 1, *coords(9, 1, 2), modality="text"), ConfigError),
    ("layer-out-of-range", None, lambda c: c.put_sequence(9, 2, *coords(9, 0, 2)), IndexOutOfRange),
    ("capacity-exceeded", None, _put_layer0(9, 10, "audio"), CacheFull),
    ("batch-partly-fits", None, lambda c: c.put_batch([8, 9], 0, *coords(9, 0, 13), [6, 7], modality="image"),
     CacheFull),
    ("too-many-sequences", None, lambda c: c.put_batch([5, 6, 7, 8, 9], 0, *coords(9, 0, 5), [1] * 5),
     TooManySequences),
    ("repeated-ids-in-batch", None, lambda c: c.put_batch([8, 8], 0, *coords(9, 0, 4), [2, 2]),
     ShapeMismatch),
    ("remove-unknown", None, lambda c: c.remove(9), UnknownSequence),
    ("fork-onto-existing", None, lambda c: c.fork(2, 4), SequenceExists),
    ("fork-without-entry", None, lambda c: c.fork(9, 10), NoEncoderEntry),
    ("get-before-start-forward", None, lambda c: c.get(0), NoForwardPass),
    ("unknown-view", _plan([2]), lambda c: c.get(0, view="pages"), ConfigError),
    ("stale-plan", lambda c: (c.start_forward([2], [0]), c.remove(1)), lambda c: c.get(0), StalePlan),
]


@pytest.mark.parametrize(("setup", "call", "error"), [pytest.param(*c[1:], id=c[0]) for c in ERROR_CASES])
def test_errors_leave_the_cache_unchanged(setup, call, error) -> None:
    cache = make_cache()
    if setup is not None:
        setup(cache)
    before, stats = cache.state_dict(), cache.stats()
    with pytest.raises(error):
        call(cache)
    assert cache.stats() == stats
    assert_same_state(before, cache.state_dict())


def test_cache_full_reports_counts() -> None:
    cache = make_cache()
    with pytest.raises(CacheFull) as info:
        cache.put_sequence(9, 0, *coords(9, 0, 10), modality="audio")
    assert (info.value.asked, info.value.free) == (10, 9)
    with pytest.raises(CacheFull) as info:
        cache.put_batch([8, 9], 0, *coords(9, 0, 13), [6, 7], modality="image")
    assert (info.value.asked, info.value.free) == (13, 12)  # 12 free, as [4, 16): 6 fit, the next 7 do not
    assert cache.stats().cells_free["int8"] == 12  # the first sequence's extent was given back


def test_unknown_precision_is_refused_at_construction() -> None:
    with pytest.raises(DTypeMismatch):
        EncoderCache(SPEC, 16, 8, {"text": "bfloat16"}, xp=np)
    with pytest.raises(ConfigError):
        EncoderCache(SPEC, {"float16": 16}, 8, {"text": "int8"}, xp=np)
    with pytest.raises(ShapeMismatch):
        EncoderCache(SPEC, 16, 8, {"image": "int8"}, group_size=48, xp=np)


# ---- state ------------------------------------------------------------------------------------------
def test_state_dict_and_file_round_trip_bit_identical(tmp_path) -> None:
    cache = make_cache()
    cache.remove(2)
    cache.fork(4, 6)
    saved = cache.state_dict()
    fresh = EncoderCache(SPEC, 16, 8, MODALITIES, xp=np)
    fresh.load_state_dict(saved)
    assert_same_state(saved, fresh.state_dict())
    assert fresh.entry(6).refs == 2 and fresh.shares_entry(4, 6)
    cache.save(tmp_path / "enc.safetensors")
    again = EncoderCache(SPEC, 16, 8, MODALITIES, xp=np)
    again.load(tmp_path / "enc.safetensors")
    assert_same_state(saved, again.state_dict())
    # the free list is rebuilt: the removed entry's rows are reused first
    again.put_sequence(5, 0, *coords(5, 0, 5), modality="audio")
    assert again.entry(5).start == 0


def test_load_refuses_another_configuration_and_changes_nothing() -> None:
    saved = make_cache().state_dict()
    other = EncoderCache(SPEC, 32, 8, MODALITIES, xp=np)
    before = other.state_dict()
    with pytest.raises(SpecMismatch):
        other.load_state_dict(saved)
    broken = dict(saved)
    broken["entries.table"] = saved["entries.table"].copy()
    broken["entries.table"][:, 1] = 0  # every entry of a dtype at row 0: overlapping extents
    target = make_cache()
    target.remove(1)
    before = target.state_dict()
    with pytest.raises(SpecMismatch):
        target.load_state_dict(broken)
    assert_same_state(before, target.state_dict())

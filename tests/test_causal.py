"""CausalCache on tiny specs: values encode their coordinates, expected cells, biases and page tables are
written out (x = -inf), every refused call leaves the state_dict bit-identical."""

# ruff: noqa: E501 - table rows and expected grids stay one per line

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvarray import ops
from kvarray.attention import apply_rope, attend, attend_gathered, attend_list, dequantized
from kvarray.causal import CausalCache
from kvarray.errors import (
    BackendUnavailable,
    CacheClosed,
    CacheFull,
    ConfigError,
    DTypeMismatch,
    IndexOutOfRange,
    NoForwardPass,
    PositionError,
    SequenceExists,
    ShapeMismatch,
    SpecMismatch,
    StalePlan,
    TooManySequences,
    UnknownSequence,
)
from kvarray.interface import Cache
from kvarray.spec import KVSpec, RopeSpec, RopeStyle
from kvarray.views import GatheredView, PageTable, PoolView
from kvarray.xp import cupy_unavailable_reason

x = -np.inf
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=2, dtype="float32")


def code(seq: int, pos: int, layer: int = 0, heads: int = 2, dim: int = 2) -> np.ndarray:
    """``[heads, dim]`` keys of a token: 1000 * seq + 100 * pos + 10 * head + dim (+ 0.5 * layer)."""
    h, d = np.meshgrid(np.arange(heads), np.arange(dim), indexing="ij")
    return (1000 * seq + 100 * pos + 10 * h + d + 0.5 * layer).astype(np.float32)


def put_all(cache: CausalCache, plan, heads: int = 2, dim: int = 2) -> None:
    """put every layer: keys = code(...), values = -code(...)."""
    for layer in range(cache.spec.num_layers):
        keys = np.stack([code(s, p, layer, heads, dim) for s, p in zip(plan.seq_ids, plan.positions, strict=True)])
        keys = keys.astype(cache.spec.dtype)
        cache.put(layer, keys, -keys)


def step(cache: CausalCache, seqs: list[int], positions: list[int]):
    plan = cache.start_forward(seqs, positions)
    put_all(cache, plan, cache.spec.num_kv_heads, cache.spec.head_dim)
    return plan


def assert_state_equal(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key


# ---- the three views -------------------------------------------------------------------------------
def test_mixed_prefill_and_decode_batch_views() -> None:
    cache = CausalCache(SPEC, capacity=8, max_sequences=4, xp=np)
    plan = step(cache, [0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    assert plan.slot_mapping.tolist() == [0, 1, 2, 3, 4]
    # prefill: causal within each sequence
    assert np.array_equal(plan.bias, np.array([
        [0, x, x, x, x, x, x, x],
        [0, 0, x, x, x, x, x, x],
        [0, 0, 0, x, x, x, x, x],
        [x, x, x, 0, x, x, x, x],
        [x, x, x, 0, 0, x, x, x],
    ], np.float32))
    # decode: seq 1 extends into cell 5, seq 0's next cell is taken so it gets the lowest free one (6)
    plan = step(cache, [1, 0], [2, 3])
    assert plan.slot_mapping.tolist() == [5, 6]
    assert plan.sequences.tolist() == [1, 0] and plan.token_seq.tolist() == [0, 1]
    assert plan.n_kv == 8

    view = cache.get(0, "pool")
    assert isinstance(view, PoolView)
    assert np.array_equal(view.bias, np.array([
        [x, x, x, 0, 0, 0, x, x],
        [0, 0, 0, x, x, x, 0, x],
    ], np.float32))
    cell_tokens = {0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (1, 0), 4: (1, 1), 5: (1, 2), 6: (0, 3)}
    for cell, (seq, pos) in cell_tokens.items():
        assert np.array_equal(view.keys[cell], code(seq, pos)) and np.array_equal(view.values[cell], -code(seq, pos))
    assert np.shares_memory(view.keys, cache.get(0, "pool").keys)  # zero-copy slices of the pool
    assert view.key_scales is None

    # before put: the cells this pass writes are masked in the past block, then causal over this pass
    assert np.array_equal(plan.bias_before_put, np.array([
        [x, x, x, 0, 0, x, x, x, 0, x],
        [0, 0, 0, x, x, x, x, x, x, 0],
    ], np.float32))

    pages = cache.get(1, "pages")
    assert isinstance(pages, PageTable)
    assert pages.kv_indptr.tolist() == [0, 3, 7]
    assert pages.kv_indices.tolist() == [3, 4, 5, 0, 1, 2, 6]
    assert pages.kv_last_page_len.tolist() == [1, 1]

    gathered = cache.get(1, "gathered")
    assert isinstance(gathered, GatheredView)
    assert gathered.keys.shape == (2, 2, 4, 2) and gathered.keys.dtype == np.float32
    assert gathered.lengths.tolist() == [3, 4]
    assert np.array_equal(gathered.bias, np.array([[0, 0, 0, x], [0, 0, 0, 0]], np.float32))
    for s, (seq, length) in enumerate([(1, 3), (0, 4)]):
        for j in range(length):  # HND: [sequence, head, position, dim]
            assert np.array_equal(gathered.keys[s, :, j], code(seq, j, layer=1))
            assert np.array_equal(gathered.values[s, :, j], -code(seq, j, layer=1))
        assert not gathered.keys[s, :, length:].any()
    assert plan.logits_index.tolist() == [0, 1]


def test_ring_window_with_a_sink_bias_grids() -> None:
    cache = CausalCache(SPEC, capacity=8, max_sequences=2, window=2, sinks=1, xp=np)
    plan = step(cache, [0, 0, 0], [0, 1, 2])
    assert np.array_equal(plan.bias[:, :4], np.array([
        [0, x, x, x],
        [0, 0, x, x],
        [0, 0, 0, x],  # position 2 sees 1 (in the window) and 0 (the sink)
    ], np.float32))
    plan = step(cache, [0], [3])
    assert plan.slot_mapping.tolist() == [1]  # position 1 left the window: its cell is overwritten
    assert cache.cell_table(0)[1].tolist() == [0, 2, 3]
    assert np.array_equal(plan.bias[:, :4], np.array([[0, 0, 0, x]], np.float32))
    # before put, cell 1 still holds position 1 (outside the window): masked, then this pass's token
    assert np.array_equal(plan.bias_before_put[:, [0, 1, 2, 3, 8]], np.array([[0, x, 0, x, 0]], np.float32))
    gathered = cache.get(0, "gathered")
    assert [gathered.keys[0, 0, j, 0] for j in range(3)] == [0.0, 200.0, 300.0]
    assert np.array_equal(gathered.bias, np.zeros((1, 3), np.float32))
    assert cache.stats().cells_used == 3


def test_window_without_sinks_multi_token_pass_keeps_both_views_exact() -> None:
    cache = CausalCache(SPEC, capacity=16, max_sequences=2, window=2, xp=np)
    step(cache, [0, 0], [0, 1])
    plan = step(cache, [0, 0, 0], [2, 3, 4])
    assert plan.slot_mapping.tolist() == [0, 2, 3]  # only position 0 is invisible to the first token
    cells, positions = cache.cell_table(0)
    assert (cells.tolist(), positions.tolist()) == ([1, 0, 2, 3], [1, 2, 3, 4])
    # after put each token sees exactly its window, though the ring grew past W for this pass
    assert np.array_equal(plan.bias[:, :4], np.array([
        [0, 0, x, x],  # position 2: itself (cell 0) and 1 (cell 1)
        [0, x, 0, x],  # position 3: 2 and itself
        [x, x, 0, 0],  # position 4: 3 and itself
    ], np.float32))
    plan = step(cache, [0], [5])
    assert plan.slot_mapping.tolist() == [1]  # reuses the oldest invisible cell and frees the others
    assert cache.cell_table(0)[1].tolist() == [4, 5]
    assert cache.stats().cells_used == 2


def test_attention_over_each_view_equals_attention_over_the_plain_list() -> None:
    spec = KVSpec(num_layers=1, num_kv_heads=2, head_dim=8, dtype="float32")
    rope = RopeSpec(theta=10000.0, style=RopeStyle.GPTJ)
    rng = np.random.default_rng(0)
    cache = CausalCache(spec, capacity=64, max_sequences=4, window=5, sinks=2, xp=np)
    history: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {0: {}, 1: {}, 2: {}}
    for seqs, positions in [([0] * 7 + [1] * 3, list(range(7)) + [0, 1, 2]), ([1, 2, 0, 2], [3, 0, 7, 1])]:
        plan = cache.start_forward(seqs, positions)
        keys = apply_rope(rng.standard_normal((len(seqs), 2, 8)), positions, rope).astype(np.float32)
        values = rng.standard_normal((len(seqs), 2, 8)).astype(np.float32)
        cache.put(0, keys, values)
        for t, (s, p) in enumerate(zip(seqs, positions, strict=True)):
            history[s][p] = (keys[t], values[t])
    queries = rng.standard_normal((len(seqs), 4, 8))  # 4 query heads over 2 kv heads
    pool = cache.get(0, "pool")
    gathered = cache.get(0, "gathered")
    by_pool = attend(queries, pool.keys, pool.values, pool.bias)
    by_gathered = attend_gathered(queries, gathered.keys, gathered.values, gathered.bias, plan.token_seq)
    for t, (s, p) in enumerate(zip(seqs, positions, strict=True)):
        cached = sorted(history[s])
        sinks = cached[:2]
        seen = [q for q in cached if q <= p and (q > p - 5 or q in sinks)]
        expected = attend_list(queries[t], [history[s][q][0] for q in seen], [history[s][q][1] for q in seen])
        np.testing.assert_allclose(by_pool[t], expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(by_gathered[t], expected, rtol=1e-12, atol=1e-12)


# ---- int8 and mixed storage ---------------------------------------------------------------------------
@pytest.mark.parametrize(("kv_dtype", "ratio"), [("float16", 1.0), ("int8", 0.53125), (("int8", "float16"), 0.765625)])
def test_bytes_per_token(kv_dtype, ratio) -> None:
    spec = KVSpec(num_layers=16, num_kv_heads=8, head_dim=64, dtype="float16")
    cache = CausalCache(spec, capacity=32, max_sequences=1, kv_dtype=kv_dtype, xp=np)
    assert cache.stats().bytes_per_token == 32768 * ratio  # 16 * 2 * 512 * 2 bytes in float16


@pytest.mark.parametrize("kv_dtype", ["int8", ("int8", "float16"), ("float16", "int8")])
def test_int8_pools_quantize_on_put_and_dequantize_in_the_gathered_view(kv_dtype) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
    rng = np.random.default_rng(1)
    cache = CausalCache(spec, capacity=32, max_sequences=2, kv_dtype=kv_dtype, group_size=8, xp=np)
    plan = cache.start_forward([0, 0, 1], [0, 1, 0])
    keys = rng.standard_normal((3, 2, 16)).astype(np.float16)
    values = rng.standard_normal((3, 2, 16)).astype(np.float16)
    cache.put(1, keys, values)
    pool, gathered = cache.get(1, "pool"), cache.get(1, "gathered")
    for which, (rows, stored, scales, staged) in enumerate(
        [(keys, pool.keys, pool.key_scales, gathered.keys), (values, pool.values, pool.value_scales, gathered.values)]
    ):
        quantized = (kv_dtype if isinstance(kv_dtype, str) else kv_dtype[which]) == "int8"
        assert stored.dtype == (np.int8 if quantized else np.float16) and staged.dtype == np.float16
        assert (scales is not None) == quantized
        if quantized:
            assert scales.shape == (plan.n_kv, 4) and scales.dtype == np.float16
        bound = np.abs(rows.astype(np.float32)).reshape(3, 4, 8).max(axis=2) / 254 * 1.01 + 1e-3 if quantized else 0
        restored = dequantized(stored, scales)[plan.slot_mapping].reshape(3, 4, 8)
        assert (np.abs(restored - rows.reshape(3, 4, 8)).max(axis=2) <= bound).all()
        for t, (s, j) in enumerate([(0, 0), (0, 1), (1, 0)]):
            error = np.abs(staged[s, :, j].astype(np.float32) - rows[t].astype(np.float32)).reshape(4, 8).max(axis=1)
            assert (error <= (bound[t] if quantized else 0) + 1e-3 * quantized).all()


# ---- shift ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kv_dtype", "tolerance"), [("float32", 1e-5), ("int8", 0.05)])
def test_remove_then_shift_rerotates_the_later_keys(kv_dtype, tolerance) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=32, dtype="float32")
    rope = RopeSpec(theta=100.0)
    rng = np.random.default_rng(2)
    base = rng.standard_normal((6, 1, 32))
    cache = CausalCache(spec, capacity=32, max_sequences=2, kv_dtype=kv_dtype, xp=np)
    plan = cache.start_forward([0] * 6, list(range(6)))
    rotated = apply_rope(base, np.arange(6), rope).astype(np.float32)
    for layer in range(2):
        cache.put(layer, rotated, rotated)
    cache.copy_prefix(0, 1, 6)  # seq 1 keeps the original: the shift must copy the shared cells first
    cache.remove(0, 1, 3)
    cache.shift(0, -2, rope, begin=3)
    cells, positions = cache.cell_table(0)
    assert positions.tolist() == [0, 1, 2, 3]
    assert (cache.length(0), cache.length(1), cache.length(7), cache.max_sequences) == (4, 6, 0, 2)
    assert cells[0] == plan.slot_mapping[0] and set(cells[1:].tolist()).isdisjoint(plan.slot_mapping.tolist())
    assert cache.stats().cells_shared == 1
    expected = apply_rope(base[[0, 3, 4, 5]], [0, 1, 2, 3], rope)
    for layer in range(2):
        stored = dequantized(cache._pools[0][layer], cache._scales[0][layer])[cells]  # noqa: SLF001
        np.testing.assert_allclose(stored, expected, atol=tolerance)
        original = dequantized(cache._pools[0][layer], cache._scales[0][layer])  # noqa: SLF001
        np.testing.assert_allclose(original[cache.cell_table(1)[0]], rotated, atol=tolerance)
    assert cache.can_resume(0, 4) and not cache.can_resume(0, 6)


# ---- defragmentation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_start_forward_defragments_past_the_threshold_and_views_stay_exact(kv_dtype) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32")
    cache = CausalCache(spec, capacity=128, max_sequences=4, kv_dtype=kv_dtype, xp=np)
    for seq, length in [(0, 40), (1, 40), (2, 10)]:
        step(cache, [seq] * length, list(range(length)))
    cache.remove(1)  # cells 40..79 free: 50 used, n_kv 96 -> fragmentation 0.48
    stats = cache.stats()
    assert (stats.cells_used, stats.n_kv, stats.defrags) == (50, 96, 0)
    plan = step(cache, [2, 0], [10, 40])
    stats = cache.stats()
    assert (stats.defrags, stats.cells_moved, stats.n_kv, stats.cells_used) == (1, 10, 64, 52)
    assert cache.cell_table(2)[0].tolist() == list(range(40, 50)) + [50]
    assert plan.slot_mapping.tolist() == [50, 51]
    gathered = cache.get(1, "gathered")
    for s, (seq, length) in enumerate([(2, 11), (0, 41)]):
        expected = np.stack([code(seq, p, 1, 2, 16) for p in range(length)]).transpose(1, 0, 2)
        tolerance = 0 if kv_dtype == "float32" else 4100 / 254 + 1  # scale / 2
        np.testing.assert_allclose(gathered.keys[s, :, :length], expected, atol=tolerance)


def test_start_forward_without_defrag_leaves_the_holes() -> None:
    """``defrag=False`` (a pass that reads no pool view) plans around the holes past the threshold; the
    next pass that may defragment compacts them."""
    cache = CausalCache(SPEC, capacity=128, max_sequences=4, xp=np)
    for seq, length in [(0, 40), (1, 40), (2, 10)]:
        step(cache, [seq] * length, list(range(length)))
    cache.remove(1)  # fragmentation 0.48, past the default threshold 0.1
    plan = cache.start_forward([2, 0], [10, 40], defrag=False)
    put_all(cache, plan, cache.spec.num_kv_heads, cache.spec.head_dim)
    assert (cache.stats().defrags, plan.n_kv, plan.slot_mapping.tolist()) == (0, 96, [90, 40])
    plan = step(cache, [2, 0], [11, 41])
    assert (cache.stats().defrags, plan.n_kv, cache.stats().cells_used) == (1, 64, 54)
    for seq, length in [(0, 42), (2, 12)]:
        keys = cache.get(0, "gathered").keys[[2, 0].index(seq), 0, :length, 0]
        assert keys.tolist() == [code(seq, p)[0, 0] for p in range(length)]


def test_lengths_of_many_sequences_in_one_call() -> None:
    cache = CausalCache(SPEC, capacity=64, max_sequences=4, xp=np)
    step(cache, [0, 0, 0, 5, 5], [0, 1, 2, 0, 1])
    assert cache.lengths([5, 0, 7]).tolist() == [2, 3, 0]
    assert cache.lengths(np.array([], np.int64)).tolist() == []
    with pytest.raises(DTypeMismatch):
        cache.lengths([0.5])


def test_gathered_lengths_of_a_decode_step_match_its_page_table() -> None:
    """A plain decode step's `gathered_lengths` come from the table lengths, without the page table."""
    cache = CausalCache(SPEC, capacity=64, max_sequences=4, xp=np)
    step(cache, [0] * 5 + [1] * 2, list(range(5)) + [0, 1])
    plan = cache.start_forward([1, 0], [2, 5])
    assert "page_table" not in vars(plan)
    lengths = plan.gathered_lengths
    assert "page_table" not in vars(plan) and lengths.dtype == np.int32
    assert lengths.tolist() == np.diff(plan.page_table.kv_indptr).tolist() == [3, 6]


def test_defrag_forced_and_between_passes() -> None:
    cache = CausalCache(SPEC, capacity=64, max_sequences=4, defrag_threshold=None, xp=np)
    step(cache, [0, 1, 0, 1], [0, 0, 1, 1])
    plan = step(cache, [0, 1], [2, 2])
    assert cache.cell_table(0)[0].tolist() == [0, 1, 5] and cache.cell_table(1)[0].tolist() == [2, 3, 4]
    moves = cache.defrag()  # cell 5 to 2, then cells 2-4 to 3-5
    assert (moves.src.tolist(), moves.dst.tolist(), moves.length.tolist()) == ([5, 2], [2, 3], [1, 3])
    assert cache.cell_table(0)[0].tolist() == [0, 1, 2] and cache.cell_table(1)[0].tolist() == [3, 4, 5]
    with pytest.raises(StalePlan):
        cache.get(0)
    with pytest.raises(StalePlan):
        _ = plan.page_table
    plan = step(cache, [1], [3])
    view = cache.get(0)
    assert np.array_equal(view.keys[[3, 4, 5, 6], 1, 0], [1010.0, 1110.0, 1210.0, 1310.0])


# ---- save / load ----------------------------------------------------------------------------------------------
def test_state_round_trip_is_bit_identical_with_sharing_ring_order_and_scales(tmp_path: Path) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
    kwargs = dict(capacity=32, max_sequences=3, window=3, sinks=1, kv_dtype=("int8", "float16"), xp=np)
    cache = CausalCache(spec, **kwargs)
    step(cache, [0] * 6, list(range(6)))
    cache.copy_prefix(0, 1, 2)
    step(cache, [1, 0], [2, 6])
    state = cache.state_dict()
    path = tmp_path / "cache.safetensors"
    cache.save(str(path))
    for restore in (lambda c: c.load_state_dict(state), lambda c: c.load(str(path))):
        other = CausalCache(spec, **kwargs)
        restore(other)
        assert_state_equal(state, other.state_dict())
        assert other.cell_table(0)[1].tolist() == cache.cell_table(0)[1].tolist()
        assert other.stats() == cache.stats()
        step(other, [0, 1], [7, 3])  # and it goes on like the original


@pytest.mark.parametrize(
    "kwargs",
    [dict(capacity=16, max_sequences=2), dict(capacity=32, max_sequences=2, kv_dtype="int8"),
     dict(capacity=32, max_sequences=2, window=4)],
)
def test_loading_a_file_made_for_another_configuration_changes_nothing(tmp_path: Path, kwargs) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16")
    source = CausalCache(spec, capacity=32, max_sequences=2, xp=np)
    step(source, [0, 0], [0, 1])
    path = tmp_path / "other.safetensors"
    source.save(str(path))
    target = CausalCache(spec, xp=np, **kwargs)
    step(target, [1], [0])
    before = target.state_dict()
    with pytest.raises(SpecMismatch):
        target.load(str(path))
    assert_state_equal(before, target.state_dict())
    with pytest.raises(SpecMismatch):
        CausalCache(KVSpec(2, 2, 16, "float16"), capacity=32, max_sequences=2, xp=np).load(str(path))


def test_inconsistent_state_is_refused() -> None:
    cache = CausalCache(SPEC, capacity=8, max_sequences=2, xp=np)
    step(cache, [0, 0], [0, 1])
    state = cache.state_dict()
    state["cells.refs"] = state["cells.refs"].copy()
    state["cells.refs"][5] = 1
    other = CausalCache(SPEC, capacity=8, max_sequences=2, xp=np)
    before = other.state_dict()
    with pytest.raises(SpecMismatch, match="refs"):
        other.load_state_dict(state)
    assert_state_equal(before, other.state_dict())


# ---- errors: the cache is unchanged after each --------------------------------------------------------------------
def _cache() -> CausalCache:
    cache = CausalCache(SPEC, capacity=8, max_sequences=2, xp=np)
    step(cache, [0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    cache.start_forward([0], [3])
    return cache


ROWS = np.zeros((1, 2, 2), np.float32)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.start_forward([0], [2]), PositionError),  # backwards
        (lambda c: c.start_forward([0], [5]), PositionError),  # skips
        (lambda c: c.start_forward([1, 1], [2, 2]), PositionError),  # duplicate
        (lambda c: c.start_forward([5], [0]), TooManySequences),
        (lambda c: c.start_forward([0, 0, 0, 0], [4, 5, 6, 7]), CacheFull),
        (lambda c: c.start_forward([0, 1], [4]), ShapeMismatch),
        (lambda c: c.remove(7), UnknownSequence),
        (lambda c: c.shift(7, 1, None), UnknownSequence),
        (lambda c: c.copy_prefix(7, 3, 1), UnknownSequence),
        (lambda c: c.copy_prefix(1, 3, 3), PositionError),  # longer than the source
        (lambda c: c.copy_prefix(0, 1, 1), SequenceExists),
        (lambda c: c.put(2, ROWS, ROWS), IndexOutOfRange),  # layer
        (lambda c: c.put(0, ROWS, np.zeros((1, 2, 3), np.float32)), ShapeMismatch),  # values' head_dim
        (lambda c: c.put(0, ROWS, ROWS[0]), ShapeMismatch),  # rank
        (lambda c: c.put(0, np.zeros((2, 2, 2), np.float32), ROWS), ShapeMismatch),  # row count
        (lambda c: c.put(0, ROWS, ROWS.astype(np.float16)), DTypeMismatch),
        (lambda c: c.get(-1), IndexOutOfRange),
        (lambda c: c.get(0, "paged"), ConfigError),
    ],
)
def test_refused_calls_leave_the_cache_unchanged(call, error) -> None:
    cache = _cache()
    before = cache.state_dict()
    with pytest.raises(error):
        call(cache)
    assert_state_equal(before, cache.state_dict())


def test_cache_full_names_asked_and_free() -> None:
    with pytest.raises(CacheFull, match="needs 5 cells, 2 are free") as info:
        _cache().start_forward([0] * 5, [4, 5, 6, 7, 8])
    assert (info.value.asked, info.value.free) == (5, 2)


def test_put_and_get_need_a_current_forward_pass() -> None:
    cache = CausalCache(SPEC, capacity=8, max_sequences=2, xp=np)
    with pytest.raises(NoForwardPass):
        cache.get(0)
    with pytest.raises(NoForwardPass):
        cache.put(0, ROWS, ROWS)
    step(cache, [0, 0], [0, 1])
    cache.remove(0, 1)
    with pytest.raises(StalePlan):  # a StalePlan is a NoForwardPass
        cache.put(0, ROWS, ROWS)


def test_closed_cache_refuses_everything() -> None:
    with CausalCache(SPEC, capacity=8, max_sequences=2, xp=np) as cache:
        step(cache, [0], [0])
    for call in (lambda: cache.get(0), lambda: cache.start_forward([0], [1]), cache.stats, cache.state_dict):
        with pytest.raises(CacheClosed):
            call()
    cache.close()


@pytest.mark.parametrize(
    "kwargs",
    [dict(sinks=1), dict(window=0), dict(defrag_threshold=1.5), dict(kv_dtype="int4"), dict(kv_dtype="int8", group_size=3)],
)
def test_bad_configuration(kwargs) -> None:
    with pytest.raises((ConfigError, DTypeMismatch, ShapeMismatch)):
        CausalCache(SPEC, capacity=8, max_sequences=2, xp=np, **kwargs)


def test_the_cache_implements_the_interface_and_accepts_dlpack_producers() -> None:
    cache = CausalCache(SPEC, capacity=8, max_sequences=2, xp=np)
    assert isinstance(cache, Cache)
    cache.start_forward(np.array([0], np.int32), np.array([0], np.int16))
    keys = np.asfortranarray(np.arange(4, dtype=np.float32).reshape(1, 2, 2))
    cache.put(0, memoryview(np.ascontiguousarray(keys)), keys)  # a buffer and a non-contiguous array
    assert cache.get(0).keys[0].tolist() == [[0.0, 1.0], [2.0, 3.0]]


@pytest.mark.skipif(not cupy_unavailable_reason(), reason="a CUDA device is usable here")
def test_cupy_backend_without_a_device_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVARRAY_BACKEND", "cupy")
    with pytest.raises(BackendUnavailable, match="cupy"):
        CausalCache(SPEC, capacity=8, max_sequences=2)


# ---- the decode shortcuts against the general path -------------------------------------------------
# Each row: what happens between two decode steps of sequences [0, 1, 2] (or the listed ones); the second
# step's page table and bias (whose buffer the first step's bias used) must still be its cell tables'.
BETWEEN_DECODE_STEPS = [
    ("nothing", lambda c: None, [0, 1, 2]),
    ("remove a tail token", lambda c: c.remove(1, 2), [0, 1, 2]),
    ("remove nothing", lambda c: c.remove(1, 5), [0, 1, 2]),
    ("copy_prefix to a new sequence", lambda c: c.copy_prefix(0, 7, 2), [0, 1, 2]),
    ("defrag", lambda c: c.defrag(), [0, 1, 2]),
    ("shift", lambda c: c.shift(2, 3, None, 1), [0, 1, 2]),
    ("another order", lambda c: None, [2, 0, 1]),
    ("fewer sequences", lambda c: None, [0, 2]),
    ("state reloaded", lambda c: c.load_state_dict(c.state_dict()), [0, 1, 2]),
]


@pytest.mark.parametrize(("label", "between", "seqs"), BETWEEN_DECODE_STEPS, ids=[r[0] for r in BETWEEN_DECODE_STEPS])
def test_decode_page_table_and_bias_equal_the_cell_tables(label, between, seqs) -> None:
    cache = CausalCache(SPEC, capacity=64, max_sequences=8, xp=np, defrag_threshold=None)
    for s in (0, 1, 2):
        step(cache, [s] * (4 + s), list(range(4 + s)))
    cache.remove(1, 2)  # holes, so fresh decode cells do not simply follow each table
    first = step(cache, [0, 1, 2], [4, 2, 6])
    _ = first.page_table, first.bias
    between(cache)
    last = {s: int(cache.cell_table(s)[1][-1]) for s in seqs}
    plan = step(cache, seqs, [last[s] + 1 for s in seqs])
    assert plan._table_slots is not None  # a plain decode step: the slots came from start_forward
    pages = plan.page_table
    assert pages.kv_indices.tolist() == [c for s in seqs for c in cache.cell_table(s)[0].tolist()]
    assert pages.kv_indptr.tolist() == np.cumsum([0] + [cache.length(s) for s in seqs]).tolist()
    assert pages.kv_last_page_len.tolist() == [1] * len(seqs)
    # the pool bias (its buffer reused from the first step, only the first step's zeros reset)
    assert plan.bias.tolist() == [[0.0 if c in cache.cell_table(s)[0] else x for c in range(plan.n_kv)] for s in seqs]


def test_a_long_decode_loop_reads_its_page_table_and_bias_from_the_tables() -> None:
    cache = CausalCache(SPEC, capacity=128, max_sequences=4, xp=np)
    for s in range(3):
        step(cache, [s] * 3, [0, 1, 2])
    cache.remove(1, 1)
    positions = {0: 3, 1: 1, 2: 3}
    for _ in range(30):
        plan = step(cache, [0, 1, 2], [positions[s] for s in (0, 1, 2)])
        tables = [cache.cell_table(s)[0].tolist() for s in (0, 1, 2)]
        assert plan.page_table.kv_indices.tolist() == [c for t in tables for c in t]
        assert plan.bias.tolist() == [[0.0 if c in t else x for c in range(plan.n_kv)] for t in tables]
        positions = {s: p + 1 for s, p in positions.items()}


def test_a_plan_current_again_after_a_failed_shift_reads_the_right_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CausalCache(SPEC, capacity=64, max_sequences=8, xp=np, defrag_threshold=None)
    for s in range(4):
        step(cache, [s] * 3, [0, 1, 2])
    cache.remove(0)
    cache.remove(2)
    step(cache, [5, 6], [0, 0])  # the lowest free slots go to 5 and 6: slots no longer in insertion order
    plan = step(cache, [6, 3, 5, 1], [1, 3, 1, 3])
    assert plan._table_slots is not None

    def fail(*args, **kwargs):
        raise RuntimeError("injected rope_shift fault")

    monkeypatch.setattr(ops, "rope_shift", fail)
    with pytest.raises(RuntimeError, match="injected"):
        cache.shift(1, 2, RopeSpec(), begin=1)
    monkeypatch.undo()
    assert plan.is_current()  # all or nothing: the bookkeeping, its tables' slots included, is back
    assert plan.page_table.kv_indices.tolist() == [c for s in (6, 3, 5, 1) for c in cache.cell_table(s)[0].tolist()]


def general_bias(plan) -> np.ndarray:
    """The pool bias by the general path (`visible_pairs`, the mask rule for any batch)."""
    rows, _, cells = plan.visible_pairs()
    bias = np.full((plan.num_tokens, plan.n_kv), -np.inf, np.float32)
    bias[rows, cells] = 0.0
    return bias


def test_plain_decode_bias_and_pairs_equal_the_general_path() -> None:
    rng = np.random.default_rng(5)
    cache = CausalCache(SPEC, capacity=256, max_sequences=8, xp=np, defrag_threshold=None)
    empty = cache.start_forward([], [])  # T = S = 0 on an empty cache: n_kv is 0 too
    assert empty.is_plain_decode and empty.bias.shape == (0, 0) and empty.page_table.kv_indptr.tolist() == [0]
    live: dict[int, int] = {}  # sequence -> next position
    for i in range(120):
        seqs = sorted(live, key=lambda _: rng.random())[: int(rng.integers(1, 9))]
        new = [s for s in range(8) if s not in live]
        if new and (not seqs or rng.random() < 0.3):
            s = new[0]
            n = int(rng.integers(1, 6))
            plan = step(cache, [s] * n, list(range(n)))  # a prefill: the general path
            live[s] = n
        else:
            plan = step(cache, seqs, [live[s] for s in seqs])
            assert plan.is_plain_decode
            for s in seqs:
                live[s] += 1
        assert np.array_equal(plan.bias, general_bias(plan)), i
        for ours, reference in zip(plan._pairs, plan.visible_pairs(), strict=True):
            assert ours.tolist() == reference.tolist()
        if rng.random() < 0.2:  # holes, so decode cells stop following the tables
            s = sorted(live)[int(rng.integers(len(live)))]
            keep = int(rng.integers(0, live[s]))
            cache.remove(s, keep)
            live[s] = keep
            if keep == 0:
                del live[s]


# ---- put_layers: every layer in one call ---------------------------------------------------------------
LAYERS_SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32")


def layered_rows(count: int, seed: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Keys and values ``[3, count, 2, 8]`` of distinct values (layer, token, head and dim all matter)."""
    rng = np.random.default_rng(seed)
    shape = (LAYERS_SPEC.num_layers, count, 2, 8)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def twin_caches(kv_dtype, dtype: str = "float32") -> tuple[CausalCache, CausalCache]:
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype)
    return tuple(
        CausalCache(spec, capacity=32, max_sequences=4, kv_dtype=kv_dtype, group_size=8, xp=np) for _ in range(2)
    )


@pytest.mark.parametrize(
    "kv_dtype, dtype",
    [("float32", "float32"), ("float16", "float16"), ("int8", "float32"), (("int8", "float32"), "float32")],
    ids=["float32", "float16", "int8", "k8v32"],
)
def test_put_layers_equals_a_put_per_layer(kv_dtype, dtype):
    """A prefill of two sequences (5 and 3 tokens), then two decode steps: the pools, scales and
    bookkeeping after `put_layers` are bit for bit those after `put` of each layer."""
    one, each = twin_caches(kv_dtype, dtype)
    assert (one._layers_writer is not None) is (kv_dtype in ("float32", "float16"))  # the one-call kernel
    batches = [([0] * 5 + [1] * 3, list(range(5)) + list(range(3))), ([0, 1], [5, 3]), ([1, 0], [4, 6])]
    for seed, (seqs, positions) in enumerate(batches):
        keys, values = layered_rows(len(seqs), seed, dtype)
        one.start_forward(seqs, positions)
        one.put_layers(keys, values)
        each.start_forward(seqs, positions)
        for layer in range(3):
            each.put(layer, keys[layer], values[layer])
        assert_state_equal(each.state_dict(), one.state_dict())


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("which", ["keys", "values"])
def test_put_layers_refuses_nan_in_any_layer_and_writes_nothing(kv_dtype, which):
    """NaN in the last layer's rows: `NonFiniteValues` naming the array, and no layer written (the
    float32 pools take the one-call kernel, the int8 pools the layer-by-layer path)."""
    from kvarray.errors import NonFiniteValues

    cache, _ = twin_caches(kv_dtype)
    cache.start_forward([0, 0], [0, 1])
    before = cache.state_dict()
    keys, values = layered_rows(2, 7)
    (keys if which == "keys" else values)[2, 1, 0, 3] = np.nan
    with pytest.raises(NonFiniteValues, match=which):
        cache.put_layers(keys, values)
    assert_state_equal(before, cache.state_dict())


@pytest.mark.parametrize(
    "keys_shape, error, match",
    [
        ((2, 2, 2, 8), ShapeMismatch, r"put_layers keys must be \[num_layers = 3, T, kv_heads, head_dim\], got \[2, 2, 2, 8\]"),
        ((3, 2, 16), ShapeMismatch, r"got \[3, 2, 16\]"),
        ((3, 1, 2, 8), ShapeMismatch, "rows"),
        ((3, 2, 2, 4), ShapeMismatch, "kv_heads, head_dim"),
    ],
    ids=["layers", "rank", "tokens", "heads"],
)
def test_put_layers_refuses_bad_shapes_and_writes_nothing(keys_shape, error, match):
    cache, _ = twin_caches("float32")
    cache.start_forward([0, 0], [0, 1])
    before = cache.state_dict()
    _, values = layered_rows(2, 3)
    with pytest.raises(error, match=match):
        cache.put_layers(np.zeros(keys_shape, np.float32), values)
    assert_state_equal(before, cache.state_dict())


def test_put_layers_refuses_a_dtype_and_needs_a_pass():
    cache, _ = twin_caches("float32")
    keys, values = layered_rows(2, 4)
    with pytest.raises(NoForwardPass):
        cache.put_layers(keys, values)
    cache.start_forward([0, 0], [0, 1])
    before = cache.state_dict()
    with pytest.raises(DTypeMismatch):
        cache.put_layers(keys.astype(np.float64), values.astype(np.float64))
    assert_state_equal(before, cache.state_dict())


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_write_rows_later_equals_put_layers_in_the_pass(kv_dtype):
    """Two sequences, the second sharing the first's first 2 cells, then two decode passes without a put
    whose rows are written afterwards with one `write_rows` (in another order, across the passes): the
    state equals `put_layers` in each pass, and the last plan stays current."""
    now, later = twin_caches(kv_dtype)
    for cache in (now, later):
        cache.start_forward([0, 0, 0], [0, 1, 2])
        cache.put_layers(*layered_rows(3, 0))
        cache.copy_prefix(0, 1, 2)
        cache.start_forward([1], [2])
        cache.put_layers(*layered_rows(1, 1))
    passes = []
    for seed, (seqs, positions) in enumerate([([0, 1], [3, 3]), ([1, 0], [4, 4])], start=2):
        keys, values = layered_rows(2, seed)
        now.start_forward(seqs, positions)
        now.put_layers(keys, values)
        plan = later.start_forward(seqs, positions)
        passes.append((seqs, positions, keys, values))
    order = [(1, 1), (1, 0), (0, 1), (0, 0)]  # (pass, token): the last pass first, tokens reversed
    keys = np.stack([passes[p][2][:, t] for p, t in order], axis=1)
    values = np.stack([passes[p][3][:, t] for p, t in order], axis=1)
    later.write_rows([passes[p][0][t] for p, t in order], [passes[p][1][t] for p, t in order], keys, values)
    assert plan.is_current()
    assert_state_equal(now.state_dict(), later.state_dict())


def test_write_rows_writes_a_shared_cell_for_every_owner():
    cache, _ = twin_caches("float32")
    cache.start_forward([0, 0, 0], [0, 1, 2])
    cache.put_layers(*layered_rows(3, 0))
    cache.copy_prefix(0, 1, 2)
    keys, values = layered_rows(1, 9)
    cache.write_rows([1], [1], keys, values)
    cell = int(cache.cell_table(0)[0][1])
    assert cell == int(cache.cell_table(1)[0][1])
    cache.start_forward([0, 1], [3, 2])
    assert np.array_equal(cache.get(2, "gathered").keys[:, :, 1], keys[2, [0, 0]])  # both sequences' row 1


@pytest.mark.parametrize(
    "seqs, positions, shape, error, match",
    [
        ([5], [0], (3, 1, 2, 8), UnknownSequence, "5"),
        ([0], [3], (3, 1, 2, 8), PositionError, "holds no cell at position 3"),
        ([0, 0], [1, 1], (3, 2, 2, 8), PositionError, "one cell twice"),
        ([0, 1], [0, 0], (3, 2, 2, 8), PositionError, "one cell twice"),  # a shared cell, named twice
        ([0], [0, 1], (3, 1, 2, 8), ShapeMismatch, "seq_ids and positions"),
        ([0], [0], (2, 1, 2, 8), ShapeMismatch, "write_rows keys must be"),
        ([0], [0.5], (3, 1, 2, 8), DTypeMismatch, "positions must be integers"),
    ],
    ids=["unknown", "not-held", "twice", "shared-twice", "lengths", "layers", "float"],
)
def test_write_rows_refuses_and_writes_nothing(seqs, positions, shape, error, match):
    cache, _ = twin_caches("float32")
    cache.start_forward([0, 0, 0], [0, 1, 2])
    cache.put_layers(*layered_rows(3, 0))
    cache.copy_prefix(0, 1, 2)
    before = cache.state_dict()
    with pytest.raises(error, match=match):
        cache.write_rows(seqs, positions, np.ones(shape, np.float32), np.ones(shape, np.float32))
    assert_state_equal(before, cache.state_dict())


def test_write_rows_refuses_nan_and_writes_nothing():
    from kvarray.errors import NonFiniteValues

    cache, _ = twin_caches("float32")
    cache.start_forward([0, 0], [0, 1])
    cache.put_layers(*layered_rows(2, 0))
    before = cache.state_dict()
    keys, values = layered_rows(2, 1)
    values[2, 1, 0, 3] = np.nan
    with pytest.raises(NonFiniteValues, match="values"):
        cache.write_rows([0, 0], [0, 1], keys, values)
    assert_state_equal(before, cache.state_dict())

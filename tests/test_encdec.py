"""EncoderDecoderCache: one start_forward for both caches (rolled back together), fork and reorder for
beam search (cross entries shared, never copied), remove cleaning both, save/load of both."""

from __future__ import annotations

import numpy as np
import pytest

from kvarray.causal import CausalCache
from kvarray.encdec import EncoderDecoderCache, _reorder_ops
from kvarray.encoder import EncoderCache
from kvarray.errors import (
    CacheFull,
    ConfigError,
    NoEncoderEntry,
    PositionError,
    SequenceExists,
    SpecMismatch,
    TooManySequences,
    UnknownSequence,
)
from kvarray.interface import Cache
from kvarray.spec import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32")
MODALITIES = {"text": "float32", "audio": "float16"}


def make_cache(cells: int = 32, max_sequences: int = 6) -> EncoderDecoderCache:
    causal = CausalCache(SPEC, cells, max_sequences, kv_dtype="float32", defrag_threshold=None, xp=np)
    encoder = EncoderCache(SPEC, 32, max_sequences, MODALITIES, xp=np)
    return EncoderDecoderCache(causal, encoder)


def encode(cache: EncoderDecoderCache, seq: int, m: int, modality: str = "audio") -> None:
    for layer in range(SPEC.num_layers):
        keys = np.full((m, 2, 32), 100 * seq + layer, np.float32)
        cache.put_cross(seq, layer, keys, -keys, modality)


def step(cache: EncoderDecoderCache, seq_ids: list[int], positions: list[int]) -> None:
    """One decoder pass; token t's self-attention keys are 1000 * seq + position."""
    plan = cache.start_forward(seq_ids, positions)
    for layer in range(SPEC.num_layers):
        rows = np.repeat((1000.0 * np.asarray(seq_ids) + np.asarray(positions))[:, None, None], 2, 1)
        rows = np.repeat(rows, 32, 2).astype(np.float32)
        cache.put(layer, rows, -rows)
    assert plan.slot_mapping.shape == (len(seq_ids),)


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name


def cells_of(cache: EncoderDecoderCache, seq: int) -> list[int]:
    return cache.causal.cell_table(seq)[0].tolist()


def test_one_start_forward_drives_both() -> None:
    cache = make_cache()
    encode(cache, 1, 3)
    encode(cache, 2, 2, "text")
    step(cache, [1, 1, 2], [0, 1, 0])
    self_view, cross = cache.get(0), cache.get_cross(0)
    assert self_view.bias.shape == (3, 32)
    x = -np.inf
    np.testing.assert_array_equal(cross.bias, [[0, 0, 0, x, x],
                                               [0, 0, 0, x, x],
                                               [x, x, x, 0, 0]])
    assert cross.keys.shape == (5, 2, 32) and not cross.zero_copy  # float16 then float32 entries: staged
    np.testing.assert_array_equal(cross.keys[:3], 100.0)
    np.testing.assert_array_equal(cross.keys[3:], 200.0)
    stats = cache.stats()
    assert stats.self_attention.cells_used == 3 and stats.cross.cells_used == {"float16": 3, "float32": 2}


def test_causal_refusal_rolls_back_the_encoder_plan() -> None:
    cache = make_cache(cells=4)
    encode(cache, 1, 3)
    encode(cache, 2, 2)
    step(cache, [1], [0])
    plan = cache.plan
    before = cache.state_dict()
    with pytest.raises(CacheFull):  # 5 new decoder tokens, 3 free cells
        cache.start_forward([2, 2, 2, 2, 2], [0, 1, 2, 3, 4])
    assert_same_state(before, cache.state_dict())
    assert cache.plan is plan and cache.encoder.plan is plan.cross
    assert cache.get_cross(0).keys.shape == (3, 2, 32)  # the previous pass still reads as before


def test_encoder_refusal_leaves_the_decoder_untouched() -> None:
    cache = make_cache()
    encode(cache, 1, 3)
    step(cache, [1], [0])
    before = cache.state_dict()
    with pytest.raises(NoEncoderEntry):
        cache.start_forward([1, 7], [1, 0])
    assert_same_state(before, cache.state_dict())
    assert cache.causal.sequences() == [1]


def test_fork_shares_encoder_entry_and_decoder_prefix() -> None:
    cache = make_cache()
    encode(cache, 1, 4)
    step(cache, [1], [0])
    step(cache, [1], [1])
    used = cache.stats()
    cache.fork(1, 2)
    cache.fork(1, 3)
    assert cells_of(cache, 2) == cells_of(cache, 3) == cells_of(cache, 1) == [0, 1]
    entry = cache.encoder.entry(2)
    assert (entry.start, entry.refs) == (cache.encoder.entry(1).start, 3)
    after = cache.stats()
    assert after.cross.cells_used == used.cross.cells_used  # no encoder rows copied
    assert after.self_attention.cells_used == used.self_attention.cells_used  # no decoder cells copied
    step(cache, [1, 2, 3], [2, 2, 2])  # three beams read one cross entry, zero-copy
    cross = cache.get_cross(1)
    assert cross.zero_copy and cross.keys.shape == (4, 2, 32)
    np.testing.assert_array_equal(cross.bias, np.zeros((3, 4)))
    assert np.shares_memory(cross.keys, cache.encoder.pools(1, "float16")[0])


def test_fork_refusals_change_nothing() -> None:
    cache = make_cache(max_sequences=2)
    encode(cache, 1, 4)
    encode(cache, 2, 1)
    step(cache, [1], [0])
    before = cache.state_dict()
    for call, error in [
        (lambda: cache.fork(1, 2), SequenceExists),
        (lambda: cache.fork(5, 6), NoEncoderEntry),
        (lambda: cache.fork(1, 3), TooManySequences),
        (lambda: cache.copy_prefix(1, 3, 5), TooManySequences),
    ]:
        with pytest.raises(error):
            call()
        assert_same_state(before, cache.state_dict())


def beams(cache: EncoderDecoderCache) -> dict[int, list[int]]:
    """Three beams of sequence 1 that decoded different tokens; returns their cell tables."""
    encode(cache, 1, 4)
    step(cache, [1], [0])
    step(cache, [1], [1])
    cache.fork(1, 2)
    cache.fork(1, 3)
    step(cache, [1, 2, 3], [2, 2, 2])
    tables = {b: cells_of(cache, b) for b in (1, 2, 3)}
    assert tables == {1: [0, 1, 2], 2: [0, 1, 3], 3: [0, 1, 4]}
    return tables


REORDER_CASES = [
    # beams, parents, expected new table source per beam
    pytest.param([1, 2, 3], [2, 2, 1], {1: 2, 2: 2, 3: 1}, id="fan-out"),
    pytest.param([1, 2], [2, 1], {1: 2, 2: 1, 3: 3}, id="swap"),
    pytest.param([1, 2, 3], [2, 3, 1], {1: 2, 2: 3, 3: 1}, id="rotation"),
    pytest.param([1, 2, 3], [1, 1, 1], {1: 1, 2: 1, 3: 1}, id="all-from-the-best"),
    pytest.param([3], [3], {1: 1, 2: 2, 3: 3}, id="unchanged"),
]


@pytest.mark.parametrize(("beam_ids", "parents", "source"), REORDER_CASES)
def test_reorder_repoints_prefixes_and_keeps_cross_entries(beam_ids, parents, source) -> None:
    cache = make_cache()
    old = beams(cache)
    entry = cache.encoder.entry(1)
    cross_before = {k: v for k, v in cache.encoder.state_dict().items()}
    cache.reorder(beam_ids, parents)
    assert {b: cells_of(cache, b) for b in (1, 2, 3)} == {b: old[source[b]] for b in (1, 2, 3)}
    assert sorted(cache.causal.sequences()) == [1, 2, 3]  # the temporary of a cycle is gone
    assert cache.encoder.entry(3) == entry  # same rows, same three references
    assert_same_state(cross_before, cache.encoder.state_dict())
    step(cache, [1, 2, 3], [3, 3, 3])  # the beams go on decoding
    view = cache.get(0)
    kept = sorted(set(sum(old.values(), [])) & set(sum((cells_of(cache, b) for b in (1, 2, 3)), [])))
    assert (view.keys[kept] != 0).all()


def test_reorder_ops_break_a_cycle_first() -> None:
    assert _reorder_ops({1: 2, 2: 1}, -1) == [("copy", 1, -1), ("copy", 2, 1), ("copy", -1, 2), ("drop", -1)]
    assert _reorder_ops({1: 2, 3: 2}, -1) == [("copy", 2, 1), ("copy", 2, 3)]


def test_reorder_refusals_change_nothing() -> None:
    cache = make_cache(max_sequences=4)
    beams(cache)
    encode(cache, 4, 2, "text")
    before = cache.state_dict()
    for call, error in [
        (lambda: cache.reorder([1, 4], [4, 1]), ConfigError),  # another request's encoder entry
        (lambda: cache.reorder([1, 2], [2]), ConfigError),
        (lambda: cache.reorder([1, 1], [2, 3]), ConfigError),
        (lambda: cache.reorder([9], [1]), UnknownSequence),
    ]:
        with pytest.raises(error):
            call()
        assert_same_state(before, cache.state_dict())
    full = make_cache(max_sequences=3)
    beams(full)
    before = full.state_dict()
    with pytest.raises(TooManySequences):  # a swap needs one temporary sequence
        full.reorder([1, 2], [2, 1])
    assert_same_state(before, full.state_dict())


def test_remove_cleans_both() -> None:
    cache = make_cache()
    beams(cache)
    cache.remove(2)
    assert cache.causal.sequences() == [1, 3] and cache.encoder.sequences() == [1, 3]
    assert cache.encoder.entry(1).refs == 2
    assert cache.remove(1, begin=2) == 1  # a range drops decoder tokens only
    assert cells_of(cache, 1) == [0, 1] and cache.encoder.entry(1).refs == 2
    cache.remove(1)
    cache.remove(3)
    stats = cache.stats()
    assert stats.self_attention.cells_used == 0 and stats.cross.cells_used == {"float16": 0, "float32": 0}
    encode(cache, 5, 2)
    cache.remove(5)  # an entry that never decoded
    with pytest.raises(UnknownSequence):
        cache.remove(5)
    with pytest.raises(PositionError):
        encode(cache, 6, 2)
        step(cache, [6], [0])
        cache.remove(6, begin=-1)


def test_save_load_both_bit_identical(tmp_path) -> None:
    cache = make_cache()
    beams(cache)
    encode(cache, 4, 3, "text")
    cache.remove(2)
    saved = cache.state_dict()
    cache.save(tmp_path / "encdec.safetensors")
    fresh = make_cache()
    fresh.load(tmp_path / "encdec.safetensors")
    assert_same_state(saved, fresh.state_dict())
    assert fresh.encoder.shares_entry(1, 3) and cells_of(fresh, 3) == cells_of(cache, 3)
    step(fresh, [1, 3, 4], [3, 3, 0])  # the restored cache goes on
    assert fresh.get_cross(0).keys.shape == (7, 2, 32)
    other = EncoderDecoderCache(CausalCache(SPEC, 16, 6, kv_dtype="float32", xp=np),
                                EncoderCache(SPEC, 32, 6, MODALITIES, xp=np))
    before = other.state_dict()
    with pytest.raises(SpecMismatch):
        other.load_state_dict(saved)
    assert_same_state(before, other.state_dict())
    with pytest.raises(SpecMismatch):
        cache.encoder.load(tmp_path / "encdec.safetensors")  # not an encoder-only file


def test_mismatched_caches_are_refused() -> None:
    with pytest.raises(ConfigError):
        EncoderDecoderCache(CausalCache(SPEC, 8, 2, xp=np),
                            EncoderCache(KVSpec(3, 2, 32, "float32"), 8, 2, MODALITIES, xp=np))


def test_behind_the_shared_interface_and_fork_before_decoding() -> None:
    cache = make_cache()
    assert isinstance(cache, Cache)
    encode(cache, 1, 3)
    cache.fork(1, 2)  # beams made right after the encoder pass: nothing decoded yet
    assert cache.causal.sequences() == [] and cache.encoder.entry(2).refs == 2
    assert cache.can_resume(2, 0) and not cache.can_resume(7, 0)
    step(cache, [1, 2], [0, 0])
    assert cells_of(cache, 1) != cells_of(cache, 2)

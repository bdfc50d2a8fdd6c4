"""`DecodeMirror` against a plain-Python model of each sequence's rows: random decode passes in any order,
sequences joining and leaving, held-back rows written back; and which sequences move when others leave."""

from __future__ import annotations

import numpy as np
import pytest

from kvarray import CausalCache, KVSpec
from kvarray.ort.native import DecodeMirror

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")


def new_cache() -> CausalCache:
    return CausalCache(SPEC, capacity=1024, max_sequences=8, xp=np)


def rows(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values ``[layers, count, H, D]``."""
    shape = (SPEC.num_layers, count, SPEC.num_kv_heads, SPEC.head_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


class Model:
    """The cache and its mirror driven like the engine's decode view, with each sequence's rows kept in
    lists (``keys[seq]``: one ``[layers, H, D]`` row per position)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.cache, self.mirror = new_cache(), DecodeMirror(SPEC.num_layers, SPEC.num_kv_heads, SPEC.head_dim)
        self.keys: dict[int, list[np.ndarray]] = {}
        self.values: dict[int, list[np.ndarray]] = {}

    def prefill(self, seq: int, length: int) -> None:
        """A prompt pass on the pool (its rows `put`)."""
        keys, values = rows(self.rng, length)
        self.cache.start_forward([seq] * length, list(range(length)))
        self.cache.put_layers(keys, values)
        self.keys[seq] = list(keys.transpose(1, 0, 2, 3))
        self.values[seq] = list(values.transpose(1, 0, 2, 3))

    def leave(self, seq: int) -> None:
        self.cache.remove(seq)
        del self.keys[seq], self.values[seq]

    def decode(self, seqs: list[int]) -> np.ndarray:
        """A decode pass of `seqs` over the mirror; checks every staged row, then writes each sequence's
        new row where the graph would (its slot, row ``past``); the slot of each sequence ``[S]``."""
        past = [len(self.keys[s]) for s in seqs]
        plan = self.cache.start_forward(seqs, past, False)
        keys, values = self.mirror.stage(self.cache, plan)
        assert len(keys) == SPEC.num_layers and keys[0].shape[0] == len(seqs)
        slot_of = np.arange(len(seqs)) if self.mirror.slot_of is None else self.mirror.slot_of
        assert sorted(slot_of.tolist()) == list(range(len(seqs)))
        new_keys, new_values = rows(self.rng, len(seqs))
        for i, (seq, length) in enumerate(zip(seqs, past, strict=True)):
            want_k = np.stack(self.keys[seq], 2)  # [layers, H, past, D]
            want_v = np.stack(self.values[seq], 2)
            for layer in range(SPEC.num_layers):
                np.testing.assert_array_equal(keys[layer][slot_of[i], :, :length], want_k[layer])
                np.testing.assert_array_equal(values[layer][slot_of[i], :, :length], want_v[layer])
                keys[layer][slot_of[i], :, length] = new_keys[layer, i]
                values[layer][slot_of[i], :, length] = new_values[layer, i]
            self.keys[seq].append(new_keys[:, i])
            self.values[seq].append(new_values[:, i])
        self.mirror.commit()
        mine_k, mine_v = self.mirror.new_rows()  # the pass's rows, in its order
        np.testing.assert_array_equal(mine_k, new_keys)
        np.testing.assert_array_equal(mine_v, new_values)
        return slot_of

    def check_pool(self) -> None:
        """After a write-back, the pool holds every row of every sequence."""
        self.mirror.write_back(self.cache)
        for seq in self.keys:
            cells, positions = self.cache.cell_table(seq)
            assert positions.tolist() == list(range(len(self.keys[seq])))
            for layer in range(SPEC.num_layers):
                pool = self.cache.get(layer, "pool")
                np.testing.assert_array_equal(pool.keys[cells], np.stack(self.keys[seq])[:, layer])
                np.testing.assert_array_equal(pool.values[cells], np.stack(self.values[seq])[:, layer])


@pytest.mark.parametrize("seed", range(6))
def test_random_passes_read_every_row_and_write_every_row_back(seed):
    """Decode passes of the live sequences in random orders (now and then a subset: a retry), with
    sequences joining and finishing between them: the staged past of every sequence equals its rows, the
    pass's rows come back in its order, and every held-back row reaches the pool."""
    model = Model(seed)
    rng, next_seq = model.rng, 0
    for _ in range(3):
        model.prefill(next_seq, int(rng.integers(1, 9)))
        next_seq += 1
    for step in range(60):
        live = list(model.keys)
        if live and rng.random() < 0.15:
            model.leave(int(rng.choice(live)))
        if len(model.keys) < 6 and rng.random() < 0.2:
            model.prefill(next_seq, int(rng.integers(1, 9)))
            next_seq += 1
        live = [int(s) for s in rng.permutation(list(model.keys))]
        if rng.random() < 0.2 and len(live) > 1:
            live = live[: len(live) // 2]
        if live:
            model.decode(live)
        if step % 13 == 12:
            model.check_pool()
    model.check_pool()
    assert model.mirror.written_rows > 0 and model.mirror.moved_rows > 0


def test_when_sequences_leave_only_those_of_the_top_slots_move():
    """Six sequences decode in slots 0-5; the ones in slots 0 and 2 finish: the four others keep running,
    in the same order. Slots 1 and 3 stay; the sequences of slots 4 and 5 move to 0 and 2, and nothing
    is copied from the pool."""
    model = Model(0)
    for seq in range(6):
        model.prefill(seq, 3 + seq)
    assert model.decode(list(range(6))).tolist() == list(range(6))
    copied = model.mirror.copied_rows
    model.decode(list(range(6)))
    model.leave(0)
    model.leave(2)
    slot_of = model.decode([1, 3, 4, 5])
    assert slot_of.tolist() == [1, 3, 0, 2]
    moved = (3 + 4 + 2) + (3 + 5 + 2)  # the rows of sequences 4 and 5: prompts, then two passes
    assert model.mirror.moved_rows == moved
    assert model.mirror.copied_rows == copied
    for _ in range(3):  # a run of passes keeps the slots
        assert model.decode([1, 3, 4, 5]).tolist() == [1, 3, 0, 2]
    assert model.decode([4, 1, 5, 3]).tolist() == [0, 1, 2, 3]  # another order: each keeps its slot
    assert model.mirror.moved_rows == moved and model.mirror.copied_rows == copied
    model.check_pool()


def test_growing_keeps_the_rows_held():
    """The mirror grows its slots (to powers of two) as sequences join and its rows (to multiples of 256)
    as they pass 256 positions: the rows it held stay, held-back ones included, so each prompt is copied
    from the pool once."""
    model = Model(1)
    model.prefill(0, 250)
    for _ in range(3):
        model.decode([0])
    assert model.mirror.keys[0].shape[:3] == (1, SPEC.num_kv_heads, 256)
    model.prefill(1, 5)
    model.prefill(2, 7)
    for _ in range(5):  # sequence 0 passes 256 positions
        model.decode([0, 1, 2])
    assert model.mirror.keys[0].shape[:3] == (4, SPEC.num_kv_heads, 512)
    model.prefill(3, 4)
    model.prefill(4, 6)
    model.decode([4, 3, 2, 1, 0])
    assert model.mirror.keys[0].shape[0] == 8
    assert model.mirror.copied_rows == 250 + 5 + 7 + 4 + 6 and model.mirror.moved_rows == 0
    model.check_pool()


def test_a_restage_that_fails_empties_the_mirror_and_loses_no_row(monkeypatch):
    """Six sequences decode (their rows held back in the mirror); a retry-like pass over 1, 3, 4, 5 and a
    new sequence 6 moves sequence 5 into slot 0 of sequence 0 (alive, not in the pass), then fails while
    reading the pool. The error propagates, every held-back row reaches the pool, and the next pass over
    all seven reads every row right (the slots no longer claim what a move overwrote)."""
    model = Model(2)
    for seq in range(6):
        model.prefill(seq, 2 + seq)
    for _ in range(2):
        model.decode(list(range(6)))
    model.prefill(6, 5)
    get = CausalCache.get

    def failing(self, *args, **kwargs):
        monkeypatch.setattr(CausalCache, "get", get)  # once
        raise RuntimeError("pool unreadable")

    monkeypatch.setattr(CausalCache, "get", failing)
    seqs = [1, 3, 4, 5, 6]
    plan = model.cache.start_forward(seqs, [len(model.keys[s]) for s in seqs], False)
    moved = model.mirror.moved_rows
    with pytest.raises(RuntimeError, match="pool unreadable"):
        model.mirror.stage(model.cache, plan)
    assert model.mirror.moved_rows > moved  # the failure came after a move
    assert len(model.mirror.sequences) == 0 and model.mirror.slot_of is None
    model.cache.abort_forward()
    copied = model.mirror.copied_rows
    model.decode(list(range(7)))  # every past copied from the pool, and checked row by row
    assert model.mirror.copied_rows - copied == sum(len(model.keys[s]) - 1 for s in range(7))
    model.check_pool()

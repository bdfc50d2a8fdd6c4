"""Property test: add / fork / read / remove cycles on an EncoderCache against a plain-Python model.

The model keeps, per storage dtype, a list of booleans (row used) and, per sequence, its modality, its
input K/V and the entry it shares. First fit is checked exactly: a new entry must start at the first run
of free rows long enough for it, and `CacheFull` must come exactly when no such run exists. After every
step no row is leaked: the cache's used rows are the model's, and an emptied cache is one free extent.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvarray.encoder import EncoderCache
from kvarray.errors import CacheFull, TooManySequences
from kvarray.spec import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=1, head_dim=32, dtype="float32")
MODALITIES = {"text": "float32", "audio": "float16", "image": "int8"}
CAPACITY = 24
MAX_SEQUENCES = 6
LENGTHS = st.lists(st.integers(1, 9), min_size=1, max_size=3)
TOLERANCE = {"float32": 0.0, "float16": 1e-3, "int8": 0.05}


def first_free_run(used: list[bool], n: int) -> int | None:
    run = 0
    for row, busy in enumerate(used):
        run = 0 if busy else run + 1
        if run == n:
            return row - n + 1
    return None


class EncoderMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = EncoderCache(SPEC, CAPACITY, MAX_SEQUENCES, MODALITIES, xp=np)
        self.used = {d: [False] * CAPACITY for d in set(MODALITIES.values())}
        self.seqs: dict[int, tuple[str, np.ndarray]] = {}  # seq -> (modality, K/V [layers, 2, M, H, D])
        self.owner: dict[int, int] = {}  # seq -> the sequence whose put made its entry
        self.next_id = 0

    @rule(modality=st.sampled_from(sorted(MODALITIES)), lengths=LENGTHS)
    def add(self, modality: str, lengths: list[int]) -> None:
        ids = list(range(self.next_id, self.next_id + len(lengths)))
        self.next_id += len(lengths)
        rng = np.random.default_rng(self.next_id)
        data = [rng.standard_normal((SPEC.num_layers, 2, m, 1, 32)).astype(np.float32) for m in lengths]
        dtype = MODALITIES[modality]
        # the model's first fit: one block for the whole batch if it fits, else one by one
        used = list(self.used[dtype])
        block = first_free_run(used, sum(lengths))
        starts: list[int] | None = []
        for m in lengths:
            start = block + sum(lengths[: len(starts)]) if block is not None else first_free_run(used, m)
            if start is None:
                starts = None
                break
            used[start : start + m] = [True] * m
            starts.append(start)
        too_many = len(self.seqs) + len(lengths) > MAX_SEQUENCES
        try:
            for layer in range(SPEC.num_layers):
                keys = np.concatenate([d[layer, 0] for d in data])
                values = np.concatenate([d[layer, 1] for d in data])
                self.cache.put_batch(ids, layer, keys, values, lengths, modality)
        except TooManySequences:
            assert too_many
            return
        except CacheFull as full:
            assert starts is None and not too_many
            assert (full.asked, full.free) == (sum(lengths), self.used[dtype].count(False))
            return
        assert starts is not None and not too_many
        assert [self.cache.entry(s).start for s in ids] == starts
        self.used[dtype] = used
        for seq, d in zip(ids, data, strict=True):
            self.seqs[seq] = (modality, d)
            self.owner[seq] = seq

    @precondition(lambda self: self.seqs and len(self.seqs) < MAX_SEQUENCES)
    @rule(pick=st.integers(0, 100))
    def fork(self, pick: int) -> None:
        src = sorted(self.seqs)[pick % len(self.seqs)]
        dst = self.next_id
        self.next_id += 1
        self.cache.fork(src, dst)
        self.seqs[dst] = self.seqs[src]
        self.owner[dst] = self.owner[src]

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 100))
    def remove(self, pick: int) -> None:
        seq = sorted(self.seqs)[pick % len(self.seqs)]
        entry = self.cache.entry(seq)
        self.cache.remove(seq)
        owner = self.owner.pop(seq)
        del self.seqs[seq]
        if owner not in self.owner.values():  # the last reference: its rows are free again
            self.used[entry.dtype][entry.start : entry.start + entry.length] = [False] * entry.length

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        batch = data.draw(st.lists(st.sampled_from(sorted(self.seqs)), min_size=1, max_size=4, unique=True))
        plan = self.cache.start_forward(batch, [0] * len(batch))
        layer = data.draw(st.integers(0, SPEC.num_layers - 1))
        view, gathered = self.cache.get(layer), self.cache.get(layer, view="gathered")
        for s, seq in enumerate(batch):
            modality, kv = self.seqs[seq]
            tol = TOLERANCE[MODALITIES[modality]] * (1 + np.abs(kv).max())
            lo, m = int(plan.offsets[s]), kv.shape[2]
            np.testing.assert_allclose(view.keys[lo : lo + m], kv[layer, 0], atol=tol)
            np.testing.assert_allclose(view.values[lo : lo + m], kv[layer, 1], atol=tol)
            np.testing.assert_allclose(gathered.keys[s, :, :m].transpose(1, 0, 2), kv[layer, 0], atol=tol)
            assert (view.bias[s, lo : lo + m] == 0).all()
            assert np.isinf(view.bias[s]).sum() == view.keys.shape[0] - m

    @invariant()
    def no_leaked_rows(self) -> None:
        stats = self.cache.stats()
        for dtype, used in self.used.items():
            assert stats.cells_used[dtype] == sum(used)
            assert stats.cells_free[dtype] == CAPACITY - sum(used)
            assert stats.largest_free[dtype] == max((first_free_run(used, n) is not None) * n for n in
                                                    range(CAPACITY + 1))
        assert stats.sequences == len(self.seqs) and stats.entries == len(set(self.owner.values()))
        if not self.seqs:
            assert all(stats.largest_free[d] == CAPACITY for d in self.used)


EncoderMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
TestEncoderMachine = EncoderMachine.TestCase

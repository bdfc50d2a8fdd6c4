"""CausalCache against a plain-Python model: random start_forward/put/remove/copy_prefix/shift/defrag/
save-load, checking after every step that every view returns exactly the model's keys and values (int8
within its bound) and that no cell leaks."""

# ruff: noqa: E501 - table rows and expected grids stay one per line

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvarray.attention import (
    ModelToken,
    attend,
    attend_list,
    dequantized,
    int8_tolerance,
    shift_model,
)
from kvarray.causal import CausalCache
from kvarray.errors import CacheFull, PositionError, SequenceExists, TooManySequences, UnknownSequence
from kvarray.spec import KVSpec, RopeSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
ROPE = RopeSpec(theta=100.0)
SEQ_IDS = st.integers(0, 4)


class CacheMachine(RuleBasedStateMachine):
    window: int | None = None
    sinks = 0
    kv_dtype: str | tuple[str, str] = "float16"
    capacity = 24

    @initialize()
    def create(self) -> None:
        self.cache = CausalCache(
            SPEC, capacity=self.capacity, max_sequences=3, window=self.window, sinks=self.sinks,
            kv_dtype=self.kv_dtype, group_size=8, defrag_threshold=0.3, xp=np,
        )
        self.model: dict[int, dict[int, ModelToken]] = {}
        self.rng = np.random.default_rng(0)
        self.storage = self.cache.kv_dtype

    # ---- the model's rules ---------------------------------------------------------------------------------
    def visible(self, seq: int, position: int) -> list[int]:
        """The model's positions that a token of `seq` at `position` sees (its own included once cached)."""
        cached = sorted(self.model.get(seq, {}))
        sinks = set(cached[: self.sinks])
        window = self.window
        return [q for q in cached if q <= position and (window is None or q > position - window or q in sinks)]

    def evict(self, seq: int, first_position: int) -> None:
        """Ring windows: positions the batch's first token cannot see are dropped (sinks stay)."""
        if self.window is None or seq not in self.model:
            return
        cached = sorted(self.model[seq])
        for q in cached[self.sinks :]:
            if q <= first_position - self.window:
                del self.model[seq][q]

    # ---- rules -------------------------------------------------------------------------------------------
    @rule(data=st.data())
    def forward(self, data: st.DataObject) -> None:
        seqs = data.draw(st.lists(SEQ_IDS, min_size=1, max_size=3, unique=True), label="sequences")
        labels: list[int] = []
        starts = {}
        for seq in seqs:
            labels += [seq] * data.draw(st.integers(1, 4), label=f"tokens of {seq}")
            last = max(self.model[seq]) if seq in self.model else None
            starts[seq] = last + 1 if last is not None else data.draw(st.integers(0, 3), label="start")
        labels = data.draw(st.permutations(labels), label="interleaving")
        positions, nxt = [], dict(starts)
        for seq in labels:
            positions.append(nxt[seq])
            nxt[seq] += 1
        before = self.cache.state_dict()
        try:
            plan = self.cache.start_forward(labels, positions)
        except (CacheFull, TooManySequences):
            assert_same(before, self.cache.state_dict())
            return
        count = len(labels)
        keys = self.rng.standard_normal((SPEC.num_layers, count, 2, 8)).astype(np.float16)
        values = self.rng.standard_normal((SPEC.num_layers, count, 2, 8)).astype(np.float16)
        for layer in range(SPEC.num_layers):
            self.cache.put(layer, keys[layer], values[layer])
        for seq in seqs:
            self.evict(seq, starts[seq])
        for t, (seq, pos) in enumerate(zip(labels, positions, strict=True)):
            k, v = keys[:, t].astype(np.float64), values[:, t].astype(np.float64)
            tol_k = int8_tolerance(keys[:, t], self.storage[0])
            tok = ModelToken(k, v, tol_k, int8_tolerance(values[:, t], self.storage[1]))
            self.model.setdefault(seq, {})[pos] = tok
        self.check_views(plan, labels, positions)

    @rule(seq=SEQ_IDS, begin=st.integers(0, 12), length=st.none() | st.integers(0, 6))
    def remove(self, seq: int, begin: int, length: int | None) -> None:
        end = None if length is None else begin + length
        if seq not in self.model:
            self.refused(lambda: self.cache.remove(seq, begin, end), UnknownSequence)
            return
        removed = self.cache.remove(seq, begin, end)
        doomed = [q for q in self.model[seq] if q >= begin and (end is None or q < end)]
        assert removed == len(doomed)
        for q in doomed:
            del self.model[seq][q]
        if not self.model[seq]:
            del self.model[seq]

    @rule(src=SEQ_IDS, dst=SEQ_IDS, length=st.integers(0, 8))
    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        call = lambda: self.cache.copy_prefix(src, dst, length)  # noqa: E731
        if src not in self.model:
            return self.refused(call, UnknownSequence)
        if length > len(self.model[src]):
            return self.refused(call, PositionError)
        if dst in self.model:
            return self.refused(call, SequenceExists)
        if length and len(self.model) >= 3:
            return self.refused(call, TooManySequences)
        call()
        if length:
            self.model[dst] = {q: self.model[src][q] for q in sorted(self.model[src])[:length]}

    @rule(seq=SEQ_IDS, begin=st.integers(0, 12), delta=st.integers(-4, 4))
    def shift(self, seq: int, begin: int, delta: int) -> None:
        call = lambda: self.cache.shift(seq, delta, ROPE, begin=begin)  # noqa: E731
        if seq not in self.model:
            return self.refused(call, UnknownSequence)
        cached = sorted(self.model[seq])
        moving = [q for q in cached if q >= begin]
        kept = [q for q in cached if q < begin]
        if moving and delta and moving[0] + delta < (kept[-1] + 1 if kept else 0):
            return self.refused(call, PositionError)
        before = self.cache.state_dict()
        try:
            call()
        except CacheFull:  # no free cell for the copy of a shared cell
            assert_same(before, self.cache.state_dict())
            return
        if not moving or not delta:
            return
        shift_model(self.model[seq], moving, delta, ROPE, self.storage[0])

    @rule()
    def defrag(self) -> None:
        self.cache.defrag()
        stats = self.cache.stats()
        assert stats.n_kv == min(-(-stats.cells_used // 32) * 32, self.capacity)

    @rule(through_file=st.booleans())
    def save_and_load(self, through_file: bool) -> None:
        state = self.cache.state_dict()
        fresh = CausalCache(
            SPEC, capacity=self.capacity, max_sequences=3, window=self.window, sinks=self.sinks,
            kv_dtype=self.kv_dtype, group_size=8, defrag_threshold=0.3, xp=np,
        )
        if through_file:
            with tempfile.TemporaryDirectory() as tmp:
                path = str(Path(tmp) / "cache.safetensors")
                self.cache.save(path)
                fresh.load(path)
        else:
            fresh.load_state_dict(state)
        assert_same(state, fresh.state_dict())
        self.cache.close()
        self.cache = fresh

    # ---- checks ------------------------------------------------------------------------------------------
    def refused(self, call, error: type[Exception]) -> None:
        before = self.cache.state_dict()
        try:
            call()
        except error:
            pass
        else:
            raise AssertionError(f"expected {error.__name__}")
        assert_same(before, self.cache.state_dict())

    @invariant()
    def no_cell_leaks_and_the_pools_hold_the_model(self) -> None:
        if not hasattr(self, "cache"):
            return
        cells = self.cache._cells  # noqa: SLF001 - the bookkeeping's own invariants
        cells.check()
        stats = self.cache.stats()
        assert stats.cells_free + stats.cells_used == self.capacity
        assert sorted(self.cache.sequences()) == sorted(self.model)
        assert stats.tokens == sum(len(t) for t in self.model.values())
        for seq, tokens in self.model.items():
            table, positions = self.cache.cell_table(seq)
            assert positions.tolist() == sorted(tokens)
            for layer in range(SPEC.num_layers):
                for which in (0, 1):
                    pool = self.cache._pools[which][layer]  # noqa: SLF001
                    scales = self.cache._scales[which][layer]  # noqa: SLF001
                    stored = dequantized(pool[table], None if scales is None else scales[table])
                    self.assert_rows(stored, [tokens[q] for q in positions.tolist()], layer, which)

    def assert_rows(
        self, stored: np.ndarray, tokens: list[ModelToken], layer: int, which: int, rounded: bool = False
    ) -> None:
        """``stored [n, H, D]`` against the model's tokens of one layer, keys (0) or values (1); `rounded`:
        the rows went through float16 once more (an int8 pool dequantized into a float16 staging buffer)."""
        for row, tok in zip(stored, tokens, strict=True):
            expected = (tok.keys if which == 0 else tok.values)[layer]
            tol = tok.key_tol if which == 0 else tok.value_tol
            tol += float(np.abs(expected).max()) * 2.0**-10 if rounded and tol else 0.0
            assert np.abs(row - expected).max() <= tol + 1e-9, (layer, which, np.abs(row - expected).max(), tol)

    def check_views(self, plan, labels: list[int], positions: list[int]) -> None:
        order = plan.sequences.tolist()
        assert order == list(dict.fromkeys(labels))
        pages = self.cache.get(0, "pages")
        indptr, indices = pages.kv_indptr.tolist(), pages.kv_indices
        for layer in range(SPEC.num_layers):
            pool = self.cache.get(layer, "pool")
            gathered = self.cache.get(layer, "gathered")
            assert gathered.lengths.tolist() == [len(self.model[s]) for s in order]
            for k, seq in enumerate(order):
                tokens = [self.model[seq][q] for q in sorted(self.model[seq])]
                cells = indices[indptr[k] : indptr[k + 1]]
                for which, (arr, scales, staged) in enumerate(
                    [(pool.keys, pool.key_scales, gathered.keys), (pool.values, pool.value_scales, gathered.values)]
                ):
                    through_pages = dequantized(arr[cells], None if scales is None else scales[cells])
                    self.assert_rows(through_pages, tokens, layer, which)
                    rows = staged[k, :, : len(tokens)].transpose(1, 0, 2).astype(np.float64)
                    self.assert_rows(rows, tokens, layer, which, rounded=self.storage[which] == "int8")
                    assert not staged[k, :, len(tokens) :].any()
            # the bias of each token marks exactly the cells of the positions it sees
            cell_positions = plan.cell_positions
            for t, (seq, pos) in enumerate(zip(labels, positions, strict=True)):
                seen = np.flatnonzero(pool.bias[t] == 0)
                assert sorted(cell_positions[seen].tolist()) == self.visible(seq, pos)
                k = order.index(seq)
                seen_gathered = np.flatnonzero(gathered.bias[t] == 0)
                assert sorted(cell_positions[indices[indptr[k] + seen_gathered]].tolist()) == self.visible(seq, pos)
        # attention through the pool view and its bias equals attention over the model's plain list
        view = self.cache.get(1, "pool")
        queries = self.rng.standard_normal((len(labels), 4, 8))
        by_view = attend(queries, dequantized(view.keys, view.key_scales), dequantized(view.values, view.value_scales),
                         view.bias)
        for t, (seq, pos) in enumerate(zip(labels, positions, strict=True)):
            seen = [self.model[seq][q] for q in self.visible(seq, pos)]
            expected = attend_list(queries[t], np.stack([s.keys[1] for s in seen]), np.stack([s.values[1] for s in seen]))
            tol = max(max(s.key_tol, s.value_tol) for s in seen)
            np.testing.assert_allclose(by_view[t], expected, atol=1e-9 + 20 * tol)


def assert_same(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key


SETTINGS = settings(max_examples=25, stateful_step_count=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class FullAttentionFloat16(CacheMachine):
    pass


class WindowSinksInt8(CacheMachine):
    window, sinks, kv_dtype = 4, 1, "int8"


class WindowMixed(CacheMachine):
    window, sinks, kv_dtype, capacity = 3, 0, ("int8", "float16"), 16


TestFullAttentionFloat16 = FullAttentionFloat16.TestCase
TestFullAttentionFloat16.settings = SETTINGS
TestWindowSinksInt8 = WindowSinksInt8.TestCase
TestWindowSinksInt8.settings = SETTINGS
TestWindowMixed = WindowMixed.TestCase
TestWindowMixed.settings = SETTINGS

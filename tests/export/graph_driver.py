"""A minimal NumPy driver of native decoder-step graphs, for tests only (not the cache, not the engine).

Per layer it keeps the pool as plain arrays ``keys[capacity, KV, D]`` / ``values`` (int8 pools add
``scales[capacity, KV * D // 32]`` float16), hands out cells from a bump pointer (so sequences of one
batch interleave in the pool), builds the attention bias of the graph's view, runs the graph and writes
``new_key`` / ``new_value`` into the cells the pass was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvarray.export import read_metadata
from kvarray.ops.reference import quantize_int8

NEG_INF = np.float32(-np.inf)
N_KV_MULTIPLE = 32  # the pool view's length is the high-water mark rounded up to this


def session(path: str | Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of the graph at `path`, on one thread."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class GraphDriver:
    """Run one native graph over sequences, keeping their K/V in NumPy pools.

    Args:
        graph: path of a ``decoder_step.{view}.{kv_dtype}.onnx``.
        capacity: cells per pool.
        first_cell: cells below it are left unused (so the pool view starts with foreign, masked cells).
    """

    def __init__(self, graph: str | Path, capacity: int = 256, first_cell: int = 0) -> None:
        self.info = read_metadata(graph)
        self.session = session(graph)
        spec = self.info.spec
        self.kv_dtype = self.info.kv_dtype
        self.view = self.info.view
        store = np.float32 if self.kv_dtype == "float32" else np.dtype(self.kv_dtype)
        shape = (capacity, spec.num_kv_heads, spec.head_dim)
        rng = np.random.default_rng(0)  # unused cells hold garbage: masking must make it irrelevant
        self.keys = [rng.normal(size=shape).astype(store) for _ in range(spec.num_layers)]
        self.values = [rng.normal(size=shape).astype(store) for _ in range(spec.num_layers)]
        groups = spec.num_kv_heads * spec.head_dim // 32
        self.key_scales = [np.ones((capacity, groups), np.float16) for _ in range(spec.num_layers)]
        self.value_scales = [np.ones((capacity, groups), np.float16) for _ in range(spec.num_layers)]
        self.cells: dict[int, list[int]] = {}
        self.next_cell = first_cell

    def step(self, seq_ids: Sequence[int], tokens: Sequence[int], logits_index: Sequence[int]) -> np.ndarray:
        """One pass over the flat batch ``tokens [T]`` of sequences ``seq_ids [T]`` -> ``logits [S, vocab]``.

        Positions continue each sequence; the tokens of one sequence must be in position order.
        """
        seq_ids = list(seq_ids)
        past_len = {s: len(self.cells.get(s, [])) for s in seq_ids}
        positions, seen = [], {s: 0 for s in seq_ids}
        for s in seq_ids:
            positions.append(past_len[s] + seen[s])
            seen[s] += 1
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray(tokens, np.int64),
            "position_ids": np.asarray(positions, np.int64),
            "logits_index": np.asarray(logits_index, np.int64),
        }
        new_block = np.where(self._same_sequence_causal(seq_ids, positions), 0, NEG_INF).astype(np.float32)
        if self.view == "pool":
            n_kv = -(-self.next_cell // N_KV_MULTIPLE) * N_KV_MULTIPLE
            past = np.full((len(seq_ids), n_kv), NEG_INF, np.float32)
            for t, s in enumerate(seq_ids):
                past[t, self.cells.get(s, [])] = 0
            for i in range(self.info.spec.num_layers):
                feeds[f"past_key.{i}"] = self.keys[i][:n_kv]
                feeds[f"past_value.{i}"] = self.values[i][:n_kv]
                if self.kv_dtype == "int8":
                    feeds[f"past_key_scale.{i}"] = self.key_scales[i][:n_kv]
                    feeds[f"past_value_scale.{i}"] = self.value_scales[i][:n_kv]
        else:
            order = list(dict.fromkeys(seq_ids))
            length = max(1, max(past_len.values()))
            past = np.full((len(seq_ids), length), NEG_INF, np.float32)
            for t, s in enumerate(seq_ids):
                past[t, : past_len[s]] = 0
            feeds["token_sequence"] = np.asarray([order.index(s) for s in seq_ids], np.int64)
            for i in range(self.info.spec.num_layers):
                for name, pool in (("past_key", self.keys[i]), ("past_value", self.values[i])):
                    staging = np.zeros((len(order), pool.shape[1], length, pool.shape[2]), pool.dtype)
                    for j, s in enumerate(order):
                        staging[j, :, : past_len[s]] = pool[self.cells.get(s, [])].transpose(1, 0, 2)
                    feeds[f"{name}.{i}"] = staging
        feeds["attention_bias"] = np.concatenate([past, new_block], axis=1)
        outputs = dict(zip(self.info.outputs, self.session.run(self.info.outputs, feeds), strict=True))
        slots = []
        for s in seq_ids:
            self.cells.setdefault(s, []).append(self.next_cell)
            slots.append(self.next_cell)
            self.next_cell += 1
        self._write(slots, outputs)
        return outputs["logits"]

    def _write(self, slots: list[int], outputs: dict[str, np.ndarray]) -> None:
        for i in range(self.info.spec.num_layers):
            for new, pool, scales in (
                ("new_key", self.keys[i], self.key_scales[i]),
                ("new_value", self.values[i], self.value_scales[i]),
            ):
                rows = outputs[f"{new}.{i}"]
                if self.kv_dtype == "int8":
                    q = np.empty(rows.shape, np.int8)
                    s = np.empty((rows.shape[0], scales.shape[1]), np.float16)
                    quantize_int8(rows, q, s)
                    pool[slots], scales[slots] = q, s
                else:
                    pool[slots] = rows.astype(pool.dtype)

    @staticmethod
    def _same_sequence_causal(seq_ids: list[int], positions: list[int]) -> np.ndarray:
        s, p = np.asarray(seq_ids), np.asarray(positions)
        return (s[:, None] == s[None, :]) & (p[None, :] <= p[:, None])


def greedy(driver: GraphDriver, prompts: Sequence[Sequence[int]], new_tokens: int) -> tuple[list, list]:
    """Prefill all `prompts` in one flat batch, then `new_tokens` greedy steps for all of them at once.

    Returns per prompt: the logits rows ``[P + new_tokens, vocab]`` (every prefill row, then each decode
    step's row) and the greedy tokens ``[new_tokens]`` (the argmax of the last prefill row and of the first
    new_tokens - 1 decode rows).
    """
    seq_ids = [k for k, p in enumerate(prompts) for _ in p]
    tokens = [t for p in prompts for t in p]
    logits = driver.step(seq_ids, tokens, range(len(tokens)))
    rows, chosen, start = [], [], 0
    for p in prompts:
        rows.append([*logits[start : start + len(p)]])
        chosen.append([int(np.argmax(logits[start + len(p) - 1]))])
        start += len(p)
    for step in range(new_tokens):
        batch = list(range(len(prompts)))
        logits = driver.step(batch, [chosen[k][-1] for k in batch], range(len(batch)))
        for k in batch:
            rows[k].append(logits[k])
            if step < new_tokens - 1:
                chosen[k].append(int(np.argmax(logits[k])))
    return [np.stack(r) for r in rows], chosen


def check_rows(
    reference: dict[str, np.ndarray],
    batch: Sequence[int],
    rows: Sequence[np.ndarray],
    chosen: Sequence[list[int]],
    tolerance: float,
) -> float:
    """Check `greedy`'s `rows` and `chosen` of sequences `batch` against `reference` (a reference.npz):
    assert every logits row within `tolerance` and the greedy tokens equal; return the max |difference|."""
    worst = 0.0
    for j, k in enumerate(batch):
        expected = reference[f"logits_{k}"]
        assert rows[j].shape == expected.shape
        worst = max(worst, float(np.abs(rows[j] - expected).max()))
        assert chosen[j] == reference[f"generated_{k}"].tolist(), f"greedy tokens of sequence {k} differ"
    assert worst <= tolerance, f"max |logit difference| {worst:.2e} > {tolerance:.0e}"
    return worst

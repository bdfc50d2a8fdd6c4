"""A NumPy driver of native encoder + decoder-step graphs (T5, Whisper), for tests only.

The decoder's self-attention pool is handled as in graph_driver.py (bump-pointer cells, so sequences of one
batch interleave; garbage in unused cells); the cross K/V of each sequence is what the encoder graph
emitted for it, kept per sequence (the encoder cache's job), and each step binds the batch's entries side
by side as ``cross_key.{i} [M, H, D]`` with ``cross_bias [T, M]``. T5's ``past_position_ids [N]`` is the
position of each cell (random values in unused cells: the bias masks them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from graph_driver import N_KV_MULTIPLE, NEG_INF, GraphDriver, check_rows, greedy, session

from kvarray.export import read_metadata
from kvarray.export.reference import reference_sources


class _WithExtraFeeds:
    """A session whose `run` adds the driver's extra feeds (the cross view) to GraphDriver's own."""

    def __init__(self, inner: ort.InferenceSession, driver: Seq2SeqDriver) -> None:
        self.inner, self.driver = inner, driver

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.inner.run(names, {**feeds, **self.driver._extra})


class Seq2SeqDriver(GraphDriver):
    """`GraphDriver` for an encoder-decoder model: `encode` the sequences first, then `step` as usual.

    Args:
        encoder: path of ``encoder.onnx``; decoder: path of a ``decoder_step.{view}.{kv_dtype}.onnx``.
    """

    def __init__(
        self, encoder: str | Path, decoder: str | Path, capacity: int = 256, first_cell: int = 0
    ) -> None:
        super().__init__(decoder, capacity, first_cell)
        self.encoder_info = read_metadata(encoder)
        self.encoder = session(encoder)
        self.cross: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.positions = np.random.default_rng(1).integers(0, 500, size=capacity)  # cell -> position
        self._extra: dict[str, np.ndarray] = {}
        self.session = _WithExtraFeeds(self.session, self)  # GraphDriver.step runs through it

    def encode(self, seq_ids: Sequence[int], inputs: Sequence[np.ndarray]) -> None:
        """Encode all `inputs` at once (T5: token lists, flat; Whisper: ``[n_mels, frames]`` each)."""
        layers = self.info.spec.num_layers
        if "input_features" in self.encoder_info.inputs:
            feeds = {"input_features": np.stack(inputs).astype(np.float32)}
        else:
            lengths = [len(x) for x in inputs]
            owner = np.repeat(np.arange(len(inputs)), lengths)
            feeds = {
                "input_ids": np.concatenate(inputs).astype(np.int64),
                "position_ids": np.concatenate([np.arange(n) for n in lengths]).astype(np.int64),
                "attention_bias": np.where(owner[:, None] == owner[None, :], 0, NEG_INF).astype(np.float32),
            }
        out = dict(
            zip(self.encoder_info.outputs, self.encoder.run(self.encoder_info.outputs, feeds), strict=True)
        )
        rows = out["cross_key.0"].shape[0]
        bounds = np.cumsum(
            [0] + ([rows // len(inputs)] * len(inputs) if "input_features" in feeds else lengths)
        )
        for j, s in enumerate(seq_ids):
            a, b = bounds[j], bounds[j + 1]
            self.cross[s] = [
                (out[f"cross_key.{i}"][a:b], out[f"cross_value.{i}"][a:b]) for i in range(layers)
            ]

    def extra_feeds(self, seq_ids: list[int], n_kv: int) -> dict[str, np.ndarray]:
        order = list(dict.fromkeys(seq_ids))
        lengths = [len(self.cross[s][0][0]) for s in order]
        start = dict(zip(order, np.cumsum([0, *lengths]), strict=False))
        cross_bias = np.full((len(seq_ids), sum(lengths)), NEG_INF, np.float32)
        for t, s in enumerate(seq_ids):
            cross_bias[t, start[s] : start[s] + lengths[order.index(s)]] = 0
        feeds = {"cross_bias": cross_bias}
        for i in range(self.info.spec.num_layers):
            feeds[f"cross_key.{i}"] = np.concatenate([self.cross[s][i][0] for s in order])
            feeds[f"cross_value.{i}"] = np.concatenate([self.cross[s][i][1] for s in order])
        if "past_position_ids" in self.info.inputs:
            if self.view == "pool":
                feeds["past_position_ids"] = self.positions[:n_kv].astype(np.int64)
            else:
                length = max(1, max(len(self.cells.get(s, [])) for s in order))
                table = np.zeros((len(order), length), np.int64)
                for j, s in enumerate(order):
                    cells = self.cells.get(s, [])
                    table[j, : len(cells)] = self.positions[cells]
                feeds["past_position_ids"] = table
        return feeds

    def step(self, seq_ids: Sequence[int], tokens: Sequence[int], logits_index: Sequence[int]) -> np.ndarray:
        """As `GraphDriver.step`, adding the cross view and the cells' positions."""
        seq_ids = list(seq_ids)
        n_kv = -(-self.next_cell // N_KV_MULTIPLE) * N_KV_MULTIPLE
        self._extra = self.extra_feeds(seq_ids, n_kv)
        past_len = {s: len(self.cells.get(s, [])) for s in seq_ids}
        logits = super().step(seq_ids, tokens, logits_index)
        seen = dict.fromkeys(seq_ids, 0)  # record the positions of the cells just written
        for s in seq_ids:
            self.positions[self.cells[s][past_len[s] + seen[s]]] = past_len[s] + seen[s]
            seen[s] += 1
        return logits


def run_greedy(
    encoder: str | Path,
    decoder: str | Path,
    sources: Sequence,
    prompts: Sequence[Sequence[int]],
    **driver: int,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Encode `sources` in one batch, then prefill `prompts` and 16 greedy steps (graph_driver.greedy)."""
    d = Seq2SeqDriver(encoder, decoder, **driver)
    d.encode(list(range(len(sources))), sources)
    return greedy(d, prompts, 16)


def check_seq2seq(
    reference: dict[str, np.ndarray],
    encoder: str | Path,
    decoder: str | Path,
    batch: Sequence[int],
    tolerance: float,
    n_mels: int = 80,
) -> float:
    """Run sequences `batch` of `reference` together; assert every logits row within `tolerance` and the
    greedy tokens equal; return the max |logit difference|."""
    sources = reference_sources(reference, n_mels)
    prompts = [reference[f"prompt_{k}"].tolist() for k in batch]
    rows, chosen = run_greedy(encoder, decoder, [sources[k] for k in batch], prompts, first_cell=5)
    return check_rows(reference, batch, rows, chosen, tolerance)


def committed_graphs(folder: Path) -> tuple[Path, Path]:
    """The committed float32 pool-view (encoder, decoder_step) graphs of the model in `folder`."""
    native = folder / "native"
    return native / "encoder.onnx", native / "decoder_step.pool.float32.onnx"

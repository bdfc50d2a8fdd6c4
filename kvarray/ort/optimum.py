"""The engine's runner for Optimum decoder-only exports (``past_key_values.{i}.key`` -> ``present.{i}.key``).

Such a graph knows nothing of cells: it takes a rectangular batch. Per pass the runner

1. reads each layer's gathered view from the cache (`CausalCache.get(layer, "gathered")`): the batch's
   sequences ``[S, H, L, D]``, each row in position order and zero-padded to L, int8 dequantized. The
   view is read after `start_forward`, so each sequence's last ``new_s`` rows are this pass's own cells
   (not written yet): its past is the first ``past_s = lengths[s] - new_s`` rows;
2. binds those staging buffers as ``past_key_values.{i}.key/value [B, H, L, D]`` without a copy
   (past_sequence_length is L, the padding masked), and the pass's tokens **right-padded** to
   ``[B, N]``: ``attention_mask [B, L + N]`` is 1 on ``[0, past_s)`` and on ``[L, L + new_s)``,
   ``position_ids [B, N]`` the tokens' own positions. The graph's causal mask (key index <= L + query
   index) then keeps every real query off the padded queries that follow it, and no row is fully masked;
3. runs, and scatters the new rows ``present.{i}.key[b, :, L + j]`` of the real tokens back with `put`.

A pass that mixes decodes and prefill chunks runs as two rectangular sub-batches: the decoding sequences
(the scheduler puts them first, one token each, ``[Bd, 1]``) and the prefill chunks (``[Bp, chunk]``), so
one long chunk does not pad every decode row to its length. Both read the same gathered buffers (rows
``[0, Bd)`` and ``[Bd, S)`` are contiguous slices).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from ..causal import CausalCache
from ..errors import GraphMismatch
from ..export import read_config
from ..spec import KVSpec
from ..views import ForwardPlan, GatheredView
from .binding import Binder
from .names import check_names, convention
from .runner import Runner
from .scheduler import Batch

__all__ = ["OptimumRunner", "graph_spec", "read_tokens"]

_FLOATS = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def graph_spec(session: ort.InferenceSession, num_layers: int, past: str = "past_key_values.0.key") -> KVSpec:
    """The cache spec an Optimum graph implies: layers from its names, heads and head_dim from the static
    dims of its first past input `past` ``[batch, H, past, D]``, dtype from its element type."""
    arg = {i.name: i for i in session.get_inputs()}[past]
    shape = list(arg.shape)
    if len(shape) != 4 or not all(isinstance(n, int) for n in (shape[1], shape[3])):
        raise GraphMismatch(
            f"{past} {shape}: expected [batch, kv_heads, past, head_dim] with static "
            "kv_heads and head_dim (or pass spec=)"
        )
    if arg.type not in _FLOATS:
        raise GraphMismatch(f"{past} {arg.type}: expected float or float16")
    return KVSpec(num_layers, int(shape[1]), int(shape[3]), _FLOATS[arg.type])


TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def read_tokens(folder: Path) -> dict[str, Any]:
    """``bos/eos/pad/decoder_start_token_id`` of an export folder's generation_config.json, else its
    config.json. Raises `ModelFileError` for a file that is not a JSON object."""
    tokens: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):  # the second wins
        path = folder / name
        if path.is_file():
            data = read_config(path)
            tokens.update({k: data[k] for k in TOKEN_KEYS if k in data})
    return tokens


class OptimumRunner(Runner):
    """Runs one pass of an Optimum decoder-only graph over the cache's gathered view (module docstring).

    Args:
        session: the graph's session (names already matched to the "optimum" convention).
        num_layers: the layer count its names imply.
        spec: the cache spec (None: the graph's own); checked against the graph's names and shapes.
        kv_dtype: the cache's storage ("float32", "float16" or "int8"; the gathered view dequantizes).
        tokens: bos / eos / pad ids (the export folder's config).

    Raises `GraphMismatch` (names or shapes against the spec, listed).
    """

    kind = "optimum"

    def __init__(
        self,
        session: ort.InferenceSession,
        num_layers: int,
        *,
        spec: KVSpec | None = None,
        kv_dtype: str = "float32",
        tokens: dict[str, Any] | None = None,
    ) -> None:
        self.session = session
        self.spec = spec or graph_spec(session, num_layers)
        self.kv_dtype = kv_dtype
        self.group_size = 32
        self.tokens = tokens or {}
        self.info = None  # no kvarray metadata
        ins = {i.name: i for i in session.get_inputs()}
        outs = {o.name: o for o in session.get_outputs()}
        check_names(convention("optimum"), self.spec.num_layers, list(ins), list(outs))
        self._check_shapes(ins)
        self.vocab_size = int(outs["logits"].shape[-1])
        self._past_dtype = np.dtype(_FLOATS[ins["past_key_values.0.key"].type])
        self._logits_dtype = np.dtype(_FLOATS.get(outs["logits"].type, "float32"))
        self._has_positions = "position_ids" in ins
        self._present: list[np.ndarray] = []  # the last sub-batch's outputs [B, H, L + N, D], 2 per layer
        self._logits = np.empty((0, 0, 0), np.float32)  # [B, N, vocab]
        self.binder = Binder(session)
        self._buffers: dict[str, np.ndarray] = {}  # flat, grown to the next power of two
        self.new_keys: list[np.ndarray] = []
        self.new_values: list[np.ndarray] = []

    def _check_shapes(self, ins: dict[str, Any]) -> None:
        heads, dim, wrong = self.spec.num_kv_heads, self.spec.head_dim, []
        for i in range(self.spec.num_layers):
            for name in (f"past_key_values.{i}.key", f"past_key_values.{i}.value"):
                shape = list(ins[name].shape)
                if len(shape) != 4 or shape[1] != heads or shape[3] != dim:
                    wrong.append(f"{name} {shape} (expected [batch, {heads}, past, {dim}])")
        if wrong:
            raise GraphMismatch(f"the graph does not match the cache spec {self.spec}: " + "; ".join(wrong))

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A C-contiguous ``shape`` view of the first elements of a reused flat buffer."""
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = self._buffers[name] = np.empty(1 << max(size - 1, 1).bit_length(), dtype)
        return buf[:size].reshape(shape)

    def forward(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Run the pass `plan` / `batch` and `put` its keys and values into `cache`.

        Returns ``logits [len(batch.logits_index), vocab]`` float32 (the rows of ``batch.logits_index``,
        flat token indices) and the seconds spent inside ``session.run``.
        """
        layers, count = self.spec.num_layers, plan.num_tokens
        seq = plan.token_seq.astype(np.int64)  # [T] the batch row of each token
        new = np.bincount(seq, minlength=plan.num_sequences)  # [S] tokens each sequence feeds
        rank = np.arange(count, dtype=np.int64) - (np.cumsum(new) - new)[seq]  # [T] index in its row
        past = plan.gathered_lengths.astype(np.int64) - new  # [S]
        views = [cast(GatheredView, cache.get(layer, "gathered")) for layer in range(layers)]
        width = int(views[0].keys.shape[2])  # L, the padded past length bound to the graph
        row = (self.spec.num_kv_heads, self.spec.head_dim)
        self.new_keys = [self._buffer(f"new_key.{i}", (count, *row), self.spec.dtype) for i in range(layers)]
        self.new_values = [
            self._buffer(f"new_value.{i}", (count, *row), self.spec.dtype) for i in range(layers)
        ]
        wanted = np.asarray(batch.logits_index, np.int64)
        logits = self._buffer("logits_rows", (len(wanted), self.vocab_size), np.float32)
        # sub-batches of sequences [a, b): the decoding ones first (one token each), then the prefill chunks
        split = batch.decode_tokens if 0 < batch.decode_tokens < plan.num_sequences else 0
        bounds = [(0, split), (split, plan.num_sequences)] if split else [(0, plan.num_sequences)]
        run_seconds = 0.0
        for group, (a, b) in enumerate(bounds):
            t0, t1 = int(np.searchsorted(seq, a)), int(np.searchsorted(seq, b))  # its tokens, consecutive
            rows, cols = seq[t0:t1] - a, rank[t0:t1]
            length = int(new[a:b].max())
            run_seconds += self._run_group(
                group,
                views,
                (a, b),
                width,
                length,
                past[a:b],
                rows,
                cols,
                batch.tokens[t0:t1],
                batch.positions[t0:t1],
            )
            for i in range(layers):
                self.new_keys[i][t0:t1] = self._present[2 * i][rows, :, width + cols]
                self.new_values[i][t0:t1] = self._present[2 * i + 1][rows, :, width + cols]
            mine = (wanted >= t0) & (wanted < t1)
            picked = wanted[mine] - t0
            logits[mine] = self._logits[rows[picked], cols[picked]]
        for i in range(layers):
            cache.put(i, self.new_keys[i], self.new_values[i])
        return logits, run_seconds

    def _run_group(
        self,
        group: int,
        views: list[Any],
        seqs: tuple[int, int],
        width: int,
        length: int,
        past: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray,
        tokens: np.ndarray,
        positions: np.ndarray,
    ) -> float:
        """Bind and run the batch's sequences ``seqs = [a, b)`` as ``[B, length]`` tokens over
        ``[B, H, width, D]`` past (``past [B]`` real rows each; ``rows, cols [Tg]`` where each of the
        group's ``tokens`` / ``positions`` go); the outputs are left in ``self._present`` and
        ``self._logits``."""
        (a, b), binder = seqs, self.binder
        count = b - a
        ids = self._buffer(f"input_ids.{group}", (count, length), np.int64)
        ids.fill(0)
        ids[rows, cols] = tokens
        mask = self._buffer(f"attention_mask.{group}", (count, width + length), np.int64)
        mask[:, :width] = np.arange(width) < past[:, None]
        mask[:, width:] = 0
        mask[rows, width + cols] = 1
        binder.bind_input("input_ids", ids)
        binder.bind_input("attention_mask", mask)
        if self._has_positions:
            pos = self._buffer(f"position_ids.{group}", (count, length), np.int64)
            pos.fill(0)
            pos[rows, cols] = positions
            binder.bind_input("position_ids", pos)
        self._present = []
        for i, view in enumerate(views):
            for kind, staged in (("key", view.keys), ("value", view.values)):
                staged = staged[a:b]
                if staged.dtype != self._past_dtype:  # a float16 pool under a float32 graph: one cast
                    staged = np.ascontiguousarray(staged, dtype=self._past_dtype)
                binder.bind_input(f"past_key_values.{i}.{kind}", staged)
                out = self._buffer(
                    f"present.{i}.{kind}.{group}",
                    (count, staged.shape[1], width + length, staged.shape[3]),
                    self._past_dtype,
                )
                binder.bind_output(f"present.{i}.{kind}", out)
                self._present.append(out)
        self._logits = self._buffer(f"logits.{group}", (count, length, self.vocab_size), self._logits_dtype)
        binder.bind_output("logits", self._logits)
        start = time.perf_counter()
        binder.run()
        return time.perf_counter() - start

    def reads_pool(self, cache: Any, batch: Batch) -> bool:
        """An Optimum graph reads the gathered view (each sequence's cells copied): never the pool view."""
        return False

    def close(self) -> None:
        """Forget the bindings and buffers."""
        self.binder.clear()
        self._buffers.clear()

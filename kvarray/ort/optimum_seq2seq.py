"""The seq2seq engine's runner for Optimum encoder-decoder exports (T5, Whisper), unchanged graphs.

An Optimum export folder holds ``encoder_model.onnx`` (``input_ids [B, M]`` + ``attention_mask`` for T5,
``input_features [B, n_mels, 3000]`` for Whisper -> ``last_hidden_state [B, M, E]``) and
``decoder_model_merged.onnx`` (names in `kvarray.ort.names`: "optimum-seq2seq" for T5, with
``encoder_attention_mask [B, M]``; "optimum-whisper" without it). The merged decoder has two branches,
chosen by ``use_cache_branch [1]`` bool:

- first step (False): reads ``encoder_hidden_states`` and computes every layer's cross K/V, which only
  this branch outputs, as ``present.{i}.encoder.key`` / ``.value`` ``[B, H, M, D]``;
- later steps (True): reads the cross K/V back as ``past_key_values.{i}.encoder.*`` and the decoder's past
  as ``past_key_values.{i}.decoder.*`` ``[B, H, p, D]``, and outputs ``present.{i}.decoder.*``
  ``[B, H, p + N, D]`` (p may be 0: the first tokens of a prompt run on this branch too).

How the runner drives them (`EncoderSide` lifecycle):

1. admission (`_encode`): the encoder over the admitted requests (T5 ids right-padded with their
   attention mask), then the first branch over one token per request, only for its
   ``present.{i}.encoder.*``: each request's first M rows, ``[M, H, D]``, go into the `EncoderCache`
   (``put_cross_batch``). That token's logits and self K/V are dropped: the decoder prompt is fed by the
   engine's passes like any other prompt;
2. each engine pass (`forward`) runs the second branch, one sub-batch per distinct past length p of the
   batch's sequences. The decoder has no self-attention mask and takes its positions from the past's
   length (Whisper's learned positions, T5's relative buckets), so sequences whose pasts differ cannot
   share a rectangle: a padded past would be attended to and would shift the positions. Within a
   sub-batch the pass's tokens are right-padded to ``[B, N]`` (the causal mask keeps every real token off
   the padding after it); the past comes from the causal cache's gathered view (its first p rows), the
   cross K/V from the encoder cache's gathered view (``[B, H, M, D]``, T5's shorter entries zero-padded
   and masked by ``encoder_attention_mask``); ``encoder_hidden_states`` is a ``[B, 1, E]`` placeholder
   (the second branch does not read it). The new rows ``present.{i}.decoder.*[b, :, p + j]`` of the real
   tokens are `put` into the causal cache.

Everything is fed through ``session.run`` (NumPy inputs, outputs allocated by ONNX Runtime): the past is
copied per pass, which is the price of a graph that knows nothing of cells (the native graphs read the
pools in place).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from ..encdec import EncDecPlan, EncoderDecoderCache
from ..errors import GraphMismatch, UnsupportedModel
from ..export import read_config
from ..views import GatheredView
from .binding import Binder
from .names import check_names, convention, match_convention
from .optimum import graph_spec, read_tokens
from .scheduler import Batch, Request
from .seq2seq import ARCHITECTURES, EncoderSide, Seq2SeqConfig, Seq2SeqMetrics

__all__ = ["ENCODER_FILE", "DECODER_FILE", "OptimumSeq2SeqRunner"]

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
#: convention of the decoder's names -> architecture (T5 may also say so in config.json)
_CONVENTIONS = {"optimum-seq2seq": "t5", "optimum-whisper": "whisper"}


def optimum_architecture(session: ort.InferenceSession, folder: Path) -> tuple[str, int, str]:
    """The architecture ("t5" or "whisper"), layer count and names' convention of an Optimum merged
    decoder: the convention gives the architecture, checked against ``model_type`` in the folder's
    config.json when there is one. Raises
    `UnsupportedModel` (another model type or names), `GraphMismatch` (names of no known convention)."""
    match = match_convention([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    name = match.convention.name
    if name not in _CONVENTIONS:
        raise UnsupportedModel(
            f"an Optimum encoder-decoder decoder ({', '.join(_CONVENTIONS)} names) was expected; the graph "
            f"has {name!r} names"
        )
    arch = _CONVENTIONS[name]
    config = folder / "config.json"
    model_type = read_config(config).get("model_type") if config.is_file() else None
    if model_type is not None and model_type != arch:
        raise UnsupportedModel(
            f"{folder}: model_type {model_type!r} with {name!r} names; the seq2seq engine runs "
            f"{', '.join(ARCHITECTURES)}"
        )
    return arch, match.num_layers, name


class OptimumSeq2SeqRunner(EncoderSide):
    """Runs an Optimum T5 / Whisper export (``encoder_model.onnx``, ``decoder_model_merged.onnx``) over an
    `EncoderDecoderCache` (module docstring).

    Args:
        encoder_session, session: the sessions of the encoder and the merged decoder.
        folder: the export folder (its config.json / generation_config.json give the model type and the
            bos / eos / pad / decoder_start ids).
        config: `Seq2SeqConfig` (max_sequences, encoder_capacity, max_encoder_batch, cross_dtype).
        metrics: the engine's `Seq2SeqMetrics` (encoder passes and rows; every decoder pass stages its
            cross view, counted as ``cross_staged_steps``).

    Raises `UnsupportedModel` (not a T5 / Whisper export), `GraphMismatch` (names or shapes: the decoder's
    past inputs against each other, the encoder's inputs and ``last_hidden_state``; names listed).
    """

    kind = "optimum-seq2seq"

    def __init__(
        self,
        encoder_session: ort.InferenceSession,
        session: ort.InferenceSession,
        folder: Path,
        config: Seq2SeqConfig,
        metrics: Seq2SeqMetrics,
    ) -> None:
        self.encoder_session, self.session = encoder_session, session
        arch, layers, names = optimum_architecture(session, folder)
        self.spec = graph_spec(session, layers, "past_key_values.0.decoder.key")
        self.info = None  # no kvarray metadata
        self.kv_dtype = self.spec.dtype
        self.group_size = 32
        self.tokens = read_tokens(folder)
        ins = {i.name: i for i in session.get_inputs()}
        outs = {o.name: o for o in session.get_outputs()}
        check_names(convention(names), layers, list(ins), list(outs))
        self.vocab_size = int(outs["logits"].shape[-1])
        self._hidden = int(ins["encoder_hidden_states"].shape[-1])
        self._has_mask = "encoder_attention_mask" in ins
        self._has_branch = "use_cache_branch" in ins
        self._dtype = np.dtype(self.spec.dtype)
        self._setup_encoder_side(arch, config, metrics)
        self._check_graphs(ins)
        self._step_outputs = ["logits"] + [
            f"present.{i}.decoder.{kind}" for i in range(layers) for kind in ("key", "value")
        ]
        self._cross_outputs = [
            f"present.{i}.encoder.{kind}" for i in range(layers) for kind in ("key", "value")
        ]
        self.binder = Binder(session)  # unused: this runner feeds session.run (module docstring)
        self.new_keys: list[np.ndarray] = []
        self.new_values: list[np.ndarray] = []

    def reads_pool(self, cache: Any, batch: Batch) -> bool:
        """An Optimum graph reads the gathered view (each sequence's cells copied): never the pool view."""
        return False

    def close(self) -> None:
        """Nothing is bound; kept for the `Runner` interface."""
        self.binder.clear()

    # ---- the encoder pass --------------------------------------------------------------------------
    def _encode(self, cache: EncoderDecoderCache, reqs: list[Request]) -> None:
        """The encoder over `reqs`, then the decoder's first branch for the cross K/V, into the encoder
        cache (module docstring, step 1)."""
        sources = [self._sources[r.id] for r in reqs]
        count = len(reqs)
        start = time.perf_counter()
        mask = None
        if self.architecture == "whisper":
            feeds: dict[str, Any] = {"input_features": np.ascontiguousarray(np.stack(sources), np.float32)}
        else:
            lengths = np.asarray([len(s) for s in sources], np.int64)
            ids = np.full((count, int(lengths.max())), int(self.tokens.get("pad_token_id") or 0), np.int64)
            for row, source in enumerate(sources):
                ids[row, : len(source)] = source
            mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask}
        (hidden,) = self.encoder_session.run(["last_hidden_state"], feeds)
        first = int(self.tokens.get("decoder_start_token_id") or 0)
        feeds = self._decoder_feeds(np.full((count, 1), first, np.int64), hidden, mask, branch=False)
        empty = np.zeros((count, self.spec.num_kv_heads, 0, self.spec.head_dim), self._dtype)
        for i in range(self.spec.num_layers):
            for side in ("decoder", "encoder"):
                for kind in ("key", "value"):
                    feeds[f"past_key_values.{i}.{side}.{kind}"] = empty
        outputs = self.session.run(self._cross_outputs, feeds)  # [B, H, M, D] each
        seconds = time.perf_counter() - start
        rows = [self._source_rows(s) for s in sources]
        cross: list[tuple[Any, Any]] = []
        for i in range(self.spec.num_layers):
            keys, values = outputs[2 * i], outputs[2 * i + 1]
            if keys.shape[2] < max(rows):
                raise GraphMismatch(
                    f"present.{i}.encoder.key {list(keys.shape)}: fewer rows than {max(rows)}"
                )
            cross.append((_rows_of(keys, rows), _rows_of(values, rows)))
        self._store_cross(cache, reqs, cross, seconds)

    # ---- passes ------------------------------------------------------------------------------------
    def forward(self, cache: EncoderDecoderCache, plan: EncDecPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Run the pass `plan` / `batch`, one sub-batch per past length (module docstring, step 2), and
        `put` its keys and values into the causal cache.

        Returns ``logits [len(batch.logits_index), vocab]`` float32 (the rows of ``batch.logits_index``,
        flat token indices) and the seconds spent inside ``session.run``.
        """
        own = plan.self_plan
        layers, count, heads, dim = (
            self.spec.num_layers,
            own.num_tokens,
            self.spec.num_kv_heads,
            self.spec.head_dim,
        )
        seq = own.token_seq.astype(np.int64)  # [T] the batch row of each token
        new = np.bincount(seq, minlength=own.num_sequences)  # [S] tokens each sequence feeds
        rank = np.arange(count, dtype=np.int64) - (np.cumsum(new) - new)[seq]  # [T] index in its row
        past = own.gathered_lengths.astype(np.int64) - new  # [S]
        selfs = [cast(GatheredView, cache.get(i, "gathered")) for i in range(layers)]  # [S, H, L, D]
        crosses = [cast(GatheredView, cache.get_cross(i, "gathered")) for i in range(layers)]  # [S, H, M, D]
        cross_rows = np.asarray(crosses[0].lengths, np.int64)  # [S]
        self.new_keys = [np.empty((count, heads, dim), self._dtype) for _ in range(layers)]
        self.new_values = [np.empty((count, heads, dim), self._dtype) for _ in range(layers)]
        wanted = np.asarray(batch.logits_index, np.int64)
        logits = np.empty((len(wanted), self.vocab_size), np.float32)
        run_seconds = 0.0
        for p in np.unique(past).tolist():
            rows = np.flatnonzero(past == p)  # the sub-batch's sequences
            local = np.full(own.num_sequences, -1, np.int64)
            local[rows] = np.arange(len(rows))
            toks = np.flatnonzero(local[seq] >= 0)  # its tokens (flat indices)
            r, c = local[seq[toks]], rank[toks]
            ids = np.zeros((len(rows), int(new[rows].max())), np.int64)
            ids[r, c] = batch.tokens[toks]
            width = int(cross_rows[rows].max())
            mask = (np.arange(width) < cross_rows[rows, None]).astype(np.int64)
            placeholder = np.zeros((len(rows), 1, self._hidden), self._dtype)
            feeds = self._decoder_feeds(ids, placeholder, mask, branch=True)
            for i in range(layers):
                for kind, own_view, cross_view in (
                    ("key", selfs[i].keys, crosses[i].keys),
                    ("value", selfs[i].values, crosses[i].values),
                ):
                    feeds[f"past_key_values.{i}.decoder.{kind}"] = np.ascontiguousarray(own_view[rows, :, :p])
                    feeds[f"past_key_values.{i}.encoder.{kind}"] = np.ascontiguousarray(
                        cross_view[rows, :, :width]
                    )
            start = time.perf_counter()
            outputs = self.session.run(self._step_outputs, feeds)
            run_seconds += time.perf_counter() - start
            for i in range(layers):
                self.new_keys[i][toks] = outputs[1 + 2 * i][r, :, p + c]
                self.new_values[i][toks] = outputs[2 + 2 * i][r, :, p + c]
            mine = np.flatnonzero(np.isin(wanted, toks))
            picked = wanted[mine]
            logits[mine] = outputs[0][local[seq[picked]], rank[picked]]
        for i in range(layers):
            cache.put(i, self.new_keys[i], self.new_values[i])
        self.metrics.cross_staged_steps += 1
        return logits, run_seconds

    def _decoder_feeds(
        self, ids: np.ndarray, hidden: np.ndarray, mask: np.ndarray | None, *, branch: bool
    ) -> dict[str, Any]:
        """The merged decoder's non-past inputs: ``input_ids [B, N]``, ``encoder_hidden_states [B, M, E]``,
        ``encoder_attention_mask [B, M]`` (T5; all ones when `mask` is None), ``use_cache_branch``."""
        feeds: dict[str, Any] = {"input_ids": ids, "encoder_hidden_states": np.asarray(hidden, self._dtype)}
        if self._has_mask:
            feeds["encoder_attention_mask"] = (
                np.ones(hidden.shape[:2], np.int64) if mask is None else np.ascontiguousarray(mask)
            )
        if self._has_branch:
            feeds["use_cache_branch"] = np.array([branch])
        return feeds

    # ---- checks ------------------------------------------------------------------------------------
    def _check_graphs(self, ins: dict[str, Any]) -> None:
        """Every layer's past ``[batch, H, *, D]`` as the first one's; the encoder's inputs and output."""
        heads, dim, wrong = self.spec.num_kv_heads, self.spec.head_dim, []
        for i in range(self.spec.num_layers):
            for side in ("decoder", "encoder"):
                for kind in ("key", "value"):
                    name = f"past_key_values.{i}.{side}.{kind}"
                    shape = list(ins[name].shape)
                    if len(shape) != 4 or shape[1] != heads or shape[3] != dim:
                        wrong.append(f"{name} {shape} (expected [batch, {heads}, *, {dim}])")
        enc_in = [i.name for i in self.encoder_session.get_inputs()]
        want = ["input_features"] if self.architecture == "whisper" else ["input_ids", "attention_mask"]
        wrong += [f"encoder input {n} missing (found {', '.join(enc_in)})" for n in want if n not in enc_in]
        enc_out = [o.name for o in self.encoder_session.get_outputs()]
        if "last_hidden_state" not in enc_out:
            wrong.append(f"encoder output last_hidden_state missing (found {', '.join(enc_out)})")
        if wrong:
            raise GraphMismatch(f"the Optimum graphs do not match the spec {self.spec}: " + "; ".join(wrong))


def _rows_of(cross: np.ndarray, rows: list[int]) -> np.ndarray:
    """``[sum(rows), H, D]``: the first ``rows[b]`` positions of batch row b of ``cross [B, H, M, D]``."""
    return np.ascontiguousarray(
        np.concatenate([cross[b, :, :n].transpose(1, 0, 2) for b, n in enumerate(rows)])
    )

"""The engine's runner for kvarray's native pool-view decoder step (docs/export.md): zero-copy pools.

`PoolViewRunner` is the IO binding every native pool-view decoder step shares (Llama's here, T5's and
Whisper's in `kvarray.ort.seq2seq`): the small int64 inputs, the pool view of every layer, the
before-put bias, and the preallocated outputs.
"""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from ..causal import CausalCache
from ..errors import GraphMismatch, UnsupportedModel
from ..export import GraphInfo
from ..spec import KVSpec
from ..views import ForwardPlan, PoolView
from .binding import Binder, OutputBuffers
from .names import check_names, convention
from .runner import Runner
from .scheduler import Batch

__all__ = ["NativeRunner", "PoolViewRunner", "row_mismatches"]

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}


def row_mismatches(spec: KVSpec, args: list[Any]) -> list[str]:
    """``name [shape] (expected [*, H, D])`` for each graph input / output (ONNX Runtime `NodeArg`) of
    `args` whose shape is not ``[*, spec.num_kv_heads, spec.head_dim]``."""
    heads, dim = spec.num_kv_heads, spec.head_dim
    return [
        f"{arg.name} {list(arg.shape)} (expected [*, {heads}, {dim}])"
        for arg in args
        if list(arg.shape)[1:] != [heads, dim]
    ]


def pool_step_mismatches(
    spec: KVSpec, vocab_size: int, ins: dict[str, Any], outs: dict[str, Any]
) -> list[str]:
    """What of a native pool-view decoder step does not fit `spec`: ``past_key.{i}`` / ``past_value.{i}``
    inputs and ``new_key.{i}`` / ``new_value.{i}`` outputs ``[*, H, D]``, ``logits [*, vocab_size]``
    (names already checked with `check_names`)."""
    args = []
    for i in range(spec.num_layers):
        args += [ins[f"past_key.{i}"], ins[f"past_value.{i}"], outs[f"new_key.{i}"], outs[f"new_value.{i}"]]
    wrong = row_mismatches(spec, args)
    logits = list(outs["logits"].shape)
    if logits[-1] != vocab_size:
        wrong.append(f"logits {logits} (expected [*, {vocab_size}])")
    return wrong


class PoolViewRunner(Runner):
    """The IO binding of a native pool-view decoder step, rebinding only what changed (docs/engine.md).

    Inputs ``input_ids``, ``position_ids``, ``logits_index [T]`` int64 are copied into fixed buffers,
    ``past_key.{i}`` / ``past_value.{i}`` are the pool view ``[n_kv, H, D]`` (int8: with their scales
    ``past_key_scale.{i}`` / ``past_value_scale.{i}``), ``attention_bias`` is the plan's
    ``bias_before_put [T, n_kv + T]``; outputs ``new_key.{i}`` / ``new_value.{i}`` ``[T, H, D]`` and
    ``logits [S, vocab]`` float32 are preallocated. Subclasses check their graph and bind their own extra
    inputs (the cross view of T5 / Whisper) before `_run_step`.
    """

    session: ort.InferenceSession

    def _setup_binding(self, max_rows: int) -> None:
        """Make the binder and the buffers (``max_rows``: initial rows of the output buffers)."""
        layers = self.spec.num_layers
        row: tuple[tuple[int, ...], Any] = ((self.spec.num_kv_heads, self.spec.head_dim), np.float32)
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {
            f"new_{kind}.{i}": row for i in range(layers) for kind in ("key", "value")
        }
        shapes["logits"] = ((self.vocab_size,), np.float32)
        self.binder = Binder(self.session)
        self.outputs = OutputBuffers(np, shapes, rows=max(64, max_rows))
        self._inputs = OutputBuffers(
            np, {n: ((), np.int64) for n in ("input_ids", "position_ids", "logits_index")}
        )
        self._past_names = [
            [f"past_key.{i}", f"past_value.{i}", f"past_key_scale.{i}", f"past_value_scale.{i}"]
            for i in range(layers)
        ]
        self._small: dict[str, np.ndarray] = {}
        self._bound_n_kv = -1
        self._bound_tokens = -1
        self._bound_rows = -1
        self.new_keys: list[np.ndarray] = []
        self.new_values: list[np.ndarray] = []
        self._logits = np.empty((0, self.vocab_size), np.float32)

    def _run_step(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Bind the pass (`_bind_step`), run it, `put` the new rows into `cache`; logits and run seconds."""
        self._bind_step(cache, plan, batch)
        start = time.perf_counter()
        self.binder.run()
        seconds = time.perf_counter() - start
        for layer in range(self.spec.num_layers):
            cache.put(layer, self.new_keys[layer], self.new_values[layer])
        return self._logits, seconds

    def close(self) -> None:
        """Forget the bindings."""
        self.binder.clear()

    def _bind_step(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> None:
        """Bind what changed since the last pass: the small int64 inputs are copied into fixed buffers
        (bound once per length), the pools once per n_kv, the outputs once per token / row count."""
        binder, count, rows = self.binder, len(batch.tokens), len(batch.logits_index)
        for name, values in (
            ("input_ids", batch.tokens),
            ("position_ids", batch.positions),
            ("logits_index", batch.logits_index),
        ):
            buf = self._small.get(name)
            if buf is None or len(buf) != len(values):  # the same view object while the length stays
                buf = self._small[name] = self._inputs.view(name, len(values))
            buf[:] = values
            binder.bind_input(name, buf)
        binder.bind_input("attention_bias", plan.bias_before_put)
        if plan.n_kv != self._bound_n_kv:
            int8 = self.kv_dtype == "int8"
            for layer, names in enumerate(self._past_names):
                view = cast(PoolView, cache.get(layer, "pool"))
                binder.bind_input(names[0], view.keys)
                binder.bind_input(names[1], view.values)
                if int8:
                    binder.bind_input(names[2], view.key_scales)
                    binder.bind_input(names[3], view.value_scales)
            self._bound_n_kv = plan.n_kv
        if count != self._bound_tokens:
            out = self.outputs
            self.new_keys = [out.view(f"new_key.{i}", count) for i in range(self.spec.num_layers)]
            self.new_values = [out.view(f"new_value.{i}", count) for i in range(self.spec.num_layers)]
            for i in range(self.spec.num_layers):
                binder.bind_output(f"new_key.{i}", self.new_keys[i])
                binder.bind_output(f"new_value.{i}", self.new_values[i])
            self._bound_tokens = count
        if rows != self._bound_rows:
            self._logits = self.outputs.view("logits", rows)
            binder.bind_output("logits", self._logits)
            self._bound_rows = rows


class NativeRunner(PoolViewRunner):
    """Runs kvarray's native pool-view decoder step (docs/export.md) over the cache's pool, zero-copy.

    The pool view ``keys[:n_kv]`` of every layer and the plan's ``bias_before_put [T, n_kv + T]`` are
    bound as inputs, ``new_key.{i}`` / ``new_value.{i}`` ``[T, H, D]`` and ``logits [S, vocab]`` are
    written into preallocated buffers, and `put` scatters the new rows.

    Args:
        session: the graph's session; info: its kvarray metadata; spec: the cache spec (None: the graph's).
        max_rows: initial rows of the output buffers.

    Raises `UnsupportedModel` (not a Llama pool-view graph), `GraphMismatch` (names, shapes or dtypes
    against the spec, listed).
    """

    kind = "native"

    def __init__(
        self, session: ort.InferenceSession, info: GraphInfo, spec: KVSpec | None, max_rows: int
    ) -> None:
        if info.architecture != "llama" or info.view != "pool":
            raise UnsupportedModel(
                f"the engine runs decoder-only pool-view graphs; got {info.architecture!r} "
                f"({info.graph}, view {info.view!r}): not supported yet"
            )
        self.session, self.info = session, info
        self.spec = spec or info.spec
        self.vocab_size = info.vocab_size
        self.kv_dtype = info.kv_dtype
        self.group_size = info.group_size
        self.tokens = dict(info.tokens)
        self._check_graph()
        self._setup_binding(max_rows)

    def forward(self, cache: CausalCache, plan: ForwardPlan, batch: Batch) -> tuple[np.ndarray, float]:
        """Bind, run, `put`; see `Runner`."""
        return self._run_step(cache, plan, batch)

    def _check_graph(self) -> None:
        """Names against the native convention for the spec's layers; shapes and dtypes against the spec."""
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        conv = convention("native-int8" if self.kv_dtype == "int8" else "native")
        check_names(conv, self.spec.num_layers, list(ins), list(outs))
        wrong = pool_step_mismatches(self.spec, self.vocab_size, ins, outs)
        for i in range(self.spec.num_layers):
            for name in (f"past_key.{i}", f"past_value.{i}"):
                stored = _ORT_DTYPES.get(ins[name].type, ins[name].type)
                if stored != self.kv_dtype:
                    wrong.append(f"{name} {ins[name].type} (expected {self.kv_dtype})")
        if wrong:
            raise GraphMismatch(f"the graph does not match the cache spec {self.spec}: " + "; ".join(wrong))

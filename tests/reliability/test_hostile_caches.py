"""Hostile inputs for every public entry point of the three caches: wrong dtypes, ranks, shapes and devices,
NaN and infinity, negative, huge, unsigned, bool and float ids and positions, empty and duplicate
tokens, states of another configuration, version or kind. Each case raises its named `KVArrayError`
whose message says what was expected, and the cache's `state_dict` stays byte for byte as it was (the
current plan as current as it was). The tables count their cases in the test names."""

# ruff: noqa: E501 - one case a line

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hostile_helpers (no conftest here)

from hostile_helpers import (  # noqa: E402
    DIM,
    HEADS,
    SPEC,
    FakeDeviceArray,
    assert_refused,
    causal_cache,
    encdec_cache,
    encoder_cache,
    rows,
    snapshot,
)

from kvarray import KVSpec  # noqa: E402
from kvarray.causal import CausalCache  # noqa: E402
from kvarray.encdec import EncoderDecoderCache  # noqa: E402
from kvarray.encoder import EncoderCache  # noqa: E402
from kvarray.errors import (  # noqa: E402
    BackendUnavailable,
    CacheFull,
    ConfigError,
    DeviceMismatch,
    DTypeMismatch,
    EntryWritten,
    IndexOutOfRange,
    NoEncoderEntry,
    NonFiniteValues,
    PositionError,
    SequenceExists,
    ShapeMismatch,
    SpecMismatch,
    StalePlan,
    StateFormatMismatch,
    TooManySequences,
    UnknownModality,
    UnknownSequence,
)
from kvarray.guard import MAX_POSITION  # noqa: E402
from kvarray.spec import RopeSpec  # noqa: E402

Case = tuple[str, Callable[[Any], Any], type, str]


def kv(count: int = 2, dtype: Any = np.float16, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Valid-looking rows ``[count, H, D]`` (or `shape`) of `dtype`."""
    out = rows(7, range(count)).astype(dtype)
    return out if shape is None else np.resize(out, shape).astype(dtype)


def poisoned(value: float, dtype: Any = np.float16, count: int = 2) -> np.ndarray:
    """Rows with one `value` (NaN or an infinity) in the last row."""
    out = kv(count, dtype)
    out[-1, 1, 5] = value
    return out


def edited(state: dict[str, np.ndarray], **changes: Any) -> dict[str, Any]:
    """A copy of `state` with entries replaced (``name__with__dots`` spelled with double underscores);
    None deletes an entry."""
    out: dict[str, Any] = dict(state)
    for key, value in changes.items():
        name = key.replace("__", ".")
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def config_of(state: dict[str, np.ndarray], **changes: Any) -> np.ndarray:
    """The state's ``meta.config`` with fields changed."""
    config = json.loads(bytes(state["meta.config"]).decode())
    config.update(changes)
    return np.frombuffer(json.dumps(config, sort_keys=True).encode(), np.uint8).copy()


def with_cells(c: CausalCache, **arrays: np.ndarray) -> dict[str, Any]:
    """`c`'s state with some ``cells.*`` arrays replaced."""
    state = c.state_dict()
    return edited(state, **{f"cells__{k}": v for k, v in arrays.items()})


def broken_refs(c: CausalCache) -> dict[str, Any]:
    refs = c.state_dict()["cells.refs"].copy()
    refs[0] += 1
    return with_cells(c, refs=refs)


def negative_position(c: CausalCache) -> dict[str, Any]:
    state = c.state_dict()
    positions = state["cells.positions"].copy()
    first = int(state["cells.seq_cells"][0])  # sequence 0's first cell, its only owner holds position 0
    positions[first] = -5
    return with_cells(c, positions=positions)


# ---- CausalCache ------------------------------------------------------------------------------------
CAUSAL: list[Case] = [
    # put(layer, keys, values): the current pass has T = 2 tokens
    ("put keys float64", lambda c: c.put(0, kv(2, np.float64), kv()), DTypeMismatch, "keys must be float16, got float64"),
    ("put values int32", lambda c: c.put(0, kv(), kv(2, np.int32)), DTypeMismatch, "values must be float16, got int32"),
    ("put keys bool", lambda c: c.put(0, kv(2, np.bool_), kv()), DTypeMismatch, "keys must be float16, got bool"),
    ("put keys float32 for a float16 spec", lambda c: c.put(0, kv(2, np.float32), kv()), DTypeMismatch, "keys must be float16"),
    ("put keys rank 2", lambda c: c.put(0, kv().reshape(2, -1), kv()), ShapeMismatch, r"keys must be \[T, kv_heads, head_dim\] = \(2, 2, 32\)"),
    ("put keys rank 4", lambda c: c.put(0, kv()[None], kv()), ShapeMismatch, r"= \(2, 2, 32\), got \(1, 2, 2, 32\)"),
    ("put keys heads", lambda c: c.put(0, kv().reshape(2, 1, 64), kv()), ShapeMismatch, r"got \(2, 1, 64\)"),
    ("put keys head_dim", lambda c: c.put(0, kv()[:, :, :16], kv()), ShapeMismatch, r"got \(2, 2, 16\)"),
    ("put keys too many rows", lambda c: c.put(0, kv(3), kv()), ShapeMismatch, "keys has 3 rows; 2 are expected"),
    ("put keys empty", lambda c: c.put(0, kv(0), kv()), ShapeMismatch, "keys has 0 rows; 2 are expected"),
    ("put values wrong, keys right", lambda c: c.put(1, kv(), kv(1)), ShapeMismatch, "values has 1 rows; 2 are expected"),
    ("put keys NaN", lambda c: c.put(0, poisoned(np.nan), kv()), NonFiniteValues, "keys must be finite: NaN or infinity found in row 1"),
    ("put values +inf (int8 pool)", lambda c: c.put(0, kv(), poisoned(np.inf)), NonFiniteValues, "values must be finite"),
    ("put keys -inf", lambda c: c.put(1, poisoned(-np.inf), kv()), NonFiniteValues, "keys must be finite"),
    ("put keys on a device", lambda c: c.put(0, FakeDeviceArray(kv()), kv()), DeviceMismatch, "keys live on a CUDA device; this cache's pools are host NumPy arrays"),
    ("put values on a device", lambda c: c.put(0, kv(), FakeDeviceArray(kv())), DeviceMismatch, "values live on a CUDA device"),
    ("put keys None", lambda c: c.put(0, None, kv()), ShapeMismatch, r"keys must be \[T, kv_heads, head_dim\]"),
    ("put keys nested list", lambda c: c.put(0, kv().tolist(), kv()), DTypeMismatch, "keys must be float16, got float64"),
    ("put layer -1", lambda c: c.put(-1, kv(), kv()), IndexOutOfRange, r"layer must be in \[0, 2\), got -1"),
    ("put layer 2", lambda c: c.put(2, kv(), kv()), IndexOutOfRange, r"layer must be in \[0, 2\), got 2"),
    ("put layer True", lambda c: c.put(True, kv(), kv()), IndexOutOfRange, "layer must be an integer, got the bool True"),
    ("put layer 1.0", lambda c: c.put(1.0, kv(), kv()), IndexOutOfRange, r"layer must be in \[0, 2\), got 1.0"),
    ("put layer 2**70", lambda c: c.put(2**70, kv(), kv()), IndexOutOfRange, r"layer must be in \[0, 2\)"),
    # get(layer, view)
    ("get layer 2", lambda c: c.get(2), IndexOutOfRange, r"layer must be in \[0, 2\)"),
    ("get layer False", lambda c: c.get(False), IndexOutOfRange, "the bool False"),
    ("get view bogus", lambda c: c.get(0, "bogus"), ConfigError, "unknown view 'bogus'; expected one of 'pool', 'gathered', 'pages'"),
    ("get view 3", lambda c: c.get(0, 3), ConfigError, "unknown view 3"),
    ("get view None", lambda c: c.get(0, None), ConfigError, "unknown view None"),
    # start_forward(seq_ids, positions)
    ("start ids float", lambda c: c.start_forward([3.0], [0]), ShapeMismatch, "seq_ids must be integers, got float64"),
    ("start ids bool", lambda c: c.start_forward(np.array([True]), [0]), ShapeMismatch, "seq_ids must be integers, got bool"),
    ("start ids uint64 past int64", lambda c: c.start_forward(np.array([2**63], np.uint64), [0]), IndexOutOfRange, "seq_ids must fit int64"),
    ("start ids past uint64", lambda c: c.start_forward([2**64 + 1], [0]), ShapeMismatch, "seq_ids must be integers, got object"),
    ("start ids string", lambda c: c.start_forward("ab", [0]), ShapeMismatch, r"must be \[T\] each"),
    ("start ids None", lambda c: c.start_forward(None, [0]), ShapeMismatch, r"must be \[T\] each"),
    ("start ids on a device", lambda c: c.start_forward(FakeDeviceArray(np.array([3])), [0]), BackendUnavailable, "cupy"),
    ("start ids rank 2", lambda c: c.start_forward([[3]], [[0]]), ShapeMismatch, r"must be \[T\] each, got \(1, 1\)"),
    ("start lengths differ", lambda c: c.start_forward([3, 3], [0]), ShapeMismatch, r"got \(2,\) and \(1,\)"),
    ("start positions float", lambda c: c.start_forward([3], [0.5]), ShapeMismatch, "positions must be integers, got float64"),
    ("start positions NaN", lambda c: c.start_forward([3], [np.nan]), ShapeMismatch, "positions must be integers"),
    ("start position 2**62", lambda c: c.start_forward([3], [MAX_POSITION]), PositionError, r"positions must lie in \[0, 4611686018427387904\)"),
    ("start position uint64 2**63", lambda c: c.start_forward([3], np.array([2**63], np.uint64)), PositionError, "positions must lie in"),
    ("start new sequence at -1", lambda c: c.start_forward([3], [-1]), PositionError, "cannot start at negative position -1"),
    ("start duplicate token", lambda c: c.start_forward([3, 3], [0, 0]), PositionError, "a sequence's tokens must be consecutive"),
    ("start positions skip", lambda c: c.start_forward([3, 3], [0, 2]), PositionError, "must be consecutive"),
    ("start existing sequence ahead", lambda c: c.start_forward([0], [9]), PositionError, "its next token must be at 6, got 9"),
    ("start existing sequence repeats", lambda c: c.start_forward([0], [5]), PositionError, "its next token must be at 6, got 5"),
    ("start too many sequences", lambda c: c.start_forward([3, 4], [0, 0]), TooManySequences, "starts 2 new sequence"),
    ("start cache full", lambda c: c.start_forward([3] * 40, list(range(40))), CacheFull, "needs 40 cells, 36 are free"),
    # remove(seq, begin, end)
    ("remove unknown", lambda c: c.remove(7), UnknownSequence, "sequence 7 holds no cells"),
    ("remove seq 1.0", lambda c: c.remove(1.0), DTypeMismatch, r"seq must be an integer, got 1.0 \(float\)"),
    ("remove seq True", lambda c: c.remove(True), DTypeMismatch, "seq must be an integer, got the bool True"),
    ("remove seq '0'", lambda c: c.remove("0"), DTypeMismatch, "seq must be an integer, got '0'"),
    ("remove seq 2**64", lambda c: c.remove(2**64), IndexOutOfRange, "seq must be in"),
    ("remove seq uint64 2**63", lambda c: c.remove(np.uint64(2**63)), IndexOutOfRange, "seq must be in"),
    ("remove begin -1", lambda c: c.remove(0, -1), PositionError, "begin must be in"),
    ("remove end < begin", lambda c: c.remove(0, 3, 2), PositionError, r"remove needs 0 <= begin <= end, got \[3, 2\)"),
    ("remove begin 0.5", lambda c: c.remove(0, 0.5), DTypeMismatch, "begin must be an integer"),
    ("remove end NaN", lambda c: c.remove(0, 0, float("nan")), DTypeMismatch, "end must be an integer"),
    # copy_prefix(src, dst, length)
    ("copy_prefix unknown src", lambda c: c.copy_prefix(7, 3, 1), UnknownSequence, "sequence 7 holds no cells"),
    ("copy_prefix dst holds cells", lambda c: c.copy_prefix(0, 2, 1), SequenceExists, "target 2 already holds 4 cells"),
    ("copy_prefix onto itself", lambda c: c.copy_prefix(0, 0, 2), SequenceExists, "target 0 already holds"),
    ("copy_prefix length -1", lambda c: c.copy_prefix(0, 3, -1), PositionError, "copy_prefix of -1 cells"),
    ("copy_prefix length past src", lambda c: c.copy_prefix(0, 3, 7), PositionError, "copy_prefix of 7 cells from sequence 0, which holds 6"),
    ("copy_prefix length 2.0", lambda c: c.copy_prefix(0, 3, 2.0), DTypeMismatch, "length must be an integer"),
    ("copy_prefix dst 2**63", lambda c: c.copy_prefix(0, 2**63, 1), IndexOutOfRange, "dst must be in"),
    ("copy_prefix dst True", lambda c: c.copy_prefix(0, True, 1), DTypeMismatch, "dst must be an integer, got the bool"),
    # can_resume(seq, position)
    ("can_resume seq 0.0", lambda c: c.can_resume(0.0, 6), DTypeMismatch, "seq must be an integer"),
    ("can_resume position 6.0", lambda c: c.can_resume(0, 6.0), DTypeMismatch, "position must be an integer"),
    ("can_resume position '6'", lambda c: c.can_resume(0, "6"), DTypeMismatch, "position must be an integer"),
    # shift(seq, delta, rope, begin)
    ("shift unknown", lambda c: c.shift(7, 1, None), UnknownSequence, "sequence 7 holds no cells"),
    ("shift delta 1.5", lambda c: c.shift(0, 1.5, None), DTypeMismatch, "delta must be an integer"),
    ("shift delta True", lambda c: c.shift(0, True, None), DTypeMismatch, "delta must be an integer, got the bool"),
    ("shift delta 2**62", lambda c: c.shift(0, MAX_POSITION, None), PositionError, "delta must be in"),
    ("shift past MAX_POSITION", lambda c: c.shift(0, MAX_POSITION - 3, None), PositionError, "would move position 5 past"),
    ("shift below 0", lambda c: c.shift(2, -10, None), PositionError, "would move position 0 to -10, below 0"),
    ("shift onto a kept position", lambda c: c.shift(0, -1, None, begin=3), PositionError, "would move position 3 to 2, below 3"),
    ("shift begin -1", lambda c: c.shift(0, 1, None, begin=-1), PositionError, "begin must be in"),
    ("shift rope a dict", lambda c: c.shift(0, 1, {"theta": 1e4}), ConfigError, "rope must be a RopeSpec or None, got dict"),
    ("shift rope odd rotary_dim", lambda c: c.shift(0, 1, RopeSpec(rotary_dim=7)), ShapeMismatch, "rotary_dim must be even"),
    # length, cell_table
    ("length 0.5", lambda c: c.length(0.5), DTypeMismatch, "seq must be an integer"),
    ("cell_table unknown", lambda c: c.cell_table(7), UnknownSequence, "sequence 7 holds no cells"),
    ("cell_table False", lambda c: c.cell_table(False), DTypeMismatch, "the bool False"),
    # load_state_dict(state)
    ("load a list", lambda c: c.load_state_dict([1, 2]), SpecMismatch, "must be a mapping of names"),
    ("load integer keys", lambda c: c.load_state_dict({1: np.zeros(1)}), SpecMismatch, "must be a mapping of names"),
    ("load without config", lambda c: c.load_state_dict(edited(c.state_dict(), meta__config=None)), SpecMismatch, "meta.config is missing"),
    ("load garbled config", lambda c: c.load_state_dict(edited(c.state_dict(), meta__config=np.array([255, 0], np.uint8))), SpecMismatch, "not a configuration record"),
    ("load other capacity", lambda c: c.load_state_dict(edited(c.state_dict(), meta__config=config_of(c.state_dict(), capacity=64))), SpecMismatch, "the state was made for"),
    ("load format 2", lambda c: c.load_state_dict(edited(c.state_dict(), meta__config=config_of(c.state_dict(), format=2))), StateFormatMismatch, "state format 2; this kvarray reads format 1"),
    ("load pool float32", lambda c: c.load_state_dict(edited(c.state_dict(), layer__0__keys=c.state_dict()["layer.0.keys"].astype(np.float32))), SpecMismatch, r"layer.0.keys is missing or not float16 \(48, 2, 32\)"),
    ("load pool short", lambda c: c.load_state_dict(edited(c.state_dict(), layer__1__values=c.state_dict()["layer.1.values"][:40])), SpecMismatch, r"layer.1.values is missing or not int8 \(48, 2, 32\)"),
    ("load pool as list", lambda c: c.load_state_dict(edited(c.state_dict(), layer__0__keys=[0.0])), SpecMismatch, "layer.0.keys is missing or not"),
    ("load scales missing", lambda c: c.load_state_dict(edited(c.state_dict(), layer__0__value_scales=None)), SpecMismatch, "layer.0.value_scales is missing"),
    ("load refs off by one", lambda c: c.load_state_dict(broken_refs(c)), SpecMismatch, "refs do not count the sequences"),
    ("load negative position", lambda c: c.load_state_dict(negative_position(c)), SpecMismatch, r"positions must lie in \[0, "),
    ("load seq_ids float", lambda c: c.load_state_dict(with_cells(c, seq_ids=np.array([0.0, 1.0, 2.0]))), SpecMismatch, "cells.seq_ids must be int64"),
    ("load seq_cells out of range", lambda c: c.load_state_dict(with_cells(c, seq_cells=c.state_dict()["cells.seq_cells"] + 48)), SpecMismatch, r"seq_cells outside \[0, capacity\)"),
    ("load without cells", lambda c: c.load_state_dict(edited(c.state_dict(), cells__seq_ids=None)), SpecMismatch, "seq_ids .S., seq_indptr .S . 1. and seq_cells .nnz. are needed"),
    ("load an encoder state", lambda c: c.load_state_dict(encoder_cache().state_dict()), SpecMismatch, "the state was made for"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CAUSAL], ids=[c[0] for c in CAUSAL])
def test_causal_hostile_inputs_98_cases(call: Callable[[Any], Any], error: type, match: str) -> None:
    assert len(CAUSAL) == 98 and len({c[0] for c in CAUSAL}) == 98  # the battery's size, visible
    assert_refused(causal_cache(), call, error, match)


# ---- EncoderCache -----------------------------------------------------------------------------------
def other_plan(e: EncoderCache) -> Any:
    """A plan made by another encoder cache."""
    return encoder_cache().make_plan([10], [0])


def entries_edit(e: EncoderCache, name: str, value: np.ndarray) -> dict[str, Any]:
    return edited(e.state_dict(), **{f"entries__{name}": value})


def overlapping(e: EncoderCache) -> dict[str, Any]:
    table = e.state_dict()["entries.table"].copy()
    table[1, 1] = table[0, 1] + 1  # the second float16 entry starts inside the first
    return entries_edit(e, "table", table)


ENCODER: list[Case] = [
    # put_sequence(seq, layer, keys, values, modality) / put_batch(seq_ids, layer, keys, values, lengths, modality)
    ("put keys float64", lambda e: e.put_sequence(20, 0, kv(3, np.float64), kv(3)), DTypeMismatch, "keys must be float16 or float32, got float64"),
    ("put keys rank 2", lambda e: e.put_sequence(20, 0, kv(3).reshape(3, -1), kv(3)), ShapeMismatch, r"keys must be \[M, kv_heads, head_dim\]"),
    ("put values heads", lambda e: e.put_sequence(20, 0, kv(3), kv(3).reshape(3, 1, 64)), ShapeMismatch, r"values must be \[M, kv_heads, head_dim\]"),
    ("put keys NaN (text, float16)", lambda e: e.put_sequence(20, 0, poisoned(np.nan, count=3), kv(3)), NonFiniteValues, "keys must be finite"),
    ("put values inf (image, int8)", lambda e: e.put_sequence(20, 0, kv(3), poisoned(np.inf, count=3), "image"), NonFiniteValues, "values must be finite"),
    ("put keys float32 -inf", lambda e: e.put_sequence(20, 0, poisoned(-np.inf, np.float32, 3), kv(3)), NonFiniteValues, "keys must be finite"),
    ("put keys on a device", lambda e: e.put_sequence(20, 0, FakeDeviceArray(kv(3)), kv(3)), DeviceMismatch, "keys live on a CUDA device"),
    ("put layer 2", lambda e: e.put_sequence(20, 2, kv(3), kv(3)), IndexOutOfRange, r"layer must be in \[0, 2\)"),
    ("put layer True", lambda e: e.put_sequence(20, True, kv(3), kv(3)), IndexOutOfRange, "the bool True"),
    ("put modality unknown", lambda e: e.put_sequence(20, 0, kv(3), kv(3), "audio"), UnknownModality, r"unknown modality 'audio'; this cache stores \['image', 'text'\]"),
    ("put modality a list", lambda e: e.put_sequence(20, 0, kv(3), kv(3), ["text"]), UnknownModality, "unknown modality"),
    ("put seq 2.0", lambda e: e.put_sequence(2.0, 0, kv(3), kv(3)), DTypeMismatch, "seq must be an integer"),
    ("put seq 2**64", lambda e: e.put_sequence(2**64, 0, kv(3), kv(3)), IndexOutOfRange, "seq must be in"),
    ("put_batch ids float", lambda e: e.put_batch([20.0, 21.0], 0, kv(4), kv(4), [2, 2]), DTypeMismatch, "seq_ids must be integers, got float64"),
    ("put_batch ids bool", lambda e: e.put_batch(np.array([True, False]), 0, kv(4), kv(4), [2, 2]), DTypeMismatch, "seq_ids must be integers, got bool"),
    ("put_batch ids uint64 past int64", lambda e: e.put_batch(np.array([2**63], np.uint64), 0, kv(2), kv(2), [2]), IndexOutOfRange, "seq_ids must fit int64"),
    ("put_batch ids on a device", lambda e: e.put_batch(FakeDeviceArray(np.array([20])), 0, kv(2), kv(2), [2]), DTypeMismatch, "host integers"),
    ("put_batch duplicate ids", lambda e: e.put_batch([20, 20], 0, kv(4), kv(4), [2, 2]), ShapeMismatch, "ids distinct"),
    ("put_batch length 0", lambda e: e.put_batch([20, 21], 0, kv(2), kv(2), [2, 0]), ShapeMismatch, "lengths > 0"),
    ("put_batch length -2", lambda e: e.put_batch([20, 21], 0, kv(2), kv(2), [4, -2]), ShapeMismatch, "lengths > 0"),
    ("put_batch lengths float", lambda e: e.put_batch([20, 21], 0, kv(4), kv(4), [2.0, 2.0]), DTypeMismatch, "lengths must be integers"),
    ("put_batch rows do not sum", lambda e: e.put_batch([20, 21], 0, kv(5), kv(5), [2, 2]), ShapeMismatch, "keys has 5 rows; 4 are expected"),
    ("put_batch ids and lengths differ", lambda e: e.put_batch([20, 21], 0, kv(2), kv(2), [2]), ShapeMismatch, r"must be \[S\]"),
    ("put layer written already", lambda e: e.put_sequence(10, 0, kv(3), kv(3)), EntryWritten, "sequence 10 layer 0 is written already"),
    ("put another modality", lambda e: e.put_sequence(13, 1, kv(4), kv(4), "image"), ConfigError, "sequence 13's entry is 'text', not 'image'"),
    ("put another length", lambda e: e.put_sequence(13, 1, kv(3), kv(3)), ShapeMismatch, "entry has M = 4 rows; this put has 3"),
    ("put too many sequences", lambda e: e.put_batch([20, 21], 0, kv(4), kv(4), [2, 2]), TooManySequences, "2 new sequences exceed max_sequences=5"),
    ("put cache full", lambda e: e.put_sequence(20, 0, kv(26), kv(26)), CacheFull, "needs 26 float16 rows"),
    ("put empty entry", lambda e: e.put_sequence(20, 0, kv(0), kv(0)), ShapeMismatch, "lengths > 0"),
    # start_forward / make_plan / use
    ("start without an entry", lambda e: e.start_forward([20], [0]), NoEncoderEntry, "sequence 20, which has no encoder entry"),
    ("start with layers unwritten", lambda e: e.start_forward([13], [0]), NoEncoderEntry, "an entry with layers unwritten"),
    ("start ids float", lambda e: e.start_forward([10.0], [0]), ShapeMismatch, "seq_ids must be integers"),
    ("start ids uint64 past int64", lambda e: e.start_forward(np.array([2**63 + 10], np.uint64), [0]), IndexOutOfRange, "seq_ids must fit int64"),
    ("start position 2**62", lambda e: e.start_forward([10], [MAX_POSITION]), PositionError, "positions must lie in"),
    ("start duplicate token", lambda e: e.start_forward([10, 10], [4, 4]), PositionError, "must be consecutive"),
    ("make_plan ids rank 2", lambda e: e.make_plan([[10]], [[0]]), ShapeMismatch, r"must be \[T\] each"),
    ("use a string", lambda e: e.use("plan"), ConfigError, "use.. takes make_plan's CrossPlan or None, not str"),
    ("use another cache's plan", lambda e: e.use(other_plan(e)), StalePlan, "made by another encoder cache"),
    # get(layer, view)
    ("get layer 5", lambda e: e.get(5), IndexOutOfRange, r"layer must be in \[0, 2\)"),
    ("get layer True", lambda e: e.get(True), IndexOutOfRange, "the bool True"),
    ("get view pages", lambda e: e.get(0, "pages"), ConfigError, "'pool' and 'gathered' views, not 'pages'"),
    ("get view bogus", lambda e: e.get(0, "bogus"), ConfigError, "unknown view 'bogus'"),
    # remove, fork, check_fork, entry, shares_entry, pools, bytes_per_token
    ("remove unknown", lambda e: e.remove(20), UnknownSequence, "sequence 20 has no encoder entry"),
    ("remove 10.0", lambda e: e.remove(10.0), DTypeMismatch, "seq must be an integer"),
    ("fork an incomplete entry", lambda e: e.fork(13, 20), NoEncoderEntry, "cannot fork sequence 13"),
    ("fork onto an entry", lambda e: e.fork(10, 11), SequenceExists, "sequence 11 already has an encoder entry"),
    ("fork dst 20.5", lambda e: e.fork(10, 20.5), DTypeMismatch, "dst must be an integer"),
    ("fork dst 2**63", lambda e: e.fork(10, 2**63), IndexOutOfRange, "dst must be in"),
    ("check_fork unknown src", lambda e: e.check_fork(20, 21), NoEncoderEntry, "cannot fork sequence 20"),
    ("entry unknown", lambda e: e.entry(20), UnknownSequence, "sequence 20 has no encoder entry"),
    ("entry True", lambda e: e.entry(True), DTypeMismatch, "the bool True"),
    ("shares_entry float", lambda e: e.shares_entry(10, 11.0), DTypeMismatch, "b must be an integer"),
    ("pools bfloat16", lambda e: e.pools(0, "bfloat16"), ConfigError, r"no 'bfloat16' pools; this cache stores \('float16', 'int8'\)"),
    ("pools layer True", lambda e: e.pools(True, "int8"), IndexOutOfRange, "the bool True"),
    ("bytes_per_token unknown", lambda e: e.bytes_per_token("video"), UnknownModality, "unknown modality 'video'"),
    # load_state_dict / check_state
    ("load a tuple", lambda e: e.load_state_dict((1, 2)), SpecMismatch, "must be a mapping of names"),
    ("load other capacity", lambda e: e.load_state_dict(edited(e.state_dict(), meta__config=config_of(e.state_dict(), max_sequences=9))), SpecMismatch, "the state was made for"),
    ("load format 0", lambda e: e.load_state_dict(edited(e.state_dict(), meta__config=config_of(e.state_dict(), format=0))), StateFormatMismatch, "state format 0; this kvarray reads format 1"),
    ("load table float", lambda e: e.load_state_dict(entries_edit(e, "table", e.state_dict()["entries.table"].astype(np.float64))), SpecMismatch, "entries.table must be int64"),
    ("load written 2", lambda e: e.load_state_dict(entries_edit(e, "written", e.state_dict()["entries.written"] * 2)), SpecMismatch, "entries.written must be 0/1 uint8"),
    ("load overlapping entries", lambda e: e.load_state_dict(overlapping(e)), SpecMismatch, "float16 extents out of range or overlapping"),
    ("load seq_ids rank 0", lambda e: e.load_state_dict(entries_edit(e, "seq_ids", np.int64(10))), SpecMismatch, "entries.seq_ids must be int64 of rank 1"),
    ("load a causal state", lambda e: e.load_state_dict(causal_cache().state_dict()), SpecMismatch, "the state was made for"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in ENCODER], ids=[c[0] for c in ENCODER])
def test_encoder_hostile_inputs_63_cases(call: Callable[[Any], Any], error: type, match: str) -> None:
    assert len(ENCODER) == 63 and len({c[0] for c in ENCODER}) == 63  # the battery's size, visible
    assert_refused(encoder_cache(), call, error, match)


# ---- EncoderDecoderCache ----------------------------------------------------------------------------
ENCDEC: list[Case] = [
    ("put keys NaN", lambda d: d.put(0, poisoned(np.nan), kv()), NonFiniteValues, "keys must be finite"),
    ("put keys rank 2", lambda d: d.put(0, kv().reshape(2, -1), kv()), ShapeMismatch, r"keys must be \[T, kv_heads, head_dim\]"),
    ("put layer True", lambda d: d.put(True, kv(), kv()), IndexOutOfRange, "the bool True"),
    ("get view bogus", lambda d: d.get(0, "bogus"), ConfigError, "unknown view"),
    ("get_cross layer 2", lambda d: d.get_cross(2), IndexOutOfRange, r"layer must be in \[0, 2\)"),
    ("put_cross inf", lambda d: d.put_cross(20, 0, poisoned(np.inf, count=3), kv(3)), NonFiniteValues, "keys must be finite"),
    ("put_cross_batch ids float", lambda d: d.put_cross_batch([20.0], 0, kv(2), kv(2), [2]), DTypeMismatch, "seq_ids must be integers"),
    ("start an incomplete entry", lambda d: d.start_forward([13], [0]), NoEncoderEntry, "an entry with layers unwritten"),
    ("start ids float", lambda d: d.start_forward([10.0], [4]), ShapeMismatch, "seq_ids must be integers"),
    ("start a repeated position", lambda d: d.start_forward([10], [3]), PositionError, "its next token must be at 4, got 3"),
    ("start ids uint64 past int64", lambda d: d.start_forward(np.array([2**63], np.uint64), [0]), IndexOutOfRange, "seq_ids must fit int64"),
    ("remove unknown", lambda d: d.remove(20), UnknownSequence, "sequence 20 is in neither"),
    ("remove 10.0", lambda d: d.remove(10.0), DTypeMismatch, "seq must be an integer"),
    ("copy_prefix onto a sequence", lambda d: d.copy_prefix(10, 11, 2), SequenceExists, "sequence 11 already has an encoder entry"),
    ("copy_prefix from an incomplete entry", lambda d: d.copy_prefix(13, 20, 0), NoEncoderEntry, "cannot fork sequence 13"),
    ("copy_prefix length past src", lambda d: d.copy_prefix(10, 20, 9), PositionError, "copy_prefix of 9 cells"),
    ("fork dst float", lambda d: d.fork(10, 20.0), DTypeMismatch, "dst must be an integer"),
    ("reorder beams float", lambda d: d.reorder([10.0], [10]), DTypeMismatch, "beams must be integers"),
    ("reorder lengths differ", lambda d: d.reorder([10, 11], [10]), ConfigError, "beams and parents must pair up"),
    ("reorder other entries", lambda d: d.reorder([10], [11]), ConfigError, "beam 10 and parent 11 hold different encoder entries"),
    ("reorder unknown", lambda d: d.reorder([20], [10]), UnknownSequence, "sequence 20 has no encoder entry"),
    ("can_resume position float", lambda d: d.can_resume(10, 4.0), DTypeMismatch, "position must be an integer"),
    ("shift delta float", lambda d: d.shift(10, 0.5, None), DTypeMismatch, "delta must be an integer"),
    ("load a list", lambda d: d.load_state_dict([]), SpecMismatch, "must be a mapping"),
    ("load integer keys", lambda d: d.load_state_dict({0: np.zeros(1)}), SpecMismatch, "must be a mapping of names"),
    ("load without cross", lambda d: d.load_state_dict({k: v for k, v in d.state_dict().items() if k.startswith("self.")}), SpecMismatch, "self.. and cross.. entries are needed"),
    ("load another decoder", lambda d: d.load_state_dict({**d.state_dict(), "self.meta.config": config_of(d.causal.state_dict(), capacity=8)}), SpecMismatch, "the state was made for"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in ENCDEC], ids=[c[0] for c in ENCDEC])
def test_encdec_hostile_inputs_27_cases(call: Callable[[Any], Any], error: type, match: str) -> None:
    assert len(ENCDEC) == 27 and len({c[0] for c in ENCDEC}) == 27  # the battery's size, visible
    assert_refused(encdec_cache(), call, error, match)


# ---- inputs that are odd but valid: accepted, with the effect a user expects --------------------------
def test_empty_batch_is_a_pass_that_changes_nothing() -> None:
    cache = causal_cache()
    before = snapshot(cache)
    plan = cache.start_forward(np.array([], np.int64), np.array([], np.int64))
    assert plan.num_tokens == 0 and plan.bias.shape == (0, plan.n_kv)
    for layer in range(SPEC.num_layers):
        cache.put(layer, kv(0), kv(0))
        assert cache.get(layer).bias.shape == (0, plan.n_kv)
    assert snapshot(cache) == before
    encoder = encoder_cache()
    before = snapshot(encoder)
    encoder.put_batch([], 0, kv(0), kv(0), [])
    encoder.start_forward(np.array([], np.int64), np.array([], np.int64))
    assert encoder.get(0).keys.shape == (0, HEADS, DIM) and encoder.get(1, "gathered").keys.shape[0] == 0
    assert snapshot(encoder) == before
    encdec = encdec_cache()
    before = snapshot(encdec)
    encdec.start_forward(np.array([], np.int64), np.array([], np.int64))
    assert encdec.get(0).bias.shape == (0, 32) and encdec.get_cross(1).bias.shape == (0, 0)
    assert snapshot(encdec) == before


def test_non_contiguous_and_foreign_rows_are_stored_as_contiguous_copies() -> None:
    """put accepts any host array of the spec's dtype (strided, reversed, read-only): it is stored as a
    contiguous copy would be."""
    strided = np.zeros((2, HEADS, DIM * 2), np.float16)
    strided[:, :, ::2] = kv()
    reversed_rows = kv()[::-1]
    readonly = kv().copy()
    readonly.flags.writeable = False
    results = []
    for keys in (strided[:, :, ::2], np.ascontiguousarray(reversed_rows[::-1]), readonly):
        cache = causal_cache()
        cache.put(0, keys, -kv())
        cells = cache.plan.slot_mapping
        results.append(cache.state_dict()["layer.0.keys"][cells])
    assert not strided[:, :, ::2].flags.c_contiguous
    for stored in results:
        assert stored.tobytes() == kv().tobytes()


def test_negative_and_large_sequence_ids_are_ordinary_ids() -> None:
    cache = causal_cache(max_sequences=8)
    for seq in (-(2**63), -1, 2**63 - 1, np.int64(2**40), np.uint64(5)):
        cache.start_forward([seq], [0])
        cache.put(0, kv(1), kv(1))
        cache.put(1, kv(1), kv(1))
    assert sorted(cache.sequences()) == sorted([0, 1, 2, -(2**63), -1, 2**63 - 1, 2**40, 5])
    restored = causal_cache(max_sequences=8)
    restored.load_state_dict(cache.state_dict())
    assert sorted(restored.sequences()) == sorted(cache.sequences())


def test_can_resume_answers_false_for_positions_it_would_refuse() -> None:
    cache = causal_cache()
    assert cache.can_resume(0, 6) and cache.can_resume(9, 0)
    assert not cache.can_resume(0, 7) and not cache.can_resume(9, -1)
    assert not cache.can_resume(9, MAX_POSITION) and not cache.can_resume(9, 2**70)


def test_check_finite_false_stores_nan_in_float_pools_only() -> None:
    """With ``check_finite=False`` a float pool stores what it is given; an int8 pool still refuses (a NaN
    or infinity would quantize to garbage)."""
    cache = causal_cache(check_finite=False)
    keys = poisoned(np.nan)
    cache.put(0, keys, kv())
    stored = cache.state_dict()["layer.0.keys"][cache.plan.slot_mapping]
    assert np.isnan(stored).sum() == 1
    assert_refused(cache, lambda c: c.put(1, kv(), poisoned(np.inf)), NonFiniteValues, "values must be finite")
    encoder = encoder_cache(check_finite=False)
    encoder.put_sequence(20, 0, poisoned(np.nan, count=3), kv(3))  # text: float16
    assert_refused(encoder, lambda e: e.put_sequence(21, 0, kv(3), poisoned(np.inf, count=3), "image"),
                   NonFiniteValues, "values must be finite")


def test_largest_finite_values_pass_the_finite_check() -> None:
    cache = causal_cache()
    keys = kv()
    keys[0, 0, :4] = [65504, -65504, 6e-8, -0.0]  # float16 max, min, smallest subnormal, negative zero
    cache.put(0, keys, keys)
    assert cache.state_dict()["layer.0.keys"][cache.plan.slot_mapping].tobytes() == keys.tobytes()


def test_constructors_refuse_mismatched_parts() -> None:
    with pytest.raises(ConfigError, match="takes a CausalCache and an EncoderCache, got EncoderCache and"):
        EncoderDecoderCache(encoder_cache(), encoder_cache())  # type: ignore[arg-type]
    small = KVSpec(num_layers=1, num_kv_heads=HEADS, head_dim=DIM)
    with pytest.raises(ConfigError, match="must match"):
        EncoderDecoderCache(CausalCache(small, 8, 2, xp=np), encoder_cache())


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_finite_scan_finds_every_lane(dtype: Any) -> None:
    """`kvarray.finite` finds a NaN or an infinity at every index, for sizes that fill whole words and
    sizes that do not, at odd offsets, in either array of a pair, and never flags finite extremes."""
    from kvarray.finite import host_nonfinite

    info = np.finfo(dtype)
    extremes = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0, 1.0, -1.0], dtype)
    assert host_nonfinite(extremes) == -1 and host_nonfinite(extremes, extremes) == -1
    for n in range(1, 21):
        base = np.linspace(-1000, 1000, n).astype(dtype)
        shifted = np.concatenate([base[:1], base])[1:]  # the same values at an offset of one element
        for i in range(n):
            for value in (np.nan, np.inf, -np.inf):
                bad = base.copy()
                bad[i] = value
                assert host_nonfinite(bad) == 0 and host_nonfinite(shifted, bad) == 1
                assert host_nonfinite(bad[None], base[None]) == 0
        assert host_nonfinite(shifted) == -1

"""The naming conventions of decoder graphs, as data, and matching a session's names to one of them.

A `Convention` lists the fixed input/output names of a graph family and its per-layer names as format
strings over the layer index ``{i}``. `match_convention` finds the convention (and the layer count) whose
names a session has; `check_names` checks a session against one convention and a layer count, raising
`GraphMismatch` with the names expected and found.

    native          kvarray's own graphs (docs/export.md): past_key.{i} / new_key.{i}
    native-int8     the same with past_key_scale.{i} / past_value_scale.{i}
    native-gathered the gathered view, with token_sequence
    native-decode   the decode view (Llama, GroupQueryAttention): seqlens_k, no bias; past_key.{i} ->
                    present_key.{i} (bound to the same buffers)
    native-seq2seq  T5 / Whisper decoder steps: cross_key.{i}, cross_bias (T5 adds past_position_ids)
    optimum         Optimum decoder-only: past_key_values.{i}.key -> present.{i}.key
    optimum-seq2seq Optimum encoder-decoder (T5): past_key_values.{i}.decoder.key / .encoder.key, with
                    encoder_attention_mask (present.{i}.encoder.* are produced on the first step only)
    optimum-whisper the same without encoder_attention_mask
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import GraphMismatch

__all__ = [
    "CONVENTIONS",
    "DECODE_NAMES",
    "Convention",
    "Match",
    "check_names",
    "convention",
    "match_convention",
]


@dataclass(frozen=True)
class Convention:
    """One family's names.

    Attributes:
        name: the convention's name (a key of `CONVENTIONS`).
        inputs, outputs: names every graph of the family has (order free).
        layer_inputs, layer_outputs: per-layer names, format strings over ``{i}``.
        optional_inputs: names a graph of the family may have (e.g. Optimum's position_ids).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layer_inputs: tuple[str, ...]
    layer_outputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()

    def expected(self, num_layers: int) -> tuple[list[str], list[str]]:
        """The required input and output names of a graph with `num_layers` layers."""
        ins = [*self.inputs, *(f.format(i=i) for i in range(num_layers) for f in self.layer_inputs)]
        outs = [*self.outputs, *(f.format(i=i) for i in range(num_layers) for f in self.layer_outputs)]
        return ins, outs

    def layers_in(self, names: Iterable[str]) -> int:
        """The layer count the names imply: 1 + the highest ``{i}`` of the first per-layer input pattern."""
        pattern = re.compile(re.escape(self.layer_inputs[0]).replace(r"\{i\}", r"(\d+)") + "$")
        found = [int(m.group(1)) for n in names if (m := pattern.match(n))]
        return max(found) + 1 if found else 0


_NATIVE_IN = ("input_ids", "position_ids", "attention_bias", "logits_index")
_NATIVE_OUT = ("logits",)
_NATIVE_LAYER_OUT = ("new_key.{i}", "new_value.{i}")
#: the names of a decode-view decoder step (kvarray.export, `View.DECODE`): one token per sequence, each
#: sequence's past length in seqlens_k [S] int32 instead of a bias, past_key.{i} [S, H, L, D] written in
#: place through present_key.{i}
DECODE_NAMES = Convention(
    "native-decode",
    ("input_ids", "position_ids", "seqlens_k", "logits_index"),
    _NATIVE_OUT,
    ("past_key.{i}", "past_value.{i}"),
    ("present_key.{i}", "present_value.{i}"),
)
_OPT_SEQ_LAYER_IN = (
    "past_key_values.{i}.decoder.key",
    "past_key_values.{i}.decoder.value",
    "past_key_values.{i}.encoder.key",
    "past_key_values.{i}.encoder.value",
)
_OPT_SEQ_LAYER_OUT = ("present.{i}.decoder.key", "present.{i}.decoder.value")

#: every convention, most specific first (matching takes the first whose names are all present)
CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            "native-int8",
            _NATIVE_IN,
            _NATIVE_OUT,
            ("past_key.{i}", "past_value.{i}", "past_key_scale.{i}", "past_value_scale.{i}"),
            _NATIVE_LAYER_OUT,
        ),
        Convention(
            "native-seq2seq",
            (*_NATIVE_IN, "cross_bias"),
            _NATIVE_OUT,
            ("past_key.{i}", "past_value.{i}", "cross_key.{i}", "cross_value.{i}"),
            _NATIVE_LAYER_OUT,
            optional_inputs=("past_position_ids",),
        ),
        Convention(
            "native-gathered",
            (*_NATIVE_IN, "token_sequence"),
            _NATIVE_OUT,
            ("past_key.{i}", "past_value.{i}"),
            _NATIVE_LAYER_OUT,
        ),
        DECODE_NAMES,
        Convention("native", _NATIVE_IN, _NATIVE_OUT, ("past_key.{i}", "past_value.{i}"), _NATIVE_LAYER_OUT),
        Convention(
            "optimum-seq2seq",
            ("input_ids", "encoder_hidden_states", "encoder_attention_mask"),
            ("logits",),
            _OPT_SEQ_LAYER_IN,
            _OPT_SEQ_LAYER_OUT,
            optional_inputs=("use_cache_branch",),
        ),
        Convention(
            "optimum-whisper",
            ("input_ids", "encoder_hidden_states"),
            ("logits",),
            _OPT_SEQ_LAYER_IN,
            _OPT_SEQ_LAYER_OUT,
            optional_inputs=("use_cache_branch",),
        ),
        Convention(
            "optimum",
            ("input_ids", "attention_mask"),
            ("logits",),
            ("past_key_values.{i}.key", "past_key_values.{i}.value"),
            ("present.{i}.key", "present.{i}.value"),
            optional_inputs=("position_ids",),
        ),
    )
}


def convention(name: str) -> Convention:
    """The convention called `name`; raises `GraphMismatch` listing the known ones."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise GraphMismatch(f"unknown naming convention {name!r}; known: {', '.join(CONVENTIONS)}") from None


@dataclass(frozen=True)
class Match:
    """A session's names matched to a convention: which one, and how many layers."""

    convention: Convention
    num_layers: int


def _missing(conv: Convention, num_layers: int, inputs: Sequence[str], outputs: Sequence[str]) -> list[str]:
    want_in, want_out = conv.expected(num_layers)
    have_in, have_out = set(inputs), set(outputs)
    return [n for n in want_in if n not in have_in] + [n for n in want_out if n not in have_out]


def _unexpected(conv: Convention, num_layers: int, inputs: Sequence[str]) -> list[str]:
    want_in, _ = conv.expected(num_layers)
    allowed = {*want_in, *conv.optional_inputs}
    return [n for n in inputs if n not in allowed]


def _report(what: str, inputs: Sequence[str], outputs: Sequence[str], expected: str) -> GraphMismatch:
    return GraphMismatch(
        f"{what}\n  expected: {expected}\n  found inputs: {', '.join(inputs) or '(none)'}"
        f"\n  found outputs: {', '.join(outputs) or '(none)'}"
    )


def check_names(
    conv: Convention | str, num_layers: int, inputs: Sequence[str], outputs: Sequence[str]
) -> None:
    """Raise `GraphMismatch` unless the graph names `inputs`/`outputs` are those of `conv` with
    `num_layers` layers (required names present, no input the convention does not know)."""
    conv = convention(conv) if isinstance(conv, str) else conv
    missing = _missing(conv, num_layers, inputs, outputs)
    extra = _unexpected(conv, num_layers, inputs)
    if missing or extra:
        want_in, want_out = conv.expected(num_layers)
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing)}")
        if extra:
            detail.append(f"unexpected inputs {', '.join(extra)}")
        raise _report(
            f"the graph's names do not match the {conv.name!r} convention with {num_layers} layers "
            f"({'; '.join(detail)})",
            inputs,
            outputs,
            f"inputs {', '.join(want_in)}; outputs {', '.join(want_out)}",
        )


def match_convention(inputs: Sequence[str], outputs: Sequence[str]) -> Match:
    """The convention whose names the graph has (inputs, outputs: the session's names).

    Tries each of `CONVENTIONS` in order with the layer count its names imply. Raises `GraphMismatch`
    listing every convention's expected names (for one layer) and the names found.
    """
    for conv in CONVENTIONS.values():
        layers = conv.layers_in(inputs)
        if layers and not _missing(conv, layers, inputs, outputs) and not _unexpected(conv, layers, inputs):
            return Match(conv, layers)
    expected = "; ".join(
        f"{c.name}: {', '.join(c.expected(1)[0])} -> {', '.join(c.expected(1)[1])}"
        for c in CONVENTIONS.values()
    )
    raise _report(
        "the graph's names match no known convention (listed for layer 0)", inputs, outputs, expected
    )

"""Attention over blocks of cached and fresh keys, joined before one softmax, for every architecture.

A *block* is a set of keys/values every query of the pass may score against:

- a shared block ``[n, KV, D]`` read by all T tokens (the pool view's past cells, this pass's own K/V,
  an encoder's cross K/V), scored as ``[KV, G*T, D] @ [KV, D, n]``: the ``Transpose(perm=[1, 2, 0])`` of
  the ``[n, KV, D]`` input folds into ONNX Runtime's FusedMatMul, so the pool is read in place;
- a per-token block ``[T, KV, L, D]`` (the gathered view: row t holds the cells of token t's sequence),
  scored token by token.

The scores of all blocks are concatenated along the key axis, the bias ``[T, sum n]`` (0 or -inf, plus an
optional per-head bias such as T5's relative positions) is added, one softmax runs over the joined row,
and each block's slice of the probabilities multiplies that block's values. Grouped-query attention
folds each kv head's G = H / KV query heads into the rows (query head h reads kv head h // G), so K and V
are never repeated. Shapes: T tokens, H query heads, KV kv heads, G = H / KV, D head_dim.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .graph import CONTRIB_DOMAIN, INT64_MAX, GraphBuilder, decode_pool


class View(enum.Enum):
    """What a decoder-step graph reads its past from (see DESIGN.md, "view")."""

    POOL = "pool"  # past_key.{i} [N, KV, D], the pool's first N cells, bias [T, N + T]
    GATHERED = "gathered"  # past_key.{i} [S, KV, L, D] staging buffer + token_sequence [T], bias [T, L + T]
    # DECODE: the gathered staging buffer of a pass where every sequence feeds one token (T = S), read by
    # com.microsoft GroupQueryAttention with seqlens_k [S]; no bias (Llama only: `group_query_attention`)
    DECODE = "decode"


@dataclass(frozen=True)
class KVBlock:
    """Float32 keys and values of one attention block.

    Attributes:
        key, value: ``[n, KV, D]`` when `per_token` is False, else ``[T, KV, L, D]``.
        per_token: whether each token has its own rows (the gathered view).
    """

    key: str
    value: str
    per_token: bool = False


def past_input_names(layer: int, kv_dtype: str) -> list[str]:
    """The graph input names of layer `layer`'s past, in declaration order."""
    names = [f"past_key.{layer}", f"past_value.{layer}"]
    if kv_dtype == "int8":
        names += [f"past_key_scale.{layer}", f"past_value_scale.{layer}"]
    return names


def declare_past(
    g: GraphBuilder,
    layer: int,
    view: View,
    kv_dtype: str,
    kv_heads: int,
    head_dim: int,
    token_sequence: str | None = None,
) -> KVBlock:
    """Declare layer `layer`'s past inputs and return them as a float32 block.

    Pool view: ``past_key.{i}``, ``past_value.{i}`` ``[N, KV, D]`` in `kv_dtype`; int8 adds
    ``past_key_scale.{i}``, ``past_value_scale.{i}`` ``[N, KV * D // 32]`` float16. Gathered view:
    ``[S, KV, L, D]`` float32 or float16 (the gather dequantizes int8), rows picked per token by
    ``token_sequence [T]`` (one Gather per layer: a copy of T * L rows).
    """
    if view is View.POOL:
        shape: list[int | str] = ["past_cells", kv_heads, head_dim]
        key = g.input(f"past_key.{layer}", kv_dtype, shape)
        value = g.input(f"past_value.{layer}", kv_dtype, shape)
        key_scale = value_scale = None
        if kv_dtype == "int8":
            groups = kv_heads * head_dim // 32
            key_scale = g.input(f"past_key_scale.{layer}", "float16", ["past_cells", groups])
            value_scale = g.input(f"past_value_scale.{layer}", "float16", ["past_cells", groups])
        with g.scope(f"layers.{layer}.past"):
            key = decode_pool(g, key, kv_dtype, key_scale, [kv_heads, head_dim])
            value = decode_pool(g, value, kv_dtype, value_scale, [kv_heads, head_dim])
        return KVBlock(key, value)
    assert token_sequence is not None, "the gathered view needs token_sequence"
    shape = ["sequences", kv_heads, "past_length", head_dim]
    key = g.input(f"past_key.{layer}", kv_dtype, shape)
    value = g.input(f"past_value.{layer}", kv_dtype, shape)
    with g.scope(f"layers.{layer}.past"):
        key = decode_pool(g, key, kv_dtype, None, shape[1:])  # type: ignore[arg-type]
        value = decode_pool(g, value, kv_dtype, None, shape[1:])  # type: ignore[arg-type]
        key = g.op("Gather", key, token_sequence, axis=0)
        value = g.op("Gather", value, token_sequence, axis=0)
    return KVBlock(key, value, per_token=True)


def attention(
    g: GraphBuilder,
    query: str,
    blocks: Sequence[KVBlock],
    bias: str,
    *,
    kv_heads: int,
    group: int,
    head_dim: int,
    scale: float,
    head_bias: str | None = None,
) -> str:
    """Softmax attention of ``query [T, H, D]`` over `blocks` joined in order -> ``[T, H * D]``.

    Args:
        bias: ``[T, sum of the blocks' lengths]`` float32, added to every head's scores (0 or -inf).
        group: query heads per kv head, G = H / KV.
        scale: multiplies the queries (``head_dim ** -0.5`` for Llama, 1 for T5).
        head_bias: optional ``[H, T, sum of lengths]`` float32 added per head (T5's position bias).
    """
    heads = kv_heads * group
    if scale != 1.0:
        query = g.op("Mul", query, g.const(scale, np.float32))
    per_kv = g.op("Reshape", query, g.const([0, kv_heads, group, head_dim]))  # [T, KV, G, D]
    rows = None  # [KV, G*T, D], made when a shared block needs it

    scores, lengths = [], []
    for block in blocks:
        if block.per_token:  # [T, KV, G, D] @ [T, KV, D, L] -> [T, KV, G, L] -> [KV, G*T, L]
            key_t = g.op("Transpose", block.key, perm=[0, 1, 3, 2])
            s = g.op("MatMul", per_kv, key_t)
            lengths.append(g.op("Shape", block.key, start=2, end=3))
            target = g.op("Concat", g.const([kv_heads, -1]), lengths[-1], axis=0)
            s = g.op("Reshape", g.op("Transpose", s, perm=[1, 2, 0, 3]), target)
        else:  # [KV, G*T, D] @ [KV, D, n] -> [KV, G*T, n]
            if rows is None:
                rows = g.op("Transpose", per_kv, perm=[1, 2, 0, 3])
                rows = g.op("Reshape", rows, g.const([kv_heads, -1, head_dim]))
            s = g.op("MatMul", rows, g.op("Transpose", block.key, perm=[1, 2, 0]))
            last = len(lengths) == len(blocks) - 1  # the last block's length is never needed
            lengths.append("" if last else g.op("Shape", block.key, start=0, end=1))
        scores.append(s)

    joined = scores[0] if len(scores) == 1 else g.op("Concat", *scores, axis=-1)  # [KV, G*T, n_total]
    joined = g.op("Reshape", joined, g.const([heads, -1, 0]))  # [H, T, n_total]
    joined = g.op("Add", joined, bias)
    if head_bias is not None:
        joined = g.op("Add", joined, head_bias)
    probs = g.op("Softmax", joined, axis=-1)
    probs = g.op("Reshape", probs, g.const([kv_heads, -1, 0]))  # [KV, G*T, n_total]

    outs = []
    start = g.const([0])
    for index, block in enumerate(blocks):
        if len(blocks) == 1:
            p = probs
        else:
            last = index == len(blocks) - 1
            end = g.const([INT64_MAX]) if last else g.op("Add", start, lengths[index])
            p = g.op("Slice", probs, start, end, g.const([-1]))
            start = end
        if block.per_token:  # [KV, G*T, L] -> [T, KV, G, L] @ [T, KV, L, D] -> [KV, G*T, D]
            p = g.op("Reshape", p, g.op("Concat", g.const([kv_heads, group, -1]), lengths[index], axis=0))
            o = g.op("MatMul", g.op("Transpose", p, perm=[2, 0, 1, 3]), block.value)
            o = g.op("Reshape", g.op("Transpose", o, perm=[1, 2, 0, 3]), g.const([kv_heads, -1, head_dim]))
        else:  # [KV, G*T, n] @ [KV, n, D]
            o = g.op("MatMul", p, g.op("Transpose", block.value, perm=[1, 0, 2]))
        outs.append(o)
    out = outs[0]
    for o in outs[1:]:
        out = g.op("Add", out, o)
    out = g.op("Reshape", out, g.const([kv_heads, group, -1, head_dim]))  # [KV, G, T, D]
    out = g.op("Transpose", out, perm=[2, 0, 1, 3])  # [T, KV, G, D]
    return g.op("Reshape", out, g.const([0, heads * head_dim]))


def declare_cross(g: GraphBuilder, layer: int, kv_heads: int, head_dim: int) -> KVBlock:
    """Declare decoder layer `layer`'s cross-attention inputs ``cross_key.{i}``, ``cross_value.{i}``
    ``[M, KV, D]`` float32 (the encoder cache's view: every encoder row of the batch's sequences, scored
    with ``cross_bias [T, M]``) and return them as a shared block (read in place, like the pool view)."""
    shape: list[int | str] = ["cross_rows", kv_heads, head_dim]
    key = g.input(f"cross_key.{layer}", "float32", shape)
    value = g.input(f"cross_value.{layer}", "float32", shape)
    return KVBlock(key, value)


def declare_decode_past(g: GraphBuilder, layer: int, kv_heads: int, head_dim: int) -> KVBlock:
    """Declare layer `layer`'s decode-view past inputs ``past_key.{i}``, ``past_value.{i}``
    ``[S, KV, L, D]`` float32 (the gathered staging buffer, row s for sequence s); `step_model` declares
    their outputs ``present_key.{i}``, ``present_value.{i}`` (see `group_query_attention`)."""
    shape: list[int | str] = ["tokens", kv_heads, "past_length", head_dim]
    key = g.input(f"past_key.{layer}", "float32", shape)
    value = g.input(f"past_value.{layer}", "float32", shape)
    return KVBlock(key, value, per_token=True)


@dataclass(frozen=True)
class RopeTables:
    """What GroupQueryAttention rotates q and k with: ``cos``, ``sin`` ``[P, R / 2]`` float32 tables (one
    row per position) and ``positions [S, 1]`` int64."""

    cos: str
    sin: str
    positions: str


def group_query_attention(
    g: GraphBuilder,
    layer: int,
    qkv: str,
    past: KVBlock,
    seqlens_k: str,
    total: str,
    rope: RopeTables | None,
    *,
    kv_heads: int,
    group: int,
    head_dim: int,
    scale: float,
) -> str:
    """The decode view's attention of layer `layer`: ONNX Runtime's com.microsoft GroupQueryAttention over
    `past` (`declare_decode_past`) and this pass's token of each sequence -> ``[T, H * D]`` (T = S: token
    s is sequence s's only one).

    Args:
        qkv: ``[T, (H + 2 KV) * D]`` the packed projection: queries, keys, values (query head h reads kv
            head h // group, as `attention` does).
        seqlens_k: ``[S]`` int32, each sequence's past length: its rows ``[0, seqlens_k)`` are read, and
            this pass's token goes to row ``seqlens_k`` (GroupQueryAttention's "total length - 1").
        total: int32 scalar, the longest sequence with this pass's token (``max(seqlens_k) + 1``, at most
            the past buffer's rows L and the rope tables' rows).
        rope: the tables GroupQueryAttention rotates q and k with (NeoX pairing; a rotary half-width that
            is a multiple of 8), or None when `qkv`'s queries and keys are rotated already.

    GroupQueryAttention writes this pass's rows (keys rotated) into its outputs ``present_key.{i}`` /
    ``present_value.{i}`` ``[S, KV, L, D]``: bound to the past inputs' own memory, they are written in
    place and nothing is copied (ONNX Runtime shares the buffer when the pointers are equal); bound
    elsewhere, the past is copied into them first. The cache reads its new rows from there.
    """
    heads = kv_heads * group
    packed = g.op("Reshape", qkv, g.const([0, 1, (heads + 2 * kv_heads) * head_dim]))  # [S, 1, (H+2KV)D]
    rotary = [] if rope is None else [rope.cos, rope.sin, rope.positions]
    out = g.op(
        "GroupQueryAttention",
        packed, "", "", past.key, past.value, seqlens_k, total, *rotary,
        outputs=[f"layers.{layer}.attention", f"present_key.{layer}", f"present_value.{layer}"],
        domain=CONTRIB_DOMAIN,
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=scale,
        do_rotary=int(rope is not None),
        rotary_interleaved=0,
    )[0]  # fmt: skip
    return g.op("Reshape", out, g.const([0, heads * head_dim]))

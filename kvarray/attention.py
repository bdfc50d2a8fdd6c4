"""Reference attention in NumPy (float64): over a cache view with its bias, over a plain list of K/V, and
rotary embedding at given positions; and the plain model of a cached token (`ModelToken`) that the
stateful tests and the soak check a cache against. For tests and docs, never a fast path.

Shapes: T query tokens, Hq query heads, H kv heads (Hq a multiple of H: grouped-query attention, query
head h reads kv head ``h // (Hq // H)``), D head_dim, N cells, S sequences, L padded length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ShapeMismatch
from .spec import RopeSpec, RopeStyle
from .xp import to_numpy


def apply_rope(x: Any, positions: Any, rope: RopeSpec) -> np.ndarray:
    """Rotate ``x [T, H, D]`` to ``positions [T]`` (what a model does to its keys and queries), float64.

    Pair i of a head turns by ``positions[t] * rope.inv_freq(D)[i]`` radians; the pairing is
    `rope.style`; values past ``rope.rotary_dims(D)`` pass through.
    """
    out = np.array(to_numpy(x), dtype=np.float64)
    inv_freq = rope.inv_freq(out.shape[-1])
    half = len(inv_freq)
    angle = np.asarray(to_numpy(positions), np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if rope.style is RopeStyle.NEOX:
        first, second = slice(0, half), slice(half, 2 * half)
    else:
        first, second = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
    a, b = out[..., first].copy(), out[..., second].copy()
    out[..., first], out[..., second] = a * cos - b * sin, a * sin + b * cos
    return out


def dequantized(x: Any, scales: Any | None = None) -> np.ndarray:
    """``x [N, H, D]`` as float64 on the host; an int8 ``x`` is multiplied by its group's scale from
    ``scales [N, H * D // g]`` float16 (the scheme of `kvarray.ops`)."""
    arr = to_numpy(x)
    if scales is None:
        return arr.astype(np.float64)
    s = to_numpy(scales).astype(np.float32)
    rows = arr.shape[0]
    grouped = arr.reshape(rows, s.shape[1], -1).astype(np.float32) * s[:, :, None]
    return grouped.reshape(arr.shape).astype(np.float64)


def attend(queries: Any, keys: Any, values: Any, bias: Any) -> np.ndarray:
    """Softmax attention of ``queries [T, Hq, D]`` over ``keys``, ``values [N, H, D]`` with an additive
    ``bias [T, N]`` (0 or -inf); returns ``[T, Hq, D]`` float64. A token that sees no key gets zeros.

    This is how a graph consumes the pool view: ``attend(q, view.keys, view.values, view.bias)``.
    """
    q = np.asarray(to_numpy(queries), np.float64)
    k, v = dequantized(keys), dequantized(values)
    b = np.asarray(to_numpy(bias), np.float64)
    t, hq, d = q.shape
    n, h = k.shape[0], k.shape[1]
    if hq % h or b.shape != (t, n) or v.shape[:2] != (n, h) or k.shape[2] != d:
        raise ShapeMismatch(f"attend: q {q.shape}, keys {k.shape}, values {v.shape}, bias {b.shape} disagree")
    group = hq // h
    k_rep = np.repeat(k, group, axis=1)  # [N, Hq, D]
    v_rep = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,nhd->thn", q, k_rep) / np.sqrt(d) + b[:, None, :]
    top = scores.max(axis=2, keepdims=True)
    seen = np.isfinite(top)
    weights = np.where(seen, np.exp(scores - np.where(seen, top, 0.0)), 0.0)
    total = weights.sum(axis=2, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("thn,nhd->thd", weights, v_rep)


def attend_gathered(queries: Any, keys: Any, values: Any, bias: Any, token_seq: Any) -> np.ndarray:
    """Attention over the gathered view: token t reads row ``token_seq[t]`` of ``keys``, ``values
    [S, H, L, D]`` (HND) with ``bias [T, L]``; returns ``[T, Hq, D]`` float64."""
    k, v = dequantized(keys), dequantized(values)
    b = np.asarray(to_numpy(bias), np.float64)
    seq = np.asarray(to_numpy(token_seq))
    q = np.asarray(to_numpy(queries), np.float64)
    out = np.empty(q.shape, np.float64)
    for t in range(q.shape[0]):
        row_k, row_v = k[seq[t]].transpose(1, 0, 2), v[seq[t]].transpose(1, 0, 2)  # [L, H, D]
        out[t] = attend(q[t : t + 1], row_k, row_v, b[t : t + 1])[0]
    return out


def attend_list(query: Any, keys: Any, values: Any) -> np.ndarray:
    """Attention of one token's ``query [Hq, D]`` over a plain list ``keys``, ``values [n, H, D]`` of
    exactly the tokens it sees (no bias); returns ``[Hq, D]`` float64."""
    k = np.asarray(to_numpy(keys), np.float64)
    q = np.asarray(to_numpy(query), np.float64)[None]
    return attend(q, k, np.asarray(to_numpy(values), np.float64), np.zeros((1, k.shape[0])))[0]


@dataclass
class ModelToken:
    """What a plain model of a cache knows of one cached token: per-layer keys and values ``[layers, H, D]``
    (float64) and how far the cache may be from them (`int8_tolerance`; 0 for float pools until a shift
    rounds the keys)."""

    keys: np.ndarray
    values: np.ndarray
    key_tol: float
    value_tol: float


def int8_tolerance(rows: np.ndarray, storage: str) -> float:
    """How far `storage` may hold `rows` (any shape) from their values: the int8 bound (scale / 2 of the
    largest group, with margin), 0 for float storage."""
    return float(np.abs(rows).max()) / 254 * 1.01 + 1e-4 if storage == "int8" else 0.0


def shift_model(
    tokens: dict[int, ModelToken], moving: list[int], delta: int, rope: RopeSpec, key_storage: str
) -> None:
    """What `CausalCache.shift` does to a sequence's model ``position -> ModelToken``: the tokens at
    `moving` go to position + `delta`, their keys re-rotated by `delta` (`apply_rope`), the tolerance grown
    by the rounding of a rotation (int8 keys are dequantized, rotated and quantized again)."""
    shifted = {}
    for q in moving:
        old = tokens.pop(q)
        rotated = apply_rope(old.keys, np.full(old.keys.shape[0], delta), rope)  # layers as tokens
        scale = float(np.abs(rotated).max())
        grow = scale * 1.5 / 254 * 1.01 if key_storage == "int8" else scale * 2e-3
        shifted[q + delta] = ModelToken(rotated, old.values, old.key_tol * 1.5 + grow, old.value_tol)
    tokens.update(shifted)

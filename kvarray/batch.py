"""A forward pass's batch, validated and grouped by sequence: host NumPy, shared by every cache.

A batch is flat: ``seq_ids [T]`` and ``positions [T]``, any mix of sequences, prefill and decode. A
sequence's tokens must be consecutive positions in batch order (`PositionError` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PositionError, ShapeMismatch


@dataclass(frozen=True, slots=True)
class Batch:
    """A validated batch, grouped by sequence (the part of a plan that does not depend on the cells).

    Attributes:
        seq_ids: ``[T]`` int64 sequence of each token.
        positions: ``[T]`` int64 position of each token.
        sequences: ``[S]`` int64 the batch's sequences in order of first appearance.
        token_seq: ``[T]`` int32 index into `sequences` of each token.
        order: ``[T]`` int64 the tokens grouped by sequence (stable), so that sequence k's tokens are
            ``order[starts[k]:starts[k] + counts[k]]`` in increasing position.
        starts, counts: ``[S]`` int64 each sequence's slice of `order`.
    """

    seq_ids: np.ndarray
    positions: np.ndarray
    sequences: np.ndarray
    token_seq: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray


def group_batch(seq_ids: object, positions: object) -> Batch:
    """Validate the shapes of a batch and group its tokens by sequence (order of first appearance).

    Raises `ShapeMismatch` for arrays that are not 1-D integers of one length, `PositionError` when a
    sequence's tokens are not consecutive positions in batch order.
    """
    ids = np.asarray(seq_ids)
    pos = np.asarray(positions)
    if ids.ndim != 1 or pos.ndim != 1 or ids.shape != pos.shape:
        raise ShapeMismatch(f"seq_ids and positions must be [T] each, got {ids.shape} and {pos.shape}")
    for name, arr in (("seq_ids", ids), ("positions", pos)):
        if arr.size and arr.dtype.kind not in "iu":  # signed or unsigned integers (not bool)
            raise ShapeMismatch(f"{name} must be integers, got {arr.dtype}")
    ids = ids.astype(np.int64, copy=True)
    pos = pos.astype(np.int64, copy=True)
    count = len(ids)
    if len(set(ids.tolist())) == count:  # one token per sequence (decode): nothing to group
        arange = np.arange(count, dtype=np.int64)
        return Batch(ids, pos, ids, arange.astype(np.int32), arange, arange, np.ones(count, np.int64))
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty(len(uniq), np.int32)
    rank[by_first] = np.arange(len(uniq), dtype=np.int32)
    token_seq = rank[inverse.reshape(-1)]
    order = np.argsort(token_seq, kind="stable")
    counts = np.bincount(token_seq, minlength=len(uniq)).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    grouped_seq, grouped_pos = token_seq[order], pos[order]
    same = grouped_seq[1:] == grouped_seq[:-1]
    bad = np.flatnonzero(same & (grouped_pos[1:] != grouped_pos[:-1] + 1))
    if bad.size:
        t = int(order[bad[0] + 1])
        raise PositionError(
            f"sequence {int(ids[t])}: token {t} is at position {int(pos[t])}, the previous token of its "
            f"sequence in the batch is at {int(grouped_pos[bad[0]])}; a sequence's tokens must be consecutive"
        )
    return Batch(ids, pos, uniq[by_first], token_seq, order, starts, counts)

"""Sampling parameters and the samplers: greedy, temperature, top-k, top-p, seeded per request."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, NonFiniteLogits

__all__ = ["SamplingParams", "sample", "sample_each", "sample_rows"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Attributes:
        max_new_tokens: tokens to generate at most (an int >= 1).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before the softmax
            (finite, >= 0).
        top_k: keep the k most likely tokens (0: all). ``top_k=1`` is greedy whatever the temperature.
        top_p: keep the smallest set of most likely tokens whose probability reaches p (in (0, 1]).
        seed: seed of the request's own ``numpy.random.Generator`` (an int >= 0; None: fresh entropy).
        stop_tokens: ids that end the request (the stop token is emitted, then the request finishes);
            None: the model's eos token, if it has one.

    Raises `ConfigError` for a value of the wrong type or out of range (NaN and infinities included).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:  # NaN fails the comparison
            raise ConfigError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ConfigError(f"seed must be an int >= 0 or None, got {self.seed!r}")
        if self.stop_tokens is not None:
            stops = self.stop_tokens
            if isinstance(stops, (str, bytes)) or not all(_is_int(t) for t in stops):
                raise ConfigError(f"stop_tokens must be a sequence of ints or None, got {stops!r}")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from ``logits [vocab]`` float32 under `params`, drawing from `rng` (greedy draws nothing)."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    vocab = scaled.shape[0]
    if 0 < params.top_k < vocab:
        keep = np.argpartition(-scaled, params.top_k - 1)[: params.top_k]
    else:
        keep = np.arange(vocab)
    order = keep[np.argsort(-scaled[keep], kind="stable")]  # candidates, most likely first
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1  # smallest prefix reaching top_p
        order, probs = order[:cut], probs[:cut] / probs[:cut].sum()
    choice = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return int(order[min(choice, len(order) - 1)])


def sample_each(
    logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]
) -> list[int | Exception]:
    """One token per row of ``logits [S, vocab]``, or the exception that row raised in its place.

    Greedy rows are decided in one argmax over all of them. A row whose largest logit is NaN or +inf, or
    whose logits are all -inf, gives `NonFiniteLogits` (``argmax`` returns the first NaN, so checking the
    chosen logit of each row is enough: O(S)); a sampler that raises gives its exception. The engine fails
    those requests alone.
    """
    best = np.argmax(logits, axis=1)
    chosen = logits[np.arange(len(best)), best]
    greedy: list[int | Exception] = best.tolist()
    finite_rows = np.isfinite(chosen)
    if finite_rows.all() and all(p.greedy for p in params):
        return greedy  # every row decided by the one argmax
    finite = finite_rows.tolist()
    out: list[int | Exception] = []
    for k, p in enumerate(params):
        if not finite[k]:
            out.append(NonFiniteLogits(f"logits row {k} has max {float(chosen[k])}: no token to choose"))
        elif p.greedy:
            out.append(greedy[k])
        else:
            try:
                out.append(sample(logits[k], p, rngs[k]))
            except Exception as exc:  # noqa: BLE001 - isolated to this row's request by the engine
                out.append(exc)
    return out


def sample_rows(
    logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]
) -> list[int]:
    """One token per row of ``logits [S, vocab]`` (`sample_each`); raises the first row's exception."""
    tokens = sample_each(logits, params, rngs)
    for token in tokens:
        if isinstance(token, Exception):
            raise token
    return [int(t) for t in tokens]  # type: ignore[arg-type]

"""Sampling parameters and the samplers: greedy, temperature, top-k, top-p, seeded per request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["SamplingParams", "sample", "sample_rows"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before the softmax.
        top_k: keep the k most likely tokens (0: all). ``top_k=1`` is greedy whatever the temperature.
        top_p: keep the smallest set of most likely tokens whose probability reaches p (1.0: all).
        seed: seed of the request's own ``numpy.random.Generator`` (None: fresh entropy).
        stop_tokens: ids that end the request (the stop token is emitted, then the request finishes);
            None: the model's eos token, if it has one.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

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


def sample_rows(
    logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]
) -> list[int]:
    """One token per row of ``logits [S, vocab]``; greedy rows are decided in one argmax over all of them."""
    greedy = np.argmax(logits, axis=1).tolist()
    return [greedy[k] if p.greedy else sample(logits[k], p, rngs[k]) for k, p in enumerate(params)]

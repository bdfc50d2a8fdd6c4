"""The scheduler's pass composition, table-driven: which tokens of which requests each pass feeds, with
prompt chunks mixed into decode passes or (``split_prefill``) in passes of their own. Bookkeeping only:
no session, no cache (the scheduler never touches either)."""

from __future__ import annotations

import numpy as np
import pytest

from kvarray.ort.sampling import SamplingParams
from kvarray.ort.scheduler import Request, Scheduler

GREEDY = SamplingParams(max_new_tokens=8)


def scheduler(split: bool, budget: int = 8, prompt_pass: int | None = None) -> Scheduler:
    return Scheduler(capacity=256, max_sequences=4, prefill_chunk=4, max_batch_tokens=budget,
                     prefix_sharing=False, split_prefill=split, prompt_pass_tokens=prompt_pass)


def arrive(sched: Scheduler, rid: int, prompt_length: int) -> None:
    prompt = np.arange(100 * rid, 100 * rid + prompt_length, dtype=np.int64)
    request = Request(rid, prompt, GREEDY, prompt_length + 8, frozenset(), np.random.default_rng(0))
    sched.waiting.append(request)
    sched.admit(free_cells=256, held=lambda seq: 0)


def passes(sched: Scheduler, steps: int, arrivals: dict[int, list[tuple[int, int]]]) -> list[str]:
    """Run `steps` passes (request ``(id, prompt length)`` arriving before the pass of their step); each
    pass written ``"id:first-last ..."`` (the positions each request feeds) plus ``| sampled ids``."""
    out = []
    for step in range(steps):
        for rid, length in arrivals.get(step, []):
            arrive(sched, rid, length)
        batch = sched.next_batch()
        assert batch is not None
        fed, k = [], 0
        for req, n in batch.fed:
            assert batch.seq_ids[k : k + n].tolist() == [req.id] * n
            fed.append(f"{req.id}:{batch.positions[k]}-{batch.positions[k + n - 1]}")
            k += n
        out.append(" ".join(fed) + " | " + " ".join(str(r.id) for r in batch.sampled))
        sched.commit(batch, [7] * len(batch.sampled), context=None)
    return out


# request 0 (prompt 3) decodes from pass 1; request 1 (prompt 10) arrives at pass 2, request 2 (prompt 2)
# at pass 3. Chunks of 4 tokens, 8 tokens a pass.
ARRIVALS = {0: [(0, 3)], 2: [(1, 10)], 3: [(2, 2)]}
MIXED = [
    "0:0-2 | 0",
    "0:3-3 | 0",
    "0:4-4 1:0-3 | 0",  # decode tokens first, then prompt chunks while the budget lasts
    "0:5-5 1:4-7 2:0-1 | 0 2",
    "0:6-6 2:2-2 1:8-9 | 0 2 1",
    "0:7-7 1:10-10 2:3-3 | 0 1 2",
]
SPLIT = [
    "0:0-2 | 0",
    "0:3-3 | 0",
    "1:0-3 | ",  # prompt passes first when both kinds wait ...
    "1:4-7 2:0-1 | 2",  # ... until they have fed 8 tokens (the budget) since the last decode pass
    "0:4-4 2:2-2 | 0 2",  # then a decode pass; request 1 still prefills: it waits for the next turn
    "1:8-9 | 1",
    "0:5-5 1:10-10 2:3-3 | 0 1 2",  # everyone decodes: one pass of one token each
    "0:6-6 1:11-11 2:4-4 | 0 1 2",
]
# prompt passes of 3 tokens at most: a turn of three of them (9 >= 8 tokens) before each decode pass
SPLIT_SHORT = [
    "0:0-2 | 0",
    "0:3-3 | 0",
    "1:0-2 | ",
    "1:3-5 | ",
    "1:6-8 | ",
    "0:4-4 | 0",
    "1:9-9 2:0-1 | 1 2",
    "0:5-5 1:10-10 2:2-2 | 0 1 2",
]


@pytest.mark.parametrize(
    "split, prompt_pass, expected",
    [(False, None, MIXED), (False, 3, MIXED), (True, None, SPLIT), (True, 3, SPLIT_SHORT)],
    ids=["mixed", "mixed-short-prompt-passes", "split", "split-short-prompt-passes"],
)
def test_pass_composition(split, prompt_pass, expected):
    """Mixed passes hold decode tokens, so the prompt-pass limit only cuts the first one (3 tokens)."""
    assert passes(scheduler(split, prompt_pass=prompt_pass), len(expected), ARRIVALS) == expected


def test_prompt_passes_alone_keep_to_their_limit():
    """Passes without decode tokens (no request decodes yet) feed at most `prompt_pass_tokens`."""
    sched = scheduler(split=False, budget=8, prompt_pass=5)
    got = passes(sched, 4, {0: [(0, 4), (1, 4)]})
    assert got == ["0:0-3 1:0-0 | 0", "0:4-4 1:1-3 | 0 1", "0:5-5 1:4-4 | 0 1", "0:6-6 1:5-5 | 0 1"]


def test_decode_passes_over_budget_take_the_longest_waiting_first():
    """More decoding requests than the token budget: each decode pass feeds the ones fed longest ago, so
    none starves; turns of prompt passes (2 tokens each here) still come between them."""
    sched = scheduler(split=True, budget=2)
    got = passes(sched, 8, {0: [(0, 1), (1, 1), (2, 1)], 3: [(3, 3)]})
    assert got == [
        "0:0-0 1:0-0 | 0 1",
        "0:1-1 1:1-1 | 0 1",
        "2:0-0 | 2",
        "3:0-1 | ",  # the turn goes on: 1 prompt token fed since the last decode pass, of 2
        "0:2-2 1:2-2 | 0 1",
        "3:2-2 | 3",
        "2:1-1 0:3-3 | 2 0",
        "1:3-3 3:3-3 | 1 3",
    ]


def test_retry_groups_keep_the_split():
    """`next_batch(only=...)` (the engine's retries of a failed pass) composes passes of that group by
    the same rule."""
    sched = scheduler(split=True)
    passes(sched, 2, {0: [(0, 3)]})
    arrive(sched, 1, 6)
    batch = sched.next_batch(only=[sched.running[0], sched.running[1]])
    assert batch is not None and [r.id for r, _ in batch.fed] == [1] and batch.decode_tokens == 0

"""Faults injected into the engine's passes: the failing request fails alone (`FinishReason.ERROR`, the
exception kept), its cells are freed, and every other request's greedy tokens equal a clean run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers (no conftest here)

from engine_helpers import (  # noqa: E402
    GREEDY,
    NEW_TOKENS,
    T5,
    InjectedFault,
    alone,
    engine,
    fail_when,
    holds,
    live_cells,
    random_prompts,
    reference,
)

from kvarray.errors import NonFiniteLogits, RequestFailed  # noqa: E402
from kvarray.ort import FinishReason, SamplingParams  # noqa: E402

PROMPTS, EXPECTED = reference()
VICTIM = [5, 6, 7, 8, 9, 10, 11]


def run(eng, prompts, params=GREEDY):
    """Queue `prompts`, stream to the end; (ids, events, requests popped)."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids = [eng.add_request(p, each[k]) for k, p in enumerate(prompts)]
    events = list(eng.stream())
    return ids, events, [eng.pop(i) for i in ids]


def check_clean(reqs, expected, eng):
    """The requests all finished normally with the expected tokens; nothing is left in the cache."""
    assert [r.output for r in reqs] == expected
    assert all(r.finish_reason is FinishReason.LENGTH and r.error is None for r in reqs)
    assert eng.stats().cells_used == 0 and eng.stats().sequences == 0


@pytest.mark.parametrize(
    "graph,options",
    [("native", {}), ("native", {"kv_dtype": "int8"}), ("optimum", {})],
    ids=["native-float32", "native-int8", "optimum"],
)
def test_a_pass_that_always_fails_with_one_request_fails_it_alone(graph, options):
    eng = engine(graph, **options)
    victim = len(PROMPTS)  # the id the fourth request gets
    failures = fail_when(eng, lambda batch: holds(batch, victim) and eng.metrics.steps >= 2)
    ids, events, reqs = run(eng, [*PROMPTS, VICTIM])
    bad = reqs[-1]
    assert bad.finish_reason is FinishReason.ERROR and isinstance(bad.error, InjectedFault)
    assert len(bad.output) == 2  # two passes went through before the fault: prefill, then one decode
    assert [e for e in events if e.request is bad][-1].token is None  # its last event carries no token
    check_clean(reqs[:-1], alone(PROMPTS, graph=graph, **options), eng)
    assert failures[0] == 4 and failures[-1] == 1  # the whole pass, then halves down to the victim alone
    assert eng.passes_failed == len(failures) and eng.requests_failed == 1
    eng.close()


def test_a_failure_halfway_through_put_is_rolled_back():
    eng = engine()
    victim = len(PROMPTS)
    put = eng.cache.put

    def failing_put(layer, keys, values):
        if layer == 1 and victim in eng.cache.plan.seq_ids.tolist() and eng.metrics.steps >= 3:
            raise InjectedFault("injected in put, layer 1 of 2")
        put(layer, keys, values)

    eng.cache.put = failing_put
    _, _, reqs = run(eng, [*PROMPTS, VICTIM])
    assert reqs[-1].finish_reason is FinishReason.ERROR and "layer 1" in str(reqs[-1].error)
    check_clean(reqs[:-1], EXPECTED, eng)


def test_a_transient_failure_of_a_whole_pass_fails_nobody():
    eng = engine()
    state = {"left": 1}

    def once(batch):
        if eng.metrics.steps == 5 and state["left"]:
            state["left"] -= 1
            return True
        return False

    failures = fail_when(eng, once)
    _, _, reqs = run(eng, PROMPTS)
    check_clean(reqs, EXPECTED, eng)
    assert failures == [3] and eng.passes_failed == 1 and eng.requests_failed == 0


def test_a_failure_during_a_chunked_prefill_with_a_shared_prefix():
    eng = engine(prefill_chunk=4)
    base = random_prompts(1, seed=3, low=20, high=20)[0]
    other = base[:12] + [1, 2, 3]  # shares 12 tokens with `base`, which runs first
    a = eng.add_request(base, GREEDY)
    for _ in range(6):
        eng.step()
    b = eng.add_request(other, GREEDY)
    fail_when(eng, lambda batch: holds(batch, b))
    list(eng.stream())
    assert eng.metrics.shared_tokens == 12
    assert eng.request(b).finish_reason is FinishReason.ERROR and eng.request(b).output == []
    assert eng.pop(a).output == alone([base])[0]
    assert eng.stats().cells_used == 0


def test_a_sampling_failure_fails_that_request_alone(monkeypatch):
    import kvarray.ort.sampling as sampling

    real = sampling.sample

    def sample(logits, params, rng):
        if params.seed == 13:
            raise InjectedFault("injected in the sampler")
        return real(logits, params, rng)

    monkeypatch.setattr(sampling, "sample", sample)
    eng = engine()
    hot = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, seed=13)
    _, _, reqs = run(eng, [*PROMPTS, VICTIM], [GREEDY, GREEDY, GREEDY, hot])
    assert reqs[-1].finish_reason is FinishReason.ERROR and reqs[-1].output == []
    assert "sampler" in str(reqs[-1].error)
    check_clean(reqs[:-1], EXPECTED, eng)
    assert eng.passes_failed == 0  # the pass itself stood


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "all -inf"])
def test_non_finite_logits_fail_that_row_alone(value):
    eng = engine()
    victim = len(PROMPTS)
    forward = eng.runner.forward

    def poisoned(cache, plan, batch):
        logits, seconds = forward(cache, plan, batch)
        for row, req in enumerate(batch.sampled):
            if req.id == victim and eng.metrics.steps >= 4:
                if value == -np.inf:
                    logits[row] = value
                else:
                    logits[row, 7] = value
        return logits, seconds

    eng.runner.forward = poisoned
    _, _, reqs = run(eng, [*PROMPTS, VICTIM])
    assert reqs[-1].finish_reason is FinishReason.ERROR and isinstance(reqs[-1].error, NonFiniteLogits)
    assert len(reqs[-1].output) == 4
    check_clean(reqs[:-1], EXPECTED, eng)


@pytest.mark.parametrize("prefill_chunk", [256, 3], ids=["whole prompts", "chunks of 3"])
def test_a_window_pass_that_evicted_ring_cells_is_retried_exactly(prefill_chunk):
    # window 8 + 2 sinks: `a` holds 10 cells after its prefill, so each decode pass overwrites one in place
    options = {"window": 8, "sinks": 2, "prefill_chunk": prefill_chunk}
    eng = engine(**options)
    long_prompt, short_prompt = random_prompts(2, seed=5, low=12, high=12)
    a = eng.add_request(long_prompt, GREEDY)
    for _ in range(7):
        eng.step()
    b = eng.add_request(short_prompt, GREEDY)  # its prompt chunks and `a`'s ring writes share passes
    state = {"left": 3}

    def thrice(batch):
        if holds(batch, a) and holds(batch, b) and state["left"]:
            state["left"] -= 1
            return True
        return False

    failures = fail_when(eng, thrice)
    roll_back, evicted = eng._roll_back, []

    def watched(req, held):
        ok = roll_back(req, held)
        evicted.append(held - eng.cache.length(req.id))
        return ok

    eng._roll_back = watched
    list(eng.stream())
    ra, rb = eng.pop(a), eng.pop(b)
    assert failures == [2, 2, 2] and eng.requests_failed == 0
    assert evicted.count(1) >= 3  # `a`'s ring write evicted a cell each time, for good
    assert [ra.output, rb.output] == alone([long_prompt, short_prompt], **options)
    assert eng.stats().cells_used == 0


def test_a_window_sequence_missing_what_its_next_token_sees_is_failed():
    options = {"window": 4, "sinks": 1}
    eng = engine(**options)
    a = eng.add_request(random_prompts(1, seed=6, low=9, high=9)[0], GREEDY)
    b = eng.add_request([1, 2], GREEDY)
    for _ in range(3):
        eng.step()
    remove = eng.cache.remove

    def remove_too_much(seq, begin=0, end=None):  # a roll-back that lost a visible cell
        removed = remove(seq, begin, end)
        if seq == a and end is None and begin:
            removed += remove(seq, begin - 2, begin - 1)
        return removed

    eng.cache.remove = remove_too_much
    state = {"left": 1}

    def once(batch):
        if state["left"]:
            state["left"] -= 1
            return True
        return False

    fail_when(eng, once)
    eng.step()
    eng.cache.remove = remove
    list(eng.stream())
    ra, rb = eng.pop(a), eng.pop(b)
    assert ra.finish_reason is FinishReason.ERROR and isinstance(ra.error, InjectedFault)
    assert rb.output == alone([[1, 2]], **options)[0]
    assert eng.stats().cells_used == 0


def test_a_failing_on_token_callback_fails_its_own_request():
    eng = engine()

    def explode(event):
        if len(event.request.output) == 3:
            raise InjectedFault("injected in a callback")

    bad = eng.add_request(VICTIM, GREEDY, on_token=explode)
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    events = list(eng.stream())
    req = eng.pop(bad)
    assert req.finish_reason is FinishReason.ERROR and len(req.output) == 3
    assert [e.reason for e in events if e.request is req][-1] is FinishReason.ERROR
    check_clean([eng.pop(i) for i in ids], EXPECTED, eng)


def test_generate_raises_request_failed_once_every_request_has_finished():
    eng = engine()
    victim = len(PROMPTS)
    fail_when(eng, lambda batch: holds(batch, victim))
    with pytest.raises(RequestFailed, match=f"request {victim} failed: InjectedFault") as caught:
        eng.generate([*PROMPTS, VICTIM], GREEDY)
    assert caught.value.request_id == victim and isinstance(caught.value.__cause__, InjectedFault)
    assert caught.value.outputs == [*EXPECTED, []]
    assert eng.stats().cells_used == 0 and not eng.requests


def test_random_faults_leak_nothing_and_spare_the_others():
    eng = engine(max_sequences=6, capacity=256)
    rng = np.random.default_rng(11)
    prompts = random_prompts(18, seed=12)
    poisoned = {3, 7, 8, 15}  # request ids (queued in order from 0)

    def fault(batch):
        if holds(batch, *poisoned) and rng.random() < 0.7:
            return True
        return len(batch.fed) > 1 and rng.random() < 0.1  # transient: the retries succeed

    fail_when(eng, fault)
    _, _, reqs = run(eng, prompts)
    failed = {r.id for r in reqs if r.finish_reason is FinishReason.ERROR}
    assert failed <= poisoned and eng.passes_failed > len(failed)
    clean = alone(prompts)
    for req in reqs:
        if req.id not in failed:
            assert req.output == clean[req.id], req.id
    assert eng.stats().cells_used == 0 and live_cells(eng) == 0


def test_seq2seq_engines_isolate_a_failing_request_too():
    from kvarray.ort import Seq2SeqConfig, Seq2SeqEngine

    data = np.load(T5 / "reference.npz")
    sources = [data[f"encoder_{k}"].tolist() for k in range(3)]
    prompts = [data[f"prompt_{k}"].tolist() for k in range(3)]
    expected = [data[f"generated_{k}"].tolist() for k in range(3)]
    eng = Seq2SeqEngine.from_model_dir(T5, Seq2SeqConfig(capacity=256, max_sequences=4, threads=1))
    victim = eng.add_request([4, 5, 6], None, GREEDY)
    ids = [eng.add_request(s, p, GREEDY) for s, p in zip(sources, prompts, strict=True)]
    fail_when(eng, lambda batch: holds(batch, victim) and eng.metrics.steps >= 2)
    list(eng.stream())
    assert eng.pop(victim).finish_reason is FinishReason.ERROR
    assert [eng.pop(i).output for i in ids] == expected
    stats = eng.stats()
    assert stats.self_attention.cells_used == 0

"""The engine against transformers' greedy outputs: alone, and 8 requests arriving at different steps."""

from __future__ import annotations

import numpy as np
import pytest
from ort_models import NEW_TOKENS, TINY

from kvarray.errors import ConfigError
from kvarray.ort import Engine, EngineConfig, FinishReason, SamplingParams

GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)


def engine(**options) -> Engine:
    config = {"capacity": 512, "max_sequences": 8, "prefill_chunk": 4, "threads": 1, **options}
    return Engine.from_model_dir(TINY, EngineConfig(**config))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_request_alone_equals_transformers(prompts, expected, k):
    eng = engine(prefill_chunk=256)
    assert eng.generate([prompts[k]], GREEDY) == [expected[k]]
    assert eng.stats().cells_used == 0  # finished requests freed their cells


def run_arrivals(eng: Engine, arrivals: dict[int, list[int]], params: SamplingParams) -> dict[int, list[int]]:
    """Step the engine, adding the prompts of `arrivals` (step -> prompts) at their steps; outputs by id."""
    ids: dict[int, int] = {}
    step, order = 0, 0
    while step <= max(arrivals) or eng.has_work:
        for prompt in arrivals.get(step, []):
            ids[order] = eng.add_request(prompt, params)
            order += 1
        eng.step()
        step += 1
    return {k: eng.pop(rid).output for k, rid in ids.items()}


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_eight_requests_arriving_at_different_steps_equal_transformers(prompts, expected, prefix_sharing):
    """Continuous batching: prefill chunks of 4 and decode tokens of up to 8 requests share each pass."""
    schedule = [0, 0, 1, 2, 3, 5, 8, 13]  # arrival step of request k, whose prompt is prompts[k % 3]
    arrivals: dict[int, list[list[int]]] = {}
    for k, step in enumerate(schedule):
        arrivals.setdefault(step, []).append(prompts[k % 3])
    eng = engine(prefix_sharing=prefix_sharing)
    outputs = run_arrivals(eng, arrivals, GREEDY)
    assert [outputs[k] for k in range(8)] == [expected[k % 3] for k in range(8)]
    m = eng.metrics
    assert m.generated_tokens == 8 * NEW_TOKENS
    assert m.steps < 8 * NEW_TOKENS  # requests really shared passes
    assert (m.shared_tokens > 0) == prefix_sharing
    assert eng.stats().cells_used == 0 and eng.stats().sequences == 0


def test_waiting_requests_take_the_place_of_finished_ones(prompts, expected):
    """max_sequences 2: the third request waits until one finishes, then runs in its cells."""
    eng = engine(max_sequences=2)
    assert eng.generate(prompts, GREEDY) == expected
    assert eng.metrics.steps > 2 * NEW_TOKENS  # at most two at a time


def test_cache_capacity_limits_admission_not_results(prompts, expected):
    """A cache of 64 cells holds two of the requests at a time (each needs prompt + 15 cells)."""
    eng = engine(capacity=64)
    assert eng.generate(prompts + prompts, GREEDY) == expected + expected
    assert eng.metrics.peak_cells <= 64


def test_prefix_sharing_gives_identical_outputs_with_fewer_cells(prompts):
    system = prompts[1] + prompts[0]  # 19 tokens shared by every request
    requests = [system + p for p in prompts]
    results, peaks, shared = [], [], []
    for sharing in (False, True):
        eng = engine(prefix_sharing=sharing, prefill_chunk=256)
        first = eng.add_request(requests[0], GREEDY)
        eng.step()  # the first request's prompt is in the cache before the others arrive
        rest = [eng.add_request(r, GREEDY) for r in requests[1:]]
        eng.step()
        peaks.append(eng.stats().cells_used)
        shared.append(eng.stats().cells_shared)
        for _ in eng.stream():
            pass
        results.append([eng.pop(i).output for i in (first, *rest)])
    assert results[0] == results[1]
    assert shared == [0, len(system)]
    assert peaks[1] == peaks[0] - 2 * len(system)  # two requests did not recompute (nor store) the prefix


def test_streaming_iterator_and_callback(prompts, expected):
    eng = engine()
    seen: list[tuple[int, int]] = []
    rid = eng.add_request(prompts[0], GREEDY, on_token=lambda e: seen.append((e.request.id, e.token)))
    events = list(eng.stream())
    assert [e.token for e in events] == expected[0] == [t for _, t in seen]
    assert events[-1].finished and events[-1].reason is FinishReason.LENGTH
    assert not any(e.finished for e in events[:-1])
    assert eng.request(rid).finish_reason is FinishReason.LENGTH


def test_stop_token_ends_the_request_and_is_emitted(prompts, expected):
    stop = expected[0][5]
    eng = engine()
    (out,) = eng.generate([prompts[0]], SamplingParams(max_new_tokens=NEW_TOKENS, stop_tokens=(stop,)))
    assert out == expected[0][: expected[0].index(stop) + 1]


def test_context_limit_ends_generation(prompts):
    """The random model's context is 256 positions: a request stops there with reason LENGTH."""
    eng = engine(prefill_chunk=256)
    prompt = (prompts[1] * 22)[:250]
    rid = eng.add_request(prompt, SamplingParams(max_new_tokens=50))
    list(eng.stream())
    req = eng.request(rid)
    assert len(req.prompt) + len(req.output) == 257 and req.finish_reason is FinishReason.LENGTH


def test_generate_text_uses_the_byte_tokenizer():
    eng = engine()
    (text,) = eng.generate_text(["hello"], SamplingParams(max_new_tokens=4))
    assert isinstance(text, str)
    assert eng.tokenizer.encode("hello") == list(b"hello")


def test_python_overhead_is_measured(prompts):
    eng = engine()
    eng.generate(prompts, GREEDY)
    m = eng.metrics
    assert 0 < m.run_seconds < m.step_seconds and 0 < m.overhead_share < 1
    assert m.prefill_tokens == sum(map(len, prompts)) and m.decode_tokens == 3 * (NEW_TOKENS - 1)


def test_outputs_equal_with_other_capacity_and_defrag(prompts, expected):
    """Interleaved arrivals fragment the pools; defragmentation (threshold 0) must not change outputs."""
    eng = engine(defrag_threshold=0.0)
    outputs = run_arrivals(eng, {0: [prompts[0]], 2: [prompts[1]], 4: [prompts[2], prompts[0]]}, GREEDY)
    assert [outputs[k] for k in range(4)] == [expected[0], expected[1], expected[2], expected[0]]
    assert np.isfinite(eng.stats().fragmentation)


# -- admission with a runner's own limit (Seq2SeqRunner: encoder rows) -----------------------------------
@pytest.mark.parametrize(
    "limit, max_sequences, admitted",
    [(None, 8, [0, 1, 2]), (2, 8, [0, 1]), (0, 8, []), (5, 2, [0, 1])],
    ids=["no-limit", "limit-2", "limit-0", "max-sequences-first"],
)
def test_scheduler_admits_at_most_the_runners_limit(limit, max_sequences, admitted):
    from kvarray.ort.scheduler import Request, Scheduler

    sched = Scheduler(capacity=64, max_sequences=max_sequences, prefill_chunk=4, max_batch_tokens=16,
                      prefix_sharing=False)
    for k in range(3):  # 3 requests of 4 cells each: all fit in the cells
        sched.waiting.append(Request(k, np.arange(3), GREEDY, 4, frozenset(), np.random.default_rng(0)))
    assert sched.admit(free_cells=64, held=lambda seq: 0, limit=limit) == []
    assert [r.id for r in sched.running] == admitted
    assert [r.id for r in sched.waiting] == [k for k in range(3) if k not in admitted]  # order kept


def test_seq2seq_engine_shares_the_engine_lifecycle():
    """One lifecycle: both engines are `EngineCore`s; what differs is the runner."""
    from kvarray.ort.engine import EngineCore
    from kvarray.ort.seq2seq import Seq2SeqEngine

    for name in ("step", "stream", "cancel", "pop", "request", "_step", "_admit", "_free"):
        assert getattr(Seq2SeqEngine, name) is getattr(Engine, name) is getattr(EngineCore, name)


@pytest.mark.parametrize("spin", [True, False])
def test_spin_sets_onnx_runtimes_idle_thread_policy(prompts, expected, spin):
    eng = engine(spin=spin)
    options = eng.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    assert eng.generate([prompts[0]], GREEDY) == [expected[0]]


def test_spin_must_be_a_bool():
    with pytest.raises(ConfigError, match="spin must be True or False, got 0"):
        engine(spin=0)



@pytest.mark.parametrize("threads", [0, 1, 2])
def test_kernel_threads_limit_the_cache_kernels_during_a_step_only(prompts, expected, threads):
    """`EngineConfig.kernel_threads` is the stepping thread's kernel thread limit while a step runs (the
    runner's `put` included), and the caller's own limit again afterwards."""
    from kvarray.ops import cpu

    eng = engine(kernel_threads=threads)
    seen = []
    forward = eng.runner.forward

    def recording(*args):
        limit = cpu.swap_thread_limit(0)
        cpu.swap_thread_limit(limit)  # read it, leave it as it was
        seen.append(limit)
        return forward(*args)

    eng.runner.forward = recording
    before = cpu.swap_thread_limit(3)
    try:
        assert eng.generate([prompts[0]], GREEDY) == [expected[0]]
        assert cpu.swap_thread_limit(before) == 3
    finally:
        cpu.swap_thread_limit(before)
    assert seen and set(seen) == {threads}

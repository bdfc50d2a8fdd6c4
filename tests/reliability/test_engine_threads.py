"""The engine takes requests from several threads while one thread steps it: every request finishes with
the tokens of a run of its own, a cancel from another thread never disturbs the pass in flight, and a
second stepping thread is refused."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers (no conftest here)

from engine_helpers import GREEDY, alone, engine, live_cells, random_prompts  # noqa: E402

from kvarray.errors import EngineBusy  # noqa: E402
from kvarray.ort import FinishReason  # noqa: E402

THREADS, PER_THREAD = 4, 8


def test_4_threads_submit_8_requests_each_while_the_main_thread_streams():
    eng = engine(capacity=512, max_sequences=8)
    prompts = random_prompts(THREADS * PER_THREAD, seed=21)
    submitted: dict[int, int] = {}  # request id -> prompt index
    lock = threading.Lock()
    start = threading.Barrier(THREADS + 1)
    errors: list[BaseException] = []

    def submit(worker: int) -> None:
        try:
            start.wait()
            rng = np.random.default_rng(worker)
            for k in range(PER_THREAD):
                index = worker * PER_THREAD + k
                rid = eng.add_request(prompts[index], GREEDY)
                with lock:
                    submitted[rid] = index
                time.sleep(float(rng.uniform(0, 0.01)))  # arrivals spread over the stream
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=submit, args=(w,)) for w in range(THREADS)]
    for w in workers:
        w.start()
    start.wait()
    events = 0
    while any(w.is_alive() for w in workers) or eng.has_work:  # the stream ends whenever it runs dry
        events += sum(1 for _ in eng.stream())
    for w in workers:
        w.join()
    assert not errors
    assert len(submitted) == THREADS * PER_THREAD and sorted(submitted) == list(range(THREADS * PER_THREAD))
    assert events == THREADS * PER_THREAD * GREEDY.max_new_tokens
    clean = alone(prompts)
    for rid, index in submitted.items():
        req = eng.pop(rid)
        assert req.finish_reason is FinishReason.LENGTH
        assert req.output == clean[index], (rid, index)
    assert eng.stats().cells_used == 0 and not eng.requests


def test_cancels_from_other_threads_free_everything_and_spare_the_rest():
    eng = engine(capacity=512, max_sequences=8)
    prompts = random_prompts(24, seed=22)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    doomed = ids[1::3]
    go = threading.Event()

    def cancel_some() -> None:
        go.wait()
        for rid in doomed:
            eng.cancel(rid)
            time.sleep(0.002)

    worker = threading.Thread(target=cancel_some)
    worker.start()
    go.set()
    while eng.has_work or worker.is_alive():
        eng.step()
        with eng._lock:  # no cancel in between: between steps, nothing is held by the dead
            assert eng.stats().cells_used == live_cells(eng)
    worker.join()
    clean = alone(prompts)
    for k, rid in enumerate(ids):
        req = eng.pop(rid)
        if rid in doomed:
            assert req.finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH)
            assert req.output == clean[k][: len(req.output)]
        else:
            assert req.output == clean[k]
    assert eng.stats().cells_used == 0


def _blocking_forward(eng):
    """Make the runner wait inside each pass until `release` is set; `inside` is set when one is waiting."""
    inside, release = threading.Event(), threading.Event()
    forward = eng.runner.forward

    def slow(cache, plan, batch):
        inside.set()
        assert release.wait(10), "the test never released the pass"
        return forward(cache, plan, batch)

    eng.runner.forward = slow
    return inside, release


def _step_held_inside_its_pass(eng, events: list | None = None):
    """Start a thread that steps `eng` (its events appended to `events`) and return once that step waits
    inside its pass: ``(stepper, release)``; set `release` to let the pass go on."""
    inside, release = _blocking_forward(eng)
    stepper = threading.Thread(target=lambda: (events if events is not None else []).extend(eng.step()))
    stepper.start()
    assert inside.wait(10)
    return stepper, release


def test_a_cancel_while_the_pass_runs_waits_for_nothing_and_frees_when_it_ends():
    eng = engine()
    prompts = random_prompts(2, seed=23)
    a, b = (eng.add_request(p, GREEDY) for p in prompts)
    eng.step()
    events: list = []
    stepper, release = _step_held_inside_its_pass(eng, events)
    held = eng.cache.length(a)
    eng.cancel(a)  # returns at once: the pass is still inside the graph
    c = eng.add_request(prompts[0], GREEDY)  # so does a new request
    assert eng.request(a).finish_reason is FinishReason.CANCELLED and eng.cache.length(a) == held
    release.set()
    stepper.join(10)
    assert not stepper.is_alive()
    assert [e.request.id for e in events] == [b]  # the cancelled request got no event from that pass
    assert eng.cache.length(a) == 0 and eng.stats().cells_used == live_cells(eng)
    list(eng.stream())
    clean = alone(prompts)
    assert eng.pop(b).output == clean[1] and eng.pop(c).output == clean[0]
    assert eng.pop(a).output == clean[0][:1]
    assert eng.stats().cells_used == 0


def test_a_second_thread_cannot_step_while_one_does():
    eng = engine()
    eng.add_request([1, 2, 3], GREEDY)
    stepper, release = _step_held_inside_its_pass(eng)
    with pytest.raises(EngineBusy, match="another thread is stepping"):
        eng.step()
    release.set()
    stepper.join(10)
    list(eng.stream())
    assert eng.stats().cells_used == 0


def test_close_waits_for_the_step_in_progress():
    eng = engine()
    eng.add_request([1, 2, 3], GREEDY)
    stepper, release = _step_held_inside_its_pass(eng)
    closer = threading.Thread(target=eng.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # blocked until the pass ends
    release.set()
    stepper.join(10)
    closer.join(10)
    assert not closer.is_alive() and eng._closed

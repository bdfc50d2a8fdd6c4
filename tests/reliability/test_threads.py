"""One thread at a time: a call made while another thread is inside a cache raises `ConcurrentUse` and
changes nothing; calls from different threads one after the other are fine; a thread may nest calls
(``save`` calls ``state_dict``). Threads that hammer one cache get refusals, never a corrupt cache."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hostile_helpers (no conftest here)

from hostile_helpers import SPEC, causal_cache, encdec_cache, encoder_cache, rows, snapshot  # noqa: E402

from kvarray.causal import CausalCache  # noqa: E402
from kvarray.encdec import EncoderDecoderCache  # noqa: E402
from kvarray.encoder import EncoderCache  # noqa: E402
from kvarray.errors import ConcurrentUse, NoForwardPass, UnknownSequence  # noqa: E402


def hold_inside_put(cache: CausalCache) -> tuple[threading.Thread, threading.Event, threading.Event, list]:
    """Start a thread whose put of layer 0 stops inside the kernel until released: (thread, release,
    inside, errors)."""
    inside, release, errors = threading.Event(), threading.Event(), []
    real = cache._writers[0]

    def write(keys: Any, values: Any, cells: Any) -> None:
        inside.set()
        release.wait(10)
        real(keys, values, cells)

    cache._writers[0] = write
    keys = rows(4, [6, 3])

    def run() -> None:
        try:
            cache.put(0, keys, -keys)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert inside.wait(10), "the put never reached its kernel"
    return thread, release, inside, errors


CALLS: dict[str, Callable[[CausalCache], Any]] = {
    "put": lambda c: c.put(1, rows(4, [6, 3]), rows(4, [6, 3])),
    "get": lambda c: c.get(0),
    "start_forward": lambda c: c.start_forward([3], [0]),
    "remove": lambda c: c.remove(2),
    "copy_prefix": lambda c: c.copy_prefix(0, 3, 2),
    "shift": lambda c: c.shift(2, 1, None),
    "defrag": lambda c: c.defrag(),
    "abort_forward": lambda c: c.abort_forward(),
    "stats": lambda c: c.stats(),
    "state_dict": lambda c: c.state_dict(),
    "load_state_dict": lambda c: c.load_state_dict(causal_cache().state_dict()),
    "close": lambda c: c.close(),
}


def test_a_second_thread_is_refused_and_changes_nothing_12_calls() -> None:
    assert len(CALLS) == 12
    cache, twin = causal_cache(), causal_cache()
    keys = rows(4, [6, 3])
    twin.put(0, keys, -keys)  # what the holding thread's put does
    thread, release, _, errors = hold_inside_put(cache)
    refused = {}
    try:
        for name, call in CALLS.items():
            with pytest.raises(ConcurrentUse, match="another thread is inside this cache") as info:
                call(cache)
            refused[name] = info.value
    finally:
        release.set()
        thread.join(10)
    assert not errors and len(refused) == len(CALLS)
    assert "CausalCache.put" in str(refused["put"]) and "CausalCache.close" in str(refused["close"])
    assert snapshot(cache) == snapshot(twin) and cache.plan.is_current()


def test_encoder_and_encdec_caches_refuse_a_second_thread() -> None:
    for cache, call in ((encoder_cache(), lambda c: c.stats()), (encdec_cache(), lambda c: c.stats())):
        inside, release = threading.Event(), threading.Event()

        def hold(c: Any, inside: threading.Event, release: threading.Event) -> None:
            c._guard.acquire()  # what a long call does: hold the cache
            inside.set()
            release.wait(10)
            c._guard.release()

        thread = threading.Thread(target=hold, args=(cache, inside, release))
        thread.start()
        inside.wait(10)
        try:
            with pytest.raises(ConcurrentUse):
                call(cache)
        finally:
            release.set()
            thread.join(10)
        call(cache)  # free again


def test_calls_from_threads_one_after_another_are_fine() -> None:
    cache = causal_cache()
    results: list[Any] = []

    def in_thread(step: Callable[[], Any]) -> None:
        thread = threading.Thread(target=lambda: results.append(step()))
        thread.start()
        thread.join(10)

    keys = rows(4, [6, 3])
    in_thread(lambda: cache.start_forward([0, 2], [6, 4]))
    in_thread(lambda: cache.put(0, keys, -keys))
    in_thread(lambda: cache.put(1, keys, -keys))
    in_thread(lambda: cache.get(1).keys.shape)
    in_thread(lambda: cache.remove(2))
    assert results[3] == (32, 2, 32) and results[4] == 5
    assert cache.sequences() == [0, 1]


def test_a_thread_may_nest_calls(tmp_path: Path) -> None:
    cache = causal_cache()
    cache.save(tmp_path / "c.safetensors")  # save -> state_dict, both guarded
    cache.load(tmp_path / "c.safetensors")  # load -> load_state_dict
    encdec = encdec_cache()
    encdec.put(0, rows(1, range(2)), rows(1, range(2)))  # encdec.put -> causal.put


def test_hammering_threads_get_refusals_and_a_consistent_cache() -> None:
    """Four threads, each driving its own sequence through passes while others call; every call either
    works, is refused (`ConcurrentUse`), or finds its pass made stale by another thread's pass; at the end
    the bookkeeping is consistent and the state round-trips."""
    cache = CausalCache(SPEC, capacity=256, max_sequences=8, kv_dtype=("float16", "int8"),
                        defrag_threshold=0.2, xp=np)
    writers = list(cache._writers)

    def slow_writer(real: Any) -> Any:
        def write(keys: Any, values: Any, cells: Any) -> None:
            time.sleep(0.0002)  # a kernel that takes a while, releasing the GIL as real ones do
            real(keys, values, cells)

        return write

    cache._writers = [slow_writer(w) for w in writers]
    counts = {"ok": 0, "refused": 0, "stale": 0}
    lock = threading.Lock()

    def worker(seq: int) -> None:
        rng = random.Random(seq)
        position = 0
        for _ in range(60):
            outcome = "ok"
            try:
                action = rng.random()
                if action < 0.6:
                    cache.start_forward([seq] * 2, [position, position + 1])
                    position += 2
                    for layer in range(SPEC.num_layers):
                        keys = rows(seq, [position - 2, position - 1], layer)
                        cache.put(layer, keys, -keys)
                elif action < 0.8:
                    cache.stats()
                else:
                    if cache.length(seq):
                        cache.remove(seq)
                    position = 0
            except ConcurrentUse:
                outcome = "refused"
            except NoForwardPass:  # StalePlan: another thread's pass or removal came in between
                outcome = "stale"
            except UnknownSequence:
                outcome = "stale"
            if outcome != "ok" and cache_length(seq) is not None:
                position = cache_length(seq) or 0
            with lock:
                counts[outcome] += 1

    def cache_length(seq: int) -> int | None:
        """The sequence's next position, read when no other thread is inside (else None)."""
        for _ in range(1000):
            try:
                cells = cache.length(seq)
                return int(cache.cell_table(seq)[1].max()) + 1 if cells else 0
            except ConcurrentUse:
                time.sleep(0.0001)
            except UnknownSequence:
                return 0
        return None

    threads = [threading.Thread(target=worker, args=(seq,)) for seq in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert counts["refused"] > 0, counts
    assert counts["ok"] > 0, counts
    cache._cells.check()
    cache._writers = writers
    restored = CausalCache(SPEC, capacity=256, max_sequences=8, kv_dtype=("float16", "int8"), xp=np)
    restored.load_state_dict(cache.state_dict())  # the full consistency check of a state
    for seq in cache.sequences():
        positions = cache.cell_table(seq)[1]
        assert np.array_equal(positions, np.arange(len(positions))), f"sequence {seq} has holes"


@pytest.mark.parametrize("cls", [CausalCache, EncoderCache, EncoderDecoderCache], ids=lambda c: c.__name__)
def test_every_public_method_is_guarded(cls: type) -> None:
    """Each public method of the caches goes through `kvarray.guard` (properties read fields only)."""
    public = {n: value for n, value in vars(cls).items() if callable(value) and not n.startswith("_")}
    unguarded = [name for name, value in public.items()
                 if not value.__code__.co_filename.startswith("<kvarray.guard wrapper")]
    assert len(public) >= 15 and not unguarded

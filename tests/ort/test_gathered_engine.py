"""The engine on the gathered view (native gathered-view graphs), the decode view (GroupQueryAttention
over the gathered view, passes of one token per sequence) and the per-pass choice ("auto"), against
transformers' greedy outputs (models/tiny-llama-random/reference.npz), exactly like the pool-view tests of
test_engine.py; the before-put bias of the gathered graph, drawn as grids.

The gathered- and decode-view graphs of the random tiny Llama are exported here (kvarray's exporter, a
second each) into a model folder beside links to the committed checkpoint and pool-view graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from ort_models import NEW_TOKENS, TINY, eight_arrivals, run_arrivals

from kvarray import CausalCache, KVSpec
from kvarray.errors import ConfigError, GraphMismatch, ShapeMismatch, UnsupportedModel
from kvarray.export import export
from kvarray.export.reference import LLAMA_VARIANTS
from kvarray.ort import Engine, EngineConfig, KVDtype, SamplingParams
from kvarray.ort.engine import ViewChoice
from kvarray.ort.native import GraphView, ViewSwitch, gathered_bias_before_put, pick_view, pool_window
from kvarray.ort.scheduler import Batch, FinishReason

GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)
X = -np.inf


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder: the tiny Llama's checkpoint and pool graphs (links) plus its gathered graphs and
    its decode graph."""
    root = tmp_path_factory.mktemp("tiny-llama-gathered")
    (root / "checkpoint").symlink_to(TINY / "checkpoint")
    (root / "native").mkdir()
    for graph in (TINY / "native").glob("decoder_step.pool.*.onnx"):
        (root / "native" / graph.name).symlink_to(graph)
    for kv in ("float32", "float16"):
        export("llama", TINY / "checkpoint", root / "native", kv_dtype=kv, view="gathered")
    export("llama", TINY / "checkpoint", root / "native", view="decode")
    return root


@pytest.fixture(scope="module")
def gathered_only(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same folder without the decode graph: "auto" takes the gathered graph as the twin."""
    root = tmp_path_factory.mktemp("tiny-llama-gathered-only")
    (root / "checkpoint").symlink_to(TINY / "checkpoint")
    (root / "native").mkdir()
    for graph in (folder / "native").glob("decoder_step.*.onnx"):
        if ".decode." not in graph.name:
            (root / "native" / graph.name).symlink_to(graph)
    return root


def engine(folder: Path, **options) -> Engine:
    config = {
        "capacity": 512,
        "max_sequences": 8,
        "prefill_chunk": 4,
        "threads": 1,
        "view": "gathered",
        **options,
    }
    return Engine.from_model_dir(folder, EngineConfig(**config))


def passes_hook(eng: Engine, at: int, action) -> list[int]:
    """Call ``action()`` inside the decode graph's `at`-th run (counting from 1), as another thread would
    while a pass runs; the runs counted so far."""
    decode = eng.runner.runners[GraphView.DECODE]
    run, runs = decode.binder.run, []

    def hooked(*args):
        runs.append(len(runs))
        if len(runs) == at:
            action()
        return run(*args)

    decode.binder.run = hooked
    return runs


# -- greedy outputs against transformers ------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [256, 4])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_gathered_one_request_alone_equals_transformers(folder, prompts, expected, k, chunk):
    eng = engine(folder, prefill_chunk=chunk)
    assert eng.info.view == "gathered" and eng.runner.view is GraphView.GATHERED
    assert eng.generate([prompts[k]], GREEDY) == [expected[k]]
    assert eng.stats().cells_used == 0


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_gathered_eight_requests_arriving_at_different_steps_equal_transformers(
    folder, prompts, expected, prefix_sharing
):
    """Prefill chunks of 4 and decode tokens of up to 8 requests share each pass, all on the gathered view."""
    eng = engine(folder, prefix_sharing=prefix_sharing)
    outputs = run_arrivals(eng, eight_arrivals(prompts))
    assert [outputs[k] for k in range(8)] == [expected[k % 3] for k in range(8)]
    assert eng.metrics.steps < 8 * NEW_TOKENS
    assert (eng.metrics.shared_tokens > 0) == prefix_sharing
    assert eng.stats().cells_used == 0


@pytest.mark.parametrize("k", [0, 1, 2])
def test_decode_view_alone_equals_transformers(folder, prompts, expected, k):
    """ "auto" on a folder with a decode graph: its default crossover is 1 sequence, so the prompt runs on
    the pool graph and every decode pass on the decode graph."""
    eng = engine(folder, view="auto", prefill_chunk=256)
    assert isinstance(eng.runner, ViewSwitch) and eng.runner.twin is GraphView.DECODE
    assert eng.runner.min_sequences == 1
    assert eng.generate([prompts[k]], GREEDY) == [expected[k]]
    assert eng.runner.passes == {GraphView.POOL: 1, GraphView.DECODE: NEW_TOKENS - 1}


@pytest.mark.parametrize("twin", [GraphView.DECODE, GraphView.GATHERED])
@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_auto_eight_requests_arriving_at_different_steps_equal_transformers(
    folder, gathered_only, prompts, expected, twin, prefix_sharing
):
    """ "auto" with a crossover of 3 sequences: passes of one token per sequence and 3 or more sequences
    run on the twin (the decode graph when the folder has one, else the gathered graph), the others
    (prefill chunks, small decode passes) on the pool graph; every output is the reference."""
    where = folder if twin is GraphView.DECODE else gathered_only
    eng = engine(where, view="auto", gathered_min_sequences=3, prefix_sharing=prefix_sharing)
    assert isinstance(eng.runner, ViewSwitch) and eng.runner.twin is twin and eng.twin_session is not None
    outputs = run_arrivals(eng, eight_arrivals(prompts))
    assert [outputs[k] for k in range(8)] == [expected[k % 3] for k in range(8)]
    passes = eng.runner.passes
    assert passes[GraphView.POOL] > 0 and passes[twin] > 0
    assert passes[GraphView.POOL] + passes[twin] == eng.metrics.steps


def test_the_mirror_moves_the_rows_of_sequences_that_change_slots(folder, prompts):
    """Three requests decode together; the first finishes early, so the other two move down a slot: their
    rows move within the mirror (nothing more is copied from the pool), and every output equals the
    request run alone."""
    each = [SamplingParams(max_new_tokens=n) for n in (3, 9, 9)]
    alone = engine(folder, view="auto", prefill_chunk=256)
    expected = [alone.generate([p], params)[0] for p, params in zip(prompts, each, strict=True)]
    eng = engine(folder, view="auto", prefill_chunk=256)
    decode = eng.runner.runners[GraphView.DECODE]
    ids = [eng.add_request(p, params) for p, params in zip(prompts, each, strict=True)]
    for _ in range(3):  # the prompts, then the first decode passes: every prompt's rows copied once
        eng.step()
    copied = decode.mirror.copied_rows
    assert copied == sum(len(p) for p in prompts) and decode.mirror.moved_rows == 0
    while eng.has_work:
        eng.step()
    assert decode.mirror.copied_rows == copied  # the two survivors were moved, not copied again
    assert decode.mirror.moved_rows > 0
    assert [eng.pop(i).output for i in ids] == expected


def test_a_failed_decode_pass_is_retried_in_halves_over_the_mirror(folder, prompts):
    """The fourth decode pass fails after the mirror was staged; the engine retries its requests in halves,
    so sequences leave the mirror alive and come back: their held-back rows go to the pool when they
    leave and come back from it. Every output equals the request run alone."""
    params = SamplingParams(max_new_tokens=8)
    alone = engine(folder, view="auto", prefill_chunk=256)
    expected = [alone.generate([p], params)[0] for p in prompts]
    eng = engine(folder, view="auto", prefill_chunk=256)
    decode = eng.runner.runners[GraphView.DECODE]

    def fail() -> None:
        raise RuntimeError("injected: the decode pass fails after staging")

    passes_hook(eng, 4, fail)
    assert len(prompts) == 3 and eng.generate(prompts, params) == expected
    assert eng.passes_failed == 1 and decode.mirror.written_rows > 0


def test_rows_held_back_by_the_decode_view_reach_a_newcomer_that_shares_them(folder, prompts):
    """Request a decodes 6 tokens on the decode graph, whose rows stay in the mirror; then b arrives with a's
    prompt and first 4 generated tokens as its own prompt: it shares those cells (`copy_prefix`, the last 4
    held back), and the pass of its last prompt token (one token: the decode graph, in a new slot of the
    mirror) writes them back before copying b's past from the pool. Both outputs equal each request run
    alone; a finished request's held-back rows are dropped, not written."""
    params = SamplingParams(max_new_tokens=10)
    alone = engine(folder, view="auto", prefill_chunk=256)
    (a_alone,) = alone.generate([prompts[0]], params)
    b_prompt = list(prompts[0]) + a_alone[:4]
    (b_alone,) = alone.generate([b_prompt], params)
    eng = engine(folder, view="auto", prefill_chunk=256)
    decode = eng.runner.runners[GraphView.DECODE]
    a = eng.add_request(prompts[0], params)
    for _ in range(7):  # the prompt, then 6 decode passes
        eng.step()
    assert decode.mirror.written_rows == 0
    b = eng.add_request(b_prompt, params)
    eng.step()  # b shares a's cells; the mirror's slots change: a's rows are written back first
    assert eng.metrics.shared_tokens == len(b_prompt) - 1 and decode.mirror.written_rows == 6
    while eng.has_work:
        eng.step()
    assert eng.pop(a).output == a_alone and eng.pop(b).output == b_alone
    assert eng.stats().cells_used == 0
    eng.flush()  # both finished: whatever the mirror still held is dropped with their cells
    assert eng.stats().cells_used == 0


@pytest.mark.parametrize("kv", [KVDtype.INT8, KVDtype.FLOAT16])
def test_gathered_graph_reads_int8_and_float16_caches(folder, prompts, expected, kv):
    """int8 pools are dequantized by the gather into the float32 graph; a float16 cache goes with the
    float16 gathered graph. Both keep the reference tokens, as their pool-view graphs do (test_modes.py,
    test_optimum.py)."""
    eng = engine(folder, kv_dtype=kv)
    graph = "float16" if kv is KVDtype.FLOAT16 else "float32"
    assert eng.info.kv_dtype == graph and eng.cache.kv_dtype == (kv.value, kv.value)
    assert eng.generate(prompts, GREEDY) == expected


def test_decode_twin_reads_an_int8_cache(folder, prompts, expected):
    """ "auto" with an int8 cache: the int8 pool-view graph and the float32 decode graph (the gather
    dequantizes); the reference tokens are kept."""
    eng = engine(folder, view="auto", kv_dtype=KVDtype.INT8)
    assert eng.info.kv_dtype == "int8" and eng.runner.twin is GraphView.DECODE
    assert eng.generate(prompts, GREEDY) == expected
    assert eng.runner.passes[GraphView.DECODE] > 0


@pytest.mark.parametrize("window, sinks", [(16, 4), (24, 0)])
def test_gathered_view_with_a_window_equals_the_pool_view(folder, prompts, window, sinks):
    """Ring overwrites: the before-put bias masks the cells a pass overwrites; 40 tokens run past the
    window, and the gathered view gives the pool view's tokens exactly."""
    params = SamplingParams(max_new_tokens=40)
    outputs = {}
    for view in ("pool", "gathered"):
        eng = engine(folder, view=view, window=window, sinks=sinks, capacity=256)
        outputs[view] = eng.generate(prompts, params)
    assert outputs["gathered"] == outputs["pool"]


# -- binding ----------------------------------------------------------------------------------------------
def test_gathered_past_is_the_caches_staging_buffer(folder, prompts):
    """The bound past of a gathered pass is the cache's gathered view itself (no copy of the copy)."""
    eng = engine(folder, prefill_chunk=256)
    eng.add_request(prompts[1], GREEDY)
    eng.step()
    eng.step()  # a decode pass
    staged = eng.cache.get(0, "gathered").keys
    bound = eng.binder.bound("past_key.0")
    assert bound.pointer == staged.ctypes.data and bound.shape == staged.shape == (
        1,
        2,
        len(prompts[1]) + 1,
        16,
    )


def test_decode_view_keeps_its_past_across_passes(folder, prompts):
    """Over a float32 cache the decode graph's past is the runner's `DecodeMirror`, bound as both
    past_key.{i} and present_key.{i} (GroupQueryAttention writes each new row in place): the first decode
    pass copies the prompt's rows from the pool, the next ones copy nothing and write nothing back, and
    after `flush` the mirror's rows equal the cache's gathered view."""
    eng = engine(folder, view="auto", prefill_chunk=256)
    decode = eng.runner.runners[GraphView.DECODE]
    eng.add_request(prompts[1], GREEDY)
    eng.step()  # the prompt, on the pool graph
    eng.step()  # the first decode pass: the prompt's 12 rows copied
    assert decode.mirror.copied_rows == len(prompts[1])
    for _ in range(5):
        eng.step()
    assert decode.mirror.copied_rows == len(prompts[1])  # nothing more: each row was written in place
    binder = eng.runner.binder
    past, present = binder.bound("past_key.0"), binder.bound("present_key.0")
    assert past.pointer == present.pointer == decode.mirror.keys[0].ctypes.data
    assert past.shape == (1, 2, 256, 16)  # Lcap rows: bound once, not once per step
    length = len(prompts[1]) + 6  # the prompt and 6 decoded tokens are in the cache
    assert decode.mirror.written_rows == 0  # the 6 decode passes' rows are in the mirror only
    eng.flush()
    assert decode.mirror.written_rows == 6
    eng.flush()
    assert decode.mirror.written_rows == 6  # nothing left to write
    plan = eng.cache.start_forward([0], [length])  # a plan to read the cache's own gathered view
    for layer in range(2):
        gathered = eng.cache.get(layer, "gathered")
        np.testing.assert_array_equal(decode.mirror.keys[layer][0, :, :length], gathered.keys[0, :, :length])
        np.testing.assert_array_equal(
            decode.mirror.values[layer][0, :, :length], gathered.values[0, :, :length]
        )
    assert plan.num_tokens == 1


def test_decode_view_reads_the_caches_gathered_view_with_int8(folder, prompts, expected):
    """An int8 pool holds quantized rows: a mirror would drift from the pool, so the decode graph reads the
    cache's gathered view (rebuilt every pass, int8 dequantized) instead."""
    eng = engine(folder, view="auto", prefill_chunk=256, kv_dtype=KVDtype.INT8)
    assert eng.generate([prompts[1]], GREEDY) == [expected[1]]
    decode = eng.runner.runners[GraphView.DECODE]
    assert eng.runner.passes[GraphView.DECODE] == NEW_TOKENS - 1 and decode.mirror.copied_rows == 0


def test_a_window_keeps_auto_on_the_pool_view(folder, prompts):
    """With a window positions go on past ``max_position_embeddings``, the rows of the decode graph's rope
    tables: "auto" runs every pass on the pool graph then."""
    eng = engine(folder, view="auto", prefill_chunk=256, window=16, sinks=4)
    eng.generate([prompts[1]], GREEDY)
    assert eng.runner.passes == {GraphView.POOL: NEW_TOKENS, GraphView.DECODE: 0}


def test_decode_graph_refuses_a_pass_with_prompt_chunks(folder, prompts):
    eng = engine(folder, view="auto")
    decode = eng.runner.runners[GraphView.DECODE]
    plan = eng.cache.start_forward([0, 0], [0, 1])
    batch = Batch(np.array(prompts[0][:2]), np.array([0, 0]), np.array([0, 1]), np.array([1]), [], [], 2, 0)
    with pytest.raises(ShapeMismatch, match="one token per sequence"):
        decode.forward(eng.cache, plan, batch)


# -- decode bursts ---------------------------------------------------------------------------------------
def held_cells_match(eng: Engine) -> bool:
    """Every running request holds exactly the cells of the tokens it fed: no burst leaves cells behind."""
    return all(eng.cache.length(r.id) == r.computed for r in eng.scheduler.running)


@pytest.mark.parametrize("burst", [2, 5, 64])
def test_decode_bursts_equal_transformers_for_eight_arrivals(folder, prompts, expected, burst):
    """Up to `burst` decode passes a step over the decode graph ("auto", crossover 1): the eight requests
    arriving at different steps give the reference tokens, the steps make more passes than there are
    steps, and after every step each running request holds just the cells of the tokens it fed."""
    eng = engine(folder, view="auto", decode_burst=burst)
    checks: list[bool] = []
    after_step = lambda: checks.append(held_cells_match(eng))  # noqa: E731
    outputs = run_arrivals(eng, eight_arrivals(prompts), after_step=after_step)
    assert [outputs[k] for k in range(8)] == [expected[k % 3] for k in range(8)]
    assert all(checks) and eng.metrics.steps > len(checks) and eng.stats().cells_used == 0
    assert eng.runner.passes[GraphView.POOL] + eng.runner.passes[GraphView.DECODE] == eng.metrics.steps


def test_decode_bursts_sample_and_stop_as_single_passes(folder, prompts):
    """Seeded top-p sampling, different lengths and a stop token met halfway: engines with bursts of 1 and
    of 8 passes give the same tokens and finish reasons, and the burst engine took fewer steps."""
    (greedy,) = engine(folder, view="auto").generate([prompts[1]], SamplingParams(max_new_tokens=12))
    params = [
        SamplingParams(max_new_tokens=14, temperature=0.9, top_p=0.9, seed=3),
        SamplingParams(max_new_tokens=12, stop_tokens=(greedy[6],)),  # its 7th token stops it
        SamplingParams(max_new_tokens=5, temperature=1.2, top_k=20, seed=4),
    ]
    results = []
    for burst in (1, 8):
        eng = engine(folder, view="auto", decode_burst=burst)
        ids = [eng.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
        steps = 0
        while eng.has_work:
            eng.step()
            steps += 1
            assert held_cells_match(eng)
        done = [eng.pop(i) for i in ids]
        results.append(([r.output for r in done], [r.finish_reason for r in done], steps))
    (single, reasons, single_steps), (burst_out, burst_reasons, burst_steps) = results
    assert burst_out == single and burst_reasons == reasons
    assert single[1] == greedy[:7] and reasons[1] is FinishReason.STOP
    assert burst_steps < single_steps


def test_a_request_cancelled_during_a_burst_gets_no_more_tokens(folder, prompts, expected):
    """Request 0 is cancelled while the second pass of a burst runs (as from another thread): the burst
    stops after that pass, which gives it no token; its cells are freed, the others' tokens are the
    reference."""
    eng = engine(folder, view="auto", decode_burst=16, prefill_chunk=256)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    eng.step()  # the prompts: a first token each
    runs = passes_hook(eng, 3, lambda: eng.cancel(ids[0]))
    eng.step()  # a plain decode pass (run 1), then a burst: request 0 is cancelled during run 3
    assert len(runs) == 3 and len(eng.request(ids[0]).output) == 1 + 2
    assert eng.cache.length(ids[0]) == 0 and held_cells_match(eng)
    while eng.has_work:
        eng.step()
    assert [eng.pop(i).output for i in ids[1:]] == expected[1:]


def test_an_arrival_during_a_burst_ends_it(folder, prompts, expected):
    """A request added while the second pass of a burst runs (as from another thread) ends the burst after
    that pass; the next step admits it; every output is the reference."""
    eng = engine(folder, view="auto", decode_burst=16, prefill_chunk=256)
    ids = [eng.add_request(p, GREEDY) for p in prompts[:2]]
    eng.step()
    added = []
    runs = passes_hook(eng, 2, lambda: added.append(eng.add_request(prompts[2], GREEDY)))
    eng.step()  # a plain decode pass (run 1), a burst pass (run 2) during which request 2 arrives
    assert len(runs) == 2 and eng.scheduler.waiting
    while eng.has_work:
        eng.step()
    assert [eng.pop(i).output for i in ids + added] == expected


def test_a_pass_of_a_burst_that_fails_is_made_again_by_the_next_step(folder, prompts, expected):
    """The fourth decode-graph run (a burst's) raises: the burst ends uncommitted, its unused cells are given
    back, `passes_failed` counts it, and the next step makes that pass plainly: every output is the
    reference."""
    eng = engine(folder, view="auto", decode_burst=8, prefill_chunk=256)
    ids = [eng.add_request(p, GREEDY) for p in prompts]

    def fail() -> None:
        raise RuntimeError("injected: a burst pass fails")

    passes_hook(eng, 4, fail)
    eng.step()
    eng.step()  # a plain pass, then burst passes 2 and 3; the 4th raises
    assert eng.passes_failed == 1 and eng.metrics.steps == 1 + 3 and held_cells_match(eng)
    while eng.has_work:
        eng.step()
    assert [eng.pop(i).output for i in ids] == expected and eng.stats().cells_used == 0


@pytest.mark.parametrize("burst", [0, -1, 2.0, True, "8"])
def test_a_decode_burst_that_is_not_a_positive_int_is_refused(folder, burst):
    with pytest.raises(ConfigError, match="decode_burst must be an int >= 1"):
        engine(folder, view="auto", decode_burst=burst)


# -- the view choice --------------------------------------------------------------------------------------
def batch_of(tokens_per_sequence: list[int]) -> Batch:
    seqs = np.repeat(np.arange(len(tokens_per_sequence)), tokens_per_sequence)
    last = np.cumsum(tokens_per_sequence) - 1
    return Batch(seqs, seqs, np.zeros_like(seqs), last, [], [], 0, 0)


@pytest.mark.parametrize(
    "tokens, twin_used",
    [([1] * 8, True), ([1] * 7, False), ([1] * 8 + [4], False), ([1] * 20, True)],
    ids=["8-decodes", "7-decodes", "8-decodes-and-a-chunk", "20-decodes"],
)
def test_pick_view_takes_the_twin_for_decode_passes_of_many_sequences(tokens, twin_used):
    for twin in (GraphView.GATHERED, GraphView.DECODE):
        assert pick_view(batch_of(tokens), min_sequences=8, twin=twin) is (
            twin if twin_used else GraphView.POOL
        )


# -- the gathered graph's bias, drawn ---------------------------------------------------------------------
def test_gathered_bias_before_put_masks_this_passs_cells_in_the_past_block():
    """Sequence 0 holds 3 tokens and decodes its 4th; sequence 1 prefills 2 tokens (L = 4, T = 3)."""
    cache = CausalCache(KVSpec(1, 1, 4, "float32"), capacity=32, max_sequences=4)
    cache.start_forward([0, 0, 0], [0, 1, 2])
    plan = cache.start_forward([0, 1, 1], [3, 0, 1])
    bias = gathered_bias_before_put(plan)
    #                   past rows of the token's sequence | this pass's tokens
    expected = np.array(
        [
            [0, 0, 0, X, 0, X, X],  # seq 0 at 3: its 3 cached rows (row 3 is its own cell), itself
            [X, X, X, X, X, 0, X],  # seq 1 at 0: no past, itself
            [X, X, X, X, X, 0, 0],  # seq 1 at 1: its first token, itself
        ],
        np.float32,
    )
    np.testing.assert_array_equal(bias, expected)


def test_gathered_bias_before_put_with_a_window_and_a_sink():
    """Window 2, 1 sink: sequence 0 holds positions 0 (sink), 1, 2 and writes 3 over its oldest non-sink
    cell (position 1, rank 1). Before put the past is the sink and position 2 (position 1 leaves the
    table); the new token sees the sink, position 2 and itself."""
    cache = CausalCache(KVSpec(1, 1, 4, "float32"), capacity=32, max_sequences=4, window=2, sinks=1)
    cache.start_forward([0, 0, 0], [0, 1, 2])
    plan = cache.start_forward([0], [3])
    assert plan.gathered_lengths.tolist() == [3]  # sink, position 2, position 3 (the overwritten cell)
    np.testing.assert_array_equal(gathered_bias_before_put(plan), np.array([[0, 0, X, 0]], np.float32))


# -- errors -----------------------------------------------------------------------------------------------
def test_a_view_the_graphs_do_not_have_is_refused(folder):
    gathered = folder / "native" / "decoder_step.gathered.float32.onnx"
    pool = folder / "native" / "decoder_step.pool.float32.onnx"
    with pytest.raises(ConfigError, match="view 'pool' cannot run decoder_step.gathered.float32.onnx"):
        Engine(gathered, EngineConfig(threads=1, view=ViewChoice.POOL))
    with pytest.raises(ConfigError, match="view 'gathered' cannot run decoder_step.pool.float32.onnx"):
        Engine(pool, EngineConfig(threads=1, view=ViewChoice.GATHERED))
    with pytest.raises(ConfigError, match="reads a cache stored as float32 or int8, not float16"):
        Engine(gathered, EngineConfig(threads=1, kv_dtype=KVDtype.FLOAT16))
    with pytest.raises(UnsupportedModel, match="--kv-dtype float32 --view gathered"):
        Engine.from_model_dir(TINY, EngineConfig(threads=1, view="gathered"), graph="native")


def test_a_gathered_twin_of_another_model_is_refused(folder, tmp_path):
    pool = folder / "native" / "decoder_step.pool.float32.onnx"
    (other,) = export("llama", TINY.parent / "tiny-llama" / "checkpoint", tmp_path, view="gathered")
    with pytest.raises(GraphMismatch, match="unexpected inputs past_key.2"):  # 4 layers, not 2
        Engine(pool, EngineConfig(threads=1), twin_graph=other)
    with pytest.raises(GraphMismatch, match="a pool-view graph and a gathered- or decode-view twin"):
        Engine(pool, EngineConfig(threads=1), twin_graph=pool)
    float16 = folder / "native" / "decoder_step.gathered.float16.onnx"  # reads a float16 cache
    with pytest.raises(ConfigError, match="reads a cache stored as float16, not float32"):
        Engine(pool, EngineConfig(threads=1), twin_graph=float16)


# -- the decode graph's fused ops on other Llama configurations, against transformers --------------------
@pytest.mark.reference
@pytest.mark.parametrize("overrides", list(LLAMA_VARIANTS.values()), ids=list(LLAMA_VARIANTS))
def test_decode_graph_of_other_llamas_equals_transformers(tmp_path, overrides):
    """RotaryEmbedding (llama3 scaling in its tables), SkipSimplifiedLayerNormalization, GroupQueryAttention
    (MQA, MHA) and a tied head in the decode graph: "auto" on a folder with the pool and decode graphs of a
    random Llama gives transformers' greedy tokens, 8 requests at once."""
    from kvarray.export.reference import SMALL_LLAMA, greedy_reference, random_llama, torch_unavailable_reason

    reason = torch_unavailable_reason()
    if reason is not None:
        print(reason)
        pytest.skip(reason)
    random_llama(tmp_path / "checkpoint", seed=11, **{**SMALL_LLAMA, **overrides})
    prompts = [[72, 101, 108, 108, 111], [10, 32, 100, 101, 102, 32, 102, 40, 41, 58, 10, 9], [7, 7, 7]]
    reference = greedy_reference(tmp_path / "checkpoint", prompts, NEW_TOKENS)
    for view in ("pool", "decode"):
        export("llama", tmp_path / "checkpoint", tmp_path / "native", view=view)
    eng = engine(tmp_path, view="auto", prefill_chunk=256)
    assert eng.runner.twin is GraphView.DECODE and eng.runner.min_sequences == 1
    requests = [prompts[k % 3] for k in range(8)]
    expected = [reference[f"generated_{k % 3}"].tolist() for k in range(8)]
    assert eng.generate(requests, GREEDY) == expected
    assert eng.runner.passes[GraphView.DECODE] == NEW_TOKENS - 1


def test_decode_graph_with_partial_rotary_equals_the_pool_view(tmp_path, prompts):
    """A rotary half-width that is not a multiple of 8 (head_dim 16, half of it rotating: 4) is beyond
    GroupQueryAttention's own rotation: the decode graph rotates q and k with a RotaryEmbedding node
    first. Its tokens equal the pool view's, whose partial rotary is checked against a NumPy forward in
    tests/export."""
    shutil.copytree(TINY / "checkpoint", tmp_path / "checkpoint")
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps({**config, "partial_rotary_factor": 0.5}))
    for view in ("pool", "decode"):
        export("llama", tmp_path / "checkpoint", tmp_path / "native", view=view)
    ops = [n.op_type for n in onnx.load(tmp_path / "native" / "decoder_step.decode.float32.onnx").graph.node]
    assert ops.count("RotaryEmbedding") == 2
    outputs = {view: engine(tmp_path, view=view).generate(prompts, GREEDY) for view in ("pool", "auto")}
    assert outputs["auto"] == outputs["pool"]


# -- the pool view, cut to the batch's cells ------------------------------------------------------------
def test_pool_view_binds_only_the_cells_of_the_batchs_sequences(prompts, expected):
    """A request of 60 tokens and one of 7 prefill together (cells [0, 60) and [60, 67)); the long one is
    cancelled, and the short one's passes read the pool rows [32, 96) only (its cells, rounded out to
    32; n_kv is 96): a zero-copy slice of the pool and the bias columns that go with it. Its tokens are
    the reference's."""
    config = EngineConfig(capacity=512, max_sequences=8, prefill_chunk=256, threads=1, defrag_threshold=None)
    eng = Engine.from_model_dir(TINY, config, graph="native")
    long = eng.add_request(prompts[1] * 5, GREEDY)
    short = eng.add_request(prompts[0], GREEDY)
    eng.step()
    eng.cancel(long)
    eng.step()
    assert pool_window(eng.cache.plan) == (32, 96) and eng.cache.plan.n_kv == 96
    pool = eng.cache.get(0, "pool").keys
    bound = eng.binder.bound("past_key.0")
    assert bound.shape == (64, 2, 16) and bound.pointer == pool[32:].ctypes.data
    assert eng.binder.bound("attention_bias").shape == (1, 64 + 1)
    for _ in eng.stream():
        pass
    assert eng.pop(short).output == expected[0]


def test_pool_view_pass_of_new_prompts_reads_no_past(prompts, expected):
    """Three new prompts (7, 12 and 60 tokens) prefilled in one pass hold no cells before it: the pass
    binds a past of 32 cells only (``[32, H, D]``, bias ``[T, 32 + T]``: all masked but the causal block
    within each prompt), not the 96 cells of n_kv; the next pass, a decode of all three, reads their cells
    again. The two reference prompts' tokens are the reference's."""
    config = EngineConfig(capacity=512, max_sequences=8, prefill_chunk=256, threads=1, defrag_threshold=None)
    eng = Engine.from_model_dir(TINY, config, graph="native")
    ids = [eng.add_request(p, GREEDY) for p in (prompts[0], prompts[1], prompts[1] * 5)]
    eng.step()
    count = len(prompts[0]) + 6 * len(prompts[1])
    assert pool_window(eng.cache.plan) == (0, 32) and eng.cache.plan.n_kv == 96
    assert eng.binder.bound("past_key.0").shape == (32, 2, 16)
    assert eng.binder.bound("attention_bias").shape == (count, 32 + count)
    eng.step()
    assert pool_window(eng.cache.plan) == (0, eng.cache.plan.n_kv)
    assert eng.binder.bound("past_key.0").shape[0] == eng.cache.plan.n_kv
    for _ in eng.stream():
        pass
    assert [eng.pop(i).output for i in ids[:2]] == expected[:2]


@pytest.mark.parametrize("view", ["auto", "pool"])
def test_view_switch_keeps_prompt_and_decode_passes_apart(folder, prompts, expected, view):
    """With a twin ("auto") no pass mixes decode tokens with prompt chunks (the scheduler's
    split_prefill); on the pool graph alone, passes mix them. The outputs are the reference's either way."""
    eng = engine(folder, view=view)
    assert eng.scheduler.split_prefill is (view == "auto") is isinstance(eng.runner, ViewSwitch)
    kinds = []
    forward = eng.runner.forward

    def recording(cache, plan, batch):
        kinds.append((batch.prefill_tokens > 0, batch.decode_tokens > 0))
        return forward(cache, plan, batch)

    eng.runner.forward = recording
    outputs = run_arrivals(eng, {0: [prompts[0]], 2: [prompts[1]], 4: [prompts[2]]}, GREEDY)
    assert [outputs[k] for k in range(3)] == expected[:3]
    assert ((True, True) in kinds) is (view == "pool")
    assert (True, False) in kinds and (False, True) in kinds


@pytest.mark.parametrize("view", ["auto", "pool"])
def test_the_cache_defragments_only_before_passes_on_the_pool_graph(folder, prompts, view):
    """Requests finishing at different times leave holes in the pool. With the decode twin ("auto"), the
    cache is compacted only before a pass on the pool-view graph (a prompt pass here), never before a
    decode-view pass, which compaction would not make faster; the pool graph alone compacts before any
    pass. Compaction changes no output."""
    long_prompts = [prompts[0] * 6, prompts[1] * 4, prompts[2] * 12]  # 42, 48 and 36 tokens
    short, long = SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=12)

    def run(threshold: float | None) -> tuple[list[list[int]], list[tuple[GraphView, bool]]]:
        eng = engine(folder, view=view, prefill_chunk=256, defrag_threshold=threshold)
        first = eng.add_request(long_prompts[0], short)
        ids = [first, eng.add_request(long_prompts[1], long)]
        passes = []  # (the view of each pass, whether the cache defragmented before it)
        since = 0  # passes since request 0 finished and left its hole
        while eng.has_work:
            before = eng.cache.stats().defrags
            eng.step()
            passes.append((eng.runner.view, eng.cache.stats().defrags > before))
            since += eng.request(first).finished
            if len(ids) == 2 and since == 3:  # two passes over the hole, then a prompt arrives
                ids.append(eng.add_request(long_prompts[2], long))
        return [eng.pop(i).output for i in ids], passes

    outputs, passes = run(0.0)
    assert outputs == run(None)[0]
    assert [moved for _, moved in passes].count(True) >= 1
    assert all(view is GraphView.POOL for view, moved in passes if moved)
    if view == "auto":  # decode-view passes ran over the holes without compacting them
        assert (GraphView.DECODE, False) in passes

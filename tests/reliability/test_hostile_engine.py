"""Hostile requests and model files for the engine: each is refused with a named kvarray error saying what
was expected, nothing is queued, and the engine then serves other requests exactly as a clean run."""

# ruff: noqa: E501 - table rows stay one per line

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers (no conftest here)

from engine_helpers import GRAPH, GREEDY, T5, TINY, config, copy_model, engine, reference  # noqa: E402

from kvarray.errors import (  # noqa: E402
    ConfigError,
    DTypeMismatch,
    EmptyPrompt,
    GraphMismatch,
    InvalidUTF8,  # noqa: E402
    KVArrayError,
    PromptTooLong,
    ShapeMismatch,
    TokenizerError,
    UnknownRequest,
    UnknownToken,
    UnsupportedModel,
)
from kvarray.export import MissingModelFile, ModelFileError  # noqa: E402
from kvarray.ort import Engine, EngineConfig, SamplingParams, Seq2SeqEngine  # noqa: E402

PROMPTS, EXPECTED = reference()


def params(**changes) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 4, **changes})


# (case, call on an engine with a running request `a`, error, what the message says)
REQUESTS = [
    ("empty list", lambda e, a: e.add_request([]), EmptyPrompt, "at least one prompt token"),
    ("empty array", lambda e, a: e.add_request(np.empty(0, np.int64)), EmptyPrompt, "at least one"),
    ("negative id", lambda e, a: e.add_request([1, -1]), UnknownToken, r"\[-1\] are outside .*\[0, 259\)"),
    ("id = vocab size", lambda e, a: e.add_request([259]), UnknownToken, r"\[259\] are outside"),
    ("huge int64 id", lambda e, a: e.add_request([2**62]), UnknownToken, str(2**62)),
    ("id beyond int64", lambda e, a: e.add_request([1, 2**70]), UnknownToken, str(2**70)),
    ("uint64 max", lambda e, a: e.add_request(np.array([2**64 - 1], np.uint64)), UnknownToken, str(2**64 - 1)),
    ("float ids", lambda e, a: e.add_request([1.5, 2.0]), DTypeMismatch, "integers, got dtype float64"),
    ("integral floats", lambda e, a: e.add_request(np.array([1.0, 2.0])), DTypeMismatch, "float64"),
    ("NaN id", lambda e, a: e.add_request([float("nan")]), DTypeMismatch, "integers"),
    ("bool ids", lambda e, a: e.add_request([True, False]), DTypeMismatch, "dtype bool"),
    ("text", lambda e, a: e.add_request("hello"), DTypeMismatch, "tokenizer"),
    ("bytes", lambda e, a: e.add_request(b"\xff\xfe"), DTypeMismatch, "got bytes"),
    ("None inside", lambda e, a: e.add_request([1, None]), DTypeMismatch, "NoneType, int"),
    ("2-D ids", lambda e, a: e.add_request([[1, 2], [3, 4]]), ShapeMismatch, r"got shape \[2, 2\]"),
    ("ragged ids", lambda e, a: e.add_request([[1], [2, 3]]), ShapeMismatch, "one flat sequence"),
    ("scalar id", lambda e, a: e.add_request(5), ShapeMismatch, r"got shape \[\]"),
    ("None prompt", lambda e, a: e.add_request(None), ShapeMismatch, r"got shape \[\]"),
    ("over the context", lambda e, a: e.add_request([1] * 257), PromptTooLong, "model context"),
    ("over the cache", lambda e, a: e.add_request([1] * 129), PromptTooLong, r"cache \(128 tokens\)"),
    ("NaN temperature", lambda e, a: e.add_request([1], params(temperature=float("nan"))), ConfigError, "nan"),
    ("inf temperature", lambda e, a: e.add_request([1], params(temperature=float("inf"))), ConfigError, "inf"),
    ("-inf temperature", lambda e, a: e.add_request([1], params(temperature=-float("inf"))), ConfigError, "finite"),
    ("NaN top_p", lambda e, a: e.add_request([1], params(top_p=float("nan"))), ConfigError, r"\(0, 1\]"),
    ("inf top_p", lambda e, a: e.add_request([1], params(top_p=float("inf"))), ConfigError, r"\(0, 1\]"),
    ("negative max_new_tokens", lambda e, a: e.add_request([1], params(max_new_tokens=-1)), ConfigError, ">= 1"),
    ("zero max_new_tokens", lambda e, a: e.add_request([1], params(max_new_tokens=0)), ConfigError, ">= 1"),
    ("float max_new_tokens", lambda e, a: e.add_request([1], params(max_new_tokens=2.5)), ConfigError, "2.5"),
    ("bool max_new_tokens", lambda e, a: e.add_request([1], params(max_new_tokens=True)), ConfigError, "True"),
    ("negative top_k", lambda e, a: e.add_request([1], params(top_k=-3)), ConfigError, "top_k"),
    ("negative seed", lambda e, a: e.add_request([1], params(seed=-1)), ConfigError, "seed"),
    ("stop token outside", lambda e, a: e.add_request([1], params(stop_tokens=(300,))), UnknownToken, "stop token"),
    ("stop tokens as text", lambda e, a: e.add_request([1], params(stop_tokens="ab")), ConfigError, "stop_tokens"),
    ("params as a dict", lambda e, a: e.add_request([1], {"max_new_tokens": 3}), ConfigError, "SamplingParams"),
    ("on_token not callable", lambda e, a: e.add_request([1], None, 5), ConfigError, "callable"),
    ("cancel an unknown id", lambda e, a: e.cancel(12345), UnknownRequest, "12345"),
    ("cancel a negative id", lambda e, a: e.cancel(-1), UnknownRequest, "-1"),
    ("cancel a text id", lambda e, a: e.cancel("abc"), UnknownRequest, "abc"),
    ("cancel an unhashable id", lambda e, a: e.cancel([a]), UnknownRequest, "is not waiting or running"),
    ("look up None", lambda e, a: e.request(None), UnknownRequest, "None"),
    ("pop a running request", lambda e, a: e.pop(a), UnknownRequest, "has not finished"),
    ("text not UTF-8", lambda e, a: e.generate_text([b"ok", b"ab\xffcd"]), InvalidUTF8, "byte 0xff at offset 2"),
    ("text with a surrogate", lambda e, a: e.generate_text(["x\udcff"]), InvalidUTF8, r"U\+DCFF at character 1"),
    ("text that is a number", lambda e, a: e.generate_text([5]), TokenizerError, "got int"),
]


@pytest.fixture(scope="module")
def eng():
    e = engine()
    yield e
    e.close()


@pytest.mark.parametrize("case", REQUESTS, ids=[c[0] for c in REQUESTS])
def test_engine_hostile_requests_44_cases(eng, case):
    assert len(REQUESTS) == 44
    _, call, error, message = case
    for rid in list(eng.requests):  # what an earlier failed case left behind
        if not eng.request(rid).finished:
            eng.cancel(rid)
        eng.pop(rid)
    a = eng.add_request(PROMPTS[0], GREEDY)
    for _ in range(3):  # `a` holds cells and is decoding
        eng.step()
    before = (len(eng.requests), eng._next_id, len(eng.scheduler.waiting), eng.stats().cells_used)
    with pytest.raises(error, match=message) as caught:
        call(eng, a)
    assert isinstance(caught.value, KVArrayError)
    assert (len(eng.requests), eng._next_id, len(eng.scheduler.waiting), eng.stats().cells_used) == before
    b = eng.add_request(PROMPTS[1], GREEDY)
    for _ in eng.stream():
        pass
    assert [eng.pop(a).output, eng.pop(b).output] == [EXPECTED[0], EXPECTED[1]]
    assert eng.stats().cells_used == 0 and not eng.requests


def test_a_closed_engine_refuses_requests_and_steps():
    from kvarray.errors import CacheClosed

    e = engine()
    e.close()
    e.close()  # idempotent
    with pytest.raises(CacheClosed, match="closed"):
        e.add_request([1, 2])
    with pytest.raises(CacheClosed, match="closed"):
        e.step()


# ---- model files and options -----------------------------------------------------------------------
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def graph_cut_at_half(tmp: Path) -> Engine:
    data = GRAPH.read_bytes()
    return Engine(_write(tmp / "half.onnx", data[: len(data) // 2]))


def graph_first_100_bytes(tmp: Path) -> Engine:
    return Engine(_write(tmp / "head.onnx", GRAPH.read_bytes()[:100]))


def graph_of_random_bytes(tmp: Path) -> Engine:
    return Engine(_write(tmp / "random.onnx", np.random.default_rng(0).bytes(4096)))


def graph_with_flipped_bytes(tmp: Path) -> Engine:
    data = bytearray(GRAPH.read_bytes())
    data[:64] = np.random.default_rng(1).bytes(64)
    return Engine(_write(tmp / "flipped.onnx", bytes(data)))


def graph_that_is_json(tmp: Path) -> Engine:
    return Engine(_write(tmp / "config.onnx", (TINY / "checkpoint" / "config.json").read_bytes()))


def model_dir_with_a_truncated_graph(tmp: Path) -> Engine:
    folder = copy_model(tmp)
    graph = folder / "native" / GRAPH.name
    graph.write_bytes(graph.read_bytes()[:-1000])
    return Engine.from_model_dir(folder, config())


def model_dir_with_a_corrupted_tokenizer(tmp: Path) -> Engine:
    folder = copy_model(tmp)
    path = folder / "checkpoint" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:500])
    return Engine.from_model_dir(folder, config())


def model_dir_with_a_tokenizer_list(tmp: Path) -> Engine:
    folder = copy_model(tmp)
    (folder / "checkpoint" / "tokenizer.json").write_text(json.dumps([1, 2, 3]))
    return Engine.from_model_dir(folder, config())


def model_dir_with_a_binary_tokenizer(tmp: Path) -> Engine:
    folder = copy_model(tmp)
    (folder / "checkpoint" / "tokenizer.json").write_bytes(b"\xff\xfe\x00{")
    return Engine.from_model_dir(folder, config())


MODEL_FILES = [
    ("graph cut at half", graph_cut_at_half, ModelFileError, r"half.onnx \(\d+ bytes\) cannot be loaded"),
    ("graph of 100 bytes", graph_first_100_bytes, ModelFileError, "truncated or corrupted"),
    ("graph of random bytes", graph_of_random_bytes, ModelFileError, "expected an ONNX model protobuf"),
    ("graph with flipped bytes", graph_with_flipped_bytes, ModelFileError, "cannot be loaded"),
    ("graph that is JSON", graph_that_is_json, ModelFileError, "cannot be loaded"),
    ("empty graph", lambda t: Engine(_write(t / "empty.onnx", b"")), ModelFileError, "empty"),
    ("no graph file", lambda t: Engine(t / "nowhere.onnx"), MissingModelFile, "no ONNX graph at"),
    ("a folder as graph", lambda t: Engine(t), MissingModelFile, r"\(a folder\)"),
    ("T5 graph", lambda t: Engine(TINY.parent / "tiny-t5-random" / "native" / "encoder.onnx"),
     (GraphMismatch, UnsupportedModel), "match no known convention|not supported"),
    ("model dir, truncated graph", model_dir_with_a_truncated_graph, ModelFileError, "cannot be loaded"),
    ("model dir, cut tokenizer", model_dir_with_a_corrupted_tokenizer, TokenizerError, "not a JSON tokenizer"),
    ("model dir, tokenizer list", model_dir_with_a_tokenizer_list, TokenizerError, "expected an object"),
    ("model dir, binary tokenizer", model_dir_with_a_binary_tokenizer, TokenizerError, "not a JSON"),
    ("model dir without graphs", lambda t: Engine.from_model_dir(t), UnsupportedModel, "not found"),
    ("negative threads", lambda t: Engine(GRAPH, config(threads=-1)), ConfigError, "threads must be"),
    ("text threads", lambda t: Engine(GRAPH, config(threads="2")), ConfigError, "threads must be"),
    ("zero capacity", lambda t: Engine(GRAPH, config(capacity=0)), ConfigError, "capacity"),
    ("zero sequences", lambda t: Engine(GRAPH, config(max_sequences=0)), ConfigError, "max_sequences"),
    ("zero prefill chunk", lambda t: Engine(GRAPH, config(prefill_chunk=0)), ConfigError, "prefill_chunk"),
    ("negative batch", lambda t: Engine(GRAPH, config(max_batch_tokens=-5)), ConfigError, "max_batch_tokens"),
    ("float prefill chunk", lambda t: Engine(GRAPH, config(prefill_chunk=2.5)), ConfigError, "prefill_chunk"),
    ("zero prompt pass", lambda t: Engine(GRAPH, config(prompt_pass_tokens=0)), ConfigError, "prompt_pass_tokens"),
    ("negative kernel threads", lambda t: Engine(GRAPH, config(kernel_threads=-1)), ConfigError, "kernel_threads"),
    ("zero window", lambda t: Engine(GRAPH, config(window=0)), ConfigError, "window"),
    ("sinks without window", lambda t: Engine(GRAPH, config(sinks=2)), ConfigError, "sinks"),
    ("negative sinks", lambda t: Engine(GRAPH, config(window=8, sinks=-1)), ConfigError, "sinks"),
    ("defrag threshold 2", lambda t: Engine(GRAPH, config(defrag_threshold=2.0)), ConfigError, "defrag"),
]


@pytest.mark.parametrize("case", MODEL_FILES, ids=[c[0] for c in MODEL_FILES])
def test_engine_hostile_model_files_and_options_27_cases(tmp_path, case):
    assert len(MODEL_FILES) == 27
    _, build, error, message = case
    with pytest.raises(error, match=message) as caught:
        build(tmp_path)
    assert isinstance(caught.value, KVArrayError)


# ---- a damaged config.json in a model folder: both engines ----------------------------------------------
WHISPER = T5.parent / "tiny-whisper-random"


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def make_empty(path: Path) -> None:
    path.write_bytes(b"")


def make_binary(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00{")


def make_a_list(path: Path) -> None:
    path.write_text(json.dumps([1, 2, 3]))


def engine_over(damage, relative: str = "checkpoint/config.json"):
    def build(tmp: Path) -> Engine:
        folder = copy_model(tmp)
        damage(folder / relative)
        return Engine.from_model_dir(folder, config())

    return build


def seq2seq_over(model: Path, damage, graph: str = "native"):
    """`Seq2SeqEngine.from_model_dir` over a copy of `model` whose config.json is damaged: the checkpoint's
    (native graphs), or the Optimum export's in a folder that has no checkpoint/ (graph "optimum")."""

    def build(tmp: Path) -> Seq2SeqEngine:
        if graph == "optimum":
            folder = tmp / model.name
            shutil.copytree(model / "optimum", folder / "optimum")
            damage(folder / "optimum" / "config.json")
        else:
            folder = copy_model(tmp, model)
            damage(folder / "checkpoint" / "config.json")
        return Seq2SeqEngine.from_model_dir(folder, graph=graph)

    return build


def context_set_to(key: str, value):
    """A damage that keeps config.json valid JSON but sets the model's context `key` to `value`."""

    def damage(path: Path) -> None:
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))

    return damage


def optimum_over(damage, name: str):
    """`Engine.from_model_dir(graph="optimum")` over a copy of the tiny Llama's Optimum export (no
    checkpoint/) whose `name` (config.json or generation_config.json) is damaged."""

    def build(tmp: Path) -> Engine:
        folder = tmp / TINY.name
        shutil.copytree(TINY / "optimum", folder / "optimum")
        damage(folder / "optimum" / name)
        return Engine.from_model_dir(folder, config(), graph="optimum")

    return build


# (case, build, what the message says): each a `ModelFileError` naming the file, not a JSONDecodeError
DAMAGED_CONFIGS = [
    ("Llama, config cut at half", engine_over(cut_in_half), r"checkpoint/config.json is not valid JSON \(truncated or corrupted\?\)"),
    ("Llama, empty config", engine_over(make_empty), "config.json is not valid JSON"),
    ("Llama, binary config", engine_over(make_binary), "config.json is not valid JSON"),
    ("Llama, config a list", engine_over(make_a_list), "config.json holds a JSON list, expected an object"),
    ("T5, config cut at half", seq2seq_over(T5, cut_in_half), r"checkpoint/config.json is not valid JSON"),
    ("T5, config a list", seq2seq_over(T5, make_a_list), "holds a JSON list, expected an object"),
    ("Whisper, binary config", seq2seq_over(WHISPER, make_binary), "config.json is not valid JSON"),
    ("T5 Optimum, config cut", seq2seq_over(T5, cut_in_half, "optimum"), r"optimum/config.json is not valid JSON"),
    ("Llama Optimum, config cut", optimum_over(cut_in_half, "config.json"), r"optimum/config.json is not valid JSON"),
    ("Llama Optimum, generation config a list", optimum_over(make_a_list, "generation_config.json"), "generation_config.json holds a JSON list"),
    ("Llama, context a string", engine_over(context_set_to("max_position_embeddings", "256")), r"max_position_embeddings must be a positive integer, got '256'"),
    ("Llama, context 0", engine_over(context_set_to("max_position_embeddings", 0)), "max_position_embeddings must be a positive integer, got 0"),
    ("Whisper, context a float", seq2seq_over(WHISPER, context_set_to("max_target_positions", 448.0)), "max_target_positions must be a positive integer, got 448.0"),
]


@pytest.mark.parametrize("case", DAMAGED_CONFIGS, ids=[c[0] for c in DAMAGED_CONFIGS])
def test_both_engines_name_a_damaged_config_json_13_cases(tmp_path, case):
    assert len(DAMAGED_CONFIGS) == 13
    _, build, message = case
    with pytest.raises(ModelFileError, match=message) as caught:
        build(tmp_path)
    assert not isinstance(caught.value, MissingModelFile)
    assert not isinstance(caught.value, json.JSONDecodeError)


def test_a_damaged_tokenizer_keeps_the_readers_error_as_its_cause(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json is not a JSON tokenizer file: .* not valid JSON") as caught:
        model_dir_with_a_corrupted_tokenizer(tmp_path)
    assert isinstance(caught.value.__cause__, ModelFileError)


def test_a_missing_graph_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Engine(tmp_path / "nowhere.onnx")


def test_a_corrupted_graph_keeps_onnx_runtimes_error_as_the_cause(tmp_path):
    with pytest.raises(ModelFileError) as caught:
        graph_cut_at_half(tmp_path)
    assert type(caught.value.__cause__).__module__.startswith("onnxruntime")
    assert "INVALID_PROTOBUF" in str(caught.value)


def test_default_engine_config_is_valid():
    assert EngineConfig().capacity == 4096  # the checks above refuse only what is out of range

"""onnxruntime-genai peer of benchmarks/test_engine_bench.py, run in its own environment
(benchmarks/peers/setup_genai.sh) as a subprocess that answers JSON lines:

    .venv-genai/bin/python benchmarks/peers/run_genai.py MODEL_DIR --threads 2

MODEL_DIR is the bench Llama folder; its ``genai/`` subfolder is built on first use with the genai model
builder (``python -m onnxruntime_genai.models.builder -i MODEL_DIR/checkpoint -o MODEL_DIR/genai -p fp32
-e cpu``), and its genai_config.json gets ``intra_op_num_threads`` (its session options take no
config entries, so its threads spin as ONNX Runtime's do by default). Requests, one JSON object a line on
stdin; one JSON answer a line on stdout:

- ``{"op": "info"}``: versions, threads, the config's eos / pad ids.
- ``{"op": "generate", "prompts": [[...], ...], "new": N}``: one batch (prompts of one length),
  ``max_length = prompt + N``, greedy; answers ``seconds`` (whole call), ``ttft_s`` and ``outputs``.
- ``{"op": "serving", "spec": {...}, "mode": "static" | "engine"}``: the serving workload of
  benchmarks/peers/workload.py, as static batches of 16 (Generator, left padding with the pad id) or
  through ``og.Engine`` (genai's own request scheduler); answers `workload.summarize`'s figures.

Errors are answered as ``{"error": "..."}`` and the runner goes on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
from workload import Arrival, ServingSpec, left_pad, run_static, serving_workload, summarize

GENAI = "genai"


def build(model_dir: Path) -> Path:
    out = model_dir / GENAI
    if not (out / "genai_config.json").is_file():
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(model_dir / "checkpoint"), "-o", str(out), "-p", "fp32", "-e", "cpu",
            "-c", str(out / "cache"), "--extra_options", "hf_token=false",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=sys.stderr, stderr=sys.stderr)
    return out


def set_threads(folder: Path, threads: int) -> dict[str, Any]:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"]["session_options"]
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    options.pop("config_entries", None)
    path.write_text(json.dumps(config, indent=4))
    return config


class Peer:
    def __init__(self, folder: Path, threads: int, config: dict[str, Any]) -> None:
        self.model = og.Model(str(folder))
        self.threads = threads
        self.config = config
        self.pad = int(config["model"]["pad_token_id"])

    def info(self) -> dict[str, Any]:
        return dict(
            version=og.__version__,
            threads=self.threads,
            eos_token_id=self.config["model"]["eos_token_id"],
            pad_token_id=self.pad,
        )

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float, float]:
        """Greedy, one batch; (new tokens per prompt, seconds to the first token, seconds in all)."""
        ids, _ = left_pad(prompts, self.pad)
        width = ids.shape[1]
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=width + new, batch_size=len(prompts), top_k=1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))
        ttft = 0.0
        while not generator.is_done():
            generator.generate_next_token()
            if not ttft:
                ttft = time.perf_counter() - start
        seconds = time.perf_counter() - start
        outputs = [generator.get_sequence(i)[width:].tolist() for i in range(len(prompts))]
        del generator
        return outputs, ttft, seconds

    def serve_engine(self, arrivals: list[Arrival]) -> dict[str, Any]:
        engine = og.Engine(self.model)
        buffer = engine.create_event_buffer(256)
        flags = og.EngineEventFlags
        start = time.perf_counter()
        requests: dict[int, int] = {}  # id(request) -> workload index
        handles: list[Any] = []
        outputs: list[list[int]] = [[] for _ in arrivals]
        first = [0.0] * len(arrivals)
        finish = [0.0] * len(arrivals)
        done = nxt = 0
        while done < len(arrivals):
            now = time.perf_counter() - start
            while nxt < len(arrivals) and arrivals[nxt].at <= now:
                request = engine.create_request()
                options = og.TurnOptions(request)
                options.set_max_generated_tokens(arrivals[nxt].max_new_tokens)
                options.set_do_sample(False)
                request.begin_turn(np.asarray(arrivals[nxt].prompt, np.int32), options)
                requests[id(request)] = nxt
                handles.append(request)
                nxt += 1
            if not engine.has_pending_requests():
                time.sleep(max(0.0, arrivals[nxt].at - (time.perf_counter() - start)))
                continue
            for event in engine.run(buffer):
                if event.flags & flags.FAILED:
                    raise RuntimeError(f"genai engine failed: {event.error_code}")
                k = (
                    requests[id(event.request)]
                    if id(event.request) in requests
                    else self._find(event.request, handles)
                )
                t = time.perf_counter() - start
                if event.flags & flags.TOKEN:
                    if not outputs[k]:
                        first[k] = t - arrivals[k].at
                    outputs[k].append(int(event.token))
                if event.flags & flags.TURN_FINISHED:
                    finish[k] = t - arrivals[k].at
                    done += 1
        total = time.perf_counter() - start
        for request in handles:
            request.close()
        return summarize(arrivals, total, first, finish, outputs, mode="engine")

    @staticmethod
    def _find(request: Any, handles: list[Any]) -> int:
        for k, h in enumerate(handles):
            if h == request:
                return k
        raise RuntimeError("an engine event names an unknown request")

    def serve(self, spec: ServingSpec, mode: str) -> dict[str, Any]:
        arrivals = serving_workload(spec)
        if mode == "engine":
            return self.serve_engine(arrivals)

        def batch(prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
            outputs, ttft, _ = self.generate(prompts, new)
            return outputs, ttft

        return dict(run_static(arrivals, batch), mode="static")


def answer(peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "info":
        return peer.info()
    if op == "generate":
        outputs, ttft, seconds = peer.generate(request["prompts"], int(request["new"]))
        return dict(outputs=outputs, ttft_s=ttft, seconds=seconds)
    if op == "serving":
        spec = request["spec"]
        spec = ServingSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        return peer.serve(spec, request.get("mode", "static"))
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folder = build(args.model_dir)
    peer = Peer(folder, args.threads, set_threads(folder, args.threads))
    print(json.dumps({"ready": True, **peer.info()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = answer(peer, json.loads(line))
        except Exception as error:  # reported to the caller, which records the peer as failed
            reply = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()

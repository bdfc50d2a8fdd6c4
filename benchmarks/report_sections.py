"""What each section of the benchmark report says: its text, tables and figures, built from the results
(`benchmarks.report_writer.Results`). `SECTIONS` is their order on the page; `benchmarks.report`
writes the page, its plots and the headline table from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.report_writer import (
    Figure,
    Results,
    Section,
    cell,
    provenance,
    ratio,
    table,
)

#: Display names of the engine suite's systems (keys of its extra_info: ``{system}_tok_s``).
SYSTEMS = {
    "kvarray": "kvarray",
    "kvarray-pool": "kvarray, pool view",
    "kvarray-gathered": "kvarray, gathered view",
    "kvarray-int8": "kvarray, int8 pool view",
    "genai": "onnxruntime-genai",
    "optimum": "Optimum ORT",
    "transformers": "transformers",
}


def kernels_section(results: Results) -> Section:
    s = Section("kernels", "Kernels against numpy.copyto (CPU)")
    rows, names, ratios = [], [], []
    benches = results.suites.get("kernels", [])
    if not benches:
        return s
    for b in benches:
        e = b["extra_info"]
        kernel = b["name"].removeprefix("test_")
        r = e.get("ratio_median", e.get("ratio"))
        rows.append(
            [
                kernel,
                e["bytes"] / 2**20,
                e.get("gbps_median", e.get("gbps")),
                e.get("copyto_gbps_median", e.get("copyto_gbps")),
                r,
            ]
        )
        names.append(kernel)
        ratios.append(r)
    s.add(
        "Each kernel moves rows of 2 KiB in a pool; bandwidth counts bytes read plus bytes written, for "
        "the kernel and for `numpy.copyto` of the same number of bytes, timed in the same test.\n"
    )
    s.add(table(["kernel", "MiB moved", "GB/s", "copyto GB/s", "kernel / copyto"], rows))
    n = benches[0]["stats"]["rounds"] if benches else "?"
    s.add(
        provenance(
            results,
            "kernels",
            f"Medians of {n} rounds; copyto: median of {2 * n if benches else '?'} "
            "calls, half before and half after the kernel's rounds.",
        )
    )

    def draw(ax: Any) -> None:
        ax.barh(names[::-1], ratios[::-1], color="tab:blue")
        ax.axvline(1.0, color="black", lw=0.8)

    s.figures.append(
        Figure(
            "kernels.png",
            "CPU kernels: bandwidth / numpy.copyto",
            draw,
            xlabel="kernel GB/s / copyto GB/s (median rounds)",
        )
    )
    return s


def causal_section(results: Results) -> Section:
    s = Section("causal", "Causal cache: decode step and defragmentation")
    steps = results.tests("causal", "test_decode_step")
    if not results.suites.get("causal"):
        return s
    books = {b["extra_info"]["sequences"]: b for b in results.tests("causal", "test_decode_bookkeeping_only")}
    floors = {b["extra_info"]["sequences"]: b for b in results.tests("causal", "test_decode_copy_floor")}
    by_seq: dict[int, dict[str, float]] = {}
    for b in steps:
        e = b["extra_info"]
        by_seq.setdefault(e["sequences"], {})[e["view"]] = b["stats"]["median"] * 1e6
        by_seq[e["sequences"]]["n_kv"] = e["n_kv"]
    seqs = sorted(by_seq)
    rows = [
        [
            n,
            by_seq[n].get("n_kv"),
            by_seq[n].get("pages"),
            by_seq[n].get("pool"),
            books[n]["stats"]["median"] * 1e6 if n in books else None,
            floors[n]["stats"]["median"] * 1e6 if n in floors else None,
            ratio(by_seq[n].get("pool"), floors[n]["stats"]["median"] * 1e6 if n in floors else None),
        ]
        for n in seqs
    ]
    s.add(
        "One decode token per sequence on a 16-layer float16 cache (8 kv heads of 64) holding 32 tokens "
        "per sequence: `start_forward` + `put` + `get` of every layer, in microseconds per step. "
        "Bookkeeping only: `start_forward` and the plan's page table and bias. Copy floor: the bytes the "
        "step must move (one row per sequence into 32 pools) by NumPy fancy assignment, no cache; the "
        "last column is the pool-view step over that floor, from the same run.\n"
    )
    s.add(
        table(
            [
                "sequences",
                "n_kv",
                "page table view (us)",
                "pool view (us)",
                "bookkeeping only (us)",
                "copy floor (us)",
                "pool view / floor",
            ],
            rows,
        )
    )
    churn = {b["name"].split("[")[1].rstrip("]"): b for b in results.tests("causal", "test_defrag_churn")}
    if churn:
        s.add(
            "\nChurn (sequences with prompts of 8-120 tokens start, decode and leave; 12 running; 300 steps; "
            "16 layers x 2 kv heads x 64, 4096 cells), with and without defragmentation at fragmentation "
            "0.1; then one forced `defrag()` of the state reached, timed:\n"
        )
        churn_rows = []
        for name, b in churn.items():
            e = b["extra_info"]
            churn_rows.append(
                [
                    name,
                    e["mean_n_kv_over_used"],
                    e["defrags_during_churn"],
                    e["cells_moved_during_churn"],
                    e["churn_seconds"],
                    e["forced_defrag_mib"],
                    e.get("forced_defrag_ms_per_mib"),
                ]
            )
        s.add(
            table(
                [
                    "run",
                    "mean n_kv / used",
                    "defrags",
                    "cells moved",
                    "churn (s)",
                    "forced defrag MiB",
                    "forced defrag ms / MiB",
                ],
                churn_rows,
            )
        )
    n = steps[0]["stats"]["rounds"] if steps else "?"
    s.add(provenance(results, "causal", f"Decode steps: medians of {n} rounds; forced defrag: median of 10."))
    if by_seq:
        views = {"pages": "page table view", "pool": "pool view"}

        def draw(ax: Any) -> None:
            for view, label in views.items():
                ax.plot(seqs, [by_seq[n].get(view) for n in seqs], marker="o", label=label)
            ax.plot(
                seqs,
                [books[n]["stats"]["median"] * 1e6 if n in books else None for n in seqs],
                marker="o",
                ls="--",
                label="bookkeeping only",
            )
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs, [str(n) for n in seqs])
            ax.legend()

        s.figures.append(
            Figure(
                "causal_decode_step.png",
                "CausalCache decode step, 16 layers",
                draw,
                xlabel="sequences (one token each)",
                ylabel="us per step (median)",
            )
        )
    return s


def encoder_section(results: Results) -> Section:
    s = Section("encoder", "Encoder cache: cross-view reads")
    if not results.suites.get("encoder"):
        return s
    s.add(
        "16 Whisper-base-sized entries (1500 frames, 12 layers, 8 kv heads x 64) read for one decoder step "
        "over all layers (590 MB). A batch in pool order is a zero-copy view; another order is staged "
        "(copied, int8 dequantized) and compared with `numpy.copyto` of the same bytes.\n"
    )
    zero = results.tests("encoder", "test_contiguous_batch_is_zero_copy")
    if zero:
        e = zero[0]["extra_info"]
        s.add(
            f"Contiguous batch: zero-copy {cell(e['zero_copy'])} (view pointer is the pool's row: "
            f"{cell(e['pointer_is_pool_row'])}), {zero[0]['stats']['median'] * 1e6:.0f} us per step.\n\n"
        )
    rows = []
    for b in results.tests("encoder", "test_staged_batch_bandwidth"):
        e = b["extra_info"]
        rows.append(
            [
                e["modality"],
                e["storage"],
                e["order"],
                e["staging_gbps"],
                e["copyto_gbps"],
                e["ratio_to_copyto"],
            ]
        )
    s.add(
        table(["modality", "storage", "batch order", "staging GB/s", "copyto GB/s", "staging / copyto"], rows)
    )
    s.add(
        provenance(results, "encoder", "Staging and copyto: best of 5 calls each (the suite's own measure).")
    )
    return s


def graphs_section(results: Results) -> Section:
    s = Section("graphs", "Native graphs: one decode step against Optimum's graph")
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for b in results.tests("graphs", "test_decode_step"):
        e = b["extra_info"]
        graph = b["name"].split("[", 1)[1].rstrip("]").split("-", 1)[1]
        by.setdefault(graph, {})[e["sequences"]] = e
    if not by:
        return s
    s.add(
        "The bench Llama's decode step (B sequences with 128 cached tokens each), "
        "`session.run_with_iobinding` alone, ms per step; native graphs interleaved with Optimum's, "
        "ratio = native / Optimum (below 1 is faster). The gathered graph's staging copy (`gather_rows` "
        "of every layer) is listed apart.\n"
    )
    sizes = sorted({n for d in by.values() for n in d})
    rows = []
    for graph, data in sorted(by.items()):
        for n in sizes:
            e = data.get(n)
            if e:
                rows.append(
                    [
                        graph,
                        n,
                        e["ms_per_step"],
                        e.get("optimum_ms_per_step"),
                        e.get("ratio_to_optimum"),
                        e.get("gather_ms"),
                    ]
                )
    s.add(
        table(["graph", "sequences", "ms / step", "Optimum ms / step", "native / Optimum", "gather ms"], rows)
    )
    rounds = sorted({e["rounds"] for d in by.values() for e in d.values()})
    s.add(provenance(results, "graphs", f"Medians of {'/'.join(map(str, rounds)) or '?'} steps per size."))

    def draw(ax: Any) -> None:
        for graph, data in sorted(by.items()):
            ns = sorted(data)
            ax.plot(ns, [data[n]["ms_per_step"] for n in ns], marker="o", label=graph)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.legend()

    s.figures.append(
        Figure(
            "graphs_decode_step.png",
            "bench Llama decode step by graph",
            draw,
            xlabel="sequences",
            ylabel="ms per step (median)",
        )
    )
    return s


def engine_rows(results: Results) -> tuple[list[int], dict[str, dict[int, float]], dict[str, str]]:
    """(sizes, tok/s per system and size, reasons of systems not measured) from test_equal_batch."""
    tps: dict[str, dict[int, float]] = {}
    unavailable: dict[str, str] = {}
    for b in results.tests("engine", "test_equal_batch"):
        e = b["extra_info"]
        for key, value in e.items():
            if key.endswith("_tok_s"):
                tps.setdefault(key.removesuffix("_tok_s"), {})[e["sequences"]] = value
        unavailable.update(e.get("unavailable", {}))
    sizes = sorted({n for d in tps.values() for n in d})
    return sizes, tps, unavailable


def display(system: str) -> str:
    return SYSTEMS.get(system, system)


def engine_section(results: Results) -> Section:
    s = Section("engine", "Engine: tokens/s against sequences")
    sizes, tps, unavailable = engine_rows(results)
    if not tps:
        return s
    others = [k for k in tps if k != "kvarray"]
    s.add(
        "B prompts of 128 byte tokens, 128 new tokens each, greedy, on the bench Llama (55 M parameters, "
        "random weights, float32), 2 intra-op threads for every system; tok/s = B x 128 / seconds of the "
        'whole call, prefill included. kvarray: the engine with its defaults (view "auto": prompt passes '
        "of at most 128 tokens on the pool-view graph, decode passes, never mixed with prompt chunks, on "
        "the decode-view graph "
        "over the runner's own copy of each sequence's past; ONNX Runtime threads spin, as genai's do) "
        "and decode bursts of up to 8 passes a step (`EngineConfig.decode_burst`); "
        "kvarray, pool view: the same engine on the pool-view graph alone, prompt chunks and decode "
        "tokens in one pass. Ratios: kvarray's tok/s over the other "
        "system's, from rounds interleaved in the same run (above 1: kvarray is faster).\n"
    )
    header = [
        "sequences",
        *[f"{display(k)} tok/s" for k in tps],
        *[f"kvarray / {display(k)}" for k in others],
    ]
    rows = [
        [
            n,
            *[tps[k].get(n) for k in tps],
            *[ratio(tps.get("kvarray", {}).get(n), tps[k].get(n)) for k in others],
        ]
        for n in sizes
    ]
    s.add(table(header, rows))
    for system, reason in sorted(unavailable.items()):
        s.add(f"- {display(system)}: not measured: {reason}\n")
    benches = results.tests("engine", "test_equal_batch")
    extra_versions = benches[0]["extra_info"].get("versions", {}) if benches else {}
    repeats = benches[0]["extra_info"].get("repeats", "?") if benches else "?"
    agree = [
        "{} {}/{}".format(display(k), *b["extra_info"][f"{k}_agreeing_tokens"])
        for b in benches[-1:]
        for k in others
        if f"{k}_agreeing_tokens" in b["extra_info"]
    ]
    if agree:
        s.add(f"\nGreedy tokens agreeing with kvarray's at {sizes[-1]} sequences: {', '.join(agree)}.\n")
    rounds = f"Medians of {repeats} rounds" if repeats != 1 else "One round"
    s.add(provenance(results, "engine", f"{rounds} per system and size.", extra_versions))

    title = "bench Llama: tokens/s (prefill included)"
    s.figures.append(tokens_figure("engine_tokens_per_s.png", title, tps, sizes))
    return s


def variants_section(results: Results) -> Section:
    s = Section("variants", "Engine variants: pool view, gathered view, int8")
    benches = results.tests("variants", "engine_variants")
    if not benches:
        return s
    tps: dict[str, dict[int, float]] = {}
    for b in benches:
        for key, value in b["extra_info"].items():
            if key.endswith("_tok_s"):
                tps.setdefault(key.removesuffix("_tok_s"), {})[b["extra_info"]["sequences"]] = value
    sizes = sorted({b["extra_info"]["sequences"] for b in benches})
    e0 = benches[0]["extra_info"]
    s.add(
        f"kvarray's engine alone, in one process (`benchmarks/engine_variants.py`): the same batches as "
        f"above ({e0['new_tokens']} new tokens), the pool-view graph with float32 storage, the "
        "gathered-view graph alone and the pool-view graph over int8 storage, rounds interleaved; "
        "ratios to the float32 pool view from the same rounds. Greedy tokens agreeing with the float32 "
        "pool view: int8 storage rounds the keys and values, so late tokens may differ.\n"
    )
    names = list(tps)
    rows = []
    for b in benches:
        e = b["extra_info"]
        row: list[Any] = [e["sequences"]]
        row += [e.get(f"{k}_tok_s") for k in names]
        row += [e.get(f"{k}_ratio_to_pool") for k in names if k != "kvarray-pool"]
        row += ["{}/{}".format(*e[f"{k}_agreeing_tokens"]) for k in names if k != "kvarray-pool"]
        rows.append(row)
    others = [k for k in names if k != "kvarray-pool"]
    header = ["sequences", *[f"{display(k)} tok/s" for k in names]]
    header += [f"{display(k)} / pool" for k in others] + [f"{display(k)}: tokens agreeing" for k in others]
    s.add(table(header, rows))
    repeats = e0.get("repeats", "?")
    rounds = f"Medians of {repeats} rounds" if repeats != 1 else "One round"
    s.add(provenance(results, "variants", f"{rounds} per variant and size."))

    s.figures.append(tokens_figure("engine_variants.png", "kvarray engine variants: tokens/s", tps, sizes))
    return s


def tokens_figure(name: str, title: str, tps: dict[str, dict[int, float]], sizes: list[int]) -> Figure:
    """A plot of tokens/s against sequences (log 2 axis at `sizes`), one line per system of
    ``tps {system: {sequences: tok/s}}``."""

    def draw(ax: Any) -> None:
        for system, data in tps.items():
            ns = sorted(data)
            ax.plot(ns, [data[n] for n in ns], marker="o", label=display(system))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.legend()

    return Figure(name, title, draw, xlabel="sequences", ylabel="tokens / s (median)")


def serving_section(results: Results) -> Section:
    s = Section("engine", "Serving workload: time to finish and time to first token")
    benches = results.tests("engine", "test_serving")
    if not benches:
        return s
    e = benches[0]["extra_info"]
    w = e.get("workload", {})
    s.add(
        f"{w.get('requests')} requests, prompts of {w.get('prompt')} tokens and outputs of {w.get('output')} "
        f"(uniform), Poisson arrivals at {w.get('rate')} requests/s (seed {w.get('seed')}), in real time. "
        f"kvarray: continuous batching, {e.get('max_sequences')} running at most; Optimum and transformers: "
        f"static batches of {e.get('static_batch')} in arrival order; onnxruntime-genai: its own `og.Engine` "
        "scheduler. Times in seconds from the first arrival (TTFT and latency: from each request's "
        "arrival).\n"
    )
    systems = {"kvarray": e["kvarray"]}
    systems.update({k: v for k, v in e.items() if isinstance(v, dict) and "finish_all_s" in v})
    rows = [
        [
            display(k),
            r.get("mode"),
            r["finish_all_s"],
            r["tokens_per_s"],
            r["ttft_median_s"],
            r["ttft_p90_s"],
            r["latency_median_s"],
            e.get(f"speedup_over_{k}"),
        ]
        for k, r in systems.items()
    ]
    s.add(
        table(
            [
                "system",
                "scheduling",
                "all done (s)",
                "tok/s",
                "TTFT median (s)",
                "TTFT p90 (s)",
                "latency median (s)",
                "kvarray speedup (all done)",
            ],
            rows,
        )
    )
    for system, reason in sorted(e.get("unavailable", {}).items()):
        s.add(f"- {display(system)}: not measured: {reason}\n")
    s.add(
        provenance(
            results,
            "engine",
            "One round per system, one after the other.",
            benches[0]["extra_info"].get("versions"),
        )
    )
    names = [display(k) for k in systems]

    def draw(ax: Any) -> None:
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [r["finish_all_s"] for r in systems.values()], 0.4, label="all done")
        ax.bar([i + 0.2 for i in x], [r["ttft_median_s"] for r in systems.values()], 0.4, label="TTFT median")
        ax.set_xticks(list(x), names)
        ax.legend()

    s.figures.append(Figure("serving.png", f"serving {w.get('requests')} requests", draw, ylabel="seconds"))
    return s


def capacity_section(results: Results) -> Section:
    s = Section("capacity", "Memory per token and requests that fit a fixed budget")
    data = results.capacity
    if not data:
        return s
    s.add(
        "`CacheStats.bytes_per_token`: keys plus values over all layers, int8 scales (float16, one per 32 "
        "values) included.\n"
    )
    s.add(
        table(
            ["spec (layers x kv heads x head_dim)", "storage", "bytes / token", "/ float16"],
            [
                [r["spec"], r["storage"], r["bytes_per_token"], r["ratio_to_float16"]]
                for r in data["memory_per_token"]
            ],
        )
    )
    cap = data["capacity"]
    w = cap["workload"]
    s.add(
        f"\nRequests that fit in {cap['budget_bytes'] / 2**20:.0f} MiB of K/V ({cap['spec']}): each holds "
        f"{w['prompt']} prompt tokens, of which the first {w['shared']} are a common system prompt, plus "
        f"{w['output']} generated tokens ({w['prompt'] + w['output']} cells). Counted by starting requests "
        "in a `CausalCache` of the cells the budget buys until it raises `CacheFull`; with prefix sharing, "
        "requests after the first take the system prompt's cells with `copy_prefix`.\n"
    )
    rows = [
        [r["storage"], r["prefix_sharing"], r["cells"], r["requests"], r["ratio_to_float16"]]
        for r in cap["rows"]
    ]
    s.add(
        table(["storage", "prefix sharing", "cells in budget", "requests that fit", "/ float16 alone"], rows)
    )
    s.add(provenance(results, "capacity", "Counts, not timings: the same on every machine."))
    labels = [f"{r['storage']}{' + sharing' if r['prefix_sharing'] else ''}" for r in cap["rows"]]
    counts = [r["requests"] for r in cap["rows"]]

    def draw(ax: Any) -> None:
        ax.bar(labels, counts, color="tab:green")
        for i, n in enumerate(counts):
            ax.annotate(str(n), (i, n), ha="center", va="bottom")

    s.figures.append(
        Figure(
            "capacity.png",
            f"requests in {cap['budget_bytes'] / 2**20:.0f} MiB of K/V",
            draw,
            ylabel="requests that fit",
        )
    )
    churn = data.get("churn", {})
    if churn:
        s.add(
            "\nn_kv / used cells after every step of the causal suite's churn workload (same spec, "
            "rates and seed; the mean is its `mean n_kv / used`):\n"
        )
        s.add(
            table(
                ["run", "mean n_kv / used", "max n_kv / used", "defrags", "cells moved"],
                [
                    [
                        k,
                        c["mean_ratio"],
                        max(n / max(u, 1) for n, u in zip(c["n_kv"], c["used"], strict=True)),
                        c["defrags"],
                        c["cells_moved"],
                    ]
                    for k, c in churn.items()
                ],
            )
        )

        def draw_churn(ax: Any) -> None:
            for name, c in churn.items():
                ratios = [n / max(u, 1) for n, u in zip(c["n_kv"], c["used"], strict=True)]
                ax.plot(ratios, label=f"{name} (mean {c['mean_ratio']:.2f}, {c['defrags']} defrags)")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.legend()

        s.figures.append(
            Figure(
                "churn.png",
                "n_kv / used cells over the churn workload",
                draw_churn,
                xlabel="step",
                ylabel="n_kv / used cells",
            )
        )
    return s


def gpu_section(results: Results) -> Section:
    s = Section(
        "gpu", "GPU: CUDA kernels against a device-to-device copy", missing="GPU figures not measured:"
    )
    rows = []
    for b in results.suites.get("gpu", []):
        e = b["extra_info"]
        rows.append([b["name"].removeprefix("test_"), e["kernel_gbps"], e["copy_gbps"], e["ratio_to_copy"]])
    if rows:
        s.add(table(["kernel", "GB/s", "device copy GB/s", "kernel / copy"], rows))
        s.add(provenance(results, "gpu", "Mean of 20 calls per figure (CUDA events)."))
    return s


SECTIONS: tuple[Callable[[Results], Section], ...] = (
    engine_section,
    variants_section,
    serving_section,
    capacity_section,
    kernels_section,
    causal_section,
    encoder_section,
    graphs_section,
    gpu_section,
)

"""Benchmark: merging full-size SD1.5 UNets on the CPU, ours beside ComfyUI's and mergekit's.

    .venv/bin/python benchmarks/bench_model_merge.py [--repeats 3] [--variants floor2,ours_linear,...]

Every variant runs in its own subprocess (so its peak memory is its own) on the same fixture
checkpoints (mergelab.fixtures: a base and two tuned variants, random fp16 weights):

* ``floor2`` / ``floor3``: read the input tensors once (2 or 3 models) — the floor of any merge;
* ``ours_linear``: our Model Merger, ``linear`` of 2 models (the node's code path, report included);
* ``comfy_simple``: ComfyUI's ModelMergeSimple with its weights materialized
  (``load_models_gpu(..., force_patch_weights=True)``);
* ``ours_ties``: TIES of 3 models (the base and two tuned models), density 0.2;
* ``mergekit_ties``: mergekit 0.1.5's TIES on the same tensors, per key (``merge_tensors``, fp32 math);
* ``ours_dare_ties``: DARE-TIES of 2 models (base + one tuned), density 0.2.

Reported: median wall time over the repeats and the peak extra RSS during the merge (sampled every
5 ms, relative to the RSS just before it).  Not a test: nothing here asserts a time.

``--paired ours_linear,ours_ties`` runs the named variants in one process instead, alternating run by
run after a warm-up round, and reports each round's time relative to the first variant: on a VM whose
speed drifts from minute to minute that ratio is steadier than one of medians taken minutes apart.
Its peak RSS figures are lower than the separate runs' (the process reuses what earlier runs freed):
take peak memory from the separate runs.

    .venv/bin/python benchmarks/bench_model_merge.py --paired ours_linear,ours_ties --repeats 7
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peak_rss import PeakRSS  # noqa: E402  (benchmarks/, the script's folder)

VARIANTS = ["floor2", "floor3", "ours_linear", "comfy_simple", "ours_ties", "mergekit_ties", "ours_dare_ties"]


def checkpoints():
    from mergelab import fixtures
    return [fixtures.full_sd15_checkpoint(), fixtures.tuned_sd15_checkpoint(delta_seed=1),
            fixtures.tuned_sd15_checkpoint(delta_seed=2)]


_MODELS = {"floor2": 2, "ours_linear": 2, "comfy_simple": 2, "ours_dare_ties": 2}


def _runners(variants):
    """Loads the fixtures once (as many as the variants need) and returns ``{variant: run}``, each ``run()``
    doing one measured step, and ``{variant: after}``, what to do after it (outside the timing)."""
    import importlib

    import torch
    from mergelab.harness import Harness

    h = Harness()
    import comfy.model_management as cmm
    import comfy.sd

    weights = importlib.import_module(h.pack_module_name + ".engine.weights")
    merger = importlib.import_module(h.pack_module_name + ".nodes.merger_nodes")
    mm = importlib.import_module(h.pack_module_name + ".merge_methods")
    paths = checkpoints()
    n_load = max(_MODELS.get(v, 3) for v in variants)
    models = [comfy.sd.load_checkpoint_guess_config(p, output_vae=False, output_clip=False)[0]
              for p in paths[:n_load]]
    cpu = torch.device("cpu")

    def entry(m, params=None):
        return (m, None, dict(params or {}), "m")

    def make(variant):
        n_models = _MODELS.get(variant, 3)
        if variant.startswith("floor"):
            def run():
                for m in models[:n_models]:
                    src = weights.KeySource.of(m)
                    for k in src.keys():
                        src.read(k, cpu)
        elif variant == "ours_linear":
            def run():
                return merger.run_merge("model", None, mm.create("linear"), [entry(models[0], {"weight": 0.5}),
                                        entry(models[1], {"weight": 0.5})], 0, "cpu", "fp32", "error")
        elif variant == "ours_ties":
            def run():
                return merger.run_merge("model", models[0], mm.create("ties"),
                                        [entry(m, {"weight": 1.0, "density": 0.2}) for m in models[1:3]],
                                        0, "cpu", "fp32", "error")
        elif variant == "ours_dare_ties":
            def run():
                return merger.run_merge("model", models[0], mm.create("dare_ties"),
                                        [entry(models[1], {"weight": 1.0, "density": 0.2})], 0, "cpu", "fp32",
                                        "error")
        elif variant == "comfy_simple":
            def run():
                import nodes as comfy_nodes
                m = comfy_nodes.NODE_CLASS_MAPPINGS["ModelMergeSimple"]().merge(models[0], models[1], 0.5)[0]
                cmm.load_models_gpu([m], force_patch_weights=True)
                return m
        elif variant == "mergekit_ties":
            def run():
                from mergekit.merge_methods.api import merge_tensors
                srcs = [weights.KeySource.of(m) for m in models[:3]]
                out = {}
                params = {"weight": [1.0, 1.0], "density": [0.2, 0.2]}      # the two tuned models
                with torch.no_grad():      # as mergekit's own merges (ComfyUI's weights are Parameters)
                    for k in srcs[0].keys():
                        ts = [s.read(k, cpu) for s in srcs]
                        out[k] = merge_tensors(ts, "ties", parameters=params, base_index=0,
                                               dtype=torch.float32, out_dtype=torch.float16)
                return out
        else:
            raise SystemExit(f"unknown variant {variant}")
        return run

    after = {"comfy_simple": cmm.unload_all_models}
    return {v: make(v) for v in variants}, after, torch.get_num_threads()


def _measure(run, after=None):
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - t0
    if after is not None:
        after()
    del result
    gc.collect()
    return elapsed, rss.extra_gb


def child(variant: str, repeats: int) -> dict:
    runs, after, threads = _runners([variant])
    times, peaks = [], []
    for _ in range(repeats):
        t, p = _measure(runs[variant], after.get(variant))
        times.append(t)
        peaks.append(p)
    return {"variant": variant, "times_s": times, "median_s": statistics.median(times),
            "peak_extra_gb": max(peaks), "models": _MODELS.get(variant, 3), "threads": threads}


def child_paired(variants, repeats: int) -> dict:
    """The variants in one process, alternating run by run (a, b, a, b, ...): on a VM whose speed drifts
    from minute to minute, each round's runs see the same conditions, so the per-round ratio to the first
    variant is steadier than a ratio of medians taken minutes apart.  Round 0 warms up and is not counted."""
    runs, after, threads = _runners(variants)
    times = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    for r in range(repeats + 1):
        for v in variants:
            t, p = _measure(runs[v], after.get(v))
            if r:
                times[v].append(t)
                peaks[v].append(p)
    ref = variants[0]
    ratios = {v: [a / b for a, b in zip(times[v], times[ref])] for v in variants[1:]}
    return {"variants": list(variants), "times_s": times, "peak_extra_gb": {v: max(peaks[v]) for v in variants},
            "ratios_to_first": ratios, "threads": threads}


def paired(variants, repeats: int, json_path=None) -> None:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-paired", ",".join(variants),
                           "--repeats", str(repeats)], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"paired run failed\n{proc.stderr[-3000:]}")
    r = json.loads(line[-1][7:])
    print(f"{len(variants)} variants alternating in one process, {repeats} rounds after a warm-up round, "
          f"{r['threads']} threads")
    for v in variants:
        ts = r["times_s"][v]
        print(f"{v:16s} median {statistics.median(ts):7.2f} s   peak extra RSS {r['peak_extra_gb'][v]:5.2f} GiB   "
              f"runs {', '.join(f'{t:.1f}' for t in ts)}")
    for v, rs in r["ratios_to_first"].items():
        print(f"{v} / {variants[0]} per round: median {statistics.median(rs):.2f} (min {min(rs):.2f}, "
              f"max {max(rs):.2f}; {', '.join(f'{x:.2f}' for x in rs)})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paired", metavar="A,B,...",
                    help="run these variants alternating in one process and report each one's time per round "
                         "relative to the first (e.g. ours_linear,ours_ties); --repeats rounds after a warm-up")
    ap.add_argument("--child")
    ap.add_argument("--child-paired")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.repeats)), flush=True)
        return
    if args.child_paired:
        print("RESULT " + json.dumps(child_paired(args.child_paired.split(","), args.repeats)), flush=True)
        return
    checkpoints()      # generate the fixtures once, before timing anything
    if args.paired:
        unknown = [v for v in args.paired.split(",") if v not in VARIANTS]
        if unknown or len(args.paired.split(",")) < 2:
            ap.error(f"--paired takes two or more of {', '.join(VARIANTS)}")
        paired(args.paired.split(","), args.repeats, args.json)
        return
    results = []
    for v in args.variants.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", v, "--repeats",
                               str(args.repeats)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{v}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(line[-1][7:])
        results.append(r)
        print(f"{v:16s} median {r['median_s']:7.2f} s   peak extra RSS {r['peak_extra_gb']:5.2f} GiB   "
              f"runs {', '.join(f'{t:.1f}' for t in r['times_s'])}", flush=True)
    by = {r["variant"]: r for r in results}
    print("\n| variant | models | median time (s) | peak extra RSS (GiB) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['models']} | {r['median_s']:.2f} | {r['peak_extra_gb']:.2f} |")
    ratios = []
    if "ours_linear" in by and "comfy_simple" in by:
        ratios.append(f"ours_linear / comfy_simple = {by['ours_linear']['median_s'] / by['comfy_simple']['median_s']:.2f}")
    if "ours_ties" in by and "mergekit_ties" in by:
        ratios.append(f"mergekit_ties / ours_ties = {by['mergekit_ties']['median_s'] / by['ours_ties']['median_s']:.2f}")
    if "ours_ties" in by and "ours_linear" in by:
        ratios.append(f"ours_ties / ours_linear = {by['ours_ties']['median_s'] / by['ours_linear']['median_s']:.2f}")
    for r in ratios:
        print(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()

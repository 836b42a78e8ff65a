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
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ["floor2", "floor3", "ours_linear", "comfy_simple", "ours_ties", "mergekit_ties", "ours_dare_ties"]


class PeakRSS:
    def __init__(self):
        import psutil
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_gb(self):
        return (self.peak - self.base) / 2**30


def checkpoints():
    from mergelab import fixtures
    return [fixtures.full_sd15_checkpoint(), fixtures.tuned_sd15_checkpoint(delta_seed=1),
            fixtures.tuned_sd15_checkpoint(delta_seed=2)]


def child(variant: str, repeats: int) -> dict:
    import importlib

    import torch
    from mergelab.harness import Harness

    h = Harness()
    import comfy.model_management as cmm
    import comfy.sd

    eng = importlib.import_module(h.pack_module_name + ".engine.merge")
    weights = importlib.import_module(h.pack_module_name + ".engine.weights")
    merger = importlib.import_module(h.pack_module_name + ".nodes.merger_nodes")
    mm = importlib.import_module(h.pack_module_name + ".merge_methods")
    paths = checkpoints()
    n_models = {"floor2": 2, "ours_linear": 2, "comfy_simple": 2, "ours_dare_ties": 2}.get(variant, 3)
    models = [comfy.sd.load_checkpoint_guess_config(p, output_vae=False, output_clip=False)[0]
              for p in paths[:n_models]]
    cpu = torch.device("cpu")

    def entry(m, params=None):
        return (m, None, dict(params or {}), "m")

    def run():
        if variant.startswith("floor"):
            for m in models:
                src = weights.KeySource.of(m)
                for k in src.keys():
                    src.read(k, cpu)
            return None
        if variant == "ours_linear":
            return merger.run_merge("model", None, mm.create("linear"), [entry(models[0], {"weight": 0.5}),
                                    entry(models[1], {"weight": 0.5})], 0, "cpu", "fp32", "error")
        if variant == "ours_ties":
            return merger.run_merge("model", models[0], mm.create("ties"),
                                    [entry(m, {"weight": 1.0, "density": 0.2}) for m in models[1:]],
                                    0, "cpu", "fp32", "error")
        if variant == "ours_dare_ties":
            return merger.run_merge("model", models[0], mm.create("dare_ties"),
                                    [entry(models[1], {"weight": 1.0, "density": 0.2})], 0, "cpu", "fp32", "error")
        if variant == "comfy_simple":
            import nodes as comfy_nodes
            m = comfy_nodes.NODE_CLASS_MAPPINGS["ModelMergeSimple"]().merge(models[0], models[1], 0.5)[0]
            cmm.load_models_gpu([m], force_patch_weights=True)
            return m
        if variant == "mergekit_ties":
            from mergekit.merge_methods.api import merge_tensors
            srcs = [weights.KeySource.of(m) for m in models]
            out = {}
            params = {"weight": [1.0, 1.0], "density": [0.2, 0.2]}      # the two tuned models
            with torch.no_grad():      # as mergekit's own merges (ComfyUI's weights are Parameters)
                for k in srcs[0].keys():
                    ts = [s.read(k, cpu) for s in srcs]
                    out[k] = merge_tensors(ts, "ties", parameters=params, base_index=0,
                                           dtype=torch.float32, out_dtype=torch.float16)
            return out
        raise SystemExit(f"unknown variant {variant}")

    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - t0)
        peaks.append(rss.extra_gb)
        if variant == "comfy_simple":
            cmm.unload_all_models()
        del result
        gc.collect()
    return {"variant": variant, "times_s": times, "median_s": statistics.median(times),
            "peak_extra_gb": max(peaks), "models": n_models, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.repeats)), flush=True)
        return
    checkpoints()      # generate the fixtures once, before timing anything
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

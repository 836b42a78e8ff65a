"""Benchmark: saving a merged full-size SD1.5 with MergeLab's streaming save nodes beside ComfyUI's own.

    .venv/bin/python benchmarks/bench_save.py [--merge simple|mergelab] [--variants a,b,...] [--repeats 1]
                                              [--json out.json]

Set-up (in every variant, identical): a real headless ComfyUI (``--cpu``) loads the two full-size SD1.5
fixture checkpoints (``mergelab.fixtures.full_sd15_checkpoint`` and ``tuned_sd15_checkpoint``, 2.1 GB fp16
files each) with CheckpointLoaderSimple and merges their UNets, either with ComfyUI's ModelMergeSimple
(``--merge simple``: lazy patches, the save computes 0.5*W1 + 0.5*W2 per key) or with MergeLab's Model
Merger + linear (``--merge mergelab``: ``set`` patches computed before the save).  Then ONE save runs and is
measured; every variant runs in its own subprocess, so its peak memory is its own:

* ``comfy_checkpoint``: ComfyUI's CheckpointSave (MODEL + CLIP + VAE);
* ``ours_checkpoint``: MergeLab_SaveCheckpoint, dtype keep, recipe on (the node's own code, hidden inputs empty);
* ``comfy_model``: ComfyUI's ModelSave (diffusion model only);
* ``ours_model``: MergeLab_SaveModel, dtype keep.

Reported: wall time of the save (median of the repeats), its CPU time (user + sys of the process, all
threads: less sensitive than wall time to other load on a shared machine), the file size, the RSS just before the save and
the peak RSS during it (sampled every 5 ms by a thread, psutil), and the peak extra RSS (peak - before).
Both write the same dtype (fp32 here: ComfyUI keeps CPU models in fp32), so the files have the same size.
Ours also fsyncs the file before renaming it into place (ComfyUI does not); that time is included.
Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peak_rss import PeakRSS  # noqa: E402  (benchmarks/, the script's folder)

VARIANTS = ["comfy_checkpoint", "ours_checkpoint", "comfy_model", "ours_model"]


def _merge_graph(a, b, merge):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": a}},
         "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": b}}}
    if merge == "simple":
        g["3"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.5}}
    else:
        import nodes

        def full(ct, **given):
            req = nodes.NODE_CLASS_MAPPINGS[ct].INPUT_TYPES().get("required", {})
            ins = {n: s[1]["default"] for n, s in req.items() if len(s) > 1 and isinstance(s[1], dict) and "default" in s[1]}
            ins.update(given)
            return {"class_type": ct, "inputs": ins}
        g["m"] = full("MergeLab_Method_linear")
        g["i1"] = full("MergeLab_MergeInput", model=["1", 0], weight=0.5)
        g["i2"] = full("MergeLab_MergeInput", model=["2", 0], models=["i1", 0], weight=0.5)
        g["3"] = full("MergeLab_ModelMerger", method=["m", 0], models=["i2", 0], seed=0, device="cpu")
    for name, ref in (("model", ["3", 0]), ("clip", ["1", 1]), ("vae", ["1", 2])):
        g["c_" + name] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ref, "name": name}}
    return g


def child(variant: str, merge: str, a_path: str, b_path: str) -> dict:
    import logging
    logging.disable(logging.WARNING)
    from mergelab.harness import Harness
    h = Harness()
    a = h.add_model_file("checkpoints", a_path)
    b = h.add_model_file("checkpoints", b_path)
    t0 = time.perf_counter()
    res = h.run_ok(_merge_graph(a, b, merge))
    prep_s = time.perf_counter() - t0
    model, clip, vae = res.captured["model"], res.captured["clip"], res.captured["vae"]
    del res
    import gc

    import nodes
    gc.collect()
    prefix = f"bench/{variant}"
    if variant.startswith("comfy"):
        if variant == "comfy_checkpoint":
            node = nodes.NODE_CLASS_MAPPINGS["CheckpointSave"]()
            call = lambda: node.save(model, clip, vae, prefix)  # noqa: E731
        else:
            node = nodes.NODE_CLASS_MAPPINGS["ModelSave"]()
            call = lambda: node.save(model, prefix)  # noqa: E731
    else:
        cls = nodes.NODE_CLASS_MAPPINGS["MergeLab_SaveCheckpoint" if variant == "ours_checkpoint" else "MergeLab_SaveModel"]
        clone = cls.PREPARE_CLASS_CLONE({})
        if variant == "ours_checkpoint":
            call = lambda: clone.execute(model, clip, vae, prefix, "keep", True, False)  # noqa: E731
        else:
            call = lambda: clone.execute(model, prefix, "keep", True, False)  # noqa: E731
    import resource

    import torch
    os.sync()                       # start from clean page-cache state (no one else's dirty pages)
    with torch.inference_mode():
        with PeakRSS() as mem:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            call()
            secs = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    files = []
    for root, _, fs in os.walk(os.path.join(h.output_dir, "bench")):
        files += [os.path.join(root, f) for f in fs]
    size = sum(os.path.getsize(f) for f in files)
    names = sorted(os.path.relpath(f, h.output_dir) for f in files)
    h.close()
    return {"variant": variant, "merge": merge, "seconds": secs, "cpu_seconds": cpu, "rss_before": mem.base, "rss_peak": mem.peak,
            "rss_extra": mem.peak - mem.base, "file_bytes": size, "files": names, "prep_seconds": prep_s,
            "torch_threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merge", choices=["simple", "mergelab"], default="simple")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = child(args.child, args.merge, *args.paths)
        print("RESULT " + json.dumps(out), flush=True)
        return
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    # fixtures (generated once into .cache/fixtures), in a subprocess so this process stays small
    code = ("import sys; sys.path.insert(0, %r); from mergelab import fixtures; "
            "print(fixtures.full_sd15_checkpoint()); print(fixtures.tuned_sd15_checkpoint())" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    a_path, b_path = out.stdout.strip().splitlines()[-2:]
    print(f"fixtures: {a_path}\n          {b_path}")
    print(f"merge: {args.merge}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
          f"each variant in its own process\n")
    results = {}
    for rep in range(args.repeats):
        for v in (variants if rep % 2 == 0 else variants[::-1]):   # alternate the order between repeats
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", v, "--merge", args.merge,
                                "--paths", a_path, b_path], capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                print(f"{v}: FAILED (exit {p.returncode})\n{p.stderr[-3000:]}")
                continue
            r = json.loads(line[-1][len("RESULT "):])
            results.setdefault(v, []).append(r)
            print(f"  run {rep + 1} {v:17s} {r['seconds']:6.1f} s (CPU {r['cpu_seconds']:5.1f} s)   peak RSS {r['rss_peak'] / 2**30:5.2f} GiB "
                  f"(before {r['rss_before'] / 2**30:5.2f}, extra {r['rss_extra'] / 2**30:5.2f})   "
                  f"file {r['file_bytes'] / 2**30:.2f} GiB", flush=True)
    print("\nvariant            wall s (median)   CPU s (median)   peak RSS GiB   extra RSS GiB (median)   file GiB")
    summary = {}
    for v, rs in results.items():
        s = {"seconds": statistics.median(r["seconds"] for r in rs),
             "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
             "rss_peak": statistics.median(r["rss_peak"] for r in rs),
             "rss_extra": statistics.median(r["rss_extra"] for r in rs),
             "file_bytes": rs[0]["file_bytes"], "runs": rs}
        summary[v] = s
        print(f"{v:18s} {s['seconds']:14.1f}   {s['cpu_seconds']:14.1f}   {s['rss_peak'] / 2**30:12.2f}   {s['rss_extra'] / 2**30:22.2f}   "
              f"{s['file_bytes'] / 2**30:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"merge": args.merge, "results": summary}, f, indent=1)


if __name__ == "__main__":
    main()

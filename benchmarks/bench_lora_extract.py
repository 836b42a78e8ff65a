"""Benchmark: difference-LoRA extraction on full-size SD1.5 UNets, MergeLab vs ComfyUI's own.

    .venv/bin/python benchmarks/bench_lora_extract.py [--rank 32] [--only ours,comfy] [--skip-optimum]

The pair is the full-size SD1.5 fixture checkpoint (``mergelab.fixtures.full_sd15_checkpoint``) and its
tuned variant (``tuned_sd15_checkpoint``: the same + 0.002·N(0,1) per tensor, fp16 on disk).  Each side
runs in its own subprocess, through ComfyUI's real executor, from the two checkpoints loaded with
``CheckpointLoaderSimple``:

* ``ours``:  MergeLab_ExtractLoRA (rank 32, randomized SVD, defaults; bias_diff on) → MergeLab_SaveLoRA
  (fp16, kohya names);
* ``comfy``: ModelMergeSubtract (tuned − base) → LoraSave ("Extract and Save Lora", rank 32, standard,
  bias_diff on; full ``torch.linalg.svd`` and the 0.99 clamp).

Measured per side: the wall time of the extraction nodes (from the executor's "executing" events; the
checkpoint loaders are excluded), and the peak extra RSS of the process during them (sampled every
5 ms, relative to the RSS when the first extraction node starts).  Then, in a third subprocess, every
layer of both files is compared with the true ΔW = tuned − base read from the checkpoints: relative
Frobenius error, and its ratio to the best possible rank-32 error (Eckart–Young, from ``svdvals``;
cached in ``.cache/bench/`` because it is slow).  Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.path.join(ROOT, ".cache", "bench")


class RSSSampler:
    def __init__(self):
        import psutil
        self.proc = psutil.Process()
        self.samples = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            c = self.proc.cpu_times()
            self.samples.append((time.perf_counter(), self.proc.memory_info().rss, c.user + c.system))
            time.sleep(0.005)

    def stop(self):
        self._stop.set()
        self._t.join()

    def peak_between(self, t0, t1):
        """(RSS just before t0, peak RSS in [t0, t1], CPU seconds used in [t0, t1])."""
        base, cpu0, cpu1 = None, None, None
        peak = 0
        for t, r, c in self.samples:
            if t < t0:
                base, cpu0 = r, c
            elif t <= t1:
                peak = max(peak, r)
                cpu1 = c
        if base is None:
            base, cpu0 = self.samples[0][1], self.samples[0][2]
        return base, peak, (cpu1 if cpu1 is not None else cpu0) - cpu0


def _graph(side: str, base_name: str, tuned_name: str, rank: int, prefix: str):
    g = {"base": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base_name}},
         "tuned": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tuned_name}}}
    if side == "ours":
        g["x"] = {"class_type": "MergeLab_ExtractLoRA", "inputs": {
            "tuned_model": ["tuned", 0], "base_model": ["base", 0], "rank_mode": "fixed", "rank": rank,
            "rank_param": 0.9, "svd": "randomized", "oversample": 16, "power_iterations": 2, "seed": 0,
            "clamp_quantile": 1.0, "bias_diff": True, "conv": True, "min_diff": 1e-6, "device": "auto"}}
        g["save"] = {"class_type": "MergeLab_SaveLoRA", "inputs": {
            "lora": ["x", 0], "filename_prefix": prefix, "key_format": "kohya", "dtype": "fp16",
            "save_recipe": True, "hash_input_files": False}}
        g["cap"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["save", 0], "name": "path"}}
        g["rep"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 1], "name": "report"}}
        work = ["x", "save"]
    else:
        g["sub"] = {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["tuned", 0], "model2": ["base", 0],
                                                                   "multiplier": 1.0}}
        g["x"] = {"class_type": "LoraSave", "inputs": {"filename_prefix": prefix, "rank": rank,
                                                       "lora_type": "standard", "bias_diff": True,
                                                       "model_diff": ["sub", 0]}}
        work = ["sub", "x"]
    return g, work


def run_side(side: str, rank: int) -> dict:
    import torch
    from mergelab import fixtures
    from mergelab.harness import Harness

    h = Harness()
    base = fixtures.full_sd15_checkpoint()
    tuned = fixtures.tuned_sd15_checkpoint()
    bn = h.add_model_file("checkpoints", base)
    tn = h.add_model_file("checkpoints", tuned)
    prefix = f"loras/bench_{side}_r{rank}"
    g, work = _graph(side, bn, tn, rank, prefix)
    events = []

    def listener(event, data):
        if event == "executing" and isinstance(data, dict):
            events.append((time.perf_counter(), data.get("node")))

    sampler = RSSSampler().start()
    t_start = time.perf_counter()
    res = h.run(g, listener=listener, extra_data={"client_id": "bench"})
    t_end = time.perf_counter()
    sampler.stop()
    if not res.success:
        raise SystemExit(f"{side} failed: {res.error_text()}")
    starts = {}
    for t, nid in events:
        if nid is not None and nid not in starts:
            starts[nid] = t
    order = sorted((t, n) for n, t in starts.items())
    ends = {}
    for i, (t, n) in enumerate(order):
        ends[n] = order[i + 1][0] if i + 1 < len(order) else t_end
    w0 = min(starts[n] for n in work)
    w1 = max(ends[n] for n in work)
    rss_base, rss_peak, cpu_s = sampler.peak_between(w0, w1)
    node_cpu = {n: sampler.peak_between(starts[n], ends[n])[2] for n in work}
    out_dir = h.output_dir
    files = sorted(f for f in os.listdir(os.path.join(out_dir, "loras")) if f.startswith(f"bench_{side}_r{rank}"))
    path = os.path.join(out_dir, "loras", files[-1])
    keep = os.path.join(CACHE, f"{side}_r{rank}.safetensors")
    os.makedirs(CACHE, exist_ok=True)
    os.replace(path, keep)
    result = {"side": side, "rank": rank, "wall_s": w1 - w0, "node_s": {n: ends[n] - starts[n] for n in work},
              "cpu_s": cpu_s, "node_cpu_s": node_cpu, "load_avg": os.getloadavg(),
              "total_run_s": t_end - t_start, "peak_extra_rss_bytes": rss_peak - rss_base,
              "rss_before_bytes": rss_base, "file": keep, "file_bytes": os.path.getsize(keep),
              "threads": torch.get_num_threads()}
    if side == "ours":
        result["report_head"] = res.captured["report"].splitlines()[:6]
    return result


def _optimum_cache(rank: int) -> dict:
    p = os.path.join(CACHE, f"optimum_r{rank}.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


def analyze(rank: int, files: dict, skip_optimum: bool) -> dict:
    """Per layer: relative error of each file's ΔW vs tuned − base, and the rank-r optimum."""
    import safetensors
    import torch
    from mergelab import fixtures
    from mergelab.harness import Harness

    h = Harness()
    import importlib
    lio = importlib.import_module(f"{h.pack_module_name}.engine.lora_io")
    svd = importlib.import_module(f"{h.pack_module_name}.engine.lora_svd")
    base_path = fixtures.full_sd15_checkpoint()
    tuned_path = fixtures.tuned_sd15_checkpoint()
    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(base_path, output_vae=False, output_clip=False)[0]
    loras = {side: lio.load_lora_file(path, model, None, name=side) for side, path in files.items()}
    del model
    opt_cache = _optimum_cache(rank)
    per = {side: [] for side in files}
    fb, ft = safetensors.safe_open(base_path, "pt"), safetensors.safe_open(tuned_path, "pt")
    keys = sorted(set().union(*[set(l.layers) for l in loras.values()]))
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        disk = "model." + key
        d = ft.get_tensor(disk).float() - fb.get_tensor(disk).float()
        nrm = float(torch.linalg.norm(d))
        if d.dim() >= 2 and not skip_optimum:
            if key not in opt_cache:
                r = min(rank, d.shape[0], d[0].numel())
                with svd.single_thread_if_small(d.numel(), torch.device("cpu")):
                    opt_cache[key] = svd.optimal_rank_error(d, r)
            opt = opt_cache[key]
        else:
            opt = 0.0
        for side, l in loras.items():
            layer = l.layers.get(key)
            got = layer.delta("cpu", torch.float32, key) if layer is not None else torch.zeros_like(d)
            err = float(torch.linalg.norm(got - d)) / nrm if nrm > 0 else 0.0
            per[side].append({"key": key, "dim": d.dim(), "err": err, "opt": opt})
        if (i + 1) % 100 == 0:
            print(f"  analyzed {i + 1}/{len(keys)} layers ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
            with open(os.path.join(CACHE, f"optimum_r{rank}.json"), "w") as f:
                json.dump(opt_cache, f)
    with open(os.path.join(CACHE, f"optimum_r{rank}.json"), "w") as f:
        json.dump(opt_cache, f)
    out = {}
    for side, rows in per.items():
        mats = [r for r in rows if r["dim"] >= 2]
        ratios = [r["err"] / r["opt"] for r in mats if r["opt"] > 1e-9]
        vecs = [r["err"] for r in rows if r["dim"] < 2]
        worst = max(mats, key=lambda r: r["err"] / r["opt"] if r["opt"] > 1e-9 else 0.0) if mats else None
        out[side] = {"layers": len(rows), "matrix_layers": len(mats),
                     "mean_rel_err": statistics.mean(r["err"] for r in mats) if mats else None,
                     "ratio_to_optimum_median": statistics.median(ratios) if ratios else None,
                     "ratio_to_optimum_max": max(ratios) if ratios else None,
                     "worst_layer": worst["key"] if worst else None,
                     "vector_layers_max_err": max(vecs) if vecs else None}
    return out


def _child(args) -> int:
    if args.child == "analyze":
        files = json.loads(args.files)
        print("RESULT " + json.dumps(analyze(args.rank, files, args.skip_optimum)), flush=True)
    else:
        print("RESULT " + json.dumps(run_side(args.child, args.rank)), flush=True)
    return 0


def _spawn(argv, timeout):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{argv} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--only", default="ours,comfy")
    ap.add_argument("--skip-optimum", action="store_true", help="do not compute the optimum (fast)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    sides = [s for s in args.only.split(",") if s]
    results = {}
    for side in sides:
        t = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] running {side} ...", flush=True)
        results[side] = _spawn(["--child", side, "--rank", str(args.rank)], timeout=6 * 3600)
        print(json.dumps(results[side], indent=1), flush=True)
    files = {s: r["file"] for s, r in results.items()}
    print(f"[{time.strftime('%H:%M:%S')}] analyzing errors ...", flush=True)
    extra = ["--skip-optimum"] if args.skip_optimum else []
    errors = _spawn(["--child", "analyze", "--rank", str(args.rank), "--files", json.dumps(files), *extra],
                    timeout=6 * 3600)
    print(json.dumps(errors, indent=1))
    print("\nsummary (rank %d, full-size SD1.5 UNet, %d CPU threads)" % (args.rank, results[sides[0]]["threads"]))
    print(f"{'side':<6} {'wall s':>9} {'CPU s':>9} {'peak extra RSS GB':>18} {'mean rel err':>13} "
          f"{'err/opt median':>15} {'err/opt max':>12}")
    for s in sides:
        r, e = results[s], errors[s]
        print(f"{s:<6} {r['wall_s']:>9.1f} {r.get('cpu_s', float('nan')):>9.1f} "
              f"{r['peak_extra_rss_bytes'] / 2**30:>18.2f} {e['mean_rel_err'] or 0:>13.5f} "
              f"{e['ratio_to_optimum_median'] or 0:>15.5f} {e['ratio_to_optimum_max'] or 0:>12.5f}")
    if "ours" in results and "comfy" in results:
        o, c = results["ours"], results["comfy"]
        print(f"speed-up (wall): {c['wall_s'] / o['wall_s']:.1f}x"
              + (f"; (CPU time): {c['cpu_s'] / o['cpu_s']:.1f}x" if "cpu_s" in o and "cpu_s" in c else "")
              + f"; peak extra memory ours/comfy: {o['peak_extra_rss_bytes'] / max(1, c['peak_extra_rss_bytes']):.2f}")
    with open(os.path.join(CACHE, f"result_r{args.rank}.json"), "w") as f:
        json.dump({"runs": results, "errors": errors}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

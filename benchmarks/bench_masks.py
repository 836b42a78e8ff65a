"""Benchmark: MODEL_MASK memory and time on the full-size SDXL key set (2.57 B parameters, 1680 keys).

    .venv/bin/python benchmarks/bench_masks.py [--arch SDXL] [--variants random,mag_tensor,...] [--repeats 1]

Shapes come from ``mergelab.fixtures.meta_unet_shapes`` (the real SDXL UNet built on the meta device);
values are synthetic and streamed key by key (a seeded ``torch.rand`` per key for A and for B), so no
model is held in memory and what is measured is the mask machinery itself.  Each variant runs in its own
subprocess (its peak memory is its own):

* ``random``: Random Masker (density 0.3), then ``selection()`` of every key as a merge would ask for it;
* ``mag_tensor``: Magnitude Masker, |A - B| above quantile 0.9, per tensor (one read of each key);
* ``mag_model``: the same with one exact quantile over the whole model (three streaming passes);
* ``mag_block``: the same per block;
* ``ops``: mag_tensor, then union with a random mask (materialized to bits), invert, xor with a block mask.

Reported per variant: wall time (median of the repeats), the mask's storage, and the peak extra RSS of
the process during the build (sampled every 5 ms, relative to the RSS just before), also per parameter.
The claim checked by reading the numbers: peak extra memory stays under one byte per parameter.
Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peak_rss import PeakRSS  # noqa: E402  (benchmarks/, the script's folder)

VARIANTS = ["random", "mag_tensor", "mag_model", "mag_block", "ops"]
PKG = "mergelab_bench_pack"


def _masks_module():
    if PKG not in sys.modules:
        spec = importlib.util.spec_from_file_location(PKG, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PKG] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{PKG}.engine.masks")


def _reader(seed: int, shapes):
    import torch
    from hashlib import blake2b

    def read(key):
        g = torch.Generator().manual_seed(int.from_bytes(blake2b(f"{seed}:{key}".encode(), digest_size=7).digest(), "little"))
        return torch.rand(shapes[key], generator=g)
    return read


def run_variant(name: str, arch: str) -> dict:
    import gc

    import torch
    from mergelab import fixtures

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    M = _masks_module()
    shapes = {k: tuple(v) for k, v in fixtures.meta_unet_shapes(arch).items()}
    layout = M.MaskLayout(f"{arch}:{arch}", list(shapes), list(shapes.values()))
    read_a, read_b = _reader(1, shapes), _reader(2, shapes)
    gc.collect()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        if name == "random":
            mask = M.random_mask(layout, 0.3, 7)
            selected = 0
            for k in layout.keys:
                sel = mask.selection(k, shapes[k], torch.device("cpu"))
                selected += int(sel.sum()) if sel is not None else sel_numel(shapes[k])
                del sel
            extra = {"selected_fraction": selected / layout.total}
        elif name.startswith("mag_"):
            mask = M.magnitude_mask(layout, read_a, read_b, 0.9, "above", name[4:])
            extra = {}
        elif name == "ops":
            mag = M.magnitude_mask(layout, read_a, read_b, 0.9, "above", "tensor")
            mask = mag.union(M.random_mask(layout, 0.3, 7)).invert().xor(
                M.block_mask(layout, ["output_blocks.*"]))
            del mag
            extra = {}
        else:
            raise SystemExit(f"unknown variant {name}")
    wall = time.perf_counter() - t0
    sel, total = mask.selected_total()
    peak_extra = rss.peak - rss.base
    return {"variant": name, "arch": arch, "params": layout.total, "keys": len(layout.keys), "wall_s": wall,
            "mask_bytes": mask.nbytes(), "mask_bits_per_param": 8.0 * mask.nbytes() / layout.total,
            "peak_extra_rss_bytes": peak_extra, "peak_extra_bytes_per_param": peak_extra / layout.total,
            "selected_fraction": sel / total, **extra}


def sel_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="SDXL")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args.arch)), flush=True)
        return 0
    results = []
    for v in args.variants.split(","):
        runs = []
        for _ in range(args.repeats):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", v, "--arch", args.arch],
                                  capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{v}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                break
            runs.append(json.loads(line[0][7:]))
        if not runs:
            continue
        r = dict(runs[-1])
        r["wall_s"] = statistics.median(x["wall_s"] for x in runs)
        r["peak_extra_rss_bytes"] = max(x["peak_extra_rss_bytes"] for x in runs)
        r["peak_extra_bytes_per_param"] = r["peak_extra_rss_bytes"] / r["params"]
        results.append(r)
        print(f"{v:11s} {r['arch']} {r['params'] / 1e9:.2f} B params: {r['wall_s']:8.1f} s  "
              f"mask {r['mask_bytes'] / 2**20:8.1f} MiB ({r['mask_bits_per_param']:.3f} bit/param)  "
              f"peak extra RSS {r['peak_extra_rss_bytes'] / 2**20:8.1f} MiB "
              f"({r['peak_extra_bytes_per_param']:.3f} byte/param)  selected {r['selected_fraction']:.4f}",
              flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

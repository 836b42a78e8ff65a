#!/usr/bin/env python
"""Benchmark every registered merge method over a full-size SD1.5 UNet's tensor shapes.

For each method the script reports the total merge time over all keys and its ratio to the
"read floor": the time to materialize the method's input tensors once in compute precision
(``x.to(torch.float32)`` on the device for the base and every model: the staging copy that
``MergeMethod.merge`` itself has to make).  A ratio near 1 means the method costs about as much as
touching its inputs once; the rest is compute, temporaries and per-call overhead.

Inputs are random, generated key by key on the compute device from a seeded generator (nothing is
held for more than one key): base ~ N(0, 0.02²) and model_i = base + N(0, 0.002²), i.e. fine-tunes
of a common base (deltas ~10 % of the weights).  Keys are visited in the outer loop and every
method is timed on the same tensors; the first key is merged once untimed per method to warm up.

Shapes: ``--shapes FILE.json`` ({key: shape} or [[key, shape], ...]); by default
:func:`sd15_unet_shapes`, which builds ComfyUI's SD1.5 UNet on the meta device when ComfyUI is
importable (``--comfyui PATH`` or ``$COMFYUI_PATH`` are put on ``sys.path`` first) and otherwise
generates the same 686 keys / 859,520,964 parameters from a compact description of the layout.

Model counts: a method with a fixed count gets it; the others get ``--models`` (default 3, clamped
to the method's range).  Methods that take a base (required or optional) get one.  Parameters are
the defaults, except ``density``/``select_topk`` = 0.5 where a method has them (so pruning code
runs); ``--param method.name=value`` overrides (repeatable).

    python benchmarks/bench_merge_methods.py --methods linear,slerp --limit-keys 40
    python benchmarks/bench_merge_methods.py --device cuda --markdown
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import merge_methods as mm  # noqa: E402

Shape = Tuple[int, ...]
BENCH_SETTINGS = {"density": 0.5, "select_topk": 0.5}


# ----------------------------------------------------------------------------------- shapes
def _sd15_shapes_from_comfy(comfyui_path: Optional[str] = None) -> List[Tuple[str, Shape]]:
    path = comfyui_path or os.environ.get("COMFYUI_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args  # noqa: F401  (fails fast when ComfyUI is not importable)
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True       # comfy.model_management probes CUDA at import otherwise
    import comfy.supported_models
    # the SD1.5 UNet config ComfyUI detects from an SD1.5 checkpoint (model_detection's SD15 entry)
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    model = comfy.supported_models.SD15(unet_config).get_model({}, device=torch.device("meta"))
    return [(k, tuple(v.shape)) for k, v in model.diffusion_model.state_dict().items()]


def _sd15_shapes_generated() -> List[Tuple[str, Shape]]:
    """SD1.5 UNet keys/shapes in ComfyUI's state-dict order, from the layout alone.

    320 base channels with multipliers (1, 2, 4, 4), 2 ResBlocks per level, one transformer block
    (context 768) at the first three levels, 12 input blocks, a middle block and 12 output blocks.
    """
    mc, mult, ctx, temb = 320, (1, 2, 4, 4), 768, 1280
    out: List[Tuple[str, Shape]] = []

    def wb(name, *shape, bias=True):
        out.append((name + ".weight", tuple(shape)))
        if bias:
            out.append((name + ".bias", (shape[0],)))

    def norm(name, c):
        wb(name, c)

    def conv(name, o, i, k):
        wb(name, o, i, k, k)

    def res(p, cin, cout):
        norm(p + ".in_layers.0", cin)
        conv(p + ".in_layers.2", cout, cin, 3)
        wb(p + ".emb_layers.1", cout, temb)
        norm(p + ".out_layers.0", cout)
        conv(p + ".out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(p + ".skip_connection", cout, cin, 1)

    def attn(p, c, kv):
        wb(p + ".to_q", c, c, bias=False)
        wb(p + ".to_k", c, kv, bias=False)
        wb(p + ".to_v", c, kv, bias=False)
        wb(p + ".to_out.0", c, c)

    def transformer(p, c):
        norm(p + ".norm", c)
        conv(p + ".proj_in", c, c, 1)
        b = p + ".transformer_blocks.0"
        attn(b + ".attn1", c, c)
        wb(b + ".ff.net.0.proj", 8 * c, c)
        wb(b + ".ff.net.2", c, 4 * c)
        attn(b + ".attn2", c, ctx)
        for n in ("norm2", "norm1", "norm3"):
            norm(f"{b}.{n}", c)
        conv(p + ".proj_out", c, c, 1)

    wb("time_embed.0", temb, mc)
    wb("time_embed.2", temb, temb)
    conv("input_blocks.0.0", mc, 4, 3)
    chans, ch, idx = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            res(f"input_blocks.{idx}.0", ch, m * mc)
            ch = m * mc
            if level < 3:
                transformer(f"input_blocks.{idx}.1", ch)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx += 1
    res("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    idx = 0
    for level in reversed(range(len(mult))):
        for i in range(3):
            cin = ch + chans.pop()
            ch = mult[level] * mc
            res(f"output_blocks.{idx}.0", cin, ch)
            sub = 1
            if level < 3:
                transformer(f"output_blocks.{idx}.1", ch)
                sub = 2
            if level > 0 and i == 2:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
            idx += 1
    norm("out.0", mc)
    conv("out.2", 4, mc, 3)
    return out


def sd15_unet_shapes(comfyui_path: Optional[str] = None, verbose: bool = True) -> List[Tuple[str, Shape]]:
    """SD1.5 UNet (key, shape) list: from ComfyUI when importable, else from the built-in layout."""
    try:
        shapes = _sd15_shapes_from_comfy(comfyui_path)
        source = "ComfyUI (comfy.supported_models.SD15, meta device)"
    except Exception as e:  # ComfyUI missing or not importable here
        shapes = _sd15_shapes_generated()
        source = f"built-in SD1.5 layout (ComfyUI not usable: {type(e).__name__}: {e})"
    if verbose:
        n = sum(math.prod(s) for _, s in shapes)
        print(f"shapes: {len(shapes)} keys, {n:,} parameters, from {source}", file=sys.stderr)
    return shapes


def load_shapes(path: str) -> List[Tuple[str, Shape]]:
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    items = data.items() if isinstance(data, dict) else data
    return [(str(k), tuple(int(d) for d in s)) for k, s in items]


def limit_keys(shapes: List[Tuple[str, Shape]], limit: Optional[int]) -> List[Tuple[str, Shape]]:
    """An evenly spaced subset of ``limit`` keys (keeps the mix of small and large tensors)."""
    if not limit or limit >= len(shapes):
        return shapes
    step = len(shapes) / limit
    return [shapes[int(i * step)] for i in range(limit)]


# ----------------------------------------------------------------------------------- plan
class Plan:
    def __init__(self, name: str, n_models: int, overrides: Dict[str, str]):
        self.name = name
        spec = mm.get_spec(name)
        lo, hi = spec.min_models, spec.max_models
        self.n_models = lo if hi == lo else max(lo, n_models if hi is None else min(n_models, hi))
        self.has_base = spec.base != mm.BASE_NONE
        params = {p.name: BENCH_SETTINGS[p.name] for p in spec.params if p.name in BENCH_SETTINGS}
        for k, v in overrides.items():
            params[k] = _parse_value(v)
        self.method = mm.create(name, **params)
        self.total = 0.0
        self.floor = 0.0
        self.peak_extra = 0
        self.error: Optional[str] = None

    @property
    def n_inputs(self) -> int:
        return self.n_models + (1 if self.has_base else 0)


def _parse_value(v: str):
    low = v.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def _key_seed(seed: int, key: str, i: int) -> int:
    d = hashlib.blake2b(f"{seed}\x00{key}\x00{i}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


def make_inputs(key: str, shape: Shape, count: int, device: torch.device, dtype: torch.dtype,
                seed: int) -> List[torch.Tensor]:
    """[base, model_1, ...]: base ~ N(0, 0.02²), model_i = base + N(0, 0.002²), seeded per key."""
    g = torch.Generator(device=device)
    g.manual_seed(_key_seed(seed, key, 0))
    base = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.02)
    out = [base.to(dtype)]
    for i in range(1, count):
        g.manual_seed(_key_seed(seed, key, i))
        out.append(torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.002)
                   .add_(base).to(dtype))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(plan: Plan, key: str, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    base = inputs[0] if plan.has_base else None
    first = 1 if plan.has_base else 0
    models = list(inputs[first:first + plan.n_models])
    return plan.method.merge(base, models, key=key, seed=0)


# ----------------------------------------------------------------------------------- run
def run(shapes: List[Tuple[str, Shape]], plans: List[Plan], device: torch.device, dtype: torch.dtype,
        seed: int, progress: bool = True) -> float:
    """Time every plan over every key; returns the per-input read floor (seconds, summed over keys)."""
    max_inputs = max(p.n_inputs for p in plans)
    floor_per_input = 0.0
    t_start = time.perf_counter()
    for ki, (key, shape) in enumerate(shapes):
        inputs = make_inputs(key, shape, max_inputs, device, dtype, seed)
        _sync(device)
        # read floor: stage every input once in fp32 (what merge() must do at the very least)
        t0 = time.perf_counter()
        staged = [x.to(torch.float32) for x in inputs]
        _sync(device)
        floor_per_input += (time.perf_counter() - t0) / max_inputs
        del staged
        for plan in plans:
            if plan.error:
                continue
            try:
                if ki == 0:
                    _call(plan, key, inputs)        # warm-up (lazy inits, first-call overheads)
                    _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                out = _call(plan, key, inputs)
                _sync(device)
                plan.total += time.perf_counter() - t0
                if device.type == "cuda":
                    plan.peak_extra = max(plan.peak_extra, torch.cuda.max_memory_allocated(device) - before)
                del out
            except Exception as e:  # report and keep benchmarking the others
                plan.error = f"{type(e).__name__} at key {key}: {e}"
        del inputs
        if progress and (ki + 1) % 50 == 0:
            print(f"  {ki + 1}/{len(shapes)} keys, {time.perf_counter() - t_start:.1f}s", file=sys.stderr)
    for plan in plans:
        plan.floor = floor_per_input * plan.n_inputs
    return floor_per_input


def report(plans: List[Plan], shapes, device, dtype, markdown: bool) -> str:
    n_params = sum(math.prod(s) for _, s in shapes)
    head = (f"{len(shapes)} keys, {n_params:,} parameters per model, inputs {str(dtype).replace('torch.', '')}, "
            f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = []
    for p in sorted(plans, key=lambda p: p.name):
        if p.error:
            rows.append((p.name, str(p.n_models), "yes" if p.has_base else "no", "-", "-", "-", "-", p.error))
            continue
        ratio = p.total / p.floor if p.floor > 0 else float("inf")
        gbps = n_params * p.n_inputs * dtype.itemsize / p.total / 1e9 if p.total > 0 else float("inf")
        peak = f"{p.peak_extra / 2**20:.0f}" if device.type == "cuda" else "-"
        rows.append((p.name, str(p.n_models), "yes" if p.has_base else "no", f"{p.total:.3f}",
                     f"{p.floor:.3f}", f"{ratio:.1f}", f"{gbps:.2f}", peak))
    cols = ("method", "models", "base", "time s", "read floor s", "ratio", "input GB/s", "peak extra MiB")
    if markdown:
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="", help="comma-separated method names (default: all registered)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", type=int, default=3, help="models for methods without a fixed count")
    ap.add_argument("--limit-keys", type=int, default=0, help="benchmark an evenly spaced subset of keys")
    ap.add_argument("--shapes", default="", help="JSON file of key -> shape (default: SD1.5 UNet)")
    ap.add_argument("--comfyui", default="", help="ComfyUI root to import the SD1.5 UNet shapes from")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="input dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="override a parameter (repeatable)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shapes = load_shapes(args.shapes) if args.shapes else sd15_unet_shapes(args.comfyui or None)
    shapes = limit_keys(shapes, args.limit_keys)

    names = [n.strip() for n in args.methods.split(",") if n.strip()] or mm.names()
    unknown = [n for n in names if n not in mm.names()]
    if unknown:
        ap.error(f"unknown method(s): {', '.join(unknown)}; known: {', '.join(mm.names())}")
    overrides: Dict[str, Dict[str, str]] = {}
    for item in args.param:
        lhs, _, value = item.partition("=")
        method, _, pname = lhs.partition(".")
        if not value or not pname:
            ap.error(f"--param wants METHOD.NAME=VALUE, got {item!r}")
        overrides.setdefault(method, {})[pname] = value
    plans = []
    for n in names:
        try:
            plans.append(Plan(n, args.models, overrides.get(n, {})))
        except mm.MergeError as e:
            ap.error(str(e))

    print(f"benchmarking {len(plans)} method(s) over {len(shapes)} keys on {device}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        floor = run(shapes, plans, device, dtype, args.seed)
    print(report(plans, shapes, device, dtype, args.markdown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": str(device), "dtype": args.dtype, "keys": len(shapes),
                       "parameters": sum(math.prod(s) for _, s in shapes), "read_floor_per_input_s": floor,
                       "methods": [{"name": p.name, "models": p.n_models, "base": p.has_base,
                                    "params": p.method.to_dict()["params"], "time_s": p.total,
                                    "read_floor_s": p.floor, "ratio": (p.total / p.floor) if p.floor else None,
                                    "peak_extra_bytes": p.peak_extra, "error": p.error} for p in plans]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

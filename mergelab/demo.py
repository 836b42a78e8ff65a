"""The main job in one command (``make demo``): merge two checkpoints with DARE-TIES, then extract the
merge as a LoRA, with the shipped example workflows run through the headless runner.

    python -m mergelab.demo                                   # on generated SD1.5 checkpoints
    python -m mergelab.demo --models DIR --a A.safetensors --b B.safetensors [--base BASE.safetensors]
    python -m mergelab.demo --small                           # the same on smaller SD1.5 checkpoints

1. ``example_workflows/01_dare_ties_merge.json``: Base model + Model A + Model B → DARE-TIES (UNet and
   text encoder) → a merged checkpoint (output/checkpoints/MergeLab_demo_dare_ties_00001_.safetensors).
2. ``example_workflows/07_extract_difference_lora.json`` on (merged, base) → a LoRA
   (output/loras/MergeLab_demo_extracted_00001_.safetensors).

Both run through :func:`mergelab.run.execute_workflow` (what ``python -m mergelab.run`` does) with
``--set`` overrides for the model names.  Without ``--models``, three SD1.5-architecture checkpoints
are generated once (``mergelab.fixtures``: a random base and two "fine-tunes" = base + small noise, cached
in ``.cache/fixtures``); ``--small`` uses thinner ones (same loader and code path, about 5× less work:
a 2-level UNet at SD1.5's width, the real CLIP-L and a TAESD VAE).  With ``--models`` and no ``--base``,
Model A is the base (B's differences are merged into A).  On a machine without a GPU the weights are held
in fp16 (ComfyUI's ``--fp16-unet --fp16-text-enc``; the math is fp32), as a GPU would hold them, which
halves the memory (about 9 GB at the peak for three full-size SD1.5 checkpoints).
Outputs go to ``output/demo`` by default;
existing files are never overwritten (the savers add a counter).  At the end a short report: the
methods, the per-block change, the files with their sizes and the total time.
"""
from __future__ import annotations

import argparse
import collections
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import CACHE_DIR, REPO_ROOT

EXAMPLES = os.path.join(REPO_ROOT, "example_workflows")
MERGE_EXAMPLE = os.path.join(EXAMPLES, "01_dare_ties_merge.json")
EXTRACT_EXAMPLE = os.path.join(EXAMPLES, "07_extract_difference_lora.json")
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "output", "demo")
FIXTURE_DIR = os.path.join(CACHE_DIR, "fixtures")
DELTA_SCALE = 0.002            # the "fine-tunes": base + DELTA_SCALE * N(0, 1) per weight
SMALL_FORMAT = 1


class DemoError(RuntimeError):
    pass


@dataclass
class DemoResult:
    merged: str = ""                       # the merged checkpoint
    lora: str = ""                         # the extracted LoRA
    files: List[Tuple[str, int]] = field(default_factory=list)     # (path, bytes) of every file written
    methods: List[str] = field(default_factory=list)
    merge_report: str = ""                 # the Model Merger's report (text)
    extract_report: str = ""
    block_summary: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------
# input checkpoints
# -------------------------------------------------------------------------------------------------
def fixture_checkpoints(small: bool = False) -> Dict[str, str]:
    """Paths of the generated base / A / B checkpoints (made once, then reused from the cache)."""
    from . import fixtures
    if not small:
        return {"base": fixtures.full_sd15_checkpoint(),
                "a": fixtures.tuned_sd15_checkpoint(delta_seed=1, delta_scale=DELTA_SCALE),
                "b": fixtures.tuned_sd15_checkpoint(delta_seed=2, delta_scale=DELTA_SCALE)}
    return {"base": small_sd15_checkpoint(),
            "a": small_sd15_checkpoint(delta_seed=1),
            "b": small_sd15_checkpoint(delta_seed=2)}


#: a thinner SD1.5 UNet: SD1.5's width (model_channels 320) and context (768), so ComfyUI's detection
#: still says SD15, but two levels instead of four and one res block per level
SMALL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "adm_in_channels": None, "in_channels": 4, "use_temporal_attention": False,
              "use_temporal_resblock": False, "model_channels": 320, "num_res_blocks": [1, 1],
              "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
              "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
              "transformer_depth_output": [1, 1, 1, 1]}


def small_sd15_layout() -> "collections.OrderedDict[str, Tuple[Tuple[int, ...], Any]]":
    """On-disk keys, shapes and dtypes (fp16) of the small SD1.5 checkpoint, built on the meta device
    from ComfyUI's own classes: the SD15 config with :data:`SMALL_UNET`, CLIP-L and a TAESD VAE, passed
    through ``state_dict_for_saving`` as ComfyUI's checkpoint saver does."""
    from . import fixtures
    torch = fixtures._comfy()
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    meta = torch.device("meta")
    cfg = comfy.supported_models.SD15(dict(SMALL_UNET))
    cfg.set_inference_dtype(torch.float16, None)
    with torch.no_grad():
        unet = cfg.get_model({}, device=meta)
        unet.diffusion_model.to(meta)
        with meta:
            vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    clip = comfy.sd1_clip.SD1ClipModel(device=meta, dtype=torch.float16)
    sd = unet.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    out = collections.OrderedDict()
    for k, v in sd.items():
        if torch.is_tensor(v):
            out[k] = (tuple(v.shape), torch.float16 if v.is_floating_point() else v.dtype)
    return out


def small_sd15_checkpoint(seed: int = 0, delta_seed: Optional[int] = None, delta_scale: float = DELTA_SCALE,
                          path: Optional[str] = None) -> str:
    """A small SD1.5 checkpoint (~0.5 GB) that CheckpointLoaderSimple loads as SD15; weights from
    ``fixtures.fill_value`` (deterministic per key); cached and reused."""
    from . import fixtures
    name = f"sd15_small_s{seed}" + (f"_d{delta_seed}x{delta_scale:g}" if delta_seed is not None else "")
    path = path or os.path.join(FIXTURE_DIR, f"{name}_v{SMALL_FORMAT}.safetensors")
    stamp = {"mergelab_fixture": "sd15_small", "format_version": str(SMALL_FORMAT), "seed": str(seed),
             "delta_seed": "" if delta_seed is None else str(delta_seed),
             "delta_scale": "" if delta_seed is None else repr(float(delta_scale))}
    meta = fixtures.read_safetensors_metadata(path)
    if meta is not None and all(meta.get(k) == v for k, v in stamp.items()):
        return path
    torch = fixtures._comfy()

    def value(key, shape, dt):
        if not dt.is_floating_point:
            return torch.arange(math.prod(shape), dtype=dt).reshape(shape)
        return fixtures.fill_value(key, shape, seed, delta_seed, delta_scale if delta_seed is not None else 0.0
                                   ).to(dt)

    fixtures.write_safetensors_streaming(path, small_sd15_layout(), value, metadata=dict(stamp, format="pt"))
    return path


# -------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------
def _title_ids(prompt: Dict[str, Any], title: str) -> List[str]:
    return [nid for nid, n in prompt.items() if (n.get("_meta") or {}).get("title") == title]


def _text_of(run, nid: str) -> str:
    ui = (run.outputs or {}).get(nid) or {}
    return "\n".join(str(t) for t in ui.get("text") or [])


def methods_used(prompt: Dict[str, Any]) -> List[str]:
    """One line per merge method node and per model fed to a merger, from the API prompt that ran."""
    lines = []
    for nid, n in prompt.items():
        ct = n["class_type"]
        if ct.startswith("MergeLab_Method_"):
            params = {k: v for k, v in n["inputs"].items() if not isinstance(v, list)}
            lines.append(f"{ct[len('MergeLab_Method_'):]} ({', '.join(f'{k}={v}' for k, v in params.items())})")
    for nid, n in prompt.items():
        if n["class_type"] == "MergeLab_MergeInput":
            title = (n.get("_meta") or {}).get("title") or f"Merge Input #{nid}"
            p = n["inputs"]
            lines.append(f"  {title}: weight {p.get('weight')}, density {p.get('density')}")
    for nid, n in prompt.items():
        if n["class_type"] == "MergeLab_ExtractLoRA":
            p = n["inputs"]
            lines.append(f"LoRA extraction: rank {p.get('rank')} ({p.get('rank_mode')}), {p.get('svd')} SVD")
    return lines


def block_summary(report: str, top: int = 5) -> List[str]:
    """A few lines from a merger report: how many blocks, the mean change vs the base, the most and the
    least changed blocks."""
    rows = []
    header: List[str] = []
    for line in report.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 3:
            continue
        if cells[0] == "block":
            header = cells
            continue
        if header and len(cells) == len(header):
            rows.append(dict(zip(header, cells)))
    col = "Δ vs base" if "Δ vs base" in header else next((h for h in header if h.startswith("Δ vs")), None)
    if not rows or col is None:
        return ["(no per-block report)"]
    vals = []
    for r in rows:
        try:
            vals.append((float(r[col]), r["block"], int(r.get("keys", "0") or 0)))
        except ValueError:
            continue
    if not vals:
        return ["(no per-block report)"]
    mean = sum(v for v, _, _ in vals) / len(vals)
    ranked = sorted(vals, reverse=True)
    fmt = lambda items: ", ".join(f"{b} {v:.4f}" for v, b, _ in items)  # noqa: E731
    return [f"{len(vals)} blocks, {sum(k for _, _, k in vals)} keys; relative change ({col}): mean {mean:.4f}, "
            f"range {ranked[-1][0]:.4f}..{ranked[0][0]:.4f}",
            f"most changed:  {fmt(ranked[:top])}",
            f"least changed: {fmt(ranked[-top:][::-1])}"]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def format_report(res: DemoResult, total: float) -> str:
    out = ["", "=" * 72, "MergeLab demo", "=" * 72, "Methods:"]
    out += [f"  {m}" for m in res.methods]
    out += ["Per-block change of the merged UNet (from the Model Merger's report):"]
    out += [f"  {line}" for line in res.block_summary]
    out += ["Files written:"]
    out += [f"  {p}  ({_size(n)})" for p, n in res.files]
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
    out += [f"Total time: {total:.1f} s ({steps})", "=" * 72]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------
# the demo
# -------------------------------------------------------------------------------------------------
def run_demo(harness, names: Dict[str, str], quiet: bool = False, out=sys.stdout,
             prefix: str = "MergeLab_demo") -> DemoResult:
    """Run the two example workflows in ``harness`` on the checkpoints ``names`` (``base``, ``a``,
    ``b``: names in the harness's checkpoints folder).  Raises DemoError when a step fails."""
    import folder_paths

    res = DemoResult()
    # 1. the DARE-TIES merge
    print(f"[demo] 1/2 DARE-TIES merge: base {names['base']}, A {names['a']}, B {names['b']}", file=out, flush=True)
    run = _run(MERGE_EXAMPLE, [f"Base model.ckpt_name={names['base']}",
                               f"Model A.ckpt_name={names['a']}",
                               f"Model B.ckpt_name={names['b']}",
                               f"MergeLab_SaveCheckpoint.filename_prefix=checkpoints/{prefix}_dare_ties"],
               harness, quiet, out)
    if run.code != 0:
        raise DemoError(f"the merge workflow failed: {run.error}")
    res.seconds["merge"] = run.seconds
    ckpts = [p for p in run.written if p.endswith(".safetensors")]
    if len(ckpts) != 1:
        raise DemoError(f"the merge workflow should write one checkpoint, wrote {ckpts}")
    res.merged = ckpts[0]
    res.files += [(p, os.path.getsize(p)) for p in run.written]
    res.methods += methods_used(run.prompt)
    rid = _title_ids(run.prompt, "Merge report")
    res.merge_report = _text_of(run, rid[0]) if rid else ""
    res.block_summary = block_summary(res.merge_report)

    # 2. the difference LoRA of (merged, base); the loader finds the merged file where it was written
    # (that folder is searched after the models folder, for this step only; nothing is linked or copied)
    merged_dir = os.path.dirname(res.merged)
    added = merged_dir not in folder_paths.get_folder_paths("checkpoints")
    if added:
        folder_paths.add_model_folder_path("checkpoints", merged_dir)
    _clear_file_lists(folder_paths)
    merged_name = os.path.basename(res.merged)
    print(f"[demo] 2/2 difference LoRA: {merged_name} - {names['base']}", file=out, flush=True)
    try:
        run = _run(EXTRACT_EXAMPLE, [f"Tuned model.ckpt_name={merged_name}",
                                     f"Base model.ckpt_name={names['base']}",
                                     f"MergeLab_SaveLoRA.filename_prefix=loras/{prefix}_extracted"],
                   harness, quiet, out)
    finally:
        if added:
            folder_paths.folder_names_and_paths["checkpoints"][0].remove(merged_dir)
        _clear_file_lists(folder_paths)
    if run.code != 0:
        raise DemoError(f"the LoRA extraction workflow failed: {run.error}")
    res.seconds["extract"] = run.seconds
    loras = [p for p in run.written if p.endswith(".safetensors")]
    if len(loras) != 1:
        raise DemoError(f"the extraction workflow should write one LoRA, wrote {loras}")
    res.lora = loras[0]
    res.files += [(p, os.path.getsize(p)) for p in run.written]
    res.methods += methods_used(run.prompt)
    rid = _title_ids(run.prompt, "Extraction report")
    res.extract_report = _text_of(run, rid[0]) if rid else ""
    return res


def _run(workflow: str, overrides: List[str], harness, quiet: bool, out):
    """The headless runner on one example; of what it prints, the demo shows the time and the files
    written (the full report texts are summarised at the end)."""
    from .run import execute_workflow

    buf = io.StringIO()
    run = execute_workflow(workflow, overrides, harness, quiet=quiet, out=buf)
    for line in buf.getvalue().splitlines():
        if line.startswith(("done in ", "wrote ")):
            print(f"[run] {line}", file=out, flush=True)
    return run


def _clear_file_lists(folder_paths) -> None:
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mergelab.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="your models folder (with checkpoints/); default: generated SD1.5 checkpoints")
    p.add_argument("--a", help="Model A: a checkpoint name in MODELS/checkpoints (with --models)")
    p.add_argument("--b", help="Model B: a checkpoint name in MODELS/checkpoints (with --models)")
    p.add_argument("--base", help="the base A and B were fine-tuned from (with --models; default: A)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="output folder (default: output/demo)")
    p.add_argument("--small", action="store_true", help="generated checkpoints: smaller SD1.5 ones (faster)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.models:
        if not (args.a and args.b):
            print("error: with --models give the two checkpoints to merge: --a NAME --b NAME", file=sys.stderr)
            return 2
        for n in filter(None, (args.a, args.b, args.base)):
            if not os.path.isfile(os.path.join(args.models, "checkpoints", n)):
                print(f"error: {n} is not in {os.path.join(args.models, 'checkpoints')}", file=sys.stderr)
                return 2
    elif args.a or args.b or args.base:
        print("error: --a/--b/--base name checkpoints of --models DIR", file=sys.stderr)
        return 2
    t0 = time.time()
    from .comfy_env import ComfyUINotFound
    from .harness import Harness
    from .run import has_accelerator

    cpu = args.cpu or not has_accelerator()
    # on the CPU ComfyUI would hold the weights in fp32 (2× the memory of fp16 files: ~17 GB at the peak for
    # three SD1.5 checkpoints); fp16 storage, as on a GPU, suffices: the merge math runs in fp32 anyway
    extra = ["--cpu", "--fp16-unet", "--fp16-text-enc"] if cpu else ["--gpu"]
    try:
        harness = Harness(extra_args=extra, models_dir=args.models,
                          output_dir=os.path.abspath(args.output))
    except ComfyUINotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.models:
            names = {"base": args.base or args.a, "a": args.a, "b": args.b}
            gen = 0.0
        else:
            print(f"[demo] preparing {'small ' if args.small else ''}SD1.5 checkpoints (generated once, then "
                  f"reused from {FIXTURE_DIR})", flush=True)
            tg = time.time()
            paths = fixture_checkpoints(small=args.small)
            gen = time.time() - tg
            names = {k: harness.add_model_file("checkpoints", p) for k, p in paths.items()}
        try:
            res = run_demo(harness, names, quiet=args.quiet)
        except DemoError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if gen:
            res.seconds = {"checkpoints": gen, **res.seconds}
        print(format_report(res, time.time() - t0))
        return 0
    finally:
        harness.close()


if __name__ == "__main__":
    sys.exit(main())

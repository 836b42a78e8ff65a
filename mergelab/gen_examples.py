"""Generate ``example_workflows/``: editor-format workflows (what the ComfyUI editor saves) and thumbnails.

    python -m mergelab.gen_examples            # (re)write example_workflows/*.json and *.jpg
    python -m mergelab.gen_examples --check    # exit 1 when a committed JSON differs from a fresh build

Each example is a compact description (:data:`EXAMPLES`): nodes with a key, a type, the widget values
that differ from the defaults and the links into their inputs (``"key.OUTPUT_NAME"``).  The editor
JSON is built from the LIVE node definitions of a booted ComfyUI with the pack loaded (``INPUT_TYPES``
gives the widget order, defaults, ranges and combo options; ``RETURN_TYPES``/``RETURN_NAMES`` the
outputs), so the examples stay valid when nodes change: an unknown widget, an out-of-range value, a
combo value that is not an option or a link between mismatched types stops the build.

Layout: nodes go in left-to-right columns (the description's ``col``, else their depth in the graph),
in description order within a column; a note with the example's explanation sits above.  The
thumbnail (``<name>.jpg``, 400×300, shown by ComfyUI's templates dialog next to the workflow) is a
PIL drawing of the same layout: boxes, titles and links coloured by type.

Model file names are placeholders (``base_model.safetensors``, ...): :data:`MODEL_FILES` lists what each
example expects in which models folder; ``python -m mergelab.run WORKFLOW --set "Model A.ckpt_name=..."``
replaces them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import REPO_ROOT
from .workflow import _has_control_widget, _input_spec, _is_widget

EXAMPLES_DIR = os.path.join(REPO_ROOT, "example_workflows")
FRONTEND_VERSION = "1.32.9"
THUMB_SIZE = (400, 300)

# layout constants (LiteGraph's: 20 px per slot row, ~24 px per widget row, a 30 px title bar above pos)
SLOT_H, WIDGET_H, TITLE_H = 20, 24, 30
COL_GAP, ROW_GAP, MARGIN = 90, 60, 50
NODE_W = 320
FILE_INPUTS = {"ckpt_name", "lora_name", "vae_name", "unet_name", "clip_name", "file"}
NUID = uuid.UUID("5b0c3f0e-8f3e-4c55-9a4e-6d6572676c61")   # namespace of the workflows' ids


# -------------------------------------------------------------------------------------------------
# description
# -------------------------------------------------------------------------------------------------
@dataclass
class N:
    """One node: ``key`` (local name), ComfyUI ``type``, widget values that differ from the defaults,
    ``links`` {input name: "key.OUTPUT" | "key" (first output) | ("key", slot)} and an optional title."""

    key: str
    type: str
    widgets: Dict[str, Any] = field(default_factory=dict)
    links: Dict[str, Union[str, Tuple[str, int]]] = field(default_factory=dict)
    title: Optional[str] = None
    color: Optional[Tuple[str, str]] = None    # (title colour, body colour)
    size: Optional[Tuple[int, int]] = None
    col: Optional[int] = None                  # layout column (default: from the graph)


@dataclass
class Example:
    name: str          # file name without .json (the templates dialog shows it)
    title: str         # short title (thumbnail banner, note heading)
    note: str          # markdown shown in a note above the graph
    nodes: List[N]
    groups: List[Tuple[str, List[str]]] = field(default_factory=list)   # (title, node keys)


LOADER = ("#223", "#335")
SAVE = ("#232", "#353")
METHOD = ("#323", "#535")


def _ckpt(key: str, name: str, title: str) -> N:
    return N(key, "CheckpointLoaderSimple", {"ckpt_name": name}, title=title, color=LOADER, col=0)


def _save_ckpt(prefix: str, links: Dict[str, str], col: int) -> N:
    return N("save", "MergeLab_SaveCheckpoint", {"filename_prefix": prefix, "dtype": "fp16"}, links, color=SAVE,
             col=col)


def _report(key: str, src: str, title: str = "Merge report", col: Optional[int] = None) -> N:
    return N(key, "PreviewAny", links={"source": src}, title=title, size=(420, 300), col=col)


def _chart(key: str, src: str, title: str = "Per-block change", col: Optional[int] = None) -> N:
    return N(key, "PreviewImage", links={"images": src}, title=title, size=(420, 330), col=col)


EXAMPLES: List[Example] = [
    Example(
        "01_dare_ties_merge",
        "DARE-TIES merge of two checkpoints",
        "## DARE-TIES merge of two fine-tunes, saved as a checkpoint\n\n"
        "Model A and Model B are fine-tunes of the **Base model** (same architecture). Each Merge Input "
        "gives one model with its own parameters: *density* is the fraction of its changes that DARE keeps "
        "(the rest are dropped at random and the kept ones rescaled), *weight* its share. TIES then elects "
        "a sign per weight and adds the changes that agree with it to the base.\n\n"
        "The UNet and the text encoder are merged with the same method; the VAE is the base's. "
        "**Merge report** lists, per block, how far the result moved from the base and from each input.\n\n"
        "Headless: `python -m mergelab.run example_workflows/01_dare_ties_merge.json "
        "--set \"Model A.ckpt_name=a.safetensors\" --set \"Model B.ckpt_name=b.safetensors\" "
        "--set \"Base model.ckpt_name=base.safetensors\"`",
        [
            _ckpt("base", "base_model.safetensors", "Base model"),
            _ckpt("a", "finetune_a.safetensors", "Model A"),
            _ckpt("b", "finetune_b.safetensors", "Model B"),
            N("in_a", "MergeLab_MergeInput", {"weight": 1.0, "density": 0.5}, {"model": "a.MODEL", "clip": "a.CLIP"},
              title="Merge Input A", col=1),
            N("in_b", "MergeLab_MergeInput", {"weight": 1.0, "density": 0.5},
              {"model": "b.MODEL", "clip": "b.CLIP", "models": "in_a.models"}, title="Merge Input B", col=1),
            N("method", "MergeLab_Method_dare_ties", {"normalize": True}, color=METHOD, col=1),
            N("merge", "MergeLab_ModelMerger", {"seed": 42},
              {"base": "base.MODEL", "method": "method.method", "models": "in_b.models"}, col=2),
            N("clip_merge", "MergeLab_CLIPMerger", {"seed": 42},
              {"base": "base.CLIP", "method": "method.method", "models": "in_b.models"}, col=2),
            _save_ckpt("checkpoints/MergeLab_dare_ties",
                       {"model": "merge.MODEL", "clip": "clip_merge.CLIP", "vae": "base.VAE"}, col=3),
            _report("report", "merge.report", col=3),
            _chart("chart", "merge.report_image", col=3),
        ],
        groups=[("Models", ["base", "a", "b"]), ("Merge", ["in_a", "in_b", "method", "merge", "clip_merge"])],
    ),
    Example(
        "02_ties_sdxl_block_weights",
        "TIES of three SDXL models, block weights",
        "## TIES merge of three SDXL fine-tunes with block weights\n\n"
        "TIES keeps each model's largest changes (*density* 0.3 = the top 30% by magnitude), elects a sign "
        "per weight and averages the changes that agree with it.\n\n"
        "**Block Weights (SDXL)** scales TIES' *lambda* (how much of the merged change is added to the base) "
        "per UNet block: here the time embedding and the input blocks stay close to the base (composition), "
        "the output blocks take the merged change fully (style). Drag the curve, or pick a preset from the "
        "node's menu.",
        [
            _ckpt("base", "sdxl_base.safetensors", "SDXL base"),
            _ckpt("a", "sdxl_finetune_a.safetensors", "SDXL model A"),
            _ckpt("b", "sdxl_finetune_b.safetensors", "SDXL model B"),
            _ckpt("c", "sdxl_finetune_c.safetensors", "SDXL model C"),
            N("in_a", "MergeLab_MergeInput", {"density": 0.3}, {"model": "a.MODEL", "clip": "a.CLIP"},
              title="Merge Input A", col=1),
            N("in_b", "MergeLab_MergeInput", {"density": 0.3},
              {"model": "b.MODEL", "clip": "b.CLIP", "models": "in_a.models"}, title="Merge Input B", col=1),
            N("in_c", "MergeLab_MergeInput", {"density": 0.3},
              {"model": "c.MODEL", "clip": "c.CLIP", "models": "in_b.models"}, title="Merge Input C", col=1),
            N("method", "MergeLab_Method_ties", {"normalize": True}, color=METHOD, col=1),
            N("blocks", "MergeLab_BlockWeights_SDXL",
              dict({"param": "lambda", "time_embed.": 0.2, "label_emb.": 0.2, "out.": 1.0},
                   **{f"input_blocks.{i}.": round(0.2 + 0.05 * i, 2) for i in range(9)},
                   **{f"middle_block.{i}.": 0.7 for i in range(3)},
                   **{f"output_blocks.{i}.": 1.0 for i in range(9)}),
              title="Block Weights (SDXL)", col=2),
            N("merge", "MergeLab_ModelMerger", {},
              {"base": "base.MODEL", "method": "method.method", "models": "in_c.models",
               "block_weights": "blocks.block_weights"}, col=3),
            N("clip_merge", "MergeLab_CLIPMerger", {},
              {"base": "base.CLIP", "method": "method.method", "models": "in_c.models"}, col=3),
            _save_ckpt("checkpoints/MergeLab_ties_sdxl",
                       {"model": "merge.MODEL", "clip": "clip_merge.CLIP", "vae": "base.VAE"}, col=4),
            _report("report", "merge.report", col=4),
        ],
        groups=[("Models", ["base", "a", "b", "c"])],
    ),
    Example(
        "03_masked_merge",
        "Masked merge: magnitude masks",
        "## Masked merge with magnitude masks and set operations\n\n"
        "**Mask B** selects, in every tensor, the 20% of weights where Model B differs most from the base; "
        "**Mask A** the same for Model A. **Mask Operations** (difference) keeps B's large changes where A "
        "did not change much, so the two fine-tunes do not fight over the same weights.\n\n"
        "**Masked Model Merger** copies B into the selected weights of A (ratio 0 = B) and keeps A "
        "everywhere else. **Mask Report** shows the fraction selected per block.",
        [
            _ckpt("base", "base_model.safetensors", "Base model"),
            _ckpt("a", "finetune_a.safetensors", "Model A"),
            _ckpt("b", "finetune_b.safetensors", "Model B"),
            N("mask_b", "MergeLab_MagnitudeMasker", {"quantile": 0.8, "select": "above"},
              {"model_a": "b.MODEL", "model_b": "base.MODEL"}, title="Mask B: |B - base| top 20%", col=1),
            N("mask_a", "MergeLab_MagnitudeMasker", {"quantile": 0.8, "select": "above"},
              {"model_a": "a.MODEL", "model_b": "base.MODEL"}, title="Mask A: |A - base| top 20%", col=1),
            N("ops", "MergeLab_MaskOperations", {"operation": "difference"},
              {"mask_a": "mask_b.mask", "mask_b": "mask_a.mask"}, title="Mask B minus Mask A", col=2),
            N("mask_report", "MergeLab_MaskReport", {}, {"mask": "ops.mask"}, col=3),
            N("merge", "MergeLab_MaskedModelMerger", {"ratio": 0.0},
              {"model_a": "a.MODEL", "model_b": "b.MODEL", "mask": "ops.mask"}, col=3),
            _save_ckpt("checkpoints/MergeLab_masked",
                       {"model": "merge.MODEL", "clip": "a.CLIP", "vae": "a.VAE"}, col=4),
            _chart("chart", "mask_report.chart", title="Selected per block", col=4),
        ],
        groups=[("Masks", ["mask_b", "mask_a", "ops"])],
    ),
    Example(
        "04_normalize_then_merge",
        "Normalize, then merge",
        "## Normalize a model, then merge\n\n"
        "Fine-tunes can drift apart in the scale of their attention queries and keys without changing what "
        "they compute. **Normalize Model** (attn_only) rescales Model B's queries by s and keys by 1/s so "
        "that their norms match Model A's: B's outputs are unchanged, but averaging A and B no longer mixes "
        "mismatched scales. Its report lists the factor applied per attention.\n\n"
        "Then a plain linear average (weights 0.5 / 0.5) of A and the normalized B; the text encoders are "
        "averaged with the same method.",
        [
            _ckpt("a", "finetune_a.safetensors", "Model A"),
            _ckpt("b", "finetune_b.safetensors", "Model B"),
            N("norm", "MergeLab_NormalizeModel", {"mode": "attn_only"}, {"model_a": "b.MODEL", "model_b": "a.MODEL"},
              title="Normalize B to A", col=1),
            N("in_a", "MergeLab_MergeInput", {"weight": 0.5}, {"model": "a.MODEL", "clip": "a.CLIP"},
              title="Merge Input A", col=2),
            N("in_b", "MergeLab_MergeInput", {"weight": 0.5},
              {"model": "norm.MODEL", "clip": "b.CLIP", "models": "in_a.models"}, title="Merge Input B (normalized)",
              col=2),
            N("method", "MergeLab_Method_linear", {"normalize": True}, color=METHOD, col=2),
            N("merge", "MergeLab_ModelMerger", {}, {"method": "method.method", "models": "in_b.models"}, col=3),
            N("clip_merge", "MergeLab_CLIPMerger", {}, {"method": "method.method", "models": "in_b.models"}, col=3),
            _save_ckpt("checkpoints/MergeLab_normalized_linear",
                       {"model": "merge.MODEL", "clip": "clip_merge.CLIP", "vae": "a.VAE"}, col=4),
            _report("norm_report", "norm.report", title="Normalize report", col=2),
            _report("report", "merge.report", col=4),
        ],
    ),
    Example(
        "05_slerp_and_model_stock",
        "Model Stock, then SLERP",
        "## Model Stock, then SLERP\n\n"
        "**Model Stock** merges Model A and Model B around the base: from the angle between their changes it "
        "computes how far to move from the base toward their average (no parameters to tune).\n\n"
        "**SLERP** then interpolates spherically from that result (t = 0) toward Model A (t = 1); t = 0.3 "
        "keeps 70% of the Model Stock merge. The text encoders get the Model Stock merge.",
        [
            _ckpt("base", "base_model.safetensors", "Base model"),
            _ckpt("a", "finetune_a.safetensors", "Model A"),
            _ckpt("b", "finetune_b.safetensors", "Model B"),
            N("in_a", "MergeLab_MergeInput", {}, {"model": "a.MODEL", "clip": "a.CLIP"}, title="Merge Input A", col=1),
            N("in_b", "MergeLab_MergeInput", {}, {"model": "b.MODEL", "clip": "b.CLIP", "models": "in_a.models"},
              title="Merge Input B", col=1),
            N("stock", "MergeLab_Method_model_stock", {}, color=METHOD, col=1),
            N("merge", "MergeLab_ModelMerger", {}, {"base": "base.MODEL", "method": "stock.method",
                                                    "models": "in_b.models"}, title="Model Stock merge", col=2),
            N("clip_merge", "MergeLab_CLIPMerger", {}, {"base": "base.CLIP", "method": "stock.method",
                                                        "models": "in_b.models"}, col=2),
            N("in_s", "MergeLab_MergeInput", {}, {"model": "a.MODEL"}, title="Merge Input A (SLERP target)", col=2),
            N("slerp", "MergeLab_Method_slerp", {"t": 0.3}, color=METHOD, col=2),
            N("merge2", "MergeLab_ModelMerger", {}, {"base": "merge.MODEL", "method": "slerp.method",
                                                     "models": "in_s.models"}, title="SLERP merge", col=3),
            _save_ckpt("checkpoints/MergeLab_stock_slerp",
                       {"model": "merge2.MODEL", "clip": "clip_merge.CLIP", "vae": "base.VAE"}, col=4),
            _report("report", "merge2.report", title="SLERP report", col=4),
        ],
    ),
    Example(
        "06_merge_two_loras",
        "Merge two LoRAs",
        "## Merge two LoRAs into one and save it\n\n"
        "**Load LoRA (as LORA)** reads each file through ComfyUI's key maps for the checkpoint's model and "
        "text encoder. **Merge LoRAs** runs the merge method (TIES here: each LoRA keeps its top 50% changes "
        "by magnitude, signs are elected) on every layer's full difference and factorizes the result back "
        "to rank 32. **Save LoRA** writes kohya-style keys that ComfyUI, A1111/Forge and kohya tools load.",
        [
            _ckpt("ckpt", "base_model.safetensors", "Base model"),
            N("la", "MergeLab_LoadLoRA", {"lora_name": "lora_a.safetensors"}, {"model": "ckpt.MODEL",
                                                                               "clip": "ckpt.CLIP"},
              title="LoRA A", color=LOADER, col=1),
            N("lb", "MergeLab_LoadLoRA", {"lora_name": "lora_b.safetensors"}, {"model": "ckpt.MODEL",
                                                                               "clip": "ckpt.CLIP"},
              title="LoRA B", color=LOADER, col=1),
            N("in_a", "MergeLab_LoRAMergeInput", {"weight": 1.0, "density": 0.5}, {"lora": "la.LORA"},
              title="LoRA Merge Input A", col=2),
            N("in_b", "MergeLab_LoRAMergeInput", {"weight": 1.0, "density": 0.5},
              {"lora": "lb.LORA", "loras": "in_a.loras"}, title="LoRA Merge Input B", col=2),
            N("method", "MergeLab_Method_ties", {"normalize": True}, color=METHOD, col=2),
            N("merge", "MergeLab_MergeLoRAs", {"rank": 32}, {"method": "method.method", "loras": "in_b.loras"}, col=3),
            N("save", "MergeLab_SaveLoRA", {"filename_prefix": "loras/MergeLab_merged_lora"}, {"lora": "merge.LORA"},
              color=SAVE, col=4),
            _report("report", "merge.report", title="LoRA merge report", col=4),
        ],
    ),
    Example(
        "07_extract_difference_lora",
        "Extract a difference LoRA",
        "## Extract a difference LoRA (tuned or merged model minus base) and save it\n\n"
        "**Extract LoRA** factorizes every layer's difference *tuned − base* by a truncated SVD (rank 32; "
        "3×3 convolutions become LoCon layers), for the UNet and the text encoder. Applied to the base with "
        "strength 1, the LoRA gives back (approximately) the tuned model; the report lists each layer's rank "
        "and relative error.\n\n"
        "Use it on the checkpoint the DARE-TIES example saved to carry that merge around as a small file.",
        [
            _ckpt("tuned", "merged_model.safetensors", "Tuned model"),
            _ckpt("base", "base_model.safetensors", "Base model"),
            N("extract", "MergeLab_ExtractLoRA", {"rank": 32},
              {"tuned_model": "tuned.MODEL", "base_model": "base.MODEL", "tuned_clip": "tuned.CLIP",
               "base_clip": "base.CLIP"}, col=1),
            N("save", "MergeLab_SaveLoRA", {"filename_prefix": "loras/MergeLab_extracted"}, {"lora": "extract.LORA"},
              color=SAVE, col=2),
            _report("report", "extract.report", title="Extraction report", col=2),
        ],
    ),
    Example(
        "08_inpainting_model_from_a_finetune",
        "Inpainting version of a fine-tune (add difference)",
        "## An inpainting version of a fine-tune: inpainting model + (fine-tune − its base)\n\n"
        "**Add Difference** computes A + alpha·(B − C): A = the **Inpainting model** (SD 1.5 inpainting), B = the "
        "**Fine-tune**, C = the **Base model** B was trained from (SD 1.5). The result is a copy of A with B's "
        "training added: an inpainting model (its first layer takes 9 channels; the 4 latent channels are merged, "
        "the 5 mask / masked-image channels stay A's). The text encoders get the same recipe; the VAE is A's.\n\n"
        "The same works for an instruct-pix2pix A, and for FLUX.1 Fill + (a FLUX.1 dev fine-tune − FLUX.1 dev).",
        [
            _ckpt("a", "sd15_inpainting.safetensors", "Inpainting model"),
            _ckpt("b", "finetune.safetensors", "Fine-tune"),
            _ckpt("c", "base_model.safetensors", "Base model"),
            N("in_a", "MergeLab_MergeInput", {}, {"model": "a.MODEL", "clip": "a.CLIP"}, title="Merge Input A", col=1),
            N("in_b", "MergeLab_MergeInput", {}, {"model": "b.MODEL", "clip": "b.CLIP", "models": "in_a.models"},
              title="Merge Input B", col=1),
            N("method", "MergeLab_Method_add_difference", {"alpha": 1.0}, color=METHOD, col=1),
            N("merge", "MergeLab_ModelMerger", {}, {"base": "c.MODEL", "method": "method.method",
                                                    "models": "in_b.models"}, col=2),
            N("clip_merge", "MergeLab_CLIPMerger", {}, {"base": "c.CLIP", "method": "method.method",
                                                        "models": "in_b.models"}, col=2),
            _save_ckpt("checkpoints/MergeLab_inpainting",
                       {"model": "merge.MODEL", "clip": "clip_merge.CLIP", "vae": "a.VAE"}, col=3),
            _report("report", "merge.report", col=3),
        ],
    ),
]

#: what each example loads, by models folder: {example: {folder: [file names]}}
MODEL_FILES: Dict[str, Dict[str, List[str]]] = {}
for _ex in EXAMPLES:
    for _n in _ex.nodes:
        for _w, _folder in (("ckpt_name", "checkpoints"), ("lora_name", "loras")):
            if _w in _n.widgets:
                MODEL_FILES.setdefault(_ex.name, {}).setdefault(_folder, []).append(_n.widgets[_w])


class ExampleError(ValueError):
    pass


# -------------------------------------------------------------------------------------------------
# node definitions
# -------------------------------------------------------------------------------------------------
@dataclass
class NodeDef:
    type: str
    display: str
    sockets: List[Tuple[str, Any, bool]]           # (name, type, optional)
    widgets: List[Tuple[str, Any, dict]]           # (name, type, options), in widget order
    outputs: List[Tuple[str, str]]                 # (name, type)
    category: str = ""
    description: str = ""


def node_def(node_classes, display_names, typ: str) -> NodeDef:
    cls = node_classes.get(typ)
    if cls is None:
        raise ExampleError(f"unknown node type {typ!r}: is the pack (or ComfyUI) missing it?")
    info = cls.INPUT_TYPES()
    optional = set((info.get("optional") or {}).keys())
    sockets, widgets = [], []
    for name, t, opts in _input_spec(cls):
        if _is_widget(t, opts):
            widgets.append((name, t, opts))
        else:
            sockets.append((name, t, name in optional))
    rtypes = list(getattr(cls, "RETURN_TYPES", ()) or ())
    rnames = list(getattr(cls, "RETURN_NAMES", None) or rtypes)
    outputs = [(str(n), str(t)) for n, t in zip(rnames, rtypes)]
    display = display_names.get(typ) or getattr(cls, "DISPLAY_NAME", None) or typ
    return NodeDef(typ, display, sockets, widgets, outputs, str(getattr(cls, "CATEGORY", "") or ""),
                   str(getattr(cls, "DESCRIPTION", "") or ""))


def _combo_options(t, opts) -> Optional[list]:
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return list(opts.get("options") or [])
    return None


def widget_values(nd: NodeDef, given: Dict[str, Any], where: str) -> List[Any]:
    """The node's widgets_values: given values, else defaults, in widget order (with the frontend's
    'control after generate' value where the widget has one)."""
    names = [w[0] for w in nd.widgets]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ExampleError(f"{where}: {nd.type} has no widget {unknown}; its widgets: {names}")
    out = []
    for name, t, opts in nd.widgets:
        combo = _combo_options(t, opts)
        if name in given:
            v = given[name]
        elif "default" in opts:
            v = opts["default"]
        elif combo:
            v = combo[0]
        else:
            raise ExampleError(f"{where}: widget {name!r} of {nd.type} has no default; give a value")
        if combo is not None:
            if name not in FILE_INPUTS and v not in combo:
                raise ExampleError(f"{where}: {v!r} is not an option of {nd.type}.{name}: {combo}")
        elif t in ("INT", "FLOAT"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ExampleError(f"{where}: {nd.type}.{name} must be a number, got {v!r}")
            lo, hi = opts.get("min"), opts.get("max")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ExampleError(f"{where}: {nd.type}.{name}={v} is outside [{lo}, {hi}]")
            if t == "INT" and int(v) != v:
                raise ExampleError(f"{where}: {nd.type}.{name} must be an integer, got {v!r}")
        elif t == "BOOLEAN" and not isinstance(v, bool):
            raise ExampleError(f"{where}: {nd.type}.{name} must be true or false, got {v!r}")
        elif t == "STRING" and not isinstance(v, str):
            raise ExampleError(f"{where}: {nd.type}.{name} must be text, got {v!r}")
        out.append(v)
        if _has_control_widget(name, t, opts):
            out.append("fixed")
    return out


def _types_match(out_type: str, in_type: Any) -> bool:
    if isinstance(in_type, list):
        return False
    if in_type == "*" or out_type == "*":
        return True
    a, b = set(str(out_type).split(",")), set(str(in_type).split(","))
    return bool(a & b)


def node_size(nd: NodeDef, n: N) -> Tuple[int, int]:
    if n.size:
        return tuple(n.size)
    rows = max(len(nd.sockets), len(nd.outputs))
    h = rows * SLOT_H + 14
    for name, t, opts in nd.widgets:
        h += 84 if (t == "STRING" and opts.get("multiline")) else WIDGET_H
    w = NODE_W
    # room for the pack's frontend widgets (js/mergelab.js): the method help text and the block curve
    if nd.category == "MergeLab/methods" and nd.description:
        w = 360
        lines = sum(max(1, -(-len(p) // 46)) for p in nd.description.split("\n"))
        h += 34 + 16 * lines
    elif nd.category == "MergeLab/block weights" and any("." in n for n, t, _ in nd.widgets if t == "FLOAT"):
        w = 420
        h += 170 + WIDGET_H
    return (w, max(h, 46))


# -------------------------------------------------------------------------------------------------
# building the editor JSON
# -------------------------------------------------------------------------------------------------
def k_is_loader(nd: NodeDef) -> bool:
    return nd.category.startswith("loaders") or nd.type.endswith("Loader") or nd.type.endswith("LoaderSimple")


def _parse_ref(ref, where) -> Tuple[str, Union[str, int]]:
    if isinstance(ref, tuple):
        return ref[0], int(ref[1])
    if "." in ref:
        k, o = ref.split(".", 1)
        return k, o
    return ref, 0


def build(example: Example, node_classes, display_names=None) -> dict:
    """The editor-format workflow of ``example`` (raises ExampleError when it does not fit the nodes)."""
    display_names = display_names or {}
    keys = [n.key for n in example.nodes]
    if len(set(keys)) != len(keys):
        raise ExampleError(f"{example.name}: duplicate node keys")
    defs = {n.key: node_def(node_classes, display_names, n.type) for n in example.nodes}
    ids = {n.key: i + 1 for i, n in enumerate(example.nodes)}
    titles = [n.title for n in example.nodes if n.title]
    if len(set(titles)) != len(titles):
        raise ExampleError(f"{example.name}: node titles must be unique (they are --set targets)")

    # links
    links = []          # (id, src key, src slot, dst key, dst slot, type)
    in_links: Dict[Tuple[str, str], int] = {}
    out_links: Dict[Tuple[str, int], List[int]] = {}
    preds: Dict[str, List[str]] = {n.key: [] for n in example.nodes}
    for n in example.nodes:
        nd = defs[n.key]
        socket_names = [s[0] for s in nd.sockets]
        for inp, ref in n.links.items():
            where = f"{example.name}/{n.key}.{inp}"
            if inp not in socket_names:
                raise ExampleError(f"{where}: {n.type} has no input socket {inp!r}; sockets: {socket_names}")
            src_key, out = _parse_ref(ref, where)
            if src_key not in defs:
                raise ExampleError(f"{where}: no node {src_key!r}")
            sd = defs[src_key]
            if isinstance(out, str):
                names = [o[0] for o in sd.outputs]
                if out not in names:
                    raise ExampleError(f"{where}: {sd.type} has no output {out!r}; outputs: {names}")
                slot = names.index(out)
            else:
                slot = out
            out_type = sd.outputs[slot][1]
            in_type = nd.sockets[socket_names.index(inp)][1]
            if not _types_match(out_type, in_type):
                raise ExampleError(f"{where}: cannot connect {out_type} to an input of type {in_type}")
            lid = len(links) + 1
            links.append((lid, src_key, slot, n.key, socket_names.index(inp), out_type))
            in_links[(n.key, inp)] = lid
            out_links.setdefault((src_key, slot), []).append(lid)
            preds[n.key].append(src_key)

    # topological order and columns (longest path from a source)
    order: List[str] = []
    depth: Dict[str, int] = {}
    visiting = set()

    def visit(k):
        if k in depth:
            return depth[k]
        if k in visiting:
            raise ExampleError(f"{example.name}: the graph has a cycle through {k}")
        visiting.add(k)
        depth[k] = 1 + max((visit(p) for p in preds[k]), default=-1)
        visiting.discard(k)
        order.append(k)
        return depth[k]

    for k in keys:
        visit(k)
    # sources (loaders aside) sit just left of their first consumer; then the description's overrides
    succs: Dict[str, List[str]] = {k: [m for m in keys if k in preds[m]] for k in keys}
    col_of = dict(depth)
    for k in keys:
        if not preds[k] and succs[k] and not k_is_loader(defs[k]):
            col_of[k] = min(depth[m] for m in succs[k]) - 1
    for n in example.nodes:
        if n.col is not None:
            col_of[n.key] = n.col
    sizes = {n.key: node_size(defs[n.key], n) for n in example.nodes}
    columns: Dict[int, List[str]] = {}
    for k in keys:
        columns.setdefault(col_of[k], []).append(k)
    pos: Dict[str, Tuple[float, float]] = {}
    x = MARGIN
    note_h = _note_height(example.note)
    top = MARGIN + note_h + 110
    for c in sorted(columns):
        col = columns[c]
        y = top
        for k in col:
            pos[k] = (x, y)
            y += sizes[k][1] + TITLE_H + ROW_GAP - 20
        x += max(sizes[k][0] for k in col) + COL_GAP

    nodes_json = []
    for k in keys:
        n, nd = next(m for m in example.nodes if m.key == k), defs[k]
        inputs = []
        for name, t, optional in nd.sockets:
            entry = {"localized_name": name, "name": name, "type": t if isinstance(t, str) else "COMBO",
                     "link": in_links.get((k, name))}
            if optional:
                entry["shape"] = 7
            inputs.append(entry)
        outputs = [{"localized_name": oname, "name": oname, "type": otype, "slot_index": i,
                    "links": out_links.get((k, i), [])} for i, (oname, otype) in enumerate(nd.outputs)]
        node = {"id": ids[k], "type": n.type, "pos": list(pos[k]), "size": list(sizes[k]), "flags": {},
                "order": order.index(k), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.type},
                "widgets_values": widget_values(nd, n.widgets, f"{example.name}/{k}")}
        if n.title:
            node["title"] = n.title
        if n.color:
            node["color"], node["bgcolor"] = n.color
        nodes_json.append(node)

    # the explanation, above the graph
    width = max(x - COL_GAP - MARGIN, 500)
    note_id = len(keys) + 1
    nodes_json.append({"id": note_id, "type": "MarkdownNote", "pos": [MARGIN, MARGIN],
                       "size": [min(width, 900), note_h],
                       "flags": {}, "order": len(keys), "mode": 0, "inputs": [], "outputs": [],
                       "title": "About this workflow", "properties": {}, "widgets_values": [example.note],
                       "color": "#432", "bgcolor": "#653"})

    groups = []
    for gi, (gtitle, gkeys) in enumerate(example.groups):
        x0 = min(pos[k][0] for k in gkeys) - 15
        y0 = min(pos[k][1] for k in gkeys) - TITLE_H - 45
        x1 = max(pos[k][0] + sizes[k][0] for k in gkeys) + 15
        y1 = max(pos[k][1] + sizes[k][1] for k in gkeys) + 15
        groups.append({"id": gi + 1, "title": gtitle, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": "#3f789e",
                       "font_size": 24, "flags": {}})

    right = max(pos[k][0] + sizes[k][0] for k in keys)
    scale = round(min(1.0, 1500.0 / (right + MARGIN)), 3)
    return {
        "id": str(uuid.uuid5(NUID, example.name)),
        "revision": 0,
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": nodes_json,
        "links": [list(link[:1]) + [ids[link[1]], link[2], ids[link[3]], link[4], link[5]] for link in links],
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": scale, "offset": [0, 0]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def _note_height(text: str) -> int:
    lines = 0
    for para in text.split("\n"):
        lines += max(1, -(-len(para) // 110))
    return 40 + 18 * lines


# -------------------------------------------------------------------------------------------------
# thumbnails
# -------------------------------------------------------------------------------------------------
LINK_COLORS = {"MODEL": (179, 157, 219), "CLIP": (255, 213, 0), "VAE": (255, 110, 110), "IMAGE": (100, 181, 246),
               "STRING": (130, 220, 130), "LORA": (255, 160, 80), "MERGE_METHOD": (230, 120, 230),
               "MERGE_MODELS": (120, 200, 230), "MERGE_LORAS": (120, 200, 230), "MODEL_MASK": (160, 230, 160),
               "BLOCK_WEIGHTS": (240, 200, 120)}


def _hex(c: str) -> Tuple[int, int, int]:
    c = c.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    return tuple(int(c[i:i + 2], 16) for i in (0, 2, 4))


def thumbnail(workflow: dict, title: str, size: Tuple[int, int] = THUMB_SIZE, display_names=None):
    """A PIL image of the workflow's graph (notes left out): boxes with titles, links by type."""
    from PIL import Image, ImageDraw, ImageFont

    display_names = display_names or {}
    ss = 3                                    # supersampling, for smooth lines and text
    W, H = size[0] * ss, size[1] * ss
    banner = 34 * ss
    img = Image.new("RGB", (W, H), (32, 32, 36))
    d = ImageDraw.Draw(img)
    for gx in range(0, W, 20 * ss):           # the editor's grid
        d.line([(gx, banner), (gx, H)], fill=(38, 38, 43), width=ss)
    for gy in range(banner, H, 20 * ss):
        d.line([(0, gy), (W, gy)], fill=(38, 38, 43), width=ss)
    nodes = [n for n in workflow["nodes"] if n["type"] not in ("MarkdownNote", "Note")]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] - TITLE_H for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    pad = 10 * ss
    s = min((W - 2 * pad) / (x1 - x0), (H - banner - 2 * pad) / (y1 - y0))
    ox = pad + ((W - 2 * pad) - s * (x1 - x0)) / 2
    oy = banner + pad + ((H - banner - 2 * pad) - s * (y1 - y0)) / 2

    def P(x, y):
        return (ox + (x - x0) * s, oy + (y - y0) * s)

    by_id = {n["id"]: n for n in nodes}

    def slot_y(n, i):
        return n["pos"][1] + 10 + (i + 0.5) * SLOT_H

    # links first, under the nodes
    for lid, src, sslot, dst, dslot, typ in workflow["links"]:
        a, b = by_id.get(src), by_id.get(dst)
        if a is None or b is None:
            continue
        p0 = P(a["pos"][0] + a["size"][0], slot_y(a, sslot))
        p3 = P(b["pos"][0], slot_y(b, dslot))
        dx = max(abs(p3[0] - p0[0]) * 0.5, 20 * ss)
        p1, p2 = (p0[0] + dx, p0[1]), (p3[0] - dx, p3[1])
        pts = []
        for i in range(33):
            t = i / 32
            u = 1 - t
            pts.append((u ** 3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t ** 3 * p3[0],
                        u ** 3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t ** 3 * p3[1]))
        d.line(pts, fill=LINK_COLORS.get(typ, (170, 170, 170)), width=max(2, int(2.2 * ss)), joint="curve")

    font_px = max(9 * ss, min(13 * ss, int(s * 24)))
    font = ImageFont.load_default(size=font_px)
    for n in nodes:
        bx0, by0 = P(n["pos"][0], n["pos"][1] - TITLE_H)
        bx1, by1 = P(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        tb = P(0, n["pos"][1])[1]
        body = _hex(n.get("bgcolor", "#353535"))
        head = _hex(n.get("color", "#222222"))
        r = 4 * ss
        d.rounded_rectangle([bx0, by0, bx1, by1], radius=r, fill=body, outline=(20, 20, 20), width=ss)
        d.rounded_rectangle([bx0, by0, bx1, max(tb, by0 + font_px + 4 * ss)], radius=r, fill=head)
        label = n.get("title") or display_names.get(n["type"]) or n["type"]
        label = label.replace("MergeLab_", "")
        maxw = bx1 - bx0 - 6 * ss
        while label and d.textlength(label, font=font) > maxw:
            label = label[:-2] + "…" if len(label) > 2 else ""
        d.text((bx0 + 4 * ss, by0 + 2 * ss), label, fill=(235, 235, 235), font=font)
        for i, _ in enumerate(n.get("inputs") or []):
            cx, cy = P(n["pos"][0], slot_y(n, i))
            d.ellipse([cx - 2 * ss, cy - 2 * ss, cx + 2 * ss, cy + 2 * ss], fill=(200, 200, 200))
        for i, o in enumerate(n.get("outputs") or []):
            cx, cy = P(n["pos"][0] + n["size"][0], slot_y(n, i))
            d.ellipse([cx - 2 * ss, cy - 2 * ss, cx + 2 * ss, cy + 2 * ss],
                      fill=LINK_COLORS.get(o["type"], (200, 200, 200)))
    # banner
    d.rectangle([0, 0, W, banner], fill=(24, 24, 28))
    bfont = ImageFont.load_default(size=15 * ss)
    d.text((10 * ss, 8 * ss), "MergeLab · " + title, fill=(240, 240, 240), font=bfont)
    return img.resize(size, Image.LANCZOS)


# -------------------------------------------------------------------------------------------------
# entry points
# -------------------------------------------------------------------------------------------------
def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def build_all(node_classes, display_names=None) -> Dict[str, dict]:
    return {ex.name: build(ex, node_classes, display_names) for ex in EXAMPLES}


def write_all(node_classes, display_names=None, folder: str = EXAMPLES_DIR, thumbnails: bool = True) -> List[str]:
    os.makedirs(folder, exist_ok=True)
    written = []
    for ex in EXAMPLES:
        wf = build(ex, node_classes, display_names)
        path = os.path.join(folder, ex.name + ".json")
        _write_atomic(path, dumps(wf).encode("utf-8"))
        written.append(path)
        if thumbnails:
            import io as _io
            buf = _io.BytesIO()
            thumbnail(wf, ex.title, display_names=display_names).save(buf, "JPEG", quality=88, optimize=True)
            jpg = os.path.join(folder, ex.name + ".jpg")
            _write_atomic(jpg, buf.getvalue())
            written.append(jpg)
    return written


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def stale(node_classes, display_names=None, folder: str = EXAMPLES_DIR) -> List[str]:
    """Names of the examples whose committed JSON differs from a fresh build (or is missing)."""
    out = []
    for name, wf in build_all(node_classes, display_names).items():
        path = os.path.join(folder, name + ".json")
        try:
            with open(path, encoding="utf-8") as f:
                same = f.read() == dumps(wf)
        except OSError:
            same = False
        if not same:
            out.append(name)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mergelab.gen_examples", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the committed JSON is up to date")
    p.add_argument("--out", default=EXAMPLES_DIR, help="folder to write (default: example_workflows/)")
    args = p.parse_args(argv)
    from .harness import Harness
    h = Harness()
    try:
        classes = h.nodes.NODE_CLASS_MAPPINGS
        names = getattr(h.nodes, "NODE_DISPLAY_NAME_MAPPINGS", {})
        if args.check:
            bad = stale(classes, names, args.out)
            for b in bad:
                print(f"stale: {b}.json (run python -m mergelab.gen_examples)", file=sys.stderr)
            return 1 if bad else 0
        for path in write_all(classes, names, args.out):
            print(f"wrote {os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)")
        return 0
    finally:
        h.close()


if __name__ == "__main__":
    sys.exit(main())

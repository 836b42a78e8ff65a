"""Mask nodes (``MODEL_MASK``), the masked model merger and Normalize Model.

A MODEL_MASK selects parameters of one model architecture: ``True`` = the merge result is used there,
``False`` = the base (or model A) is kept.  Connect one to the ``mask`` input of any MergeLab merger, or
use the Masked Model Merger.  Masks are stored as bits (or not at all: constants and seeded random
selections), see ``engine/masks.py``.
"""
from __future__ import annotations

import textwrap
from typing import List, Sequence, Tuple

import torch

from ..engine import masks as M
from ..engine import normalize as N
from ..engine.merge import DEVICES
from ..engine.saving import comfy_progress
from ..merge_methods import MergeError
from .comfy_api_compat import io
from .types import ModelMaskType

CATEGORY = "MergeLab/masks"
TOOLS_CATEGORY = "MergeLab/tools"

_DEVICE_TIP = "Where the math runs: auto = ComfyUI's device (the GPU when there is one); results stay on the CPU."


def _device_input():
    return io.Combo.Input("device", options=list(DEVICES), default="auto", tooltip=_DEVICE_TIP)


def _mask_output():
    return ModelMaskType.Output(display_name="mask", tooltip="A MODEL_MASK for the mask input of a MergeLab merger.")


def _wrap(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except MergeError as e:          # MaskError / NormalizeError / engine errors: one clear message
        raise ValueError(str(e)) from None


def _layout(model, name: str) -> M.MaskLayout:
    from ..engine.weights import is_clip

    if model is None or is_clip(model) or not hasattr(model, "get_key_patches"):
        raise ValueError(f"{name} must be a MODEL")
    return M.MaskLayout.of(model)


# ---------------------------------------------------------------------------------------------
# maskers
# ---------------------------------------------------------------------------------------------
class MagnitudeMaskerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_MagnitudeMasker",
            display_name="Magnitude Masker",
            category=CATEGORY,
            description="Select the parameters whose |A - B| (or |A| without model_b) is above or below an exact "
                        "quantile, per tensor, per block or over the whole model. 'above 0.9' selects the 10% "
                        "largest, 'below 0.1' the 10% smallest (exactly, ties broken by position).",
            inputs=[
                io.Model.Input("model_a", tooltip="Model A: the values ranked are |A - B|, or |A| without model_b."),
                io.Float.Input("quantile", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Quantile q in [0, 1]. 'above' selects the round((1-q)·n) largest values of "
                                       "each scope, 'below' the round(q·n) smallest."),
                io.Combo.Input("select", options=list(M.SELECTS), default="above",
                               tooltip="above: values above the quantile (the most changed); below: under it."),
                io.Combo.Input("scope", options=list(M.SCOPES), default="tensor",
                               tooltip="Where the quantile is taken: each tensor on its own, each block (as in "
                                       "block weights), or the whole model. Block and model scopes read the "
                                       "models three times (exact streaming selection)."),
                _device_input(),
                io.Model.Input("model_b", optional=True,
                               tooltip="Model B (usually the base A was fine-tuned from). Optional."),
            ],
            outputs=[_mask_output()],
        )

    @classmethod
    def execute(cls, model_a, quantile, select, scope, device, model_b=None):
        from ..engine.merge import compute_device

        layout = _layout(model_a, "model_a")
        if model_b is not None:
            _wrap(M.check_same_model_layout, layout, _layout(model_b, "model_b"))
        dev = _wrap(compute_device, device)
        read_b = M.model_reader(model_b, dev) if model_b is not None else None
        try:
            mask = _wrap(M.magnitude_mask, layout, M.model_reader(model_a, dev), read_b, quantile, select, scope,
                         progress=comfy_progress())
        finally:
            if dev.type != "cpu":
                import comfy.model_management as mm
                mm.soft_empty_cache()
        return io.NodeOutput(mask)


class RandomMaskerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_RandomMasker",
            display_name="Random Masker",
            category=CATEGORY,
            description="Select each parameter with probability 'density', drawn per key from (seed, key): the same "
                        "on CPU and GPU and for any key order. Takes no memory (regenerated when used).",
            inputs=[
                io.Model.Input("model", tooltip="The model (architecture and keys) the mask is for."),
                io.Float.Input("density", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability that a parameter is selected."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seed; each key draws from its own generator seeded by (seed, key)."),
            ],
            outputs=[_mask_output()],
        )

    @classmethod
    def execute(cls, model, density, seed):
        return io.NodeOutput(_wrap(M.random_mask, _layout(model, "model"), density, seed))


class BlockMaskerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_BlockMasker",
            display_name="Block Masker",
            category=CATEGORY,
            description="Select whole blocks (the block names of block weights: input_blocks.4, middle_block.1, "
                        "double_blocks.7, time_embed, ...). The second output lists the model's blocks.",
            inputs=[
                io.Model.Input("model", tooltip="The model (architecture and keys) the mask is for."),
                io.String.Input("blocks", default="", multiline=True,
                                tooltip="Block names separated by commas or new lines; wildcards allowed "
                                        "(output_blocks.*, double_blocks.1?). Empty selects nothing. A name that "
                                        "matches no block is an error listing the model's blocks."),
                io.Boolean.Input("invert", default=False, tooltip="Select every block except the ones listed."),
            ],
            outputs=[_mask_output(),
                     io.String.Output(display_name="blocks", tooltip="The model's block names, one per line.")],
        )

    @classmethod
    def execute(cls, model, blocks, invert=False):
        layout = _layout(model, "model")
        names = [p for line in (blocks or "").splitlines() for p in line.split(",")]
        mask = _wrap(M.block_mask, layout, names)
        if invert:
            mask = mask.invert()
        return io.NodeOutput(mask, "\n".join(M.block_names(layout)))


_UNCONNECTED = object()


class MaskOperationsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_MaskOperations",
            display_name="Mask Operations",
            category=CATEGORY,
            description="Set operations on masks of the same model: union (A or B), intersection (A and B), "
                        "difference (A and not B), xor (in exactly one), invert (not A; mask_b is ignored).",
            inputs=[
                ModelMaskType.Input("mask_a", tooltip="Mask A."),
                io.Combo.Input("operation", options=list(M.OPERATIONS), default="union",
                               tooltip="union, intersection, difference (A minus B), xor (symmetric difference), "
                                       "invert (of A)."),
                ModelMaskType.Input("mask_b", optional=True, tooltip="Mask B (not needed for invert)."),
            ],
            outputs=[_mask_output()],
        )

    @classmethod
    def validate_inputs(cls, operation=None, mask_b=_UNCONNECTED):
        """At validation, before the masks are computed: a two-mask operation without mask_b.  A linked
        mask_b arrives as None, an unconnected one not at all.  Naming ``operation`` leaves its option check
        to this function."""
        if operation is None:           # linked: checked when it runs
            return True
        if operation not in M.OPERATIONS:
            return f"operation {operation!r} is not one of {', '.join(M.OPERATIONS)}"
        if operation != "invert" and mask_b is _UNCONNECTED:
            return f"{operation} needs two masks: connect mask_b (only invert works on mask_a alone)"
        return True

    @classmethod
    def execute(cls, mask_a, operation, mask_b=None):
        if not isinstance(mask_a, M.ModelMask):
            raise ValueError("mask_a must be a MODEL_MASK")
        other = mask_b if operation != "invert" else None
        return io.NodeOutput(_wrap(mask_a.apply, operation, other, comfy_progress()))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def report_rows(mask: M.ModelMask, progress=None) -> List[Tuple[str, int, int]]:
    return mask.block_counts(progress=progress)


def report_text(mask: M.ModelMask, rows: Sequence[Tuple[str, int, int]]) -> str:
    sel = sum(r[1] for r in rows)
    tot = sum(r[2] for r in rows)
    lines = [f"{mask.label or 'mask'}",
             f"model: {mask.layout.family}, {len(mask.layout.keys)} keys",
             f"selected: {sel:,} of {tot:,} parameters ({100.0 * sel / max(tot, 1):.3f}%)",
             f"storage: {mask.nbytes():,} bytes ({8.0 * mask.nbytes() / max(tot, 1):.3f} bits per parameter)",
             "", "block: selected / parameters (fraction)"]
    width = max((len(r[0]) for r in rows), default=5)
    for name, s, t in rows:
        lines.append(f"{name.ljust(width)}  {s:>14,} / {t:>14,}  ({s / max(t, 1):.4f})")
    return "\n".join(lines)


def bar_chart(rows: Sequence[Tuple[str, int, int]], title: str = "") -> torch.Tensor:
    """A horizontal bar chart of the selected fraction per block: IMAGE tensor [1, H, W, 3], float 0..1."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    row_h, left, bar_w, right = 14, 8, 360, 64
    label_w = max([6 * len(r[0]) for r in rows] + [60])
    width = left + label_w + 8 + bar_w + right
    # a chained mask's description can be long: wrapped to the image's width, never cut
    title_lines = textwrap.wrap(title or "selected fraction per block", max(20, (width - 2 * left) // 6)) or [""]
    top = 16 + 12 * len(title_lines)
    height = top + row_h * max(len(rows), 1) + 12
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for i, line in enumerate(title_lines):
        d.text((left, 6 + 12 * i), line, fill=(0, 0, 0), font=font)
    x0 = left + label_w + 8
    for i, (name, s, t) in enumerate(rows):
        y = top + i * row_h
        frac = s / t if t else 0.0
        d.text((left, y + 1), name, fill=(0, 0, 0), font=font)
        d.rectangle([x0, y + 2, x0 + bar_w, y + row_h - 3], outline=(180, 180, 180), fill=(240, 240, 240))
        if frac > 0:
            d.rectangle([x0, y + 2, x0 + max(1, int(round(frac * bar_w))), y + row_h - 3], fill=(52, 120, 200))
        d.text((x0 + bar_w + 6, y + 1), f"{100 * frac:.1f}%", fill=(0, 0, 0), font=font)
    import numpy as np

    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return arr.unsqueeze(0)


class MaskReportNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_MaskReport",
            display_name="Mask Report",
            category=CATEGORY,
            description="The fraction of parameters a mask selects, per block: as text and as a bar chart image.",
            inputs=[ModelMaskType.Input("mask", tooltip="The mask to describe.")],
            outputs=[io.String.Output(display_name="report", tooltip="Per-block counts as text."),
                     io.Image.Output(display_name="chart", tooltip="Bar chart of the selected fraction per block.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, mask):
        if not isinstance(mask, M.ModelMask):
            raise ValueError("mask must be a MODEL_MASK")
        rows = report_rows(mask, comfy_progress())
        text = report_text(mask, rows)
        return io.NodeOutput(text, bar_chart(rows, mask.label), ui={"text": [text]})


# ---------------------------------------------------------------------------------------------
# masked merge
# ---------------------------------------------------------------------------------------------
def masked_merge(model_a, model_b, mask: M.ModelMask, ratio: float, device: str = "auto"):
    """``where(mask, ratio·A + (1 - ratio)·B, A)`` key by key (DareMerge's masked merge, ComfyUI's ratio
    convention: ratio 1 = model A)."""
    from .. import merge_methods
    from ..engine.merge import MergeInput, MergeOptions, merge_models

    if not isinstance(mask, M.ModelMask):
        raise ValueError("mask must be a MODEL_MASK")
    layout = _layout(model_a, "model_a")
    _wrap(M.check_same_model_layout, layout, _layout(model_b, "model_b"))
    _wrap(mask.check, layout, None, "model_a")
    method = merge_methods.create("linear", normalize=False)
    inputs = [MergeInput(model_a, {"weight": float(ratio)}, "model_a"),
              MergeInput(model_b, {"weight": 1.0 - float(ratio)}, "model_b")]
    return _wrap(merge_models, None, inputs, method, MergeOptions(device=device, mask=mask))


class MaskedModelMergerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_MaskedModelMerger",
            display_name="Masked Model Merger",
            category=CATEGORY,
            description="Blend A and B where the mask selects and keep A elsewhere: "
                        "out = where(mask, ratio·A + (1 - ratio)·B, A). ratio 0 copies B into the selected "
                        "parameters.",
            inputs=[
                io.Model.Input("model_a", tooltip="Model A: kept where the mask selects nothing; the result copies "
                                                  "its settings."),
                io.Model.Input("model_b", tooltip="Model B: blended in where the mask selects."),
                ModelMaskType.Input("mask", tooltip="Which parameters change (made from model A or a model of the "
                                                    "same architecture and keys)."),
                io.Float.Input("ratio", default=0.0, min=-1.0, max=2.0, step=0.01,
                               tooltip="Share of model A inside the mask (ComfyUI's convention: 1 = A, 0 = B); "
                                       "outside [0, 1] it extrapolates (-0.5: half a step beyond B, away from A)."),
                _device_input(),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model_a, model_b, mask, ratio, device):
        return io.NodeOutput(masked_merge(model_a, model_b, mask, ratio, device))


# ---------------------------------------------------------------------------------------------
# Normalize Model
# ---------------------------------------------------------------------------------------------
class NormalizeModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_NormalizeModel",
            display_name="Normalize Model",
            category=TOOLS_CATEGORY,
            description="Scale model A's parameter norms to model B's. attn_only: in every attention multiply the "
                        "queries by s and divide the keys by s (weights and biases; fused qkv slices too), which "
                        "leaves the outputs unchanged and gives A the query/key norm ratio of B, "
                        "s = sqrt((|Qb|/|Qa|) / (|Kb|/|Ka|)). all: every layer's weight to B's norm, its bias by "
                        "the same factor (changes the model).",
            inputs=[
                io.Model.Input("model_a", tooltip="The model to rescale (it is not modified: a patched copy is "
                                                  "returned)."),
                io.Model.Input("model_b", tooltip="The reference model, of the same architecture."),
                io.Combo.Input("mode", options=list(N.MODES), default="attn_only",
                               tooltip="attn_only: function-preserving query/key rescale; all: every weight and "
                                       "bias scaled to B's norms."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="Exponent on every factor: 1 = match B, 0 = unchanged, 0.5 = half way "
                                       "(log scale), negative = away from B."),
                _device_input(),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="report", tooltip="The factors applied, per attention or layer.")],
        )

    @classmethod
    def execute(cls, model_a, model_b, mode, strength, device):
        out, report = _wrap(N.normalize_model, model_a, model_b, mode, strength, device, comfy_progress())
        return io.NodeOutput(out, report.text())


MASK_NODES = [MagnitudeMaskerNode, RandomMaskerNode, BlockMaskerNode, MaskOperationsNode, MaskReportNode,
              MaskedModelMergerNode, NormalizeModelNode]

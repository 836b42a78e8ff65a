"""Model and CLIP mergers.

Models are given as a ``MERGE_MODELS`` list built by chaining **Merge Input** nodes (one per model,
each with its per-model parameters: weight, density, ...), so a merger takes any number of models
and works the same in the editor and in API-format graphs.  The per-model widgets are the union of
the per-model parameters that the methods declare, derived from their specs.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .. import merge_methods
from ..engine.blocks import MAX_MODELS, block_of
from ..engine.merge import COMPUTE_DTYPES, DEVICES, ON_MISMATCH, MergeInput, MergeOptions, merge_models
from ..engine.report import MergeStats
from ..merge_methods import MergeError
from .comfy_api_compat import io
from .types import BlockWeightsType, MergeMethodType, ModelListType, ModelMaskType
from .widgets import widget_input

CATEGORY = "MergeLab/merge"


def per_model_params():
    """The per-model parameters of all methods, one entry per name (the specs must agree)."""
    seen: Dict[str, Any] = {}
    for spec in merge_methods.all_specs():
        for p in spec.per_model_params:
            if p.name not in seen:
                seen[p.name] = p
    return list(seen.values())


class MergeModelList(tuple):
    """An immutable list of (model, clip, params, name) entries: the value of a MERGE_MODELS socket."""


class MergeInputNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        pm = per_model_params()
        return io.Schema(
            node_id="MergeLab_MergeInput",
            display_name="Merge Input (model + its parameters)",
            category=CATEGORY,
            description="One model to merge, with its per-model parameters. Chain several: connect the "
                        "'models' output to the next Merge Input's 'models' input, and the last one to a merger. "
                        "Parameters a method does not declare are ignored by it.",
            inputs=[io.Model.Input("model", optional=True, tooltip="The diffusion model (MODEL) to merge."),
                    io.Clip.Input("clip", optional=True, tooltip="Its text encoder (CLIP), for the CLIP merger."),
                    ModelListType.Input("models", optional=True, tooltip="Models given before this one.")]
                   + [widget_input(p) for p in pm],
            outputs=[ModelListType.Output(display_name="models", tooltip="The models so far, for a merger.")],
        )

    @classmethod
    def execute(cls, model=None, clip=None, models=None, **params):
        if model is None and clip is None:
            raise ValueError("Merge Input: connect a model, a clip, or both")
        prev = tuple(models or ())
        if len(prev) >= MAX_MODELS:
            raise ValueError(f"Merge Input: at most {MAX_MODELS} models")
        name = f"model {len(prev) + 1}"
        return io.NodeOutput(MergeModelList(prev + ((model, clip, dict(params), name),)))


def _changes_model1() -> str:
    """The methods whose result is model 1 changed (their spec's ``result_is_model1``), for the descriptions."""
    names = [s.name for s in merge_methods.all_specs() if s.result_is_model1]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def _common_inputs(kind: str) -> List[Any]:
    return [
        MergeMethodType.Input("method", tooltip="A merge method from a MergeLab method node."),
        ModelListType.Input("models", tooltip="The models to merge, from a chain of Merge Input nodes."),
        io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                     tooltip="Seed of the random methods (DARE, DELLA, ...); masks are seeded per key."),
        io.Combo.Input("device", options=list(DEVICES), default="auto",
                       tooltip="Where the math runs: auto = ComfyUI's device (the GPU when there is one)."),
        io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="fp32",
                       tooltip="Precision of the math: fp32, or fp64 (slower; every method then computes in "
                               "fp64). Results are rounded once to the dtype of the model the result copies (the "
                               f"base's; model 1's for {_changes_model1()}; bf16 for an fp8 model)."),
        io.Combo.Input("on_mismatch", options=list(ON_MISMATCH), default="error",
                       tooltip="Keys missing from a model or with another shape: stop with a list of them, or "
                               "skip them (they keep the values of the model the result copies: the base, or "
                               "model 1) with one warning. A first layer with more input channels in that model "
                               "than in the others (an inpainting or instruct model) is not a mismatch: it is "
                               "merged on the channels they share and keeps its others."),
        BlockWeightsType.Input("block_weights", optional=True,
                               tooltip="Per-block factors on a parameter (weight, density, t, ...)."),
    ] + ([] if kind == "clip" else [    # the maskers make masks of a MODEL's keys
        ModelMaskType.Input("mask", optional=True,
                            tooltip="Only selected parameters change; the rest keep the values of the model the "
                                    "result copies (the base, or model 1)."),
    ])


def run_merge(kind: str, base, method, models, seed, device, compute_dtype, on_mismatch,
              block_weights=None, mask=None):
    index = 0 if kind == "model" else 1
    inputs = [MergeInput(entry[index], entry[2], entry[3]) for entry in models if entry[index] is not None]
    skipped = [entry[3] for entry in models if entry[index] is None]
    if skipped:
        raise ValueError(f"{kind} merger: no {kind} connected on {', '.join(skipped)}")
    stats = MergeStats(block_of, [i.name for i in inputs], has_base=base is not None)
    opts = MergeOptions(seed=seed, device=device, compute_dtype=compute_dtype, on_mismatch=on_mismatch,
                        block_weights=block_weights, mask=mask, stats=stats)
    try:
        merged = merge_models(base, inputs, method, opts)
    except MergeError as e:
        raise ValueError(str(e)) from None
    title = f"{kind} merge: {method!r}, seed {seed}, {len(inputs)} model(s){' + base' if base is not None else ''}"
    return merged, stats.text(title), stats.image()


REPORT_OUTPUTS = [io.String.Output(display_name="report", tooltip="Per block: relative change (‖merged − x‖/‖x‖) "
                                                                  "and cosine similarity vs the base and each input."),
                  io.Image.Output(display_name="report_image", tooltip="The same as a chart: per block, one bar "
                                  "per comparison (the base, then each input) for the relative change and for the "
                                  "angle in degrees (arccos of the cosine).")]


class ModelMergerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_ModelMerger",
            display_name="Model Merger",
            category=CATEGORY,
            description="Merge any number of models with a merge method, key by key. The result is a copy of "
                        f"the base with the merged weights (a copy of model 1, A, for {_changes_model1()}, which "
                        "change A); the inputs are never modified. "
                        "It keeps that model's settings (prediction type, ModelSampling and other sampling "
                        "patches such as FreeU) and layers (an inpainting A stays an inpainting model); other "
                        "inputs' settings are not merged, and a warning names those that differ.",
            inputs=[io.Model.Input("base", optional=True,
                                   tooltip="The base model (task vectors are taken relative to it). Optional for "
                                           "methods that need none; the result then copies model 1's settings "
                                           "(prediction type, sampling patches).")]
                   + _common_inputs("model"),
            outputs=[io.Model.Output(display_name="MODEL"), *REPORT_OUTPUTS],
        )

    @classmethod
    def execute(cls, method, models, seed, device, compute_dtype, on_mismatch, base=None, block_weights=None,
                mask=None):
        return io.NodeOutput(*run_merge("model", base, method, models, seed, device, compute_dtype, on_mismatch,
                                        block_weights, mask))


class CLIPMergerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_CLIPMerger",
            display_name="CLIP Merger",
            category=CATEGORY,
            description="Merge the text encoders (CLIP) of the Merge Inputs with a merge method, key by key. "
                        "The result keeps the base's (or model 1's, without a base or for "
                        f"{_changes_model1()}) settings: CLIP last layer, tokenizer options "
                        "and hooks (SetClipHooks, which are applied when encoding and are not weights); a "
                        "warning names other inputs whose settings differ.",
            inputs=[io.Clip.Input("base", optional=True, tooltip="The base text encoder (its settings are kept; "
                                                                 "without a base, model 1's).")]
                   + _common_inputs("clip"),
            outputs=[io.Clip.Output(display_name="CLIP"), *REPORT_OUTPUTS],
        )

    @classmethod
    def execute(cls, method, models, seed, device, compute_dtype, on_mismatch, base=None, block_weights=None):
        return io.NodeOutput(*run_merge("clip", base, method, models, seed, device, compute_dtype, on_mismatch,
                                        block_weights))


MERGER_NODES = [MergeInputNode, ModelMergerNode, CLIPMergerNode]

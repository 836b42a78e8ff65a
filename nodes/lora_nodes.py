"""LoRA nodes: load, stack, apply, merge (any merge method), extract a difference LoRA, resize, save.

They pass ``LORA`` values (:class:`engine.lora.Lora`, immutable) between them; the work is in
``engine/lora*.py``.  LoRAs to merge are given as a ``MERGE_LORAS`` list built by chaining **LoRA Merge
Input** nodes (one per LoRA, with its per-model parameters), like the model mergers' Merge Input.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Optional

from ..engine.lora import LoraError, apply_lora, stack_loras
from ..engine.lora_io import KEY_FORMATS, SAVE_DTYPES, left_out_warning, load_lora_file, save_lora
from ..engine.lora_ops import ExtractOptions, LoraMergeInput, extract_lora, merge_loras, resize_lora
from ..engine.lora_svd import CLAMP_QUANTILE_MIN, RANK_MODES, SVD_METHODS, RankError, RankSpec, SVDOptions
from ..engine.merge import DEVICES
from ..engine.saving import comfy_progress, prompt_metadata
from .comfy_api_compat import io
from .types import BlockWeightsType, LoraType, MergeMethodType
from .widgets import widget_input

CATEGORY = "MergeLab/lora"
MAX_LORAS = 64

#: the list of LoRAs (with per-LoRA merge parameters) a LoRA merger takes
LoraListType = io.Custom("MERGE_LORAS")


class LoraMergeList(tuple):
    """Immutable (lora, params, name) entries: the value of a MERGE_LORAS socket."""


def _fail(e: Exception):
    raise ValueError(str(e)) from None


# -- shared widgets ------------------------------------------------------------------------------------

_RANK_PARAM_RANGE = (0.0, 1000.0)


def _rank_inputs(default_rank: int = 32, max_rank: int = 4096) -> List[Any]:
    return [
        io.Combo.Input("rank_mode", options=list(RANK_MODES), default="fixed",
                       tooltip="How each layer's rank is chosen. fixed: 'rank'. sv_ratio: keep singular values ≥ "
                               "the largest / rank_param. sv_fro: the smallest rank keeping rank_param of the "
                               "Frobenius norm (e.g. 0.9). sv_cumulative: the smallest rank whose singular values "
                               "sum to rank_param of their total (slowest: needs every singular value). The dynamic "
                               "modes never exceed 'rank'."),
        io.Int.Input("rank", default=default_rank, min=1, max=max_rank,
                     tooltip="The rank of every layer (fixed mode) or the maximum rank (other modes). Layers smaller "
                             "than this keep their full rank, which is exact (Resize refuses a rank above every "
                             "layer's when nothing would change: plain LoRA layers only, no clamp)."),
        io.Float.Input("rank_param", default=0.9, min=_RANK_PARAM_RANGE[0], max=_RANK_PARAM_RANGE[1], step=0.01,
                       tooltip="sv_ratio: the ratio ≥ 1 (e.g. 20); sv_fro / sv_cumulative: the fraction in (0, 1] "
                               "(e.g. 0.9). Ignored in fixed mode."),
    ]


def _rank_spec(rank_mode, rank, rank_param) -> RankSpec:
    try:
        return RankSpec(rank_mode, int(rank), float(rank_param))
    except RankError as e:
        _fail(e)


def _validate_rank(cls, rank_mode=None, rank_param=None):
    """At validation, before anything upstream runs: rank_param's valid range depends on rank_mode (the
    default 0.9 is no ratio for sv_ratio).  ComfyUI leaves the inputs a validate_inputs names to it (no
    min / max / option check of its own): only these two are named, and their widget ranges checked here."""
    if rank_mode is None or rank_param is None:     # linked: checked when it runs
        return True
    try:
        p = float(rank_param)
        lo, hi = _RANK_PARAM_RANGE
        if not lo <= p <= hi:
            return f"rank_param {rank_param!r} is outside [{lo:g}, {hi:g}]"
        RankSpec(rank_mode, 1, p)
    except (RankError, ValueError, TypeError) as e:
        return str(e)
    return True


def _device_input():
    return io.Combo.Input("device", options=list(DEVICES), default="auto",
                          tooltip="Where the math runs: auto = ComfyUI's device (the GPU when there is one). "
                                  "Results are always kept on the CPU.")


def _clamp_input():
    return io.Float.Input("clamp_quantile", default=1.0, min=CLAMP_QUANTILE_MIN, max=1.0, step=0.001,
                          tooltip="kohya's clamp of the factors to ± their quantile (kohya/ComfyUI use 0.99). "
                                  "1 = off (default): clamping only adds error. Exact at any size.")


def _clamp(q: float) -> Optional[float]:
    return None if q >= 1.0 else float(q)


def _lora_names() -> List[str]:
    import folder_paths
    return folder_paths.get_filename_list("loras")


# -- nodes ---------------------------------------------------------------------------------------------

class LoadLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_LoadLoRA",
            display_name="Load LoRA (as LORA)",
            category=CATEGORY,
            description="Read a LoRA file from the loras folder into a LORA value for the MergeLab LoRA nodes "
                        "(nothing is applied yet). kohya, diffusers/PEFT, ComfyUI and LyCORIS (LoCon, LoHa, LoKr) "
                        "files are understood through ComfyUI's own key maps for this MODEL and CLIP; tensors "
                        "that match no layer are reported once, with their count. A DoRA layer stays DoRA when "
                        "applied; where a fixed difference is needed (Merge LoRAs, Resize LoRA) it is its "
                        "difference on this MODEL / CLIP (exact there, at any strength).",
            inputs=[io.Model.Input("model", tooltip="The diffusion model the LoRA is for (its key names decide "
                                                    "which layers the LoRA's tensors address)."),
                    io.Clip.Input("clip", optional=True, tooltip="The text encoder, for the LoRA's text-encoder "
                                                                 "layers. Without it they are ignored."),
                    io.Combo.Input("lora_name", options=_lora_names(), tooltip="The LoRA file.")],
            outputs=[LoraType.Output(display_name="LORA", tooltip="The LoRA's layers, for Apply / Stack / Merge / "
                                                                  "Resize / Save LoRA."),
                     io.String.Output(display_name="info", tooltip="A one-line summary of the layers read.")],
        )

    @classmethod
    def execute(cls, model, lora_name, clip=None):
        import folder_paths
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ValueError(f"LoRA file '{lora_name}' not found in the loras folder")
        try:
            lora = load_lora_file(path, model, clip, name=os.path.splitext(os.path.basename(lora_name))[0])
        except LoraError as e:
            _fail(e)
        return io.NodeOutput(lora, lora.summary())


class LoraStackNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_LoRAStack",
            display_name="LoRA Stack",
            category=CATEGORY,
            description="Add a LoRA to a stack with its own model and CLIP strengths. Chain several: the output "
                        "is one LORA equal to Σ strength·LoRA, exactly (the factors are concatenated, nothing "
                        "is approximated). Block weights give a LoRA per-block strengths. DoRA (LoRA, LoHa or LoKr "
                        "with a dora_scale), GLoRA and OFT layers change the weight depending on the weight itself: "
                        "each is kept with its strength (applied as ComfyUI's LoraLoader applies one) and "
                        "cannot share a weight with another LoRA of the stack (Merge LoRAs can combine a DoRA "
                        "with others: through its difference on the model it was loaded with).",
            inputs=[LoraType.Input("lora", tooltip="The LoRA to add."),
                    io.Float.Input("strength_model", default=1.0, min=-20.0, max=20.0, step=0.01,
                                   tooltip="Strength of its diffusion-model layers."),
                    io.Float.Input("strength_clip", default=1.0, min=-20.0, max=20.0, step=0.01,
                                   tooltip="Strength of its text-encoder layers."),
                    LoraType.Input("stack", optional=True, tooltip="The stack so far (another LoRA Stack's output)."),
                    BlockWeightsType.Input(
                        "block_weights", optional=True,
                        tooltip="Per-block strength of this LoRA (LoRA Block Weight): each layer's strength times the "
                                "factor of its block, from a Block Weights node of the LoRA's architecture with "
                                "param 'weight' (MBW BASE: the text-encoder layers). A factor of 0 drops the block's "
                                "layers.")],
            outputs=[LoraType.Output(display_name="LORA", tooltip="The stack, as one LoRA.")],
        )

    @classmethod
    def execute(cls, lora, strength_model, strength_clip, stack=None, block_weights=None):
        entries = []
        if stack is not None:
            entries.append((stack, 1.0, 1.0))
        entries.append((lora, strength_model, strength_clip, block_weights))
        try:
            out = stack_loras(entries, name=(f"{stack.name}+{lora.name}" if stack is not None else lora.name),
                              progress=comfy_progress())
        except LoraError as e:
            _fail(e)
        return io.NodeOutput(out)


class ApplyLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_ApplyLoRA",
            display_name="Apply LoRA",
            category=CATEGORY,
            description="Apply a LORA to a model and its text encoder as ComfyUI LoRA patches (the same patches "
                        "ComfyUI's Load LoRA creates, computed by ComfyUI itself). The inputs are not modified.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model."),
                    LoraType.Input("lora", tooltip="The LoRA to apply."),
                    io.Float.Input("strength_model", default=1.0, min=-20.0, max=20.0, step=0.01,
                                   tooltip="Strength on the diffusion model (0 = unchanged)."),
                    io.Float.Input("strength_clip", default=1.0, min=-20.0, max=20.0, step=0.01,
                                   tooltip="Strength on the text encoder (0 = unchanged)."),
                    io.Clip.Input("clip", optional=True, tooltip="The text encoder (optional).")],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, model, lora, strength_model, strength_clip, clip=None):
        try:
            m, c = apply_lora(lora, model, clip, strength_model, strength_clip)
        except LoraError as e:
            _fail(e)
        return io.NodeOutput(m, c)


def _merge_per_model_params():
    from .merger_nodes import per_model_params
    return per_model_params()


class LoraMergeInputNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_LoRAMergeInput",
            display_name="LoRA Merge Input (LoRA + its parameters)",
            category=CATEGORY,
            description="One LoRA to merge, with its per-model parameters (weight, density, ...). Chain several: "
                        "connect 'loras' to the next one and the last one to Merge LoRAs. Parameters a method "
                        "does not declare are ignored by it.",
            inputs=[LoraType.Input("lora", tooltip="The LoRA."),
                    LoraListType.Input("loras", optional=True, tooltip="LoRAs given before this one.")]
                   + [widget_input(p) for p in _merge_per_model_params()],
            outputs=[LoraListType.Output(display_name="loras", tooltip="The LoRAs so far, for Merge LoRAs.")],
        )

    @classmethod
    def execute(cls, lora, loras=None, **params):
        prev = tuple(loras or ())
        if len(prev) >= MAX_LORAS:
            raise ValueError(f"LoRA Merge Input: at most {MAX_LORAS} LoRAs")
        name = lora.name or f"lora {len(prev) + 1}"
        return io.NodeOutput(LoraMergeList(prev + ((lora, dict(params), name),)))


class MergeLorasNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_MergeLoRAs",
            display_name="Merge LoRAs",
            category=CATEGORY,
            description="Merge LoRAs with any MergeLab merge method. The method runs on each layer's full "
                        "difference ΔW (zero base for methods that need one), layer by layer on the compute device; "
                        "the result is factorized back to the chosen rank. Linear, task arithmetic, passthrough "
                        "and weighted sum are computed exactly on the factors (no SVD loss while the summed rank "
                        "fits). Methods that look at the weights themselves, not only at differences (slerp, "
                        "karcher, arcee_fusion, multi_domain_alignment), give something else on ΔW than on the "
                        "models (slerp of one LoRA at t: sin(tπ/2)·ΔW); the report says so.",
            inputs=[MergeMethodType.Input("method", tooltip="A merge method from a MergeLab method node."),
                    LoraListType.Input("loras", tooltip="The LoRAs, from a chain of LoRA Merge Input nodes.")]
                   + _rank_inputs(64)
                   + [io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                                   tooltip="Seed of random methods (DARE, DELLA) and of the randomized SVD; "
                                           "seeded per layer, so results are reproducible."),
                      _clamp_input(), _device_input()],
            outputs=[LoraType.Output(display_name="LORA"),
                     io.String.Output(display_name="report", tooltip="Per-layer ranks and errors.")],
        )

    validate_inputs = classmethod(_validate_rank)

    @classmethod
    def execute(cls, method, loras, rank_mode, rank, rank_param, seed, clamp_quantile, device):
        spec = _rank_spec(rank_mode, rank, rank_param)
        inputs = [LoraMergeInput(l, p, n) for l, p, n in loras]
        try:
            out, report = merge_loras(inputs, method, spec, seed=seed, device=device,
                                      clamp_quantile=_clamp(clamp_quantile),
                                      name=f"{method.name}_merge")
        except (LoraError, RankError) as e:
            _fail(e)
        return io.NodeOutput(out, report)


class ExtractLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_ExtractLoRA",
            display_name="Extract LoRA (difference of two models)",
            category=CATEGORY,
            description="A LoRA with ΔW ≈ tuned − base for every layer, by truncated SVD per layer (randomized "
                        "by default: fast, deterministic, within a fraction of a percent of the best possible "
                        "error). The inputs' own LoRAs and merges count. 3×3 convolutions become LoCon layers. "
                        "The report lists each layer's rank and relative error.",
            inputs=[io.Model.Input("tuned_model", optional=True, tooltip="The fine-tuned (or merged) model."),
                    io.Model.Input("base_model", optional=True, tooltip="The model it was tuned from."),
                    io.Clip.Input("tuned_clip", optional=True, tooltip="The tuned text encoder (optional)."),
                    io.Clip.Input("base_clip", optional=True, tooltip="The base text encoder (optional).")]
                   + _rank_inputs(32)
                   + [io.Combo.Input("svd", options=list(SVD_METHODS), default="randomized",
                                     tooltip="randomized: Gaussian sketch + power iterations (fast); full: "
                                             "torch.linalg.svd of every layer (slow, exact optimum)."),
                      io.Int.Input("oversample", default=16, min=0, max=512,
                                   tooltip="Randomized SVD: extra sketch columns beyond the rank."),
                      io.Int.Input("power_iterations", default=2, min=0, max=20,
                                   tooltip="Randomized SVD: subspace iterations (more = closer to the optimum)."),
                      io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                                   tooltip="Seed of the randomized SVD (per layer): equal inputs give equal LoRAs."),
                      _clamp_input(),
                      io.Boolean.Input("bias_diff", default=False,
                                       tooltip="Also store the full differences of biases and 1-D weights (norms). "
                                               "ComfyUI loads them; some other tools ignore them."),
                      io.Boolean.Input("conv", default=True,
                                       tooltip="Also extract 3×3 (spatial) convolutions, as LoCon layers."),
                      io.Float.Input("min_diff", default=1e-6, min=0.0, max=1.0, step=1e-6,
                                     tooltip="Layers whose largest |ΔW| is at most this are skipped as unchanged."),
                      _device_input()],
            outputs=[LoraType.Output(display_name="LORA"),
                     io.String.Output(display_name="report", tooltip="Per-layer ranks and relative errors.")],
        )

    validate_inputs = classmethod(_validate_rank)

    @classmethod
    def execute(cls, rank_mode, rank, rank_param, svd, oversample, power_iterations, seed, clamp_quantile,
                bias_diff, conv, min_diff, device, tuned_model=None, base_model=None, tuned_clip=None,
                base_clip=None):
        try:
            opts = ExtractOptions(rank=_rank_spec(rank_mode, rank, rank_param),
                                  svd=SVDOptions(svd, int(oversample), int(power_iterations)), seed=int(seed),
                                  clamp_quantile=_clamp(clamp_quantile), bias_diff=bool(bias_diff), conv=bool(conv),
                                  min_diff=float(min_diff), device=device)
            lora, report = extract_lora(tuned_model, base_model, tuned_clip, base_clip, opts, name="extracted")
        except (LoraError, RankError) as e:
            _fail(e)
        return io.NodeOutput(lora, report)


class ResizeLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_ResizeLoRA",
            display_name="Resize LoRA",
            category=CATEGORY,
            description="Change a LoRA's rank, keeping its strength: each layer's ΔW is re-factorized exactly "
                        "(SVD of its factors) and truncated to the rank the mode chooses; alpha/rank is kept. "
                        "LoHa/LoKr layers and full differences of 2-D and conv weights (as LoRA Stack makes of a "
                        "LoHa at a strength other than 1) are factorized too; 1-D differences (biases, norms) "
                        "are kept.",
            inputs=[LoraType.Input("lora", tooltip="The LoRA to resize.")] + _rank_inputs(16)
                   + [_clamp_input(), _device_input()],
            outputs=[LoraType.Output(display_name="LORA"),
                     io.String.Output(display_name="report", tooltip="Per-layer ranks and relative errors.")],
        )

    validate_inputs = classmethod(_validate_rank)

    @classmethod
    def execute(cls, lora, rank_mode, rank, rank_param, clamp_quantile, device):
        try:
            out, report = resize_lora(lora, _rank_spec(rank_mode, rank, rank_param), device=device,
                                      clamp_quantile=_clamp(clamp_quantile))
        except (LoraError, RankError) as e:
            _fail(e)
        return io.NodeOutput(out, report)


def _hidden():
    hs = [io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id]
    if hasattr(io.Hidden, "dynprompt"):
        hs.append(io.Hidden.dynprompt)
    return hs


def _file_recipe(cls, lora, key_format: str, dtype: str, hash_files: bool):
    """The provenance written into the file, as a function of the file's name (relative to the output
    folder): engine.recipe's format, with the LoRA's own provenance as its 'lora' part and the graph
    upstream of this node with its input files (no graph under --disable-metadata, as for Save Model)."""
    from ..engine import recipe as rcp
    from ..engine.saving import metadata_disabled
    graph = None
    if not metadata_disabled():
        import comfy.model_management as mm
        graph = rcp.graph_provenance(cls.hidden.prompt, cls.hidden.unique_id,
                                     dynprompt=getattr(cls.hidden, "dynprompt", None), hash_files=hash_files,
                                     check=mm.throw_exception_if_processing_interrupted)

    def for_file(relname: str) -> Dict[str, Any]:
        saved = {"node": "MergeLab_SaveLoRA", "file": relname, "dtype": dtype, "key_format": key_format,
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        rec = rcp.build_file_recipe({}, saved, graph)
        rec.setdefault("parts", {})["lora"] = lora.source
        return rec
    return for_file


class SaveLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_SaveLoRA",
            display_name="Save LoRA",
            category=CATEGORY,
            description="Write a LORA to a .safetensors file under ComfyUI's output folder (output/loras by default) "
                        "with a counter; never over an existing file, atomically. kohya key names (lora_unet_…, "
                        "lora_te…, with .alpha) load in ComfyUI, A1111/Forge and kohya tools; comfyui names are "
                        "what ComfyUI's own Extract and Save Lora writes. Metadata: ss_network_dim/alpha/module, "
                        "the base model and the recipe that made the LoRA. A DoRA layer of a LoRA is written as "
                        "DoRA (with its dora_scale) at strength 1; resize others (LoHa / LoKr DoRA, a stacked "
                        "DoRA) to a plain LoRA first.",
            inputs=[LoraType.Input("lora", tooltip="The LoRA to save."),
                    io.String.Input("filename_prefix", default="loras/MergeLab_lora",
                                    tooltip="Folder and name under the output folder; _00001_ etc. is appended."),
                    io.Combo.Input("key_format", options=list(KEY_FORMATS), default="kohya",
                                   tooltip="kohya: lora_unet_/lora_te names (SD1 UNet by diffusers paths, as kohya "
                                           "writes); layers without such a name (token/position embeddings, "
                                           "norms) are left out, with a warning. comfyui: "
                                           "diffusion_model./text_encoders. names, every layer."),
                    io.Combo.Input("dtype", options=list(SAVE_DTYPES), default="fp16",
                                   tooltip="Dtype of the factors in the file (alpha is stored as fp32). In fp16, "
                                           "factors that would lose precision (tiny values) are balanced first "
                                           "(same product); a value beyond fp16's range is an error."),
                    io.Boolean.Input("save_recipe", default=True, optional=True,
                                     tooltip="Write how the LoRA was made into the file's metadata (extraction / "
                                             "merge settings, the graph upstream of this node and its input files, "
                                             "and ComfyUI's prompt and workflow as Save Checkpoint writes them)."),
                    io.Boolean.Input("hash_input_files", default=True, optional=True,
                                     tooltip="Compute the sha256 of every model file the graph loads for the recipe "
                                             "(once per file and session; about 2 s per GB). Off: only hashes "
                                             "already computed are written.")],
            outputs=[io.String.Output(display_name="path", tooltip="The file written, relative to the output folder.")],
            hidden=_hidden(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix, key_format, dtype, save_recipe=True, hash_input_files=True):
        import folder_paths
        out_dir = folder_paths.get_output_directory()
        prefix = (filename_prefix or "").strip() or "loras/MergeLab_lora"
        try:
            recipe = _file_recipe(cls, lora, key_format, dtype, hash_input_files) if save_recipe else False
            # with the recipe, ComfyUI's prompt / workflow too, as Save Checkpoint writes them (the editor and
            # python -m mergelab.run read the workflow back from the file)
            extra = prompt_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo, always_prompt=False) \
                if save_recipe else None
            path = save_lora(lora, prefix, out_dir, key_format=key_format, dtype_name=dtype, recipe=recipe,
                             progress=comfy_progress(len(lora.layers)), extra_metadata=extra)
        except LoraError as e:
            _fail(e)
        except Exception as e:   # the output-folder guard of folder_paths raises a bare Exception
            if "outside the output folder" in str(e):
                raise ValueError(f"filename_prefix '{filename_prefix}' points outside the output folder") from None
            raise
        rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
        text = f"Saved output/{rel} ({lora.summary()})"
        warning = left_out_warning(lora, key_format)
        if warning:
            text += "\nwarning: " + warning
        return io.NodeOutput(rel, ui={"text": [text]})


LORA_NODES = [LoadLoraNode, LoraStackNode, ApplyLoraNode, LoraMergeInputNode, MergeLorasNode, ExtractLoraNode,
              ResizeLoraNode, SaveLoraNode]

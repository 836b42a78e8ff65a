"""Save nodes: checkpoint (MODEL + CLIP + VAE), diffusion model, CLIP; and Load Merge Recipe.

The files have the layout of ComfyUI's own CheckpointSave / ModelSave / CLIPSave, so ComfyUI's
loaders and other tools read them; they are written streaming (one tensor at a time, computed on the
CPU, never the whole model on the GPU), atomically (a temporary file renamed when complete), never
over an existing file, and carry the merge recipe.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Dict, List, Optional

from ..engine import recipe as rcp
from ..engine import saving
from ..engine import safetensors_writer as stw
from .comfy_api_compat import io

CATEGORY = "MergeLab/save"
RECIPE_FOLDERS = ("checkpoints", "diffusion_models", "loras", "text_encoders")
MAX_LISTED_OUTPUT_FILES = 5000


def _hidden():
    hs = [io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id]
    if hasattr(io.Hidden, "dynprompt"):
        hs.append(io.Hidden.dynprompt)
    return hs


_SCALED_HELP = (" fp8_e4m3fn_scaled: ComfyUI's scaled fp8 format (as its fp8_scaled files): each Linear layer's "
                "weight of the diffusion model in fp8 with its own scale (max|W|/448, so small weights keep their "
                "precision), every other weight, the text encoders and the VAE as keep (ComfyUI 0.3.75 rounds a "
                "scaled layer's bias to plain fp8 when it loads the file).")


def _dtype_input(scaled: bool = True):
    return io.Combo.Input("dtype", options=list(saving.DTYPE_CHOICES if scaled else saving.CLIP_DTYPE_CHOICES),
                          default="keep",
                          tooltip="Dtype of the saved weights: keep = the dtype each weight has in ComfyUI "
                                  "(fp8 weights are saved dequantized, as bf16); fp16 / bf16 / fp32 convert every "
                                  "floating-point weight. fp8_e4m3fn / fp8_e5m2 halve an fp16 file again: the "
                                  "diffusion model's and text encoders' weights are rounded to fp8 (a plain cast, as "
                                  "ComfyUI's own fp8 loading; e4m3fn rounds |values| under about 0.001 to 0), the "
                                  "VAE keeps its dtype; ComfyUI loads it as other fp8 checkpoints."
                                  + (_SCALED_HELP if scaled else "") +
                                  " Weights with patches (LoRAs) are computed in fp32 and rounded once; merged "
                                  "weights are held in the dtype of the model the merge copies, so another dtype "
                                  "rounds them again. A weight beyond the dtype's range (fp16 65504, e4m3fn 448, e5m2 "
                                  "57344) is an error naming it.")


def _recipe_inputs():
    return [
        io.Boolean.Input("save_recipe", default=True,
                         tooltip="Write the merge recipe into the file's metadata (methods, parameters, seeds, "
                                 "block weights, the graph upstream of this node and the input files' names and "
                                 "sha256; no graph when ComfyUI runs with --disable-metadata), so Load Merge Recipe can show how "
                                 "to repeat the merge."),
        io.Boolean.Input("hash_input_files", default=True,
                         tooltip="Compute the sha256 of every model file the graph loads (once per file and "
                                 "session; about 2 s per GB). Off: only hashes already computed are written."),
    ]


def _interrupt_check():
    import comfy.model_management as mm
    return mm.throw_exception_if_processing_interrupted


def _hash_progress():
    """Progress of hashing one input file, on the node's progress bar."""
    import comfy.utils
    pbar = comfy.utils.ProgressBar(100)
    state = {"last": -1}

    def progress(done, total):
        pct = int(100 * done / max(1, total))
        if pct != state["last"]:
            state["last"] = pct
            pbar.update_absolute(pct, 100)
    return progress


def _comfy_version() -> str:
    try:
        import comfyui_version
        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


def _recipe_metadata(cls, node_id: str, parts: Dict[str, Any], dtype: str, save_recipe: bool,
                     hash_input_files: bool):
    """A ``metadata_fn(dest)`` for the saving engine that adds the recipe (or nothing)."""
    holder: Dict[str, Any] = {}

    def fn(dest) -> Dict[str, str]:
        if not save_recipe:
            return {}
        name = os.path.relpath(dest.final_path, dest.output_dir).replace(os.sep, "/")
        if saving.metadata_disabled():      # --disable-metadata: no graph (as for the prompt); the merge stays
            holder["graph"] = None
        if "graph" not in holder:           # once per node run, however many files it writes
            holder["graph"] = rcp.graph_provenance(cls.hidden.prompt, cls.hidden.unique_id,
                                                   dynprompt=cls.hidden.dynprompt, hash_files=hash_input_files,
                                                   check=_interrupt_check(), progress_factory=_hash_progress)
        graph = holder["graph"]
        saved = {"node": node_id, "file": name, "dtype": dtype,
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "comfyui_version": _comfy_version()}
        rec = rcp.build_file_recipe(parts, saved, graph)
        holder["recipe"] = rec
        return {rcp.METADATA_KEY: rcp.recipe_to_metadata(rec)}

    return fn, holder


def _size(n: int) -> str:
    return rcp._size(n)


def _summary(results: List[saving.SaveResult], recipe: Optional[Dict[str, Any]]) -> str:
    lines = [f"Saved output/{r.relpath} ({_size(r.nbytes)}, {r.tensors} tensors, {r.seconds:.1f} s)" for r in results]
    if recipe is not None:
        lines.append("")
        lines.append(rcp.describe(recipe))
    return "\n".join(lines)


def _fail(e: Exception):
    if isinstance(e, (saving.SaveError, stw.SafetensorsFormatError)):
        raise ValueError(str(e)) from None
    raise e


def _save_checkpoint(cls, node_id, default_prefix, model, clip, vae, filename_prefix, dtype, save_recipe,
                     hash_input_files):
    """One file holding ``model`` (and ``clip`` / ``vae`` when given), with the recipe when asked."""
    inputs = {k: v for k, v in (("model", model), ("clip", clip), ("vae", vae)) if v is not None}
    fn, holder = _recipe_metadata(cls, node_id, inputs, dtype, save_recipe, hash_input_files)
    try:
        res = saving.save_checkpoint(model, clip, vae, filename_prefix, dtype, prompt=cls.hidden.prompt,
                                     extra_pnginfo=cls.hidden.extra_pnginfo, metadata_fn=fn,
                                     default_prefix=default_prefix, progress=saving.comfy_progress())
    except (saving.SaveError, stw.SafetensorsFormatError) as e:
        _fail(e)
    return io.NodeOutput(res.relpath, ui={"text": [_summary([res], holder.get("recipe"))]})


class SaveCheckpointNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_SaveCheckpoint",
            display_name="Save Checkpoint (streaming)",
            category=CATEGORY,
            description="Save MODEL + CLIP + VAE as one checkpoint in ComfyUI's own layout (as Save Checkpoint "
                        "writes it), under the output folder. Weights are computed and written one at a time on the "
                        "CPU (merges and LoRAs applied), so the model is never loaded on the GPU nor held twice "
                        "in memory. The file appears only when complete; existing files are never overwritten.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to save (merges and LoRAs applied)."),
                    io.Clip.Input("clip", tooltip="The text encoder(s) to save with it."),
                    io.Vae.Input("vae", tooltip="The VAE to save with it."),
                    io.String.Input("filename_prefix", default="checkpoints/MergeLab",
                                    tooltip="Folder/name under ComfyUI's output folder; a counter is added "
                                            "(name_00001_.safetensors). '..' and absolute paths stay inside output."),
                    _dtype_input()] + _recipe_inputs(),
            outputs=[io.String.Output(display_name="filename",
                                      tooltip="The saved file, relative to the output folder.")],
            hidden=_hidden(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, filename_prefix, dtype="keep", save_recipe=True, hash_input_files=True):
        return _save_checkpoint(cls, "MergeLab_SaveCheckpoint", "checkpoints/MergeLab", model, clip, vae,
                                filename_prefix, dtype, save_recipe, hash_input_files)


class SaveModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_SaveModel",
            display_name="Save Model (streaming)",
            category=CATEGORY,
            description="Save the diffusion model alone in ComfyUI's layout (as ModelSave writes it, loadable with "
                        "Load Diffusion Model or Load Checkpoint), streaming, atomically, never overwriting.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to save (merges and LoRAs applied)."),
                    io.String.Input("filename_prefix", default="diffusion_models/MergeLab",
                                    tooltip="Folder/name under ComfyUI's output folder; a counter is added."),
                    _dtype_input()] + _recipe_inputs(),
            outputs=[io.String.Output(display_name="filename",
                                      tooltip="The saved file, relative to the output folder.")],
            hidden=_hidden(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix, dtype="keep", save_recipe=True, hash_input_files=True):
        return _save_checkpoint(cls, "MergeLab_SaveModel", "diffusion_models/MergeLab", model, None, None,
                                filename_prefix, dtype, save_recipe, hash_input_files)


class SaveCLIPNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_SaveCLIP",
            display_name="Save CLIP (streaming)",
            category=CATEGORY,
            description="Save the text encoder(s), one file per encoder (clip_l, clip_g, t5xxl, ...) as ComfyUI's "
                        "CLIPSave does, streaming, atomically, never overwriting.",
            inputs=[io.Clip.Input("clip", tooltip="The text encoder(s) to save (merges and LoRAs applied)."),
                    io.String.Input("filename_prefix", default="clip/MergeLab",
                                    tooltip="Folder/name under ComfyUI's output folder; the encoder name and a "
                                            "counter are added (name_clip_l_00001_.safetensors)."),
                    _dtype_input(scaled=False)] + _recipe_inputs(),
            outputs=[io.String.Output(display_name="filenames",
                                      tooltip="The saved files, relative to the output folder, one per line.")],
            hidden=_hidden(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clip, filename_prefix, dtype="keep", save_recipe=True, hash_input_files=True):
        fn, holder = _recipe_metadata(cls, "MergeLab_SaveCLIP", {"clip": clip}, dtype, save_recipe, hash_input_files)
        try:
            results = saving.save_clip(clip, filename_prefix, dtype, prompt=cls.hidden.prompt,
                                       extra_pnginfo=cls.hidden.extra_pnginfo, default_prefix="clip/MergeLab",
                                       progress_factory=lambda n: saving.comfy_progress(n),
                                       metadata_fn=fn if save_recipe else None)
        except (saving.SaveError, stw.SafetensorsFormatError) as e:
            _fail(e)
        text = _summary(results, holder.get("recipe"))
        return io.NodeOutput("\n".join(r.relpath for r in results), ui={"text": [text]})


# ---------------------------------------------------------------------------------------------
# Load Merge Recipe
# ---------------------------------------------------------------------------------------------
def recipe_file_options() -> List[str]:
    """``<folder>/<name>`` for the .safetensors files of the model folders, then ``output/<path>``."""
    import folder_paths
    out: List[str] = []
    for folder in RECIPE_FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except Exception:  # noqa: BLE001 - folder unknown to this ComfyUI
            continue
        out.extend(f"{folder}/{n}" for n in names if n.lower().endswith(".safetensors"))
    root = folder_paths.get_output_directory()
    found: List[str] = []
    if os.path.isdir(root):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.lower().endswith(".safetensors") and not f.startswith("."):
                    rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                    found.append(f"output/{rel}")
                    if len(found) >= MAX_LISTED_OUTPUT_FILES:
                        break
            if len(found) >= MAX_LISTED_OUTPUT_FILES:
                break
    return out + found


def resolve_recipe_file(choice: str) -> str:
    """The full path of a Load Merge Recipe choice; raises ValueError with a clear message."""
    import folder_paths
    if not isinstance(choice, str) or "/" not in choice:
        raise ValueError(f"Load Merge Recipe: {choice!r} is not a file choice (expected '<folder>/<name>')")
    folder, name = choice.split("/", 1)
    if folder == "output":
        root = os.path.abspath(folder_paths.get_output_directory())
        path = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"Load Merge Recipe: {choice!r} is outside the output folder")
    else:
        path = folder_paths.get_full_path(folder, name) if folder in RECIPE_FOLDERS else None
        if not path:
            raise ValueError(f"Load Merge Recipe: {choice!r} was not found in the {folder} folder")
    if not os.path.isfile(path):
        raise ValueError(f"Load Merge Recipe: {choice!r} does not exist (anymore); refresh the node's file list")
    return path


def read_recipe(path: str):
    """``(recipe or None, metadata)`` of a safetensors file (reads the header only)."""
    try:
        _, meta = stw.read_header(path)
    except (stw.SafetensorsFormatError, OSError) as e:
        raise ValueError(f"Load Merge Recipe: cannot read {os.path.basename(path)}: {e}") from None
    return rcp.recipe_from_metadata(meta), meta


class LoadMergeRecipeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_LoadMergeRecipe",
            display_name="Load Merge Recipe",
            category=CATEGORY,
            description="Read the merge recipe from a saved .safetensors file (methods, parameters, seeds, block "
                        "weights, input files and hashes, the graph that made it) and show it.",
            inputs=[io.Combo.Input("file", options=recipe_file_options(),
                                   tooltip="A .safetensors file from the checkpoints, diffusion_models, loras or "
                                           "text_encoders folders, or from the output folder (output/...). "
                                           "Refresh (R) to list newly saved files.")],
            outputs=[io.String.Output(display_name="recipe_json",
                                      tooltip="The recipe as JSON ('null' when the file has none)."),
                     io.String.Output(display_name="summary", tooltip="The recipe in words.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, file):
        try:
            st = os.stat(resolve_recipe_file(file))
            return f"{file}:{st.st_size}:{st.st_mtime_ns}"
        except Exception:  # noqa: BLE001 - execute reports the error
            return file

    @classmethod
    def execute(cls, file):
        path = resolve_recipe_file(file)
        recipe, meta = read_recipe(path)
        text = f"{file}\n" + rcp.describe(recipe, meta)
        rec_json = json.dumps(recipe, indent=2, ensure_ascii=False)
        return io.NodeOutput(rec_json, text, ui={"text": [text]})


SAVE_NODES = [SaveCheckpointNode, SaveModelNode, SaveCLIPNode, LoadMergeRecipeNode]

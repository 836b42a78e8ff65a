"""The editor→API converter and the headless runner."""
import glob
import json
import os
import subprocess
import sys

import pytest

from mergelab import REPO_ROOT
from mergelab.run import run_workflow
from mergelab.workflow import WorkflowError, apply_overrides, to_api


def _templates():
    import comfyui_workflow_templates_media_image  # noqa: F401  (installed with ComfyUI's requirements)
    import site
    roots = {os.path.dirname(os.path.dirname(m.__file__)) for m in [comfyui_workflow_templates_media_image]}
    files = []
    for r in roots:
        files += glob.glob(os.path.join(r, "comfyui_workflow_templates*", "templates", "*.json"))
    return sorted(files)


def test_core_templates_convert_and_validate(harness):
    """Every bundled ComfyUI template made only of known core nodes converts, and ComfyUI's own
    validation accepts the result except for model/media files that are not installed here."""
    import asyncio
    import execution
    import nodes

    checked = with_subgraphs = 0
    for f in _templates():
        data = json.load(open(f, encoding="utf-8"))
        if not isinstance(data, dict) or "nodes" not in data:
            continue
        definitions = (data.get("definitions") or {}).get("subgraphs") or []
        known = {*nodes.NODE_CLASS_MAPPINGS, *(d["id"] for d in definitions), "Reroute", "PrimitiveNode", "Note",
                 "MarkdownNote"}
        if any(n["type"] not in known for g in [data, *definitions] for n in g["nodes"]):
            continue
        prompt = to_api(data, nodes.NODE_CLASS_MAPPINGS)
        ok, err, outs, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))[:4]
        problems = [(nid, e["type"], e["details"]) for nid, ne in (node_errors or {}).items() for e in ne["errors"]
                    if e["type"] not in ("value_not_in_list", "custom_validation_failed")]
        assert not problems, (os.path.basename(f), problems[:3])
        checked += 1
        with_subgraphs += bool(definitions)
    assert checked >= 30 and with_subgraphs >= 8, (checked, with_subgraphs)


def _node(nid, typ, widgets=(), inputs=(), outputs=(), mode=0, title=None):
    d = {"id": nid, "type": typ, "mode": mode, "widgets_values": list(widgets), "inputs": list(inputs),
         "outputs": list(outputs)}
    if title:
        d["title"] = title
    return d


def test_converter_follows_reroutes_primitives_bypass_and_seed_controls(harness):
    import nodes

    wf = {"nodes": [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"],
              outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}]),
        _node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
              outputs=[{"name": "", "type": "MODEL", "links": [2]}]),
        _node(3, "ModelMergeSimple", [0.25], inputs=[{"name": "model1", "type": "MODEL", "link": 2},
                                                      {"name": "model2", "type": "MODEL", "link": 2}],
              outputs=[{"name": "MODEL", "type": "MODEL", "links": [3]}], mode=4),
        _node(4, "KSampler", [123, "randomize", 20, 8.0, "euler", "normal", 1.0],
              inputs=[{"name": "model", "type": "MODEL", "link": 3},
                      {"name": "steps", "type": "INT", "link": 4, "widget": {"name": "steps"}}],
              title="Sampler"),
        _node(5, "PrimitiveNode", [33, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [4]}]),
        _node(6, "Note", ["hello"]),
        _node(7, "CLIPTextEncode", ["muted"], mode=2),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"],
                 [4, 5, 0, 4, 4, "INT"]]}
    p = to_api(wf, nodes.NODE_CLASS_MAPPINGS)
    assert set(p) == {"1", "4"}
    ks = p["4"]["inputs"]
    assert ks["model"] == ["1", 0]                 # through the reroute and the bypassed merge
    assert ks["seed"] == 123 and ks["steps"] == 33  # control value skipped; primitive inlined
    assert ks["cfg"] == 8.0 and ks["sampler_name"] == "euler" and ks["denoise"] == 1.0
    apply_overrides(p, ["Sampler.cfg=4.5", "1.ckpt_name=b.safetensors"])
    assert ks["cfg"] == 4.5 and p["1"]["inputs"]["ckpt_name"] == "b.safetensors"
    with pytest.raises(WorkflowError, match="no node"):
        apply_overrides(p, ["Nope.cfg=1"])


def test_overrides_reach_inputs_and_titles_with_dots():
    """Block-weight widgets are named like ``input_blocks.4.``, and titles may hold dots too."""
    p = {"9": {"class_type": "MergeLab_BlockWeightsSD1", "inputs": {"input_blocks.4.": 1.0, "models": "all"},
               "_meta": {"title": "blocks v1.5"}},
         "10": {"class_type": "KSampler", "inputs": {"cfg": 8.0}}}
    apply_overrides(p, ["9.input_blocks.4.=0", "blocks v1.5.models=2", "KSampler.cfg=3", "10.new_input=1"])
    assert p["9"]["inputs"] == {"input_blocks.4.": 0, "models": 2}
    assert p["10"]["inputs"] == {"cfg": 3, "new_input": 1}
    with pytest.raises(WorkflowError, match="no node"):
        apply_overrides(p, ["9x.input_blocks.4.=0"])


def test_runner_errors(harness, tmp_path, capsys):
    # unknown node type
    code = run_workflow({"nodes": [_node(1, "NoSuchNode")], "links": []}, [], harness, quiet=True)
    assert code != 0 and "unknown type 'NoSuchNode'" in capsys.readouterr().err
    # missing model
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
          "2": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                           "filename_prefix": "x"}}}
    code = run_workflow(wf, [], harness, quiet=True)
    err = capsys.readouterr().err
    assert code != 0 and "missing.safetensors" in err


@pytest.mark.parametrize("content,expect", [(None, "not found"), ("{not json", "not valid JSON")])
def test_runner_cli_rejects_missing_and_invalid_files(tmp_path, content, expect):
    path = tmp_path / "wf.json"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "mergelab.run", str(path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and expect in proc.stderr


def _cond(nid, text, link):
    return _node(nid, "CLIPTextEncode", [text], inputs=[{"name": "clip", "type": "CLIP", "link": None}],
                 outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [link]}])


def test_bypass_passes_the_input_of_the_same_slot_as_the_frontend(harness):
    """A bypassed node with two inputs of one type (ControlNetApplyAdvanced: positive, negative) passes
    each output its own input, as the frontend's graphToPrompt does (the same slot first, then the type),
    not the first input of that type to both; an unconnected same-slot input passes nothing."""
    import nodes

    cn_inputs = [{"name": "positive", "type": "CONDITIONING", "link": 1},
                 {"name": "negative", "type": "CONDITIONING", "link": 2},
                 {"name": "control_net", "type": "CONTROL_NET", "link": None},
                 {"name": "image", "type": "IMAGE", "link": None}]
    wf = {"nodes": [
        _cond(2, "pos", 1), _cond(3, "neg", 2),
        _node(4, "ControlNetApplyAdvanced", [1.0, 0.0, 1.0], inputs=cn_inputs, mode=4,
              outputs=[{"name": "positive", "type": "CONDITIONING", "links": [3]},
                       {"name": "negative", "type": "CONDITIONING", "links": [4]}]),
        _node(5, "KSampler", [1, "fixed", 20, 8.0, "euler", "normal", 1.0],
              inputs=[{"name": "positive", "type": "CONDITIONING", "link": 3},
                      {"name": "negative", "type": "CONDITIONING", "link": 4}]),
    ], "links": [[1, 2, 0, 4, 0, "CONDITIONING"], [2, 3, 0, 4, 1, "CONDITIONING"],
                 [3, 4, 0, 5, 0, "CONDITIONING"], [4, 4, 1, 5, 1, "CONDITIONING"]]}
    ks = to_api(wf, nodes.NODE_CLASS_MAPPINGS)["5"]["inputs"]
    assert ks["positive"] == ["2", 0] and ks["negative"] == ["3", 0]
    # ModelMergeSimple bypassed with model1 unconnected: its output passes model1 (nothing), not model2
    wf = {"nodes": [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}]),
        _node(3, "ModelMergeSimple", [0.5], inputs=[{"name": "model1", "type": "MODEL", "link": None},
                                                    {"name": "model2", "type": "MODEL", "link": 1}],
              outputs=[{"name": "MODEL", "type": "MODEL", "links": [2]}], mode=4),
        _node(4, "KSampler", [1, "fixed", 20, 8.0, "euler", "normal", 1.0],
              inputs=[{"name": "model", "type": "MODEL", "link": 2}]),
    ], "links": [[1, 1, 0, 3, 1, "MODEL"], [2, 3, 0, 4, 0, "MODEL"]]}
    assert "model" not in to_api(wf, nodes.NODE_CLASS_MAPPINGS)["4"]["inputs"]


def test_converter_errors_name_broken_links_and_group_nodes(harness):
    import nodes

    wf = {"nodes": [_node(4, "KSampler", [1, "fixed", 20, 8.0, "euler", "normal", 1.0],
                          inputs=[{"name": "model", "type": "MODEL", "link": 9}])],
          "links": [[9, 77, 0, 4, 0, "MODEL"]]}
    with pytest.raises(WorkflowError, match="linked to node 77, which is not in the workflow"):
        to_api(wf, nodes.NODE_CLASS_MAPPINGS)
    with pytest.raises(WorkflowError, match="group node"):
        to_api({"nodes": [_node(1, "workflow>my group")], "links": []}, nodes.NODE_CLASS_MAPPINGS)
    # a subgraph whose definition holds a node of itself (a damaged file): an error, not an endless recursion
    loop = {"id": "loop-id", "name": "loop", "inputs": [], "outputs": [{"name": "MODEL", "type": "MODEL", "linkIds": [5]}],
            "nodes": [_node(1, "loop-id", outputs=[{"name": "MODEL", "type": "MODEL", "links": [5]}])],
            "links": [{"id": 5, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}]}
    wf = {"nodes": [_node(3, "ModelSave", ["x"], inputs=[{"name": "model", "type": "MODEL", "link": 1}]),
                    _node(2, "loop-id", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}])],
          "links": [[1, 2, 0, 3, 0, "MODEL"]], "definitions": {"subgraphs": [loop]}}
    with pytest.raises(WorkflowError, match="subgraph 'loop' contains itself"):
        to_api(wf, nodes.NODE_CLASS_MAPPINGS)


def test_overrides_check_input_names_and_default_titles(harness):
    """A misspelt input is an error naming the node's inputs (it was added silently and ignored); nodes are
    found by the title the editor shows even when the workflow does not save it (the display name)."""
    import nodes

    wf = {"nodes": [_node(1, "EmptyImage", [64, 64, 1, 0]), _node(2, "CheckpointLoaderSimple", ["a.safetensors"])],
          "links": []}
    p = to_api(wf, nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    title = nodes.NODE_DISPLAY_NAME_MAPPINGS.get("EmptyImage", "EmptyImage")
    assert p["1"]["_meta"]["title"] == title
    ckpt_title = nodes.NODE_DISPLAY_NAME_MAPPINGS["CheckpointLoaderSimple"]       # "Load Checkpoint"
    assert p["2"]["_meta"]["title"] == ckpt_title != "CheckpointLoaderSimple"
    apply_overrides(p, [f"{title}.width=32", f"{ckpt_title}.ckpt_name=b.safetensors"], nodes.NODE_CLASS_MAPPINGS)
    assert p["1"]["inputs"]["width"] == 32 and p["2"]["inputs"]["ckpt_name"] == "b.safetensors"
    with pytest.raises(WorkflowError, match="has no input 'widht'; its inputs: width, height"):
        apply_overrides(p, ["1.widht=8"], nodes.NODE_CLASS_MAPPINGS)


def test_core_image_nodes_run_and_progress_names_the_nodes(harness, capsys):
    """comfy_extras' image nodes (ImageCrop, GetImageSize, ...: their module imports ComfyUI's server) are
    there, and run; the progress line names each node as it starts (the executor's "executing" events)."""
    import nodes

    for t in ("ImageCrop", "ImageStitch", "GetImageSize", "SaveAnimatedWEBP", "ImageScaleToMaxDimension"):
        assert t in nodes.NODE_CLASS_MAPPINGS, t
    wf = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
          "2": {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": 32, "height": 16, "x": 0, "y": 0}},
          "3": {"class_type": "GetImageSize", "inputs": {"image": ["2", 0]}},
          "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "runner/crop"}}}
    run = __import__("mergelab.run", fromlist=["execute_workflow"]).execute_workflow(wf, [], harness)
    err = capsys.readouterr().err
    assert run.code == 0, run.error
    assert any(p.endswith(".png") and "crop" in p for p in run.written)
    assert "#2 ImageCrop" in err and "#4 SaveImage" in err


def test_runner_runs_a_subgraph_with_its_widget_and_an_override_of_an_inner_node(harness, capsys):
    """An editor-format workflow with a subgraph node (ImageCrop inside, its width wired to a subgraph input,
    so the subgraph node has a 'width' widget of its own): it runs; the crop has the subgraph node's width
    (20, not the inner widget's 32), then the width set with --set on the subgraph node (by its title) and the
    height with --set on the inner node's id 5:2."""
    import nodes
    from PIL import Image

    sg_id = "1b7c0d9e-0000-4000-8000-00000000c0de"
    definition = {
        "id": sg_id, "name": "crop", "nodes": [
            _node(2, "ImageCrop", [32, 16, 0, 0],
                  inputs=[{"name": "image", "type": "IMAGE", "link": 10},
                          {"name": "width", "type": "INT", "widget": {"name": "width"}, "link": 11}],
                  outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [12]}])],
        "links": [{"id": 10, "origin_id": -10, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"},
                  {"id": 11, "origin_id": -10, "origin_slot": 1, "target_id": 2, "target_slot": 1, "type": "INT"},
                  {"id": 12, "origin_id": 2, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"}],
        "inputs": [{"name": "image", "type": "IMAGE", "linkIds": [10]}, {"name": "width", "type": "INT", "linkIds": [11]}],
        "outputs": [{"name": "IMAGE", "type": "IMAGE", "linkIds": [12]}]}
    wf = {"nodes": [
        _node(1, "EmptyImage", [64, 48, 1, 0], outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}]),
        _node(5, sg_id, [20], inputs=[{"name": "image", "type": "IMAGE", "link": 1},
                                      {"name": "width", "type": "INT", "widget": {"name": "width"}, "link": None}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]}]),
        _node(3, "SaveImage", ["runner/subgraph"], inputs=[{"name": "images", "type": "IMAGE", "link": 2}])],
        "links": [[1, 1, 0, 5, 0, "IMAGE"], [2, 5, 0, 3, 0, "IMAGE"]], "definitions": {"subgraphs": [definition]}}
    execute = __import__("mergelab.run", fromlist=["execute_workflow"]).execute_workflow
    for overrides, size in [(["5:2.height=8"], (20, 8)), (["crop.width=24", "5:2.height=8"], (24, 8))]:
        run = execute(wf, overrides, harness)
        err = capsys.readouterr().err
        assert run.code == 0, run.error
        written = [p for p in run.written if p.endswith(".png") and "subgraph" in p]
        assert len(written) == 1, run.written
        with Image.open(written[0]) as im:
            assert im.size == size, overrides
        assert "#5:2 Image Crop" in err, err[-2000:]
    subgraph_nodes = {}
    prompt = to_api(wf, nodes.NODE_CLASS_MAPPINGS, None, subgraph_nodes)
    assert subgraph_nodes == {"5": {"title": "crop", "widgets": {"width": [("5:2", "width")]}}}
    with pytest.raises(WorkflowError, match=r"subgraph node 5 has no widget 'height' .* its widgets: width"):
        apply_overrides(prompt, ["5.height=3"], nodes.NODE_CLASS_MAPPINGS, subgraph_nodes)


def test_files_comfyui_saved_hold_the_workflow_and_run_again(harness, tmp_path, capsys):
    """As queued from the editor, what an editor-format workflow saves holds it (a PNG's 'workflow' text, a
    .latent's safetensors metadata), and the runner runs a workflow from such a file: the same outputs
    again, in new files."""
    from PIL import Image
    from safetensors.torch import load_file
    from mergelab.workflow import load_workflow

    execute = __import__("mergelab.run", fromlist=["execute_workflow"]).execute_workflow
    wf = {"nodes": [
        _node(1, "EmptyImage", [24, 16, 1, 0x3366CC], outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}]),
        _node(2, "SaveImage", ["runner/embedded"], inputs=[{"name": "images", "type": "IMAGE", "link": 1}]),
        _node(3, "EmptyLatentImage", [64, 32, 1], outputs=[{"name": "LATENT", "type": "LATENT", "links": [2]}]),
        _node(4, "SaveLatent", ["runner/embedded"], inputs=[{"name": "samples", "type": "LATENT", "link": 2}])],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 3, 0, 4, 0, "LATENT"]]}
    first = execute(wf, [], harness, quiet=True)
    assert first.code == 0, first.error
    png = [p for p in first.written if p.endswith(".png") and "embedded" in p]
    latent = [p for p in first.written if p.endswith(".latent") and "embedded" in p]
    assert len(png) == 1 and len(latent) == 1, first.written
    assert load_workflow(png[0]) == wf and load_workflow(latent[0]) == wf
    for path in (png[0], latent[0]):
        again = execute(path, [], harness, quiet=True)
        assert again.code == 0, again.error
        new_png = [p for p in again.written if p.endswith(".png") and "embedded" in p]
        new_latent = [p for p in again.written if p.endswith(".latent") and "embedded" in p]
        assert len(new_png) == 1 and new_png[0] != png[0] and len(new_latent) == 1 and new_latent[0] != latent[0]
        with Image.open(png[0]) as a, Image.open(new_png[0]) as b:
            assert a.size == (24, 16) and a.tobytes() == b.tobytes()
        assert load_file(new_latent[0])["latent_tensor"].equal(load_file(latent[0])["latent_tensor"])
    # with --set, the file holds the prompt that ran (the editor-format workflow lacks the override)
    changed = execute(wf, ["1.width=20"], harness, quiet=True)
    png = [p for p in changed.written if p.endswith(".png") and "embedded" in p]
    assert load_workflow(png[0])["1"]["inputs"]["width"] == 20
    again = execute(png[0], [], harness, quiet=True)
    with Image.open([p for p in again.written if p.endswith(".png")][0]) as im:
        assert im.size == (20, 16)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    capsys.readouterr()
    assert execute(str(plain), [], harness, quiet=True).code == 2
    assert "holds no ComfyUI workflow" in capsys.readouterr().err


def test_animated_webp_and_videos_comfyui_saved_hold_the_workflow_and_run_again(harness):
    """The workflow in an animated WebP (SaveAnimatedWEBP's EXIF entries 'workflow:{...}') and in videos
    (SaveVideo's MP4, SaveWEBM's WebM: their container metadata) is read back and runs again: the same
    outputs, in new files.  (The runner read PNGs and safetensors files only.)"""
    from mergelab.workflow import load_workflow

    execute = __import__("mergelab.run", fromlist=["execute_workflow"]).execute_workflow
    wf = {"nodes": [
        _node(1, "EmptyImage", [32, 16, 2, 0x3366CC], outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1, 2, 3]}]),
        _node(2, "SaveAnimatedWEBP", ["runner/anim", 6.0, True, 80, "default"],
              inputs=[{"name": "images", "type": "IMAGE", "link": 1}]),
        _node(3, "CreateVideo", [8.0], inputs=[{"name": "images", "type": "IMAGE", "link": 2}],
              outputs=[{"name": "VIDEO", "type": "VIDEO", "links": [4]}]),
        _node(4, "SaveVideo", ["runner/clip", "mp4", "h264"], inputs=[{"name": "video", "type": "VIDEO", "link": 4}]),
        _node(5, "SaveWEBM", ["runner/clipw", "vp9", 8.0, 32.0], inputs=[{"name": "images", "type": "IMAGE", "link": 3}])],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 1, 0, 3, 0, "IMAGE"], [3, 1, 0, 5, 0, "IMAGE"],
                  [4, 3, 0, 4, 0, "VIDEO"]]}
    first = execute(wf, [], harness, quiet=True)
    assert first.code == 0, first.error
    saved = {ext: [p for p in first.written if p.endswith(ext)] for ext in (".webp", ".mp4", ".webm")}
    assert all(len(v) == 1 for v in saved.values()), first.written
    for ext, (path,) in saved.items():
        assert load_workflow(path) == wf, ext
        again = execute(path, [], harness, quiet=True)
        assert again.code == 0, again.error
        made = {e: [p for p in again.written if p.endswith(e)] for e in saved}
        assert all(len(v) == 1 and v[0] not in saved[e] for e, v in made.items()), (ext, again.written)
    # with --set, the prompt that ran (under 'prompt')
    changed = execute(wf, ["1.width=24"], harness, quiet=True)
    (webp,) = [p for p in changed.written if p.endswith(".webp")]
    assert load_workflow(webp)["1"]["inputs"]["width"] == 24


@pytest.mark.parametrize("fmt,codec,sample_format", [("flac", "flac", "s16"), ("ogg", "libopus", "flt"),
                                                      ("mp3", "libmp3lame", "flt")])
def test_audio_files_give_back_their_workflow(tmp_path, fmt, codec, sample_format):
    """Audio written as ComfyUI's SaveAudio / SaveAudioOpus / SaveAudioMP3 write it (the workflow and prompt as
    the container's metadata; their nodes need torchaudio, which this environment lacks, so the file is made with
    av directly): the workflow comes back (Ogg holds the tags on its stream)."""
    import av
    import numpy as np
    from mergelab.workflow import load_workflow
    wf = {"nodes": [], "links": [], "extra": {"note": "audio"}}
    path = str(tmp_path / f"sound.{fmt}")
    with av.open(path, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=48000)
        out.metadata["prompt"] = json.dumps({"1": {"class_type": "EmptyImage", "inputs": {}}})
        out.metadata["workflow"] = json.dumps(wf)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), dtype=np.int16 if sample_format == "s16" else np.float32),
                                           format=sample_format, layout="mono")
        frame.sample_rate = 48000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    assert load_workflow(path) == wf


def test_models_folder_keeps_legacy_names_and_creates_nothing(tmp_path):
    """python -m mergelab.run --models DIR in a real ComfyUI: a diffusion model in DIR/unet/ (ComfyUI's legacy
    folder beside diffusion_models/) is found (the file here is not a model, so loading it fails after
    validation accepted its name), no folder is created in DIR (about 20 were), and the runner's own
    ComfyUI folder (custom_nodes/, user/, temp/, ...) is gone from the temporary directory after it exits."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    (models / "unet" / "legacy_unet.safetensors").write_bytes(b"not a model")
    wf = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "legacy_unet.safetensors",
                                                       "weight_dtype": "default"}},
          "2": {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": "x"}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    proc = subprocess.run([sys.executable, "-m", "mergelab.run", str(path), "--models", str(models), "--output",
                           str(tmp_path / "out"), "--cpu", "--quiet"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TMPDIR=str(tmp)))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "not in" not in proc.stderr and "UNETLoader" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(models)) == ["unet"]
    assert not [p for p in os.listdir(tmp) if p.startswith("mergelab-comfy-")], os.listdir(tmp)


def test_runner_loads_extra_model_paths_yaml(harness, tmp_path):
    import folder_paths
    from mergelab import run as runner

    extra = tmp_path / "more_checkpoints"
    extra.mkdir()
    (tmp_path / "extra_model_paths.yaml").write_text(f"mine:\n  base_path: {tmp_path}\n  checkpoints: more_checkpoints\n")
    before = list(folder_paths.folder_names_and_paths["checkpoints"][0])
    try:
        runner._load_extra_model_paths(str(tmp_path))
        assert str(extra) in folder_paths.get_folder_paths("checkpoints")
    finally:
        folder_paths.folder_names_and_paths["checkpoints"] = (before, folder_paths.folder_names_and_paths["checkpoints"][1])


def test_ctrl_c_interrupts_the_run(tmp_path):
    """SIGINT while a workflow runs stops it before its last node (exit 130, nothing saved); it was taken
    by asyncio.run inside ComfyUI's executor and the run went on to the end with exit 0."""
    import signal
    import time

    wf = {"1": {"class_type": "EmptyImage", "inputs": {"width": 768, "height": 768, "batch_size": 4, "color": 0}}}
    prev = "1"
    for i in range(2, 42):
        wf[str(i)] = {"class_type": "ImageBlur", "inputs": {"image": [prev, 0], "blur_radius": 31, "sigma": 3.0}}
        prev = str(i)
    wf["99"] = {"class_type": "SaveImage", "inputs": {"images": [prev, 0], "filename_prefix": "ctrl_c/x"}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mergelab.run", str(path), "--output", str(out), "--cpu"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    t0 = time.time()
    while "ImageBlur" not in seen and time.time() - t0 < 120 and proc.poll() is None:
        seen += proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else os.read(proc.stderr.fileno(), 4096).decode()
    assert "ImageBlur" in seen, seen[-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (stdout, seen + stderr)
    assert "interrupted" in stderr
    assert not glob.glob(str(out / "ctrl_c" / "*"))

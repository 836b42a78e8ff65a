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

    checked = 0
    for f in _templates():
        data = json.load(open(f, encoding="utf-8"))
        if not isinstance(data, dict) or "nodes" not in data or (data.get("definitions") or {}).get("subgraphs"):
            continue
        if any(n["type"] not in nodes.NODE_CLASS_MAPPINGS and n["type"] not in ("Reroute", "PrimitiveNode", "Note",
               "MarkdownNote") for n in data["nodes"]):
            continue
        prompt = to_api(data, nodes.NODE_CLASS_MAPPINGS)
        ok, err, outs, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))[:4]
        problems = [(nid, e["type"], e["details"]) for nid, ne in (node_errors or {}).items() for e in ne["errors"]
                    if e["type"] not in ("value_not_in_list", "custom_validation_failed")]
        assert not problems, (os.path.basename(f), problems[:3])
        checked += 1
    assert checked >= 30, checked


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

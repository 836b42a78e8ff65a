"""The pack loads through ComfyUI's own custom-node loader and registers real nodes."""
import json
import os
import subprocess
import sys

import pytest

from mergelab import REPO_ROOT, comfy_env


def test_loader_registers_pack_nodes(harness):
    import nodes  # ComfyUI's

    ids = harness.pack_node_ids
    assert ids, "ComfyUI's loader registered no node of the pack"
    assert all(i.startswith("MergeLab") for i in ids), ids
    assert "MergeLab_Method_ties" in ids and "MergeLab_Method_linear" in ids
    # registered through the V3 entrypoint: the classes are io.ComfyNode subclasses with our categories
    from comfy_api.latest import io
    for i in ids:
        cls = nodes.NODE_CLASS_MAPPINGS[i]
        assert issubclass(cls, io.ComfyNode), i
        info = cls.GET_SCHEMA() if hasattr(cls, "GET_SCHEMA") else cls.define_schema()
        assert info.category.startswith("MergeLab/"), (i, info.category)
    # the frontend folder is registered exactly once
    js_dirs = [d for d in nodes.EXTENSION_WEB_DIRS.values() if os.path.realpath(d) == os.path.join(REPO_ROOT, "js")]
    assert len(js_dirs) == 1


def test_method_node_runs_in_executor(harness):
    res = harness.run_ok(harness.with_defaults({
        "1": {"class_type": "MergeLab_Method_ties", "inputs": {"lambda": 0.5}},
        "2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "m"}},
    }))
    m = res.captured["m"]
    assert m.name == "ties" and m.get("lambda") == 0.5
    assert json.loads(json.dumps(m.to_dict()))["method"] == "ties"


def test_bad_widget_value_is_rejected_by_validation(harness):
    res = harness.run(harness.with_defaults({
        "1": {"class_type": "MergeLab_Method_ties", "inputs": {"lambda": 1e12}},
        "2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "m"}},
    }))
    assert not res.success
    assert "lambda" in res.error_text()


def test_method_widgets_offer_only_values_the_method_accepts(harness):
    """At both ends of every numeric widget of every method node, the method node runs (an excluded bound,
    such as eps > 0, is not offered by the widget).  All the cases run as one graph (a prompt per case costs
    about a second each); only when it fails are they run one by one, to name each failing case."""
    import nodes
    import importlib
    mm = importlib.import_module(f"{harness.pack_module_name}.merge_methods")
    cases = []
    for spec in mm.all_specs():
        node = f"MergeLab_Method_{spec.name}"
        required = nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"]
        for p in spec.global_params:
            kind, opts = required[p.name][0], required[p.name][1]
            if kind not in ("FLOAT", "INT"):
                continue
            for end in ("min", "max"):
                if abs(opts[end]) >= 1e9 or abs(opts[end]) >= 2 ** 31 - 1:
                    continue
                cases.append((spec.name, node, p.name, opts[end], end))
    assert len(cases) > 100

    def graph(chosen):
        g = {}
        for i, (_, node, name, value, _) in enumerate(chosen):
            g[f"m{i}"] = {"class_type": node, "inputs": {name: value}}
            g[f"c{i}"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": [f"m{i}", 0], "name": f"m{i}"}}
        return harness.with_defaults(g)

    res = harness.run(graph(cases))
    if res.success:
        assert len(res.captured) == len(cases)
        return
    failures = []
    for case in cases:
        one = harness.run(graph([case]))
        if not one.success:
            method, _, name, value, end = case
            failures.append(f"{method}.{name} = {value} ({end}): {one.error_text()[:160]}")
    assert failures, f"the graph of all cases failed, no case alone does: {res.error_text()[:300]}"
    assert not failures, "\n".join(failures)


def test_comfyui_path_not_comfyui_is_reported(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("not comfy")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(comfy_env.ComfyUINotFound) as e:
        comfy_env.comfyui_root()
    assert "is not a ComfyUI folder" in str(e.value) and "main.py" in str(e.value)
    # the set-up command says so too, and fails
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "mergelab.setup_env"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "is not a ComfyUI folder" in proc.stderr


def test_comfyui_path_missing_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nope"))
    with pytest.raises(comfy_env.ComfyUINotFound, match="does not exist"):
        comfy_env.comfyui_root()


def test_registry_metadata_points_at_files_the_pack_has():
    """pyproject.toml's [tool.comfy] Icon is a URL into this repository's main branch: the file must exist."""
    import re
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r'^Icon\s*=\s*"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/([^"]+)"', text, re.M)
    assert m, "no Icon URL into the repository in pyproject.toml"
    path = os.path.join(REPO_ROOT, m.group(1))
    assert os.path.isfile(path), m.group(1)
    with open(path, encoding="utf-8") as f:
        assert f.read().lstrip().startswith("<svg")

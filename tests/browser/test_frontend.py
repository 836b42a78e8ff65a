"""The MergeLab frontend extension (js/) in a real browser against a real ComfyUI server.

A ComfyUI server (``python main.py`` of the ComfyUI that ``mergelab.comfy_env.comfyui_root()`` finds) is
started with a temporary base directory whose ``custom_nodes/MergeLab`` is a symlink to this repository
(the ComfyUI tree is not touched).  ``frontend_check.mjs`` then drives Debian's Chromium headless through
playwright-core: it loads the UI, drags a block-weight point with the real mouse, applies a preset from the
node's menu, reads the method help, reloads a saved workflow and opens and runs every example workflow from
the templates dialog.  It writes what it saw to ``test-output/browser/result.json`` (with screenshots next
to it); the tests below check that record.

The server's model folders are empty, except for the sub-folders of ``$MERGELAB_MODELS_DIR`` when set (a
folder with checkpoints/, loras/, ..., as ``python -m mergelab.run --models`` takes).

Needs: node, ``tests/browser/node_modules`` (``npm ci`` there) and /usr/bin/chromium; ``setup.sh`` installs
them and is run here when something is missing.  The tests are skipped only when that fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "test-output", "browser")
PACK = "MergeLab"
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from comfy_server import get_json as _get  # noqa: E402  (tests/browser/comfy_server.py)

# Console messages of the page that are not failures, each with the reason.  Anything that mentions
# /extensions/MergeLab/ is never ignored.
IGNORED_CONSOLE = [
    ("the network is closed and --disable-api-nodes sets connect-src 'self': the frontend's look-ups on "
     "api.comfy.org (registry data for core and pack nodes) are blocked by the page's CSP",
     lambda m: "violates the following Content Security Policy directive" in m["text"]
     and "https://api.comfy.org/" in m["text"]),
    ("the frontend's index.html links an optional /user.css that ComfyUI 0.3.75 does not serve",
     lambda m: m["url"].endswith("/user.css") and "404" in m["text"]),
    ("the browser's automatic /favicon.ico request; ComfyUI serves none",
     lambda m: m["url"].endswith("/favicon.ico") and "404" in m["text"]),
    ("frontend 1.32.9's own bug: GraphView sets the render-mode setting LiteGraph.Canvas.MinFontSizeForLOD "
     "before the setting is registered (settingStore onChange reads .id of undefined); it happens with "
     "the MergeLab extension blocked too",
     lambda m: "Cannot read properties of undefined (reading 'id')" in m["text"]
     and "at onChange (" in m["text"] and "GraphView-" in m["text"]),
]


def _missing_thumbnail(m) -> bool:
    """A template card asks for <name>.jpg; a workflow shipped without a thumbnail gives a 404 (+ warning)."""
    prefix = f"/api/workflow_templates/{PACK}/"
    for where in (m["url"], m["text"]):
        i = where.find(prefix)
        if i >= 0:
            name = where[i + len(prefix):].split()[0].split("?")[0]
            if name.endswith(".jpg") and not os.path.exists(os.path.join(ROOT, "example_workflows", name)):
                return True
    return False


IGNORED_CONSOLE.append(("an example workflow without a .jpg thumbnail (optional; the card shows a placeholder)",
                        _missing_thumbnail))


# -------------------------------------------------------------------------------------------------
# tools
# -------------------------------------------------------------------------------------------------
def _chromium() -> str:
    return os.environ.get("CHROMIUM") or "/usr/bin/chromium"


def _missing_tools() -> list:
    missing = []
    if not shutil.which("node"):
        missing.append("node")
    if not os.access(_chromium(), os.X_OK):
        missing.append(_chromium())
    if not os.path.isfile(os.path.join(HERE, "node_modules", "playwright-core", "package.json")):
        missing.append("tests/browser/node_modules/playwright-core")
    return missing


@pytest.fixture(scope="module")
def tools():
    missing = _missing_tools()
    if missing:
        proc = subprocess.run(["bash", os.path.join(HERE, "setup.sh")], capture_output=True, text=True, timeout=900)
        missing = _missing_tools()
        if missing:
            pytest.skip(f"browser test tools not installable here ({', '.join(missing)} missing after "
                        f"tests/browser/setup.sh, exit {proc.returncode}): {(proc.stdout + proc.stderr)[-800:]}")


# -------------------------------------------------------------------------------------------------
# the example workflows and the models the queued one loads
# -------------------------------------------------------------------------------------------------
EXAMPLES_DIR = os.path.join(ROOT, "example_workflows")
CHECKPOINT_LOADERS = {"CheckpointLoaderSimple": 0}     # node type -> index of the file widget


def example_names() -> list:
    if not os.path.isdir(EXAMPLES_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(EXAMPLES_DIR) if f.endswith(".json"))


#: the example run to completion by default: the one with the least work on a CPU (measured with
#: `python -m mergelab.run` on the small SD1.5 checkpoints: ~30 s of CPU time, against ~110 s for
#: 01_dare_ties_merge); the others are opened and checked only.  MERGELAB_BROWSER_RUN_EXAMPLES=all (or a
#: comma-separated list of names) runs more.
DEFAULT_QUEUED = ["04_normalize_then_merge"]


def queued_examples() -> list:
    names = example_names()
    if not names:
        return []
    wanted = os.environ.get("MERGELAB_BROWSER_RUN_EXAMPLES", "")
    if wanted.strip() == "all":
        return names
    return [n.strip() for n in wanted.split(",") if n.strip()] or DEFAULT_QUEUED


def checkpoint_names(name: str) -> list:
    """The checkpoint files an example's loaders name, in node order."""
    with open(os.path.join(EXAMPLES_DIR, name + ".json"), encoding="utf-8") as f:
        wf = json.load(f)
    names = []
    for n in sorted(wf.get("nodes", []), key=lambda n: n["id"]):
        i = CHECKPOINT_LOADERS.get(n.get("type"))
        if i is not None and n.get("widgets_values") and n["widgets_values"][i] not in names:
            names.append(n["widgets_values"][i])
    return names


@pytest.fixture(scope="module")
def models_dir(tools, tmp_path_factory):
    """$MERGELAB_MODELS_DIR when set; otherwise a models folder whose checkpoints/ links every checkpoint
    name of the queued examples to the small generated SD1.5 checkpoints of ``mergelab.demo`` (base, then
    the two fine-tunes, in the order the loaders name them; made once and cached in .cache/fixtures)."""
    if os.environ.get("MERGELAB_MODELS_DIR"):
        return os.environ["MERGELAB_MODELS_DIR"]
    names = [n for ex in queued_examples() if ex in example_names() for n in checkpoint_names(ex)]
    if not names:
        return None
    code = ("import json; from mergelab.demo import fixture_checkpoints; "
            "p = fixture_checkpoints(small=True); print(json.dumps([p['base'], p['a'], p['b']]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"could not make the demo checkpoints:\n{(proc.stdout + proc.stderr)[-3000:]}")
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    folder = str(tmp_path_factory.mktemp("models"))
    os.makedirs(os.path.join(folder, "checkpoints"))
    for i, name in enumerate(dict.fromkeys(names)):
        os.symlink(files[i % len(files)], os.path.join(folder, "checkpoints", name))
    return folder


# -------------------------------------------------------------------------------------------------
# the ComfyUI server
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tools, models_dir, tmp_path_factory):
    from comfy_server import ServerError, running_server

    os.makedirs(OUT, exist_ok=True)
    try:
        with running_server(os.path.join(OUT, "server.log"), base=str(tmp_path_factory.mktemp("comfy_base")),
                            models_dir=models_dir) as srv:
            yield {"url": srv.url, "base": srv.base, "log": srv.log_tail}
    except ServerError as e:
        pytest.fail(str(e))


def known_templates(object_info: dict) -> dict:
    """ComfyUI's bundled workflow templates made only of node types the server knows (those of newer
    ComfyUI versions are left out), by file name."""
    import glob
    import site
    out = {}
    for root in site.getsitepackages():
        for f in sorted(glob.glob(os.path.join(root, "comfyui_workflow_templates*", "templates", "*.json"))):
            with open(f, encoding="utf-8") as fh:
                wf = json.load(fh)
            if not isinstance(wf, dict) or "nodes" not in wf:
                continue
            definitions = (wf.get("definitions") or {}).get("subgraphs") or []
            known = set(object_info) | {d["id"] for d in definitions} | {"Reroute", "PrimitiveNode", "Note",
                                                                          "MarkdownNote"}
            if all(n["type"] in known for g in [wf, *definitions] for n in g["nodes"]):
                out[os.path.basename(f)] = wf
    return out


@pytest.fixture(scope="module")
def browser(server):
    """Runs frontend_check.mjs once; returns its result.json."""
    result_path = os.path.join(OUT, "result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    env = dict(os.environ, CHROMIUM=_chromium())
    object_info = _get(server["url"] + "object_info", timeout=60)
    prompt_workflows = os.path.join(OUT, "prompt_workflows.json")
    with open(prompt_workflows, "w", encoding="utf-8") as f:
        json.dump(known_templates(object_info), f)
    proc = subprocess.run(["node", os.path.join(HERE, "frontend_check.mjs"), "--url", server["url"], "--out", OUT,
                           "--pack", PACK, "--run", ",".join(queued_examples()) or ",",
                           "--prompt-workflows", prompt_workflows], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=900)
    with open(os.path.join(OUT, "node.log"), "w", encoding="utf-8") as f:
        f.write(proc.stdout + proc.stderr)
    if not os.path.exists(result_path):
        pytest.fail(f"frontend_check.mjs wrote no result (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    result["_server"] = server
    result["_object_info"] = object_info
    result["_prompt_workflows"] = prompt_workflows
    return result


def _step(result, name):
    s = result["steps"].get(name)
    assert s is not None, f"step {name} did not run; steps: {list(result['steps'])}"
    assert s["ok"], f"step {name} failed in the browser:\n{s.get('error')}"
    return s


# -------------------------------------------------------------------------------------------------
# tests
# -------------------------------------------------------------------------------------------------
def test_extension_served_and_registered(browser):
    url = browser["_server"]["url"]
    exts = _get(url + "extensions")
    assert f"/extensions/{PACK}/mergelab.js" in exts, exts
    load = _step(browser, "load")
    if load.get("attempts", 1) > 1:
        print(f"note: the UI needed {load['attempts']} page loads to finish its set-up (busy machine?)")
    assert load["registered"], f"MergeLab.Frontend not among the registered extensions: {load['extensions']}"
    ours = [k for k in _get(url + "object_info") if k.startswith("MergeLab_")]
    assert load["mergelabNodeTypes"] == len(ours)
    assert not load["dialogs"], f"a dialog was open after loading: {load['dialogs']}"


def test_page_has_no_console_errors(browser):
    _step(browser, "load")
    problems = []
    ignored = {}
    for m in browser["console"]:
        ours = "/extensions/MergeLab/" in m["url"] or "/extensions/MergeLab/" in m["text"]
        reason = None if ours else next((why for why, match in IGNORED_CONSOLE if match(m)), None)
        if reason:
            ignored.setdefault(reason, 0)
            ignored[reason] += 1
        elif m["type"] == "error" or "mergelab" in (m["text"] + m["url"]).lower():
            problems.append(m)
    problems += [{"type": "pageerror", "text": e["text"], "url": e["stack"]} for e in browser["pageErrors"]]
    print("ignored console messages:", json.dumps(ignored, indent=1))
    assert not problems, "console errors:\n" + "\n".join(f"[{p['type']}] {p['text']} @ {p['url']}" for p in problems)


def test_dragging_a_point_changes_its_block_widget(browser):
    s = _step(browser, "block_editor_drag")
    before, after, i = s["before"], s["after"], s["index"]
    assert s["hover"] == i, "hovering a point (no button pressed) should select it for the read-out"
    assert before["values"] == [1.0] * len(before["names"])
    assert before["range"] == [0, 1]
    # the point starts at 1 (top of the 0..1 plot): moving it dy pixels down gives 1 - dy / plot height
    expected = 1 - s["dy"] / before["plotH"]
    assert abs(after["values"][i] - expected) <= 0.015, (after["values"][i], expected)
    assert after["values"][i] == round(after["values"][i], 2)          # snapped to the widget step
    assert [v for k, v in enumerate(after["values"]) if k != i] == [1.0] * (len(before["names"]) - 1)
    assert after["pos"] == before["pos"], "the drag moved the node instead of the point"
    # the editor's own widgets come first and are not serialized; the block widgets are the node's own
    order = before["widgetOrder"]
    assert [w[0] for w in order[:2]] == ["mergelab_block_curve", "mergelab_block_preset"]
    assert all(not w[2] and not w[3] for w in order[:2])
    assert [w[0] for w in order if w[1] == "number"] == before["names"]


def test_shift_drag_paints_across_points(browser):
    drag = _step(browser, "block_editor_drag")
    s = _step(browser, "block_editor_paint")
    values, a, b = s["values"], s["from"], s["to"]
    painted = values[a:b + 1]
    assert len(set(painted)) == 1, painted
    assert abs(painted[0] - (1 - s["dy"] / drag["before"]["plotH"])) <= 0.015
    untouched = [v for k, v in enumerate(values) if not (a <= k <= b) and k != drag["index"]]
    assert untouched == [1.0] * len(untouched)


def test_editor_leaves_workflow_and_prompt_formats_alone(browser):
    drag = _step(browser, "block_editor_drag")
    s = _step(browser, "serialization")
    url = browser["_server"]["url"]
    definition = _get(url + "object_info/MergeLab_BlockWeights_SD1")["MergeLab_BlockWeights_SD1"]
    order = definition["input_order"]["required"] + definition["input_order"].get("optional", [])
    widget_inputs = [n for n in order if n != "combine_with"]
    # widgets_values: exactly the node's own widgets in definition order, as without the extension
    assert [n for n, _ in s["serializableWidgets"]] == widget_inputs
    assert s["widgetsValues"] == [v for _, v in s["serializableWidgets"]]
    # the API prompt has the definition's inputs and nothing of the editor's
    assert sorted(s["promptInputs"]) == sorted(widget_inputs)
    assert dict(s["floats"]) == {k: v for k, v in s["promptInputs"].items() if k in dict(s["floats"])}
    assert s["promptInputs"][drag["before"]["names"][drag["index"]]] != 1.0
    # a saved workflow loads back with the same values in the same widgets, editor included
    assert s["reloaded"] == s["floats"]
    assert s["reloadedHasCurve"]


def _python_preset(B, arch: str, preset: str, block_ids: list) -> list:
    per_name = B.preset_values(preset, arch)
    name_of = B.mbw_name_of_block(arch)
    return [per_name[name_of[b]] for b in block_ids]


def test_preset_menu_applies_the_mbw_preset(browser):
    from engine import blocks as B

    s = _step(browser, "preset_menu")
    assert s["comboAfter"] == s["menu"][0], "the preset menu should return to its placeholder"
    expected = _python_preset(B, s["arch"], s["preset"], s["names"])
    assert len(s["values"]) == len(expected)
    assert len(set(expected)) > 5          # a preset that really moves the values
    # the values go through the FLOAT widgets, which round to their precision (0.01 for step 0.01,
    # the frontend's Comfy.FloatRoundingPrecision behaviour): within half a step of the exact preset
    for name, got, want in zip(s["names"], s["values"], expected):
        assert abs(got - want) <= 0.005 + 1e-9, (name, got, want)


def test_editor_presets_equal_python_presets_on_every_architecture(browser):
    from engine import blocks as B

    s = _step(browser, "preset_tables")
    offered = [p for p in s["offered"] if p in s["nodes"]["MergeLab_BlockWeights_SD1"]["presets"]]
    assert offered == B.preset_names(), "the editor must offer exactly the Python preset table"
    compared = []
    for node_id, info in s["nodes"].items():
        arch = node_id[len("MergeLab_BlockWeights_"):]
        if arch not in B.architectures() or info["blocks"] != B.block_list(arch):
            continue        # the server's block table differs from this checkout's (another ComfyUI)
        for preset in B.preset_names():
            want = _python_preset(B, arch, preset, info["blocks"])
            got = info["presets"][preset]
            bad = [(b, g, w) for b, g, w in zip(info["blocks"], got, want) if abs(g - w) > 1e-9]
            assert not bad, f"{arch} {preset}: (block, editor, python) {bad[:5]}"
        compared.append(arch)
    assert {"SD1", "SDXL", "Flux"} <= set(compared), compared
    assert len(compared) >= 0.8 * len(s["nodes"]), (compared, list(s["nodes"]))


def test_method_nodes_show_their_description(browser):
    s = _step(browser, "method_help")
    url = browser["_server"]["url"]
    definition = _get(url + "object_info/MergeLab_Method_ties")["MergeLab_Method_ties"]
    assert s["description"] == definition["description"] == s["text"]
    assert s["firstWidget"] == "mergelab_method_help"
    words = definition["description"].split()
    assert " ".join(" ".join(s["lines"]).split()) == " ".join(words)     # all of it, wrapped
    assert len(s["lines"]) >= 3
    inputs = definition["input_order"]["required"]
    assert sorted(s["promptInputs"]) == sorted(inputs)
    assert len(s["widgetsValues"]) == len(inputs)
    assert s["afterClick"]["folded"] and s["afterClick"]["height"] < s["height"]


def test_example_workflows_open_from_templates_and_run(browser):
    s = _step(browser, "examples")
    on_disk = example_names()
    assert sorted(s["names"]) == on_disk, "GET /workflow_templates must list every example_workflows/*.json"
    if not on_disk:
        pytest.skip("example_workflows/ holds no workflow yet: nothing to open and run")
    failures = []
    runs = {r["name"]: r for r in s["runs"]}
    for name in on_disk:
        run = runs[name]
        if run.get("error"):
            failures.append(f"{name}: {run['error']}")
            continue
        # opened from the templates dialog: every node of the file, all of them known to the server
        if run["unknownTypes"]:
            failures.append(f"{name}: node types the server does not know: {run['unknownTypes']}")
        if run["loadedTypes"] != run["expectedTypes"]:
            failures.append(f"{name}: loaded {run['loadedTypes']} != file {run['expectedTypes']}")
        cramped = [n for n in run["ourNodes"] if n["height"] + 0.5 < n["needed"]]
        if cramped:
            failures.append(f"{name}: nodes too short for the editor/help and their widgets: {cramped}")
    for name in queued_examples():
        assert name in runs, f"example {name} (to be run) is not in example_workflows/: {on_disk}"
        run = runs[name]
        if run.get("error"):
            continue
        assert run["queued"]
        status = run.get("status") or {}
        if not (status.get("completed") and status.get("status_str") == "success"):
            msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            failures.append(f"{name}: did not run to completion (status {status.get('status_str')}, "
                            f"{run['seconds']} s): {json.dumps(msgs)[:1500]} rejected: "
                            f"{json.dumps(run.get('rejected'))[:1500]} {run.get('queueErrors')}")
        else:
            print(f"{name}: ran in {run['seconds']:.1f} s; outputs of nodes {run['outputs']}")
    assert not failures, "\n".join(failures) + "\n--- server log ---\n" + browser["_server"]["log"]()


def _mirrored_by_group(values, groups):
    """The expected mirror: the MBW groups in reverse order (IN08 <-> OUT00 on SDXL, M00 stays)."""
    order = list(dict.fromkeys(groups))
    first = {g: values[groups.index(g)] for g in order}
    return [first[order[len(order) - 1 - order.index(g)]] for g in groups]


def test_mirror_swaps_mbw_groups(browser):
    s = _step(browser, "mirror")["nodes"]
    sdxl = s["MergeLab_BlockWeights_SDXL"]
    # SDXL's IN00 has 3 blocks and OUT08 2: the single 0 at IN08 must land on OUT00, not in M00
    assert [n for n, v in zip(sdxl["names"], sdxl["singleMirrored"]) if v != 1] == ["output_blocks.0."]
    sd1 = s["MergeLab_BlockWeights_SD1"]
    assert [n for n, v in zip(sd1["names"], sd1["singleMirrored"]) if v != 1] == ["output_blocks.3."]
    for arch, r in s.items():
        assert len(set(r["grad"])) > 5, arch
        assert r["gradMirrored"] == _mirrored_by_group(r["grad"], r["groups"]), arch
        assert r["gradTwice"] == r["grad"], arch


def test_a_click_in_the_plot_changes_nothing(browser):
    s = _step(browser, "click_without_drag")
    assert s["after"] == s["before"]


def test_folded_method_help_survives_a_reload(browser):
    s = _step(browser, "help_fold_reload")
    assert s["saved"]["folded"]
    assert s["reloaded"] == s["saved"]


def test_nodes_2_0_leave_out_the_canvas_widgets(browser):
    s = _step(browser, "vue_nodes")
    block, method = s["nodes"]
    # our canvas-drawn widgets are the only canvases a node had in that mode (drawn under the block rows)
    assert block["canvases"] == 0 and method["canvases"] == 0, s["nodes"]
    assert "apply preset" in block["text"] and "input_blocks.8." in block["text"]
    assert "lambda" in method["text"]
    # every widget but the editor / help has its row
    assert block["widgetRows"] == len(block["widgets"]) - 1, block
    assert method["widgetRows"] == len(method["widgets"]) - 1, method


def test_nodes_2_0_preset_menu_applies_and_returns_to_its_placeholder(browser):
    from engine import blocks as B

    s = _step(browser, "vue_nodes")
    for pick in s["picks"]:
        expected = _python_preset(B, "SDXL", pick["preset"], pick["names"])
        assert pick["values"] == pytest.approx(expected, abs=0.005 + 1e-9), pick
        # what the node shows: the new values (its inputs show 3 decimals of the exact preset, the widget
        # holds them at its 0.01 precision), and the menu ready for the next pick
        assert pick["shown"] == pytest.approx(pick["values"], abs=0.005 + 1e-9), pick
        assert pick["menuShows"].endswith("choose…"), pick
    assert s["picks"][0]["values"] != s["picks"][1]["values"]


# widgets promoted onto a subgraph node ("Promote Widget" inside a subgraph): ComfyUI's proxy widget calls
# the inner widget's draw / mouse with the subgraph node, its width and its y
def test_promoted_curve_drag_changes_the_block_under_the_pointer(browser):
    s = _step(browser, "promoted_curve")
    # the subgraph node (made 620 px wide, the inner node is 420 px) maps the pointer with its own width
    assert s["width"] != s["innerWidth"], s
    assert s["changed"] == [s["index"]], s


def test_promoted_curve_widens_its_subgraph_node_and_shows_the_hover(browser):
    s = _step(browser, "promoted_curve")
    assert s["widthAfterPromotion"] >= 420, s
    assert s["hover"] == s["hoverIndex"], "hovering a point on the subgraph node should select it for the read-out"


def test_promoted_method_help_is_drawn_inside_its_subgraph_node(browser):
    s = _step(browser, "promoted_help")
    before = s["before"]
    assert before["size"][0] >= 360, before
    assert before["bottom"] <= before["size"][1], f"the help's text ends below the subgraph node: {before}"


def test_promoted_method_help_fold_is_kept_in_its_own_node(browser):
    s = _step(browser, "promoted_help")
    assert s["clicked"] == {"folded": True, "innerProperty": True, "subgraphProperty": None}, s["clicked"]
    assert s["reloaded"]["folded"], "the fold was lost on reload"


def test_nodes_2_0_promoted_preset_menu_returns_to_its_placeholder(browser):
    s = _step(browser, "vue_promoted_preset")
    first, reset, again = s["first"], s["reset"], s["again"]
    assert first["values"] != reset["values"] == [1.0] * len(reset["values"]), s
    assert first["menuShows"].endswith("choose…"), first
    # the same preset again, after the values changed, applies again
    assert again["values"] == first["values"], s


class _ClassFromObjectInfo:
    """A node class as /object_info describes it: what mergelab.workflow.to_api reads of a class."""

    def __init__(self, info: dict):
        self.info = info

    def INPUT_TYPES(self):
        return self.info["input"]


def test_runner_converts_workflows_as_the_frontend_does(browser):
    """ComfyUI's own templates (those with subgraphs: subgraph nodes with widgets of their own, bypassed
    subgraph nodes, several instances of one definition) and graphs made in the editor (nested subgraphs,
    promoted widgets, mute / bypass inside and of subgraph nodes): ``mergelab.workflow.to_api`` (``python -m
    mergelab.run``) gives the prompt the frontend queues for the same workflow, node for node, ids and titles
    included (a title the frontend falls back to the class name for, where its bundled translations lack the
    node, is the only difference allowed: titles are not sent to the server's nodes)."""
    from mergelab.workflow import to_api

    step = _step(browser, "workflow_prompts")
    prompts = step["prompts"]
    ours = [m for m in step["console"] + step["pageErrors"] if "/extensions/MergeLab/" in json.dumps(m)]
    assert not ours, f"messages of our extension while the frontend opened these workflows: {ours}"
    with open(browser["_prompt_workflows"], encoding="utf-8") as f:
        workflows = json.load(f)
    with_subgraphs = [n for n, wf in workflows.items() if (wf.get("definitions") or {}).get("subgraphs")]
    assert len(workflows) >= 60 and len(with_subgraphs) >= 8, (len(workflows), with_subgraphs)
    assert sorted(prompts) == sorted(workflows)
    info = browser["_object_info"]
    classes = {name: _ClassFromObjectInfo(i) for name, i in info.items()}
    titles = {name: i.get("display_name") or name for name, i in info.items()}
    def declared(prompt, ours):
        """Without inputs the node's class does not declare: widgets the frontend's own extensions add
        (SaveGLB's 3D preview 'image'), which the server ignores; with our title where the frontend's is
        the class name (its translations lack the node: EmptyHunyuanLatentVideo)."""
        out = {}
        for nid, node in prompt.items():
            spec = info[node["class_type"]]["input"]
            names = {n for section in spec.values() if isinstance(section, dict) for n in section}
            out[nid] = {**node, "inputs": {k: v for k, v in node["inputs"].items() if k in names}}
            if (node.get("_meta") or {}).get("title") == node["class_type"] and nid in ours:
                out[nid]["_meta"] = {"title": titles[node["class_type"]]}
        return out

    built = step["built"]
    assert sorted(built) == ["modes", "nested", "promoted_widget", "widget_per_instance"], sorted(built)
    # the editor's graphs are what they should be: two instances with their own values, a nested id
    assert {built["widget_per_instance"]["prompt"][k]["inputs"]["ratio"] for k in built["widget_per_instance"]["prompt"]
            if k.endswith(":3")} == {0.77, 0.33}
    assert any(k.count(":") == 2 for k in built["nested"]["prompt"]), built["nested"]["prompt"]
    for name, b in built.items():
        workflows[name], prompts[name] = b["workflow"], b["prompt"]

    failures = []
    for name, wf in workflows.items():
        ours = to_api(wf, classes, titles)
        theirs = declared(prompts[name], ours)
        if ours != theirs:
            diff = {nid: (ours.get(nid), theirs.get(nid)) for nid in sorted(set(ours) | set(theirs))
                    if ours.get(nid) != theirs.get(nid)}
            failures.append(f"{name}: {json.dumps(diff)[:3000]}")
    assert not failures, "\n".join(failures)

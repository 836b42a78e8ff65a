"""The shipped example workflows (``example_workflows/``, built by ``mergelab.gen_examples``).

* ComfyUI's own ``GET /workflow_templates`` handler (app/custom_node_manager.py, which globs
  ``custom_nodes/*/example_workflows/*.json``) lists every example under the pack, each has its .jpg
  thumbnail, and the folder is served at ``/api/workflow_templates/<module>/``;
* the committed JSON is exactly what the generator builds from the live node definitions (widget order,
  defaults, ranges, combo options, link types), and is well-formed editor JSON that ComfyUI's
  ``validate_prompt`` accepts after conversion, except for the placeholder model names;
* every example RUNS: converted by ``mergelab.workflow.to_api`` and executed by the headless runner
  (``mergelab.run.execute_workflow``, i.e. ``python -m mergelab.run`` with ``--set`` overrides), and its
  outputs are checked: the files written (reported by the runner), loadable by ComfyUI's loaders, holding
  the values the example's recipe gives on hand-checked keys, and the report texts.

Models: 01 (the flagship) runs on full-size SD1.5 fixture checkpoints (base and two "fine-tunes",
delta seeds 1 and 2) through CheckpointLoaderSimple, held in fp16 (ComfyUI's --fp16-unet/--fp16-text-enc,
switched on for that test only) so three of them fit in memory.  In the others the point is the graph,
not the size, so each CheckpointLoaderSimple is swapped (in the converted API prompt, by its title) for
the small fixture model node ``MergeLabTest_SmallModel`` (SD1.5 or SDXL block structure), and the VAE
its consumers took from the loader comes from ComfyUI's VAELoader reading a tiny TAESD file.
"""
import copy
import io
import json
import os
import re

import pytest
import torch
from safetensors import safe_open

from mergelab import REPO_ROOT, fixtures
from mergelab import gen_examples as gx
from mergelab.run import execute_workflow
from mergelab.workflow import to_api

EXAMPLES_DIR = os.path.join(REPO_ROOT, "example_workflows")
NAMES = [ex.name for ex in gx.EXAMPLES]
DELTA = 0.02            # the small "fine-tunes": base + DELTA * N(0, 1) per weight


def _path(name):
    return os.path.join(EXAMPLES_DIR, name + ".json")


def _load(name):
    with open(_path(name), encoding="utf-8") as f:
        return json.load(f)


class one_thread:
    """The test's own small-tensor math single-threaded (fast on a shared 2-core machine)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


# -------------------------------------------------------------------------------------------------
# the files
# -------------------------------------------------------------------------------------------------
def _custom_node_manager(harness):
    """ComfyUI's app.custom_node_manager.CustomNodeManager.  It imports ComfyUI's top-level ``utils``
    package, which main.py imports before ``nodes``; ``nodes`` puts ComfyUI's comfy/ folder first on
    sys.path, where a plain ``import utils`` finds comfy/utils.py instead.  So the package is imported
    from the ComfyUI root for this import, as main.py has it, and the previous module put back."""
    import importlib
    import importlib.util
    import sys
    if "app.custom_node_manager" in sys.modules:
        return sys.modules["app.custom_node_manager"].CustomNodeManager
    pkg_dir = os.path.join(harness.comfy_root, "utils")
    spec = importlib.util.spec_from_file_location("utils", os.path.join(pkg_dir, "__init__.py"),
                                                  submodule_search_locations=[pkg_dir])
    pkg = importlib.util.module_from_spec(spec)
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if k == "utils" or k.startswith("utils.")]}
    sys.modules["utils"] = pkg
    try:
        spec.loader.exec_module(pkg)
        return importlib.import_module("app.custom_node_manager").CustomNodeManager
    finally:
        for k in [k for k in sys.modules if k == "utils" or k.startswith("utils.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_templates_route_lists_every_example_with_thumbnail(harness):
    """ComfyUI's real /workflow_templates handler and static route, on the folder the pack is loaded from."""
    import asyncio

    import folder_paths
    import nodes
    from aiohttp import web
    from PIL import Image

    CustomNodeManager = _custom_node_manager(harness)

    custom_dir = os.path.dirname(harness.pack_path)           # <base>/custom_nodes, holding MergeLab/
    saved = copy.deepcopy(folder_paths.folder_names_and_paths["custom_nodes"])
    folder_paths.add_model_folder_path("custom_nodes", custom_dir)
    try:
        routes, app = web.RouteTableDef(), web.Application()
        loaded = [(m, d) for m, d in nodes.LOADED_MODULE_DIRS.items()
                  if os.path.realpath(d) == os.path.realpath(harness.pack_path)]
        assert loaded, "the pack is not in LOADED_MODULE_DIRS"
        CustomNodeManager().add_routes(routes, app, loaded)
        handler = next(r.handler for r in routes if getattr(r, "path", None) == "/workflow_templates")
        listed = json.loads(asyncio.run(handler(None)).body)
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"] = saved
    pack = os.path.basename(harness.pack_path)
    assert pack == "MergeLab"
    assert set(NAMES) <= set(listed.get(pack, [])), listed
    # the frontend fetches /api/workflow_templates/<the name listed>/<workflow>.json and .jpg
    statics = [r for r in app.router.resources() if isinstance(r, web.StaticResource)
               and r.canonical == f"/api/workflow_templates/{pack}"]
    assert len(statics) == 1 and os.path.samefile(statics[0].get_info()["directory"], EXAMPLES_DIR)
    for name in NAMES:
        jpg = os.path.join(EXAMPLES_DIR, name + ".jpg")
        assert os.path.isfile(jpg), f"{name}.json has no {name}.jpg thumbnail"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.size == gx.THUMB_SIZE


def test_committed_examples_are_up_to_date(harness):
    stale = gx.stale(harness.nodes.NODE_CLASS_MAPPINGS, harness.nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert not stale, f"example_workflows/ is out of date for {stale}: run `python -m mergelab.gen_examples`"


def test_generator_rejects_what_does_not_fit_the_nodes(harness):
    classes = harness.nodes.NODE_CLASS_MAPPINGS
    bad = [
        (gx.N("m", "MergeLab_Method_ties", {"densty": 0.5}), "no widget"),
        (gx.N("m", "MergeLab_Method_ties", {"rescale": "sometimes"}), "not an option"),
        (gx.N("m", "MergeLab_Method_ties", {"lambda": 99.0}), "outside"),
        (gx.N("m", "MergeLab_NoSuchNode"), "unknown node type"),
    ]
    for node, msg in bad:
        with pytest.raises(gx.ExampleError, match=msg):
            gx.build(gx.Example("x", "x", "x", [node]), classes)
    # a MODEL cannot feed a MERGE_METHOD input
    ex = gx.Example("x", "x", "x", [gx.N("l", "CheckpointLoaderSimple", {"ckpt_name": "a.safetensors"}),
                                    gx.N("i", "MergeLab_MergeInput", {}, {"model": "l.MODEL"}),
                                    gx.N("m", "MergeLab_ModelMerger", {}, {"method": "l.MODEL", "models": "i"})])
    with pytest.raises(gx.ExampleError, match="cannot connect MODEL"):
        gx.build(ex, classes)


@pytest.mark.parametrize("name", NAMES)
def test_example_is_valid_editor_json(harness, name):
    """Links agree on both ends, widgets_values fit the node's widgets, and ComfyUI's own validation
    accepts the API conversion except for the (placeholder) model files, which are not installed here."""
    import asyncio

    import execution

    from mergelab.workflow import _has_control_widget, _input_spec, _is_widget

    wf = _load(name)
    assert wf["version"] == 0.4 and wf["links"] and wf["nodes"]
    nodes_by_id = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes_by_id) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes_by_id)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        out = nodes_by_id[src]["outputs"][sslot]
        inp = nodes_by_id[dst]["inputs"][dslot]
        assert lid in out["links"] and inp["link"] == lid and out["type"] == typ
        assert inp["type"] in (typ, "*"), (name, lid, inp, typ)
    classes = harness.nodes.NODE_CLASS_MAPPINGS
    for n in wf["nodes"]:
        if n["type"] == "MarkdownNote":
            continue
        cls = classes[n["type"]]
        widgets = [(nm, t, o) for nm, t, o in _input_spec(cls) if _is_widget(t, o)]
        assert len(n["widgets_values"]) == len(widgets) + sum(_has_control_widget(*w) for w in widgets), n["type"]
        sockets = [nm for nm, t, o in _input_spec(cls) if not _is_widget(t, o)]
        assert [i["name"] for i in n["inputs"]] == sockets
    prompt = to_api(wf, classes)
    assert len(prompt) == len(wf["nodes"]) - 1          # everything but the note
    ok, err, outs, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))[:4]
    problems = [(nid, e["type"], e["extra_info"].get("input_name"), e["details"])
                for nid, ne in (node_errors or {}).items() for e in ne["errors"]
                if not (e["type"] == "value_not_in_list" and e["extra_info"].get("input_name") in
                        ("ckpt_name", "lora_name"))]
    assert not problems, problems
    assert any(getattr(classes[n["class_type"]], "OUTPUT_NODE", False) for n in prompt.values())


# -------------------------------------------------------------------------------------------------
# running the examples
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vae(harness, tmp_path_factory):
    """A TAESD VAE file (deterministic weights) in the vae folder, for ComfyUI's VAELoader."""
    import comfy.taesd.taesd
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, t in comfy.taesd.taesd.TAESD(latent_channels=4).state_dict().items():
        sd[k] = (torch.randn(t.shape, generator=g) * 0.05) if t.dim() > 0 else t.clone()
    path = str(tmp_path_factory.mktemp("vae") / "example_taesd.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return harness.add_model_file("vae", path)


def small_swap(prompt, models, vae_name):
    """``prompt`` with every CheckpointLoaderSimple replaced by a MergeLabTest_SmallModel of the settings
    ``models[title]`` gives (same id, same MODEL and CLIP slots); what took the loader's VAE (slot 2) gets
    it from a VAELoader of ``vae_name``."""
    p = copy.deepcopy(prompt)
    swapped = set()
    for nid, n in p.items():
        if n["class_type"] == "CheckpointLoaderSimple":
            title = n["_meta"]["title"]
            spec = dict({"arch": "SD15", "seed": 0, "delta_seed": 0, "delta_scale": 0.0, "dtype": "fp32"},
                        **models[title])
            p[nid] = {"class_type": fixtures.TEST_NODE_ID, "inputs": spec, "_meta": n["_meta"]}
            swapped.add(nid)
    assert swapped and len(swapped) == len(models)
    need_vae = False
    for n in p.values():
        for k, v in n["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and v[0] in swapped and v[1] == 2:
                n["inputs"][k] = ["swap_vae", 0]
                need_vae = True
    if need_vae:
        p["swap_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}}
    return p


def run_example(harness, workflow, overrides=()):
    """Through the headless runner; returns (WorkflowRun, what it printed)."""
    out = io.StringIO()
    run = execute_workflow(workflow, list(overrides), harness, quiet=True, out=out)
    printed = out.getvalue()
    assert run.code == 0, run.error
    for p in run.written:          # the runner says where each output went
        assert f"wrote {p} (" in printed
    return run, printed


def written(run, suffix=".safetensors"):
    return [p for p in run.written if p.endswith(suffix)]


def report_text(run, title):
    nid = next(i for i, n in run.prompt.items() if (n.get("_meta") or {}).get("title") == title)
    return "\n".join(run.outputs[nid]["text"])


def small_tensors(arch, delta_seed=None):
    """ComfyUI key -> fp32 tensor of a small fixture model (what MergeLabTest_SmallModel gives)."""
    kw = {"delta_seed": delta_seed, "delta_scale": DELTA} if delta_seed else {}
    m = fixtures.small_model(arch, seed=0, **kw)
    return {k: v.detach().float().clone() for k, v in m.model.state_dict().items()}


def file_tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def assert_fp16_of(saved, want, key):
    """``saved`` (fp16 on disk) is ``want`` rounded to fp16, up to one fp16 ulp (fp32 sums may differ in
    their last bit)."""
    assert saved.dtype == torch.float16, key
    torch.testing.assert_close(saved.float(), want.half().float(), rtol=2e-3, atol=2e-6, msg=key)


def unet_key(model_sd, *patterns):
    """The first ≥2-D UNet weight whose key matches each regex (ComfyUI key names)."""
    out = []
    for pat in patterns:
        k = next(k for k, v in model_sd.items() if k.startswith("diffusion_model.") and v.dim() >= 2
                 and re.search(pat, k))
        out.append(k)
    return out


def test_01_dare_ties_full_size_sd15(harness, full_sd15, tuned_sd15, monkeypatch):
    """The flagship on three full-size SD1.5 checkpoints through CheckpointLoaderSimple: the saved
    checkpoint reloads as SD1.5, holds DARE-TIES of the inputs (two keys recomputed from the fixture
    tensors with merge_methods), the base's VAE bit for bit, and the report shows the blocks."""
    import comfy.cli_args
    import comfy.sd

    import merge_methods
    third = fixtures.tuned_sd15_checkpoint(delta_seed=2)
    names = {"Base model": os.path.basename(full_sd15), "Model A": os.path.basename(tuned_sd15),
             "Model B": harness.add_model_file("checkpoints", third)}
    monkeypatch.setattr(comfy.cli_args.args, "fp16_unet", True)       # as ComfyUI's --fp16-unet
    monkeypatch.setattr(comfy.cli_args.args, "fp16_text_enc", True)   # and --fp16-text-enc
    overrides = [f"{t}.ckpt_name={n}" for t, n in names.items()]
    overrides += ["MergeLab_SaveCheckpoint.hash_input_files=false"]   # 6 GB of hashing is not the point here
    run, printed = run_example(harness, _path("01_dare_ties_merge"), overrides)
    ckpts = written(run)
    assert len(ckpts) == 1 and "/checkpoints/MergeLab_dare_ties_" in ckpts[0]
    report = report_text(run, "Merge report")
    assert report in printed and "model merge: " in report and "dare_ties" in report
    assert re.search(r"^input_blocks\.4\. \| \d+ \| [0-9.]+ \|", report, re.M), report[:800]

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpts[0])[:3]
    assert type(model.model.model_config).__name__ == "SD15" and clip is not None and vae is not None
    del model, clip, vae
    saved, meta = file_tensors(ckpts[0])
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    base_keys = list(fixtures.sd15_checkpoint_layout())
    assert sorted(saved) == sorted(base_keys)
    vae_keys = [k for k in base_keys if k.startswith("first_stage_model.")]
    for k in vae_keys:
        assert torch.equal(saved[k], fixtures.expected_sd15_tensor(k)), k
    method = merge_methods.create("dare_ties", normalize=True)
    checked = 0
    for disk_key, comfy_key in [
            ("model.diffusion_model.input_blocks.4.1.proj_in.weight",
             "diffusion_model.input_blocks.4.1.proj_in.weight"),
            ("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
             "clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight")]:
        base = fixtures.expected_sd15_tensor(disk_key).float()
        a = fixtures.expected_sd15_tensor(disk_key, delta_seed=1, delta_scale=0.002).float()
        b = fixtures.expected_sd15_tensor(disk_key, delta_seed=2, delta_scale=0.002).float()
        want = method.merge(base, [a, b], key=comfy_key, seed=42, weight=[1.0, 1.0], density=[0.5, 0.5])
        assert not torch.equal(saved[disk_key], base.half()), disk_key
        assert_fp16_of(saved[disk_key], want, disk_key)
        checked += 1
    assert checked == 2


@pytest.mark.parametrize("name", ["02_ties_sdxl_block_weights", "03_masked_merge", "04_normalize_then_merge",
                                  "05_slerp_and_model_stock", "08_inpainting_model_from_a_finetune"])
def test_small_model_examples(harness, tiny_vae, name):
    """The checkpoint-merging examples on small fixture models: a checkpoint of the model's keys and the
    TAESD VAE, holding on checked keys what the example's recipe computes."""
    import merge_methods
    arch = "SDXL" if "sdxl" in name else "SD15"
    wf = _load(name)
    titles = [n.get("title") for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    seeds = {}
    for t in titles:      # base: the fixture; A, B, C: base + DELTA·noise with their own seeds
        seeds[t] = None if "base" in t.lower() else 1 + sum(ord(c) for c in t) % 97
    archs = {t: "SD15_inpaint" if "inpainting" in t.lower() else arch for t in seeds}
    models = {t: ({"arch": archs[t]} if s is None else {"arch": archs[t], "delta_seed": s, "delta_scale": DELTA})
              for t, s in seeds.items()}
    prompt = small_swap(to_api(wf, harness.nodes.NODE_CLASS_MAPPINGS), models, tiny_vae)
    run, printed = run_example(harness, prompt, ["MergeLab_SaveCheckpoint.hash_input_files=false"])
    ckpts = written(run)
    assert len(ckpts) == 1, run.written
    saved, meta = file_tensors(ckpts[0])
    assert any(k.startswith("first_stage_model.taesd_decoder.") for k in saved)
    base_sd = small_tensors(arch)
    unet = {"model." + k: v for k, v in base_sd.items() if k.startswith("diffusion_model.")}
    assert {k for k in saved if k.startswith("model.diffusion_model.")} == set(unet)
    t = {title: small_tensors(archs[title], s) for title, s in seeds.items()}
    with one_thread():
        if name.startswith("02"):
            base, a, b, c = (t[x] for x in ("SDXL base", "SDXL model A", "SDXL model B", "SDXL model C"))
            # block weights on TIES' lambda: input blocks 0.2 + 0.05·i, middle 0.7, output 1.0
            for key, lam in zip(unet_key(base, r"input_blocks\.0\.", r"input_blocks\.4\.", r"middle_block\.1\.",
                                         r"output_blocks\.8\."), (0.2, 0.4, 0.7, 1.0)):
                m = merge_methods.create("ties", normalize=True, **{"lambda": lam})
                want = m.merge(base[key], [a[key], b[key], c[key]], key=key, seed=0, weight=[1.0] * 3,
                               density=[0.3] * 3)
                assert_fp16_of(saved["model." + key], want, key)
            assert "Δ vs base" in report_text(run, "Merge report")
        elif name.startswith("03"):
            base, a, b = t["Base model"], t["Model A"], t["Model B"]
            for key in unet_key(base, r"input_blocks\.1\.1\..*to_q", r"output_blocks\.5\.0\.in_layers"):
                n = base[key].numel()
                k = round(0.2 * n)

                def top(x):
                    sel = torch.zeros(n, dtype=torch.bool)
                    sel[torch.topk((x[key] - base[key]).abs().reshape(-1), k).indices] = True
                    return sel.reshape(base[key].shape)
                sel = top(b) & ~top(a)
                assert 0 < int(sel.sum()) < k
                want = torch.where(sel, b[key], a[key])
                assert torch.equal(saved["model." + key], want.half()), key
        elif name.startswith("08"):
            a, b, c = t["Inpainting model"], t["Fine-tune"], t["Base model"]
            first = "diffusion_model.input_blocks.0.0.weight"
            got = saved["model." + first]
            assert a[first].shape[1] == 9 and got.shape == a[first].shape      # still an inpainting model
            assert_fp16_of(got[:, :4], a[first][:, :4] + (b[first] - c[first]), first)
            assert torch.equal(got[:, 4:], a[first][:, 4:].half())
            for key in unet_key(c, r"input_blocks\.4\.", r"output_blocks\.2\."):
                assert_fp16_of(saved["model." + key], a[key] + (b[key] - c[key]), key)
            assert "more input channels" in report_text(run, "Merge report")
        elif name.startswith("04"):
            a, b = t["Model A"], t["Model B"]
            attn = r"input_blocks\.1\.1\.transformer_blocks\.0\.attn1\."
            q, k_, v, conv = unet_key(a, attn + "to_q", attn + "to_k", attn + "to_v",
                                      r"input_blocks\.1\.0\.in_layers\.2")
            for key in (v, conv):                 # untouched by attn_only normalization: the plain average
                assert_fp16_of(saved["model." + key], 0.5 * a[key] + 0.5 * b[key], key)
            # queries scaled by s, keys by 1/s: B's attention is unchanged, its q/k norm ratio is A's
            bq = 2 * saved["model." + q].float() - a[q]
            bk = 2 * saved["model." + k_].float() - a[k_]
            sq = float((bq * b[q]).sum() / (b[q] * b[q]).sum())
            sk = float((bk * b[k_]).sum() / (b[k_] * b[k_]).sum())
            assert abs(sq - 1.0) > 1e-3 and abs(sq * sk - 1.0) < 2e-3, (sq, sk)
            ratio = (bq.norm() / bk.norm()) / (a[q].norm() / a[k_].norm())
            assert abs(float(ratio) - 1.0) < 2e-3
            assert "attn" in report_text(run, "Normalize report").lower()
        else:
            base, a, b = t["Base model"], t["Model A"], t["Model B"]
            stock, slerp = merge_methods.create("model_stock"), merge_methods.create("slerp", t=0.3)
            for key in unet_key(base, r"input_blocks\.4\.", r"output_blocks\.2\."):
                s = stock.merge(base[key], [a[key], b[key]], key=key, seed=0)
                want = slerp.merge(s, [a[key]], key=key, seed=0)
                assert_fp16_of(saved["model." + key], want, key)
            assert "slerp" in report_text(run, "SLERP report")


@pytest.fixture(scope="module")
def extracted_loras(harness, tiny_vae):
    """Example 07 run twice on small SD1.5 models (tuned = base + noise of delta seeds 1 and 2): the two
    saved LoRA files, linked into the loras folder as lora_a / lora_b."""
    wf = _load("07_extract_difference_lora")
    out = {}
    for label, seed in (("a", 1), ("b", 2)):
        models = {"Tuned model": {"delta_seed": seed, "delta_scale": DELTA}, "Base model": {}}
        prompt = small_swap(to_api(wf, harness.nodes.NODE_CLASS_MAPPINGS), models, tiny_vae)
        run, printed = run_example(harness, prompt, [f"MergeLab_SaveLoRA.filename_prefix=loras/example07_{label}"])
        files = written(run)
        assert len(files) == 1 and f"/loras/example07_{label}_" in files[0]
        report = report_text(run, "Extraction report")
        assert report in printed and "relative Frobenius error" in report
        out[label] = (files[0], harness.add_model_file("loras", files[0], name=f"example_lora_{label}.safetensors"))
    return out


def comfy_lora(harness, model, clip, lora_name):
    """ComfyUI's own LoraLoader at strength 1; returns (model, clip, messages about keys not loaded)."""
    import logging

    class Cap(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.msgs = []

        def emit(self, record):
            self.msgs.append(record.getMessage())
    cap = Cap()
    logging.getLogger().addHandler(cap)
    try:
        m, c = harness.nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(cap)
    return m, c, [x for x in cap.msgs if "not loaded" in x.lower()]


def _weights(harness):
    import importlib
    return importlib.import_module(f"{harness.pack_module_name}.engine.weights")


def _optimal_error(harness, d, rank):
    import importlib
    return importlib.import_module(f"{harness.pack_module_name}.engine.lora_svd").optimal_rank_error(d, rank)


def test_07_extract_difference_lora(harness, extracted_loras):
    """The extracted LoRA loads with ComfyUI's LoraLoader (every key) and turns the base into the tuned
    model as well as rank 32 allows (the Eckart–Young optimum, + fp16 rounding of the factors), except the
    text encoder's embedding tables, which the kohya-format file leaves out."""
    ws = _weights(harness)
    cpu = torch.device("cpu")
    base_m, base_c = fixtures.small_model("SD15"), fixtures.small_clip("SD15")
    tuned_m = fixtures.small_model("SD15", delta_seed=1, delta_scale=DELTA)
    tuned_c = fixtures.small_clip("SD15", delta_seed=1, delta_scale=DELTA)
    m, c, bad = comfy_lora(harness, base_m, base_c, extracted_loras["a"][1])
    assert bad == [], bad[:5]
    n = 0
    with one_thread():
        for loaded, tuned, base in ((m, tuned_m, base_m), (c, tuned_c, base_c)):
            ls, ts, bs = ws.KeySource.of(loaded), ws.KeySource.of(tuned), ws.KeySource.of(base)
            for key in bs.keys():
                b = bs.read(key, cpu)
                d = ts.read(key, cpu) - b
                if d.dim() < 2:
                    continue
                got = ls.read(key, cpu) - b
                if ".embeddings." in key:       # no kohya name: the kohya-format file leaves them out
                    assert float(got.abs().max()) == 0.0, key
                    continue
                err = float((got - d).norm() / d.norm())
                opt = _optimal_error(harness, d, min(32, d.shape[0], d[0].numel()))
                assert err <= 1.02 * opt + 2e-3, (key, err, opt)
                n += 1
    assert n > 100


def test_06_merge_two_loras(harness, tiny_vae, extracted_loras):
    """Two LoRAs (from example 07) merged with TIES at rank 32: the file loads with ComfyUI's LoraLoader
    (every key), and each layer's ΔW is TIES(ΔA, ΔB) (zero base) as well as rank 32 allows."""
    import merge_methods
    wf = _load("06_merge_two_loras")
    prompt = small_swap(to_api(wf, harness.nodes.NODE_CLASS_MAPPINGS), {"Base model": {}}, tiny_vae)
    run, printed = run_example(harness, prompt, [f"LoRA A.lora_name={extracted_loras['a'][1]}",
                                                 f"LoRA B.lora_name={extracted_loras['b'][1]}"])
    files = written(run)
    assert len(files) == 1 and "/loras/MergeLab_merged_lora_" in files[0]
    assert report_text(run, "LoRA merge report") in printed
    merged_name = harness.add_model_file("loras", files[0], name="example_lora_merged.safetensors")
    ws = _weights(harness)
    cpu = torch.device("cpu")
    base_m, base_c = fixtures.small_model("SD15"), fixtures.small_clip("SD15")
    loaded = {}
    for label, name in (("a", extracted_loras["a"][1]), ("b", extracted_loras["b"][1]), ("m", merged_name)):
        m, c, bad = comfy_lora(harness, base_m, base_c, name)
        assert bad == [], (label, bad[:5])
        loaded[label] = (ws.KeySource.of(m), ws.KeySource.of(c))
    ties = merge_methods.create("ties", normalize=True)
    n = 0
    with one_thread():
        for part, bsrc in ((0, ws.KeySource.of(base_m)), (1, ws.KeySource.of(base_c))):
            for key in bsrc.keys():
                if len(bsrc.shape(key)) < 2:
                    continue
                w0 = bsrc.read(key, cpu)
                da, db, dm = (loaded[x][part].read(key, cpu) - w0 for x in ("a", "b", "m"))
                want = ties.merge(torch.zeros_like(w0), [da, db], key=key, seed=0, weight=[1.0, 1.0],
                                  density=[0.5, 0.5])
                if float(want.norm()) == 0.0:
                    continue
                err = float((dm - want).norm() / want.norm())
                opt = _optimal_error(harness, want, min(32, want.shape[0], want[0].numel()))
                assert err <= 1.05 * opt + 5e-3, (key, err, opt)
                n += 1
    assert n > 100

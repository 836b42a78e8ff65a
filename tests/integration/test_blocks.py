"""Block weights in a real ComfyUI: block resolution over the full-size key lists of real architectures,
the generated table and docs, arch detection, the nodes through ComfyUI's validator and executor, and a
block-weighted merge."""
import importlib
import json
import os
import re

import pytest

from engine import blocks as B
from mergelab import REPO_ROOT, fixtures
from mergelab.harness import api_node
from test_comfy_state import AnyArchModel

P = "diffusion_model."
# (fixture arch, block-table arch, expected block groups {stack: count})
FULL_SIZE = [
    ("SD15", "SD1", {"input_blocks": 12, "middle_block": 3, "output_blocks": 12}),
    ("SDXL", "SDXL", {"input_blocks": 9, "middle_block": 3, "output_blocks": 9}),
    ("SD3", "SD3", {"joint_blocks": 24}),
    ("SD35_Large", "SD3", {"joint_blocks": 38}),
    ("Flux", "Flux", {"double_blocks": 19, "single_blocks": 38}),
    ("FluxSchnell", "Flux", {"double_blocks": 19, "single_blocks": 38}),
    ("WAN21_T2V", "Wan", {"blocks": 40}),
    ("WAN21_T2V_1_3B", "Wan", {"blocks": 30}),
    ("WAN21_I2V", "Wan", {"blocks": 40}),
]


def _prefix_hits(stripped_key, block_ids):
    return [b for b in block_ids if stripped_key == b or (b.endswith(".") and stripped_key.startswith(b))]


@pytest.mark.parametrize("fixture_arch, arch, stacks", FULL_SIZE, ids=[f[0] for f in FULL_SIZE])
def test_every_full_size_key_lands_in_exactly_one_block(fixture_arch, arch, stacks):
    keys = list(fixtures.meta_unet_shapes(fixture_arch))
    assert keys and all(k.startswith(P) for k in keys)
    table_blocks = B.block_list(arch)
    counts = B.block_counts(keys)
    assert sum(counts.values()) == len(keys)
    for k in keys:
        s = k[len(P):]
        hits = _prefix_hits(s, table_blocks)
        # exact prefix matching: exactly one block of the architecture's table claims the key,
        # and it is the block the generic rule derives (input_blocks.1. never takes input_blocks.10.x)
        assert hits == [B.block_of(k)], (k, hits)
    got = {}
    for b in counts:
        st = B.stack_of(b)
        if st:
            got[st[0]] = got.get(st[0], 0) + 1
    assert got == stacks
    # the table the nodes use has this variant's blocks, in this order
    assert [b for b in table_blocks if b in counts] == list(counts)


def test_sd15_exact_prefixes_and_mbw():
    keys = list(fixtures.meta_unet_shapes("SD15"))
    k1 = [k for k in keys if k.startswith(P + "input_blocks.1.")]
    k10 = [k for k in keys if k.startswith(P + "input_blocks.10.")]
    assert k1 and k10 and not set(k1) & set(k10)
    bw = B.BlockWeights.from_mbw("SD1", "IN01:0, IN10:0.5, M00:2")
    assert {bw.factors(k, 1)["weight"][0] for k in k1} == {0.0}
    assert {bw.factors(k, 1)["weight"][0] for k in k10} == {0.5}
    mids = [k for k in keys if k.startswith(P + "middle_block.")]
    assert {bw.factors(k, 1)["weight"][0] for k in mids} == {2.0}
    # time_embed -> IN00 (supermerger), out. -> OUT11
    names = B.mbw_name_of_block("SD1")
    assert {names[B.block_of(k)] for k in keys if ".time_embed." in k} == {"IN00"}
    assert {names[B.block_of(k)] for k in keys if k.startswith(P + "out.")} == {"OUT11"}
    # every SD15 key has an MBW name
    assert all(B.block_of(k) in names for k in keys)


@pytest.mark.parametrize("fixture_arch, arch, n", [("SD15", "SD1", 26), ("SDXL", "SDXL", 20), ("Flux", "Flux", 61)])
def test_mbw_counts_cover_the_real_keys(fixture_arch, arch, n):
    names = B.mbw_names(arch)
    assert len(names) == n
    keys = list(fixtures.meta_unet_shapes(fixture_arch))
    by_block = B.mbw_name_of_block(arch)
    used = {by_block[B.block_of(k)] for k in keys}
    te = {name for name, _ in B.TEXT_ENCODER_NAMES[arch]}
    assert used == set(names) - te          # every non-text-encoder name has keys, every key has a name
    vals = B.parse_mbw(",".join(f"{i}" for i in range(n)), arch)
    bw = B.BlockWeights.from_mbw(arch, ",".join(f"{i}" for i in range(n)))
    for k in keys[::7]:
        assert bw.factors(k, 1)["weight"] == [vals[by_block[B.block_of(k)]]]


def test_table_matches_live_keys_of_every_variant():
    """The committed block table equals what the live meta models give (quick form of --check)."""
    table = B.block_tables()
    for arch, info in table["archs"].items():
        for v in info["variants"]:
            if v["name"] not in fixtures.ARCHITECTURES:
                continue
            live = B.derive_blocks(fixtures.meta_unet_shapes(v["name"]))
            assert [b for b in info["blocks"] if b not in v["missing"]] == live, (arch, v["name"])
            assert len(fixtures.meta_unet_shapes(v["name"])) == v["n_keys"]


def test_generated_files_are_up_to_date():
    from mergelab import gen_block_docs
    assert gen_block_docs.main(["--check"]) == 0, "run: python -m mergelab.gen_block_docs"
    with open(os.path.join(REPO_ROOT, "docs", "blocks.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| `double_blocks.0.` … `double_blocks.18.` | D00 … D18 | 24 each |" in md
    assert "| `time_embed.` | IN00 | 4 |" in md


def test_rebuild_under_another_comfyui_version(tmp_path, monkeypatch, harness):
    """Under another ComfyUI version the committed table serves at once, the blocks are re-indexed from
    the reference configs (meta device) in the background into the user directory, and the next start
    reads that cache."""
    committed = B._read_json(B.TABLE_PATH)
    table_path = tmp_path / "block_tables.json"
    table_path.write_text(json.dumps(committed))
    monkeypatch.setattr(B, "TABLE_PATH", str(table_path))
    monkeypatch.setattr(B, "_running_comfyui_version", lambda: "9.9.9-test")
    cache = B._user_cache_path("9.9.9-test")
    if os.path.exists(cache):
        os.remove(cache)
    B.reset_tables()
    try:
        first = B.block_tables()
        assert first["comfyui_version"] == committed["comfyui_version"]        # no waiting at start-up
        assert B.wait_for_rebuild(300)
        rebuilt = B._read_json(cache)
        assert rebuilt["comfyui_version"] == "9.9.9-test" and rebuilt["source_version"] == committed["comfyui_version"]
        # every variant builds, also those that need checkpoint tensors (Stable Zero123's cc_projection,
        # Stable Audio's number conditioners), and gives the committed blocks and key counts
        assert rebuilt["kept_from_source"] == []
        assert rebuilt["archs"].keys() == committed["archs"].keys()
        for a in committed["archs"]:
            assert rebuilt["archs"][a]["blocks"] == committed["archs"][a]["blocks"], a
            assert rebuilt["archs"][a]["keys"] == committed["archs"][a]["keys"], a
        B.reset_tables()
        second = B.block_tables()
        assert second["comfyui_version"] == "9.9.9-test"
        assert second["archs"]["Flux"]["blocks"] == committed["archs"]["Flux"]["blocks"]
        assert "rebuild" not in B._tables                                    # read from the cache
    finally:
        B.wait_for_rebuild(300)
        B.reset_tables()
        if os.path.exists(cache):
            os.remove(cache)


# -- arch detection and checks on real ComfyUI objects ------------------------------------------------
@pytest.mark.parametrize("fixture_arch, arch", [("SD15", "SD1"), ("SDXL", "SDXL"), ("Flux", "Flux"),
                                                ("FluxSchnell", "Flux")])
def test_arch_of_real_models_and_clips(fixture_arch, arch):
    assert B.arch_of(fixtures.small_model(fixture_arch)) == arch
    assert B.arch_of(fixtures.small_clip(fixture_arch)) == arch


def test_arch_of_meta_models_of_every_config_class():
    for name in ("SD20", "SD21UnclipL", "SD3", "SD35_Large", "WAN21_I2V", "WAN22_T2V", "QwenImage", "LTXV"):
        class Patcher:      # arch_of reads model.model.model_config, as on a ModelPatcher
            model = fixtures.meta_model(name)
        assert B.arch_of(Patcher()) == B.arch_of_config(fixtures.arch_spec(name).config_class) in B.ARCHITECTURES


def test_check_against_real_model():
    m = fixtures.small_model("SD15")
    keys = list(m.get_key_patches(P))
    B.BlockWeights.from_mbw("SD1", preset="GRAD_V").check(m, keys)
    with pytest.raises(ValueError, match=r"made for SDXL, but the model is SD 1.x \(SD1\)"):
        B.BlockWeights.from_mbw("SDXL", preset="GRAD_V").check(m, keys)
    clip = fixtures.small_clip("SDXL")
    ckeys = list(clip.patcher.get_key_patches())
    bw = B.BlockWeights.from_mbw("SDXL", "BASE:0.5")
    assert bw.check(clip, ckeys) == []
    assert {bw.factors(k, 1)["weight"][0] for k in ckeys} == {0.5}        # clip_l. and clip_g. are BASE


# -- nodes in ComfyUI ---------------------------------------------------------------------------------
def _defaults(class_type):
    return api_node(class_type)["inputs"]


def _capture(node_id, **inputs):
    return {"1": {"class_type": node_id, "inputs": {**_defaults(node_id), **inputs}},
            "2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "bw"}}}


def test_block_nodes_registered_with_tooltips(harness):
    import nodes
    ids = harness.pack_node_ids
    for arch in B.architectures():
        assert f"MergeLab_BlockWeights_{arch}" in ids
    extras = ("MergeLab_BlockWeightsMBW", "MergeLab_BlockRules", "MergeLab_CombineBlockWeights")
    for extra in extras:
        assert extra in ids
    for i in ids:
        if not (i.startswith("MergeLab_BlockWeights_") or i in extras):
            continue
        cls = nodes.NODE_CLASS_MAPPINGS[i]
        schema = cls.GET_SCHEMA()
        assert schema.category == "MergeLab/block weights"
        for inp in schema.inputs:
            assert inp.tooltip, (i, inp.id)
    sd1 = nodes.NODE_CLASS_MAPPINGS["MergeLab_BlockWeights_SD1"].INPUT_TYPES()["required"]
    assert [k for k in sd1 if k not in ("param", "models")] == B.block_list("SD1")
    opts = sd1["input_blocks.4."][1]
    assert opts["default"] == 1.0 and opts["min"] == -10.0 and opts["max"] == 10.0
    params = sd1["param"][1]["options"] if sd1["param"][0] == "COMBO" else sd1["param"][0]
    assert params[0] == "weight" and "density" in params and "t" in params


def test_arch_node_graph(harness):
    res = harness.run_ok(_capture("MergeLab_BlockWeights_SD1", **{"input_blocks.4.": 0.5, "out.": -2.0,
                                                                    "param": "density", "models": "2"}))
    bw = res.captured["bw"]
    blocks = {b: 1.0 for b in B.block_list("SD1")}
    blocks.update({"input_blocks.4.": 0.5, "out.": -2.0})
    assert bw.to_dict() == {"format": "mergelab.block_weights", "version": 1, "entries": [
        {"arch": "SD1", "param": "density", "models": [2], "blocks": blocks, "rules": [], "label": "SD1 blocks"}]}
    assert bw.factors(P + "input_blocks.4.1.proj_in.weight", 2) == {"density": [1.0, 0.5]}
    assert B.BlockWeights.from_dict(bw.to_dict()).to_dict() == bw.to_dict()


def test_flux_node_graph(harness):
    res = harness.run_ok(_capture("MergeLab_BlockWeights_Flux", **{"double_blocks.3.": 0.0,
                                                                     "single_blocks.37.": 3.0}))
    bw = res.captured["bw"]
    assert bw.factors(P + "double_blocks.3.img_attn.qkv.weight", 1) == {"weight": [0.0]}
    assert bw.factors(P + "single_blocks.37.linear1.weight", 1) == {"weight": [3.0]}
    assert bw.factors(P + "double_blocks.13.img_attn.qkv.weight", 1) == {"weight": [1.0]}


def test_mbw_node_graph_and_chaining(harness):
    prompt = _capture("MergeLab_BlockWeightsMBW", arch="SDXL", preset="GRAD_V", mbw="M00:0.5")
    prompt["0"] = {"class_type": "MergeLab_BlockRules",
                   "inputs": {**_defaults("MergeLab_BlockRules"), "rules": "re:attn2=0\n", "param": "t"}}
    prompt["1"]["inputs"]["combine_with"] = ["0", 0]
    bw = harness.run_ok(prompt).captured["bw"]
    expected = B.combine(B.BlockWeights.from_rules("re:attn2=0\n", param="t"),
                         B.BlockWeights.from_mbw("SDXL", "M00:0.5", preset="GRAD_V"))
    assert bw.to_dict() == expected.to_dict()
    k = P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert bw.factors(k, 1) == {"t": [0.0], "weight": [pytest.approx(B.PRESETS["GRAD_V"][5])]}


def test_combine_node_graph(harness):
    prompt = {
        "a": {"class_type": "MergeLab_BlockWeightsMBW",
              "inputs": {**_defaults("MergeLab_BlockWeightsMBW"), "arch": "Flux", "mbw": "D00-D18:0.5"}},
        "b": {"class_type": "MergeLab_BlockWeightsMBW",
              "inputs": {**_defaults("MergeLab_BlockWeightsMBW"), "arch": "Flux", "mbw": "D05:4"}},
        "c": {"class_type": "MergeLab_CombineBlockWeights", "inputs": {"a": ["a", 0], "b": ["b", 0]}},
        "2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["c", 0], "name": "bw"}},
    }
    bw = harness.run_ok(prompt).captured["bw"]
    assert len(bw.entries) == 2
    assert bw.factors(P + "double_blocks.5.txt_mlp.0.weight", 1) == {"weight": [2.0]}
    assert bw.factors(P + "double_blocks.6.txt_mlp.0.weight", 1) == {"weight": [0.5]}


@pytest.mark.parametrize("node, inputs, message", [
    ("MergeLab_BlockWeightsMBW", {"arch": "SDXL", "mbw": ",".join(["1"] * 26)}, "needs 20 values"),
    ("MergeLab_BlockWeightsMBW", {"arch": "Flux", "mbw": "IN00:1"}, "unknown block name 'IN00'"),
    ("MergeLab_BlockWeightsMBW", {"models": "0"}, "model numbers start at 1"),
    ("MergeLab_BlockRules", {"rules": "re:(oops=1"}, "bad regular expression"),
])
def test_bad_inputs_are_rejected_by_validation(harness, node, inputs, message):
    res = harness.run(_capture(node, **inputs))
    assert not res.success
    assert message in res.error_text()


def test_block_weighted_merge_end_to_end(harness):
    """task_arithmetic of a tuned SD15 onto its base with IN04 weighted 0: exactly the base there."""
    import torch
    prompt = {
        "base": {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": "SD15", "seed": 0, "delta_seed": 0,
                                                                      "delta_scale": 0.0, "dtype": "fp32"}},
        "tuned": {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": "SD15", "seed": 0, "delta_seed": 5,
                                                                       "delta_scale": 0.01, "dtype": "fp32"}},
        "in": {"class_type": "MergeLab_MergeInput",
               "inputs": {**_defaults("MergeLab_MergeInput"), "model": ["tuned", 0], "weight": 1.0}},
        "method": {"class_type": "MergeLab_Method_task_arithmetic",
                   "inputs": _defaults("MergeLab_Method_task_arithmetic")},
        "bw": {"class_type": "MergeLab_BlockWeightsMBW",
               "inputs": {**_defaults("MergeLab_BlockWeightsMBW"), "arch": "SD1", "mbw": "IN04:0, OUT11:0.5"}},
        "merge": {"class_type": "MergeLab_ModelMerger",
                  "inputs": {**_defaults("MergeLab_ModelMerger"), "base": ["base", 0], "method": ["method", 0],
                             "models": ["in", 0], "block_weights": ["bw", 0], "device": "cpu"}},
        "2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 0], "name": "m"}},
    }
    merged = harness.run_ok(prompt).captured["m"]
    base = fixtures.small_model("SD15").model.state_dict()
    tuned = fixtures.small_model("SD15", delta_seed=5, delta_scale=0.01).model.state_dict()

    def merged_weight(key):
        patches = merged.patches.get(key)
        assert patches, key
        return patches[-1][1][1][0]

    k_in4 = next(k for k in base if k.startswith(P + "input_blocks.4.") and k.endswith(".weight"))
    k_out = next(k for k in base if k.startswith(P + "out.") and k.endswith(".weight"))
    k_in5 = next(k for k in base if k.startswith(P + "input_blocks.5.") and k.endswith(".weight"))
    torch.testing.assert_close(merged_weight(k_in4), base[k_in4])
    torch.testing.assert_close(merged_weight(k_out), base[k_out] + 0.5 * (tuned[k_out] - base[k_out]))
    torch.testing.assert_close(merged_weight(k_in5), tuned[k_in5])
    # a block-weight node of another architecture is refused with a clear message
    prompt["bw"]["inputs"]["arch"] = "SDXL"
    prompt["bw"]["inputs"]["mbw"] = "IN04:0"
    res = harness.run(prompt)
    assert not res.success and re.search(r"made for SDXL, but the model is SD 1\.x", res.error_text())


def _small_te_clip(config_name, te_name, seed):
    """A small real text encoder of a model whose CLIP class derives from SD1ClipModel (Chroma's t5, Wan's
    umt5): ComfyUI's own classes with tiny T5 widths, random weights."""
    import torch
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    cls = getattr(sm, config_name)
    cfg = cls.__new__(cls)
    cfg.unet_config = {}
    target = cfg.clip_target({})
    clip = comfy.sd.CLIP(no_init=True)
    with torch.inference_mode(False):
        g = torch.Generator().manual_seed(seed)
        csm = target.clip(dtype=torch.float32, model_options={
            f"{te_name}_model_config": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4}})
        for p in csm.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    clip.cond_stage_model = csm
    clip.patcher = comfy.model_patcher.ModelPatcher(csm, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
    clip.tokenizer, clip.tokenizer_options, clip.layer_idx = None, {}, None      # what CLIP.clone copies
    clip.use_clip_schedule, clip.apply_hooks_to_conds = False, None
    return clip


@pytest.mark.parametrize("config_name, te_name, prefix", [("Chroma", "t5xxl", "t5xxl."), ("WAN21_T2V", "umt5xxl", "umt5xxl.")])
def test_text_encoders_derived_from_sd1clip_are_not_sd1(harness, config_name, te_name, prefix):
    """Chroma's and Wan's text encoders subclass ComfyUI's SD1ClipModel: they are not SD 1.x.  Flux's `T5`
    block weights apply to Chroma's t5xxl (the same keys); SD1's BASE (clip_l.) is refused as matching no
    key (it was accepted and did nothing), and Flux's T5 on Wan's umt5xxl likewise."""
    import importlib
    import torch
    E, MM, PB = (importlib.import_module(f"{harness.pack_module_name}.{m}")
                 for m in ("engine.merge", "merge_methods", "engine.blocks"))
    a, b = _small_te_clip(config_name, te_name, 0), _small_te_clip(config_name, te_name, 1)
    assert PB.arch_of(a) is None
    keys = list(a.patcher.get_key_patches())
    assert keys and all(k.startswith(prefix) for k in keys)
    meth = MM.create("task_arithmetic")
    plain = E.merge_models(a, [E.MergeInput(b, {}, "b")], meth, E.MergeOptions(device="cpu"))
    with pytest.raises(ValueError, match="none of"):
        E.merge_models(a, [E.MergeInput(b, {}, "b")], meth,
                       E.MergeOptions(device="cpu", block_weights=PB.BlockWeights.from_mbw("SD1", "BASE:0")))
    flux_t5 = PB.BlockWeights.from_mbw("Flux", "T5:0")
    if config_name == "Chroma":
        out = E.merge_models(a, [E.MergeInput(b, {}, "b")], meth, E.MergeOptions(device="cpu", block_weights=flux_t5))
        k = next(k for k in keys if k.endswith(".weight") and k in plain.patcher.patches)
        assert torch.equal(out.patcher.patches[k][-1][1][1][0], a.patcher.model.state_dict()[k])   # factor 0: a
        assert not torch.equal(plain.patcher.patches[k][-1][1][1][0], a.patcher.model.state_dict()[k])
    else:
        with pytest.raises(ValueError, match="none of"):
            E.merge_models(a, [E.MergeInput(b, {}, "b")], meth, E.MergeOptions(device="cpu", block_weights=flux_t5))


@pytest.mark.parametrize("method, params, mbw, param", [
    ("ties", {"density": 0.8}, "OUT11:2", "density"),
    ("slerp", {"t": 0.5}, "OUT11:5", "t"),          # 2.5: beyond the extrapolation range [-1, 2]
])
def test_block_factors_out_of_a_parameter_range_fail_before_merging(harness, method, params, mbw, param):
    """ties with density 0.8 and an OUT11 factor of 2 on density (1.6), slerp with t 0.5 times 5: refused
    before any key is merged (it stopped at the last block), naming the block."""
    import importlib
    E, MM, PB = (importlib.import_module(f"{harness.pack_module_name}.{m}")
                 for m in ("engine.merge", "merge_methods", "engine.blocks"))
    base = fixtures.small_model("SD15")
    tuned = fixtures.small_model("SD15", delta_seed=5, delta_scale=0.01)
    glob = {k: v for k, v in params.items() if not MM.create(method).spec.param(k).per_model}
    per = {k: v for k, v in params.items() if k not in glob}
    bw = PB.BlockWeights.from_mbw("SD1", mbw, param=param)
    done = []
    with pytest.raises(MM.MergeError, match=rf"block 'output_blocks\.11\.'.*{param}"):
        E.merge_models(base, [E.MergeInput(tuned, per, "model 1")], MM.create(method, **glob),
                       E.MergeOptions(device="cpu", block_weights=bw, progress=lambda i, n: done.append(i)))
    assert done == []


class _AnyArchModel(AnyArchModel):
    """:class:`test_comfy_state.AnyArchModel`, or an SD3 with a ``context_processor`` (a block ComfyUI
    detects from a checkpoint but the SD3 table does not list)."""

    def go(self, arch, delta_seed):
        if arch == "SD3_context_processor":
            return (_sd3_with_context_processor(delta_seed),)
        return super().go(arch, delta_seed)


_ctx_cache = {}


def _sd3_with_context_processor(delta_seed):
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    if delta_seed not in _ctx_cache:
        config = dict(fixtures.small_unet_config("SD3"), context_processor_layers=1)
        model_config = sm.SD3(config)
        model_config.unet_config.update(config)
        model_config.set_inference_dtype(torch.float32, None)
        with torch.inference_mode(False):
            model = model_config.get_model({}, "", device=torch.device("cpu"))
            fixtures._fill_module(model, 0, delta_seed, 0.5, only_prefix="diffusion_model.")
        _ctx_cache[delta_seed] = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                                  offload_device=torch.device("cpu"))
    return _ctx_cache[delta_seed].clone()


def _arch_merge_graph(harness, arch, bw_node, bw_values):
    harness.register_test_node("MergeLabTest_AnyArchModelB", _AnyArchModel)
    return {"m0": {"class_type": "MergeLabTest_AnyArchModelB", "inputs": {"arch": arch, "delta_seed": 1}},
            "m1": {"class_type": "MergeLabTest_AnyArchModelB", "inputs": {"arch": arch, "delta_seed": 2}},
            "in0": api_node("MergeLab_MergeInput", model=["m0", 0]),
            "in1": api_node("MergeLab_MergeInput", model=["m1", 0], models=["in0", 0]),
            "method": api_node("MergeLab_Method_weighted_sum", ratio=1.0),
            "bw": api_node(bw_node, **bw_values, param="ratio", models="all"),
            "merge": api_node("MergeLab_ModelMerger", method=["method", 0], models=["in1", 0], seed=7, device="cpu",
                              block_weights=["bw", 0]),
            "cap": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 0], "name": "out"}},
            "cap_r": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 1], "name": "report"}}}


@pytest.mark.parametrize("arch,core_node,ours", [
    ("SDXL", "ModelMergeSDXL", "SDXL"), ("Flux", "ModelMergeFlux1", "Flux"), ("SD3", "ModelMergeSD3_2B", "SD3"),
    ("WAN21_T2V", "ModelMergeWAN2_1", "Wan"), ("WAN21_FunControl2V_1_1", "ModelMergeWAN2_1", "Wan")])
def test_block_weights_equal_comfyuis_per_architecture_merge_nodes(harness, arch, core_node, ours):
    """weighted_sum with a different factor per block == ComfyUI's own per-architecture merge node with the
    same per-block ratios, key for key (SD1: test_model_merge).  ComfyUI gives keys none of its inputs
    names (a bare parameter such as SD3's pos_embed, Wan Fun 1.1's ref_conv) its first input's ratio; we
    give those blocks that ratio too, and check that our node's own value for them is used."""
    import torch
    import nodes as comfy_nodes
    weights = importlib.import_module(f"{harness.pack_module_name}.engine.weights")
    args = [a for a in comfy_nodes.NODE_CLASS_MAPPINGS[core_node].INPUT_TYPES()["required"]
            if a not in ("model1", "model2")]
    core_values = {a: ((i * 37) % 97 + 1) / 100.0 for i, a in enumerate(args)}
    default = core_values[args[0]]
    bw_node = f"MergeLab_BlockWeights_{ours}"
    widgets = [b for b in comfy_nodes.NODE_CLASS_MAPPINGS[bw_node].INPUT_TYPES()["required"]
               if b not in ("param", "models")]
    # ComfyUI gives a key the ratio of its longest input that is a prefix of it, else its first input's
    matched = {b: max((a for a in args if b.startswith(a)), key=len, default=None) for b in widgets}
    ours_values = {b: core_values[a] if a else default for b, a in matched.items()}
    assert sum(a is not None for a in matched.values()) >= min(len(widgets), len(args)) - 4   # ComfyUI's blocks
    g = _arch_merge_graph(harness, arch, bw_node, ours_values)
    g["core"] = {"class_type": core_node, "inputs": {"model1": ["m0", 0], "model2": ["m1", 0], **core_values}}
    g["cap_core"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["core", 0], "name": "core"}}
    res = harness.run_ok(harness.with_defaults(g))
    read = lambda o, k: weights.KeySource.of(o).read(k, torch.device("cpu"))      # noqa: E731
    keys = [k for k in res.captured["out"].model.state_dict() if k.startswith("diffusion_model.")]
    # one KeySource per model: building one is a pass over all its keys and patches
    ours_src, core_src = (weights.KeySource.of(res.captured[c]) for c in ("out", "core"))
    for key in keys:
        torch.testing.assert_close(ours_src.read(key, torch.device("cpu")), core_src.read(key, torch.device("cpu")),
                                   rtol=1e-6, atol=1e-7, msg=key)
    assert "no value for this model" not in res.captured["report"]
    if arch == "WAN21_FunControl2V_1_1":        # ref_conv. is a block of the Wan node, with its own value
        g["bw"]["inputs"]["ref_conv."] = 0.25
        out = harness.run_ok(harness.with_defaults(g)).captured["out"]
        m0, m1 = fixtures.small_model(arch, delta_seed=1, delta_scale=0.5), fixtures.small_model(arch, delta_seed=2,
                                                                                               delta_scale=0.5)
        key = "diffusion_model.ref_conv.weight"
        torch.testing.assert_close(read(out, key), read(m0, key) * 0.25 + read(m1, key) * 0.75)


def test_a_block_the_architectures_node_does_not_list_is_named_in_a_warning(harness):
    """ComfyUI detects an SD3 with a context_processor from a checkpoint's keys; the SD3 node has no value
    for that block, so its keys keep factor 1: the merge report and the log say so.  A Block Rules node
    that sets those keys silences it."""
    import nodes as comfy_nodes
    widgets = [b for b in comfy_nodes.NODE_CLASS_MAPPINGS["MergeLab_BlockWeights_SD3"].INPUT_TYPES()["required"]
               if b not in ("param", "models")]
    assert "context_processor." not in widgets
    g = _arch_merge_graph(harness, "SD3_context_processor", "MergeLab_BlockWeights_SD3", {b: 0.3 for b in widgets})
    report = harness.run_ok(harness.with_defaults(g)).captured["report"]
    assert "no value for this model's context_processor.; their keys keep factor 1" in report
    g["rules"] = api_node("MergeLab_BlockRules", rules="context_processor.*=0.3", param="ratio", models="all")
    g["both"] = api_node("MergeLab_CombineBlockWeights", a=["bw", 0], b=["rules", 0])
    g["merge"]["inputs"]["block_weights"] = ["both", 0]
    report = harness.run_ok(harness.with_defaults(g)).captured["report"]
    assert "no value for this model" not in report


def test_block_weights_that_change_nothing_in_a_text_encoder_are_named(harness):
    """Block weights whose factors ≠ 1 are all on diffusion-model blocks did nothing in a CLIP merge, with no
    word (SD3, Wan, Chroma ... have no text-encoder block names at all).  The merge report now says so;
    weights that do reach the text encoder (Flux's T5) say nothing."""
    keys = ["clip_l.transformer.text_model.final_layer_norm.weight", "t5xxl.transformer.shared.weight"]
    warned = B.BlockWeights.from_mbw("SD3", "J00:0.5").check("SD3", keys)
    assert len(warned) == 1 and "change nothing in this text encoder" in warned[0] and "no text-encoder" in warned[0]
    assert B.BlockWeights.from_mbw("Flux", "T5:0.5,D00:0.5").check("Flux", keys) == []
    clip = lambda d: {"class_type": "MergeLabTest_SmallModel",                    # noqa: E731
                      "inputs": {"arch": "Flux", "seed": 0, "delta_seed": d, "delta_scale": 0.02 if d else 0.0,
                                 "dtype": "fp32"}}
    g = {"a": clip(1), "b": clip(2),
         "in0": api_node("MergeLab_MergeInput", clip=["a", 1]),
         "in1": api_node("MergeLab_MergeInput", clip=["b", 1], models=["in0", 0]),
         "method": api_node("MergeLab_Method_weighted_sum", ratio=0.3),
         "bw": api_node("MergeLab_BlockWeightsMBW", arch="Flux", mbw="D00:0.5", param="ratio"),
         "merge": api_node("MergeLab_CLIPMerger", method=["method", 0], models=["in1", 0], seed=0, device="cpu",
                           block_weights=["bw", 0]),
         "cap_r": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 1], "name": "report"}}}
    report = harness.run_ok(harness.with_defaults(g)).captured["report"]
    assert "warning: block weights" in report and "change nothing in this text encoder" in report

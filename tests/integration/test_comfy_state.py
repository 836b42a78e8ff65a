"""ComfyUI state beside the weight patches: weight wrappers (a TrainLoraNode LoRA) are part of the merged
weights in any input order; settings the result does not take over from an input (prediction type,
ModelSampling and other sampling patches, CLIP last layer, CLIP hooks) are named in a warning and in the
merge report.  All through ComfyUI's executor."""
import importlib
import os

import pytest
import torch
from safetensors import safe_open


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


def small(delta_seed=0):
    return {"class_type": "MergeLabTest_SmallModel",
            "inputs": {"arch": "SD15", "seed": 0, "delta_seed": delta_seed, "delta_scale": 0.02 if delta_seed else 0.0,
                       "dtype": "fp32"}}


def cap(src, name, idx=0):
    return {"class_type": "MergeLabTest_Capture", "inputs": {"value": [src, idx], "name": name}}


def weighted_sum(nid, first, second, ratio, kind="model", base=None):
    """Nodes ``nid``_*: a weighted_sum merge of ``first`` and ``second`` (node ids; ``kind`` model or clip)."""
    slot = 0 if kind == "model" else 1
    src = lambda ref: ref if isinstance(ref, list) else [ref, slot]    # noqa: E731
    g = {f"{nid}_i1": {"class_type": "MergeLab_MergeInput", "inputs": {kind: src(first)}},
         f"{nid}_i2": {"class_type": "MergeLab_MergeInput", "inputs": {kind: src(second), "models": [f"{nid}_i1", 0]}},
         f"{nid}_m": {"class_type": "MergeLab_Method_weighted_sum", "inputs": {"ratio": ratio}},
         nid: {"class_type": "MergeLab_ModelMerger" if kind == "model" else "MergeLab_CLIPMerger",
               "inputs": {"method": [f"{nid}_m", 0], "models": [f"{nid}_i2", 0], "seed": 0, "device": "cpu"}},
         f"{nid}_c": cap(nid, nid), f"{nid}_r": cap(nid, nid + "_report", 1)}
    if base is not None:
        g[nid]["inputs"]["base"] = src(base)
    return g


class FreshModel:
    """A small SD15 MODEL built anew (not the fixtures' cached one): training changes its module (it turns
    requires_grad off on every weight), which must not leak into other tests' shared fixtures."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"delta_seed": ("INT", {"default": 1})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "go"
    CATEGORY = "testing"

    def go(self, delta_seed):
        from mergelab import fixtures
        return (fixtures._build_small_model("SD15", 0, None, delta_seed, 0.02),)


def trained_graph(harness):
    """A LoRA trained for 3 steps by ComfyUI's TrainLoraNode on x1: it lives in weight_wrapper_patches."""
    harness.register_test_node("MergeLabTest_FreshModel", FreshModel)
    return {
        "x1": {"class_type": "MergeLabTest_FreshModel", "inputs": {"delta_seed": 1}}, "x2": small(2),
        "enc": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["x2", 1], "text": "a cat"}},
        "lat2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        # a list of latents (0.3.75's TrainLoraNode fails on a single LATENT: multi_res unbound)
        "rb": {"class_type": "RebatchLatents", "inputs": {"latents": ["lat2", 0], "batch_size": 1}},
        "train": {"class_type": "TrainLoraNode", "inputs": {
            "model": ["x1", 0], "latents": ["rb", 0], "positive": ["enc", 0], "batch_size": 1,
            "grad_accumulation_steps": 1, "steps": 3, "learning_rate": 0.05, "rank": 2, "optimizer": "AdamW",
            "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA",
            "gradient_checkpointing": False, "existing_lora": "[None]"}},
        "c_train": cap("train", "train"), "c_x2": cap("x2", "x2"),
    }


def test_trained_lora_weight_wrappers_are_merged_in_either_order_and_saved(harness):
    """weighted_sum(trained, x2, 0.3) and weighted_sum(x2, trained, 0.7) are the same merge: both include
    the trained LoRA at its share, and the result keeps no wrapper (which would apply it again at full
    strength).  Save Model writes the wrapped weights."""
    g = trained_graph(harness)
    g.update(weighted_sum("first", "train", "x2", 0.3))
    g.update(weighted_sum("second", "x2", "train", 0.7))
    g["save"] = {"class_type": "MergeLab_SaveModel", "inputs": {"model": ["train", 0], "filename_prefix": "state/trained",
                                                               "dtype": "keep", "save_recipe": False,
                                                               "hash_input_files": False}}
    r = harness.run_ok(harness.with_defaults(g))
    trained, x2 = r.captured["train"], r.captured["x2"]
    wrapped = sorted(trained.weight_wrapper_patches)
    assert len(wrapped) > 100                 # the LoRA is there, as wrappers only
    KeySource = pack(harness, "engine.weights").KeySource
    cpu = torch.device("cpu")
    # what ComfyUI's ops compute for the trained model: the stored weight, then each wrapper
    sd = trained.model.state_dict()
    changed = 0
    for key in wrapped[::25]:
        with torch.no_grad():
            want_trained = sd[key].float()
            for f in trained.weight_wrapper_patches[key]:
                want_trained = f(want_trained)
        got_trained = KeySource.of(trained).read(key, cpu)
        torch.testing.assert_close(got_trained, want_trained, rtol=0, atol=1e-6)
        changed += not torch.equal(want_trained, sd[key].float())
        want = 0.3 * want_trained + 0.7 * KeySource.of(x2).read(key, cpu)
        for nid in ("first", "second"):
            merged = r.captured[nid]
            assert key not in merged.weight_wrapper_patches, nid
            torch.testing.assert_close(KeySource.of(merged).read(key, cpu), want, rtol=0, atol=1e-6)
    assert changed >= len(wrapped[::25]) // 2
    path = os.path.join(harness.output_dir, "state", "trained_00001_.safetensors")
    with safe_open(path, "pt") as f:
        for key in wrapped[::25]:
            if key.startswith("diffusion_model."):
                torch.testing.assert_close(f.get_tensor("model." + key), KeySource.of(trained).read(key, cpu),
                                           rtol=0, atol=0)


class VPrediction:
    """The model with its model_type set to V_PREDICTION, as a v-prediction checkpoint loads."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "go"
    CATEGORY = "testing"

    def go(self, model):
        import copy

        import comfy.model_base
        import comfy.model_patcher
        with torch.inference_mode(False):
            m = copy.deepcopy(model.model)
            m.model_type = comfy.model_base.ModelType.V_PREDICTION
            m.model_sampling = comfy.model_base.model_sampling(m.model_config, m.model_type)
        return (comfy.model_patcher.ModelPatcher(m, model.load_device, model.offload_device),)


def _warnings(report):
    return [line for line in report.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize("case", ["vpred", "model_sampling", "freeu_pag", "no_base", "same"])
def test_model_settings_the_result_does_not_keep_are_named(harness, case, caplog):
    harness.register_test_node("MergeLabTest_VPrediction", VPrediction)
    g = {"b": small(), "x1": small(1), "x2": small(2),
         "vp": {"class_type": "MergeLabTest_VPrediction", "inputs": {"model": ["x1", 0]}},
         "msd": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["x1", 0], "sampling": "v_prediction",
                                                                  "zsnr": True}},
         "msd_b": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["b", 0], "sampling": "v_prediction",
                                                                    "zsnr": True}},
         "freeu": {"class_type": "FreeU_V2", "inputs": {"model": ["x1", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
         "pag": {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["x2", 0], "scale": 3.0}}}
    first, second, base, expect = {
        "vpred": ("vp", "x2", "b", ["model 1's prediction type V_PREDICTION"]),
        "model_sampling": ("msd", "x2", "b", ["model 1's model sampling ModelSamplingAdvanced"]),
        "freeu_pag": ("freeu", "pag", "b", ["model 1's sampling option transformer_options.patches.output_block_patch "
                                            "(FreeU_V2", "model 2's sampling option sampler_post_cfg_function "
                                            "(PerturbedAttentionGuidance"]),
        # model 1 is the reference without a base: its FreeU is kept, model 2's PAG is not
        "no_base": ("freeu", "pag", None, ["model 2's sampling option sampler_post_cfg_function"]),
        # the base's own patch, the inputs plain: nothing of theirs is missing
        "same": ("x1", "x2", "msd_b", []),
    }[case]
    g.update(weighted_sum("merge", first, second, 0.5, base=base))
    caplog.set_level("WARNING", logger="MergeLab")
    r = harness.run_ok(harness.with_defaults(g))
    shown = _warnings(r.captured["merge_report"])
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "MergeLab"]
    assert len(shown) == len(expect), shown
    for want, line in zip(expect, shown):
        assert line.startswith("warning: " + want), (want, line)
        assert "not in the result" in line
        assert any(line[len("warning: "):] in msg for msg in logged)
    out = r.captured["merge"]
    if case == "vpred":
        assert out.model.model_type.name == "EPS"
    if case == "no_base":
        assert "output_block_patch" in out.model_options["transformer_options"]["patches"]


@pytest.mark.parametrize("case", ["layer", "hook", "base_layer"])
def test_clip_settings_the_result_does_not_keep_are_named(harness, case, caplog):
    lora = None
    g = {"b": small(), "x1": small(1),
         "last": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["x1", 1], "stop_at_clip_layer": -2}},
         "last_b": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["b", 1], "stop_at_clip_layer": -2}}}
    if case == "hook":
        from test_saving import make_lora      # a small LoRA in the harness's loras folder
        lora = os.path.basename(make_lora(harness, "state_hook_lora.safetensors"))
        g["hook"] = {"class_type": "CreateHookLora", "inputs": {"lora_name": lora, "strength_model": 1.0,
                                                              "strength_clip": 1.0}}
        g["hooked"] = {"class_type": "SetClipHooks", "inputs": {"clip": ["x1", 1], "hooks": ["hook", 0],
                                                               "apply_to_conds": True, "schedule_clip": False}}
    first, base, expect = {"layer": (["last", 0], ["b", 1], "model 1's CLIP layer -2"),
                           "hook": (["hooked", 0], ["b", 1], "model 1's CLIP hook"),
                           "base_layer": (["x1", 1], ["last_b", 0], None)}[case]
    g.update(weighted_sum("merge", first, ["b", 1], 0.5, kind="clip", base=base))
    caplog.set_level("WARNING", logger="MergeLab")
    r = harness.run_ok(harness.with_defaults(g))
    shown = _warnings(r.captured["merge_report"])
    if expect is None:
        assert shown == []
        assert r.captured["merge"].layer_idx == -2
    else:
        assert len(shown) == 1 and shown[0].startswith("warning: " + expect), shown


@pytest.mark.parametrize("arch,warned", [("SD15", False), ("SDXL", True)])
def test_a_clip_layer_that_encodes_as_the_default_is_not_named(harness, arch, warned):
    """CLIPSetLastLayer -1 on an SD1.5 CLIP encodes exactly as the checkpoint's own setting (the last layer
    after the final norm), so the result loses nothing and no warning is due; on SDXL (whose own output is
    the penultimate layer) -1 is a real change and is named."""
    model = lambda d: {"class_type": "MergeLabTest_SmallModel",    # noqa: E731
                       "inputs": {"arch": arch, "seed": 0, "delta_seed": d, "delta_scale": 0.02 if d else 0.0,
                                  "dtype": "fp32"}}
    g = {"b": model(0), "x1": model(1),
         "last": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["x1", 1], "stop_at_clip_layer": -1}},
         "enc_set": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["last", 0], "text": "a red fox"}},
         "enc_own": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["x1", 1], "text": "a red fox"}},
         "ce_set": cap("enc_set", "enc_set"), "ce_own": cap("enc_own", "enc_own")}
    g.update(weighted_sum("merge", ["last", 0], ["b", 1], 0.5, kind="clip", base=["b", 1]))
    r = harness.run_ok(harness.with_defaults(g))
    same = torch.equal(r.captured["enc_set"][0][0], r.captured["enc_own"][0][0])
    assert same is not warned       # the premise: -1 changes the encoding on SDXL only
    shown = _warnings(r.captured["merge_report"])
    if warned:
        assert len(shown) == 1 and shown[0].startswith("warning: model 1's CLIP layer -1"), shown
    else:
        assert shown == []


class AnyArchModel:
    """A small MODEL of any architecture of :mod:`mergelab.fixtures` (delta_seed 0: the base)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"arch": ("STRING", {"default": "SD15"}), "delta_seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "go"
    CATEGORY = "testing"

    def go(self, arch, delta_seed):
        from mergelab import fixtures
        return (fixtures.small_model(arch, delta_seed=delta_seed or None, delta_scale=0.5 if delta_seed else 0.0),)


@pytest.mark.parametrize("arch,key", [("WAN21_T2V", "diffusion_model.blocks.0.modulation"),
                                      ("SD3", "diffusion_model.pos_embed")])
def test_merged_parameters_comfyui_does_not_patch_are_used_when_the_model_runs(harness, arch, key):
    """ComfyUI's loader patches only parameters of modules without parameters below them, and no buffers:
    WAN's blocks.N.modulation (a parameter) and SD3's pos_embed (a buffer) kept the base's value in the
    loaded model (while a saved file held the merged one).  Loaded for sampling, the merged model now holds the merged values; loading the
    base afterwards gives the base's back (the shared module is not changed for good)."""
    import comfy.model_management as mm
    harness.register_test_node("MergeLabTest_AnyArchModel", AnyArchModel)
    g = {"a": {"class_type": "MergeLabTest_AnyArchModel", "inputs": {"arch": arch, "delta_seed": 0}},
         "b": {"class_type": "MergeLabTest_AnyArchModel", "inputs": {"arch": arch, "delta_seed": 5}},
         "ca": cap("a", "a"), "cb": cap("b", "b")}
    g.update(weighted_sum("merge", "a", "b", 0.25))
    r = harness.run_ok(harness.with_defaults(g))
    a, b, merged = r.captured["a"], r.captured["b"], r.captured["merge"]
    KeySource = pack(harness, "engine.weights").KeySource
    cpu = torch.device("cpu")
    want = 0.25 * KeySource.of(a).read(key, cpu) + 0.75 * KeySource.of(b).read(key, cpu)
    base_value = KeySource.of(a).read(key, cpu)
    assert not torch.allclose(want, base_value)
    leaf = next(k for k in merged.patches if k.endswith(".weight") and k != key)

    def live(patcher, k):
        mm.load_models_gpu([patcher], force_full_load=True)
        path, name = k.rsplit(".", 1)
        return getattr(patcher.model.get_submodule(path), name).detach().float().clone()    # parameter or buffer

    torch.testing.assert_close(live(merged, key), want, rtol=0, atol=1e-6)
    # while the merged model is loaded, the shared module holds its values: readers of the base still get
    # the base's (a second merge, a save), and the merged model's patches still read as the merged values
    torch.testing.assert_close(KeySource.of(a).read(key, cpu), base_value, rtol=0, atol=0)
    torch.testing.assert_close(KeySource.of(merged).read(key, cpu), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(live(merged, leaf), KeySource.of(merged).read(leaf, cpu), rtol=0, atol=0)
    torch.testing.assert_close(live(a, key), base_value, rtol=0, atol=0)
    torch.testing.assert_close(live(merged, key), want, rtol=0, atol=1e-6)
    # a LoRA-style patch on top of the merged model is applied to such a key too (ComfyUI alone skips it)
    on_top = merged.clone()
    on_top.add_patches({key: ("diff", (torch.ones_like(want),))}, 1.0)
    torch.testing.assert_close(live(on_top, key), want + 1, rtol=0, atol=1e-5)
    mm.unload_all_models()
    torch.testing.assert_close(getattr(a.model.get_submodule(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]).float(),
                               base_value, rtol=0, atol=0)


def test_settings_of_an_input_with_a_cyclic_model_options_are_listed_once(harness):
    """model_options that contain themselves (deep copies keep such cycles) do not stop the merge."""
    from mergelab import fixtures
    eng, mm = pack(harness, "engine.merge"), pack(harness, "merge_methods")
    base, x = fixtures.small_model("SD15"), fixtures.small_model("SD15", delta_seed=1, delta_scale=0.02).clone()
    x.model_options["loop"] = {"again": None}
    x.model_options["loop"]["again"] = x.model_options["loop"]
    stats = pack(harness, "engine.report").MergeStats(lambda k: "all", ["model 1"], has_base=True)
    eng.merge_models(base, [eng.MergeInput(x, name="model 1")], mm.create("task_arithmetic"),
                     eng.MergeOptions(stats=stats))
    assert stats.notes == []          # a container with nothing but itself holds no setting

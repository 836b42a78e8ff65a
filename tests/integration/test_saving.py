"""Streaming saves in a real ComfyUI: files identical to ComfyUI's own CheckpointSave / ModelSave /
CLIPSave (SD1.5, SDXL incl. the OpenCLIP in_proj conversion, Flux), patches (ComfyUI merges, our
set patches, LoRAs) applied exactly, a full-size SD1.5 merge reloaded by CheckpointLoaderSimple, no
file left behind by a failed or cancelled save, names kept inside the output folder, recipes."""
import hashlib
import importlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.harness import api_node

SMALL = {"class_type": "MergeLabTest_SmallModel"}


def pack(harness, name):
    return importlib.import_module(f"{harness.pack_module_name}.{name}")


def small(arch, seed=0, delta_seed=0, delta_scale=0.0, dtype="fp32"):
    return {"class_type": "MergeLabTest_SmallModel",
            "inputs": {"arch": arch, "seed": seed, "delta_seed": delta_seed, "delta_scale": delta_scale, "dtype": dtype}}


class TinyVAE:
    """Test node: a real comfy.sd.VAE (TAESD architecture, random weights) small enough for tests."""

    _vae = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        if TinyVAE._vae is None:
            import comfy.sd
            import comfy.taesd.taesd
            g = torch.Generator().manual_seed(7)
            with torch.inference_mode(False):
                m = comfy.taesd.taesd.TAESD(latent_channels=4)
                sd = {k: (torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v)
                      for k, v in m.state_dict().items()}
            TinyVAE._vae = comfy.sd.VAE(sd=sd)
        return (TinyVAE._vae,)


class BulkMergeSimple:
    """Test node: the patches ModelMergeSimple + CLIPMergeSimple add (``ratio*W1 + (1-ratio)*W2``, as
    list patches), added in ONE add_patches call each.  ComfyUI's own nodes call add_patches once per
    key, which walks the whole state dict each time (quadratic: minutes for SDXL on a slow CPU)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "clip1": ("CLIP",), "clip2": ("CLIP",),
                             "ratio": ("FLOAT", {"default": 0.5})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "merge"
    CATEGORY = "testing"

    def merge(self, model1, model2, clip1, clip2, ratio):
        m = model1.clone()
        assert len(m.add_patches(model2.get_key_patches("diffusion_model."), 1.0 - ratio, ratio)) > 0
        c = clip1.clone()
        kp = {k: v for k, v in clip2.get_key_patches().items()
              if not k.endswith(".position_ids") and not k.endswith(".logit_scale")}
        assert len(c.add_patches(kp, 1.0 - ratio, ratio)) > 0
        return (m, c)


@pytest.fixture(scope="module", autouse=True)
def _test_nodes(harness):
    harness.register_test_node("MergeLabTest_TinyVAE", TinyVAE)
    harness.register_test_node("MergeLabTest_BulkMergeSimple", BulkMergeSimple)


def outputs_in(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        for f in files:
            found.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return sorted(found)


def new_files(harness, before):
    return [f for f in outputs_in(harness.output_dir) if f not in before]


def read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def assert_same_tensors(ours, theirs, what):
    assert set(ours) == set(theirs), (what, sorted(set(ours) ^ set(theirs))[:10])
    for k in theirs:
        a, b = ours[k], theirs[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), (what, k, (a.float() - b.float()).abs().max().item())


def make_lora(harness, name, arch="SD15", rank=4, seed=3):
    """A LoRA file for a few 2-D weights of the small model of ``arch`` (ComfyUI's own key format)."""
    from mergelab import fixtures
    m = fixtures.small_model(arch)
    sd = m.model.state_dict()
    keys = [k for k, v in sd.items() if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim == 2][:6]
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for k in keys:
        out_f, in_f = sd[k].shape
        p = k[: -len(".weight")]
        lora[f"{p}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
        lora[f"{p}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
        lora[f"{p}.alpha"] = torch.tensor(float(rank) / 2)
    path = os.path.join(harness.base_dir, name)
    save_file(lora, path)
    harness.add_model_file("loras", path, name=name)
    return path


# ---------------------------------------------------------------------------------------------
# layout and values: identical to ComfyUI's own save nodes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["SD15", "SDXL", "Flux"])
def test_checkpoint_matches_comfyui_checkpointsave(harness, arch):
    """ModelMergeSimple + CLIPMergeSimple of two small models, saved by ComfyUI's CheckpointSave and by
    ours ("keep"): same keys, dtypes, shapes and bit-identical tensors (incl. SDXL's OpenCLIP in_proj
    concatenation and transposed text_projection, which ours computes lazily)."""
    before = outputs_in(harness.output_dir)
    prompt = {
        "1": small(arch), "2": small(arch, delta_seed=1, delta_scale=0.02),
        "5": {"class_type": "MergeLabTest_TinyVAE", "inputs": {}},
        "6": {"class_type": "MergeLab_SaveCheckpoint",
              "inputs": {"model": ["3", 0], "clip": ["4", 0], "vae": ["5", 0], "filename_prefix": f"ours/{arch}",
                         "dtype": "keep", "save_recipe": True, "hash_input_files": True}},
        "7": {"class_type": "CheckpointSave",
              "inputs": {"model": ["3", 0], "clip": ["4", 0], "vae": ["5", 0], "filename_prefix": f"comfy/{arch}"}},
    }
    if arch == "SD15":     # ComfyUI's own merge nodes
        prompt["3"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.3}}
        prompt["4"] = {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.6}}
    else:                  # the same patches, added in one call (see BulkMergeSimple)
        prompt["b"] = {"class_type": "MergeLabTest_BulkMergeSimple",
                       "inputs": {"model1": ["1", 0], "model2": ["2", 0], "clip1": ["1", 1], "clip2": ["2", 1],
                                  "ratio": 0.3}}
        prompt["6"]["inputs"].update(model=["b", 0], clip=["b", 1])
        prompt["7"]["inputs"].update(model=["b", 0], clip=["b", 1])
    res = harness.run_ok(prompt)
    files = new_files(harness, before)
    assert f"ours/{arch}_00001_.safetensors" in files and f"comfy/{arch}_00001_.safetensors" in files, files
    ours, meta = read_all(os.path.join(harness.output_dir, f"ours/{arch}_00001_.safetensors"))
    theirs, tmeta = read_all(os.path.join(harness.output_dir, f"comfy/{arch}_00001_.safetensors"))
    assert_same_tensors(ours, theirs, arch)
    # ComfyUI's metadata is there (its modelspec where it writes one), plus ours for every architecture
    for k, v in tmeta.items():
        if k not in ("modelspec.title",):
            assert meta.get(k) == v, (k, meta.get(k), v)
    assert meta["modelspec.architecture"] and meta["modelspec.date"] and meta["modelspec.title"] == f"{arch} 1"
    assert json.loads(meta["prompt"])["6"]["class_type"] == "MergeLab_SaveCheckpoint"
    rec = json.loads(meta["mergelab.recipe"])
    assert rec["format"] == "mergelab.recipe/1" and rec["saved"]["file"] == f"ours/{arch}_00001_.safetensors"
    classes = [n["class_type"] for n in rec["graph"]["nodes"]]
    merge_class = "ModelMergeSimple" if arch == "SD15" else "MergeLabTest_BulkMergeSimple"
    assert classes.count("MergeLabTest_SmallModel") == 2 and merge_class in classes
    merge_node = next(n for n in rec["graph"]["nodes"] if n["class_type"] == merge_class)
    assert merge_node["inputs"]["ratio"] == 0.3 and merge_node["inputs"]["model1"] == {"from": "1", "slot": 0}
    # the UI text names the file
    assert f"ours/{arch}_00001_.safetensors" in res.outputs["6"]["text"][0]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_model_save_with_set_patches_and_lora_matches_modelsave(harness, dtype):
    """Our merger's ``set`` patches, then a LoRA on top (LoraLoaderModelOnly), on an fp32 or fp16 model:
    our Save Model ("keep") writes exactly what ComfyUI's ModelSave writes (patches computed in fp32,
    rounded once to the model's dtype); the recipe names the LoRA file with its sha256."""
    lora_path = make_lora(harness, f"small_lora_{dtype}.safetensors")
    before = outputs_in(harness.output_dir)
    prompt = {
        "1": small("SD15", dtype=dtype), "2": small("SD15", delta_seed=2, delta_scale=0.05, dtype=dtype),
        "m": api_node("MergeLab_Method_linear"),
        "i1": api_node("MergeLab_MergeInput", model=["1", 0]),
        "i2": api_node("MergeLab_MergeInput", model=["2", 0], models=["i1", 0], weight=0.25),
        "3": api_node("MergeLab_ModelMerger", method=["m", 0], models=["i2", 0], seed=0, device="cpu"),
        "4": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["3", 0], "lora_name": os.path.basename(lora_path),
                                                             "strength_model": 0.7}},
        "5": {"class_type": "MergeLab_SaveModel", "inputs": {"model": ["4", 0], "filename_prefix": f"ours/lora_{dtype}",
                                                            "dtype": "keep", "save_recipe": True,
                                                            "hash_input_files": True}},
        "6": {"class_type": "ModelSave", "inputs": {"model": ["4", 0], "filename_prefix": f"comfy/lora_{dtype}"}},
        "7": {"class_type": "MergeLab_SaveModel", "inputs": {"model": ["3", 0], "filename_prefix": f"ours/set_{dtype}",
                                                            "dtype": "keep", "save_recipe": False,
                                                            "hash_input_files": False}},
        "8": {"class_type": "ModelSave", "inputs": {"model": ["3", 0], "filename_prefix": f"comfy/set_{dtype}"}},
    }
    harness.run_ok(prompt)
    out = harness.output_dir
    for name in ("lora", "set"):
        ours, meta = read_all(os.path.join(out, f"ours/{name}_{dtype}_00001_.safetensors"))
        theirs, _ = read_all(os.path.join(out, f"comfy/{name}_{dtype}_00001_.safetensors"))
        assert_same_tensors(ours, theirs, name)
        assert all(t.dtype == (torch.float16 if dtype == "fp16" else torch.float32)
                   for k, t in ours.items() if k.startswith("model.diffusion_model."))
    # the LoRA really changed weights (the comparison above is not between two unpatched models)
    a, _ = read_all(os.path.join(out, f"ours/lora_{dtype}_00001_.safetensors"))
    b, _ = read_all(os.path.join(out, f"ours/set_{dtype}_00001_.safetensors"))
    assert sum(not torch.equal(a[k], b[k]) for k in a) == 6
    _, meta = read_all(os.path.join(out, f"ours/lora_{dtype}_00001_.safetensors"))
    rec = json.loads(meta["mergelab.recipe"])
    ref = f"loras/{os.path.basename(lora_path)}"
    with open(lora_path, "rb") as f:
        assert rec["graph"]["files"][ref]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    _, meta = read_all(os.path.join(out, f"ours/set_{dtype}_00001_.safetensors"))
    assert "mergelab.recipe" not in meta


def test_scaled_fp8_model_saves_dequantized_and_reloads_as_saved(harness):
    """A scaled-fp8 model is written dequantized, so the file must not carry ComfyUI's scaled-fp8 marker
    (``model.diffusion_model.scaled_fp8``): with it, ComfyUI's loader builds fp8 layers with a scale of 1
    and rounds the saved weights to fp8 (up to 4 % off).  The model: the UNet of the demo's small SD1.5
    checkpoint (which ComfyUI's detection knows) with its 2-D weights stored as scaled fp8, loaded by
    ComfyUI's loader.  Reloaded the same way, every weight equals the file's, which holds the weights
    ComfyUI computes with (fp8 x scale) rounded once to bf16."""
    import comfy.sd
    from mergelab import demo
    saving = pack(harness, "engine.saving")
    weights = pack(harness, "engine.weights")
    fp8 = {}
    with safe_open(demo.small_sd15_checkpoint(), "pt") as f:
        for k in f.keys():
            if not k.startswith("model.diffusion_model."):
                continue
            t = f.get_tensor(k)
            if k.endswith(".weight") and t.ndim == 2:
                scale = t.float().abs().amax() / 448.0
                fp8[k] = (t.float() / scale).to(torch.float8_e4m3fn)
                fp8[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                fp8[k] = t
    fp8["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    src_path = os.path.join(harness.base_dir, "small_sd15_unet_scaled_fp8.safetensors")
    save_file(fp8, src_path)
    model = comfy.sd.load_checkpoint_guess_config(src_path, output_vae=False, output_clip=False)[0]
    assert model.model.model_config.scaled_fp8 == torch.float8_e4m3fn
    res = saving.save_checkpoint(model, None, None, "fp8/scaled", "keep", default_prefix="fp8/x", fsync=False)
    saved, _ = read_all(res.path)
    assert not [k for k in saved if k.endswith("scaled_fp8") or k.endswith("scale_weight")]
    reloaded = comfy.sd.load_checkpoint_guess_config(res.path, output_vae=False, output_clip=False)[0]
    assert reloaded.model.model_config.scaled_fp8 is None
    cpu = torch.device("cpu")
    src, back = weights.KeySource.of(model), weights.KeySource.of(reloaded)
    assert sorted(back.keys()) == sorted(src.keys())
    quantized = [k for k in fp8 if k.endswith(".weight") and fp8[k].dtype == torch.float8_e4m3fn]
    assert len(quantized) > 50
    for k in src.keys():
        assert torch.equal(back.read(k, cpu), saved["model." + k].float()), k
    for k in quantized:
        want = (fp8[k].float() * fp8[k[: -len("weight")] + "scale_weight"]).to(torch.bfloat16)
        assert torch.equal(saved[k], want), k


@pytest.mark.parametrize("arch", ["SDXL", "Flux"])
def test_clip_save_matches_comfyui_clipsave(harness, arch):
    before = outputs_in(harness.output_dir)
    prompt = {
        "1": small(arch), "2": small(arch, delta_seed=1, delta_scale=0.02),
        "3": {"class_type": "MergeLabTest_BulkMergeSimple",
              "inputs": {"model1": ["1", 0], "model2": ["2", 0], "clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.5}},
        "4": {"class_type": "MergeLab_SaveCLIP", "inputs": {"clip": ["3", 1], "filename_prefix": f"ours/te_{arch}",
                                                           "dtype": "keep", "save_recipe": True,
                                                           "hash_input_files": False}},
        "5": {"class_type": "CLIPSave", "inputs": {"clip": ["3", 1], "filename_prefix": f"comfy/te_{arch}"}},
    }
    harness.run_ok(prompt)
    files = new_files(harness, before)
    ours = sorted(f[len("ours/"):] for f in files if f.startswith("ours/"))
    theirs = sorted(f[len("comfy/"):] for f in files if f.startswith("comfy/"))
    assert ours == theirs and len(ours) == 2, (ours, theirs)
    for name in ours:
        a, meta = read_all(os.path.join(harness.output_dir, "ours", name))
        b, tmeta = read_all(os.path.join(harness.output_dir, "comfy", name))
        assert_same_tensors(a, b, name)
        assert meta["format"] == "pt" and "mergelab.recipe" in meta
        # each file's recipe names that file
        assert json.loads(meta["mergelab.recipe"])["saved"]["file"] == f"ours/{name}"


def test_output_dtype_conversion_rounds_once(harness):
    """dtype fp16/bf16 = the fp32 patched weight rounded once (ModelMergeSimple's patches on fp32 models)."""
    saving = pack(harness, "engine.saving")
    weights = pack(harness, "engine.weights")
    prompt = {
        "1": small("SD15"), "2": small("SD15", delta_seed=1, delta_scale=0.02),
        "3": {"class_type": "MergeLabTest_BulkMergeSimple",
              "inputs": {"model1": ["1", 0], "model2": ["2", 0], "clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.7}},
        "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["3", 0], "name": "m"}},
    }
    m = harness.run_ok(prompt).captured["m"]
    ks = weights.KeySource.of(m)
    for mode, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        res = saving.save_checkpoint(m, None, None, f"dtype/{mode}", mode, default_prefix="dtype/x", fsync=False)
        got, _ = read_all(res.path)
        n = 0
        for key in ks.keys():
            t = got["model." + key]
            assert t.dtype == dt
            assert torch.equal(t, ks.read(key, torch.device("cpu")).to(dt)), key
            n += 1
        assert n == len([k for k in got if k.startswith("model.diffusion_model.")])


@pytest.mark.parametrize("mode", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_checkpoint_holds_the_weights_rounded_once_and_reloads(harness, mode):
    """dtype fp8: the diffusion model's and the text encoder's weights are the fp32 patched weights rounded
    once to fp8, the VAE keeps its dtype and values (ComfyUI's loaders read such a file back: see the
    full-size test below)."""
    weights = pack(harness, "engine.weights")
    dt = getattr(torch, mode.replace("fp8", "float8"))
    before = outputs_in(harness.output_dir)
    prompt = {
        "1": small("SD15"), "2": small("SD15", delta_seed=1, delta_scale=0.02),
        "3": {"class_type": "MergeLabTest_BulkMergeSimple",
              "inputs": {"model1": ["1", 0], "model2": ["2", 0], "clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.3}},
        "5": {"class_type": "MergeLabTest_TinyVAE", "inputs": {}},
        "6": {"class_type": "MergeLab_SaveCheckpoint",
              "inputs": {"model": ["3", 0], "clip": ["3", 1], "vae": ["5", 0], "filename_prefix": f"fp8/{mode}",
                         "dtype": mode, "save_recipe": False, "hash_input_files": False}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["3", 0], "name": "model"}},
        "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["3", 1], "name": "clip"}},
        "c3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["5", 0], "name": "vae"}},
    }
    res = harness.run_ok(prompt)
    (saved,) = new_files(harness, before)
    path = os.path.join(harness.output_dir, saved)
    got, _ = read_all(path)
    cpu = torch.device("cpu")
    model_src, clip_src = weights.KeySource.of(res.captured["model"]), weights.KeySource.of(res.captured["clip"])
    n_model = n_clip = 0
    for key in model_src.keys():
        t = got["model." + key]
        assert t.dtype == dt and torch.equal(t, model_src.read(key, cpu).to(dt)), key
        n_model += 1
    for key in clip_src.keys():
        name = "cond_stage_model." + key[len("clip_l."):]
        if name in got and got[name].is_floating_point():
            assert got[name].dtype == dt and torch.equal(got[name], clip_src.read(key, cpu).to(dt)), key
            n_clip += 1
    vae_sd = res.captured["vae"].get_sd()
    for key, t in vae_sd.items():
        assert got["first_stage_model." + key].dtype == t.dtype and torch.equal(got["first_stage_model." + key], t)
    assert n_model == len([k for k in got if k.startswith("model.diffusion_model.")]) and n_clip > 100


# ---------------------------------------------------------------------------------------------
# full size: one run
# ---------------------------------------------------------------------------------------------
def test_full_size_sd15_merge_reloads_bit_exact(harness, full_sd15, tuned_sd15):
    """A full-size SD1.5 merged with ModelMergeSimple, saved by our Save Checkpoint in fp32, reloads
    with CheckpointLoaderSimple (detected as SD1.5) and holds exactly the merged MODEL's patched weights,
    the CLIP and the VAE."""
    weights = pack(harness, "engine.weights")
    a, b = os.path.basename(full_sd15), os.path.basename(tuned_sd15)
    before = outputs_in(harness.output_dir)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": a}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": b}},
        "3": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.35}},
        "4": {"class_type": "MergeLab_SaveCheckpoint",
              "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": "full/sd15_merge",
                         "dtype": "fp32", "save_recipe": True, "hash_input_files": False}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["3", 0], "name": "merged"}},
        "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 1], "name": "clip"}},
        "c3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 2], "name": "vae"}},
    }
    res = harness.run_ok(prompt)
    merged, clip, vae = res.captured["merged"], res.captured["clip"], res.captured["vae"]
    files = new_files(harness, before)
    assert files == ["full/sd15_merge_00001_.safetensors"], files
    path = os.path.join(harness.output_dir, files[0])
    name = harness.add_model_file("checkpoints", path, name="reloaded_sd15_merge.safetensors")
    res2 = harness.run_ok({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "model"}},
        "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 1], "name": "clip"}},
        "c3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 2], "name": "vae"}},
    })
    model2 = res2.captured["model"]
    assert type(model2.model.model_config).__name__ == "SD15"
    cpu = torch.device("cpu")
    src = weights.KeySource.of(merged)
    got = model2.model.state_dict()
    n_diff = 0
    for key in src.keys():
        want = src.read(key, cpu)
        have = got[key].detach().to(cpu, torch.float32)
        assert torch.equal(have, want), key
        n_diff += int(src.has_patches(key))
    assert n_diff > 600          # the merge really changed the UNet
    # CLIP and VAE: exactly the inputs' weights (compared as float)
    file_keys, meta = read_all_meta(path)
    csrc, cgot = weights.KeySource.of(clip), res2.captured["clip"].cond_stage_model.state_dict()
    saved = [k for k in csrc.keys() if "cond_stage_model." + k[len("clip_l."):] in file_keys]
    assert len(saved) == len(csrc.keys()) - 1          # ComfyUI's SD1.5 layout drops text_projection only
    for key in saved:
        assert torch.equal(cgot[key].float(), csrc.read(key, cpu)), key
    vgot = res2.captured["vae"].get_sd()
    for key, t in vae.get_sd().items():
        assert torch.equal(vgot[key].float(), t.float()), key
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.predict_key"] == "epsilon"
    rec = json.loads(meta["mergelab.recipe"])
    assert set(rec["graph"]["files"]) == {f"checkpoints/{a}", f"checkpoints/{b}"}


def test_scaled_fp8_checkpoint_quantizes_the_diffusion_models_linear_layers_only(harness):
    """fp8_e4m3fn_scaled on a merged Flux checkpoint: each Linear weight of the diffusion model is its fp32 patched
    weight W as fp8 of W / s with s = max|W| / 448 beside it, one two-entry marker says so, and every other
    tensor (the diffusion model's other weights, the text encoders, the VAE) is what keep writes; Save CLIP
    refuses the mode (ComfyUI reads scaled text encoders for T5 and Llama only)."""
    saving = pack(harness, "engine.saving")
    weights = pack(harness, "engine.weights")
    prompt = {
        "1": small("Flux"), "2": small("Flux", delta_seed=1, delta_scale=0.02),
        "3": {"class_type": "MergeLabTest_BulkMergeSimple",
              "inputs": {"model1": ["1", 0], "model2": ["2", 0], "clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.3}},
        "5": {"class_type": "MergeLabTest_TinyVAE", "inputs": {}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["3", 0], "name": "model"}},
        "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["3", 1], "name": "clip"}},
        "c3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["5", 0], "name": "vae"}},
    }
    res = harness.run_ok(prompt)
    m, c, v = res.captured["model"], res.captured["clip"], res.captured["vae"]
    scaled = saving.save_checkpoint(m, c, v, "scaled/flux", "fp8_e4m3fn_scaled", default_prefix="scaled/x", fsync=False)
    keep = saving.save_checkpoint(m, c, v, "scaled/flux_keep", "keep", default_prefix="scaled/x", fsync=False)
    got, _ = read_all(scaled.path)
    ref, _ = read_all(keep.path)
    assert [k for k in got if k.endswith("scaled_fp8")] == ["model.diffusion_model.scaled_fp8"]
    marker = got.pop("model.diffusion_model.scaled_fp8")
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 2
    ks = weights.KeySource.of(m)
    linear = {f"model.diffusion_model.{n}.weight" for n, mod in m.model.diffusion_model.named_modules()
              if isinstance(mod, torch.nn.Linear)}
    assert len(linear) > 20
    cpu = torch.device("cpu")
    for name in linear:
        w = ks.read(name[len("model."):], cpu)
        s = got.pop(name[: -len("weight")] + "scale_weight")
        assert s.dtype == torch.float32 and s.shape == () and float(s) == float(w.abs().max() / 448.0), name
        assert torch.equal(got.pop(name), (w / s).to(torch.float8_e4m3fn)), name
    assert sorted(got) == sorted(k for k in ref if k not in linear)
    for k, t in got.items():
        assert t.dtype == ref[k].dtype and torch.equal(t, ref[k]), k
    with pytest.raises(saving.SaveError, match="for diffusion models"):
        saving.save_clip(c, "scaled/clip", "fp8_e4m3fn_scaled", default_prefix="scaled/y", fsync=False)


@pytest.mark.parametrize("mode", ["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_fp8_model_file_reloads_through_unetloader(harness, mode):
    """An SD1.5 UNet (the demo's small checkpoint, which ComfyUI's detection knows) saved by Save Model in fp8.
    Plain: UNETLoader with weight_dtype fp8_e4m3fn detects SD1.5 and holds exactly the file's fp8 weights,
    which are the model's rounded once.  Scaled: UNETLoader detects ComfyUI's scaled fp8 format by itself;
    every Linear layer holds the file's fp8 weight and scale (W / s rounded once, s = max|W| / 448), and what it
    computes with (fp8 x s) is within fp8's rounding of W; every other weight is the model's own."""
    from mergelab import demo
    ckpt = harness.add_model_file("checkpoints", demo.small_sd15_checkpoint(), name="fp8_src_sd15.safetensors")
    before = outputs_in(harness.output_dir)
    res = harness.run_ok({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "MergeLab_SaveModel",
              "inputs": {"model": ["1", 0], "filename_prefix": f"fp8unet/{mode}", "dtype": mode,
                         "save_recipe": False, "hash_input_files": False}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "model"}},
    })
    (saved,) = new_files(harness, before)
    path = os.path.join(harness.output_dir, saved)
    scaled = mode.endswith("_scaled")
    name = harness.add_model_file("diffusion_models", path, name=f"reloaded_{mode}.safetensors")
    res2 = harness.run_ok({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": name,
                                                    "weight_dtype": "default" if scaled else "fp8_e4m3fn"}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "model"}},
    })
    model2 = res2.captured["model"]
    assert type(model2.model.model_config).__name__ == "SD15"
    assert model2.model.model_config.scaled_fp8 == (torch.float8_e4m3fn if scaled else None)
    want = res.captured["model"].model.state_dict()
    dm = model2.model.diffusion_model
    linear = {f"diffusion_model.{n}.weight": m for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linear) > 50
    n = 0
    with safe_open(path, "pt") as f:
        file_keys = set(f.keys())
        assert ("model.diffusion_model.scaled_fp8" in file_keys) == scaled
        assert model2.model.model_config.optimizations.get("fp8", False) is False     # no fp8 matmul
        for key, t in model2.model.state_dict().items():
            if not key.startswith("diffusion_model.") or key.endswith((".scale_weight", ".scale_input")):
                continue
            stored = f.get_tensor("model." + key)
            w = want[key].float()
            if scaled and key in linear:
                s = f.get_tensor("model." + key[: -len("weight")] + "scale_weight")
                assert s.dtype == torch.float32 and s.shape == () and float(s) == float(w.abs().max() / 448.0), key
                assert stored.dtype == t.dtype == torch.float8_e4m3fn, key
                assert torch.equal(t.view(torch.uint8), stored.view(torch.uint8)), key
                assert torch.equal(stored, (w / s).to(torch.float8_e4m3fn)), key
                used = linear[key].convert_weight(t)              # what ComfyUI computes with
                assert bool(((used - w).abs() <= w.abs() * 2.0 ** -4 + s * 2.0 ** -10).all()), key
            elif scaled:
                assert stored.dtype == want[key].dtype and torch.equal(stored, want[key]), key
                # ComfyUI 0.3.75 creates a scaled Linear's bias in fp8 as well (rounded at load, unscaled)
                assert torch.equal(t, stored.to(t.dtype)), key
            else:
                assert stored.dtype == t.dtype == torch.float8_e4m3fn, key
                assert torch.equal(t.view(torch.uint8), stored.view(torch.uint8)), key
                assert torch.equal(stored, want[key].to(torch.float8_e4m3fn)), key
            n += 1
    assert n == len([k for k in want if k.startswith("diffusion_model.")])


def read_all_meta(path):
    with safe_open(path, "pt") as f:
        return list(f.keys()), f.metadata() or {}


# ---------------------------------------------------------------------------------------------
# never losing a file
# ---------------------------------------------------------------------------------------------
def _fail_after(monkeypatch, harness, n, exc_factory):
    stw = pack(harness, "engine.safetensors_writer")
    real = stw.tensor_bytes
    calls = {"n": 0}

    def failing(t):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc_factory()
        return real(t)

    monkeypatch.setattr(stw, "tensor_bytes", failing)
    return calls


def _save_model_prompt(prefix):
    # no merge node here: ComfyUI's ModelMergeSimple alone takes seconds (add_patches walks the whole
    # state dict once per key); the patched paths are covered above
    return {"1": small("SD15"),
            "4": {"class_type": "MergeLab_SaveModel", "inputs": {"model": ["1", 0], "filename_prefix": prefix,
                                                                "dtype": "keep", "save_recipe": True,
                                                                "hash_input_files": False}}}


@pytest.mark.parametrize("failure", ["error", "disk_full", "cancel"])
def test_failed_save_leaves_no_file_and_keeps_existing(harness, monkeypatch, failure):
    import errno

    import comfy.model_management as mm
    folder = os.path.join(harness.output_dir, "fail")
    os.makedirs(folder, exist_ok=True)
    existing = os.path.join(folder, f"m_{failure}_00001_.safetensors")
    with open(existing, "wb") as f:
        f.write(b"precious user file")
    before = outputs_in(harness.output_dir)

    def make():
        if failure == "error":
            return RuntimeError("simulated failure while writing")
        return OSError(errno.ENOSPC, "No space left on device (simulated)")

    if failure == "disk_full":       # the background writer thread's write fails, as on a full disk
        stw = pack(harness, "engine.safetensors_writer")
        real_write = stw._Sink.write
        calls = {"n": 0}

        def full_disk(self, buf):
            calls["n"] += 1
            if calls["n"] > 40:
                raise make()
            return real_write(self, buf)

        monkeypatch.setattr(stw._Sink, "write", full_disk)
    elif failure == "cancel":
        stw = pack(harness, "engine.safetensors_writer")
        real = stw.tensor_bytes
        calls = {"n": 0}

        def cancelling(t):
            calls["n"] += 1
            if calls["n"] == 40:
                mm.interrupt_current_processing(True)     # what the Cancel button does
            return real(t)

        monkeypatch.setattr(stw, "tensor_bytes", cancelling)
    else:
        calls = _fail_after(monkeypatch, harness, 40, make)
    try:
        res = harness.run(_save_model_prompt(f"fail/m_{failure}"))
    finally:
        mm.interrupt_current_processing(False)
    assert not res.success
    assert calls["n"] >= 40                      # it failed midway, not before writing
    if failure == "cancel":
        assert any(e == "execution_interrupted" for e, _ in res.messages)
    else:
        assert "simulated" in res.error_text() or "No space" in res.error_text()
    assert new_files(harness, before) == []       # neither m_*_00002_ nor a temporary file
    assert not [f for f in os.listdir(folder) if f.startswith(".")]
    with open(existing, "rb") as f:
        assert f.read() == b"precious user file"
    monkeypatch.undo()
    # the next save works and takes the next free counter
    harness.run_ok(_save_model_prompt(f"fail/m_{failure}"))
    assert new_files(harness, before) == [f"fail/m_{failure}_00002_.safetensors"]


def test_temp_file_of_a_killed_save_is_cleaned_up(harness):
    """A temporary file left by a save that was killed outright (its process is gone) is removed by the
    next save into that folder; one of a running process is kept."""
    import subprocess
    import sys
    folder = os.path.join(harness.output_dir, "killed")
    os.makedirs(folder, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = os.path.join(folder, f".k_00001_.safetensors.{dead}.deadbeef.mergelab-tmp")
    alive = os.path.join(folder, f".k_00001_.safetensors.{os.getppid()}.cafecafe.mergelab-tmp")
    for p in (stale, alive):
        with open(p, "wb") as f:
            f.write(b"partial")
    harness.run_ok(_save_model_prompt("killed/k"))
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(alive), "k_00001_.safetensors"])


def test_name_taken_while_writing_is_not_overwritten(harness, monkeypatch):
    """If another file gets the chosen name while ours is being written, ours takes the next counter."""
    saving = pack(harness, "engine.saving")
    stw = pack(harness, "engine.safetensors_writer")
    folder = os.path.join(harness.output_dir, "race")
    real = stw.tensor_bytes
    state = {"n": 0}

    def intruder(t):
        state["n"] += 1
        if state["n"] == 5:
            with open(os.path.join(folder, "r_00001_.safetensors"), "wb") as f:
                f.write(b"someone else's")
        return real(t)

    monkeypatch.setattr(stw, "tensor_bytes", intruder)
    from mergelab import fixtures
    model = fixtures.small_model("SD15")
    res = saving.save_checkpoint(model, None, None, "race/r", "keep", default_prefix="race/x", fsync=False,
                                 metadata_fn=lambda d: {"test.file": os.path.basename(d.final_path)})
    assert os.path.basename(res.path) == "r_00002_.safetensors"
    with open(os.path.join(folder, "r_00001_.safetensors"), "rb") as f:
        assert f.read() == b"someone else's"
    assert sorted(os.listdir(folder)) == ["r_00001_.safetensors", "r_00002_.safetensors"]
    # the metadata that names the file names the one it is in (it was written for counter 1)
    tensors, meta = read_all(res.path)
    assert meta["modelspec.title"] == "r 2" and meta["test.file"] == "r_00002_.safetensors"
    assert res.nbytes == os.path.getsize(res.path)
    monkeypatch.setattr(stw, "tensor_bytes", real)
    calm = saving.save_checkpoint(model, None, None, "race/calm", "keep", default_prefix="race/x", fsync=False)
    assert_same_tensors(tensors, read_all(calm.path)[0], "race")


@pytest.mark.parametrize("prefix, expect", [
    ("../../escape/x", "escape/x_00001_.safetensors"),
    ("/tmp/abs_escape/y", "tmp/abs_escape/y_00001_.safetensors"),
    ("..\\..\\win\\z", "win/z_00001_.safetensors"),
    ("C:/evil/w", "C_/evil/w_00001_.safetensors"),
    ("../..", "diffusion_models/MergeLab_00001_.safetensors"),
])
def test_prefix_stays_inside_output_folder(harness, prefix, expect):
    import glob
    out = harness.output_dir
    before = outputs_in(out)
    naive = os.path.normpath(os.path.join(out, prefix.replace("\\", "/")))   # where a plain join would write
    res = harness.run_ok(_save_model_prompt(prefix))
    assert new_files(harness, before) == [expect]
    if os.path.commonpath([out, naive]) != out:
        assert not glob.glob(glob.escape(naive) + "_*")
    assert res.outputs["4"]["text"][0].startswith(f"Saved output/{expect}")


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------
def test_recipe_travels_with_clones_and_is_read_back(harness):
    """record_merge attaches a JSON recipe that follows clones (LoRA loaders...), never changes weights,
    nests when a merge result is merged again, is written by the save node and shown by Load Merge Recipe."""
    from mergelab import fixtures
    recipe = pack(harness, "engine.recipe")
    merge = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    saving = pack(harness, "engine.saving")
    a, b, c = (fixtures.small_model("SD15", delta_seed=s, delta_scale=d) for s, d in ((0, 0.0), (1, 0.02), (2, 0.05)))
    ties = mm.create("ties", density=0.5)
    inputs = [merge.MergeInput(a, {"weight": 1.0}, "model 1"), merge.MergeInput(b, {"weight": 0.5}, "model 2")]
    opts = merge.MergeOptions(seed=123, device="cpu")
    m1 = merge.merge_models(c, inputs, ties, opts)
    patches_before = {k: list(v) for k, v in m1.patches.items()}
    rec = recipe.record_merge(m1, ties, inputs, opts, base=c)
    assert m1.patches == patches_before and recipe.get_recipe(c) is None
    json.dumps(rec)
    # travels with clones (ComfyUI's LoRA loaders and others clone the patcher)
    clone = m1.clone()
    assert recipe.get_recipe(clone) == rec
    assert "changed_after_recipe" not in recipe.describe_source(clone)
    # patches added after the merge (what a LoRA loader does) are flagged: the graph part has them
    lora_like = m1.clone()
    k = next(iter(m1.patches))
    assert lora_like.add_patches({k: (torch.zeros_like(m1.patches[k][0][1][1][0]),)}, 1.0) == [k]
    assert recipe.describe_source(lora_like)["changed_after_recipe"] is True
    # a merge of a merge nests the first recipe
    lin = mm.create("linear")
    inputs2 = [merge.MergeInput(clone, {"weight": 0.5}, "model 1"), merge.MergeInput(a, {"weight": 0.5}, "model 2")]
    m2 = merge.merge_models(None, inputs2, lin, merge.MergeOptions(seed=7, device="cpu"))
    rec2 = recipe.record_merge(m2, lin, inputs2, merge.MergeOptions(seed=7, device="cpu"))
    assert rec2["inputs"][0]["source"]["recipe"]["method"] == {"method": "ties", "params": ties.to_dict()["params"]}
    assert rec2["inputs"][0]["source"]["recipe"]["seed"] == 123
    # saved into the file, shown by Load Merge Recipe (its combo lists the output folder)
    parts = {"model": m2}
    res = saving.save_checkpoint(
        m2, None, None, "recipes/nested", "fp16", default_prefix="recipes/x", fsync=False,
        metadata_fn=lambda d: {recipe.METADATA_KEY: recipe.recipe_to_metadata(
            recipe.build_file_recipe(parts, {"node": "test"}, None))})
    choice = f"output/{res.relpath}"
    out = harness.run_ok({
        "1": {"class_type": "MergeLab_LoadMergeRecipe", "inputs": {"file": choice}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "json"}},
        "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 1], "name": "text"}},
    })
    loaded = json.loads(out.captured["json"])
    assert loaded["parts"]["model"]["recipe"] == rec2
    text = out.captured["text"]
    assert "model merge: linear" in text and "ties(" in text and "density=0.5" in text and "seed 123" in text
    assert out.outputs["1"]["text"][0] == text


def test_disable_metadata_leaves_the_graph_out_of_the_recipe(harness, monkeypatch):
    """--disable-metadata ("disable saving prompt metadata in files"): no prompt / workflow keys and no
    graph in the recipe (node ids, widget values), as Save LoRA does; the merge's own recipe stays.  Without
    the flag the same save writes both."""
    from comfy.cli_args import args
    prompt = {"1": small("SD15"), "2": small("SD15", delta_seed=2, delta_scale=0.05),
              "m": api_node("MergeLab_Method_linear"),
              "i1": api_node("MergeLab_MergeInput", model=["1", 0]),
              "i2": api_node("MergeLab_MergeInput", model=["2", 0], models=["i1", 0]),
              "3": api_node("MergeLab_ModelMerger", method=["m", 0], models=["i2", 0], seed=0, device="cpu"),
              "4": {"class_type": "MergeLab_SaveModel", "inputs": {"model": ["3", 0], "filename_prefix": "nometa/m",
                                                                  "dtype": "keep", "save_recipe": True,
                                                                  "hash_input_files": False}}}
    recipes = {}
    for disabled in (False, True):
        monkeypatch.setattr(args, "disable_metadata", disabled)
        before = outputs_in(harness.output_dir)
        prompt["4"]["inputs"]["filename_prefix"] = f"nometa/m{int(disabled)}"     # a new input: not cached
        harness.run_ok(prompt)
        (new,) = new_files(harness, before)
        _, meta = read_all(os.path.join(harness.output_dir, new))
        assert ("prompt" in meta) is not disabled
        recipes[disabled] = json.loads(meta["mergelab.recipe"])
    assert recipes[False]["graph"]["nodes"]
    assert recipes[True].get("graph") is None
    assert recipes[True]["parts"]["model"]["recipe"]["method"]["method"] == "linear"
    merged = [{k: v for k, v in r["parts"]["model"]["recipe"].items() if k not in ("created", "patches_uuid")}
              for r in (recipes[False], recipes[True])]
    assert merged[0] == merged[1] and merged[0]["inputs"]


def test_load_merge_recipe_on_a_file_without_recipe(harness):
    path = os.path.join(harness.base_dir, "plain_lora.safetensors")
    save_file({"x.lora_up.weight": torch.zeros(2, 2)}, path, metadata={"ss_network_dim": "4"})
    name = harness.add_model_file("loras", path, name="plain_lora.safetensors")
    out = harness.run_ok({
        "1": {"class_type": "MergeLab_LoadMergeRecipe", "inputs": {"file": f"loras/{name}"}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "json"}},
        "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 1], "name": "text"}},
    })
    assert json.loads(out.captured["json"]) is None
    assert "no MergeLab recipe" in out.captured["text"] and "ss_network_dim" in out.captured["text"]


# ---------------------------------------------------------------------------------------------
# the writer itself
# ---------------------------------------------------------------------------------------------
def test_streaming_writer_round_trips_through_safetensors(harness, tmp_path):
    """Every dtype and odd shapes (0-d, empty, non-contiguous) read back bit-exact by the safetensors
    library; the header is 8-byte aligned; a tensor of the wrong dtype/shape aborts with no file."""
    stw = pack(harness, "engine.safetensors_writer")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(10), "u8": torch.arange(256, dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "noncontig": torch.randn(4, 6, generator=g).t(),
        "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
    }
    plans = [stw.TensorPlan(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    path = str(tmp_path / "w.safetensors")
    stw.write_file(path, plans, {"a": "b", "unicode": "ü"})
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"a": "b", "unicode": "ü"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), k
    assert stw.read_metadata(path) == {"a": "b", "unicode": "ü"}
    # a producer that returns the wrong thing: error, nothing written, no temporary file
    bad = [stw.TensorPlan("x", torch.float16, (3,), lambda: torch.zeros(3))]
    with pytest.raises(stw.SafetensorsFormatError):
        stw.write_file(str(tmp_path / "bad.safetensors"), bad)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    # never overwrites
    with pytest.raises(FileExistsError):
        stw.write_file(path, plans[:1])
    assert stw.read_metadata(path) == {"a": "b", "unicode": "ü"}
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_recipes_of_reused_merge_results_stay_small(harness, monkeypatch):
    """A merge result wired as the base and both models of the next merge, 14 times: each level stores the
    previous record once (the others say 'same as base'), so the recipe grows linearly (it grew ~3x per
    merge: a 200 MB header at the 12th, which the save refused).  Merges that share ancestors without being
    the same (R_k = merge(R_k-1, R_k-2)) are cut to a bounded size, saying so."""
    from mergelab import fixtures
    recipe = pack(harness, "engine.recipe")
    merge = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    lin = mm.create("linear")
    opts = merge.MergeOptions(seed=1, device="cpu")

    def record(base, models):
        out = base.clone()
        out.add_patches({"diffusion_model.out.2.bias": (torch.zeros(4),)}, 1.0)      # a new uuid, as a merge gives
        inputs = [merge.MergeInput(m, {"weight": 1.0}, f"model {i + 1}") for i, m in enumerate(models)]
        recipe.record_merge(out, lin, inputs, opts, base=base)
        return out

    r = fixtures.small_model("SD15")
    sizes = []
    for _ in range(14):
        r = record(r, [r, r])
        sizes.append(len(json.dumps(recipe.get_recipe(r))))
    assert all(b - a < 4 * sizes[0] for a, b in zip(sizes, sizes[1:])), sizes        # linear, not 3x
    rec = recipe.get_recipe(r)
    assert rec["inputs"][0]["source"]["recipe"] == {"same_as": "base"}
    text = recipe.describe(recipe.build_file_recipe({"model": r}, {"node": "test"}, None))
    assert "the same merge as base" in text
    prev, cur = fixtures.small_model("SD15"), fixtures.small_model("SD15", delta_seed=1, delta_scale=0.01)
    for _ in range(16):
        prev, cur = cur, record(cur, [cur, prev])
    assert 60_000 < len(json.dumps(recipe.get_recipe(cur))) <= recipe.MAX_RECIPE_CHARS
    monkeypatch.setattr(recipe, "MAX_RECIPE_CHARS", 50_000)          # one more merge must fit a smaller bound
    prev, cur = cur, record(cur, [cur, prev])
    rec = recipe.get_recipe(cur)
    assert len(json.dumps(rec)) <= 50_000 and "nested_trimmed" in rec
    monkeypatch.undo()
    saving = pack(harness, "engine.saving")
    res = saving.save_checkpoint(cur, None, None, "recipes/deep", "fp16", default_prefix="recipes/x", fsync=False,
                                 metadata_fn=lambda d: {recipe.METADATA_KEY: recipe.recipe_to_metadata(
                                     recipe.build_file_recipe({"model": cur}, {"node": "test"}, None))})
    assert len(read_all(res.path)[1][recipe.METADATA_KEY]) <= 2 * recipe.MAX_RECIPE_CHARS


def test_changed_after_recipe_only_when_patches_were_added(harness):
    """ComfyUI renews a patcher's uuid on every add_patches, also one that matched no key (a UNet-only LoRA
    on a CLIP): the recipe flags a change after the merge only when patch entries were added."""
    from mergelab import fixtures
    recipe = pack(harness, "engine.recipe")
    merge = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    a, b = fixtures.small_clip("SD15"), fixtures.small_clip("SD15")
    m = merge.merge_models(a, [merge.MergeInput(b, {"weight": 1.0}, "model 1")], mm.create("task_arithmetic"),
                           merge.MergeOptions(device="cpu"))
    nothing = m.clone()
    assert nothing.add_patches({"diffusion_model.out.2.bias": (torch.zeros(4),)}, 1.0) == []
    assert "changed_after_recipe" not in recipe.describe_source(nothing)
    k = next(iter(m.patcher.patches))
    some = m.clone()
    assert some.add_patches({k: (torch.zeros_like(m.patcher.patches[k][0][1][1][0]),)}, 1.0) == [k]
    assert recipe.describe_source(some)["changed_after_recipe"] is True


def test_load_merge_recipe_text_for_loras_and_odd_recipes(harness):
    """Load Merge Recipe's text: a LoRA file's part says how the LoRA was made (kind, method, rank, its
    inputs); a recipe of an unexpected shape (valid JSON) gives a message instead of a crash."""
    recipe = pack(harness, "engine.recipe")
    lora_src = {"kind": "merge", "name": "m", "method": {"method": "ties", "params": {"density": 0.5}},
                "rank": {"mode": "fixed", "rank": 16}, "seed": 3,
                "inputs": [{"name": "a", "params": {"weight": 1.0}, "lora": {"kind": "extract", "name": "a", "rank": {"rank": 32}}}]}
    text = recipe.describe({"format": recipe.FORMAT, "saved": {"file": "loras/x_00001_.safetensors"},
                            "parts": {"lora": lora_src}})
    assert "merge 'm': ties(density=0.5)" in text and "seed 3" in text and "extract 'a'" in text
    for odd in ({"parts": ["x"]}, {"parts": {"model": "x"}}, {"saved": "x"},
                {"graph": {"nodes": ["x"]}}):
        text = recipe.describe(odd)
        assert "not one MergeLab writes" in text, odd


def test_a_header_safetensors_would_refuse_is_refused_before_writing(harness, tmp_path):
    """safetensors reads headers of at most 100,000,000 bytes (MAX_HEADER_SIZE): the writer refuses a larger
    one (huge metadata) instead of writing a file nothing can open; just under the limit is written and
    reads back."""
    stw = pack(harness, "engine.safetensors_writer")
    plans = [stw.TensorPlan("w", torch.float32, (2,), lambda: torch.ones(2))]
    overhead = len(stw.build_header(plans, {"big": ""}))
    fits = str(tmp_path / "fits.safetensors")
    stw.write_file(fits, plans, {"big": "x" * (100_000_000 - overhead - 8)})
    with safe_open(fits, "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.ones(2))
    too_big = str(tmp_path / "too_big.safetensors")
    with pytest.raises(stw.SafetensorsFormatError, match="at most 100000000"):
        stw.write_file(too_big, plans, {"big": "x" * (100_000_000 - overhead + 8)})
    assert not os.path.exists(too_big)


def test_cancel_in_a_later_text_encoder_leaves_none_of_the_clip_files(harness, monkeypatch):
    """Save CLIP writes one file per text encoder.  Cancel while the second (SDXL's clip_g) was written left
    the first file complete under its final name, and the next save's counters no longer paired up.  Now
    the files of a cancelled save are removed, and the next save takes the same counters."""
    import comfy.model_management as mm
    stw = pack(harness, "engine.safetensors_writer")

    def prompt():
        return {"1": small("SDXL"),
                "2": {"class_type": "MergeLab_SaveCLIP", "inputs": {"clip": ["1", 1], "filename_prefix": "cancel/te",
                                                                   "dtype": "keep", "save_recipe": True,
                                                                   "hash_input_files": False}}}
    real = stw.tensor_bytes
    calls = {"n": 0}

    def counting(t):
        calls["n"] += 1
        return real(t)
    monkeypatch.setattr(stw, "tensor_bytes", counting)
    before = outputs_in(harness.output_dir)
    harness.run_ok(prompt())
    first = new_files(harness, before)
    assert len(first) == 2 and calls["n"] > 10
    total, calls["n"] = calls["n"], 0

    def cancelling(t):
        calls["n"] += 1
        if calls["n"] == total - 3:                 # in the last encoder's file
            mm.interrupt_current_processing(True)
        return real(t)
    monkeypatch.setattr(stw, "tensor_bytes", cancelling)
    before = outputs_in(harness.output_dir)
    try:
        res = harness.run(prompt())
    finally:
        mm.interrupt_current_processing(False)
    assert not res.success and any(e == "execution_interrupted" for e, _ in res.messages)
    assert new_files(harness, before) == []
    monkeypatch.setattr(stw, "tensor_bytes", real)
    harness.run_ok(prompt())
    assert sorted(new_files(harness, before)) == sorted(f.replace("_00001_", "_00002_") for f in first)


@pytest.mark.parametrize("value,model_dtype,refused,accepted", [(1.0e5, "bf16", "fp16", "bf16"),
                                                               (1000.0, "fp32", "fp8_e4m3fn", "fp8_e5m2")])
def test_a_weight_beyond_the_dtypes_range_is_an_error_naming_it(harness, value, model_dtype, refused, accepted):
    """Saved with dtype fp16, a bf16 model's weight of 1e5 (after a LoRA, say) was written as inf with a
    normal success message (the Model Merger refuses the same overflow); torch's cast to fp8 e4m3fn clamps 1000
    to 448 without a word.  Now the save is refused, naming the weight, and nothing is written; a dtype that
    holds the value (bf16; fp8 e5m2, up to 57344) saves it."""
    from mergelab import fixtures
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    shape = fixtures.small_model("SD15").model.state_dict()[key + ".weight"].shape
    name = f"big_diff_{refused}.safetensors"
    path = os.path.join(harness.output_dir, "..", name)
    save_file({key + ".diff": torch.full(shape, value)}, path)
    lora = harness.add_model_file("loras", path, name=name)

    def prompt(dtype):
        return {"1": small("SD15", dtype=model_dtype),
                "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                     "strength_model": 1.0}},
                "3": {"class_type": "MergeLab_SaveModel", "inputs": {"model": ["2", 0], "filename_prefix": f"big/{dtype}",
                                                                    "dtype": dtype, "save_recipe": False,
                                                                    "hash_input_files": False}}}
    before = outputs_in(harness.output_dir)
    res = harness.run(prompt(refused))
    assert not res.success
    assert f"weight '{key}.weight' does not fit {refused}" in res.error_text()
    assert new_files(harness, before) == []
    harness.run_ok(prompt(accepted))
    (saved,) = new_files(harness, before)
    with safe_open(os.path.join(harness.output_dir, saved), "pt") as f:
        t = f.get_tensor("model." + key + ".weight")
        assert t.dtype == getattr(torch, {"bf16": "bfloat16"}.get(accepted, accepted.replace("fp8", "float8")))
        assert float(t.float().max()) > 0.9 * value


class _QwenTextEncoder:
    """A small real Z-Image (qwen3_4b) or Omnigen2 (qwen25_3b) text encoder, built through ComfyUI's classes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": ("STRING", {"default": "z_image"})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "go"
    CATEGORY = "testing"

    def go(self, kind):
        return (_qwen_clip(kind),)


def _qwen_setup(kind):
    import comfy.text_encoders.omnigen2
    import comfy.text_encoders.z_image
    te = comfy.text_encoders
    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}
    if kind == "z_image":
        return te.z_image.ZImageTokenizer, te.z_image.te(), {"qwen3_4b_model_config": cfg}, "LUMINA2"
    return te.omnigen2.Omnigen2Tokenizer, te.omnigen2.te(), {"qwen25_3b_model_config": cfg}, "OMNIGEN2"


def _qwen_clip(kind):
    import comfy.sd
    from comfy.supported_models_base import ClipTarget
    from mergelab import fixtures
    tok, cls, options, _ = _qwen_setup(kind)
    with torch.inference_mode(False):
        clip = comfy.sd.CLIP(target=ClipTarget(tok, cls), model_options={**options, "dtype": torch.float32})
        fixtures._fill_module(clip.cond_stage_model, 0, None, 0.0)
    return clip


@pytest.mark.parametrize("kind", ["z_image", "omnigen2"])
def test_qwen_text_encoders_saved_by_save_clip_load_in_comfyui(harness, kind):
    """Save CLIP left the qwen3_4b. / qwen25_3b. prefix on the keys of Z-Image's and Omnigen2's text encoder
    (ComfyUI's CLIPSave does too), and ComfyUI's load_clip then returned an empty SD1 CLIP; the file now
    loads back to the same weights."""
    import comfy.sd
    harness.register_test_node("MergeLabTest_QwenTE", _QwenTextEncoder)
    before = outputs_in(harness.output_dir)
    harness.run_ok({"t": {"class_type": "MergeLabTest_QwenTE", "inputs": {"kind": kind}},
                    "s": {"class_type": "MergeLab_SaveCLIP", "inputs": {"clip": ["t", 0], "filename_prefix": f"qwen/{kind}",
                                                                       "dtype": "keep", "save_recipe": False,
                                                                       "hash_input_files": False}}})
    files = [os.path.join(harness.output_dir, f) for f in new_files(harness, before)]
    assert len(files) == 1
    _, _, options, clip_type = _qwen_setup(kind)
    loaded = comfy.sd.load_clip(files, clip_type=getattr(comfy.sd.CLIPType, clip_type),
                                model_options={**options, "dtype": torch.float32})
    want = _qwen_clip(kind).cond_stage_model.state_dict()
    got = loaded.cond_stage_model.state_dict()
    assert type(loaded.cond_stage_model).__name__ == type(_qwen_clip(kind).cond_stage_model).__name__
    for k, v in want.items():
        if not k.endswith(".logit_scale"):
            assert k in got and torch.equal(got[k], v), k

"""Tests of mergelab.fixtures: full-size meta key lists, small models, the full-size SD1.5 checkpoint.

Reference numbers come from ComfyUI itself (its checkpoint detection, its diffusers key maps) or from
the published parameter counts of the real models, never from our own output.
"""
import gc
import math
import os

import pytest

from mergelab import comfy_env, fixtures

BUNDLED = comfy_env.comfyui_version() == comfy_env.BUNDLED_VERSION


def _strip(keys, prefix="diffusion_model."):
    return [k[len(prefix):] for k in keys if k.startswith(prefix)]


def _count(keys, fmt):
    n = 0
    while any(k.startswith(fmt.format(n)) for k in keys):
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# full-size meta models
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not BUNDLED, reason="the list of config classes is version specific")
def test_every_supported_config_class_is_covered():
    assert fixtures.uncovered_config_classes() == []
    assert fixtures.UNSUPPORTED == {}
    for name in ("SD15", "SDXL", "SD3", "SD35_Large", "Flux", "FluxSchnell", "AuraFlow", "WAN21_T2V",
                 "WAN21_T2V_1_3B", "LTXV", "QwenImage", "HunyuanVideo", "GenmoMochi", "CosmosT2V",
                 "Lumina2", "HiDream", "Chroma"):
        assert name in fixtures.ARCHITECTURES


@pytest.mark.parametrize("arch", fixtures.ARCHITECTURES)
def test_meta_model_builds_and_comfyui_detects_it(arch):
    """Every architecture builds on meta, and ComfyUI's own checkpoint detection maps its (on-disk)
    key names and shapes back to the same supported_models class."""
    if arch not in fixtures.available_architectures():
        pytest.skip(f"this ComfyUI has no {fixtures.arch_spec(arch).config_class}")
    model = fixtures.meta_model(arch)
    assert type(model.model_config).__name__ == fixtures.arch_spec(arch).config_class
    shapes = fixtures.meta_unet_shapes(arch)
    assert len(shapes) > 50
    assert all(k.startswith("diffusion_model.") for k in shapes)
    assert all(p.device.type == "meta" for p in model.diffusion_model.parameters())
    detected, _ = fixtures.detect_meta_arch(arch)
    assert detected == fixtures.arch_spec(arch).config_class


def test_meta_is_cached_and_ordered():
    a = fixtures.meta_model("SD15")
    assert fixtures.meta_model("SD15") is a
    shapes = fixtures.meta_unet_shapes("SD15")
    assert list(shapes) == [k for k in a.state_dict() if k.startswith("diffusion_model.")]
    shapes.clear()       # a copy: the cache is untouched
    assert len(fixtures.meta_unet_shapes("SD15")) > 0


@pytest.mark.parametrize("arch,params", [
    ("SD15", 859_520_964),          # the published SD1.5 UNet parameter count
    ("SDXL", 2_567_463_684),        # SDXL base UNet
    ("Flux", 11_901_408_320),       # FLUX.1 dev
])
def test_meta_param_counts_match_the_published_ones(arch, params):
    assert fixtures.meta_param_count(arch) == params


@pytest.mark.parametrize("arch,billions", [
    ("SD20", 0.866), ("SD3", 2.03), ("SD35_Medium", 2.5), ("SD35_Large", 8.1), ("AuraFlow", 6.8),
    ("WAN21_T2V_1_3B", 1.42), ("WAN21_T2V", 14.3), ("WAN22_T2V", 5.0), ("LTXV", 1.9), ("LTXV_13B", 13.0),
    ("QwenImage", 20.4), ("HunyuanVideo", 12.8), ("HunyuanVideo15", 8.3), ("GenmoMochi", 10.0),
    ("Lumina2", 2.6), ("ZImage", 6.15), ("HiDream", 17.1), ("Chroma", 8.9), ("Flux2", 32.2),
    ("PixArtAlpha", 0.61), ("HunyuanDiT", 1.5), ("CosmosT2V", 7.2), ("CosmosT2V_14B", 14.3),
    ("CosmosT2IPredict2", 2.0), ("HunyuanImage21", 17.4), ("StableAudio", 1.06), ("SVD_img2vid", 1.52),
])
def test_meta_sizes_are_the_real_model_sizes(arch, billions):
    """Rough published sizes (within 6 %): catches a config with the wrong width or depth."""
    n = fixtures.meta_param_count(arch) / 1e9
    assert abs(n - billions) / billions < 0.06, (arch, n)


def test_sd15_meta_keys_are_comfyuis():
    keys = _strip(fixtures.meta_unet_shapes("SD15"))
    assert len(keys) == 686
    for k in ("input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
              "middle_block.1.proj_in.weight", "output_blocks.11.1.proj_out.bias", "out.2.weight",
              "time_embed.0.weight"):
        assert k in keys
    assert fixtures.meta_unet_shapes("SD15")["diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert _count(keys, "input_blocks.{}.") == 12
    assert _count(keys, "middle_block.{}.") == 3
    assert _count(keys, "output_blocks.{}.") == 12


@pytest.mark.parametrize("arch", ["SD15", "SD20", "SDXL", "SDXLRefiner", "SSD1B"])
def test_unet_keys_are_known_to_comfyuis_diffusers_map(arch):
    import comfy.utils
    keys = set(_strip(fixtures.meta_unet_shapes(arch)))
    known = set(comfy.utils.unet_to_diffusers(fixtures.arch_spec(arch).unet_config).values())
    assert keys - known == set()


@pytest.mark.parametrize("arch", ["Flux", "FluxSchnell"])
def test_flux_keys_are_known_to_comfyuis_diffusers_map(arch):
    import comfy.utils
    keys = set(_strip(fixtures.meta_unet_shapes(arch)))
    m = comfy.utils.flux_to_diffusers(fixtures.arch_spec(arch).unet_config, output_prefix="")
    known = {v if isinstance(v, str) else v[0] for v in m.values()}
    assert keys - known == set()
    assert _count(keys, "double_blocks.{}.") == 19
    assert _count(keys, "single_blocks.{}.") == 38
    assert ("guidance_in.in_layer.weight" in keys) == (arch == "Flux")


@pytest.mark.parametrize("arch,depth", [("SD3", 24), ("SD35_Medium", 24), ("SD35_Large", 38)])
def test_sd3_keys_are_known_to_comfyuis_diffusers_map(arch, depth):
    import comfy.utils
    keys = set(_strip(fixtures.meta_unet_shapes(arch)))
    m = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": depth}, output_prefix="")
    known = {v if isinstance(v, str) else v[0] for v in m.values()}
    assert keys - known == set()
    assert _count(keys, "joint_blocks.{}.") == depth


@pytest.mark.parametrize("arch,blocks,dim", [("WAN21_T2V", 40, 5120), ("WAN21_T2V_1_3B", 30, 1536)])
def test_wan_sizes(arch, blocks, dim):
    shapes = fixtures.meta_unet_shapes(arch)
    keys = _strip(shapes)
    assert _count(keys, "blocks.{}.") == blocks
    assert shapes["diffusion_model.head.modulation"][-1] == dim
    assert "diffusion_model.blocks.0.self_attn.q.weight" in shapes


# ---------------------------------------------------------------------------------------------
# small models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", fixtures.SMALL_ARCHS)
def test_small_model_has_the_full_size_structure(arch):
    import comfy.model_patcher
    m = fixtures.small_model(arch)
    assert isinstance(m, comfy.model_patcher.ModelPatcher)
    assert type(m.model.model_config).__name__ == fixtures.arch_spec(arch).config_class
    small = [k for k in m.model.state_dict() if k.startswith("diffusion_model.")]
    full = list(fixtures.meta_unet_shapes(arch))
    # the same key names (hence the same blocks), in the same order
    assert small == full
    assert fixtures.block_prefixes(small) == fixtures.block_prefixes(full)
    assert all(p.device.type == "cpu" for p in m.model.parameters())
    nbytes = sum(v.numel() * 4 for k, v in m.model.state_dict().items() if k.startswith("diffusion_model."))
    assert nbytes < 64e6          # documented sizes: SD15 22 MB, SDXL 57 MB, Flux 21 MB (fp32)


def test_small_block_prefixes_match_full_size():
    for arch, fmt, n in [("SD15", "input_blocks.{}.", 12), ("SDXL", "input_blocks.{}.", 9),
                         ("Flux", "double_blocks.{}.", 19)]:
        pre = fixtures.block_prefixes(fixtures.small_model(arch).model.state_dict())
        assert [p for p in pre if p.startswith(fmt.split("{")[0])] == [fmt.format(i) for i in range(n)]


def test_small_model_is_deterministic_and_deltas_are_exact():
    import torch
    k = "diffusion_model.input_blocks.1.1.proj_in.weight"
    a = fixtures.small_model("SD15", seed=0).model_state_dict()[k]
    again = fixtures._build_small_model("SD15", 0).model.state_dict()[k]
    assert torch.equal(a, again)                              # same seed, rebuilt: same values
    b = fixtures.small_model("SD15", seed=1).model_state_dict()[k]
    assert not torch.equal(a, b)
    t = fixtures.small_model("SD15", seed=0, delta_seed=5, delta_scale=0.01).model_state_dict()[k]
    noise = fixtures._randn(a.shape, "delta", 5, k)
    torch.testing.assert_close(t, a + 0.01 * noise, rtol=0, atol=1e-7)
    assert 0.004 < (t - a).std().item() < 0.02
    h = fixtures.small_model("SD15", seed=0, dtype="fp16").model_state_dict()[k]
    assert h.dtype == torch.float16 and torch.equal(h, a.half())
    # norms are 1, biases small and non-zero
    sd = fixtures.small_model("SD15").model_state_dict()
    assert torch.all(sd["diffusion_model.out.0.weight"] == 1)
    assert 0 < sd["diffusion_model.out.0.bias"].abs().max() < 0.1


def test_small_model_returns_clones_of_a_cached_model():
    m1 = fixtures.small_model("Flux")
    m2 = fixtures.small_model("Flux")
    assert m1 is not m2 and m1.is_clone(m2)
    k = "diffusion_model.img_in.weight"
    m1.add_patches({k: ("diff", (m1.model_state_dict()[k].clone(),))}, 1.0)
    assert k in m1.patches and k not in m2.patches
    assert k not in fixtures.small_model("Flux").patches


@pytest.mark.parametrize("arch,encoders", [("SD15", {"clip_l"}), ("SDXL", {"clip_l", "clip_g"}),
                                           ("Flux", {"clip_l", "t5xxl"})])
def test_small_clip_has_real_encoder_keys(arch, encoders):
    import comfy.sd
    import torch
    clip = fixtures.small_clip(arch)
    assert isinstance(clip, comfy.sd.CLIP)
    sd = clip.cond_stage_model.state_dict()
    assert {k.split(".")[0] for k in sd} == encoders
    assert "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert "clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in sd     # 12 layers, as CLIP-L
    # the very same key names as the full-size encoders of the same ComfyUI classes (built on meta)
    target = fixtures.config_class(arch)(fixtures.small_unet_config(arch)).clip_target({})
    full = target.clip(device=torch.device("meta"), dtype=torch.float16, model_options={})
    assert set(sd) == set(full.state_dict())
    # tiny but real: the real tokenizer and a forward pass work
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    assert torch.isfinite(cond).all() and cond.shape[0] == 1


def test_small_clip_is_deterministic():
    import torch
    k = "clip_l.transformer.text_model.encoder.layers.3.self_attn.k_proj.weight"
    a = fixtures.small_clip("SD15").get_sd()[k]
    b = fixtures._build_small_clip("SD15", 0).get_sd()[k]
    c = fixtures.small_clip("SD15", delta_seed=2, delta_scale=0.01).get_sd()[k]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_small_model_node_runs_in_comfyui(harness):
    import comfy.model_patcher
    import comfy.sd
    prompt = {
        "1": {"class_type": "MergeLabTest_SmallModel",
              "inputs": {"arch": "SDXL", "seed": 3, "delta_seed": 1, "delta_scale": 0.001, "dtype": "fp16"}},
        "2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 0], "name": "model"}},
        "3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["1", 1], "name": "clip"}},
    }
    res = harness.run_ok(prompt)
    model, clip = res.captured["model"], res.captured["clip"]
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP)
    assert type(model.model.model_config).__name__ == "SDXL"
    assert model.model.diffusion_model.dtype == __import__("torch").float16
    assert model.is_clone(fixtures.small_model("SDXL", seed=3, dtype="fp16", delta_seed=1, delta_scale=0.001))


def test_small_models_merge_and_sample_in_comfyui(harness):
    """Core nodes on small models: merge two variants, encode a prompt, sample two steps."""
    import torch
    prompt = {
        "1": {"class_type": "MergeLabTest_SmallModel",
              "inputs": {"arch": "SD15", "seed": 0, "delta_seed": 0, "delta_scale": 0.0, "dtype": "fp32"}},
        "2": {"class_type": "MergeLabTest_SmallModel",
              "inputs": {"arch": "SD15", "seed": 0, "delta_seed": 7, "delta_scale": 0.01, "dtype": "fp32"}},
        "3": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.5}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                         "seed": 1, "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "7": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["6", 0], "name": "latent"}},
    }
    res = harness.run_ok(prompt)
    samples = res.captured["latent"]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()


# ---------------------------------------------------------------------------------------------
# the full-size SD1.5 checkpoint
# ---------------------------------------------------------------------------------------------
def test_sd15_checkpoint_layout_is_an_sd15_file():
    layout = fixtures.sd15_checkpoint_layout()
    prefixes = {}
    for k in layout:
        p = k.split(".")[0]
        prefixes[p] = prefixes.get(p, 0) + 1
    # UNet 686 tensors, CLIP-L text model 196 (ComfyUI keeps no position_ids), KL-VAE 248
    assert prefixes == {"model": 686, "cond_stage_model": 196, "first_stage_model": 248}
    assert layout["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"][0] == (49408, 768)
    assert layout["first_stage_model.decoder.conv_out.weight"][0] == (3, 128, 3, 3)
    n = sum(math.prod(s) for s, _ in layout.values())
    assert 1.06e9 < n < 1.07e9       # 859.5 M UNet + 123.1 M CLIP-L text + 83.7 M VAE


def test_full_sd15_loads_in_comfyui_as_sd15(full_sd15):
    """The fixture file itself: stamped, reproducible, and ComfyUI's loader detects SD15."""
    import torch
    from safetensors import safe_open
    meta = fixtures.read_safetensors_metadata(full_sd15)
    assert meta["mergelab_fixture"] == "sd15_full" and meta["format_version"] == str(fixtures.FORMAT_VERSION)
    assert fixtures.full_sd15_checkpoint() == full_sd15            # reused, not regenerated
    k = "model.diffusion_model.output_blocks.5.1.proj_out.weight"
    with safe_open(full_sd15, "pt") as f:
        t = f.get_tensor(k)
    assert t.dtype == torch.float16 and torch.equal(t, fixtures.expected_sd15_tensor(k))
    # detection only (shapes, no weights): what CheckpointLoaderSimple decides for this file
    import comfy.model_detection as md
    with safe_open(full_sd15, "pt") as f:
        shapes = {kk: torch.empty(f.get_slice(kk).get_shape(), device="meta") for kk in f.keys()}
    mc = md.model_config_from_unet(shapes, md.unet_prefix_from_state_dict(shapes))
    assert type(mc).__name__ == "SD15"
    assert mc.clip_target(shapes).clip.__name__ == "SD1ClipModel"


def _release_memory():
    """Drop the GBs a full-size graph leaves behind: loaded models and the harness's captured values."""
    import comfy.model_management as mm
    from mergelab import harness as harness_module
    harness_module._CAPTURED.clear()
    mm.unload_all_models()
    getattr(mm, "cleanup_models_gc", lambda: None)()
    gc.collect()


def _merged_expected(key, ratio):
    """ModelMergeSimple's result as ComfyUI computes it: fp32 maths on the fp16 weights, back to fp16."""
    a = fixtures.expected_sd15_tensor(key).float()
    b = fixtures.expected_sd15_tensor(key, delta_seed=fixtures.DEFAULT_TUNED_DELTA_SEED,
                                      delta_scale=fixtures.DEFAULT_TUNED_DELTA_SCALE).float()
    return (a * ratio + (1 - ratio) * b).half().float(), a


def _assert_merged(got, want, base):
    got = got.float()
    # equal up to one fp16 rounding step (ComfyUI casts the fp32 result back to the weight dtype)
    torch_ = __import__("torch")
    ulp = torch_.finfo(torch_.float16).eps * want.abs().clamp_min(2 ** -14)
    assert bool(((got - want).abs() <= ulp).all())
    assert (got == want).float().mean() > 0.99
    assert not torch_.allclose(got, base, rtol=0, atol=1e-4)     # really merged, not model1


def test_foundation_core_merge_and_save_full_size_sd15(harness, full_sd15, tuned_sd15, monkeypatch):
    """THE foundation test: core ComfyUI nodes on the full-size fixture: load two SD1.5 checkpoints,
    ModelMergeSimple, sample one step + decode (no NaN), CheckpointSave; the saved file loads back with
    ComfyUI's loader as SD15 and holds exactly the merged weights.

    Runs as with ``--fp16-unet --fp16-text-enc`` (what a GPU user gets by default; on the CPU ComfyUI
    would pick fp32): peak RSS about 6-7 GB instead of about 12 GB."""
    import comfy.cli_args
    import comfy.sd
    import torch
    from safetensors import safe_open
    monkeypatch.setattr(comfy.cli_args.args, "fp16_unet", True)
    monkeypatch.setattr(comfy.cli_args.args, "fp16_text_enc", True)
    ratio = 0.25
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": os.path.basename(full_sd15)}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": os.path.basename(tuned_sd15)}},
        "3": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": ratio}},
        "4": {"class_type": "CheckpointSave",
              "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2],
                         "filename_prefix": "checkpoints/mergelab_foundation"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["3", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0],
                         "seed": 0, "steps": 1, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["8", 0], "name": "image"}},
    }
    out_dir = os.path.join(harness.output_dir, "checkpoints")
    saved = None
    try:
        res = harness.run_ok(prompt)
        image = res.captured["image"]
        assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
        del res, image
        files = sorted(f for f in os.listdir(out_dir) if f.startswith("mergelab_foundation"))
        assert files, os.listdir(out_dir)
        saved = os.path.join(out_dir, files[-1])
        _release_memory()

        # the saved file: SD1.5 on-disk names, merged UNet, base CLIP and VAE
        with safe_open(saved, "pt") as f:
            keys = set(f.keys())
            assert set(fixtures.sd15_checkpoint_layout()) <= keys
            for k in ("model.diffusion_model.input_blocks.1.1.proj_in.weight",
                      "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                      "model.diffusion_model.out.2.bias"):
                got = f.get_tensor(k)
                assert got.dtype == torch.float16
                _assert_merged(got, *_merged_expected(k, ratio))
            for k in ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                      "first_stage_model.decoder.conv_in.weight"):
                torch.testing.assert_close(f.get_tensor(k).float(), fixtures.expected_sd15_tensor(k).float(),
                                           rtol=0, atol=0)

        # and ComfyUI's own loader reads it back as SD15 with those weights
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(saved, output_vae=True, output_clip=True)
        assert type(model.model.model_config).__name__ == "SD15"
        k = "diffusion_model.input_blocks.4.1.proj_in.weight"
        _assert_merged(model.model.state_dict()[k], *_merged_expected("model." + k, ratio))
        assert clip is not None and vae is not None
        del model, clip, vae
    finally:
        _release_memory()
        if saved and os.path.exists(saved):
            os.remove(saved)

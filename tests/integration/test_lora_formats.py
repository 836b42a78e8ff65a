"""LoRA files in kohya, ComfyUI-native, diffusers/PEFT and LyCORIS LoCon layouts, written by the test,
load (MergeLab's Load LoRA node and ComfyUI's own LoraLoader) to the same ΔW as the kohya file."""
import importlib
import json
import logging
import math
import os

import pytest
import safetensors.torch
import torch

from mergelab import fixtures
from mergelab.harness import api_node


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


def delta_patched(obj, seed, rank, unet, biases=True):
    out = obj.clone()
    patcher = out if unet else out.patcher
    patches = {}
    for k, t in patcher.model.state_dict().items():
        if (unet and not k.startswith("diffusion_model.")) or not t.is_floating_point() or t.dim() == 0:
            continue
        if k.endswith((".position_ids", ".logit_scale")) or (t.dim() < 2 and not biases):
            continue
        g = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, k)))
        if t.dim() < 2:
            d = torch.randn(t.shape, generator=g) * 0.01
        else:
            m, n = t.shape[0], t[0].numel()
            d = ((torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) * (0.02 / math.sqrt(rank * n))
                 ).reshape(t.shape)
        patches[k] = ("diff", (d,))
    out.add_patches(patches, 1.0)
    return out


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class capture_log:
    def __enter__(self):
        self.h = LogCapture()
        logging.getLogger().addHandler(self.h)
        return self.h.messages

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.h)


@pytest.fixture(scope="module")
def setup(harness, tmp_path_factory):
    ops = pack(harness, "engine.lora_ops")
    svd = pack(harness, "engine.lora_svd")
    base, clip = fixtures.small_model("SD15"), fixtures.small_clip("SD15")
    tuned, tclip = delta_patched(base, 5, 3, True), delta_patched(clip, 5, 3, False)
    lora, _ = ops.extract_lora(tuned, base, tclip, clip,
                               ops.ExtractOptions(rank=svd.RankSpec("fixed", 3), bias_diff=True), name="src")
    return {"base": base, "clip": clip, "lora": lora, "dir": tmp_path_factory.mktemp("fmt")}


def write(harness, setup, name, sd):
    path = os.path.join(str(setup["dir"]), name)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return harness.add_model_file("loras", path, name=name)


def load_node(harness, name, arch="SD15"):
    g = {"m": {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": arch, "seed": 0, "delta_seed": 0,
                                                                   "delta_scale": 0.0, "dtype": "fp32"}},
         "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "clip": ["m", 1], "lora_name": name}},
         "cap": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["l", 0], "name": "lora"}}}
    return harness.run_ok(g).captured["lora"]


def comfy_effective(harness, setup, name, keys):
    """ComfyUI's LoraLoader on the base: the difference it makes on ``keys``; and its complaints."""
    ws = pack(harness, "engine.weights")
    with capture_log() as msgs:
        m, c = harness.nodes.LoraLoader().load_lora(setup["base"], setup["clip"], name, 1.0, 1.0)
    bad = [x for x in msgs if "lora key not loaded" in x or "NOT LOADED" in x]
    cpu = torch.device("cpu")
    out = {}
    with torch.no_grad():
        for k in keys:
            unet = k.startswith("diffusion_model.")
            src = ws.KeySource.of(m if unet else c)
            ref = ws.KeySource.of(setup["base"] if unet else setup["clip"])
            out[k] = src.read(k, cpu) - ref.read(k, cpu)
    return out, bad


def close(a, b, what, rtol=1e-5):
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= rtol * scale + 1e-9, what


def to_diffusers(harness, lora, base):
    """diffusers layout: PEFT ``unet.<path>.lora_A/lora_B`` names, older attention-processor names
    (``…attn1.processor.to_q_lora.up/down``) for attention, ``text_encoder.…lora_A/B`` for CLIP."""
    import comfy.utils
    import comfy.lora
    unet_map = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    inv = {"diffusion_model." + v: k for k, v in unet_map.items()}
    sd, expressed = {}, set()
    for key, layer in lora.layers.items():
        if layer.kind != "lora":
            continue
        up = layer.up * layer.scale                       # PEFT: no alpha, scale folded into B
        down = layer.down
        if key.startswith("diffusion_model."):
            dk = inv.get(key)
            if dk is None:
                continue
            path = dk[:-len(".weight")]
            if ".attn1.to_" in path or ".attn2.to_" in path:
                p = "unet." + path.replace(".to_", ".processor.to_")
                if p.endswith(".to_out.0"):
                    p = p[:-2]
                sd[p + "_lora.up.weight"], sd[p + "_lora.down.weight"] = up, down
            else:
                sd["unet." + path + ".lora_B.weight"], sd["unet." + path + ".lora_A.weight"] = up, down
        else:
            parts = key.split(".")
            if not key.startswith("clip_l.transformer.text_model.encoder.layers."):
                continue
            module = ".".join(parts[6:-1])
            if module not in comfy.lora.LORA_CLIP_MAP:
                continue
            p = f"text_encoder.text_model.encoder.layers.{parts[5]}.{module}"
            sd[p + ".lora_B.weight"], sd[p + ".lora_A.weight"] = up, down
        expressed.add(key)
    return sd, expressed


def test_kohya_comfy_and_diffusers_files_load_to_the_same_delta(harness, setup):
    lio = pack(harness, "engine.lora_io")
    lora = setup["lora"]
    kohya = write(harness, setup, "fmt_kohya.safetensors", lio.lora_state_dict(lora, "kohya", torch.float32))
    comfy = write(harness, setup, "fmt_comfy.safetensors", lio.lora_state_dict(lora, "comfyui", torch.float32))
    dsd, expressed = to_diffusers(harness, lora, setup["base"])
    assert any(k.endswith("_lora.up.weight") for k in dsd) and any(k.endswith(".lora_A.weight") for k in dsd)
    assert len(expressed) > 0.5 * len([l for l in lora.layers.values() if l.kind == "lora"])
    diffusers = write(harness, setup, "fmt_diffusers.safetensors", dsd)

    ref = load_node(harness, kohya)
    # the kohya file leaves out the layers without a kohya name (here the CLIP's layer norms, which only
    # ComfyUI-native names address, and its embedding tables); the comfyui file keeps them
    left_out = set(lio.kohya_unnamed(lora))
    assert left_out and all("layer_norm" in k or ".embeddings." in k for k in left_out), sorted(left_out)[:5]
    assert set(ref.layers) == set(lora.layers) - left_out
    ref_d = {k: l.delta() for k, l in ref.layers.items()}
    for k, l in lora.layers.items():
        if k not in left_out:
            close(ref_d[k], l.delta(), k)
    comfy_ref, bad = comfy_effective(harness, setup, kohya, list(ref_d))
    assert bad == []
    for k in ref_d:
        close(comfy_ref[k], ref_d[k], k)

    ref_d.update({k: lora.layers[k].delta() for k in left_out})
    comfy_ref.update(comfy_effective(harness, setup, comfy, sorted(left_out))[0])
    for name, keys in ((comfy, set(lora.layers)), (diffusers, expressed)):
        got = load_node(harness, name)
        assert set(got.layers) == keys, name
        for k in keys:
            close(got.layers[k].delta(), ref_d[k], (name, k))
        eff, bad = comfy_effective(harness, setup, name, sorted(keys))
        assert bad == [], (name, bad[:3])
        for k in keys:
            close(eff[k], comfy_ref[k], (name, k))


def test_peft_attention_names_without_processor_load(harness, setup):
    """PEFT-era diffusers names ``unet.….attn1.to_q.lora_A`` (which ComfyUI's own map lacks) load too."""
    import comfy.utils
    base = setup["base"]
    unet_map = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    dk = next(k for k in unet_map if k.endswith("attn1.to_q.weight"))
    key = "diffusion_model." + unet_map[dk]
    layer = setup["lora"].layers[key]
    p = "unet." + dk[:-len(".weight")]
    name = write(harness, setup, "fmt_peft_attn.safetensors",
                 {p + ".lora_B.weight": layer.up * layer.scale, p + ".lora_A.weight": layer.down})
    got = load_node(harness, name)
    assert list(got.layers) == [key]
    close(got.layers[key].delta(), layer.delta(), key)


def test_locon_tucker_file_matches_its_kohya_equivalent(harness, setup):
    """LyCORIS LoCon with Tucker ``lora_mid`` on 3×3 convs (kohya and ``lycoris_`` names) vs a plain kohya
    file of the same ΔW (mid folded into down by the test): same ΔW through ComfyUI's LoraLoader and ours."""
    import comfy.lora
    lio = pack(harness, "engine.lora_io")
    base = setup["base"]
    km = comfy.lora.model_lora_keys_unet(base.model, {})
    inv = {}
    for n, t in km.items():
        inv.setdefault(t, []).append(n)
    sd = base.model.state_dict()
    convs = [k for k, t in sd.items() if k.startswith("diffusion_model.") and t.dim() == 4 and t.shape[-1] == 3][:8]
    linears = [k for k, t in sd.items() if k.startswith("diffusion_model.") and t.dim() == 2][:4]
    g = torch.Generator().manual_seed(11)
    locon, plain = {}, {}
    for i, k in enumerate(convs + linears):
        t = sd[k]
        r = 3
        kohya_name = min(n for n in inv[k] if n.startswith("lora_unet_"))
        lyco = [n for n in inv[k] if n.startswith("lycoris_")]
        name = lyco[0] if (i % 2 and lyco) else kohya_name
        alpha = torch.tensor(1.5)
        up = torch.randn(t.shape[0], r, *([1] * (t.dim() - 2)), generator=g) * 0.05
        if t.dim() == 4:
            mid = torch.randn(r, r, 3, 3, generator=g) * 0.05
            down = torch.randn(r, t.shape[1], 1, 1, generator=g) * 0.05
            locon.update({name + ".lora_up.weight": up, name + ".lora_mid.weight": mid,
                          name + ".lora_down.weight": down, name + ".alpha": alpha})
            down_eff = torch.einsum("jiyx,ic->jcyx", mid, down[:, :, 0, 0])
        else:
            down_eff = torch.randn(r, t.shape[1], generator=g) * 0.05
            locon.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down_eff, name + ".alpha": alpha})
        plain.update({kohya_name + ".lora_up.weight": up, kohya_name + ".lora_down.weight": down_eff,
                      kohya_name + ".alpha": alpha})
    n_locon = write(harness, setup, "fmt_locon.safetensors", locon)
    n_plain = write(harness, setup, "fmt_locon_plain.safetensors", plain)
    keys = convs + linears
    e_locon, bad1 = comfy_effective(harness, setup, n_locon, keys)
    e_plain, bad2 = comfy_effective(harness, setup, n_plain, keys)
    assert bad1 == [] and bad2 == []
    l_locon, l_plain = load_node(harness, n_locon), load_node(harness, n_plain)
    assert set(l_locon.layers) == set(keys) == set(l_plain.layers)
    assert all(l_locon.layers[k].mid is not None for k in convs)
    for k in keys:
        close(e_locon[k], e_plain[k], k, rtol=1e-4)
        close(l_locon.layers[k].delta(), e_locon[k], k, rtol=1e-4)
        close(l_plain.layers[k].delta(), e_plain[k], k, rtol=1e-4)
    # saved back in kohya format, the LoCon layers keep their mid and load in ComfyUI to the same ΔW
    resaved = write(harness, setup, "fmt_locon_resaved.safetensors", lio.lora_state_dict(l_locon, "kohya",
                                                                                          torch.float32))
    e_re, bad = comfy_effective(harness, setup, resaved, keys)
    assert bad == []
    for k in keys:
        close(e_re[k], e_locon[k], k, rtol=1e-4)


def _weight_dependent_layer(kind, out_f, in_f, g, decomposed):
    """LoRA-file entries of one layer of ``kind`` (lora, loha, lokr, glora), with a DoRA scale when
    ``decomposed``."""
    r = 4
    rn = lambda *shape: torch.randn(*shape, generator=g) * 0.1        # noqa: E731
    if kind == "lora":
        d = {"lora_up.weight": rn(out_f, r), "lora_down.weight": rn(r, in_f)}
    elif kind == "loha":
        d = {"hada_w1_a": rn(out_f, r), "hada_w1_b": rn(r, in_f), "hada_w2_a": rn(out_f, r), "hada_w2_b": rn(r, in_f)}
    elif kind == "lokr":
        d = {"lokr_w1": rn(2, 2), "lokr_w2": rn(out_f // 2, in_f // 2)}
    else:       # GLoRA: ΔW = W·a1·a2 + b1·b2
        d = {"a1.weight": rn(in_f, r), "a2.weight": rn(r, in_f), "b1.weight": rn(out_f, r), "b2.weight": rn(r, in_f)}
    d["alpha"] = torch.tensor(float(r))
    if decomposed:
        d["dora_scale"] = torch.rand(out_f, 1, generator=g) + 0.5
    return d


def _alternating_layers(setup, kind, seed, decomposed):
    """LoRA-file entries on the base's first 4 linear UNet weights: a ``kind`` layer (DoRA when
    ``decomposed``) on the 1st and 3rd, a plain LoRA on the others; with the state dict and those keys."""
    import comfy.lora
    inv = {}
    for n, t in comfy.lora.model_lora_keys_unet(setup["base"].model, {}).items():
        inv.setdefault(t, []).append(n)
    sd = setup["base"].model.state_dict()
    linears = [k for k, t in sd.items() if k.startswith("diffusion_model.") and t.dim() == 2][:4]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, k in enumerate(linears):
        name = min(n for n in inv[k] if n.startswith("lora_unet_"))
        plain = i % 2 == 1
        layer = _weight_dependent_layer("lora" if plain else kind, *sd[k].shape, g, decomposed and not plain)
        out.update({f"{name}.{x}": v for x, v in layer.items()})
    return sd, linears, out


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "glora"])
def test_dora_stacks_at_any_strength_like_comfyuis_loader(harness, setup, kind):
    """A DoRA layer (a LoRA, LoHa or LoKr with a dora_scale) and a GLoRA layer have no fixed ΔW (DoRA
    renormalizes the patched weight, GLoRA's change has a W·a1·a2 term), so LoRA Stack keeps them as patches
    at their strength: Stack at 0.8 (then times Apply's 0.5) then Apply gives the weights ComfyUI's
    LoraLoader gives at 0.4, on these and plain layers alike.  Summing one with another LoRA on the same
    weight is refused with a message that says what to do instead; saving it as LoRA factors is refused
    (LoHa / LoKr DoRA and GLoRA were evaluated on a zero weight: weights of 1e6, or GLoRA 11 % off)."""
    sd, linears, dora = _alternating_layers(setup, kind, 12, kind != "glora")
    n = write(harness, setup, f"fmt_dora_{kind}.safetensors", dora)
    small = {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": "SD15", "seed": 0, "delta_seed": 0,
                                                                 "delta_scale": 0.0, "dtype": "fp32"}}
    g1 = {"m": small,
          "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "clip": ["m", 1], "lora_name": n}},
          "s": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["l", 0], "strength_model": 0.8,
                                                              "strength_clip": 1.0}},
          "a": {"class_type": "MergeLab_ApplyLoRA", "inputs": {"model": ["m", 0], "clip": ["m", 1], "lora": ["s", 0],
                                                              "strength_model": 0.5, "strength_clip": 1.0}},
          "ref": {"class_type": "LoraLoader", "inputs": {"model": ["m", 0], "clip": ["m", 1], "lora_name": n,
                                                         "strength_model": 0.4, "strength_clip": 1.0}},
          "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["a", 0], "name": "ours"}},
          "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["ref", 0], "name": "comfy"}},
          "c3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["m", 0], "name": "base"}}}
    got = harness.run_ok(harness.with_defaults(g1)).captured
    ws = pack(harness, "engine.weights")
    cpu = torch.device("cpu")
    ours, comfy, b = (ws.KeySource.of(got[x]) for x in ("ours", "comfy", "base"))
    for k in linears:
        want = comfy.read(k, cpu)
        assert not torch.equal(want, b.read(k, cpu)), k
        close(ours.read(k, cpu), want, k, rtol=1e-6)
    # with a second LoRA on the same weights: refused, saying what to do
    g2 = {"m": small,
          "l": g1["l"],
          "s1": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["l", 0], "strength_model": 0.8,
                                                               "strength_clip": 1.0}},
          "s2": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["l", 0], "strength_model": 0.5,
                                                               "strength_clip": 1.0, "stack": ["s1", 0]}},
          "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["s2", 0], "name": "x"}}}
    res = harness.run(g2)
    why = "GLoRA" if kind == "glora" else "DoRA"
    assert not res.success and why in res.error_text() and "one after the other" in res.error_text()
    # saved: a LoRA DoRA as it is (test_dora_merges_resizes_and_saves); a LoHa / LoKr DoRA and GLoRA cannot be
    # written as LoRA factors, and the message says so (and how to get a plain LoRA from a DoRA)
    if kind != "lora":
        g3 = {"m": small, "l": g1["l"], "save": {"class_type": "MergeLab_SaveLoRA",
                                                 "inputs": {"lora": ["l", 0], "filename_prefix": f"loras/dora_{kind}"}}}
        res = harness.run(harness.with_defaults(g3))
        expect = "depends on the base weight" if kind == "glora" else \
            "only a LoRA DoRA (up/down factors) is written as DoRA. Resize LoRA makes it a plain LoRA"
        assert not res.success and why in res.error_text() and expect in res.error_text(), res.error_text()


def test_dora_on_slices_of_a_fused_weight_is_not_saved_as_a_full_difference(harness, setup):
    """A diffusers Flux DoRA on q / k / v addresses slices of the fused img_attn.qkv.  Save LoRA joins a
    weight's slices into one layer; for DoRA slices that was a full-size .diff (their difference on the
    loaded model, wrong on any other base) written without a word.  It is refused, saying to resize."""
    base = fixtures.small_model("Flux")
    w = base.model.state_dict()["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        layer = _weight_dependent_layer("lora", w.shape[0] // 3, w.shape[1], g, True)
        p = f"transformer.transformer_blocks.0.attn.{name}"
        sd.update({p + ".lora_A.weight": layer["lora_down.weight"], p + ".lora_B.weight": layer["lora_up.weight"],
                   p + ".alpha": layer["alpha"], p + ".dora_scale": layer["dora_scale"]})
    n = write(harness, setup, "fmt_flux_qkv_dora.safetensors", sd)
    g1 = {"m": {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": "Flux", "seed": 0, "delta_seed": 0,
                                                                    "delta_scale": 0.0, "dtype": "fp32"}},
          "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "clip": ["m", 1], "lora_name": n}},
          "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["l", 0], "name": "lora"}}}
    lora = harness.run_ok(g1).captured["lora"]
    assert any(isinstance(k, tuple) for k in lora.layers), "the DoRA should address slices"
    g1["save"] = api_node("MergeLab_SaveLoRA", lora=["l", 0], filename_prefix="loras/flux_qkv_dora")
    res = harness.run(harness.with_defaults(g1))
    assert not res.success and "a DoRA on part of the fused weight" in res.error_text(), res.error_text()
    assert "Resize LoRA makes it a plain LoRA" in res.error_text()


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_dora_merges_resizes_and_saves(harness, setup, kind):
    """A DoRA layer's difference on the model Load LoRA was given (DoRA(W) − W, which ComfyUI applies at
    strength s as W + s·(DoRA(W) − W)) is what Merge LoRAs and Resize LoRA use: at full rank, Resize then
    Apply at 0.4, and a linear merge of the LoRA at 0.5 + 0.3 then Apply at 0.5, give the weights ComfyUI's
    LoraLoader gives at 0.4 (they were refused: no fixed difference).  Save LoRA writes a LoRA DoRA as DoRA
    (factors and dora_scale), which ComfyUI's LoraLoader loads to the same weights as the original file.
    Stacked at a strength ≠ 1 it cannot be saved, and the message says to resize it."""
    import comfy.lora
    import folder_paths
    sd, linears, sdict = _alternating_layers(setup, kind, 21, True)
    g = torch.Generator().manual_seed(22)
    # and a DoRA layer of the text encoder (read from the CLIP Load LoRA was given)
    ckm = comfy.lora.model_lora_keys_clip(setup["clip"].cond_stage_model, {})
    csd = setup["clip"].cond_stage_model.state_dict()
    ck = next(k for k in ckm.values() if isinstance(k, str) and k in csd and "self_attn.q_proj" in k)
    cname = min(n for n, t in ckm.items() if t == ck and n.startswith("lora_te"))
    sdict.update({f"{cname}.{x}": v for x, v in _weight_dependent_layer(kind, *csd[ck].shape, g, True).items()})
    n = write(harness, setup, f"fmt_dora_ops_{kind}.safetensors", sdict)
    full = max(min(t.shape) for t in [sd[k] for k in linears] + [csd[ck]])
    small = {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": "SD15", "seed": 0, "delta_seed": 0,
                                                                 "delta_scale": 0.0, "dtype": "fp32"}}

    def apply(src, strength, cap):
        return {f"a_{cap}": {"class_type": "MergeLab_ApplyLoRA", "inputs": {
                    "model": ["m", 0], "clip": ["m", 1], "lora": src, "strength_model": strength,
                    "strength_clip": strength}},
                f"c_{cap}": {"class_type": "MergeLabTest_Capture", "inputs": {"value": [f"a_{cap}", 0], "name": cap}},
                f"cc_{cap}": {"class_type": "MergeLabTest_Capture", "inputs": {"value": [f"a_{cap}", 1],
                                                                              "name": cap + "_clip"}}}

    gr = {"m": small,
          "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "clip": ["m", 1], "lora_name": n}},
          "r": {"class_type": "MergeLab_ResizeLoRA", "inputs": {"lora": ["l", 0], "rank_mode": "fixed", "rank": full,
                                                               "rank_param": 0.9, "clamp_quantile": 1.0,
                                                               "device": "auto"}},
          "method": api_node("MergeLab_Method_linear", normalize=False),
          "i0": api_node("MergeLab_LoRAMergeInput", lora=["l", 0], weight=0.5),
          "i1": api_node("MergeLab_LoRAMergeInput", lora=["l", 0], weight=0.3, loras=["i0", 0]),
          "merge": {"class_type": "MergeLab_MergeLoRAs", "inputs": {
              "method": ["method", 0], "loras": ["i1", 0], "rank_mode": "fixed", "rank": full, "rank_param": 0.9,
              "seed": 0, "clamp_quantile": 1.0, "device": "auto"}},
          "ref": {"class_type": "LoraLoader", "inputs": {"model": ["m", 0], "clip": ["m", 1], "lora_name": n,
                                                         "strength_model": 0.4, "strength_clip": 0.4}},
          "c_ref": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["ref", 0], "name": "ref"}},
          "cc_ref": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["ref", 1], "name": "ref_clip"}},
          "c_m": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["m", 0], "name": "base"}},
          "cc_m": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["m", 1], "name": "base_clip"}},
          "c_l": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["l", 0], "name": "lora"}},
          "c_rep": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 1], "name": "report"}},
          **apply(["r", 0], 0.4, "resized"), **apply(["merge", 0], 0.5, "merged")}
    if kind == "lora":
        gr["save"] = {"class_type": "MergeLab_SaveLoRA", "inputs": {"lora": ["l", 0], "dtype": "fp32",
                                                                   "filename_prefix": "loras/dora_native"}}
        gr["c_path"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["save", 0], "name": "path"}}
    got = harness.run_ok(harness.with_defaults(gr)).captured
    # the reports say what a DoRA layer became; Load LoRA's summary counts the DoRA layers and their rank
    assert got["report"].count("DoRA: its difference on the model it was loaded with") == 3, got["report"]
    assert "3 DoRA" in got["lora"].summary() and got["lora"].numel() > 0
    ws = pack(harness, "engine.weights")
    cpu = torch.device("cpu")
    ref, b = ws.KeySource.of(got["ref"]), ws.KeySource.of(got["base"])
    for k in linears:
        want = ref.read(k, cpu)
        assert not torch.equal(want, b.read(k, cpu)), k
        for cap in ("resized", "merged"):
            close(ws.KeySource.of(got[cap]).read(k, cpu), want, f"{cap} {k}", rtol=1e-5)
    want = ws.KeySource.of(got["ref_clip"]).read(ck, cpu)
    assert not torch.equal(want, ws.KeySource.of(got["base_clip"]).read(ck, cpu))
    for cap in ("resized", "merged"):
        close(ws.KeySource.of(got[cap + "_clip"]).read(ck, cpu), want, f"{cap} {ck}", rtol=1e-5)
    if kind == "lora":
        path = os.path.join(folder_paths.get_output_directory(), got["path"])
        with safetensors.safe_open(path, "pt") as f:
            keys = set(f.keys())
            meta = f.metadata()
        assert sum(k.endswith(".dora_scale") for k in keys) == 3 and meta["ss_network_dim"] == "4"
        assert json.loads(meta["ss_network_args"]) == {"dora_wd": "True"}
        saved = harness.add_model_file("loras", path, name="dora_native_saved.safetensors")
        m2, _ = harness.nodes.LoraLoader().load_lora(got["base"], None, saved, 0.4, 0.0)
        again = ws.KeySource.of(m2)
        for k in linears:
            assert torch.equal(again.read(k, cpu), ref.read(k, cpu)), k
    # loaded against a model that is gone since: a clear error (the LORA keeps no model in memory)
    import gc
    lio = pack(harness, "engine.lora_io")
    gone = setup["base"].clone()
    lora = lio.lora_from_state_dict(safetensors.torch.load_file(folder_paths.get_full_path("loras", n)), gone)
    del gone
    gc.collect()
    with pytest.raises(Exception, match="no longer in memory: ComfyUI freed it"):
        lora.layers[linears[0]].delta()
    # stacked at 0.8: a file cannot hold that DoRA
    gs = {"m": small, "l": gr["l"],
          "s": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["l", 0], "strength_model": 0.8,
                                                              "strength_clip": 1.0}},
          "save": {"class_type": "MergeLab_SaveLoRA", "inputs": {"lora": ["s", 0], "filename_prefix": "loras/dora_s"}}}
    res = harness.run(harness.with_defaults(gs))
    assert not res.success and "Resize LoRA makes it a plain LoRA" in res.error_text(), res.error_text()


def test_unmatched_keys_reported_once_with_a_count(harness, setup):
    lio = pack(harness, "engine.lora_io")
    sd = lio.lora_state_dict(setup["lora"], "comfyui", torch.float32)   # every layer
    sd["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(4, 2)
    sd["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_te_no_such_layer.alpha"] = torch.tensor(2.0)
    name = write(harness, setup, "fmt_junk.safetensors", sd)
    import folder_paths
    path = folder_paths.get_full_path("loras", name)
    with capture_log() as msgs:
        lora = lio.load_lora_file(path, setup["base"], setup["clip"])
    assert set(lora.layers) == set(setup["lora"].layers)
    assert not any("lora key not loaded" in m for m in msgs)
    ours = [m for m in msgs if "match no layer" in m]
    assert len(ours) == 1 and f"3 of {len(sd)} tensors" in ours[0], msgs[-5:]
    # model only: the text-encoder part is reported (once) with the hint to connect the CLIP
    with capture_log() as msgs:
        lora = lio.load_lora_file(path, setup["base"], None)
    assert lora.clip_keys() == [] and lora.model_keys()
    ours = [m for m in msgs if "match no layer" in m]
    assert len(ours) == 1 and "connect the CLIP" in ours[0]


@pytest.mark.parametrize("parts", ["qkv_mlp", "gap_and_alphas"])
def test_split_flux_qkv_is_written_as_one_layer_of_the_fused_weight(harness, tmp_path, parts):
    """A diffusers Flux LoRA holds q/k/v (and a single block's proj_mlp) apart: slices of the fused
    img_attn.qkv / linear1.  Saved, each fused weight gets one layer under its own name (kohya:
    lora_unet_double_blocks_0_img_attn_qkv, as kohya's Flux files; comfyui: diffusion_model.…qkv), the
    slices' factors side by side; ComfyUI's LoraLoader gives the same weights as from the split file.
    Also with a slice missing (its rows stay zero) and slices of different alpha."""
    lio, weights = pack(harness, "engine.lora_io"), pack(harness, "engine.weights")
    base = fixtures.small_model("Flux")
    sd = base.model.state_dict()
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    lin1 = "diffusion_model.single_blocks.0.linear1.weight"
    hidden = sd[qkv].shape[1]
    g = torch.Generator().manual_seed(0)
    split = {}

    def layer(name, rows, rank, alpha=None):
        split[name + ".lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.1
        split[name + ".lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.1
        if alpha is not None:
            split[name + ".alpha"] = torch.tensor(float(alpha))

    wanted = ("to_q", "to_k", "to_v") if parts == "qkv_mlp" else ("to_q", "to_v")
    for i, p in enumerate(wanted):
        layer(f"transformer.transformer_blocks.0.attn.{p}", hidden, 4, None if parts == "qkv_mlp" else 2.0 * (i + 1))
    for p in ("to_q", "to_k", "to_v"):
        layer(f"transformer.single_transformer_blocks.0.attn.{p}", hidden, 2)
    layer("transformer.single_transformer_blocks.0.proj_mlp", sd[lin1].shape[0] - 3 * hidden, 2)
    src = tmp_path / f"split_{parts}.safetensors"
    safetensors.torch.save_file(split, str(src))
    name = harness.add_model_file("loras", str(src), name=src.name)
    lora = lio.load_lora_file(str(src), base, name="split")
    assert all(isinstance(k, tuple) for k in lora.layers) and set(lora.whole_shapes) == {qkv, lin1}

    def effective(file_name):
        with capture_log() as msgs:
            m, _ = harness.nodes.LoraLoader().load_lora(base, None, file_name, 1.0, 0.0)
        assert not [x for x in msgs if "lora key not loaded" in x or "NOT LOADED" in x]
        cpu = torch.device("cpu")
        return {k: weights.KeySource.of(m).read(k, cpu) - sd[k].float() for k in (qkv, lin1)}

    want = effective(name)
    assert all(float(d.abs().max()) > 0 for d in want.values())
    for fmt, prefix in (("kohya", "lora_unet_"), ("comfyui", "diffusion_model.")):
        tensors = lio.lora_state_dict(lora, fmt, torch.float32)
        for k, n_parts in ((qkv, len(wanted)), (lin1, 4)):
            stem = (lora.names[k] if fmt == "kohya" else k[:-len(".weight")])
            assert stem.startswith(prefix)
            up, down = tensors[stem + ".lora_up.weight"], tensors[stem + ".lora_down.weight"]
            assert up.shape[0] == sd[k].shape[0] and down.shape == (up.shape[1], hidden)
            assert up.shape[1] == (4 if k == qkv else 2) * n_parts
        assert lora.names[qkv] == "lora_unet_double_blocks_0_img_attn_qkv"
        assert len(tensors) == 2 * 3
        out = tmp_path / f"fused_{parts}_{fmt}.safetensors"
        safetensors.torch.save_file(tensors, str(out))
        got = effective(harness.add_model_file("loras", str(out), name=out.name))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    if parts == "gap_and_alphas":       # the k rows of qkv: nothing there
        assert float(want[qkv][hidden:2 * hidden].abs().max()) == 0.0


def test_joined_slices_keep_the_widest_dtype_of_their_parts(harness):
    """Slices of one weight in fp16 and fp32 (a stack of two LoRAs, say): the joined layer is not rounded to
    the first part's fp16, so an fp32 file holds exactly the sum of the slices' ΔW."""
    lm, lio = pack(harness, "engine.lora"), pack(harness, "engine.lora_io")
    g = torch.Generator().manual_seed(3)
    w = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    shape = (12, 8)
    parts = {}
    for i, dtype in enumerate((torch.float16, torch.float32)):
        up, down = torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g)
        parts[(w, (0, 4 * i, 4))] = lm.LoraLayer("lora", (4, 8), up=up.to(dtype), down=down.to(dtype), alpha=1.0)
    lora = lm.Lora.make(parts, {w: "lora_unet_double_blocks_0_img_attn_qkv"}, {}, {"name": "mixed"}, {w: shape})
    sd = lio.lora_state_dict(lora, "kohya", torch.float32)
    up, down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    alpha = float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"])
    got = (up @ down) * (alpha / up.shape[1])
    want = torch.zeros(shape)
    for (k, (_, start, size)), layer in parts.items():
        want[start:start + size] += layer.delta(dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key_format", ["comfyui", "kohya"])
def test_flux_diffusers_lora_on_norm_out_matches_comfyuis_loader(harness, setup, key_format):
    """A diffusers / ai-toolkit Flux LoRA that trains ``transformer.norm_out.linear``: ComfyUI maps it to
    ``final_layer.adaLN_modulation.1`` with a function that swaps the halves of its rows (diffusers orders
    them scale, shift).  Load LoRA crashed on that target (a TypeError); now Load then Apply gives
    LoraLoader's weights, and so does the saved file loaded back with LoraLoader."""
    import folder_paths
    model = fixtures.small_model("Flux")
    sd_model = model.model.state_dict()
    target = "diffusion_model.final_layer.adaLN_modulation.1.weight"
    other = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, key in (("transformer.norm_out.linear", target),
                      ("transformer.transformer_blocks.0.attn.to_out.0", other)):
        out_f, in_f = sd_model[key].shape
        lora[f"{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.1
        lora[f"{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
    n = write(harness, setup, f"fmt_flux_norm_out_{key_format}.safetensors", lora)
    m = {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": "Flux", "seed": 0, "delta_seed": 0,
                                                             "delta_scale": 0.0, "dtype": "fp32"}}
    graph = {"m": m,
             "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "lora_name": n}},
             "a": {"class_type": "MergeLab_ApplyLoRA", "inputs": {"model": ["m", 0], "lora": ["l", 0],
                                                                 "strength_model": 0.7}},
             "ref": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": n,
                                                                     "strength_model": 0.7}},
             "save": {"class_type": "MergeLab_SaveLoRA",
                      "inputs": {"lora": ["l", 0], "filename_prefix": f"loras/flux_norm_out_{key_format}",
                                 "key_format": key_format, "dtype": "fp32"}},
             "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["a", 0], "name": "ours"}},
             "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["ref", 0], "name": "comfy"}},
             "c3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["m", 0], "name": "base"}},
             "c4": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["save", 0], "name": "path"}}}
    got = harness.run_ok(harness.with_defaults(graph)).captured
    saved = harness.add_model_file("loras", os.path.join(harness.output_dir, got["path"]),
                                   name=os.path.basename(got["path"]))
    assert folder_paths.get_full_path("loras", saved)
    reloaded = harness.nodes.LoraLoaderModelOnly().load_lora_model_only(got["base"], saved, 0.7)[0]
    ws = pack(harness, "engine.weights")
    cpu = torch.device("cpu")
    comfy, base = ws.KeySource.of(got["comfy"]), ws.KeySource.of(got["base"])
    for k in (target, other):
        want = comfy.read(k, cpu)
        assert not torch.equal(want, base.read(k, cpu)), k
        close(ws.KeySource.of(got["ours"]).read(k, cpu), want, k, rtol=1e-6)
        close(ws.KeySource.of(reloaded).read(k, cpu), want, k, rtol=1e-6)


def test_flux_control_lora_stacks_at_any_strength_like_comfyuis_loader(harness, setup):
    """A BFL Flux Control LoRA (canny / depth): its img_in layer pads the weight to a wider input (ComfyUI's
    reshape_weight) and its norm scales replace weights (set_weight).  LoRA Stack at 0.7 turned the padding
    layer into a difference of the padded shape, which Apply then refused as 'made for another
    architecture'; it is now kept as a patch at its strength, and Apply gives LoraLoader's weights."""
    g = torch.Generator().manual_seed(5)
    model = fixtures.small_model("Flux")
    hidden, in_ch = model.model.state_dict()["diffusion_model.img_in.weight"].shape
    scale_len = model.model.state_dict()["diffusion_model.single_blocks.0.norm.key_norm.scale"].shape[0]
    sd = {"img_in.lora_A.weight": torch.randn(4, 2 * in_ch, generator=g) * 0.1,
          "img_in.lora_B.weight": torch.randn(hidden, 4, generator=g) * 0.1,
          "img_in.lora_B.bias": torch.randn(hidden, generator=g) * 0.1,
          "single_blocks.0.norm.key_norm.scale": torch.rand(scale_len, generator=g) + 0.5}
    n = write(harness, setup, "fmt_flux_control.safetensors", sd)
    m = {"class_type": "MergeLabTest_SmallModel", "inputs": {"arch": "Flux", "seed": 0, "delta_seed": 0,
                                                             "delta_scale": 0.0, "dtype": "fp32"}}
    graph = {"m": m,
             "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "lora_name": n}},
             "s": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["l", 0], "strength_model": 0.7,
                                                                 "strength_clip": 1.0}},
             "a": {"class_type": "MergeLab_ApplyLoRA", "inputs": {"model": ["m", 0], "lora": ["s", 0],
                                                                 "strength_model": 1.0}},
             "ref": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": n,
                                                                     "strength_model": 0.7}},
             "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["a", 0], "name": "ours"}},
             "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["ref", 0], "name": "comfy"}}}
    got = harness.run_ok(harness.with_defaults(graph)).captured
    ws = pack(harness, "engine.weights")
    cpu = torch.device("cpu")
    for k in ("diffusion_model.img_in.weight", "diffusion_model.img_in.bias",
              "diffusion_model.single_blocks.0.norm.key_norm.scale"):
        want = ws.KeySource.of(got["comfy"]).read(k, cpu)
        mine = ws.KeySource.of(got["ours"]).read(k, cpu)
        assert mine.shape == want.shape, k
        close(mine, want, k, rtol=1e-6)
    assert ws.KeySource.of(got["comfy"]).read("diffusion_model.img_in.weight", cpu).shape == (hidden, 2 * in_ch)

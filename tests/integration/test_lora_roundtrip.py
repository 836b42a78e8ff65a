"""Extract a difference LoRA through the executor, save it, load it with ComfyUI's own LoraLoader onto the
base, and check every layer against the tuned model and the Eckart–Young optimum."""
import importlib
import logging
import math
import os

import pytest
import torch

from mergelab import fixtures


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


class LowRankDeltaNode:
    """Test node: ``tuned = base + ΔW`` as ComfyUI ``diff`` patches on clones, ΔW per ≥2-D weight a sum of
    ``true_rank`` terms with singular values ``scale·(i+1)^-decay`` plus ``noise·scale`` Gaussian noise
    (low-rank-ish), seeded per key; biases and norms get a small random difference when ``biases``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "seed": ("INT", {"default": 1, "min": 0, "max": 2**31}),
                             "true_rank": ("INT", {"default": 12, "min": 1, "max": 512}),
                             "decay": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 10.0}),
                             "noise": ("FLOAT", {"default": 0.02, "min": 0.0, "max": 10.0, "step": 0.001}),
                             "scale": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 10.0, "step": 0.001}),
                             "biases": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, clip, seed, true_rank, decay, noise, scale, biases):
        with one_thread():
            return (with_delta(model, seed, true_rank, decay, noise, scale, biases, unet=True),
                    with_delta(clip, seed, true_rank, decay, noise, scale, biases, unet=False))


class one_thread:
    """The test's own small-tensor math single-threaded (fast on shared 2-core machines)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def delta_for(key, shape, seed, true_rank, decay, noise, scale):
    g = torch.Generator().manual_seed((hash_key(key) * 1000003 + seed) & (2**62 - 1))
    if len(shape) < 2:
        return torch.randn(shape, generator=g) * (scale * 0.1)
    m = shape[0]
    n = math.prod(shape[1:])
    r = min(true_rank, m, n)
    # Gaussian factors: nearly orthogonal columns, so the spectrum is about s (no QR: fast)
    u = torch.randn(m, r, generator=g) / math.sqrt(m)
    v = torch.randn(n, r, generator=g) / math.sqrt(n)
    s = scale * torch.arange(1, r + 1, dtype=torch.float32) ** (-decay)
    d = (u * s) @ v.t() + torch.randn(m, n, generator=g) * (noise * scale / math.sqrt(max(m, n)))
    return d.reshape(shape)


def hash_key(key):
    import hashlib
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "little")


def with_delta(obj, seed, true_rank, decay, noise, scale, biases, unet):
    out = obj.clone()
    patcher = out if unet else out.patcher
    sd = patcher.model.state_dict()
    patches = {}
    for k, t in sd.items():
        if unet and not k.startswith("diffusion_model."):
            continue
        if not t.is_floating_point() or k.endswith((".position_ids", ".logit_scale")) or t.dim() == 0:
            continue
        if t.dim() < 2 and not biases:
            continue
        patches[k] = ("diff", (delta_for(k, tuple(t.shape), seed, true_rank, decay, noise, scale),))
    out.add_patches(patches, 1.0)
    return out


@pytest.fixture(scope="module", autouse=True)
def _nodes(harness):
    harness.register_test_node("MergeLabTest_LowRankDelta", LowRankDeltaNode)


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def comfy_load(harness, model, clip, lora_name):
    """ComfyUI's own LoraLoader; returns (model, clip, ComfyUI's 'not loaded' messages)."""
    cap = LogCapture()
    root = logging.getLogger()
    root.addHandler(cap)
    try:
        m, c = harness.nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 1.0)
    finally:
        root.removeHandler(cap)
    bad = [x for x in cap.messages if "lora key not loaded" in x or "NOT LOADED" in x]
    return m, c, bad


def extract_graph(arch, rank, dtype="fp32", key_format="kohya", delta=None, extract=None, prefix=None):
    delta = dict(delta or {})
    g = {
        "base": {"class_type": "MergeLabTest_SmallModel",
                 "inputs": {"arch": arch, "seed": 0, "delta_seed": 0, "delta_scale": 0.0, "dtype": "fp32"}},
        "tuned": {"class_type": "MergeLabTest_LowRankDelta",
                  "inputs": {"model": ["base", 0], "clip": ["base", 1], "seed": 1, "true_rank": 12, "decay": 0.7,
                             "noise": 0.02, "scale": 0.05, "biases": False, **delta}},
        "extract": {"class_type": "MergeLab_ExtractLoRA",
                    "inputs": {"tuned_model": ["tuned", 0], "base_model": ["base", 0], "tuned_clip": ["tuned", 1],
                               "base_clip": ["base", 1], "rank_mode": "fixed", "rank": rank, "rank_param": 0.9,
                               "svd": "randomized", "oversample": 16, "power_iterations": 2, "seed": 0,
                               "clamp_quantile": 1.0, "bias_diff": False, "conv": True, "min_diff": 1e-6,
                               "device": "auto", **(extract or {})}},
        "save": {"class_type": "MergeLab_SaveLoRA",
                 "inputs": {"lora": ["extract", 0], "filename_prefix": prefix or f"loras/rt_{arch}_{key_format}_{dtype}",
                            "key_format": key_format, "dtype": dtype}},
        "cap_path": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["save", 0], "name": "path"}},
        "cap_lora": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["extract", 0], "name": "lora"}},
        "cap_report": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["extract", 1], "name": "report"}},
        "cap_a": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["base", 0], "name": "A"}},
        "cap_ac": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["base", 1], "name": "Ac"}},
        "cap_b": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["tuned", 0], "name": "B"}},
        "cap_bc": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["tuned", 1], "name": "Bc"}},
    }
    return g


def run_extract(harness, arch, rank, **kw):
    res = harness.run_ok(extract_graph(arch, rank, **kw))
    path = os.path.join(harness.output_dir, res.captured["path"])
    assert os.path.isfile(path)
    name = harness.add_model_file("loras", path, name=os.path.basename(path))
    captured = dict(res.captured)
    captured["save_text"] = "\n".join(res.outputs.get("save", {}).get("text", []))   # what Save LoRA shows
    return captured, path, name


@torch.no_grad()
def check_layers(harness, pairs, rank, slack=1e-5, absent=()):
    """Per layer: ‖(A+LoRA) − B‖ / ‖B − A‖ ≤ 1.02 × the optimum rank-r error (+ slack); the keys in
    ``absent`` (layers the file leaves out) keep A."""
    with one_thread():
        return _check_layers(harness, pairs, rank, slack, set(absent))


def _check_layers(harness, pairs, rank, slack, absent=frozenset()):
    ws = pack(harness, "engine.weights")
    svd = pack(harness, "engine.lora_svd")
    cpu = torch.device("cpu")
    n = 0
    worst = 0.0
    for loaded, tuned, base in pairs:
        ls, ts, bs = ws.KeySource.of(loaded), ws.KeySource.of(tuned), ws.KeySource.of(base)
        for key in bs.keys():
            b = bs.read(key, cpu)
            d = ts.read(key, cpu) - b
            if float(d.abs().max()) == 0.0 or key in absent:
                assert torch.equal(ls.read(key, cpu), b), key
                continue
            got = ls.read(key, cpu) - b
            err = float(torch.linalg.norm(got - d) / torch.linalg.norm(d))
            if d.dim() >= 2:
                r = min(rank, d.shape[0], d[0].numel())
                opt = svd.optimal_rank_error(d, r)
                assert err <= 1.02 * opt + slack, (key, err, opt)
                worst = max(worst, err / opt if opt > 1e-6 else 1.0)
            else:
                assert err <= 1e-6 + slack, (key, err)
            n += 1
    assert n > 0
    return n, worst


@pytest.mark.parametrize("arch", ["SD15", "SDXL", "Flux"])
def test_extract_save_comfy_loraloader_roundtrip(harness, arch):
    cap, path, name = run_extract(harness, arch, rank=4, dtype="fp32")
    lora = cap["lora"]
    report = cap["report"]
    assert "relative Frobenius error" in report and "lora" in report
    m, c, bad = comfy_load(harness, cap["A"], cap["Ac"], name)
    assert bad == [], bad[:5]
    # a kohya file leaves out what has no kohya name: here, the text encoders' embedding tables
    left_out = pack(harness, "engine.lora_io").kohya_unnamed(lora)
    assert left_out and all(".embeddings." in k or k.endswith("shared.weight") for k in left_out), left_out
    assert f"{len(left_out)} layer(s) have no kohya name" in cap["save_text"]
    n, worst = check_layers(harness, [(m, cap["B"], cap["A"]), (c, cap["Bc"], cap["Ac"])], rank=4, absent=left_out)
    assert n == len(lora.layers) - len(left_out)

    # the file: kohya names, an alpha per layer, kohya metadata and the recipe
    import safetensors
    with safetensors.safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    ups = [k for k in keys if k.endswith(".lora_up.weight")]
    assert len(ups) == len(lora.layers) - len(left_out)
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)      # what diffusers asks of a kohya file
    assert all(k[:-len(".lora_up.weight")] + ".alpha" in keys for k in ups)
    unet = [k for k in ups if k.startswith("lora_unet_")]
    assert len(unet) == len(lora.model_keys())
    assert not any(k.startswith("diffusion_model.") for k in keys)
    if arch == "SD15":   # kohya's SD1 naming: diffusers module paths, lora_te_
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert meta["ss_base_model_version"] == "sd_v1"
    elif arch == "SDXL":  # its own module paths, lora_te1_ / lora_te2_
        assert "lora_unet_input_blocks_4_1_proj_in.lora_up.weight" in keys
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    else:                 # Flux: lora_unet_<ComfyUI path>, CLIP-L as lora_te1_, T5 as lora_te3_ (kohya)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert any(k.startswith("lora_te3_encoder_block_0_") for k in keys)
        assert meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert meta["ss_network_module"] == "networks.lora"
    import json
    rec = json.loads(meta["mergelab.recipe"])
    text = json.dumps(rec)
    assert '"extract"' in text and '"rank": 4' in text


def test_kohya_metadata_takes_the_linear_alpha(harness):
    """kohya's ss_network_dim / ss_network_alpha are the linear layers' rank and alpha; conv layers' go into
    ss_network_args (conv_dim / conv_alpha).  A LoRA with linear rank 8 / alpha 8 and conv rank 4 / alpha 1
    is not "Dynamic"; a LoRA of conv layers only takes their values."""
    import json
    lora_mod = pack(harness, "engine.lora")
    lio = pack(harness, "engine.lora_io")
    g = torch.Generator().manual_seed(0)
    L = lora_mod.LoraLayer

    def lin(r, a):
        return L.from_factors((32, 32), torch.randn(32, r, generator=g), torch.randn(r, 32, generator=g), alpha=a)

    def conv(r, a):
        return L.from_factors((64, 64, 3, 3), torch.randn(64, r, generator=g), torch.randn(r, 64 * 9, generator=g),
                              alpha=a)

    arch = {"model": "BaseModel:SD15", "model_config": "SD15"}
    both = lora_mod.Lora.make({"diffusion_model.a.weight": lin(8, 8.0), "diffusion_model.b.weight": lin(8, 8.0),
                               "diffusion_model.c.weight": conv(4, 1.0)}, {}, arch, {"name": "both"})
    meta = lio.lora_metadata(both, "kohya", "fp16")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}
    only_conv = lora_mod.Lora.make({"diffusion_model.c.weight": conv(4, 2.0)}, {}, arch, {"name": "conv"})
    meta = lio.lora_metadata(only_conv, "kohya", "fp16")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")


def test_fp16_file_roundtrip_and_comfyui_names(harness):
    """fp16 factors add only fp16 rounding; ComfyUI-native names load the same."""
    cap, path, name = run_extract(harness, "SD15", rank=6, dtype="fp16", key_format="comfyui",
                                  extract={"bias_diff": True}, delta={"biases": True})
    m, c, bad = comfy_load(harness, cap["A"], cap["Ac"], name)
    assert bad == []
    check_layers(harness, [(m, cap["B"], cap["A"]), (c, cap["Bc"], cap["Ac"])], rank=6, slack=3e-3)
    import safetensors
    with safetensors.safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype in (torch.float16, torch.float32)
    assert any(k.startswith("diffusion_model.") and k.endswith(".lora_up.weight") for k in keys)
    assert any(k.startswith("text_encoders.") for k in keys)
    assert any(k.endswith(".diff_b") for k in keys) and any(k.endswith(".diff") for k in keys)


def test_randomized_is_deterministic_and_near_full_svd(harness):
    ops = pack(harness, "engine.lora_ops")
    svd = pack(harness, "engine.lora_svd")
    base = fixtures.small_model("SD15")
    tuned = with_delta(base, 3, 24, 0.5, 0.05, 0.05, False, unet=True)
    opts = ops.ExtractOptions(rank=svd.RankSpec("fixed", 8), svd=svd.SVDOptions("randomized", 4, 1), seed=5)
    l1, _ = ops.extract_lora(tuned, base, opts=opts)
    l2, _ = ops.extract_lora(tuned, base, opts=opts)
    assert l1.layers.keys() == l2.layers.keys()
    for k in l1.layers:
        assert torch.equal(l1.layers[k].up, l2.layers[k].up) and torch.equal(l1.layers[k].down, l2.layers[k].down)
    full = ops.ExtractOptions(rank=svd.RankSpec("fixed", 8), svd=svd.SVDOptions("full"))
    lf, rep = ops.extract_lora(tuned, base, opts=full)
    # the full SVD reaches the optimum exactly
    ws = pack(harness, "engine.weights")
    cpu = torch.device("cpu")
    bs, ts = ws.KeySource.of(base), ws.KeySource.of(tuned)
    for k, layer in list(lf.layers.items())[::7]:
        d = ts.read(k, cpu) - bs.read(k, cpu)
        err = float(torch.linalg.norm(layer.delta() - d) / torch.linalg.norm(d))
        opt = svd.optimal_rank_error(d, min(8, d.shape[0], d[0].numel()))
        assert err == pytest.approx(opt, rel=1e-3, abs=1e-6), k


def test_dynamic_rank_modes(harness):
    """sv_fro keeps the asked energy per layer; the report shows the chosen ranks."""
    ops = pack(harness, "engine.lora_ops")
    svd = pack(harness, "engine.lora_svd")
    base = fixtures.small_model("SD15")
    tuned = with_delta(base, 4, 16, 1.0, 0.0, 0.05, False, unet=True)
    for mode, param in (("sv_fro", 0.95), ("sv_ratio", 6.0), ("sv_cumulative", 0.8)):
        opts = ops.ExtractOptions(rank=svd.RankSpec(mode, 16, param))
        lora, rep = ops.extract_lora(tuned, base, opts=opts)
        ranks = {l.rank for l in lora.layers.values()}
        assert max(ranks) <= 16 and min(ranks) >= 1
        assert len(ranks) > 1 or mode != "sv_fro", (mode, ranks)
        if mode == "sv_fro":   # every layer keeps ≥ 95 % of its Frobenius norm
            errs = [float(x.split("|")[4]) for x in rep.splitlines() if x.count("|") == 5 and "| lora |" in x]
            assert errs and max(errs) <= math.sqrt(1 - 0.95 ** 2) + 1e-4


def test_save_lora_recipe_names_its_file_and_respects_disable_metadata(harness, monkeypatch):
    """The recipe in a saved LoRA names the file written (it named the prefix), and Load Merge Recipe's
    text says how the LoRA was made; under --disable-metadata the recipe keeps its structure (format,
    saved, parts) without the graph (it was the bare LoRA record, which the text could not show)."""
    import json
    import safetensors
    from comfy.cli_args import args
    recipe = pack(harness, "engine.recipe")
    for disabled in (False, True):
        monkeypatch.setattr(args, "disable_metadata", disabled)
        cap, path, _ = run_extract(harness, "SD15", 4, prefix=f"loras/named_{int(disabled)}")
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata()
        rec = json.loads(meta["mergelab.recipe"])
        assert rec["saved"]["file"] == cap["path"] and cap["path"].endswith("_00001_.safetensors")
        assert rec["parts"]["lora"]["kind"] == "extract"
        assert ("graph" in rec) is not disabled
        text = recipe.describe(rec, meta)
        assert "extract" in text and "rank" in text
        # ComfyUI's prompt, as Save Checkpoint writes it: the runner makes the same LoRA again from the file
        assert ("prompt" in meta) is not disabled
        if not disabled:
            from safetensors.torch import load_file
            from mergelab.run import execute_workflow
            again = execute_workflow(path, [], harness, quiet=True)
            assert again.code == 0, again.error
            made = [p for p in again.written if p.endswith(".safetensors") and "named_0" in p]
            assert len(made) == 1 and made[0] != path, again.written
            first, second = load_file(path), load_file(made[0])
            assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_stacked_lora_saved_in_fp16_keeps_fp16_accuracy(harness):
    """Stack (and Merge LoRAs) fold alpha / rank and the strength into the up factor: an fp16 LoRA of rank
    128 and alpha 1 at strength 0.5 had up values near 1e-5, which fp16 holds as subnormals, and its fp16
    file came back 4.5e-3 off (fp16 rounds to 4.9e-4).  Such factors are now balanced per rank component
    before the fp16 cast (the same product); factors already in fp16 are written bit for bit."""
    lora_mod = pack(harness, "engine.lora")
    lio = pack(harness, "engine.lora_io")
    model = fixtures.small_model("SD15")
    sd = model.model.state_dict()
    keys = [k for k, v in sd.items() if k.startswith("diffusion_model.") and v.ndim == 2 and min(v.shape) >= 64][:6]
    g = torch.Generator().manual_seed(0)
    file = {}
    for k in keys:
        name = k[:-len(".weight")]
        o, i = sd[k].shape
        file[name + ".lora_up.weight"] = (torch.randn(o, 128, generator=g) * 1e-3).half()
        file[name + ".lora_down.weight"] = (torch.randn(128, i, generator=g) / math.sqrt(i)).half()
        file[name + ".alpha"] = torch.tensor(1.0)
    src = lio.lora_from_state_dict(file, model, name="fp16src")
    stacked = lora_mod.stack_loras([(src, 0.5, 1.0)])
    for lora, bound in ((stacked, 2.0 ** -11), (src, 0.0)):
        out = lio.lora_state_dict(lora, "comfyui", torch.float16)
        back = lio.lora_from_state_dict(out, model, name="back")
        for k in keys:
            want, got = lora.layers[k].delta(), back.layers[k].delta()
            err = float((got - want).norm() / want.norm())
            assert err <= bound, (k, err)
    out = lio.lora_state_dict(src, "comfyui", torch.float16)
    for name, t in file.items():
        assert torch.equal(out[name].to(t.dtype), t), name       # an fp16 LoRA re-saved as it was


def test_save_lora_refuses_values_beyond_fp16(harness):
    """A difference of 1e5 saved as fp16 was written as inf (the save succeeded), as Save Model's was."""
    lora_mod = pack(harness, "engine.lora")
    lio = pack(harness, "engine.lora_io")
    model = fixtures.small_model("SD15")
    key = next(k for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.") and v.ndim == 2)
    shape = model.model.state_dict()[key].shape
    big = lio.lora_from_state_dict({key[:-len(".weight")] + ".diff": torch.full(shape, 1.0e5)}, model, name="big")
    with pytest.raises(lora_mod.LoraError, match=r"does not fit fp16 \(largest \|value\| .* 100000"):
        lio.lora_state_dict(big, "comfyui", torch.float16)
    assert float(lio.lora_state_dict(big, "comfyui", torch.bfloat16)[key[:-len(".weight")] + ".diff"].max()) > 9e4

"""Normalize Model: the query/key detection on every architecture ComfyUI supports, the function-preserving
``attn_only`` rescale on ComfyUI's own attention classes and on small SD1.5 / Flux models, mode ``all``,
the node through the executor, and bad input."""
import copy
import importlib
import math

import pytest
import torch

from mergelab import fixtures
from mergelab.harness import api_node


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


@pytest.fixture(scope="module")
def N(harness):
    return pack(harness, "engine.normalize")


def _ops():
    import comfy.ops
    return comfy.ops.disable_weight_init


def _settings():
    return {"operations": _ops(), "device": None, "dtype": None}


# -- detection on every architecture -------------------------------------------------------------------
QK_NAMES = ("to_q", "to_k", "q_proj", "k_proj", "q", "k", "k_img", "qkv", "Wqkv", "to_qkv", "qkv_x", "qkv_y",
            "to_kv", "kv_proj", "kv_linear", "q_linear", "w1q", "w1k", "w2q", "w2k", "to_q_t", "to_k_t",
            "add_q_proj", "add_k_proj", "linear_q", "linear_k", "linear1_q", "linear1_kv")


def test_attention_found_in_every_architecture(harness, N):
    """Every query/key projection of every architecture is found, paired and split consistently."""
    summary = {}
    for arch in fixtures.ARCHITECTURES:
        shapes = fixtures.meta_unet_shapes(arch)
        plan = N.find_attention(shapes)
        assert plan.groups, arch
        assert not plan.unpaired, (arch, plan.unpaired[:3])
        assert not plan.problems, (arch, plan.problems[:3])
        covered = {p.weight for g in plan.groups for p in g.parts}
        for key, shape in shapes.items():
            mod, _, param = key.rpartition(".")
            parts = mod.split(".")
            name = parts[-2] if parts[-1] == "0" and len(shape) > 1 else parts[-1]
            if param == "weight" and len(shape) >= 2 and name in QK_NAMES:
                assert key in covered, (arch, key)
        for g in plan.groups:
            q = sum(p.length for p in g.parts if p.role == "q" and p.weight.endswith("weight"))
            k = sum(p.length for p in g.parts if p.role == "k" and p.weight.endswith("weight"))
            assert q > 0 and k > 0, (arch, g.name)
            for p in g.parts:
                if not p.full:   # fused rows lie inside the tensor and q/k never overlap
                    assert 0 <= p.start and p.start + p.length <= shapes[p.weight][0]
            fused = {}
            for p in g.parts:
                if not p.full:
                    fused.setdefault(p.weight, []).append((p.start, p.start + p.length))
            for spans in fused.values():
                spans.sort()
                assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (arch, g.name, spans)
        summary[arch] = len(plan.groups)
    # hand-checked counts and layouts
    assert summary["SD15"] == 32 and summary["SDXL"] == 140            # attn1 + attn2 of 16 / 70 transformer blocks
    assert summary["Flux"] == 19 + 38 and summary["SD3"] == 24 and summary["SD35_Medium"] == 24 + 13
    flux = N.find_attention(fixtures.meta_unet_shapes("Flux"))
    double = flux.groups[0]
    assert sorted((p.weight.split(".")[-3], p.role, p.start, p.length, p.bias is not None)
                  for p in double.parts) == [
        ("img_attn", "k", 3072, 3072, True), ("img_attn", "q", 0, 3072, True),
        ("txt_attn", "k", 3072, 3072, True), ("txt_attn", "q", 0, 3072, True)]   # both streams: one joint attention
    single = flux.groups[-1]
    assert {(p.role, p.start, p.length) for p in single.parts} == {("q", 0, 3072), ("k", 3072, 3072)}
    lumina = N.find_attention(fixtures.meta_unet_shapes("Lumina2")).groups[0]   # GQA: 24 query, 8 kv heads
    assert {(p.role, p.start, p.length) for p in lumina.parts} == {("q", 0, 2304), ("k", 2304, 768)}
    wan_i2v = N.find_attention(fixtures.meta_unet_shapes("WAN21_I2V"))
    cross = [g for g in wan_i2v.groups if g.name.endswith("cross_attn")][0]
    assert {p.weight.split(".")[-2] for p in cross.parts if p.role == "k"} == {"k", "k_img"}


# -- function preservation on ComfyUI's attention classes ------------------------------------------------
def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
    return module


def _scaled_reference(N, sd, plan, q_factor, k_factor):
    """Model B = A with every query part times q_factor and every key part times k_factor."""
    out = {k: v.clone() for k, v in sd.items()}
    for g in plan.groups:
        for p in g.parts:
            for key in (p.weight, p.bias):
                if key:
                    f = q_factor if p.role == "q" else k_factor
                    if p.full:
                        out[key] = sd[key] * f
                    else:
                        out[key].narrow(0, p.start, p.length).copy_(sd[key].narrow(0, p.start, p.length) * f)
    return out


def _apply(sd, changes):
    out = {k: v.clone() for k, v in sd.items()}
    for c in changes:
        if c.full:
            out[c.key] = c.tensor.clone()
        else:
            out[c.key].narrow(0, c.start, c.length).copy_(c.tensor)
    return out


def _pooled(sd, group, role):
    sq = 0.0
    for p in group.parts:
        if p.role != role:
            continue
        for key in (p.weight, p.bias):
            if key:
                t = sd[key] if p.full else sd[key].narrow(0, p.start, p.length)
                sq += float(t.double().pow(2).sum())
    return math.sqrt(sq)


def _check_preserved(N, module, run, ref_seed=None, q_factor=3.0, k_factor=0.5, tol=2e-5):
    """Normalize ``module`` (A) towards B, reload it, compare outputs; check the norms."""
    sd_a = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
    shapes = {k: tuple(v.shape) for k, v in sd_a.items()}
    plan = N.find_attention(shapes)
    assert plan.groups and not plan.unpaired
    if ref_seed is None:
        sd_b = _scaled_reference(N, sd_a, plan, q_factor, k_factor)
    else:
        sd_b = {k: v.detach().clone() for k, v in _randomize(copy.deepcopy(module), ref_seed).state_dict().items()
                if v.is_floating_point()}
    changes, report = N.normalize_tensors(shapes, lambda k: sd_a[k].clone(), lambda k: sd_b[k].clone(),
                                          "attn_only")
    sd_n = _apply(sd_a, changes)
    changed = {c.key for c in changes}
    for k in sd_a:                       # nothing but query/key projections changes
        if k not in changed:
            assert torch.equal(sd_n[k], sd_a[k]), k
    normalized = copy.deepcopy(module)
    normalized.load_state_dict(sd_n, strict=False)
    with torch.no_grad():
        out_a, out_n = run(module), run(normalized)
    scale = max(float(out_a.abs().max()), 1e-6)
    assert float((out_a - out_n).abs().max()) <= tol * scale, float((out_a - out_n).abs().max()) / scale
    for g, (name, s) in zip(plan.groups, report.factors):
        assert name == g.name
        if ref_seed is None:
            assert s == pytest.approx(math.sqrt(q_factor / k_factor), rel=1e-6)
        # A's query/key balance becomes B's; the product of the norms is unchanged
        ratio_n = _pooled(sd_n, g, "q") / _pooled(sd_n, g, "k")
        assert ratio_n == pytest.approx(_pooled(sd_b, g, "q") / _pooled(sd_b, g, "k"), rel=1e-5)
        assert _pooled(sd_n, g, "q") * _pooled(sd_n, g, "k") == pytest.approx(
            _pooled(sd_a, g, "q") * _pooled(sd_a, g, "k"), rel=1e-5)
        assert _pooled(sd_n, g, "q") != pytest.approx(_pooled(sd_a, g, "q"), rel=1e-3)   # Q really changed
    return report


def _cases():
    """(name, build module, run module) with ComfyUI's own classes; small sizes, no QK norm where the class
    allows it (so the preservation is not trivially enforced by a normalization)."""
    torch.manual_seed(0)

    def sd_cross():
        from comfy.ldm.modules.attention import CrossAttention
        m = CrossAttention(query_dim=32, context_dim=24, heads=4, dim_head=8, operations=_ops())
        x, c = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
        return m, lambda mod: mod(x, context=c)

    def sd_self():
        from comfy.ldm.modules.attention import CrossAttention
        m = CrossAttention(query_dim=32, heads=2, dim_head=16, operations=_ops())
        x = torch.randn(1, 12, 32)
        return m, lambda mod: mod(x)

    def sd3_joint():
        from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
        m = JointBlock(hidden_size=32, num_heads=4, mlp_ratio=2.0, qkv_bias=True, pre_only=False,
                       operations=_ops())
        ctx, x, c = torch.randn(1, 5, 32), torch.randn(1, 9, 32), torch.randn(1, 32)
        return m, lambda mod: torch.cat([t.reshape(-1) for t in mod(ctx, x, c=c)])

    def lumina_gqa():
        from comfy.ldm.flux.math import rope
        from comfy.ldm.lumina.model import JointAttention
        m = JointAttention(dim=32, n_heads=4, n_kv_heads=2, qk_norm=False, out_bias=False,
                           operation_settings=_settings())
        x = torch.randn(1, 6, 32)
        freqs = rope(torch.arange(6, dtype=torch.float32).unsqueeze(0), 8, 10000).unsqueeze(2)
        return m, lambda mod: mod(x, None, freqs)

    def wan_i2v_cross():
        from comfy.ldm.wan.model import WanI2VCrossAttention
        m = WanI2VCrossAttention(dim=32, num_heads=4, qk_norm=False, operation_settings=_settings())
        x, ctx = torch.randn(1, 8, 32), torch.randn(1, 11, 32)
        return m, lambda mod: mod(x, ctx, context_img_len=4)

    def hydit_cross():
        from comfy.ldm.hydit.attn_layers import CrossAttention
        m = CrossAttention(qdim=32, kdim=24, num_heads=4, qkv_bias=True, operations=_ops())
        x, y = torch.randn(1, 8, 32), torch.randn(1, 5, 24)
        return m, lambda mod: mod(x, y)[0]

    def mochi_joint():
        from comfy.ldm.genmo.joint_model.asymm_models_joint import AsymmetricAttention
        m = AsymmetricAttention(dim_x=32, dim_y=16, num_heads=4, qkv_bias=True, qk_norm=True,   # (required)
                                operations=_ops())
        x, y = torch.randn(1, 6, 32), torch.randn(1, 4, 16)
        sx, sy = torch.randn(1, 32) * 0.1, torch.randn(1, 16) * 0.1
        cos, sin = torch.ones(6, 4, 4), torch.zeros(6, 4, 4)
        return m, lambda mod: torch.cat([t.reshape(-1) for t in mod(x, y, sx, sy, 4, rope_cos=cos, rope_sin=sin)])

    def ace_relpos():
        from comfy.ldm.ace.lyric_encoder import RelPositionMultiHeadedAttention
        m = RelPositionMultiHeadedAttention(4, 32, 0.0, operations=_ops())
        x, pos = torch.randn(1, 6, 32), torch.randn(1, 11, 32)
        mask = torch.ones(1, 6, 6, dtype=torch.bool)
        return m, lambda mod: mod(x, x, x, mask, pos)[0]

    def audio_cross():
        from comfy.ldm.audio.dit import Attention
        m = Attention(dim=32, dim_heads=8, dim_context=16, causal=False, operations=_ops())
        x, ctx = torch.randn(1, 7, 32), torch.randn(1, 5, 16)
        return m, lambda mod: mod(x, context=ctx)

    return [("sd_cross", sd_cross), ("sd_self", sd_self), ("sd3_joint", sd3_joint), ("lumina_gqa", lumina_gqa),
            ("wan_i2v_cross", wan_i2v_cross), ("hydit_cross", hydit_cross), ("mochi_joint", mochi_joint),
            ("ace_relpos", ace_relpos), ("audio_cross", audio_cross)]


@pytest.mark.parametrize("case", [c[0] for c in _cases()])
def test_attn_only_preserves_comfyui_attention_outputs(harness, N, case):
    build = dict(_cases())[case]
    torch.manual_seed(1)
    module, run = build()
    _randomize(module.eval(), 3)
    _check_preserved(N, module, run)                 # B = A with Q x3, K x0.5: s = sqrt(6) everywhere
    _check_preserved(N, module, run, ref_seed=4)     # B = an unrelated model: A gets B's |Q|/|K|


# -- whole small models: SD1.5 UNet and Flux ------------------------------------------------------------
def _effective_module(harness, patcher):
    """A copy of the patcher's diffusion model carrying its effective (patched) weights."""
    W = pack(harness, "engine.weights")
    src = W.KeySource.of(patcher)
    module = copy.deepcopy(patcher.model.diffusion_model)
    sd = {k[len("diffusion_model."):]: src.read(k, torch.device("cpu")) for k in src.keys()}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    assert not unexpected
    return module.eval()


def _forward(arch, module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if arch == "SD15":
            x = torch.randn(1, 4, 16, 16, generator=g)
            return module(x, timesteps=torch.tensor([500.0]), context=torch.randn(1, 6, 32, generator=g))
        x = torch.randn(1, 16, 8, 8, generator=g)
        return module(x, torch.tensor([0.5]), torch.randn(1, 5, 32, generator=g), y=torch.randn(1, 32, generator=g),
                      guidance=torch.tensor([3.5]))


def _scaled_patcher(N, model, q_factor, k_factor):
    """Model B: a ComfyUI clone of ``model`` whose query/key rows are scaled through ``set`` patches."""
    W_src = {}
    b = model.clone()
    sd = {k: v for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    plan = N.find_attention({k: tuple(v.shape) for k, v in sd.items()})
    new = _scaled_reference(N, {k: sd[k].float() for k in {k for g in plan.groups for k in g.keys()}},
                            plan, q_factor, k_factor)
    added = b.add_patches({k: ("set", (v,)) for k, v in new.items()}, 1.0)
    assert len(added) == len(new)
    return b, plan


@pytest.mark.parametrize("arch", ["SD15", "Flux"])
def test_attn_only_preserves_small_model_outputs(harness, N, arch):
    a = fixtures.small_model(arch, seed=0)
    b, plan = _scaled_patcher(N, a, 2.0, 0.7)
    out, report = N.normalize_model(a, b, "attn_only", 1.0, "cpu")
    assert len(report.factors) == len(plan.groups) and not report.skipped
    for _, s in report.factors:
        assert s == pytest.approx(math.sqrt(2.0 / 0.7), rel=1e-6)
    ref = _forward(arch, _effective_module(harness, a))
    got = _forward(arch, _effective_module(harness, out))
    assert float((ref - got).abs().max()) <= 1e-4 * float(ref.abs().max())
    # the queries did change, by s, and only queries/keys changed
    W = pack(harness, "engine.weights")
    sa, sn = W.KeySource.of(a), W.KeySource.of(out)
    qk = {k for g in plan.groups for k in g.keys()}
    s = report.factors[0][1]
    g0 = plan.groups[0]
    qpart = [p for p in g0.parts if p.role == "q"][0]
    qa = sa.read(qpart.weight, torch.device("cpu")).narrow(0, qpart.start, qpart.length)
    qn = sn.read(qpart.weight, torch.device("cpu")).narrow(0, qpart.start, qpart.length)
    assert torch.allclose(qn, qa * s, rtol=1e-6, atol=1e-7)
    for k in sa.keys()[::7]:
        if k not in qk:
            assert torch.equal(sa.read(k, torch.device("cpu")), sn.read(k, torch.device("cpu"))), k
    if arch == "Flux":    # fused keys: v rows untouched, patches on the q/k rows only (ComfyUI offsets)
        key = "diffusion_model.single_blocks.0.linear1.weight"
        width = sa.shape(key)[1]
        assert torch.equal(sa.read(key, torch.device("cpu"))[2 * width:], sn.read(key, torch.device("cpu"))[2 * width:])
        offsets = [p[3] for p in out.patches[key]]
        assert (0, 0, width) in offsets and (0, width, width) in offsets


def test_mode_all_scales_every_layer_to_b(harness, N):
    a = fixtures.small_model("SD15", seed=0)
    b = fixtures.small_model("SD15", seed=1, delta_seed=5, delta_scale=0.01)
    out, report = N.normalize_model(a, b, "all", 1.0, "cpu")
    W = pack(harness, "engine.weights")
    sa, sb, sn = W.KeySource.of(a), W.KeySource.of(b), W.KeySource.of(out)
    cpu = torch.device("cpu")
    keys = sa.keys()
    assert not report.skipped
    for k in keys:
        ta, tb, tn = sa.read(k, cpu), sb.read(k, cpu), sn.read(k, cpu)
        if k.endswith(".bias") and k[:-4] + "weight" in sa.entries:
            w = k[:-4] + "weight"
            f = float(torch.linalg.vector_norm(sb.read(w, cpu).double()) / torch.linalg.vector_norm(sa.read(w, cpu).double()))
            assert torch.allclose(tn, ta * f, rtol=1e-5, atol=1e-8), k          # bias follows its weight
        else:
            assert float(torch.linalg.vector_norm(tn.double())) == pytest.approx(
                float(torch.linalg.vector_norm(tb.double())), rel=1e-5), k      # weight norm = B's
    half, _ = N.normalize_model(a, b, "all", 0.5, "cpu")                          # strength: log-space half way
    k = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    na, nb = (float(torch.linalg.vector_norm(s.read(k, cpu).double())) for s in (sa, sb))
    nh = float(torch.linalg.vector_norm(W.KeySource.of(half).read(k, cpu).double()))
    assert nh == pytest.approx(math.sqrt(na * nb), rel=1e-5)


def _node_defaults(class_type):
    return api_node(class_type)["inputs"]


def _small(nid, arch="SD15", seed=0, delta_seed=0, delta_scale=0.0):
    return {nid: {"class_type": "MergeLabTest_SmallModel",
                  "inputs": {"arch": arch, "seed": seed, "delta_seed": delta_seed, "delta_scale": delta_scale,
                             "dtype": "fp32"}}}


def test_normalize_node_through_the_executor(harness, N):
    g = {**_small("a", seed=0), **_small("b", seed=1),
         "n": {"class_type": "MergeLab_NormalizeModel",
               "inputs": {**_node_defaults("MergeLab_NormalizeModel"), "model_a": ["a", 0], "model_b": ["b", 0]}},
         "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["n", 0], "name": "model"}},
         "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["n", 1], "name": "report"}}}
    res = harness.run_ok(g)
    out, text = res.captured["model"], res.captured["report"]
    assert "attn_only" in text and "32 attention(s) rescaled" in text
    a, b = fixtures.small_model("SD15", seed=0), fixtures.small_model("SD15", seed=1)
    ref = _forward("SD15", _effective_module(harness, a))
    got = _forward("SD15", _effective_module(harness, out))
    assert float((ref - got).abs().max()) <= 1e-4 * float(ref.abs().max())
    W = pack(harness, "engine.weights")
    sn, sb = W.KeySource.of(out), W.KeySource.of(b)
    cpu = torch.device("cpu")
    for blk in ("input_blocks.1.1", "middle_block.1", "output_blocks.11.1"):
        p = f"diffusion_model.{blk}.transformer_blocks.0.attn1."
        rn = torch.linalg.vector_norm(sn.read(p + "to_q.weight", cpu)) / torch.linalg.vector_norm(sn.read(p + "to_k.weight", cpu))
        rb = torch.linalg.vector_norm(sb.read(p + "to_q.weight", cpu)) / torch.linalg.vector_norm(sb.read(p + "to_k.weight", cpu))
        assert float(rn) == pytest.approx(float(rb), rel=1e-5)
    assert a.patches == fixtures.small_model("SD15", seed=0).patches     # the input was not modified


def test_normalize_between_architectures_is_an_error(harness):
    g = {**_small("a", "SD15"), **_small("b", "SDXL"),
         "n": {"class_type": "MergeLab_NormalizeModel",
               "inputs": {**_node_defaults("MergeLab_NormalizeModel"), "model_a": ["a", 0], "model_b": ["b", 0]}},
         "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["n", 0], "name": "m"}}}
    res = harness.run(g)
    assert not res.success
    err = res.error_text()
    assert "Normalize Model" in err and "same architecture" in err and "SD15" in err and "SDXL" in err


def test_normalize_bad_mode_and_strength(harness, N):
    with pytest.raises(N.NormalizeError, match="mode must be one of"):
        N.normalize_tensors({}, None, None, "qk")
    with pytest.raises(N.NormalizeError, match="strength must be finite"):
        N.normalize_tensors({}, None, None, "all", float("inf"))


def test_normalize_into_fp16_that_overflows_is_an_error(harness):
    """Mode all at strength -2 against a model_b of 1e-4 A's scale asks for factors of 1e8: in an fp16 model_a
    that is inf in every weight, which was kept without a word; now an error names the key (as the mergers)."""
    normalize = pack(harness, "engine.normalize")
    a = fixtures._build_small_model("SD15", 0, torch.float16, 1, 0.02)
    b = fixtures._build_small_model("SD15", 0, torch.float32, 1, 0.02)
    with torch.no_grad():
        for k, t in b.model.state_dict().items():
            if t.is_floating_point():
                t.mul_(1e-4)
    with pytest.raises(ValueError, match="diffusion_model.* do not fit the model's fp16"):
        normalize.normalize_model(a, b, mode="all", strength=-2.0, device="cpu")
    out, _ = normalize.normalize_model(a, b, mode="all", strength=1.0, device="cpu")
    assert out.patches

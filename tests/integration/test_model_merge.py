"""Model and CLIP merging through ComfyUI's executor, checked against merge_methods applied directly."""
import importlib
import math
import re

import pytest
import torch

from mergelab import fixtures
from test_comfy_state import AnyArchModel as _AnyArchModel

ARCHS = ("SD15", "SDXL", "Flux")
DELTA = 0.02


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


def loader(nid, arch, delta_seed=0, dtype="fp32"):
    return {nid: {"class_type": "MergeLabTest_SmallModel",
                  "inputs": {"arch": arch, "seed": 0, "delta_seed": delta_seed,
                             "delta_scale": DELTA if delta_seed else 0.0, "dtype": dtype}}}


def merge_graph(*args, **kw):
    from mergelab.harness import Harness  # noqa: F401  (the session harness fills widget defaults)
    return _HARNESS[0].with_defaults(_merge_graph(*args, **kw))


_HARNESS = []


@pytest.fixture(autouse=True)
def _remember_harness(harness):
    _HARNESS[:] = [harness]


def _merge_graph(arch, method_node, method_inputs, n_models, with_base, per_model=None, extra=None, dtype="fp32",
                clip=False):
    """Loaders for the base (seed 0) and n tuned models, a Merge Input chain, a method and a merger."""
    g = {}
    g.update(loader("base", arch, dtype=dtype))
    prev = None
    for i in range(n_models):
        g.update(loader(f"m{i}", arch, delta_seed=i + 1, dtype=dtype))
        inputs = {"model": [f"m{i}", 0], "clip": [f"m{i}", 1], **(per_model[i] if per_model else {})}
        if prev:
            inputs["models"] = [prev, 0]
        g[f"in{i}"] = {"class_type": "MergeLab_MergeInput", "inputs": inputs}
        prev = f"in{i}"
    g["method"] = {"class_type": method_node, "inputs": dict(method_inputs)}
    merger = {"method": ["method", 0], "models": [prev, 0], "seed": 7, "device": "auto", "compute_dtype": "fp32",
              "on_mismatch": "error", **(extra or {})}
    if with_base:
        merger["base"] = ["base", 1 if clip else 0]
    g["merge"] = {"class_type": "MergeLab_CLIPMerger" if clip else "MergeLab_ModelMerger", "inputs": merger}
    g["cap"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 0], "name": "out"}}
    g["cap_report"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 1], "name": "report"}}
    return g


def model_count(spec):
    if spec.max_models is not None and spec.max_models < 3:
        return spec.max_models
    return max(3, spec.min_models)


def sample_keys(keys, n=12):
    step = max(1, len(keys) // n)
    return keys[::step]


def effective(obj, key, harness):
    return pack(harness, "engine.weights").KeySource.of(obj).read(key, torch.device("cpu"))


def reader(obj, harness):
    """``read(key)``: what ``obj`` computes with, its patches applied, from one KeySource (building one per key
    is a pass over every key and patch of the model: minutes over an SDXL model's keys)."""
    src = pack(harness, "engine.weights").KeySource.of(obj)
    return lambda key: src.read(key, torch.device("cpu"))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_node_through_the_executor(harness, arch):
    mm = pack(harness, "merge_methods")
    base_sd = fixtures.small_model(arch).model.state_dict()
    keys = [k for k in base_sd if k.startswith("diffusion_model.")]
    failures = []
    for spec in mm.all_specs():
        n = model_count(spec)
        with_base = spec.base != "none"
        res = harness.run(merge_graph(arch, f"MergeLab_Method_{spec.name}", {}, n, with_base))
        if not res.success:
            failures.append(f"{spec.name}: {res.error_text()}")
            continue
        read = reader(res.captured["out"], harness)
        sds = [fixtures.small_model(arch, delta_seed=i + 1, delta_scale=DELTA).model.state_dict() for i in range(n)]
        method = mm.create(spec.name)
        for key in sample_keys(keys):
            b = base_sd[key].float() if with_base else None
            want = method.merge(b, [sd[key].float() for sd in sds], key=key, seed=7)
            got = read(key)
            if not torch.equal(got, want):
                failures.append(f"{spec.name} {key}: max diff {(got - want).abs().max().item():.3g}")
                break
        assert "Δ vs" in res.captured["report"]
    assert not failures, "\n".join(failures)


def test_per_model_parameters_and_inputs_untouched(harness):
    mm = pack(harness, "merge_methods")
    arch = "SD15"
    per_model = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    res = harness.run_ok(merge_graph(arch, "MergeLab_Method_dare_ties", {"lambda": 0.8}, 2, True, per_model))
    out = res.captured["out"]
    base = fixtures.small_model(arch)
    models = [fixtures.small_model(arch, delta_seed=i + 1, delta_scale=DELTA) for i in range(2)]
    method = mm.create("dare_ties", **{"lambda": 0.8})
    keys = [k for k in base.model.state_dict() if k.startswith("diffusion_model.")]
    for key in sample_keys(keys, 20):
        want = method.merge(base.model.state_dict()[key], [m.model.state_dict()[key] for m in models], key=key,
                            seed=7, weight=[1.0, 0.5], density=[0.3, 0.6])
        assert torch.equal(effective(out, key, harness), want), key
    # the inputs keep their weights: fresh fixtures equal the ones the graph used
    fresh = fixtures._build_small_model(arch, 0, None, None, 0.0)
    for key in sample_keys(keys, 20):
        assert torch.equal(fresh.model.state_dict()[key], base.model.state_dict()[key])
    # the base patcher got no patches; the merged clone carries set patches
    assert not base.patches
    assert out.patches and all(p[0][1][0] == "set" for p in out.patches.values())


@pytest.mark.parametrize("method_name", ["task_arithmetic", "ties", "dare_ties", "multislerp"])
def test_eight_models_with_their_own_parameters(harness, method_name):
    """A base and 8 models, each with its own weight and density, merge as merge_methods does directly."""
    mm = pack(harness, "merge_methods")
    arch, n = "SD15", 8
    weights = [1.0 - 0.1 * i for i in range(n)]
    densities = [0.2 + 0.1 * i for i in range(n)]
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    res = harness.run_ok(merge_graph(arch, f"MergeLab_Method_{method_name}", {}, n, True, per_model))
    out = res.captured["out"]
    for i in range(1, n + 1):
        assert f"model {i}" in res.captured["report"]
    base = fixtures.small_model(arch)
    models = [fixtures.small_model(arch, delta_seed=i + 1, delta_scale=DELTA) for i in range(n)]
    spec = mm.get_spec(method_name)
    declared = {p.name for p in spec.per_model_params}
    params = {k: v for k, v in (("weight", weights), ("density", densities)) if k in declared}
    method = mm.create(method_name)
    keys = [k for k in base.model.state_dict() if k.startswith("diffusion_model.")]
    for key in sample_keys(keys, 16):
        want = method.merge(base.model.state_dict()[key], [m.model.state_dict()[key] for m in models], key=key,
                            seed=7, **params)
        got = effective(out, key, harness)
        assert torch.equal(got, want), key
        # every model counts: dropping the last one changes the result
        fewer = method.merge(base.model.state_dict()[key], [m.model.state_dict()[key] for m in models[:-1]],
                             key=key, seed=7, **{k: v[:-1] for k, v in params.items()})
        assert not torch.equal(got, fewer), key


def test_same_seed_is_bit_identical_and_seed_matters(harness):
    g = merge_graph("SD15", "MergeLab_Method_dare_linear", {}, 2, True, [{"density": 0.5}, {"density": 0.5}])
    a = harness.run_ok(g).captured["out"]
    b = harness.run_ok(g).captured["out"]
    g["merge"]["inputs"]["seed"] = 8
    c = harness.run_ok(g).captured["out"]
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(effective(a, key, harness), effective(b, key, harness))
    assert not torch.equal(effective(a, key, harness), effective(c, key, harness))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_weighted_sum_equals_modelmergesimple(harness, dtype):
    """Our weighted_sum reproduces ComfyUI's ModelMergeSimple (ratio = weight of model 1) bit for bit once
    rounded to the models' dtype, as ComfyUI stores it when it patches the weights (it used torch.lerp,
    an ulp off in about 0.2 % of the values)."""
    g = merge_graph("SD15", "MergeLab_Method_weighted_sum", {"ratio": 0.3}, 2, False, dtype=dtype)
    g["core"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["m0", 0], "model2": ["m1", 0], "ratio": 0.3}}
    g["cap_core"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["core", 0], "name": "core"}}
    res = harness.run_ok(g)
    ours, core = res.captured["out"], res.captured["core"]
    keys = [k for k in ours.model.state_dict() if k.startswith("diffusion_model.")]
    read_ours, read_core = reader(ours, harness), reader(core, harness)
    for key in keys:
        a = read_ours(key)
        b = read_core(key)
        assert a.dtype == b.dtype == torch.float32
        # ours is kept in the models' dtype; ComfyUI's is computed in fp32 and rounded when it is patched in
        stored = torch.float16 if dtype == "fp16" else torch.bfloat16
        assert torch.equal(a.to(stored).float(), a)
        assert torch.equal(a, b.to(stored).float()), key


@pytest.mark.parametrize("base_dtype,model_dtype", [("fp8_e4m3fn", "fp8_e4m3fn"), ("fp32", "fp8_e4m3fn")])
def test_fp8_weights_are_dequantized_and_kept_in_a_dtype_comfyui_patches(harness, base_dtype, model_dtype):
    """fp8 weights (kept as UNETLoader's weight_dtype fp8_e4m3fn keeps them: fp8 storage, manual-cast layers)
    are merged from their fp32 values; an fp8 base's results are kept in bf16, which ComfyUI casts into the
    fp8 layer when it patches, a float base's in its own dtype."""
    mm = pack(harness, "merge_methods")
    per_model = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    g = _merge_graph("SD15", "MergeLab_Method_ties", {}, 2, True, per_model, dtype=model_dtype)
    g["base"]["inputs"]["dtype"] = base_dtype
    out = harness.run_ok(harness.with_defaults(g)).captured["out"]
    base = fixtures.small_model("SD15", dtype=base_dtype)
    models = [fixtures.small_model("SD15", dtype=model_dtype, delta_seed=i + 1, delta_scale=DELTA) for i in range(2)]
    assert models[0].model.state_dict()[KEY_FP8].dtype == torch.float8_e4m3fn
    stored = torch.bfloat16 if base_dtype == "fp8_e4m3fn" else torch.float32
    method = mm.create("ties")
    keys = [k for k in base.model.state_dict() if k.startswith("diffusion_model.")]
    for key in sample_keys(keys, 16):
        xs = [m.model.state_dict()[key].float() for m in models]
        want = method.merge(base.model.state_dict()[key].float(), xs, key=key, seed=7, weight=[1.0, 0.5],
                            density=[0.5, 0.5])
        assert not torch.equal(want, xs[0]) and torch.isfinite(want).all(), key
        patch = out.patches[key][-1][1][1][0]
        assert patch.dtype == stored, key
        assert torch.equal(patch, want.to(stored)), key
    # ComfyUI patches the result into the layer's own storage (fp8 stays fp8), and unpatching restores it
    before = base.model.state_dict()[KEY_FP8].clone()
    try:
        with torch.no_grad():           # as ComfyUI patches when it loads a model
            out.patch_weight_to_device(KEY_FP8)
        layer = out.model.state_dict()[KEY_FP8]
        assert layer.dtype == before.dtype
        want = out.patches[KEY_FP8][-1][1][1][0].float()
        step = (want.abs() * 2.0 ** -3 + 2.0 ** -9) if base_dtype == "fp8_e4m3fn" else 0.0
        assert ((layer.float() - want).abs() <= step).all()
    finally:
        out.unpatch_model()
    assert torch.equal(base.model.state_dict()[KEY_FP8], before)


@pytest.mark.parametrize("method_node,base_dtype", [("MergeLab_Method_linear", "fp32"),
                                                     ("MergeLab_Method_karcher", "fp32"),
                                                     ("MergeLab_Method_linear", "fp16")])
def test_method_without_base_rounds_once_to_the_base_dtype(harness, method_node, base_dtype):
    """A method that takes no base, with a base connected (the result is kept in the base's dtype) and model
    1 stored in bf16, model 2 in fp32: the result is the method on the fp32 values rounded once to the
    base's dtype, not first to model 1's bf16 (which held fp32 and fp16 bases to bf16 precision)."""
    mm = pack(harness, "merge_methods")
    g = _merge_graph("SD15", method_node, {}, 2, True, [{"weight": 1.0}, {"weight": 0.5}])
    g["base"]["inputs"]["dtype"] = base_dtype
    g["m0"]["inputs"]["dtype"] = "bf16"
    out = harness.run_ok(harness.with_defaults(g)).captured["out"]
    models = [fixtures.small_model("SD15", dtype=dt, delta_seed=i + 1, delta_scale=DELTA)
              for i, dt in enumerate(("bf16", "fp32"))]
    name = method_node[len("MergeLab_Method_"):]
    method = mm.create(name)
    per_model = {"weight": [1.0, 0.5]} if name == "linear" else {}
    stored = torch.float16 if base_dtype == "fp16" else torch.float32
    keys = [k for k in out.patches if k.startswith("diffusion_model.")]
    coarse = 0
    for key in sample_keys(keys, 16):
        xs = [m.model.state_dict()[key].float() for m in models]
        want = method.merge(None, xs, key=key, seed=7, **per_model).to(stored)
        patch = out.patches[key][-1][1][1][0]
        assert patch.dtype == stored, key
        assert torch.equal(patch, want), key
        coarse += int(not torch.equal(patch.bfloat16().to(stored), patch))
    assert coarse > 0        # the results do hold more than bf16 precision


KEY_FP8 = "diffusion_model.input_blocks.1.1.proj_in.weight"


class _ScaledFp8Loader:
    """Test node: the small SD15 stored as scaled fp8 (fixtures.small_scaled_fp8_model); b is a tuned copy
    whose scales are twice as large."""
    _cache = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"which": (["a", "b"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, which):
        if which not in self._cache:
            self._cache[which] = (fixtures.small_scaled_fp8_model("SD15") if which == "a" else
                                  fixtures.small_scaled_fp8_model("SD15", delta_seed=1, delta_scale=0.005,
                                                                  scale_mult=2.0))
        return (self._cache[which].clone(),)


def _sampled_weights(patcher, keys):
    """The weights ComfyUI computes with after patching the model (full load on the CPU): dequantized by
    each scaled-fp8 layer's scale_weight."""
    import comfy.utils
    with torch.no_grad():
        patcher.patch_model(device_to=torch.device("cpu"))
    try:
        out = {}
        for k in keys:
            module = comfy.utils.get_attr(patcher.model, k.rpartition(".")[0])
            t = module.weight.detach().float().clone()
            if t.dtype != module.weight.dtype and hasattr(module, "scale_weight"):
                t = t * module.scale_weight.detach().float()
            out[k] = t
        return out
    finally:
        patcher.unpatch_model()


def test_scaled_fp8_layers_merge_to_what_comfyui_samples_with(harness):
    """Scaled-fp8 layers: the dequantized weights are merged and their scales are left alone (a merged
    scale would be swapped in after ComfyUI re-quantized the merged weight with the old one), so the model
    ComfyUI samples with is the merge, to fp8 precision; the same for the Masked Model Merger."""
    harness.register_test_node("MergeLabTest_ScaledFp8", _ScaledFp8Loader)
    g = {"a": {"class_type": "MergeLabTest_ScaledFp8", "inputs": {"which": "a"}},
         "b": {"class_type": "MergeLabTest_ScaledFp8", "inputs": {"which": "b"}},
         "in0": {"class_type": "MergeLab_MergeInput", "inputs": {"model": ["a", 0], "weight": 0.5}},
         "in1": {"class_type": "MergeLab_MergeInput", "inputs": {"model": ["b", 0], "weight": 0.5,
                                                                 "models": ["in0", 0]}},
         "method": {"class_type": "MergeLab_Method_linear", "inputs": {}},
         "merge": {"class_type": "MergeLab_ModelMerger", "inputs": {"method": ["method", 0], "models": ["in1", 0],
                                                                    "device": "cpu"}},
         "blk": {"class_type": "MergeLab_BlockMasker", "inputs": {"model": ["a", 0], "blocks": "*"}},
         "masked": {"class_type": "MergeLab_MaskedModelMerger", "inputs": {"model_a": ["a", 0], "model_b": ["b", 0],
                                                                          "mask": ["blk", 0], "ratio": 0.5,
                                                                          "device": "cpu"}},
         "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 0], "name": "merge"}},
         "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["masked", 0], "name": "masked"}},
         "ca": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["a", 0], "name": "a"}},
         "cb": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["b", 0], "name": "b"}}}
    got = harness.run_ok(harness.with_defaults(g)).captured
    sd = got["a"].model.state_dict()
    scaled = [k[: -len("scale_weight")] + "weight" for k in sd if k.endswith(".scale_weight")]
    assert scaled and sd[scaled[0]].dtype == torch.float8_e4m3fn
    cpu = torch.device("cpu")
    ka, kb = (pack(harness, "engine.weights").KeySource.of(got[n]) for n in ("a", "b"))
    keys = sample_keys(scaled, 12)
    before = {k: sd[k].float().clone() for k in keys}
    for name in ("merge", "masked"):
        out = got[name]
        assert not [k for k in out.patches if k.endswith(".scale_weight")], name
        sampled = _sampled_weights(out, keys)
        for k in keys:
            want = 0.5 * ka.read(k, cpu) + 0.5 * kb.read(k, cpu)
            rel = float(torch.linalg.norm(sampled[k] - want) / torch.linalg.norm(want))
            assert rel < 0.05, (name, k, rel)          # fp8 rounding with a's scale: a few percent at most
    after = got["a"].model.state_dict()
    assert all(torch.equal(after[k].float(), before[k]) for k in keys)     # unpatched: the input is intact


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_compute_dtype_fp64_merges_in_fp64(harness, dtype):
    """compute_dtype fp64: every key is merge_methods applied to the fp64 weights, rounded once to the
    base's dtype; and it is not the fp32 merge (which rounds differently on some keys)."""
    mm = pack(harness, "merge_methods")
    per_model = [{"weight": 0.7}, {"weight": 0.2}, {"weight": 0.4}]
    g = merge_graph("SD15", "MergeLab_Method_linear", {}, 3, False, per_model, dtype=dtype,
                    extra={"compute_dtype": "fp64"})
    g64 = harness.run_ok(g).captured["out"]
    g["merge"]["inputs"]["compute_dtype"] = "fp32"
    g32 = harness.run_ok(g).captured["out"]
    models = [fixtures.small_model("SD15", dtype=dtype, delta_seed=i + 1, delta_scale=DELTA) for i in range(3)]
    method = mm.create("linear")
    sds = [m.model.state_dict() for m in models]
    differ = 0
    for key in g64.patches:
        xs = [sd[key].double() for sd in sds]
        want = method.merge(None, xs, key=key, seed=7, weight=[0.7, 0.2, 0.4])
        got = g64.patches[key][-1][1][1][0]
        assert got.dtype == sds[0][key].dtype, key
        assert torch.equal(got, want.to(got.dtype)), key
        differ += not torch.equal(got, g32.patches[key][-1][1][1][0])
    assert differ > 0


def test_block_weights_equal_modelmergesd1(harness):
    """weighted_sum scaled by per-block factors == ComfyUI's ModelMergeSD1 with the same block ratios."""
    import nodes as comfy_nodes

    values = {"time_embed.": 0.1, "input_blocks.0.": 0.9, "input_blocks.1.": 0.2, "input_blocks.10.": 0.7,
              "middle_block.1.": 0.4, "output_blocks.11.": 0.6, "out.": 0.3}
    sd1_inputs = {n: values.get(n, 1.0) for n in comfy_nodes.NODE_CLASS_MAPPINGS["ModelMergeSD1"].INPUT_TYPES()
                  ["required"] if n not in ("model1", "model2")}
    g = merge_graph("SD15", "MergeLab_Method_weighted_sum", {"ratio": 1.0}, 2, False,
                    extra={"block_weights": ["bw", 0]})
    bw_cls = next(i for i in harness.pack_node_ids if i.startswith("MergeLab_BlockWeights") and "SD1" in i)
    bw_inputs = {}
    for name in comfy_nodes.NODE_CLASS_MAPPINGS[bw_cls].INPUT_TYPES()["required"]:
        bw_inputs[name] = values.get(name, 1.0)
    g["bw"] = {"class_type": bw_cls, "inputs": {**bw_inputs, "param": "ratio", "models": "all"}}
    g["core"] = {"class_type": "ModelMergeSD1", "inputs": {"model1": ["m0", 0], "model2": ["m1", 0], **sd1_inputs}}
    g["cap_core"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["core", 0], "name": "core"}}
    res = harness.run_ok(g)
    ours, core = res.captured["out"], res.captured["core"]
    keys = [k for k in ours.model.state_dict() if k.startswith("diffusion_model.")]
    read_ours, read_core = reader(ours, harness), reader(core, harness)
    for key in keys:
        torch.testing.assert_close(read_ours(key), read_core(key), rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("method_name,method_inputs,param,models,n", [
    ("ties", {}, "density", "2", 2),            # a per-model parameter, for the second model only
    ("slerp", {"t": 0.6}, "t", "all", 1),       # a global parameter
])
def test_block_rules_scale_other_parameters(harness, method_name, method_inputs, param, models, n):
    """Block weights scale any numeric parameter: attn2 keys get it x0.5, attn1 keys x0, the rest as set."""
    mm = pack(harness, "merge_methods")
    per_model = [{"weight": 1.0, "density": 0.6} for _ in range(n)]
    g = _merge_graph("SD15", f"MergeLab_Method_{method_name}", method_inputs, n, True, per_model,
                     extra={"block_weights": ["bw", 0]})
    g["bw"] = {"class_type": "MergeLab_BlockRules",
               "inputs": {"rules": "re:attn2=0.5\nre:attn1=0\n", "param": param, "models": models}}
    out = harness.run_ok(harness.with_defaults(g)).captured["out"]
    base = fixtures.small_model("SD15")
    tuned = [fixtures.small_model("SD15", delta_seed=i + 1, delta_scale=DELTA) for i in range(n)]
    method = mm.create(method_name, **method_inputs)
    keys = [k for k in base.model.state_dict() if k.startswith("diffusion_model.")]
    picked = {"attn2": [], "attn1": [], "other": []}
    for k in keys:
        picked["attn2" if "attn2" in k else "attn1" if "attn1" in k else "other"].append(k)
    for group, factor in (("attn2", 0.5), ("attn1", 0.0), ("other", 1.0)):
        assert picked[group], group
        for key in sample_keys(picked[group], 6):
            b = base.model.state_dict()[key]
            xs = [m.model.state_dict()[key] for m in tuned]
            if param == "density":
                want = method.merge(b, xs, key=key, seed=7, weight=[1.0, 1.0], density=[0.6, 0.6 * factor])
            else:
                want = mm.create(method_name, t=0.6 * factor).merge(b, xs, key=key, seed=7)
            got = effective(out, key, harness)
            assert torch.equal(got, want), (group, key)
            if param == "t" and factor == 0.0:
                assert torch.equal(got, b.float()), key          # t = 0 is the base itself
            if param == "density" and factor == 0.0:             # model 2 drops out: TIES of model 1 alone
                assert torch.equal(got, method.merge(b, xs[:1], key=key, seed=7, weight=[1.0], density=[0.6]))


def test_block_weights_on_a_global_parameter_for_some_models_only_are_refused(harness):
    """lambda is one value for the whole merge: block weights that scale it for model 2 only cannot be
    honoured, so the merge stops with a message (they silently used model 1's factor)."""
    g = _merge_graph("SD15", "MergeLab_Method_task_arithmetic", {}, 2, True, extra={"block_weights": ["bw", 0]})
    g["bw"] = {"class_type": "MergeLab_BlockRules", "inputs": {"rules": "re:attn2=0\n", "param": "lambda",
                                                              "models": "2"}}
    res = harness.run(harness.with_defaults(g))
    assert not res.success
    assert re.search(r"'lambda' for model\(s\) 2 only.*global parameter.*set 'models' to 'all'", res.error_text())
    g["bw"]["inputs"]["models"] = "all"
    harness.run_ok(harness.with_defaults(g))


def test_a_per_model_value_out_of_the_method_range_names_its_input(harness):
    """Merge Input's weight widget allows negative values; geometric_median does not: the merge stops before
    any computation, naming the input."""
    g = merge_graph("SD15", "MergeLab_Method_geometric_median", {}, 3, False,
                    [{"weight": 1.0}, {"weight": -0.5}, {"weight": 1.0}])
    res = harness.run(g)
    assert not res.success
    assert re.search(r"geometric_median', model 2: parameter 'weight' = -0.5 is outside its range", res.error_text())


def test_different_architectures_fail_before_merging(harness):
    g = merge_graph("SD15", "MergeLab_Method_linear", {}, 2, False)
    g.update(loader("other", "SDXL", delta_seed=5))
    g["in1"]["inputs"]["model"] = ["other", 0]
    res = harness.run(g)
    assert not res.success
    assert "different architectures" in res.error_text()


@pytest.mark.parametrize("other", ["SDXL", "Flux"])
@pytest.mark.parametrize("on_mismatch", ["error", "skip"])
def test_clips_of_different_architectures_fail_before_merging(harness, other, on_mismatch):
    """SD1.5's CLIP (clip_l) with SDXL's (clip_l + clip_g) or Flux's (clip_l + t5): refused as different
    text encoders, not as a list of missing keys, and not merged on the clip_l they share with 'skip'."""
    g = merge_graph("SD15", "MergeLab_Method_linear", {}, 2, True, clip=True, extra={"on_mismatch": on_mismatch})
    g.update(loader("other", other, delta_seed=5))
    g["in1"]["inputs"]["clip"] = ["other", 1]
    res = harness.run(g)
    assert not res.success
    text = res.error_text()
    assert "cannot merge text encoders (CLIP) of different architectures" in text
    assert "SD1ClipModel" in text


def test_lora_on_an_input_is_part_of_the_merge(harness):
    """Patches already on an input model (a LoRA) are merged, not its raw weights."""
    eng = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    base = fixtures.small_model("SD15")
    other = fixtures.small_model("SD15", delta_seed=1, delta_scale=DELTA)
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    w = other.model.state_dict()[key]
    patched = other.clone()
    bump = torch.full_like(w, 0.5)
    assert patched.add_patches({key: ("diff", (bump,))}, 1.0) == [key]
    out = eng.merge_models(base, [eng.MergeInput(patched, {})], mm.create("task_arithmetic"), eng.MergeOptions())
    want = base.model.state_dict()[key] + (w + 0.5 - base.model.state_dict()[key])
    torch.testing.assert_close(effective(out, key, harness), want)
    assert not other.patches
    # ComfyUI keeps weights as parameters with requires_grad: reads (plain and patched) carry no graph
    src = pack(harness, "engine.weights").KeySource.of(patched)
    assert src.raw(key).requires_grad
    for t in (src.read(key, torch.device("cpu")), src.read_only().read(key, torch.device("cpu")),
              pack(harness, "engine.weights").KeySource.of(other).read(key, torch.device("cpu"))):
        assert not t.requires_grad and t.grad_fn is None


def test_mismatched_keys_error_or_skip(harness):
    eng = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    base = fixtures.small_model("SD15")
    odd = fixtures._build_small_model("SD15", 0, None, 1, DELTA)
    odd.model.diffusion_model.out[2].bias = None          # one key fewer
    with pytest.raises(mm.MergeError, match="missing in model 1"):
        eng.merge_models(base, [eng.MergeInput(odd, {})], mm.create("task_arithmetic"), eng.MergeOptions())
    out = eng.merge_models(base, [eng.MergeInput(odd, {})], mm.create("task_arithmetic"),
                           eng.MergeOptions(on_mismatch="skip"))
    assert "diffusion_model.out.2.bias" not in out.patches
    assert "diffusion_model.out.2.weight" in out.patches


def test_skip_warning_counts_each_key_once(harness, caplog):
    """Two inputs lacking the same key and one key only an input has: one warning whose numbers add up
    (the key missing in both counted once) and that says what becomes of each kind."""
    import logging
    eng = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    base = fixtures.small_model("SD15")
    odd = []
    for seed in (1, 2):
        m = fixtures._build_small_model("SD15", 0, None, seed, DELTA)
        m.model.diffusion_model.out[2].bias = None
        odd.append(m)
    with caplog.at_level(logging.WARNING, logger="MergeLab"):
        eng.merge_models(base, [eng.MergeInput(m, {}) for m in odd], mm.create("task_arithmetic"),
                         eng.MergeOptions(on_mismatch="skip"))
    msgs = [r.getMessage() for r in caplog.records if "mismatched" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "skipping 1 mismatched key(s) of base (1 missing in an input, 0 with other shapes)" in msgs[0]
    assert "0 key(s) that only other inputs have are left out" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="MergeLab"):       # the input has a key the base lacks
        eng.merge_models(odd[0], [eng.MergeInput(base, {}), eng.MergeInput(odd[1], {})],
                         mm.create("task_arithmetic"), eng.MergeOptions(on_mismatch="skip"))
    msgs = [r.getMessage() for r in caplog.records if "mismatched" in r.getMessage()]
    assert len(msgs) == 1 and "skipping 0 mismatched" in msgs[0] and "1 key(s) that only other inputs" in msgs[0]
    # the merge report says it too
    stats = pack(harness, "engine.report").MergeStats(lambda k: k, ["model 1"], True)
    eng.merge_models(base, [eng.MergeInput(odd[0], {})], mm.create("task_arithmetic"),
                     eng.MergeOptions(on_mismatch="skip", stats=stats))
    assert [n for n in stats.notes if "mismatched" in n] == [
        "skipping 1 mismatched key(s) of base (1 missing in an input, 0 with other shapes): they keep base's "
        "values; 0 key(s) that only other inputs have are left out"]


def test_cancel_stops_the_merge(harness):
    import comfy.model_management as cmm
    import comfy.utils

    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if value == 5:
            cmm.interrupt_current_processing(True)
        cmm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        res = harness.run(merge_graph("SD15", "MergeLab_Method_linear", {}, 2, False))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        cmm.interrupt_current_processing(False)
    assert not res.success
    assert any(e == "execution_interrupted" for e, _ in res.messages)
    assert max(calls) < 50


def test_clip_merger(harness):
    mm = pack(harness, "merge_methods")
    res = harness.run_ok(merge_graph("SDXL", "MergeLab_Method_ties", {}, 2, True, clip=True))
    out = res.captured["out"]
    base = fixtures.small_clip("SDXL")
    models = [fixtures.small_clip("SDXL", delta_seed=i + 1, delta_scale=DELTA) for i in range(2)]
    sd = base.get_sd()
    keys = [k for k in sd if ".position_ids" not in k and ".logit_scale" not in k and sd[k].is_floating_point()]
    assert any(k.startswith("clip_g.") for k in keys) and any(k.startswith("clip_l.") for k in keys)
    method = mm.create("ties")
    src = pack(harness, "engine.weights").KeySource.of(out)
    for key in sample_keys(keys, 20):
        want = method.merge(sd[key], [m.get_sd()[key] for m in models], key=key, seed=7)
        assert torch.equal(src.read(key, torch.device("cpu")), want), key


@pytest.mark.parametrize("normalize, models, warned", [(True, "all", True), (True, "2", False),
                                                     (False, "all", False)])
def test_weight_factors_that_normalize_cancels_are_reported(harness, normalize, models, warned):
    """Block weights scale 'weight' of all models by default; linear / TIES / DARE with normalize on divide
    by the summed weights, so such a factor cancels out: the merge silently ignored the block weights.
    The report and the log now say so (factors for some models only do change the merge)."""
    g = merge_graph("SD15", "MergeLab_Method_linear", {"normalize": normalize}, 2, False,
                    extra={"block_weights": ["bw", 0]})
    g["bw"] = {"class_type": "MergeLab_BlockWeightsMBW",
               "inputs": {"arch": "SD1", "preset": "none", "mbw": "IN04:0.3,OUT05:2", "param": "weight",
                          "models": models}}
    g = harness.with_defaults(g)
    report = harness.run_ok(g).captured["report"]
    assert ("changes nothing" in report) == warned, report
    if warned:
        assert "2 block(s) (input_blocks.4., output_blocks.5.)" in report


def test_mbw_of_an_architecture_sharing_the_clip_class(harness):
    """KOALA's CLIP is ComfyUI's SDXL CLIP class: the KOALA MBW node's BASE (clip_l + clip_g) applies to it,
    as documented, while a KOALA MBW on an SDXL UNet is still refused."""
    g = merge_graph("SDXL", "MergeLab_Method_task_arithmetic", {}, 1, True, clip=True,
                    extra={"block_weights": ["bw", 0]})
    g["bw"] = {"class_type": "MergeLab_BlockWeightsMBW",
               "inputs": {"arch": "KOALA", "preset": "none", "mbw": "BASE:0", "param": "weight", "models": "all"}}
    out = harness.run_ok(harness.with_defaults(g)).captured["out"]
    base = fixtures.small_clip("SDXL")
    sd = base.get_sd()
    src = pack(harness, "engine.weights").KeySource.of(out)
    keys = [k for k in sd if k.startswith(("clip_l.", "clip_g.")) and sd[k].is_floating_point()
            and ".position_ids" not in k and ".logit_scale" not in k]
    for key in sample_keys(keys, 12):
        assert torch.equal(src.read(key, torch.device("cpu")), sd[key].float()), key     # weight 0: the base
    g = merge_graph("SDXL", "MergeLab_Method_task_arithmetic", {}, 1, True, extra={"block_weights": ["bw", 0]})
    g["bw"] = {"class_type": "MergeLab_BlockWeightsMBW",
               "inputs": {"arch": "KOALA", "preset": "none", "mbw": "BASE:0", "param": "weight", "models": "all"}}
    res = harness.run(harness.with_defaults(g))
    assert not res.success and "made for KOALA" in res.error_text()


def test_clip_merge_copes_with_weights_the_checkpoint_does_not_hold(harness):
    """SD1.5 checkpoints hold no CLIP-L text_projection: ComfyUI leaves it uninitialized (any bytes, NaN
    included) and drops it on save.  Such a key is kept as is instead of failing the merge; logit_scale and
    position_ids are not merged (as ComfyUI's CLIPMergeSimple); every other key is merged."""
    eng = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    base = fixtures._build_small_clip("SD15", 0)
    tuned = fixtures._build_small_clip("SD15", 0, delta_seed=1, delta_scale=DELTA)
    tp = "clip_l.transformer.text_projection.weight"
    sd_tuned = tuned.get_sd()
    with torch.no_grad():
        base.cond_stage_model.state_dict()[tp].fill_(float("nan"))     # this test's own objects only
    method = mm.create("dare_ties")
    out = eng.merge_models(base, [eng.MergeInput(tuned)], method, eng.MergeOptions(seed=3))
    patched = out.patcher.patches
    assert tp not in patched and not any(k.endswith((".logit_scale", ".position_ids")) for k in patched)
    sd_base = base.get_sd()
    src = pack(harness, "engine.weights").KeySource.of(out)
    key = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert key in patched
    want = method.merge(sd_base[key], [sd_tuned[key]], key=key, seed=3)
    assert torch.equal(src.read(key, torch.device("cpu")), want)
    # LoRA extraction from the same pair: the key is left out, the rest is extracted
    lops = pack(harness, "engine.lora_ops")
    lora, report = lops.extract_lora(tuned_clip=tuned, base_clip=base)
    names = {lops.key_text(k) for k in lora.layers}
    assert tp not in names and "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in names
    # uninitialized bytes can also be large finite values whose merge overflows fp16: that failed the merge
    # (CI, the full-size SD1.5 example workflow); kept as is too, with a note
    b16 = fixtures._build_small_clip("SD15", 0, "fp16")
    t16 = fixtures._build_small_clip("SD15", 0, "fp16", delta_seed=1, delta_scale=DELTA)
    ta = mm.create("task_arithmetic", **{"lambda": 2.0})        # -60000 + 2 · 120000
    with torch.no_grad():
        for c, v in ((b16, -60000.0), (t16, 60000.0)):
            c.cond_stage_model.state_dict()[tp].fill_(v)
    stats = pack(harness, "engine.report").MergeStats(lambda k: k.split(".")[0], ["model 1"], True)
    out16 = eng.merge_models(b16, [eng.MergeInput(t16)], ta, eng.MergeOptions(stats=stats))
    assert tp not in out16.patcher.patches and key in out16.patcher.patches
    assert any(tp in n and "do not fit fp16" in n for n in stats.notes)
    # elsewhere it is still an error
    with torch.no_grad():
        for c, v in ((b16, -60000.0), (t16, 60000.0)):
            c.cond_stage_model.state_dict()[key].fill_(v)
    with pytest.raises(mm.MergeError, match="do not fit the model's fp16"):
        eng.merge_models(b16, [eng.MergeInput(t16)], ta, eng.MergeOptions())
    # a non-finite weight anywhere else is still an error
    with torch.no_grad():
        base.cond_stage_model.state_dict()[key].fill_(float("inf"))
    with pytest.raises(mm.MergeError, match="NaN or Inf"):
        eng.merge_models(base, [eng.MergeInput(tuned)], method, eng.MergeOptions(seed=3))


@pytest.mark.parametrize("with_base", [True, False])
def test_report_figures_match_fp64_reference(harness, monkeypatch, with_base):
    """The report's per-block relative change and cosine, summed span by span over small slices, against
    the same figures computed in fp64 over whole tensors."""
    rep = pack(harness, "engine.report")
    monkeypatch.setattr(rep, "_REPORT_SLICE", 1000)
    g = torch.Generator().manual_seed(9)
    shapes = {"a.0.w": (37, 101), "a.1.w": (5,), "b.0.w": (64, 64, 3)}
    stats = rep.MergeStats(lambda k: k.split(".")[0], ["one", "two"], has_base=with_base)
    whole = {}
    for key, shape in shapes.items():
        b = torch.randn(shape, generator=g)
        xs = [b + 0.05 * torch.randn(shape, generator=g) for _ in range(2)]
        m = (xs[0] + xs[1]) / 2 + 0.01 * torch.randn(shape, generator=g)
        stats.add(key, m.half(), b if with_base else None, xs)
        whole.setdefault(key[0], []).append((m.half().double().reshape(-1), b.double().reshape(-1),
                                             [x.double().reshape(-1) for x in xs]))
    rows = {r["block"]: r for r in stats.summary()}
    assert set(rows) == {"a", "b"}
    for blk, parts in whole.items():
        m = torch.cat([p[0] for p in parts])
        refs = ([("base", torch.cat([p[1] for p in parts]))] if with_base else []) + [
            (nm, torch.cat([p[2][i] for p in parts])) for i, nm in enumerate(["one", "two"])]
        for nm, r in refs:
            rel = ((m - r).norm() / r.norm()).item()
            cos = (m @ r / (m.norm() * r.norm())).item()
            got_rel = rows[blk]["rel_change_base" if nm == "base" else f"rel_change[{nm}]"]
            got_cos = rows[blk]["cos_base" if nm == "base" else f"cos[{nm}]"]
            assert got_rel == pytest.approx(rel, rel=1e-5), (blk, nm)
            assert got_cos == pytest.approx(cos, rel=1e-6), (blk, nm)
        assert rows[blk]["keys"] == len(parts)


def test_report_with_weights_too_large_to_square(harness):
    """A block holding a weight whose squares overflow fp32 (ComfyUI leaves a weight the checkpoint does
    not hold uninitialized, e.g. SD1.5's CLIP text_projection: any bytes) reports NaN for that block,
    not a made-up cosine of 1, and the text and the chart are still drawn; other blocks are unaffected."""
    rep = pack(harness, "engine.report")
    g = torch.Generator().manual_seed(4)
    stats = rep.MergeStats(lambda k: k.split(".")[0], ["one"], has_base=True)
    b = torch.randn(300, generator=g)
    stats.add("good.w", b + 0.1, b, [b + 0.2])
    huge = torch.full((300,), 1e30)
    stats.add("bad.w", huge, huge * 0.5, [huge])
    rows = {r["block"]: r for r in stats.summary()}
    assert math.isnan(rows["bad"]["rel_change_base"]) and math.isnan(rows["bad"]["cos_base"])
    assert math.isnan(rows["bad"]["cos[one]"])
    assert rows["good"]["rel_change_base"] == pytest.approx(0.1 / b.norm().item() * 300 ** 0.5, rel=1e-5)
    assert "nan" in stats.text()
    img = stats.image()
    assert img.shape[0] == 1 and img.shape[-1] == 3 and torch.isfinite(img).all()


def test_report_with_an_all_zero_side(harness):
    """A block that is all zeros on one side (a passthrough at scale 0, a zero-initialized base block) has
    no defined cosine and an infinite change from zeros: the report must not say "unchanged" (Δ 0) or
    "identical" (cos 1) there.  Two zero blocks are identical: Δ 0, cos 1."""
    rep = pack(harness, "engine.report")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, generator=g)
    z = torch.zeros(300)
    stats = rep.MergeStats(lambda k: k.split(".")[0], ["one"], has_base=True)
    stats.add("merged_zero.w", z, x, [x])          # the merge is all zeros
    stats.add("base_zero.w", x, z, [z])            # moved away from an all-zero base and input
    stats.add("both_zero.w", z, z, [z])
    rows = {r["block"]: r for r in stats.summary()}
    assert rows["merged_zero"]["rel_change_base"] == pytest.approx(1.0)
    assert math.isnan(rows["merged_zero"]["cos_base"]) and math.isnan(rows["merged_zero"]["cos[one]"])
    assert rows["base_zero"]["rel_change_base"] == math.inf and math.isnan(rows["base_zero"]["cos_base"])
    assert rows["both_zero"]["rel_change_base"] == 0.0 and rows["both_zero"]["cos_base"] == 1.0
    text = stats.text()
    assert "inf" in text and "nan" in text
    img = stats.image()
    assert img.shape[0] == 1 and img.shape[-1] == 3 and torch.isfinite(img).all()


def test_report_shows_small_changes_and_not_rounding_noise(harness):
    """Δ of a fine-tune's scale (3e-5) printed as 0.0000, like an untouched block; the chart scaled the
    largest value to full width, so the fp rounding between identical models (1e-9) filled it.  Now Δ has
    4 significant digits, a full-width bar stands for at least 1e-6 and the title says for how much, and
    long block names are shortened in the middle (their numbers stay apart)."""
    import numpy as np
    rep = pack(harness, "engine.report")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, generator=g)
    stats = rep.MergeStats(lambda k: k.rsplit(".", 1)[0], ["one"], has_base=True)
    stats.add("tuned.w", x * (1 + 3e-5), x, [x])
    stats.add("noise.w", x * (1 + 1e-9), x, [x])
    row = next(line for line in stats.text().splitlines() if line.startswith("tuned |"))
    assert float(row.split(" | ")[2]) == pytest.approx(3e-5, rel=1e-2)

    def bar_pixels(values):
        img = (rep.grouped_chart(["a", "b"], ["one"], [("t", [values], rep._BAR_FLOOR)])[0].numpy() * 255)
        img = img.round().astype(np.uint8)[:, rep.CHART_LEFT:]        # the panel, not the legend
        return int((np.abs(img.astype(int) - np.array(rep.PALETTE[0])).sum(-1) == 0).sum())
    assert bar_pixels([1e-9, 2e-9]) <= 2 * 2 * 10          # 2-pixel stubs: no bars
    assert bar_pixels([0.5, 1.0]) > 100 * 11
    a, b = rep._elide("transformer.very_long_module_name_blocks.12.", 29), \
        rep._elide("transformer.very_long_module_name_blocks.13.", 29)
    assert len(a) == 29 and a != b and a.endswith("blocks.12.")


def _bar_widths(img, colour, x0, x1):
    """The widths of the bars of ``colour`` that start at x0 (a panel's left edge), ending before x1, top
    to bottom (one per run of rows)."""
    import numpy as np
    hit = (np.abs(img[:, x0:x1].astype(int) - np.array(colour)).sum(-1) == 0)
    widths, prev = [], 0
    for row in hit:
        w = int(np.argmin(row)) if not row.all() else len(row)     # the run from x0
        w = w if row[0] else 0
        if w and not prev:
            widths.append(w)
        prev = w
    return widths


@pytest.mark.parametrize("with_base", [True, False])
def test_report_image_shows_every_comparison_in_both_panels(harness, with_base):
    """The chart drew one series (Δ vs the base, or vs model 1); the issue asks for the change from the
    base and from each input, as relative change and cosine.  Now each comparison has its bars in its
    colour, in a Δ panel and an angle (arccos of the cosine) panel, each bar as long as its value over the
    panel's largest; a non-finite value is an orange stub."""
    import numpy as np
    rep = pack(harness, "engine.report")
    g = torch.Generator().manual_seed(6)
    names = ["one", "two", "three"]
    stats = rep.MergeStats(lambda k: k.split(".")[0], names, has_base=with_base)
    for blk, scale in (("a", 0.02), ("b", 0.3), ("c", 0.1)):
        b = torch.randn(2000, generator=g)
        xs = [b + scale * (i + 1) * torch.randn(2000, generator=g) for i in range(3)]
        stats.add(blk + ".w", (xs[0] + xs[1] + xs[2]) / 3, b if with_base else None, xs)
    stats.add("z.w", torch.randn(2000, generator=g), torch.zeros(2000) if with_base else None,
              [torch.zeros(2000)] * 3)                 # Δ inf, cos nan against zeros
    rows = stats.summary()
    cols = (["base"] if with_base else []) + [f"[{n}]" for n in names]
    img = (stats.image()[0].numpy() * 255).round().astype(np.uint8)
    left, pw, gap = rep.CHART_LEFT, rep.CHART_PANEL, rep.CHART_GAP
    for p, (fig, conv) in enumerate((("rel_change", float), ("cos", lambda c: math.degrees(math.acos(c))))):
        x0 = left + p * (pw + gap)
        values = [[conv(r[f"{fig}_base" if c == "base" else f"{fig}{c}"]) for r in rows[:3]] for c in cols]
        vmax = max(max(v) for v in values)
        for si, vs in enumerate(values):
            widths = _bar_widths(img, rep.PALETTE[si], x0, x0 + pw + 2)
            assert len(widths) == 3, (p, si, widths)     # blocks a, b, c; nothing for z
            for w, v in zip(widths, vs):
                assert abs(w - (int(pw * v / vmax) + 1)) <= 1, (p, si, w, v, vmax)
        stubs = _bar_widths(img, rep.NON_FINITE, x0, x0 + pw + 2)
        assert stubs == [6] * len(cols)                   # the z row: one stub per comparison
    assert len(_bar_widths(img, rep.PALETTE[len(cols)], 0, img.shape[1])) == 0


def test_report_image_with_many_inputs_draws_distinct_colours_and_stays_small(harness):
    """64 inputs made a 16,000-pixel-high image whose ten colours repeated (no bar could be told apart):
    the chart now draws the first len(PALETTE) comparisons, each in its own colour."""
    import numpy as np
    rep = pack(harness, "engine.report")
    assert len(set(rep.PALETTE)) == len(rep.PALETTE) and rep.NON_FINITE not in rep.PALETTE
    g = torch.Generator().manual_seed(8)
    names = [f"model {i}" for i in range(1, 41)]
    stats = rep.MergeStats(lambda k: k.split(".")[0], names, has_base=True)
    for blk in range(30):
        b = torch.randn(500, generator=g)
        xs = [b + 0.01 * (i + 1) * torch.randn(500, generator=g) for i in range(len(names))]
        stats.add(f"b{blk}.w", sum(xs) / len(xs), b, xs)
    img = stats.image()
    assert img.shape[1] < 3000
    arr = (img[0].numpy() * 255).round().astype(np.uint8)
    x0, pw = rep.CHART_LEFT, rep.CHART_PANEL
    for colour in rep.PALETTE:
        assert len(_bar_widths(arr, colour, x0, x0 + pw + 2)) == 30, colour


def test_a_clip_weight_kept_for_non_finite_values_is_named_in_the_report(harness):
    """A CLIP weight the checkpoint does not hold (ComfyUI leaves it uninitialized: NaN) is kept as is; the
    report's table leaves it out, and a warning under it now says so (it was only in the log)."""
    mn = pack(harness, "nodes.merger_nodes")
    base = fixtures._build_small_clip("SD15", 0)
    sd = base.cond_stage_model.state_dict()
    key = next(k for k in sd if k.endswith(".transformer.text_projection.weight"))
    with torch.no_grad():
        sd[key].fill_(float("nan"))
    models = [(None, fixtures.small_clip("SD15", delta_seed=s, delta_scale=0.02), {}, f"model {s}") for s in (1, 2)]
    _, text, _ = mn.run_merge("clip", base, pack(harness, "merge_methods").create("task_arithmetic"), models, 0,
                              "cpu", "fp32", "error")
    assert any(line.startswith("warning: ") and "kept as is: not finite" in line and key.split(".")[-3] in line
               for line in text.splitlines())


def test_fp16_overflow_and_non_finite_inputs_are_errors_that_name_the_key_and_model(harness):
    """Finite fp16 inputs whose merge does not fit fp16 (40000 + 40000 with linear, normalize off): an error
    naming the key, not a model holding inf.  A NaN in model 2: the message says 'model 2', as the nodes
    number the models (it said [1])."""
    eng, mm = pack(harness, "engine.merge"), pack(harness, "merge_methods")
    key = "diffusion_model.output_blocks.3.1.proj_out.weight"
    big = [fixtures._build_small_model("SD15", 0, torch.float16, i + 1, DELTA) for i in range(2)]
    with torch.no_grad():
        for m in big:
            m.model.state_dict()[key].view(-1)[:3] = 40000.0
    linear = mm.create("linear", normalize=False)
    # (without a base the method returns model 1's fp16 already: the message does not print a largest
    # value of inf)
    with pytest.raises(mm.MergeError, match=r"new values of " + re.escape(key) + r" do not fit the model's fp16 "
                                            r"\(some values round to ±inf, fp16 holds up to 65504\)"):
        eng.merge_models(None, [eng.MergeInput(m) for m in big], linear, eng.MergeOptions())
    # at half the weight it fits, and is exact
    out = eng.merge_models(None, [eng.MergeInput(m, {"weight": 0.5}) for m in big], linear, eng.MergeOptions())
    got = pack(harness, "engine.weights").KeySource.of(out).read(key, torch.device("cpu"))
    assert torch.isfinite(got).all() and float(got.view(-1)[0]) == 40000.0
    with torch.no_grad():
        big[1].model.state_dict()[key].view(-1)[5] = float("nan")
    with pytest.raises(mm.MergeError, match=re.escape(key) + "': model 2 contains NaN or Inf"):
        eng.merge_models(None, [eng.MergeInput(m, {"weight": 0.5}) for m in big], linear, eng.MergeOptions())


def test_fp16_models_with_an_empty_parameter_merge(harness):
    """A zero-element weight in an fp16 model: the fp16 range check skips it (aminmax has nothing to
    reduce) and the merge goes through."""
    eng, mm = pack(harness, "engine.merge"), pack(harness, "merge_methods")
    ms = [fixtures._build_small_model("SD15", 0, torch.float16, i + 1, DELTA) for i in range(2)]
    for m in ms:
        m.model.diffusion_model.out[2].register_parameter(
            "empty", torch.nn.Parameter(torch.empty(0, dtype=torch.float16), requires_grad=False))
    out = eng.merge_models(None, [eng.MergeInput(m) for m in ms], mm.create("weighted_sum", ratio=0.5),
                           eng.MergeOptions(device="cpu"))
    assert out.patches["diffusion_model.out.2.empty"][-1][1][1][0].shape == (0,)


# ---------------------------------------------------------------------------------------------
# add_difference and its kin: the result is model 1 (A) changed; an inpainting A stays one
# ---------------------------------------------------------------------------------------------
class AnyArchModel(_AnyArchModel):
    """Test node: the small MODEL of any architecture fixtures builds (inpainting ones included), tuned by DELTA."""

    def go(self, arch, delta_seed):
        return (fixtures.small_model(arch, delta_seed=delta_seed or None, delta_scale=DELTA if delta_seed else 0.0),)


def _difference_graph(method, a_arch, b_arch, c_arch, global_inputs=None, on_mismatch="error"):
    any_model = {"class_type": "MergeLabTest_AnyArchModelDelta"}
    return {
        "a": dict(any_model, inputs={"arch": a_arch, "delta_seed": 3}),
        "b": dict(any_model, inputs={"arch": b_arch, "delta_seed": 5}),
        "c": dict(any_model, inputs={"arch": c_arch, "delta_seed": 0}),
        "ia": {"class_type": "MergeLab_MergeInput", "inputs": {"model": ["a", 0]}},
        "ib": {"class_type": "MergeLab_MergeInput", "inputs": {"model": ["b", 0], "models": ["ia", 0]}},
        "m": {"class_type": f"MergeLab_Method_{method}", "inputs": dict(global_inputs or {})},
        "merge": {"class_type": "MergeLab_ModelMerger",
                  "inputs": {"method": ["m", 0], "models": ["ib", 0], "base": ["c", 0], "seed": 0, "device": "auto",
                             "compute_dtype": "fp32", "on_mismatch": on_mismatch}},
        "cap": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 0], "name": "out"}},
        "cap_a": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["a", 0], "name": "a"}},
        "cap_report": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 1], "name": "report"}},
    }


@pytest.mark.parametrize("method,inpaint,arch,wide,width", [
    ("add_difference", "SD15_inpaint", "SD15", "diffusion_model.input_blocks.0.0.weight", 4),
    ("train_difference", "SD15_inpaint", "SD15", "diffusion_model.input_blocks.0.0.weight", 4),
    ("add_difference", "SD15_instructpix2pix", "SD15", "diffusion_model.input_blocks.0.0.weight", 4),
    ("add_difference", "FluxInpaint", "Flux", "diffusion_model.img_in.weight", 64)])
def test_a_difference_added_to_an_inpainting_model_keeps_it_one(harness, method, inpaint, arch, wide, width):
    """The classic recipe: inpainting A + (fine-tune B − its base C).  The result was a copy of the base C, so
    A's 9-channel first layer was a mismatch (with on_mismatch skip the result was a plain SD1.5 model).  Now
    the result is a copy of A: every key is the method's result, and A's first layer is merged on the channels
    all share (the latent's) and keeps its mask / masked-image channels, as supermerger does; FLUX.1 Fill's
    img_in the same way, and an instruct-pix2pix A (a model class of its own in ComfyUI, which the architecture
    check refused as another architecture)."""
    harness.register_test_node("MergeLabTest_AnyArchModelDelta", AnyArchModel)
    r = harness.run_ok(harness.with_defaults(_difference_graph(method, inpaint, arch, arch, {"alpha": 0.7})))
    out, a = r.captured["out"], r.captured["a"]
    assert out.model is a.model                                         # a copy of A
    a_model = fixtures.small_model(inpaint, delta_seed=3, delta_scale=DELTA)
    b_model = fixtures.small_model(arch, delta_seed=5, delta_scale=DELTA)
    c_model = fixtures.small_model(arch)
    mm = pack(harness, "merge_methods")
    m = mm.create(method, alpha=0.7)
    sd_a, sd_b, sd_c = (x.model.state_dict() for x in (a_model, b_model, c_model))
    got = effective(out, wide, harness)
    assert got.shape == sd_a[wide].shape and sd_b[wide].shape[1] == width
    want = m.merge(sd_c[wide].float(), [sd_a[wide][:, :width].float(), sd_b[wide].float()], key=wide)
    assert torch.equal(got[:, :width], want)
    assert torch.equal(got[:, width:], sd_a[wide][:, width:].float())
    assert not torch.equal(got[:, :width], sd_a[wide][:, :width].float())
    keys = [k for k in sd_a if k.startswith("diffusion_model.") and k != wide]
    for key in sample_keys(keys):
        want = m.merge(sd_c[key].float(), [sd_a[key].float(), sd_b[key].float()], key=key)
        assert torch.equal(effective(out, key, harness), want), key
    assert "more input channels" in r.captured["report"]
    if method == "add_difference" and arch == "SD15":
        # a mask made for A: its unselected entries keep A's values, on the wide layer too
        g = _difference_graph(method, inpaint, arch, arch, {"alpha": 0.7})
        g["mask"] = {"class_type": "MergeLab_RandomMasker", "inputs": {"model": ["a", 0], "density": 0.5, "seed": 1}}
        g["merge"]["inputs"]["mask"] = ["mask", 0]
        g["cap_mask"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["mask", 0], "name": "mask"}}
        r2 = harness.run_ok(harness.with_defaults(g))
        sel = r2.captured["mask"].selection(wide, got.shape, "cpu")
        masked = effective(r2.captured["out"], wide, harness)
        assert 0 < int(sel.sum()) < sel.numel()
        assert torch.equal(masked, torch.where(sel, got, sd_a[wide].float()))
        # a mask made for the base C (4 channels) applies to the shared channels; A's others are kept
        g["mask"]["inputs"]["model"] = ["c", 0]
        r3 = harness.run_ok(harness.with_defaults(g))
        sel = r3.captured["mask"].selection(wide, (got.shape[0], width) + tuple(got.shape[2:]), "cpu")
        masked = effective(r3.captured["out"], wide, harness)
        assert torch.equal(masked[:, :width], torch.where(sel, got[:, :width], sd_a[wide][:, :width].float()))
        assert torch.equal(masked[:, width:], sd_a[wide][:, width:].float())


def test_an_inpainting_model_in_the_wrong_place_is_an_error_saying_where_it_goes(harness):
    """add_difference with the inpainting model as B: its first layer cannot go into a copy of A; the error
    says the result is a copy of model 1 and that such a model belongs there."""
    harness.register_test_node("MergeLabTest_AnyArchModelDelta", AnyArchModel)
    r = harness.run(harness.with_defaults(_difference_graph("add_difference", "SD15", "SD15_inpaint", "SD15")))
    assert not r.success
    text = r.error_text()
    assert "diffusion_model.input_blocks.0.0.weight (32, 9, 3, 3) vs (32, 4, 3, 3)" in text
    assert "the result is a copy of model 1" in text


def test_add_difference_keeps_model_1s_settings(harness):
    """A v-prediction A (ModelSamplingDiscrete) + (B − C) with eps B and C: the result samples as A does (it
    was a copy of the eps base C, with a warning that A's sampling was dropped)."""
    harness.register_test_node("MergeLabTest_AnyArchModelDelta", AnyArchModel)
    g = _difference_graph("add_difference", "SD15", "SD15", "SD15")
    g["vp"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["a", 0], "sampling": "v_prediction",
                                                                 "zsnr": False}}
    g["ia"]["inputs"]["model"] = ["vp", 0]
    r = harness.run_ok(harness.with_defaults(g))
    import comfy.model_sampling
    assert isinstance(r.captured["out"].get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert "not in the result" not in r.captured["report"]


class _Keys:
    """A stand-in for a KeySource in :func:`plan_keys`: keys and shapes only."""

    def __init__(self, shapes):
        self.entries = dict(shapes)

    def keys(self):
        return list(self.entries)

    def shape(self, k):
        return torch.Size(self.entries[k])


def test_only_the_layer_that_takes_the_models_input_is_widened(harness):
    """A key is merged on its shared input channels only when the models' own input channels differ in the
    same proportion: an inpainting model's first layer (9:4), not SD2's cross-attention against SD1's
    (1024:768), which ComfyUI's architecture check lets through (both are BaseModel)."""
    merge = pack(harness, "engine.merge")
    first, attn = "diffusion_model.input_blocks.0.0.weight", "diffusion_model.x.attn2.to_k.weight"
    ref = _Keys({first: (320, 9, 3, 3), attn: (320, 1024)})
    other = _Keys({first: (320, 4, 3, 3), attn: (320, 768)})
    widened = {}
    keys = merge.plan_keys(ref, [other], ["base", "model 1"], "skip", ref_index=0, widened=widened, channels=[9, 4])
    assert widened == {first: 4} and keys == [first]            # attn2 is skipped as a mismatch, not widened
    widened = {}
    with pytest.raises(merge.MergeError, match="other shapes"):
        merge.plan_keys(ref, [other], ["base", "model 1"], "error", ref_index=0, widened=widened, channels=[4, 4])
    assert widened == {}

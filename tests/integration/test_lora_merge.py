"""Merging, stacking and resizing LoRAs through the executor, checked against the ΔW algebra."""
import math

import pytest
import torch

from mergelab import fixtures
from mergelab.harness import api_node

from lora_testing import VALUES, LoraValueNode, pack  # noqa: E402  (shared LoRA test helpers)


def delta_patched(obj, seed, rank, unet, biases=False):
    """A clone of ``obj`` with a rank-``rank``(+noise) ``diff`` on every ≥2-D weight (and on biases)."""
    out = obj.clone()
    patcher = out if unet else out.patcher
    patches = {}
    for k, t in patcher.model.state_dict().items():
        if (unet and not k.startswith("diffusion_model.")) or not t.is_floating_point() or t.dim() == 0:
            continue
        if k.endswith((".position_ids", ".logit_scale")) or (t.dim() < 2 and not biases):
            continue
        g = torch.Generator().manual_seed(seed * 7919 + len(k) * 31 + sum(map(ord, k)))
        if t.dim() < 2:
            d = torch.randn(t.shape, generator=g) * 0.01
        else:
            m, n = t.shape[0], t[0].numel()
            d = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) * (0.02 / math.sqrt(rank * n))
            d += torch.randn(m, n, generator=g) * (0.002 / math.sqrt(n))
            d = d.reshape(t.shape)
        patches[k] = ("diff", (d,))
    out.add_patches(patches, 1.0)
    return out


_LORAS = {}


def make_lora(harness, seed, rank, biases=False):
    """A LoRA extracted (rank ``rank``) from the small SD15 model + a seeded delta, model and CLIP."""
    key = (seed, rank, biases)
    if key not in _LORAS:
        ops = pack(harness, "engine.lora_ops")
        svd = pack(harness, "engine.lora_svd")
        base, clip = fixtures.small_model("SD15"), fixtures.small_clip("SD15")
        tuned, tclip = delta_patched(base, seed, 2 * rank, True, biases), delta_patched(clip, seed, 2 * rank, False, biases)
        opts = ops.ExtractOptions(rank=svd.RankSpec("fixed", rank), bias_diff=biases)
        _LORAS[key], _ = ops.extract_lora(tuned, base, tclip, clip, opts, name=f"l{seed}")
    return _LORAS[key]


@pytest.fixture(scope="module", autouse=True)
def _nodes(harness):
    harness.register_test_node("MergeLabTest_LoraValue", LoraValueNode)


def merge_graph(method_node, method_inputs, entries, rank, rank_mode="fixed", rank_param=0.9, seed=0):
    g = {"method": {"class_type": method_node, "inputs": dict(method_inputs)}}
    prev = None
    for i, (key, params) in enumerate(entries):
        g[f"v{i}"] = {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": key}}
        inputs = {"lora": [f"v{i}", 0], "weight": 1.0, "density": 1.0, **params}
        if prev:
            inputs["loras"] = [prev, 0]
        g[f"in{i}"] = api_node("MergeLab_LoRAMergeInput", **inputs)
        prev = f"in{i}"
    g["merge"] = {"class_type": "MergeLab_MergeLoRAs", "inputs": {
        "method": ["method", 0], "loras": [prev, 0], "rank_mode": rank_mode, "rank": rank, "rank_param": rank_param,
        "seed": seed, "clamp_quantile": 1.0, "device": "auto"}}
    g["cap"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 0], "name": "lora"}}
    g["rep"] = {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 1], "name": "report"}}
    return g


def resize_graph(key, rank, rank_mode="fixed", rank_param=0.9):
    """Resize LoRA on the LoRA ``VALUES[key]``, its output captured as ``out``."""
    return {"v": {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": key}},
            "r": {"class_type": "MergeLab_ResizeLoRA", "inputs": {"lora": ["v", 0], "rank_mode": rank_mode,
                                                                  "rank": rank, "rank_param": rank_param,
                                                                  "clamp_quantile": 1.0, "device": "auto"}},
            "cap": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["r", 0], "name": "out"}}}


def method_inputs(harness, node):
    return api_node(node)["inputs"]


def deltas(lora):
    return {k: l.delta("cpu", torch.float32, k) for k, l in lora.layers.items()}


def assert_close(a, b, what):
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= 2e-5 * scale + 1e-8, what


def test_linear_merge_at_full_rank_equals_weighted_sum(harness):
    l1, l2 = make_lora(harness, 1, 4, biases=True), make_lora(harness, 2, 6, biases=True)
    VALUES.update(a=l1, b=l2)
    mi = dict(method_inputs(harness, "MergeLab_Method_linear"), normalize=False)
    res = harness.run_ok(merge_graph("MergeLab_Method_linear", mi, [("a", {"weight": 0.7}), ("b", {"weight": -0.4})],
                                     rank=10))
    out = res.captured["lora"]
    assert "linear in the models: exact on LoRA factors" in res.captured["report"]
    d1, d2, dm = deltas(l1), deltas(l2), deltas(out)
    assert set(dm) == set(d1) | set(d2)
    for k in dm:
        want = 0.7 * d1.get(k, 0) - 0.4 * d2.get(k, 0)
        assert_close(dm[k], want, k)
        if out.layers[k].kind == "lora":
            assert out.layers[k].rank == l1.layers[k].rank + l2.layers[k].rank      # concatenated, no SVD
    # applied through ComfyUI's patches it is the same difference
    ops_l = pack(harness, "engine.lora")
    ws = pack(harness, "engine.weights")
    base, clip = fixtures.small_model("SD15"), fixtures.small_clip("SD15")
    m, c = ops_l.apply_lora(out, base, clip, 1.0, 1.0)
    cpu = torch.device("cpu")
    for k in list(dm)[::23]:
        src, bsrc = (ws.KeySource.of(m), ws.KeySource.of(base)) if k.startswith("diffusion_model.") else \
            (ws.KeySource.of(c), ws.KeySource.of(clip))
        with torch.no_grad():
            assert_close(src.read(k, cpu) - bsrc.read(k, cpu), dm[k], k)


def test_linear_merge_below_the_summed_rank_is_the_optimal_truncation(harness):
    l1, l2 = make_lora(harness, 1, 4), make_lora(harness, 2, 6)
    VALUES.update(a=l1, b=l2)
    svd = pack(harness, "engine.lora_svd")
    mi = dict(method_inputs(harness, "MergeLab_Method_linear"), normalize=True)
    res = harness.run_ok(merge_graph("MergeLab_Method_linear", mi, [("a", {"weight": 1.0}), ("b", {"weight": 3.0})],
                                     rank=5))
    out = res.captured["lora"]
    d1, d2 = deltas(l1), deltas(l2)
    for k in list(out.layers)[::9]:
        want = 0.25 * d1[k] + 0.75 * d2[k]
        got = out.layers[k].delta()
        r = out.layers[k].rank
        assert r == min(5, want.shape[0], want[0].numel())
        err = float(torch.linalg.norm(got - want) / torch.linalg.norm(want))
        assert err == pytest.approx(svd.optimal_rank_error(want, r), rel=1e-3, abs=1e-5), k


def test_task_arithmetic_and_stack_strengths(harness):
    l1, l2 = make_lora(harness, 1, 4), make_lora(harness, 2, 6)
    VALUES.update(a=l1, b=l2)
    mi = dict(method_inputs(harness, "MergeLab_Method_task_arithmetic"), normalize=False, **{"lambda": 0.5})
    res = harness.run_ok(merge_graph("MergeLab_Method_task_arithmetic", mi,
                                     [("a", {"weight": 1.0}), ("b", {"weight": 2.0})], rank=10))
    d1, d2, dm = deltas(l1), deltas(l2), deltas(res.captured["lora"])
    for k in dm:
        assert_close(dm[k], 0.5 * d1[k] + 1.0 * d2[k], k)

    g = {"a": {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": "a"}},
         "b": {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": "b"}},
         "s1": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["a", 0], "strength_model": 0.5,
                                                                "strength_clip": 1.0}},
         "s2": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["b", 0], "strength_model": 1.0,
                                                                "strength_clip": -1.0, "stack": ["s1", 0]}},
         "cap": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["s2", 0], "name": "stack"}}}
    st = harness.run_ok(g).captured["stack"]
    ds = deltas(st)
    for k in ds:
        want = 0.5 * d1[k] + d2[k] if k.startswith("diffusion_model.") else d1[k] - d2[k]
        assert_close(ds[k], want, k)
    assert l1.layers and len(VALUES["a"].layers) == len(l1.layers)     # inputs untouched


def _largest_size(lora):
    return max(min(l.shape[0], math.prod(l.shape[1:])) for l in lora.layers.values() if len(l.shape) >= 2)


def test_nonlinear_method_runs_on_full_delta_and_is_seeded(harness):
    l1, l2 = make_lora(harness, 1, 4), make_lora(harness, 2, 6)
    VALUES.update(a=l1, b=l2)
    mm = pack(harness, "merge_methods")
    full = _largest_size(l1)
    mi = dict(method_inputs(harness, "MergeLab_Method_ties"))
    res = harness.run_ok(merge_graph("MergeLab_Method_ties", mi, [("a", {"density": 0.5}), ("b", {"density": 0.3})],
                                     rank=full))
    out = res.captured["lora"]
    assert "full ΔW" in res.captured["report"]
    ties = mm.create("ties", **mi)
    d1, d2 = deltas(l1), deltas(l2)
    for k in list(out.layers)[::11]:
        want = ties.merge(torch.zeros_like(d1[k]), [d1[k], d2[k]], key=k, seed=0, weight=[1.0, 1.0],
                          density=[0.5, 0.3])
        got = out.layers[k].delta()
        assert float(torch.linalg.norm(got - want)) <= 1e-4 * float(torch.linalg.norm(want)) + 1e-7, k

    dare = dict(method_inputs(harness, "MergeLab_Method_dare_linear"))
    runs = [harness.run_ok(merge_graph("MergeLab_Method_dare_linear", dare,
                                       [("a", {"density": 0.5}), ("b", {"density": 0.5})], rank=8, seed=s)
                           ).captured["lora"] for s in (3, 3, 4)]
    k = next(iter(runs[0].layers))
    assert torch.equal(runs[0].layers[k].delta(), runs[1].layers[k].delta())
    assert not torch.equal(runs[0].layers[k].delta(), runs[2].layers[k].delta())


def test_resize_keeps_strength_and_truncates_optimally(harness):
    lora_mod = pack(harness, "engine.lora")
    svd = pack(harness, "engine.lora_svd")
    src = make_lora(harness, 3, 8, biases=True)
    # the same ΔW with alpha 2 (scale 2/8): factors scaled by 2 so that ΔW is unchanged
    layers = {k: (lora_mod.LoraLayer("lora", l.shape, up=l.up * 2.0, down=l.down * 2.0, alpha=0.5 * l.rank / 2.0)
                  if l.kind == "lora" else l) for k, l in src.layers.items()}
    scaled = lora_mod.Lora.make(layers, src.names, src.arch, {"kind": "test", "name": "scaled"})
    for k in list(src.layers)[:5]:
        assert_close(scaled.layers[k].delta(), src.layers[k].delta(), k)
    VALUES["s"] = scaled
    g = resize_graph("s", 3)
    out = harness.run_ok(g).captured["out"]
    for k, l in out.layers.items():
        old = scaled.layers[k]
        if old.kind != "lora":
            assert l.kind == "diff" and torch.equal(l.diff, old.diff)
            continue
        assert l.rank == min(3, old.rank)
        assert l.alpha / l.rank == pytest.approx(old.alpha / old.rank)          # strength kept
        want = old.delta()
        err = float(torch.linalg.norm(l.delta() - want) / torch.linalg.norm(want))
        assert err == pytest.approx(svd.optimal_rank_error(want, l.rank), rel=1e-3, abs=1e-5), k
    # dynamic: sv_fro keeps 90 % of every layer's norm
    out = harness.run_ok(resize_graph("s", 8, "sv_fro", 0.9)).captured["out"]
    for k, l in out.layers.items():
        if l.kind == "lora":
            want = scaled.layers[k].delta()
            err = float(torch.linalg.norm(l.delta() - want) / torch.linalg.norm(want))
            assert err <= math.sqrt(1 - 0.81) + 1e-4


T_ATTN = "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight"     # 96 x 96


def _loha_and_lora(harness, tmp_path):
    """A LoHa (hada factors of rank 8) and a plain rank-8 LoRA on the same 96 x 96 weight of the small SD15."""
    import safetensors.torch
    lio = pack(harness, "engine.lora_io")
    base = fixtures.small_model("SD15")
    name = sorted(n for n, t in lio.key_map_for(base).items() if t == T_ATTN and n.startswith("lora_unet_"))[0]
    g = torch.Generator().manual_seed(0)

    def rn(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    loha = {f"{name}.hada_w1_a": rn(96, 8), f"{name}.hada_w1_b": rn(8, 96), f"{name}.hada_w2_a": rn(96, 8),
            f"{name}.hada_w2_b": rn(8, 96), f"{name}.alpha": torch.tensor(8.0)}
    plain = {f"{name}.lora_up.weight": rn(96, 8), f"{name}.lora_down.weight": rn(8, 96), f"{name}.alpha": torch.tensor(8.0)}
    out = []
    for tag, tensors in (("loha", loha), ("plain", plain)):
        path = str(tmp_path / f"{tag}.safetensors")
        safetensors.torch.save_file(tensors, path)
        out.append(lio.load_lora_file(path, base, name=tag))
    assert out[0].layers[T_ATTN].kind == "patch" and out[1].layers[T_ATTN].kind == "lora"
    return out


def test_linear_merge_factorizes_loha_layers_to_the_rank(harness, tmp_path):
    """A linear-family merge of layers that are not all LoRA factors (a LoHa, alone or with a LoRA) is
    factorized to the chosen rank, optimally, with the merger's seed; only plain differences stay full."""
    svd = pack(harness, "engine.lora_svd")
    loha, plain = _loha_and_lora(harness, tmp_path)
    VALUES.update(loha=loha, plain=plain)
    mi = dict(method_inputs(harness, "MergeLab_Method_linear"))
    for entries in ([("loha", {})], [("loha", {"weight": 0.7}), ("plain", {"weight": 0.3})]):
        runs = [harness.run_ok(merge_graph("MergeLab_Method_linear", mi, entries, rank=4, seed=s)).captured["lora"]
                for s in (0, 0, 7)]
        layer = runs[0].layers[T_ATTN]
        assert layer.kind == "lora" and layer.rank == 4, entries
        lorae = [VALUES[k] for k, _ in entries]
        w = [p.get("weight", 1.0) for _, p in entries]
        normalize = mi.get("normalize", True)
        want = sum(wi * l.layers[T_ATTN].delta() for wi, l in zip(w, lorae)) / (sum(w) if normalize else 1.0)
        err = float(torch.linalg.norm(layer.delta() - want) / torch.linalg.norm(want))
        assert err == pytest.approx(svd.optimal_rank_error(want, 4), rel=2e-3), entries
        assert torch.equal(runs[0].layers[T_ATTN].delta(), runs[1].layers[T_ATTN].delta())
        # the seed drives the randomized SVD
        assert not torch.equal(runs[0].layers[T_ATTN].delta(), runs[2].layers[T_ATTN].delta())


def test_resize_factorizes_full_differences(harness, tmp_path):
    """LoRA Stack turns a LoHa at strength 0.5 into a full difference; Resize then factorizes it to the rank
    (optimally), as it does the LoHa itself."""
    lora_mod = pack(harness, "engine.lora")
    svd = pack(harness, "engine.lora_svd")
    loha, _ = _loha_and_lora(harness, tmp_path)
    stacked = lora_mod.stack_loras([(loha, 0.5, 1.0)])
    assert stacked.layers[T_ATTN].kind == "diff"
    for tag, src in (("stacked", stacked), ("loha", loha)):
        VALUES["r"] = src
        layer = harness.run_ok(resize_graph("r", 4)).captured["out"].layers[T_ATTN]
        assert layer.kind == "lora" and layer.rank == 4, tag
        want = src.layers[T_ATTN].delta()
        err = float(torch.linalg.norm(layer.delta() - want) / torch.linalg.norm(want))
        assert err == pytest.approx(svd.optimal_rank_error(want, 4), rel=2e-3), tag


def test_resize_above_the_lora_layers_rank_still_factorizes_a_loha(harness, tmp_path):
    """A LoHa layer beside a rank-8 LoRA layer, resized to rank 16 (above the LoRA layer's rank): the LoHa
    is factorized to rank 16, optimally, and the LoRA layer is kept as it is (no refusal: something
    changes).  A LoRA with LoRA layers only, at a rank above all of them, is still refused."""
    lora_mod = pack(harness, "engine.lora")
    svd = pack(harness, "engine.lora_svd")
    loha, plain = _loha_and_lora(harness, tmp_path)
    other = T_ATTN.replace("to_q", "to_k")
    mixed = lora_mod.Lora.make({T_ATTN: loha.layers[T_ATTN], other: plain.layers[T_ATTN]}, {}, dict(loha.arch),
                               {"name": "mixed"})
    VALUES["r"] = mixed
    out = harness.run_ok(resize_graph("r", 16)).captured["out"]
    layer = out.layers[T_ATTN]
    assert layer.kind == "lora" and layer.rank == 16
    want = loha.layers[T_ATTN].delta()
    assert int(torch.linalg.matrix_rank(want)) > 16
    err = float(torch.linalg.norm(layer.delta() - want) / torch.linalg.norm(want))
    assert err == pytest.approx(svd.optimal_rank_error(want, 16), rel=2e-3)
    assert out.layers[other] is plain.layers[T_ATTN]
    VALUES["r"] = plain
    res = harness.run(resize_graph("r", 16))
    assert not res.success and "its largest rank is 8" in res.error_text()


WEIGHT_SPACE = {"slerp", "karcher", "arcee_fusion", "multi_domain_alignment", "add_cosine_a", "add_cosine_b",
                "geometric_sum", "distribution_crossover", "similarity_add_difference", "top_k_tensor_sum",
                "multiply_quotient"}


def test_methods_that_look_at_the_weights_are_flagged_on_loras(harness):
    """A LoRA merge runs the method on differences against a zero base.  For task-vector methods that is
    the method on the models (minus the base); for the ones that look at the weights themselves it is
    not, and the report says so.  The probe tells them apart at the methods' defaults."""
    ops = pack(harness, "engine.lora_ops")
    mm = pack(harness, "merge_methods")
    for name in mm.names():
        m = mm.create(name)
        n = 1 if m.spec.max_models == 1 else max(2, m.spec.min_models)
        gap = ops.base_dependence(m, m.per_model_values(n, {}), n)
        assert gap is not None, name
        if name in WEIGHT_SPACE:
            assert gap > 0.05, (name, gap)
        else:
            assert gap < 1e-3, (name, gap)


def test_slerp_of_one_lora_is_flagged_in_the_report(harness):
    """slerp of one LoRA at t = 0.5 against a zero base gives sin(π/4)·ΔW (not ~0.5·ΔW as on the models):
    the report says the method looks at the weights themselves."""
    lora = make_lora(harness, 21, 4)
    VALUES["one"] = lora
    g = merge_graph("MergeLab_Method_slerp", {"t": 0.5}, [("one", {})], rank=4)
    got = harness.run_ok(g).captured
    report, out = got["report"], got["lora"]
    assert "slerp looks at the weights themselves" in report
    k = next(iter(lora.layers))
    assert_close(out.layers[k].delta(), math.sin(math.pi / 4) * lora.layers[k].delta(), k)
    g = merge_graph("MergeLab_Method_ties", method_inputs(harness, "MergeLab_Method_ties"), [("one", {})], rank=4)
    assert "looks at the weights" not in harness.run_ok(g).captured["report"]


def test_nonlinear_merge_of_sliced_and_fused_keys_runs_on_the_whole_weight(harness, tmp_path):
    """A diffusers Flux LoRA (q/k/v apart: slices of the fused img_attn.qkv) and one with the fused key: a
    non-linear method runs on each LoRA's whole ΔW of that weight, as ComfyUI applies them, not on the
    slices against zeros."""
    import safetensors.torch
    lora_mod, lio = pack(harness, "engine.lora"), pack(harness, "engine.lora_io")
    base = fixtures.small_model("Flux")
    q = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    shape = lora_mod.weight_shapes(base)[q]
    g = torch.Generator().manual_seed(0)
    split = {}
    for part in ("to_q", "to_k", "to_v"):
        n = f"transformer.transformer_blocks.0.attn.{part}"
        split[n + ".lora_A.weight"] = torch.randn(4, shape[1], generator=g) * 0.1
        split[n + ".lora_B.weight"] = torch.randn(shape[0] // 3, 4, generator=g) * 0.1
    safetensors.torch.save_file(split, str(tmp_path / "split.safetensors"))
    a = lio.load_lora_file(str(tmp_path / "split.safetensors"), base, name="split")
    assert all(isinstance(k, tuple) for k in a.layers)
    fused = lora_mod.LoraLayer.from_factors(shape, torch.randn(shape[0], 4, generator=g) * 0.1,
                                            torch.randn(4, shape[1], generator=g) * 0.1)
    b = lora_mod.Lora.make({q: fused}, {}, dict(a.arch), {"kind": "test", "name": "fused"})
    _check_ties_on_the_whole_weight(harness, base, q, {"split": a, "fused": b})


def _check_ties_on_the_whole_weight(harness, base, q, loras):
    """Merge LoRAs (TIES, density 0.5, full rank) of ``loras`` (name → Lora) has one layer, on the whole
    weight ``q``, equal to TIES of the ΔW each LoRA makes of ``q`` as ComfyUI applies it."""
    lora_mod, weights, mm = pack(harness, "engine.lora"), pack(harness, "engine.weights"), pack(harness, "merge_methods")
    shape = lora_mod.weight_shapes(base)[q]
    VALUES.update(loras)

    def applied(lora):
        patched = lora_mod.apply_lora(lora, base, None, 1.0, 0)[0]
        cpu = torch.device("cpu")
        return weights.KeySource.of(patched).read(q, cpu) - weights.KeySource.of(base).read(q, cpu)

    mi = dict(method_inputs(harness, "MergeLab_Method_ties"))
    res = harness.run_ok(merge_graph("MergeLab_Method_ties", mi, [(name, {"density": 0.5}) for name in loras],
                                     rank=min(shape)))
    out = res.captured["lora"]
    assert list(out.layers) == [q]
    want = mm.create("ties", **mi).merge(torch.zeros(shape), [applied(l) for l in loras.values()], key=q, seed=0,
                                         weight=[1.0] * len(loras), density=[0.5] * len(loras))
    got = applied(out)
    assert float(torch.linalg.norm(got - want)) <= 1e-4 * float(torch.linalg.norm(want)), q


def test_lora_stack_block_weights_scale_each_blocks_strength(harness):
    """LoRA Block Weight: LoRA Stack with MBW block weights (IN04:0, OUT11:0.5, BASE:0.25) at strengths 0.8 /
    1.0: the layers of input_blocks.4 are dropped, those of output_blocks.11 and out. carry 0.4·ΔW, the text
    encoder's 0.25·ΔW, the rest 0.8·ΔW, exactly.  Block weights of another architecture, or scaling another
    parameter than the strength, are refused."""
    lora = make_lora(harness, 31, 4)
    VALUES["lbw"] = lora

    def graph(arch, mbw, param="weight"):
        return {"v": {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": "lbw"}},
                "bw": api_node("MergeLab_BlockWeightsMBW", arch=arch, mbw=mbw, param=param),
                "s": api_node("MergeLab_LoRAStack", lora=["v", 0], strength_model=0.8, strength_clip=1.0,
                              block_weights=["bw", 0]),
                "cap": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["s", 0], "name": "out"}}}

    out = harness.run_ok(graph("SD1", "IN04:0, OUT11:0.5, BASE:0.25")).captured["out"]
    seen = set()
    for k, layer in lora.layers.items():
        key = k[0] if isinstance(k, tuple) else k
        if key.startswith("diffusion_model.input_blocks.4."):
            assert k not in out.layers, k
            seen.add("in4")
            continue
        if key.startswith(("diffusion_model.output_blocks.11.", "diffusion_model.out.")):
            c = 0.4
            seen.add("out11")
        elif key.startswith("diffusion_model."):
            c = 0.8
        else:
            c = 0.25
            seen.add("clip")
        assert_close(out.layers[k].delta(), c * layer.delta(), k)
    assert seen == {"in4", "out11", "clip"}
    assert out.source["parts"][0]["block_weights"]["entries"]
    for args, match in ((("SDXL", "IN04:0"), "made for SDXL"), (("SD1", "IN04:0", "density"), "param to 'weight'")):
        res = harness.run(graph(*args))
        assert not res.success and match in res.error_text(), res.error_text()


def test_loras_splitting_a_fused_weight_differently_merge_on_the_whole_weight(harness, tmp_path):
    """One diffusers Flux LoRA trains to_q/to_k/to_v, another only to_q/to_v of the same img_attn.qkv: a
    non-linear method merged them only when some LoRA held the fused key; the whole weight's shape is now
    taken from what the loaded LoRAs know of it."""
    import safetensors.torch
    lora_mod, lio = pack(harness, "engine.lora"), pack(harness, "engine.lora_io")
    base = fixtures.small_model("Flux")
    q = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    shape = lora_mod.weight_shapes(base)[q]
    g = torch.Generator().manual_seed(1)
    loaded = []
    for name, parts in (("three", ("to_q", "to_k", "to_v")), ("two", ("to_q", "to_v"))):
        sd = {}
        for part in parts:
            n = f"transformer.transformer_blocks.0.attn.{part}"
            sd[n + ".lora_A.weight"] = torch.randn(4, shape[1], generator=g) * 0.1
            sd[n + ".lora_B.weight"] = torch.randn(shape[0] // 3, 4, generator=g) * 0.1
        safetensors.torch.save_file(sd, str(tmp_path / f"{name}.safetensors"))
        loaded.append(lio.load_lora_file(str(tmp_path / f"{name}.safetensors"), base, name=name))
    _check_ties_on_the_whole_weight(harness, base, q, {"three": loaded[0], "two": loaded[1]})

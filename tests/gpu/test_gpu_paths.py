"""The compute device "gpu" of every node that has one, through ComfyUI's executor with ComfyUI on the GPU:
each result equals the CPU's (random and magnitude masks bit for bit), lands on the offload device (the
CPU) in the inputs' dtype, and leaves no GPU memory allocated behind it.

Runs in a process of its own (see tests/conftest.py and tests/integration/test_gpu_suite.py)."""
import importlib

import pytest
import torch

from mergelab import fixtures

from gpu_mode import GPU_CHOICE, ON_GPU

ARCH = "SD15"
DELTA = 0.02
CPU = torch.device("cpu")

#: methods with iterations, SVDs or reductions whose order differs between devices: looser tolerances
ITERATIVE = {"geometric_median", "karcher", "lowrank_orthogonal_projection", "model_stock",
             "multi_domain_alignment", "ties_sum_extended", "multislerp", "nuslerp", "slerp"}


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


def small(delta_seed=0, dtype="fp32"):
    return {"class_type": "MergeLabTest_SmallModel",
            "inputs": {"arch": ARCH, "seed": 0, "delta_seed": delta_seed,
                       "delta_scale": DELTA if delta_seed else 0.0, "dtype": dtype}}


def cap(src, name, index=0):
    return {"class_type": "MergeLabTest_Capture", "inputs": {"value": [src, index], "name": name}}


def merge_graph(method, n_models, with_base, device, dtype="fp32", method_inputs=None, clip=False, extra=None,
                per_model=None):
    g = {"base": small(dtype=dtype)}
    prev = None
    for i in range(n_models):
        g[f"m{i}"] = small(delta_seed=i + 1, dtype=dtype)
        inputs = {"model": [f"m{i}", 0], "clip": [f"m{i}", 1], **(per_model or {})}
        if prev:
            inputs["models"] = [prev, 0]
        g[f"in{i}"] = {"class_type": "MergeLab_MergeInput", "inputs": inputs}
        prev = f"in{i}"
    g["method"] = {"class_type": f"MergeLab_Method_{method}", "inputs": dict(method_inputs or {})}
    merger = {"method": ["method", 0], "models": [prev, 0], "seed": 7, "device": device, **(extra or {})}
    if with_base:
        merger["base"] = ["base", 1 if clip else 0]
    g["merge"] = {"class_type": "MergeLab_CLIPMerger" if clip else "MergeLab_ModelMerger", "inputs": merger}
    g["cap"] = cap("merge", "out")
    return g


def n_models(spec):
    if spec.max_models is not None and spec.max_models < 3:
        return spec.max_models
    return max(3, spec.min_models)


def gpu_allocated() -> int:
    if not ON_GPU:
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def run_twice_clean(harness, graph, peak_below=None):
    """Run ``graph`` once to warm up (library workspaces, kernels), then again; the second run must leave
    exactly the GPU memory it found allocated, and allocate at most ``peak_below`` bytes more at any
    time when given.  Returns the second run's captures.  (One run in the dry run on the CPU.)"""
    if not ON_GPU:
        return harness.run_ok(harness.with_defaults(graph)).captured
    harness.run_ok(harness.with_defaults(graph))
    before = gpu_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = harness.run_ok(harness.with_defaults(graph))
    after = gpu_allocated()
    assert after == before, f"{after - before} bytes left allocated on the GPU by the run; {cuda_tensors()}"
    if peak_below is not None:
        peak = torch.cuda.max_memory_allocated() - before
        assert peak <= peak_below, f"the run took {peak} bytes of GPU memory at its peak (limit {peak_below})"
    return res.captured


def cuda_tensors(most: int = 12) -> str:
    """The CUDA tensors alive now (shape, dtype), the largest first: what a failed memory check left."""
    import gc
    import warnings
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # isinstance() on some lazy torch objects warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.is_cuda:
                    found.append((obj.numel() * obj.element_size(), tuple(obj.shape), str(obj.dtype)))
            except Exception:
                continue
    found.sort(reverse=True)
    return f"{len(found)} CUDA tensors alive: " + ", ".join(f"{shape} {dtype}" for _, shape, dtype in found[:most])


class Weights:
    """The effective weights of a merged model (one KeySource each)."""

    def __init__(self, harness, obj):
        self.obj = obj
        self.src = pack(harness, "engine.weights").KeySource.of(obj)

    def __getitem__(self, key):
        return self.src.read(key, CPU)


def merged_patches_on_offload_device(obj, dtype):
    patches = getattr(obj, "patcher", obj).patches
    assert patches, "the merge set no patches"
    for key, plist in patches.items():
        kind, args = plist[-1][1]
        assert kind == "set", key
        t = args[0]
        assert t.device.type == "cpu", f"{key}: merged weight kept on {t.device}"
        assert t.dtype == dtype, f"{key}: merged weight in {t.dtype}, expected {dtype}"


def sample_keys(keys, n=16):
    return keys[::max(1, len(keys) // n)]


#: a result that keeps at least this share of its parameters exactly at the base's values masks (TIES,
#: DARE, DELLA, breadcrumbs, nearswap, Arcee fusion, masked merges...): the GPU must keep the same ones
MASKED_SHARE = 0.01


def _compare(name, got, want, base, rtol, atol):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    if base is not None:
        kept = want == base
        if kept.float().mean() >= MASKED_SHARE:
            assert torch.equal(got == base, kept), f"{name}: CPU and GPU kept different parameters"


@pytest.mark.parametrize("method", [s.name for s in importlib.import_module("merge_methods").all_specs()])
def test_every_method_on_gpu_equals_cpu(harness, method):
    spec = pack(harness, "merge_methods").get_spec(method)
    n, with_base = n_models(spec), spec.base != "none"
    base = fixtures.small_model(ARCH)
    # sparsify (the defaults keep every parameter), so random masks and magnitude cuts are compared too;
    # methods without these parameters ignore them
    sparse = {"per_model": {"density": 0.3},
              "method_inputs": {p.name: 0.3 for p in spec.global_params if p.name == "select_topk"}}
    graph = {dev: merge_graph(method, n, with_base, dev, **sparse) for dev in ("cpu", GPU_CHOICE)}
    cpu = harness.run_ok(harness.with_defaults(graph["cpu"])).captured["out"]
    # key by key: the GPU holds a few tensors of one key at a time, never the inputs whole.  The bound,
    # one model's fp32 size, is 33 times the largest tensor (streaming needs about 4 per input) and a
    # half to a quarter of what holding the 2-4 inputs would take.
    one_model = sum(t.numel() * 4 for k, t in base.model.state_dict().items() if k.startswith("diffusion_model."))
    gpu = run_twice_clean(harness, graph[GPU_CHOICE], peak_below=one_model)["out"]
    merged_patches_on_offload_device(gpu, torch.float32)
    b, c, g = Weights(harness, base), Weights(harness, cpu), Weights(harness, gpu)
    keys = [k for k in b.src.keys() if k in gpu.patches]
    assert keys
    rtol, atol = (1e-3, 1e-4) if method in ITERATIVE else (1e-5, 1e-6)
    for key in sample_keys(keys):
        _compare(f"{method} {key}", g[key], c[key], b[key], rtol, atol)


def test_full_options_on_gpu_equal_cpu_fp16(harness):
    """fp16 inputs, block weights, a magnitude mask made on the GPU and the report: the merged weights are
    fp16 on the CPU and agree with the all-CPU merge; the masks are identical."""
    def graph(device):
        g = merge_graph("dare_ties", 3, True, device, dtype="fp16",
                        extra={"block_weights": ["bw", 0], "mask": ["mask", 0]})
        g["bw"] = {"class_type": "MergeLab_BlockWeightsMBW",
                   "inputs": {"arch": "SD1", "preset": "GRAD_V", "mbw": "", "param": "density"}}
        g["mask"] = {"class_type": "MergeLab_MagnitudeMasker",
                     "inputs": {"model_a": ["m0", 0], "model_b": ["base", 0], "quantile": 0.5, "select": "above",
                                "scope": "block", "device": device}}
        g["cap_mask"] = cap("mask", "mask")
        g["cap_report"] = cap("merge", "report", 1)
        return g

    cpu = harness.run_ok(harness.with_defaults(graph("cpu"))).captured
    gpu = run_twice_clean(harness, graph(GPU_CHOICE))
    merged_patches_on_offload_device(gpu["out"], torch.float16)
    layout_keys = cpu["mask"].layout.keys
    for key in layout_keys:
        assert torch.equal(gpu["mask"].dense(key), cpu["mask"].dense(key)), key
    base = fixtures.small_model(ARCH, dtype=torch.float16)
    b, c, g = Weights(harness, base), Weights(harness, cpu["out"]), Weights(harness, gpu["out"])
    for key in sample_keys(list(gpu["out"].patches)):
        _compare(f"fp16 {key}", g[key], c[key], b[key], 1e-3, 1e-3)
    assert "Δ vs" in gpu["report"]


@pytest.mark.parametrize("scope", ["tensor", "block", "model"])
@pytest.mark.parametrize("select", ["above", "below"])
def test_magnitude_masks_identical_on_cpu_and_gpu(harness, scope, select):
    def graph(device):
        return {"a": small(delta_seed=5), "b": small(),
                "mask": {"class_type": "MergeLab_MagnitudeMasker",
                         "inputs": {"model_a": ["a", 0], "model_b": ["b", 0], "quantile": 0.7, "select": select,
                                    "scope": scope, "device": device}},
                "cap": cap("mask", "mask")}
    cpu = harness.run_ok(harness.with_defaults(graph("cpu"))).captured["mask"]
    gpu = run_twice_clean(harness, graph(GPU_CHOICE))["mask"]
    assert gpu.selected_total() == cpu.selected_total()
    for key in cpu.layout.keys:
        assert torch.equal(gpu.dense(key), cpu.dense(key)), key


def test_masked_merger_and_normalize_on_gpu_equal_cpu(harness):
    def graph(device):
        return {"a": small(), "b": small(delta_seed=2),
                "mask": {"class_type": "MergeLab_RandomMasker", "inputs": {"model": ["a", 0], "density": 0.3,
                                                                          "seed": 3}},
                "mm": {"class_type": "MergeLab_MaskedModelMerger",
                       "inputs": {"model_a": ["a", 0], "model_b": ["b", 0], "mask": ["mask", 0], "ratio": 0.25,
                                  "device": device}},
                "na": {"class_type": "MergeLab_NormalizeModel",
                       "inputs": {"model_a": ["b", 0], "model_b": ["a", 0], "mode": "attn_only", "strength": 1.0,
                                  "device": device}},
                "nb": {"class_type": "MergeLab_NormalizeModel",
                       "inputs": {"model_a": ["b", 0], "model_b": ["a", 0], "mode": "all", "strength": 0.5,
                                  "device": device}},
                "c1": cap("mm", "masked"), "c2": cap("na", "attn"), "c3": cap("nb", "all")}
    cpu = harness.run_ok(harness.with_defaults(graph("cpu"))).captured
    gpu = run_twice_clean(harness, graph(GPU_CHOICE))
    a = Weights(harness, fixtures.small_model(ARCH))
    for name in ("masked", "attn", "all"):
        merged_patches_on_offload_device(gpu[name], torch.float32)
        c, g = Weights(harness, cpu[name]), Weights(harness, gpu[name])
        for key in sample_keys(list(gpu[name].patches)):
            _compare(f"{name} {key}", g[key], c[key], a[key], 1e-5, 1e-6)


def _lora_tensors_on_cpu(lora):
    for key, layer in lora.layers.items():
        for t in layer.tensors():
            assert t.device.type == "cpu", f"{key}: LoRA tensor kept on {t.device}"


def _assert_same_deltas(name, got, want, rel):
    assert set(got.layers) == set(want.layers), name
    for key in want.layers:
        dg, dw = got.layers[key].delta(device=CPU), want.layers[key].delta(device=CPU)
        err = (dg - dw).norm() / dw.norm().clamp_min(1e-12)
        assert err <= rel, f"{name} {key}: relative difference {float(err):.3g}"


@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_lora_extract_merge_resize_on_gpu_equal_cpu(harness, svd):
    def graph(device):
        return {"base": small(), "t1": small(delta_seed=1), "t2": small(delta_seed=2),
                "x1": {"class_type": "MergeLab_ExtractLoRA",
                       "inputs": {"tuned_model": ["t1", 0], "base_model": ["base", 0], "rank_mode": "fixed",
                                  "rank": 8, "svd": svd, "device": device}},
                "x2": {"class_type": "MergeLab_ExtractLoRA",
                       "inputs": {"tuned_model": ["t2", 0], "base_model": ["base", 0], "rank_mode": "fixed",
                                  "rank": 8, "svd": svd, "device": device}},
                "i1": {"class_type": "MergeLab_LoRAMergeInput", "inputs": {"lora": ["x1", 0]}},
                "i2": {"class_type": "MergeLab_LoRAMergeInput", "inputs": {"lora": ["x2", 0], "loras": ["i1", 0]}},
                "method": {"class_type": "MergeLab_Method_ties", "inputs": {}},
                "merge": {"class_type": "MergeLab_MergeLoRAs",
                          "inputs": {"method": ["method", 0], "loras": ["i2", 0], "rank_mode": "fixed", "rank": 8,
                                     "device": device}},
                "resize": {"class_type": "MergeLab_ResizeLoRA",
                           "inputs": {"lora": ["x1", 0], "rank_mode": "fixed", "rank": 4, "device": device}},
                "c1": cap("x1", "extract"), "c2": cap("merge", "merged"), "c3": cap("resize", "resized")}
    cpu = harness.run_ok(harness.with_defaults(graph("cpu"))).captured
    gpu = run_twice_clean(harness, graph(GPU_CHOICE))
    for name in ("extract", "merged", "resized"):
        _lora_tensors_on_cpu(gpu[name])
        _assert_same_deltas(f"{svd} {name}", gpu[name], cpu[name], 1e-3)


def test_clip_merger_on_gpu_equals_cpu(harness):
    cpu = harness.run_ok(harness.with_defaults(merge_graph("ties", 2, True, "cpu", clip=True))).captured["out"]
    gpu = run_twice_clean(harness, merge_graph("ties", 2, True, GPU_CHOICE, clip=True))["out"]
    merged_patches_on_offload_device(gpu.patcher, torch.float32)
    c, g = Weights(harness, cpu), Weights(harness, gpu)
    for key in sample_keys(list(gpu.patcher.patches)):
        _compare(f"clip {key}", g[key], c[key], None, 1e-5, 1e-6)

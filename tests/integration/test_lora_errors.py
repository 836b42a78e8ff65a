"""Bad input to the LoRA nodes gives clear errors and leaves nothing half-written; Cancel stops the work."""
import os

import pytest
import safetensors.torch
import torch

from mergelab import fixtures

from lora_testing import VALUES, LoraValueNode, pack  # noqa: E402  (shared LoRA test helpers)


def small(arch, seed=0, delta=0.0):
    return {"class_type": "MergeLabTest_SmallModel",
            "inputs": {"arch": arch, "seed": seed, "delta_seed": 1 if delta else 0, "delta_scale": delta,
                       "dtype": "fp32"}}


def extract_node(tuned, base, rank=4, **kw):
    inputs = {"tuned_model": [tuned, 0], "base_model": [base, 0], "rank_mode": "fixed", "rank": rank,
              "rank_param": 0.9, "svd": "randomized", "oversample": 16, "power_iterations": 2, "seed": 0,
              "clamp_quantile": 1.0, "bias_diff": False, "conv": True, "min_diff": 1e-6, "device": "auto"}
    inputs.update(kw)
    return {"class_type": "MergeLab_ExtractLoRA", "inputs": inputs}


@pytest.fixture(scope="module", autouse=True)
def _nodes(harness):
    harness.register_test_node("MergeLabTest_LoraValue", LoraValueNode)


@pytest.fixture(scope="module")
def sd15_lora(harness):
    ops = pack(harness, "engine.lora_ops")
    svd = pack(harness, "engine.lora_svd")
    base, clip = fixtures.small_model("SD15"), fixtures.small_clip("SD15")
    tuned = fixtures.small_model("SD15", delta_seed=3, delta_scale=0.01)
    tclip = fixtures.small_clip("SD15", delta_seed=3, delta_scale=0.01)
    lora, _ = ops.extract_lora(tuned, base, tclip, clip, ops.ExtractOptions(rank=svd.RankSpec("fixed", 4)),
                               name="sd15")
    return lora


def saved_file(harness, lora, name, tmp_path):
    lio = pack(harness, "engine.lora_io")
    path = str(tmp_path / name)
    safetensors.torch.save_file(lio.lora_state_dict(lora, "kohya", torch.float16), path)
    return harness.add_model_file("loras", path, name=name), path


def failure(res):
    assert not res.success
    return res.error_text()


def test_lora_for_another_architecture(harness, sd15_lora, tmp_path):
    name, _ = saved_file(harness, sd15_lora, "arch_sd15.safetensors", tmp_path)
    res = harness.run({"m": small("SDXL"),
                       "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "clip": ["m", 1],
                                                                           "lora_name": name}},
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["l", 0], "name": "x"}}})
    text = failure(res)
    assert "another architecture" in text and "arch_sd15" in text
    # a LORA made for SD1.5 applied to an SDXL model
    VALUES["sd15"] = sd15_lora
    res = harness.run({"m": small("SDXL"), "v": {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": "sd15"}},
                       "a": {"class_type": "MergeLab_ApplyLoRA", "inputs": {
                           "model": ["m", 0], "clip": ["m", 1], "lora": ["v", 0], "strength_model": 1.0,
                           "strength_clip": 1.0}},
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["a", 0], "name": "x"}}})
    assert "another architecture" in failure(res)
    # extracting from an SD1.5 and an SDXL model
    res = harness.run({"a": small("SD15"), "b": small("SDXL"), "x": extract_node("a", "b"),
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "x"}}})
    assert "different architectures" in failure(res)


def test_bad_ranks(harness, sd15_lora):
    # 0: refused by ComfyUI's validation (the widget's minimum) before anything runs
    res = harness.run({"a": small("SD15", delta=0.01), "b": small("SD15"), "x": extract_node("a", "b", rank=0),
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "x"}}})
    assert "rank" in failure(res)
    # above every layer's size
    res = harness.run({"a": small("SD15", delta=0.01), "b": small("SD15"), "x": extract_node("a", "b", rank=4000),
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "x"}}})
    text = failure(res)
    assert "rank 4000 is above the size of every" in text
    # a dynamic-mode parameter out of its range
    res = harness.run({"a": small("SD15", delta=0.01), "b": small("SD15"),
                       "x": extract_node("a", "b", rank_mode="sv_ratio", rank_param=0.5),
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "x"}}})
    assert "sv_ratio needs a ratio" in failure(res)
    # resizing above the LoRA's rank adds nothing
    VALUES["sd15"] = sd15_lora
    res = harness.run({"v": {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": "sd15"}},
                       "r": {"class_type": "MergeLab_ResizeLoRA", "inputs": {
                           "lora": ["v", 0], "rank_mode": "fixed", "rank": 16, "rank_param": 0.9,
                           "clamp_quantile": 1.0, "device": "auto"}},
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["r", 0], "name": "x"}}})
    assert "its largest rank is 4" in failure(res)


def test_identical_models_and_missing_inputs(harness):
    res = harness.run({"a": small("SD15"), "b": small("SD15"), "x": extract_node("a", "b"),
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "x"}}})
    assert "identical" in failure(res)
    g = {"a": small("SD15"), "x": extract_node("a", "a"),
         "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "x"}}}
    del g["x"]["inputs"]["base_model"]
    assert "both the tuned and the base MODEL" in failure(harness.run(g))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_or_truncated_file(harness, sd15_lora, tmp_path, damage):
    name, path = saved_file(harness, sd15_lora, f"broken_{damage}.safetensors", tmp_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        if damage == "garbage":
            f.write(os.urandom(4096))
        elif damage == "truncated":
            f.write(data[: len(data) // 2])
    res = harness.run({"m": small("SD15"),
                       "l": {"class_type": "MergeLab_LoadLoRA", "inputs": {"model": ["m", 0], "clip": ["m", 1],
                                                                           "lora_name": name}},
                       "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["l", 0], "name": "x"}}})
    text = failure(res)
    assert f"cannot read LoRA file 'broken_{damage}'" in text and "corrupted" in text


def _out_files(harness, sub="loras"):
    folder = os.path.join(harness.output_dir, sub)
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def save_graph(key, prefix, **kw):
    return {"v": {"class_type": "MergeLabTest_LoraValue", "inputs": {"key": key}},
            "s": {"class_type": "MergeLab_SaveLoRA", "inputs": {"lora": ["v", 0], "filename_prefix": prefix,
                                                                 "key_format": "kohya", "dtype": "fp16", **kw}},
            "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["s", 0], "name": "path"}}}


def test_save_never_overwrites_and_leaves_nothing_half_written(harness, sd15_lora, monkeypatch):
    import folder_paths
    VALUES["sd15"] = sd15_lora
    p1 = harness.run_ok(save_graph("sd15", "loras/nover")).captured["path"]
    first = open(os.path.join(harness.output_dir, p1), "rb").read()
    # ComfyUI's counter points at a name that exists (another process got there first): the next is used
    real = folder_paths.get_save_image_path

    def stale(prefix, out, *a, **k):
        folder, filename, counter, sub, pre = real(prefix, out, *a, **k)
        return folder, filename, 1, sub, pre
    monkeypatch.setattr(folder_paths, "get_save_image_path", stale)
    p2 = harness.run_ok(save_graph("sd15", "loras/nover")).captured["path"]
    monkeypatch.undo()
    assert p1 != p2 and p1.endswith("_00001_.safetensors") and p2.endswith("_00002_.safetensors")
    assert open(os.path.join(harness.output_dir, p1), "rb").read() == first

    # a failure while writing: no final file, no temporary file
    before = _out_files(harness)

    def broken(sd, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    res = harness.run(save_graph("sd15", "loras/nover"))
    monkeypatch.undo()
    assert "disk full" in failure(res)
    assert _out_files(harness) == before

    # a LoRA that cannot be written as LoRA tensors: refused before anything is written
    lm = pack(harness, "engine.lora")
    k = next(iter(sd15_lora.layers))
    bad = lm.Lora.make({k: lm.LoraLayer("patch", sd15_lora.layers[k].shape,
                                        patch=("set", (torch.zeros(sd15_lora.layers[k].shape),)))},
                       {k: sd15_lora.names[k]}, sd15_lora.arch, {"name": "bad"})
    VALUES["bad"] = bad
    assert "replaces the weight" in failure(harness.run(save_graph("bad", "loras/nover")))
    assert _out_files(harness) == before
    # a prefix outside the output folder
    assert "outside the output folder" in failure(harness.run(save_graph("sd15", "../../escape")))
    assert _out_files(harness) == before


def test_cancel_stops_extraction(harness):
    import comfy.model_management as mm
    import comfy.utils
    seen = []

    def hook(value, total, preview, node_id=None, **kw):
        seen.append((value, total))
        if len(seen) == 5:
            mm.interrupt_current_processing(True)
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        res = harness.run({"a": small("SD15", delta=0.01), "b": small("SD15"), "x": extract_node("a", "b"),
                           "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "x"}}})
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert not res.success
    assert any(e == "execution_interrupted" for e, _ in res.messages)
    total = seen[0][1]
    assert 5 <= len(seen) < total      # stopped right after the flag, long before the end


@pytest.mark.parametrize("stop_in", ["stack", "save"])
def test_cancel_stops_lora_stack_and_save_lora(harness, stop_in):
    """Cancel pressed while LoRA Stack combines layers or while Save LoRA converts them: neither checked
    it (Stack finished every layer; Save LoRA wrote its file and the prompt succeeded).  Now both stop at
    the next layer and Save LoRA leaves no file."""
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    seen = []

    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview, node_id=None, **kw):
        ctx = get_executing_context()
        if (node_id or (ctx.node_id if ctx else None)) == stop_in:
            seen.append((value, total))
            if len(seen) == 1:
                mm.interrupt_current_processing(True)
    g = {"a": small("SD15", delta=0.01), "b": small("SD15"), "x": extract_node("a", "b"),
         "stack": {"class_type": "MergeLab_LoRAStack", "inputs": {"lora": ["x", 0], "strength_model": 0.7,
                                                                  "strength_clip": 1.0}},
         "save": {"class_type": "MergeLab_SaveLoRA", "inputs": {"lora": ["stack", 0],
                                                                "filename_prefix": f"loras/cancel_{stop_in}",
                                                                "key_format": "kohya", "dtype": "fp16"}}}
    folder = os.path.join(folder_paths.get_output_directory(), "loras")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        res = harness.run(harness.with_defaults(g))
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert not res.success
    assert any(e == "execution_interrupted" for e, _ in res.messages)
    assert len(seen) == 1, seen          # stopped at the step after the flag
    after = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    assert after == before               # no file, no temporary

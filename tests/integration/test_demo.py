"""The demo (``make demo`` = ``python -m mergelab.demo``), in process on the session's ComfyUI.

It runs the demo's own function (:func:`mergelab.demo.run_demo`: the two example workflows through the
headless runner, with --set overrides for the model names) on the ``--small`` checkpoints: the same
code path (CheckpointLoaderSimple, the same workflows and nodes) on SD1.5-architecture checkpoints that
ComfyUI detects as SD15 but that are about 5× smaller than full-size ones (2-level UNet at SD1.5's
width, the real CLIP-L, a TAESD VAE), so the test takes a minute rather than many.
"""
import io
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mergelab import REPO_ROOT, demo, fixtures


@pytest.fixture(scope="module")
def demo_run(harness):
    paths = demo.fixture_checkpoints(small=True)        # generated once into .cache/fixtures, then reused
    names = {k: harness.add_model_file("checkpoints", p) for k, p in paths.items()}
    out = io.StringIO()
    res = demo.run_demo(harness, names, quiet=True, out=out, prefix="demo_test")
    return res, out.getvalue(), paths


def test_demo_writes_a_merged_checkpoint_and_its_difference_lora(harness, demo_run):
    import comfy.taesd.taesd

    import merge_methods
    res, printed, paths = demo_run
    assert os.path.basename(res.merged).startswith("demo_test_dare_ties_") and os.path.isfile(res.merged)
    assert os.path.basename(res.lora).startswith("demo_test_extracted_") and os.path.isfile(res.lora)
    assert [p for p, _ in res.files] == [res.merged, res.lora]
    assert all(n == os.path.getsize(p) > 0 for p, n in res.files)
    assert f"[run] wrote {res.merged} (" in printed and f"[run] wrote {res.lora} (" in printed  # the runner's

    # the merged checkpoint holds DARE-TIES of the three inputs (one UNet key recomputed from the fixture
    # values with merge_methods)
    disk_key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    comfy_key = disk_key[len("model."):]
    with safe_open(res.merged, "pt") as f:
        saved = f.get_tensor(disk_key)
    shape = demo.small_sd15_layout()[disk_key][0]
    base, a, b = (fixtures.fill_value(disk_key, shape, 0, ds, demo.DELTA_SCALE if ds else 0.0).half().float()
                  for ds in (None, 1, 2))
    want = merge_methods.create("dare_ties", normalize=True).merge(
        base, [a, b], key=comfy_key, seed=42, weight=[1.0, 1.0], density=[0.5, 0.5])
    assert saved.dtype == torch.float16 and not torch.equal(saved, base.half())
    torch.testing.assert_close(saved.float(), want.half().float(), rtol=2e-3, atol=2e-6)

    # ComfyUI's CheckpointLoaderSimple loads it as SD1.5 (with the TAESD VAE); the LoRA has kohya names for
    # the UNet and the text encoder, ComfyUI's LoraLoader applies it to the base, and base + LoRA is the
    # merged model as well as rank 32 allows (Eckart–Young optimum, + fp16 rounding of the factors)
    with safe_open(res.lora, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    harness.add_model_file("checkpoints", res.merged, name="demo_test_merged.safetensors")
    lora_name = harness.add_model_file("loras", res.lora, name="demo_test_lora.safetensors")
    run = harness.run_ok({
        "base": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": os.path.basename(paths["base"])}},
        "merged": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "demo_test_merged.safetensors"}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["base", 0], "clip": ["base", 1],
                                                        "lora_name": lora_name, "strength_model": 1.0,
                                                        "strength_clip": 1.0}},
        "c1": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["lora", 0], "name": "with_lora"}},
        "c2": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["base", 0], "name": "base"}},
        "c3": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merged", 0], "name": "merged"}},
        "c4": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merged", 2], "name": "merged_vae"}},
    })
    assert type(run.captured["merged"].model.model_config).__name__ == "SD15"
    assert isinstance(run.captured["merged_vae"].first_stage_model, comfy.taesd.taesd.TAESD)
    import importlib
    ws = importlib.import_module(f"{harness.pack_module_name}.engine.weights")
    svd = importlib.import_module(f"{harness.pack_module_name}.engine.lora_svd")
    src = {k: ws.KeySource.of(run.captured[k]) for k in ("with_lora", "base", "merged")}
    cpu = torch.device("cpu")
    patched = [k for k in src["with_lora"].keys() if src["with_lora"].has_patches(k)]
    assert len(patched) > 100
    linear = [k for k in patched if len(src["base"].shape(k)) == 2 and max(src["base"].shape(k)) <= 1280]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key in linear[::max(1, len(linear) // 4)][:4]:      # a few attention/linear layers across the UNet
            w0 = src["base"].read(key, cpu)
            d = src["merged"].read(key, cpu) - w0
            got = src["with_lora"].read(key, cpu) - w0
            err = float((got - d).norm() / d.norm())
            opt = svd.optimal_rank_error(d, min(32, d.shape[0], d.shape[1]))
            assert err <= 1.02 * opt + 2e-3, (key, err, opt)
    finally:
        torch.set_num_threads(n)


def test_demo_report(demo_run):
    res, printed, _ = demo_run
    assert res.methods[0].startswith("dare_ties (normalize=True")
    assert any("Merge Input A: weight 1.0, density 0.5" in m for m in res.methods)
    assert any(m.startswith("LoRA extraction: rank 32") for m in res.methods)
    assert "model merge: " in res.merge_report and "relative Frobenius error" in res.extract_report
    summary = res.block_summary
    assert len(summary) == 3 and summary[1].startswith("most changed:") and "blocks" in summary[0]
    # the summary's numbers are the report's: the largest change listed first is the report's maximum
    rows = [line.split(" | ") for line in res.merge_report.splitlines() if line.count(" | ") >= 3]
    values = {r[0]: float(r[2]) for r in rows[1:]}
    top_block = summary[1].split(":", 1)[1].split(",")[0].split()[0]
    assert values[top_block] == max(values.values())
    text = demo.format_report(res, 12.3)
    for needle in ("Methods:", "dare_ties", "Per-block change", "most changed", "Files written:",
                   os.path.basename(res.merged), os.path.basename(res.lora), "Total time: 12.3 s"):
        assert needle in text, needle


@pytest.mark.parametrize("args,expect", [
    (["--a", "x.safetensors"], "--a/--b/--base name checkpoints of --models"),
    (["--models", "/nonexistent-models"], "give the two checkpoints to merge"),
    (["--models", "/nonexistent-models", "--a", "x", "--b", "y"], "x is not in /nonexistent-models/checkpoints"),
])
def test_demo_cli_rejects_bad_arguments_before_starting(args, expect):
    proc = subprocess.run([sys.executable, "-m", "mergelab.demo", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr

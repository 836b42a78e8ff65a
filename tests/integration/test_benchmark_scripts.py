"""The scripts in benchmarks/ keep working: nothing here times anything (speed lives in the scripts' own
output), but a benchmark that no longer runs, or that measures a layout other than the one it names,
would go unnoticed until someone needs its numbers."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_mergelab_{name}", os.path.join(BENCH, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_method_benchmark_runs_every_registered_method(tmp_path):
    import merge_methods as mm
    out, shapes = tmp_path / "bench.json", tmp_path / "shapes.json"
    # a key over the CPU slice length (the sliced and streamed paths), a conv, a vector
    shapes.write_text(json.dumps({"big.weight": [1280, 1280], "conv.weight": [64, 32, 3, 3], "norm.bias": [320]}))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_merge_methods.py"), "--shapes", str(shapes),
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["methods"]}
    assert set(rows) == {s.name for s in mm.all_specs()}
    assert data["keys"] == 3 and data["parameters"] == 1280 * 1280 + 64 * 32 * 9 + 320
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        assert r["time_s"] > 0 and r["read_floor_s"] > 0, name
        spec = mm.get_spec(name)
        assert r["base"] == (spec.base != mm.BASE_NONE), name
        assert spec.min_models <= r["models"] <= (spec.max_models or r["models"]), name


def test_method_benchmark_gives_base_free_methods_their_models(tmp_path):
    """Without a method that takes a base in the run, three-model base-free methods still get three models
    (the inputs were taken from the second on, whatever the method: they got two)."""
    out, shapes = tmp_path / "bench.json", tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"w.weight": [64, 32]}))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_merge_methods.py"), "--shapes", str(shapes),
                           "--methods", "triple_sum,sum_twice,linear", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["methods"]}
    for name in ("triple_sum", "sum_twice", "linear"):
        assert rows[name]["error"] is None and rows[name]["models"] == 3, rows[name]


def test_builtin_sd15_layout_is_comfyuis(harness):
    """Without ComfyUI the method benchmark generates the SD1.5 UNet's keys itself: the same keys, shapes
    and order as ComfyUI's own model."""
    bench = _load("bench_merge_methods")
    ours = bench._sd15_shapes_generated()
    comfy = bench._sd15_shapes_from_comfy()
    assert ours == comfy
    assert len(ours) == 686
    assert sum(bench.math.prod(s) for _, s in ours) == 859_520_964


@pytest.mark.parametrize("script", ["bench_model_merge", "bench_masks", "bench_save", "bench_lora_extract"])
def test_benchmark_scripts_start(script):
    """The scripts that need the full-size fixtures (minutes) are not run here; they must at least import
    (their shared helpers included) and parse their arguments."""
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script + ".py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_peak_rss_sees_an_allocation():
    sys.path.insert(0, BENCH)
    try:
        from peak_rss import PeakRSS
    finally:
        sys.path.remove(BENCH)
    import torch
    with PeakRSS() as rss:
        t = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MiB, touched, alive at the block's end
    del t
    assert rss.peak - rss.base >= 48 << 20
    assert rss.extra_gb == (rss.peak - rss.base) / 2**30

"""Starts tests/gpu (the compute device "gpu" of every node, against the CPU) in a process of its own:
it needs a ComfyUI booted on the GPU, and this process's ComfyUI runs with --cpu.  Without CUDA it is a
dry run on the CPU (the same graphs and comparisons, CPU against CPU), so the suite keeps working."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_suite_in_its_own_process():
    mode = "1" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, MERGELAB_GPU_TESTS=mode, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "gpu")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"tests/gpu (MERGELAB_GPU_TESTS={mode}) failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]

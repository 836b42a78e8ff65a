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


def test_pack_boots_with_only_what_the_gpu_machine_has(tmp_path, harness):
    """What tests/gpu/device_check.sh needs on a lent GPU machine is there: with the imports that machine
    cannot serve refused (its image's packages plus the carried wheels, tests/gpu/device_carry.py), ComfyUI
    boots and loads every node of the pack, so a device check (minutes of scarce GPU time) cannot die on
    an import."""
    carry = os.path.join(ROOT, "tests", "gpu", "device_carry.py")
    subprocess.run([sys.executable, carry, "--simulate", str(tmp_path)], check=True, capture_output=True)
    code = ("import importlib, sys\n"
            "try:\n    importlib.import_module('sqlalchemy')\nexcept ModuleNotFoundError as e:\n"
            "    assert 'not on the GPU machine' in str(e)\nelse:\n    sys.exit('the simulation refused nothing')\n"
            "from mergelab.harness import Harness\n"
            "h = Harness()\nprint('NODES', len(h.pack_node_ids))\nh.close()\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"NODES {len(harness.pack_node_ids)}\n" in r.stdout, r.stdout[-2000:]
    check = subprocess.run(["bash", "-n", os.path.join(ROOT, "tests", "gpu", "device_check.sh")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

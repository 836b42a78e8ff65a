"""The GPU suite's ComfyUI: booted without --cpu when MERGELAB_GPU_TESTS=1, so ComfyUI's torch device is
the GPU and the nodes' compute device "gpu" means it; with MERGELAB_GPU_TESTS=cpu everything runs on the
CPU ("gpu" is replaced by "auto") and the GPU-memory checks are skipped.  TF32 is turned on for the session."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

from gpu_mode import ON_GPU  # noqa: E402


@pytest.fixture(scope="session")
def harness():
    if ON_GPU and not torch.cuda.is_available():
        pytest.fail("MERGELAB_GPU_TESTS=1 but torch sees no CUDA device")
    from mergelab import fixtures
    from mergelab.harness import Harness
    h = Harness(extra_args=["--gpu"] if ON_GPU else None)
    import comfy.model_management as mm
    want = "cuda" if ON_GPU else "cpu"
    assert mm.get_torch_device().type == want, f"ComfyUI's device is {mm.get_torch_device()}, expected {want}"
    fixtures.register_test_nodes(h)
    # TF32 on, as many users' setups have it for sampling: MergeLab must still compute in full fp32
    # (engine/precision.py), so the comparisons with the CPU keep their tolerances
    prev = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    yield h
    torch.set_float32_matmul_precision(prev)
    h.close()

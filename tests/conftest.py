"""tests/gpu boots a ComfyUI of its own on the GPU (ComfyUI is one per process and the integration tests
boot it with --cpu), so it is collected only in a process started for it: MERGELAB_GPU_TESTS=1 (on a
CUDA machine) or =cpu (a dry run on the CPU that checks the graphs and comparisons still work).
tests/integration/test_gpu_suite.py starts that process."""
import os

collect_ignore = [] if os.environ.get("MERGELAB_GPU_TESTS") in ("1", "cpu") else ["gpu"]

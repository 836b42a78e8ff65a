"""What the GPU suite runs on: MERGELAB_GPU_TESTS=1, ComfyUI on the GPU; =cpu, a dry run on the CPU."""
import os

MODE = os.environ.get("MERGELAB_GPU_TESTS")
ON_GPU = MODE == "1"
#: the compute-device widget value of the "GPU" side of each comparison
GPU_CHOICE = "gpu" if ON_GPU else "auto"

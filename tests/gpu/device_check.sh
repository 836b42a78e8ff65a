#!/usr/bin/env bash
# The GPU checks, in one command for a lent GPU machine (the device tool), from the repository root:
#   1. here: .venv/bin/python tests/gpu/device_carry.py      (writes the ignored .whl/ and .devcarry/)
#   2. device run: command "bash tests/gpu/device_check.sh", carry [".whl", ".devcarry"], timeout_s 540
# It installs the carried wheels beside the machine's PyTorch, unpacks ComfyUI, then runs
#   - tests/gpu with ComfyUI on the GPU (every node's compute device "gpu" against the CPU, nothing left
#     on the GPU, peak GPU memory, CPU and GPU masks bit-identical),
#   - the merge_methods unit tests that compare CUDA with the CPU,
#   - the per-method benchmark on the GPU (full-size SD1.5 shapes; time permitting).
# Logs go to $OUT (the device tool brings them back) or to ./device-check-out when OUT is unset.
# MERGELAB_GPU_TESTS=cpu runs the same steps as a dry run without a GPU.
set -u
OUT="${OUT:-$PWD/device-check-out}"
mkdir -p "$OUT"
MODE="${MERGELAB_GPU_TESTS:-1}"
PY="${PYTHON:-python3}"
status=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

if [ -d .whl ] && [ -z "${SKIP_WHEELS:-}" ]; then   # SKIP_WHEELS=1: a dry run where they are installed
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${COMFYUI_PATH:-}" ] && [ -f .devcarry/comfyui.tgz ]; then
    rm -rf /tmp/devcarry && mkdir -p /tmp/devcarry && tar -xzf .devcarry/comfyui.tgz -C /tmp/devcarry \
        || { echo "unpacking ComfyUI failed"; exit 2; }
    export COMFYUI_PATH=/tmp/devcarry/ComfyUI
fi
export MERGELAB_GPU_TESTS="$MODE" PYTHONUNBUFFERED=1

nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 2

step gpu_suite 330 "$PY" -m pytest -q -p no:cacheprovider -x tests/gpu
step unit_cuda 90 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_task_arithmetic.py tests/unit/test_sd_optim.py -k cuda
if [ "$MODE" = "1" ]; then
    step bench_cuda 90 "$PY" benchmarks/bench_merge_methods.py --device cuda --markdown --json "$OUT/bench_cuda.json"
fi
echo "device check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status

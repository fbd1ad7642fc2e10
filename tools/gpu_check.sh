#!/usr/bin/env bash
# One short GPU check, run from the repository root on a machine with an NVIDIA GPU:
#
#   bash tools/gpu_check.sh [WHEELS_DIR]
#
# - GPTQ's math on one 4096x4096 layer on the CPU and on CUDA (the README's GPU row), and GPTQ of the
#   whole 7B-shaped decoder stack (32 layers, 224 weights, W4 g128) on CUDA (issue 17's GPU line);
# - the tests whose code takes the CUDA path when torch sees a GPU (gptq, rtn, awq, distill, the
#   Hessian analysis, the torch executor's CUDA test);
# - whether TensorRT is there, and if it is, the tensorrt backend's engine builds for the test
#   CNN's five variants (`tools/bench_tensorrt.py --skip-smollm2`).
#
# Packages the machine lacks (e.g. onnx-graphsurgeon, gguf) can come as wheels in WHEELS_DIR; they
# are installed into a scratch folder, not the machine's Python. optc itself is imported from
# this checkout (no install needed). Writes its logs under $OUT when that is set.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/optc-gpu-check}
mkdir -p "$out"
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
echo "$(nproc) CPU cores; $(python3 --version)"
if [ $# -ge 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/optc-site "$1"/*.whl || exit 1
    export PYTHONPATH=/tmp/optc-site:${PYTHONPATH:-}
fi
# optc's packages live at the repository root (pyproject's package-dir): link them under optc/.
if ! python3 -c "import optc.passes" 2>/dev/null; then
    for d in ir passes frontends backends runtime; do ln -sfn "../$d" "optc/$d"; done
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== GPTQ on one 4096x4096 layer (W4 g128, act-order)"
timeout 200 python3 tools/bench_w4.py --layer-timing 4096 2>&1 | tee "$out/layer_timing.txt"
echo "-- CPU with OPTC_TORCH_THREADS=$(nproc)"
OPTC_TORCH_THREADS=$(nproc) timeout 120 python3 tools/bench_w4.py --layer-timing 4096 2>&1 | grep cpu | tee -a "$out/layer_timing.txt"

echo "== GPTQ of the 7B-shaped stack (W4 g128, Hessians from 128x2048 rows per input)"
timeout 400 python3 tools/bench_w4.py --stack-timing 7b 2>&1 | tee "$out/stack_timing.txt"

echo "== tests that take the CUDA path"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_torch_exec.py tests/passes/test_gptq.py \
    tests/passes/test_rtn.py tests/passes/test_awq.py tests/passes/test_distill.py tests/passes/analyses \
    2>&1 | tee "$out/pytest.txt" | tail -5

echo "== TensorRT"
if python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null; then
    timeout 600 python3 tools/bench_tensorrt.py --skip-smollm2 --workdir /tmp/optc-trt 2>&1 | tee "$out/tensorrt.txt" | tail -20
else
    echo "no tensorrt package: libnvinfer in ldconfig: $(ldconfig -p 2>/dev/null | grep -c libnvinfer); trtexec: $(command -v trtexec || echo none)"
fi

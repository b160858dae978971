#!/usr/bin/env bash
# One prepared, unattended GPU run (one H100/H200; torch, triton, pytest, numpy; no network; no
# `pip install` of the project needed: it runs from the checkout). About 5-8 minutes:
#   1. versions and the device;
#   2. the `gpu`-marked tests (bf16/fp16/fp32 paged attention vs the reference, int64 addressing,
#      KV write, CUDA-graph replay vs eager, engine greedy with and without graphs, acceptance kernels);
#   3. bench/kernels.py (acceptance kernels; paged attention 2D / split-KV / gather, GB/s);
#   4. bench/gpu_step.py (I-DLM-8B-shaped step: graph / eager / gather, AR vs ISD N=4, roofline);
#   5. bench/gpu_step.py --lora-rank 32 (R-ISD), graphs only.
# Each stage has its own time limit and a failure does not stop the next. Results (JSON, the log,
# the step plots) go to $OUT when set (the device tool brings that folder back), else bench/results/.
#
#   bash bench/gpu_suite.sh            # PYTHON=... to pick the interpreter (default python3)
set -u -o pipefail
cd "$(dirname "$0")/.."
RES="${OUT:-bench/results}"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
LOG="$RES/gpu_suite.log"
# Compiled Triton on the GPU (tests/conftest.py would pick the interpreter if it saw no /dev/nvidia0).
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
: >"$LOG"
SUMMARY=()

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local dt=$((SECONDS - t0))
    echo "=== $name: exit $rc after ${dt}s" | tee -a "$LOG"
    SUMMARY+=("{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $dt}")
    LAST_RC=$rc
}

stage versions 30 "$PY" -c "
import sys, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
print('cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
import importlib.util as u
print('modules', {m: u.find_spec(m) is not None for m in ('numpy', 'pytest', 'pytest_timeout', 'tokenizers', 'matplotlib')})
sys.exit(0 if torch.cuda.is_available() else 3)"
if [ "$LAST_RC" -ne 0 ] && [ -z "${GPU_SUITE_ALLOW_CPU:-}" ]; then  # the override: a CPU dry run of the script
    echo "gpu_suite: no usable CUDA device or torch/triton missing: stopping" | tee -a "$LOG"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

# Stage limits sum to 475 s; typical runs take well under them (most of each is Triton compiling).
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=150)
stage gpu-tests 160 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" "${TIMEOUT_OPT[@]}" -rs \
    tests/kernels/test_paged_attention.py tests/workers/test_cuda_graphs.py tests/kernels/test_acceptance.py
stage kernels 100 "$PY" bench/kernels.py --repeats 10 --out "$RES/kernels.json"
stage gpu-step 150 "$PY" bench/gpu_step.py --out "$RES/gpu_step.json"
stage gpu-step-risd 45 "$PY" bench/gpu_step.py --lora-rank 32 --conc 1,8,32 --no-baselines --repeats 5 \
    --out "$RES/gpu_step_risd.json"

{
    printf '{"results": "%s", "stages": [' "$RES"
    (IFS=,; printf '%s' "${SUMMARY[*]}")
    printf ']}\n'
} >"$RES/gpu_suite.json"
echo "gpu_suite: wrote $RES/gpu_suite.json, $RES/gpu_suite.log" | tee -a "$LOG"

#!/usr/bin/env bash
# One short check for a session with a lent CUDA machine (about 5-8 minutes on one H100/H200):
#   1. the GPU tests of tests/test_accelerator.py (CUDA vs CPU training, device-free checkpoints,
#      teacher outputs; the 2-rank NCCL test when there are >= 2 GPUs), as JUnit XML;
#   2. benchmarks/ddp_scaling.py on 1 vs N GPUs with NCCL (N = the GPU count; 1 GPU: N = 1 only);
#   3. benchmarks/gpu_throughput.py: teacher training + distillation on CUDA vs the CPU, default task.
# Everything goes to benchmarks/results/ (gpu_check-*.json, gpu_check-tests.xml), the device named.
#     PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
status=0

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device here; nothing to check" >&2
    exit 3
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0),
      "torch", torch.__version__, "CUDA", torch.version.cuda)'

echo "== 1. GPU tests"
timeout 240 "$PY" -m pytest tests/test_accelerator.py -q -rs --junitxml="$OUT/gpu_check-tests.xml" || status=1

echo "== 2. ddp_scaling: 1 vs $GPUS GPU(s), NCCL"
NPROCS="1"
[ "$GPUS" -gt 1 ] && NPROCS="1 $GPUS"
# shellcheck disable=SC2086  # NPROCS is a list of numbers
timeout 180 "$PY" benchmarks/ddp_scaling.py --accelerator cuda --nprocs $NPROCS --epochs 4 --frames 40 \
    --out "$OUT/gpu_check-ddp_scaling.json" || status=1

echo "== 3. CUDA vs CPU training throughput, default task"
timeout 240 "$PY" benchmarks/gpu_throughput.py --out "$OUT/gpu_check-throughput.json" || status=1

echo "gpu_check: done (exit $status); results in $OUT/gpu_check-*"
exit $status

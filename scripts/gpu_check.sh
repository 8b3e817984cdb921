#!/usr/bin/env bash
# Every CUDA path of gmcert in one run (at most about 5 minutes on one GPU), with throughputs:
#   encode (images/s), closed-form certify, smoothing certify and the sequential engine (noisy
#   samples/s), verified SRS of a contractive DEQ (its rows must equal Cohen's), a training step
#   (bfloat16 autocast), faiss on the GPU where installed, and torchrun
#   on every visible GPU with the scaling from 1 to all of them.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]    (default runs/gpu-check; prints a summary at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu-check}"
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -lt 1 ]; then
  echo "gpu_check: torch sees no CUDA device; nothing to check" >&2
  exit 1
fi
echo "torch sees $NGPU GPU(s)"
timeout 280 python3 scripts/gpu_check.py --out "$OUT" --gpus "$NGPU" 2>&1 | tee "$OUT/gpu_check.log"

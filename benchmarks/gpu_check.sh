#!/usr/bin/env bash
# The prepared GPU check: one call on a single-GPU machine with this project's
# dependencies (PyTorch, timm, Ray, ...) preinstalled and no network.
#
#   bash benchmarks/gpu_check.sh [OUT]            # default OUT: runs/gpu-check
#   QUICK=1 bash benchmarks/gpu_check.sh [OUT]    # tiny sizes: tries every step in ~5 minutes, on CPU too
#
# 1. mixed-precision training steps, model-alone inference and decode rate per core
#    (benchmarks/gpu_check.py; needs only PyTorch and timm);
# 2. bulk scoring: (a) model alone, (b) a DataLoader loop, (c) protein-ray predict, each
#    against the limit of the GPU and the cores that decode for it
#    (benchmarks/predict_throughput.py; needs Ray);
# 3. a Serve load burst, batching on vs off, one GPU replica (benchmarks/serve_load.py).
# Then one summary table. Each step's full output is kept in OUT/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-runs/gpu-check}"
mkdir -p "$OUT"
CORES="$(nproc)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: running on CPU"
DEVICE="$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
GPUS=$([ "$DEVICE" = cuda ] && echo 1 || echo 0)
REPLICAS=$([ "$DEVICE" = cuda ] && echo 1 || echo "$CORES")  # one replica holds the GPU

if [ -n "${QUICK:-}" ]; then
    TRAIN=(--model test_resnet --source-size 128 --image-size 64 --batch-size 8 --steps 20)
    PREDICT=(--backbone test_resnet --size 128 --image-size 64 --batch-size 16 --sizes 96 384
             --reference-images 96 --bracket-images 32)
    SERVE=(--duration 5 --plain-seconds 5)
else
    TRAIN=()
    PREDICT=(--backbone resnet34 --image-size 512 --batch-size 64 --sizes 768 3072)
    SERVE=(--duration 20 --plain-seconds 20)
fi

python benchmarks/gpu_check.py --out "$OUT" "${TRAIN[@]}" 2>&1 | tee "$OUT/amp_train.log"
if python -c "import ray" 2>/dev/null; then
    python benchmarks/predict_throughput.py --out "$OUT/predict" --device "$DEVICE" "${PREDICT[@]}" \
        --threads 4 --decode-workers $((CORES > 3 ? CORES - 2 : 1)) 2>&1 | tee "$OUT/predict.log"
    python benchmarks/serve_load.py --scenarios decode+model --model-gpus "$GPUS" --replicas "$REPLICAS" \
        --concurrency 32 --rounds 1 --skip-autoscale "${SERVE[@]}" 2>&1 | tee "$OUT/serve.log"
else
    echo "Ray is not installed: skipping the bulk-scoring and Serve parts"
fi
python benchmarks/gpu_check.py --summarize "$OUT"

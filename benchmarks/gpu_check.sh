#!/usr/bin/env bash
# The prepared GPU check: one call on a single-GPU machine with this project's
# dependencies (PyTorch, timm, Ray, ...) preinstalled and no network.
#
#   bash benchmarks/gpu_check.sh [OUT]        # default OUT: runs/gpu-check
#
# 1. mixed-precision training steps, model-alone inference and decode rate per core
#    (benchmarks/gpu_check.py; needs only PyTorch and timm);
# 2. bulk scoring: (a) model alone, (b) a DataLoader loop, (c) protein-ray predict
#    (benchmarks/predict_throughput.py; needs Ray), which says which stage limits;
# 3. a Serve load burst, batching on vs off, one GPU replica (benchmarks/serve_load.py).
# Then one summary table. Each step's full output is kept in OUT/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-runs/gpu-check}"
mkdir -p "$OUT"
CORES="$(nproc)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: running on CPU"

python benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/amp_train.log"
if python -c "import ray" 2>/dev/null; then
    python benchmarks/predict_throughput.py --out "$OUT/predict" --backbone resnet34 --image-size 512 \
        --batch-size 64 --images 1536 --threads 4 --decode-workers $((CORES > 3 ? CORES - 2 : 1)) --rounds 1 \
        2>&1 | tee "$OUT/predict.log"
    python benchmarks/serve_load.py --backbone resnet34 --image-size 512 --model-cpus 2 --model-gpus 1 \
        --concurrency 64 --duration 20 --rounds 1 --skip-autoscale 2>&1 | tee "$OUT/serve.log"
else
    echo "Ray is not installed: skipping the bulk-scoring and Serve parts"
fi
python benchmarks/gpu_check.py --summarize "$OUT"

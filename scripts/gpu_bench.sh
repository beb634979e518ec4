#!/usr/bin/env bash
# The diffusion relighter's GPU benchmarks in one call (about 7 minutes on an H200):
#   1. the diffusion relighter contract on CUDA (tiny model);
#   2. relighter_throughput on a random-weight model of the seed's sizes: the seed's loop style,
#      eager bf16 and compiled side by side; compiling here fills the inductor cache (a cold node);
#   3. worker_pipeline with the cache now on disk (a warm node): end-to-end worker throughput to
#      local disk and to a local S3 endpoint against relighter-only, and a new worker process's
#      time to its first output.
# Writes relighter.json, pipeline.json and their logs to ${OUT:-/tmp/gpu}. Dependencies missing
# on the machine may be given as wheels in .whl/ (see the README's Development section).
set -euo pipefail
# shellcheck source=scripts/device_env.sh
source "$(dirname "$0")/device_env.sh"
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== the diffusion relighter contract on CUDA"
python3 -m pytest -q -p no:cacheprovider tests/test_relighters.py -k "diffusion and cuda"
relit-k8s make-model /tmp/sd21 --size sd21 --device cuda
echo "== relighter_throughput, SD2.1 sizes, 50 DDIM steps (compiles: a cold node)"
python3 benchmarks/relighter_throughput.py --model /tmp/sd21 --compile --sweep --batches 2 \
  --out "$OUT/relighter.json" 2>&1 | tee "$OUT/relighter.log"
echo "== worker_pipeline (the inductor cache is on disk now: a warm node)"
python3 benchmarks/worker_pipeline.py --model /tmp/sd21 --compile --cold-start \
  --out "$OUT/pipeline.json" 2>&1 | tee "$OUT/pipeline.log"

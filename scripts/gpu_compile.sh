#!/usr/bin/env bash
# GPU benchmark of the compiled diffusion relighter: a first run compiles (cold start), a second
# process reuses the inductor cache on disk (a warm node). Writes ${OUT:-/tmp/gpu}/compiled-*.json.
set -euo pipefail
# shellcheck source=scripts/device_env.sh
source "$(dirname "$0")/device_env.sh"
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
relit-k8s make-model /tmp/sd21 --size sd21 --device cuda
for run in cold warm; do
  echo "== compiled, $run inductor cache"
  python3 benchmarks/relighter_throughput.py --model /tmp/sd21 --compile --skip-eager \
    --skip-seed-loop --out "$OUT/compiled-$run.json"
done

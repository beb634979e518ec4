#!/usr/bin/env bash
# GPU benchmark: relighter_throughput on a random-weight model of the seed's sizes, plus the
# diffusion relighter's tests on CUDA. Writes the result to ${OUT:-/tmp/gpu}/relighter.json.
# Dependencies missing on the machine may be given as wheels in .whl/ (see gpu_check.sh).
set -euo pipefail
# shellcheck source=scripts/device_env.sh
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== diffusion tests on CUDA (contract included)"
python3 -m pytest -q -p no:cacheprovider tests/test_relighters.py -k diffusion
echo "== relighter_throughput, SD2.1 sizes, 50 DDIM steps"
python3 benchmarks/relighter_throughput.py --out "$OUT/relighter.json"

#!/usr/bin/env bash
# GPU check: the relighter contract on CUDA, and `relit-k8s run --device cuda` on the examples.
# Runs on a machine with an NVIDIA GPU and torch already installed; other dependencies may be
# given as wheels in .whl/ (see the README's Development section). Writes to ${OUT:-/tmp/gpu}.
set -euo pipefail
# shellcheck source=scripts/device_env.sh
source "$(dirname "$0")/device_env.sh" ./examples/relit-tiny
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== contract and physics tests (cuda parametrisations included)"
python3 -m pytest -q -p no:cacheprovider tests/test_relighters.py tests/test_sh_physics.py

echo "== run on the examples, on the GPU"
relit-k8s run --input examples/images --refs examples/refs --output "$OUT/run" \
  --iterations 50 --device cuda --no-progress
relit-k8s status --output "$OUT/run" -o json > "$OUT/status.json"
python3 - "$OUT/status.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["state"] == "done" and s["items_done"] == 600 and s["items_failed"] == 0, s
print("devices:", sorted({sh["device"] for sh in s["shards"]}))
EOF
echo "== two workers sharing GPU 0, then a rerun that skips everything"
relit-k8s run --input examples/images --refs examples/refs --output "$OUT/run2" \
  --iterations 8 --gpus 0 --workers 2 --no-progress
relit-k8s run --input examples/images --refs examples/refs --output "$OUT/run2" \
  --iterations 8 --gpus 0 --workers 2 --no-progress | grep "written 0, skipped 96"

echo "== CPU and CUDA agree; sh throughput at 1024x1024 (relighter only)"
python3 - <<'EOF'
import time, torch
from relit_k8s.relighters import create
g = torch.Generator().manual_seed(0)
img, env = torch.rand(3, 1024, 1024, generator=g), torch.rand(3, 64, 128, generator=g) * 3
seeds = list(range(32))
cpu = create("sh", {}, "cpu").relight(img, env, seeds[:4])
gpu_r = create("sh", {}, "cuda")
gpu = gpu_r.relight(img.cuda(), env.cuda(), seeds[:4]).cpu()
print(f"max |cpu - cuda| = {(cpu - gpu).abs().max():.2e}")
x, e = img.cuda(), env.cuda()
for bs in (1, 8, 32):
    gpu_r.relight(x, e, seeds[:bs]); torch.cuda.synchronize()
    t = time.perf_counter(); n = 0
    while time.perf_counter() - t < 2.0:
        gpu_r.relight(x, e, seeds[:bs]); n += bs
    torch.cuda.synchronize()
    print(f"sh relight 1024x1024, batch {bs}: {n / (time.perf_counter() - t):.0f} images/s")
EOF
rm -rf "$OUT/run" "$OUT/run2"
echo "GPU CHECK PASSED"

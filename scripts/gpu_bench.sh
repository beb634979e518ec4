#!/usr/bin/env bash
# Every GPU benchmark in one call. Sections (all of them, in this order, unless named):
#   diffusion  the diffusion relighter contract on CUDA (tiny model); relighter_throughput on a
#              random model of the seed's sizes: the seed's loop style, eager bf16 and compiled
#              side by side (compiling fills the inductor cache: a cold node); worker_pipeline
#              with that cache on disk (a warm node): end to end to local disk and to a local S3
#              endpoint against relighter-only, a new worker process's time to its first output
#              (about 7 minutes on an H200)
#   luminet    relighter_throughput --relighter luminet on a random model of the official
#              checkpoint's sizes: the original loop style, eager bf16 at the measured batch
#              size, compiled, a batch sweep and a profiled step (about 4 minutes); both seed
#              loops load their model once per process, as the seed does
#   aot        compile=aot: worker_pipeline compiles the seed-size model ahead of time into the
#              cache folder (a cold node), then a new worker process loads the packages (a warm
#              node): its time to the first output, each load phase printed (about 5 minutes)
#   weights    weights_load: a new worker's model load from the model files against from the
#              weights cache (cache_weights), each in a new process, for the seed-size diffusion
#              model and the full-size luminet one (about 3 minutes)
#   profile    one denoising step of the seed-size diffusion model under torch.profiler: the
#              top operators and kernels and their TFLOP/s (about 1 minute)
#   pipeline_sh  worker_pipeline with the sh relighter only (JPEG and PNG outputs)
#   output     the CPU side of a worker: output_cpu (decode, encode, write at 1024 x 1024; JPEG
#              on the GPU with nvJPEG) and worker_pipeline with the sh relighter, whose end to
#              end rate is all pipeline, for JPEG and PNG outputs (about 1 minute)
# e.g. scripts/gpu_bench.sh luminet output profile
# Each section writes its JSON and log to ${OUT:-/tmp/gpu}; a failed section does not stop the
# next one, and the script exits 1 if any failed. Dependencies missing on the machine may be
# given as wheels in .whl/ (see docs/development.md).
set -uo pipefail
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(diffusion aot luminet profile output)
set --  # device_env.sh passes its arguments to pip
# shellcheck source=scripts/device_env.sh
source "$(dirname "$0")/device_env.sh" || exit 1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
failed=()

diffusion() {
  python3 -m pytest -q -p no:cacheprovider tests/test_relighters.py -k "diffusion and cuda" &&
  make_sd21 &&
  echo "== relighter_throughput, SD2.1 sizes, 50 DDIM steps (compiles: a cold node)" &&
  python3 benchmarks/relighter_throughput.py --model /tmp/sd21 --compile --sweep --batches 2 \
    --out "$OUT/relighter.json" &&
  echo "== worker_pipeline (the inductor cache is on disk now: a warm node)" &&
  python3 benchmarks/worker_pipeline.py --model /tmp/sd21 --compile --cold-start \
    --out "$OUT/pipeline.json"
}

luminet() {
  [ -f /tmp/luminet/LumiNet.ckpt ] || relit-k8s make-model /tmp/luminet --kind luminet \
    --size full --device cuda || return 1
  local rc=0
  echo "== relit-k8s run --relighter luminet on the bundled examples (the user's path)"
  time relit-k8s run --input examples/images \
    --refs examples/refs --output /tmp/luminet-out --relighter luminet --iterations 2 \
    -O checkpoint=/tmp/luminet/LumiNet.ckpt -O config=/tmp/luminet/config.yaml || rc=1
  python3 benchmarks/relighter_throughput.py --relighter luminet --model /tmp/luminet \
    --seed-pairs 1 --seed-iterations 2 --batches 2 --sweep --profile --compile \
    --out "$OUT/luminet.json" || rc=1
  return $rc
}

aot() {
  make_sd21 && python3 benchmarks/worker_pipeline.py --model /tmp/sd21 --aot --cold-start \
    --no-s3 --pairs 2 --out "$OUT/pipeline_aot.json"
}

weights() {
  make_sd21 && python3 benchmarks/weights_load.py --model /tmp/sd21 --device cuda \
    --out "$OUT/weights_diffusion.json" &&
  { [ -f /tmp/luminet/LumiNet.ckpt ] || relit-k8s make-model /tmp/luminet --kind luminet \
      --size full --device cuda; } &&
  python3 benchmarks/weights_load.py --relighter luminet --model /tmp/luminet --device cuda \
    --out "$OUT/weights_luminet.json"
}

profile() {
  make_sd21 && python3 benchmarks/relighter_throughput.py --model /tmp/sd21 --profile \
    --skip-seed-loop --skip-eager --out "$OUT/profile.json"
}

output() {
  python3 benchmarks/output_cpu.py --out "$OUT/output_cpu.json" && pipeline_sh
}

pipeline_sh() {
  for fmt in jpg png; do
    python3 benchmarks/worker_pipeline.py --relighter sh --pairs 64 --iterations 8 \
      --format "$fmt" --no-s3 --out "$OUT/pipeline_sh_$fmt.json" || return 1
  done
}

make_sd21() {
  [ -f /tmp/sd21/text_embeddings.safetensors ] ||
    relit-k8s make-model /tmp/sd21 --size sd21 --device cuda
}

for s in "${sections[@]}"; do
  echo "== section $s"
  start=$SECONDS
  if ! "$s" 2>&1 | tee "$OUT/$s.log"; then
    failed+=("$s")
    echo "== section $s FAILED"
  fi
  echo "== section $s took $((SECONDS - start)) s"
done
[ ${#failed[@]} -eq 0 ] || { echo "failed sections: ${failed[*]}"; exit 1; }

#!/usr/bin/env bash
# Sourced by the GPU scripts: installs relit-k8s (and any wheels carried in .whl/) into a
# target folder on a machine that has torch but not our other dependencies, and puts it on
# PYTHONPATH and PATH. Sets OUT (default /tmp/gpu) for results.
OUT=${OUT:-/tmp/gpu}
mkdir -p "$OUT"
site=/tmp/relit-site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
  --target "$site" . "$@"
export OUT PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1

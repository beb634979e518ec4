#!/usr/bin/env bash
# Build the relit-k8s worker image from the Dockerfile: the CPU image by default, --gpu for the
# GPU one (the two differ only by build arguments).
#
#   scripts/build-image.sh [--gpu] [--tag NAME]      prints the image name on its last line
#
# Where a registry is reachable, the Dockerfile's own base (debian:bookworm-slim) is used.
# Where none is (CI here), the same Debian release is made from Debian's packages with
# debootstrap and imported as relit-k8s-base:bookworm (made once, kept by the engine), and,
# when this machine's pip trusts an extra CA bundle, that bundle goes into the base image with
# PIP_CERT pointing at it, so that pip inside the build verifies TLS as pip here does. Where
# torch's CPU index is unreachable but this machine holds a torch wheel of TORCH_VERSION for
# the image's Python (a folder of PIP_FIND_LINKS, or /opt/wheels), that wheel is served to the
# build from 127.0.0.1. The engine caches the layers between builds.
#
# Environment: DOCKER (default docker; DOCKER_HOST picks the engine), TORCH_VERSION (default
# the Dockerfile's), TORCH_INDEX_URL, BASE_IMAGE (skip the choice above).
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=cpu
tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) flavour=gpu ;;
    --cpu) flavour=cpu ;;
    --tag) tag=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
docker=${DOCKER:-docker}
tag=${tag:-relit-k8s:dev-$flavour}
torch_version=${TORCH_VERSION:-$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)}
extra_index=""
registry_base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
local_base=relit-k8s-base:bookworm
workdir=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT

"$docker" version --format '{{.Server.Version}}' >/dev/null || {
  echo "error: no container engine answers (start dockerd, or set DOCKER_HOST)" >&2; exit 2; }

# --- the base image ---------------------------------------------------------------------------
pip_ca() {  # the CA bundle this machine's pip verifies TLS with, if it names one
  local ca=${PIP_CERT:-}
  [ -n "$ca" ] || ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
  [ -n "$ca" ] && [ -f "$ca" ] && echo "$ca"
  return 0
}

make_local_base() {
  command -v debootstrap >/dev/null || {
    echo "error: no registry is reachable and debootstrap is not installed" \
      "(apt-get install debootstrap)" >&2; exit 2; }
  echo "== base image $local_base: Debian bookworm from Debian's packages (debootstrap)" >&2
  local root="$workdir/rootfs" change=()
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >&2
  # as Debian's own slim images: no documentation or translations
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/*
  local ca
  ca=$(pip_ca)
  if [ -n "$ca" ]; then
    mkdir -p "$root/usr/local/share/relit-build"
    cp "$ca" "$root/usr/local/share/relit-build/pip-ca.pem"
    change=(--change "ENV PIP_CERT=/usr/local/share/relit-build/pip-ca.pem")
  fi
  tar -C "$root" -c . | "$docker" import "${change[@]}" - "$local_base" >&2
}

if [ -n "${BASE_IMAGE:-}" ]; then
  base=$BASE_IMAGE
elif "$docker" image inspect "$registry_base" >/dev/null 2>&1 \
    || timeout 60 "$docker" pull -q "$registry_base" >/dev/null 2>&1; then
  base=$registry_base
else
  "$docker" image inspect "$local_base" >/dev/null 2>&1 || make_local_base
  base=$local_base
fi

# --- where torch comes from -------------------------------------------------------------------
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  index=$TORCH_INDEX_URL
elif [ "$flavour" = gpu ]; then
  index=https://pypi.org/simple  # CUDA wheels with their own CUDA libraries
else
  index=https://download.pytorch.org/whl/cpu
  if ! timeout 20 python3 -c "import urllib.request as u; u.urlopen('$index/', timeout=15)" \
      2>/dev/null; then
    # the image's Python is Debian bookworm's 3.11
    wheel=""
    IFS=' ' read -r -a links <<< "${PIP_FIND_LINKS:-} /opt/wheels"
    for dir in "${links[@]}"; do
      for f in "$dir"/torch-"$torch_version"+cpu-cp311-cp311-manylinux*_x86_64.whl; do
        [ -f "$f" ] && wheel=$f && break 2
      done
    done
    [ -n "$wheel" ] || {
      echo "error: $index is unreachable and no torch-$torch_version+cpu wheel for Python" \
        "3.11 is on this machine: set TORCH_INDEX_URL" >&2; exit 2; }
    mkdir -p "$workdir/simple/torch"
    ln -s "$wheel" "$workdir/simple/torch/"
    name=$(basename "$wheel")
    printf '<html><body><a href="%s">%s</a></body></html>\n' "$name" "$name" \
      > "$workdir/simple/torch/index.html"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$workdir" "$port" >/dev/null 2>&1 &
    server_pid=$!
    index="http://127.0.0.1:$port/simple"
    extra_index=https://pypi.org/simple  # torch's dependencies
    torch_version="$torch_version+cpu"
    echo "== torch: $name, served from this machine (the CPU index is unreachable)" >&2
  fi
fi

# --- the build --------------------------------------------------------------------------------
echo "== build $tag ($flavour) on $base, torch $torch_version from $index" >&2
start=$SECONDS
"$docker" build --network host \
  --build-arg "BASE_IMAGE=$base" \
  --build-arg "TORCH_VERSION=$torch_version" \
  --build-arg "TORCH_INDEX_URL=$index" \
  ${extra_index:+--build-arg "PIP_EXTRA_INDEX_URL=$extra_index"} \
  -t "$tag" . >&2
size=$("$docker" image inspect --format '{{.Size}}' "$tag")
echo "== built $tag in $((SECONDS - start)) s: $((size / 1000000)) MB" >&2
echo "$tag"

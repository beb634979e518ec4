# relit-k8s worker image: `relit-k8s` as the entrypoint, run as a non-root user.
#
# GPU image (default), a CUDA runtime with the torch build for the same CUDA:
#   docker build -t relit-k8s:0.1.0 .
# CPU-only image (kind, CPU clusters):
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t relit-k8s:dev-cpu .
# Keep TORCH_INDEX_URL's CUDA (cu128) equal to the base image's CUDA (12.8) when changing either.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The distribution's Python 3.12; versions float with the base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the index that matches the image's CUDA (or the CPU index).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relit_k8s ./relit_k8s
# The local source tree, with the diffusion relighter's extra; versions come from pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[diffusion]" && rm -rf /src

# Non-root; the Job mounts writable emptyDirs at /tmp, /cache and /dev/shm and keeps the root
# filesystem read-only.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin relit
USER 10001:10001
WORKDIR /tmp
ENV HOME=/tmp XDG_CACHE_HOME=/cache TORCH_HOME=/cache/torch

ENTRYPOINT ["relit-k8s"]
CMD ["--help"]

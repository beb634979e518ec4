# relit-k8s worker image: `relit-k8s` as the entrypoint, run as a non-root user.
#
# One Dockerfile, two images that differ only by build arguments (so building either proves the
# other's steps); scripts/build-image.sh builds them, also where no registry can be reached:
#   GPU (default): torch from PyPI, whose wheels carry CUDA and cuDNN. They are the only CUDA
#   libraries in the image (no CUDA base image: that would be a second copy); the driver comes
#   from the node, through the NVIDIA container toolkit.
#     docker build -t relit-k8s:0.1.0 .
#   CPU (kind, CPU clusters): torch's CPU build.
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       -t relit-k8s:dev-cpu .
# TORCH_VERSION is the torch the test suite runs (README, Quick start).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The distribution's Python 3.11; versions float with the base image's security updates.
# g++ and the Python headers: torch.compile (-O compile=true) builds its kernels at run time,
# with a C++ compiler on the CPU and a C compiler for Triton's launchers on the GPU. No
# documentation, translations, sanitizer runtimes or static libpython: they are not used, and
# the CPU image stays under 2 GB.
# hadolint ignore=DL3008
RUN printf 'path-exclude %s\n' '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' \
       '/usr/share/locale/*' '/usr/lib/x86_64-linux-gnu/lib*san.so*' \
       > /etc/dpkg/dpkg.cfg.d/relit-slim \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/config-3.11-x86_64-linux-gnu/*.a \
    && python3 -m venv /opt/venv

# Build arguments after the system layer, so that both flavours share it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Where torch's own dependencies come from when TORCH_INDEX_URL holds only torch (pip reads it
# from the environment; unset unless given).
ARG PIP_EXTRA_INDEX_URL

# torch first, from the index of the flavour (PyPI: CUDA wheels; the CPU index: CPU only).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relit_k8s ./relit_k8s
# The local source tree, with the extras of the diffusion and luminet relighters; versions
# come from pyproject.toml (torch is already there).
# hadolint ignore=DL3013
RUN pip install ".[diffusion,luminet]" && rm -rf /src

# Non-root; the Job mounts writable emptyDirs at /tmp, /cache and /dev/shm and keeps the root
# filesystem read-only, so every cache points there.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin relit \
    && mkdir /cache && chown 10001:10001 /cache
USER 10001:10001
WORKDIR /tmp
ENV HOME=/tmp XDG_CACHE_HOME=/cache TORCH_HOME=/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/cache/torch/inductor HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

ENTRYPOINT ["relit-k8s"]
CMD ["--help"]

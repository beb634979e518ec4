"""What relighters that load model weights share: their weights' dtype, where downloaded
models are cached, and the timing of each loading phase (``diffusion`` and ``luminet``)."""

from __future__ import annotations

import os
import time

import torch


def weights_dtype(option: str, device: torch.device) -> torch.dtype:
    """The ``dtype`` option: ``auto`` is bf16 on a GPU, fp32 on the CPU."""
    if option == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[option]


def check_compiler(device: torch.device, relighter: str) -> None:
    """``compile=true`` builds kernels at run time: a C++ compiler on the CPU (inductor's C++
    kernels), a C compiler on the GPU (Triton's launchers), and the Python headers for both.
    Where they are missing, say so before any weights are read, rather than fail inside the
    first batch with a compiler traceback. The relit-k8s image has them."""
    import shutil
    import sysconfig

    from ..errors import RelighterError

    if device.type == "cuda":
        names = [os.environ.get("CC", ""), "gcc", "cc", "clang"]
        kind = "C compiler (gcc)"
    else:
        names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        kind = "C++ compiler (g++)"
    missing = []
    if not any(name and shutil.which(name) for name in names):
        missing.append(f"a {kind}")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        missing.append("the Python headers (Python.h)")
    if missing:
        raise RelighterError(
            f"{relighter}: compile=true needs {' and '.join(missing)} at run time, to build "
            "its kernels, and this machine has none: install them (Debian/Ubuntu: apt-get "
            "install g++ python3-dev; the relit-k8s image has both) or leave compile off")


def model_cache_dir(cache_dir: str | None) -> str:
    """Where ``s3://`` models are downloaded: the ``cache_dir`` option, else
    ``$XDG_CACHE_HOME/relit-k8s/models`` (the Job points XDG_CACHE_HOME at /cache)."""
    return cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", "/tmp"), "relit-k8s",
                                     "models")


class PhaseTimer:
    """Seconds of each loading phase, in :attr:`timings` (the worker logs them with its start
    event): ``lap(name)`` closes the phase that began at the previous lap."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.started = self._clock = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.timings[phase] = round(now - self._clock, 3)
        self._clock = now

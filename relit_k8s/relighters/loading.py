"""What relighters that load model weights share: their weights' dtype, where downloaded
models are cached, and the timing of each loading phase (``diffusion`` and ``luminet``)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def file_identity(path: Path) -> str:
    """What identifies a local file's contents without reading it: its resolved path, size and
    modification time (a checkpoint replaced in place gets a new one)."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def folder_identity(folder: Path) -> str:
    """:func:`file_identity` of every file under ``folder``, in one string."""
    return ";".join(file_identity(p) for p in sorted(folder.rglob("*")) if p.is_file())


def read_cached_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file written by :func:`write_cached_tensors`, loaded straight to
    ``device``; None when there is none or it cannot be read (the caller then reads the
    original and writes the file again)."""
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001 - a damaged cache file only costs a reload
        import logging

        logging.getLogger("relit_k8s.relighters").warning(
            "ignored the cached weights %s (%s: %s): reading the checkpoint", path,
            type(e).__name__, e)
        return None


def write_cached_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Keep ``tensors`` (moved to the CPU) at ``path`` as safetensors for later workers: written
    to a temporary name of this process and renamed, so that workers racing on one node never
    see half a file. False when the cache cannot be written (read-only, full): that only costs
    the next worker the original load."""
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  str(partial))
        os.replace(partial, path)
        return True
    except OSError:
        partial.unlink(missing_ok=True)
        return False


class CudaStart:
    """CUDA started on ``device`` in a thread of its own (the driver and the context take a
    second or more) while the caller imports and reads weights on the CPU: :meth:`wait`
    before the first use, for its own phase in the timings. Nothing on the CPU. A use before
    :meth:`wait` is safe too: PyTorch's lazy CUDA initialisation holds a lock, so it waits for
    this thread's."""

    def __init__(self, device: torch.device) -> None:
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            self._thread = threading.Thread(target=self._start, args=(device,), daemon=True,
                                            name="cuda-start")
            self._thread.start()

    def _start(self, device: torch.device) -> None:
        try:
            torch.zeros(1, device=device)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            self._error = e

    def wait(self) -> bool:
        """Wait for CUDA (raising what starting it raised); False on the CPU (no phase)."""
        if self._thread is None:
            return False
        self._thread.join()
        if self._error is not None:
            raise self._error
        return True


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


#: The largest batch the automatic choice takes (seeds of one pair per GPU call): past it a
#: denoising step gains little on an H200 (relighter_throughput --sweep).
AUTO_BATCH_CAP = 32
#: Fraction of the free GPU memory the automatic batch size may plan to use.
MEMORY_FRACTION = 0.85


def batch_for_memory(step4: float, step8: float, decode: float, free: float,
                     share: int = 1, cap: int = AUTO_BATCH_CAP, who: str = "diffusion") -> int:
    """Seeds per batch from the peak memory of one denoising step at 4 and 8 seeds, of one
    decode chunk, and the free memory (shared by ``share`` workers on the GPU): the largest
    multiple of 8 that fits in MEMORY_FRACTION of it (fewer than 8 when fewer fit), at most
    ``cap``. Raises TransientError (exit 75: the memory may be free on a retry) when not
    even one seed fits."""
    from ..errors import TransientError

    per_seed = max((step8 - step4) / 4, 1.0)
    fixed = max(step4 - 4 * per_seed, 0.0)
    budget = free * MEMORY_FRACTION / max(share, 1)
    fits = int((budget - fixed) // per_seed)
    if fits < 1 or decode > budget:
        need = max(fixed + per_seed, decode)
        raise TransientError(
            f"{who}: not enough free GPU memory for one seed ({budget / 2**30:.1f} GiB "
            f"usable of {free / 2**30:.1f} GiB free, shared by {share} worker(s); "
            f"{need / 2**30:.1f} GiB needed): free the GPU, run fewer workers on it, or lower "
            "the resolution")
    return min(cap, fits if fits < 8 else fits // 8 * 8)


def cached_json(path: Path | None, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``'s result, kept as JSON at ``path`` for later workers (None: not kept).
    Written to a temporary name and renamed, so a reader never sees half a file; an unreadable
    file is computed again."""
    if path is not None:
        try:
            found = json.loads(path.read_text())
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
    value = compute()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            partial.write_text(json.dumps(value))
            os.replace(partial, path)
        except OSError:
            pass  # a read-only cache only costs the next worker the measurement
    return value


def probe_cache_path(cache_dir: str | None, who: str, device: torch.device,
                     parts: dict[str, Any]) -> Path:
    """Where a batch-size probe's measurements are kept: keyed by what they depend on (torch,
    the GPU, and ``parts``: the model's configuration, resolution, dtype, ...)."""
    from .aot import device_id

    text = json.dumps({"torch": torch.__version__, "device": device_id(device), "who": who,
                       **parts}, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    return Path(model_cache_dir(cache_dir)) / "probe" / f"{who}-{key}.json"


def measure_batch_size(step: Callable[[int], object], decode: Callable[[], object],
                       device: torch.device, cap: int = AUTO_BATCH_CAP,
                       who: str = "diffusion", cache: Path | None = None) -> int:
    """Seeds per batch on this GPU (:func:`batch_for_memory`): ``step(n)`` runs one denoising
    step of ``n`` seeds and ``decode()`` one decode chunk; their peak memory is measured at 4
    and 8 seeds, or read from ``cache`` where an earlier worker of this node kept them (the
    free memory is always read now). ``RELIT_GPU_SHARE`` (set by ``relit-k8s run`` when
    workers share a GPU) divides the free memory between them."""
    from ..settings import WorkerSettings

    def peak(fn: Callable[[], object]) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    peaks = cached_json(cache, lambda: {"step4": peak(lambda: step(4)),
                                        "step8": peak(lambda: step(8)),
                                        "decode": peak(decode)})
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(peaks["step4"], peaks["step8"], peaks["decode"], free,
                            WorkerSettings.from_env().gpu_share, cap, who)

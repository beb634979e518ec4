"""Ahead-of-time compiled modules kept in the cache volume (``compile=aot``).

``torch.compile`` keeps its kernels in ``TORCHINDUCTOR_CACHE_DIR``, but each new process still
traces the model again before it can run (about 17 s for the seed-size UNet, ControlNet and
decoder on an H200). Here each module is instead exported once (``torch.export``, with a dynamic
batch dimension) and compiled by AOTInductor into a package **without its weights**, stored as
``<folder>/<name>-<key>.pt2``. A later worker with the same key loads the package (a shared
library: well under a second) and hands it the weights it has loaded anyway; nothing is traced
or compiled again, and no second copy of the weights is made.

The key covers what the compiled code depends on: torch's version, the device (GPU name and
compute capability, or the CPU), the module's class and configuration, the names, dtypes,
shapes and strides of its weights and a digest of their values (AOTInductor folds some
weight-only computations into constants of the package, so other weights need their own
package: measured on the CPU, a package fed another model's weights was off by 0.09), the
inputs' shapes but for the batch, and the batch's upper bound.

Writes are atomic and serialised per folder: a package is compiled to a temporary name and
renamed into place under a lock on the folder, so two workers of one node that start at once
compile it once (the second waits, then loads), and a killed compile leaves no package under
its name. A package that does not load (corrupt, or written by an incompatible build) is
compiled again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Inductor options of the packages: weights are not in the package (the caller's are used).
INDUCTOR_OPTIONS = {"aot_inductor.package_constants_in_so": False}


def device_id(device: torch.device) -> str:
    """What compiled code depends on in the device: the GPU's name and compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}"
    return device.type


def _describe(value: Any) -> Any:
    """A JSON-able description of a module input: tensors by shape (batch left out), dtype
    and device type; containers element by element."""
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape[1:]) if value.dim() else [], str(value.dtype),
                value.device.type]
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _describe(v) for k, v in value.items()}
    return repr(value)


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of the module's weight values, cheap on a GPU: a strided sample of about 4,096
    values of each tensor and the sum of all of them (in float64)."""
    h = hashlib.sha256()
    sums = []
    with torch.no_grad():
        for key, value in module.state_dict().items():
            flat = value.detach().reshape(-1)
            h.update(key.encode())
            h.update(flat[::max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
            sums.append(flat.double().sum())
        if sums:
            h.update(torch.stack(sums).cpu().numpy().tobytes())
    return h.hexdigest()


def package_key(name: str, module: torch.nn.Module, args: tuple, kwargs: dict,
                max_batch: int, device: torch.device) -> str:
    """The package's key (see the module docstring)."""
    config = getattr(module, "config", None)
    weights = [(k, str(v.dtype), list(v.shape), list(v.stride()))
               for k, v in module.state_dict().items()]
    parts = {
        "torch": torch.__version__,
        "device": device_id(device),
        "name": name,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        # diffusers keeps the folder it was loaded from in the configuration (_name_or_path)
        "config": {k: v for k, v in dict(config).items() if not k.startswith("_")}
        if config is not None else None,
        "weights": weights,
        "weights_digest": weights_digest(module),
        "inputs": _describe([list(args), kwargs]),
        "max_batch": max_batch,
        "inductor": INDUCTOR_OPTIONS,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def _batch_dims(value: Any, dim: Any) -> Any:
    """``dynamic_shapes`` for one input: dimension 0 of every tensor is the batch."""
    if isinstance(value, torch.Tensor):
        return {0: dim} if value.dim() else None
    if isinstance(value, (list, tuple)):
        return type(value)(_batch_dims(v, dim) for v in value)
    if isinstance(value, Mapping):
        return {k: _batch_dims(v, dim) for k, v in value.items()}
    return None


def build_package(module: torch.nn.Module, args: tuple, kwargs: dict, max_batch: int,
                  path: Path) -> None:
    """Export ``module`` on these example inputs (every tensor's first dimension a batch of
    2 to ``max_batch``) and compile it into the package ``path`` (no weights in it)."""
    import inspect

    batch = torch.export.Dim("batch", min=2, max=max(max_batch, 2))
    names = list(inspect.signature(module.forward).parameters)
    dynamic = {names[i]: _batch_dims(a, batch) for i, a in enumerate(args)}
    dynamic |= {k: _batch_dims(v, batch) for k, v in kwargs.items()}
    program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic, strict=False)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                             inductor_configs=dict(INDUCTOR_OPTIONS))


def _contiguous(tree: Any) -> Any:
    """Every tensor of ``tree`` contiguous: compiled code reads its inputs with the strides it
    was exported with (an expanded or channels-last tensor would be read wrongly)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v, tree)


class CompiledModule:
    """A loaded package, called as its module was; inputs are made contiguous first (a no-op
    for those that are), as the example inputs were when it was exported."""

    def __init__(self, path: Path, module: torch.nn.Module):
        self.runner = torch._inductor.aoti_load_package(str(path))
        state = module.state_dict()  # weights the graph does not use (unfused q/k/v) left out
        self.runner.load_constants({k: state[k] for k in self.runner.get_constant_fqns()},
                                   check_full_update=True, user_managed=True)
        self.module = module  # the weights the package reads: kept alive with it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(*_contiguous(args), **_contiguous(kwargs))


def _load(path: Path, module: torch.nn.Module) -> CompiledModule:
    return CompiledModule(path, module)


def compiled_module(name: str, module: torch.nn.Module, args: tuple, kwargs: dict,
                    max_batch: int, folder: Path,
                    timings: dict[str, float] | None = None) -> CompiledModule:
    """``module`` as a loaded AOTInductor package from ``folder``, compiled there first if no
    worker has (see the module docstring). Call it as the module, with batches of 2 to
    ``max_batch``. ``timings`` gets ``aot_compile`` seconds when it compiled."""
    import time

    weight = next(module.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    args, kwargs = _contiguous(args), _contiguous(kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{package_key(name, module, args, kwargs, max_batch, device)}.pt2"
    if path.is_file():
        try:
            return _load(path, module)
        except Exception as e:  # noqa: BLE001 - a broken package is compiled again
            log.warning("compiled package %s does not load (%s): compiling it again", path, e)
    with folder_lock(folder):
        if path.is_file():  # another worker compiled it while this one waited
            try:
                return _load(path, module)
            except Exception as e:  # noqa: BLE001
                log.warning("compiled package %s does not load (%s): compiling it again",
                            path, e)
        started = time.monotonic()
        log.info("compiling %s ahead of time into %s (once per node and model shape)",
                 name, path)
        partial = path.with_name(f".partial-{os.getpid()}-{path.name}")  # ends in .pt2
        try:
            build_package(module, args, kwargs, max_batch, partial)
            os.replace(partial, path)
        except Exception as e:  # noqa: BLE001 - export or compile failed: say what to do
            from ..errors import RelighterError

            raise RelighterError(
                f"compile=aot could not compile {name} ahead of time ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); use compile=true, or leave "
                "compile off") from e
        finally:
            partial.unlink(missing_ok=True)
        if timings is not None:
            timings["aot_compile"] = round(timings.get("aot_compile", 0.0)
                                           + time.monotonic() - started, 3)
    return _load(path, module)

"""compile=aot: modules compiled ahead of time into packages in the cache folder, compiled once
per node and loaded by later workers (relit_k8s.relighters.aot). Real AOTInductor compiles on
the CPU (a C++ compiler is needed, as for compile=true)."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from relit_k8s.modelkit import make_model
from relit_k8s.relighters import create
from relit_k8s.relighters.aot import compiled_module, package_key

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="AOTInductor on the CPU needs a C++ compiler")


def small_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                         nn.Conv2d(8, 4, 3, padding=1)).eval()


def _compile_in_a_process(folder: str, go, results) -> None:
    module = small_module()
    x = torch.randn(2, 4, 8, 8)
    timings: dict[str, float] = {}
    go.wait(60)
    with torch.inference_mode():
        compiled = compiled_module("small", module, (x,), {}, 4, Path(folder), timings)
        y = torch.randn(3, 4, 8, 8)
        diff = (compiled(y) - module(y)).abs().max().item()
    results.put(("aot_compile" in timings, diff))


@pytest.mark.slow
@pytest.mark.timeout(900)  # a compile on 2 busy cores
def test_two_workers_starting_at_once_compile_once_and_a_broken_package_is_rebuilt(tmp_path):
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_compile_in_a_process, args=(str(tmp_path), go, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(600)
    got = [results.get(timeout=5) for _ in procs]
    assert sorted(compiled for compiled, _ in got) == [False, True]  # one compiled, one loaded
    assert all(diff < 1e-5 for _, diff in got)
    (package,) = tmp_path.iterdir()  # one package, no partial file left
    assert package.suffix == ".pt2" and not package.name.startswith(".")

    package.write_bytes(b"not a package")  # a broken file under the package's name
    module, x = small_module(), torch.randn(2, 4, 8, 8)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        compiled = compiled_module("small", module, (x,), {}, 4, tmp_path, timings)
        assert "aot_compile" in timings  # compiled again
        assert (compiled(x) - module(x)).abs().max().item() < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == [package.name]


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if bool(x.sum() > 0) else x  # a branch on values: cannot be exported


def test_a_module_that_cannot_be_compiled_ahead_of_time_is_a_clear_error(tmp_path):
    from relit_k8s.errors import RelighterError

    with pytest.raises(RelighterError, match="use compile=true") as e:
        compiled_module("odd", _DataDependent(), (torch.randn(2, 3),), {}, 4, tmp_path)
    assert e.value.exit_code == 78
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.slow
@pytest.mark.timeout(900)  # a compile on 2 busy cores
def test_compile_aot_equals_eager_and_later_workers_load_instead_of_compiling(tmp_path):
    model = make_model(tmp_path / "m", "tiny")
    other = make_model(tmp_path / "m2", "tiny", seed=1)  # same sizes, other weights
    cache = tmp_path / "cache"
    g = torch.Generator().manual_seed(0)
    image, ref = torch.rand(3, 40, 56, generator=g), torch.rand(3, 32, 64, generator=g) * 4
    opts = {"ddim_steps": 3, "batch_size": 8}
    aot = {**opts, "compile": "aot", "cache_dir": str(cache)}

    first = create("diffusion", {"model": str(model), **aot}, "cpu")
    assert "aot_compile" in first.load_timings  # nothing in the cache yet
    eager = create("diffusion", {"model": str(model), **opts}, "cpu")
    want = eager.relight(image, ref, [1, 2, 3, 4, 5])
    assert (first.relight(image, ref, [1, 2, 3, 4, 5]) - want).abs().max().item() < 1e-4
    one = first.relight(image, ref, [3])  # one seed: padded to the packages' smallest batch
    assert (one - want[2:3]).abs().max().item() < 1e-4
    packages = sorted(p.name for p in (cache / "aot").iterdir())
    assert len(packages) == 3 and all(p.endswith(".pt2") for p in packages)

    later = create("diffusion", {"model": str(model), **aot}, "cpu")
    assert "aot_compile" not in later.load_timings and "aot_load" in later.load_timings
    assert (later.relight(image, ref, [1, 2, 3, 4, 5]) - want).abs().max().item() < 1e-4
    # other weights of the same sizes get packages of their own (compiled code may hold
    # values derived from the weights: a package fed other weights was off by 0.09)
    other_eager = create("diffusion", {"model": str(other), **opts}, "cpu")
    x = torch.randn(2, 4, 8, 8)
    keys = {package_key("vae_decoder", r.vae.decoder, (x,), {}, 8, torch.device("cpu"))
            for r in (eager, other_eager)}
    assert len(keys) == 2

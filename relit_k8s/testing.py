"""The relighter contract: checks every relighter, built-in or third-party, must pass.

Use it from a plugin's own tests::

    from relit_k8s.testing import check_relighter
    def test_contract():
        check_relighter(MyRelighter, device="cpu")

relit-k8s's own suite runs it over every relighter found by name (built-ins and entry points).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import RelighterError
from .relighters import Relighter, parse_options


def sample_pair(height: int = 37, width: int = 53,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A deterministic odd-sized image (sRGB in [0, 1]), an HDR reference and unit normals."""
    g = torch.Generator().manual_seed(7)
    image = torch.rand(3, height, width, generator=g)
    reference = torch.rand(3, 16, 32, generator=g) * 4.0
    reference[:, 3:5, 20:23] = 200.0  # a small bright light
    normals = torch.randn(3, height, width, generator=g)
    normals[2] = normals[2].abs() + 0.5
    normals = normals / normals.norm(dim=0, keepdim=True)
    return image.to(device), reference.to(device), normals.to(device)


def check_options(cls: type[Relighter]) -> None:
    """Defaults construct, unknown options are refused by name."""
    assert isinstance(getattr(cls, "name", None), str) and cls.name, "a relighter needs a name"
    cls.Options()  # every option has a default, so `--relighter NAME` alone works
    try:
        parse_options(cls, {"no_such_option_xyz": "1"})
    except RelighterError as e:
        assert "no_such_option_xyz" in str(e)
    else:
        raise AssertionError(f"{cls.name}: an unknown option was accepted")


#: Tolerance of "same seed, same output" and "batch equals one-by-one", per device type. GPUs
#: pick other kernels for other batch sizes and run float32 convolutions in TF32, so results
#: differ in the 4th decimal (measured 1.6e-4 for examples/relit-tiny on an H200); 1e-3 is still
#: a quarter of one 8-bit output step.
CONTRACT_ATOL = {"cpu": 1e-5, "cuda": 1e-3}


def check_relighter(
    cls: type[Relighter], device: str = "cpu", atol: float | None = None,
    seeds: Sequence[int] = (11, 2**31 + 5, 3), options: dict[str, Any] | None = None,
) -> None:
    """Run every contract check on ``cls`` on ``device``; raises AssertionError on a breach.

    ``options`` are for relighters that need some (a model path, say) to be constructed.
    """
    if atol is None:
        atol = CONTRACT_ATOL.get(torch.device(device).type, 1e-3)
    check_options(cls)
    relighter = cls(parse_options(cls, options or {}), device)
    dev = torch.device(device)
    image, reference, normals = sample_pair(device=device)
    seeds = list(seeds)

    out = relighter.relight(image, reference, seeds)
    # shapes, range, device
    assert out.shape == (len(seeds), 3, *image.shape[1:]), f"{cls.name}: shape {out.shape}"
    assert out.device.type == dev.type, f"{cls.name}: output on {out.device}, asked {dev}"
    assert out.is_floating_point() and torch.isfinite(out).all(), f"{cls.name}: non-finite"
    assert out.min() >= 0 and out.max() <= 1, f"{cls.name}: values outside [0, 1]"
    # determinism per seed
    again = relighter.relight(image, reference, seeds)
    assert torch.allclose(out, again, atol=atol), f"{cls.name}: same seeds, other outputs"
    # different seeds give different samples
    assert not torch.allclose(out[0], out[1], atol=1e-3), f"{cls.name}: seeds do not matter"
    # a batch equals one-by-one (quantized outputs: but for a value in a thousand, one level)
    single = torch.cat([relighter.relight(image, reference, [s]) for s in seeds])
    if cls.output_levels is None:
        assert torch.allclose(out, single, atol=atol), (
            f"{cls.name}: batch differs from one-by-one by {(out - single).abs().max():.2e}"
        )
    else:
        step = 1 / cls.output_levels
        scaled = out * cls.output_levels
        assert (scaled - scaled.round()).abs().max() <= 1e-3, (
            f"{cls.name}: outputs are not multiples of 1/{cls.output_levels}")
        diff = (out - single).abs()
        assert diff.max() <= step + atol and (diff > atol).float().mean() <= 1e-3, (
            f"{cls.name}: batch differs from one-by-one by {diff.max():.2e} in "
            f"{(diff > atol).float().mean():.2%} of values")
    # normal maps are accepted and keep the contract
    with_normals = relighter.relight(image, reference, seeds[:1], normals)
    assert with_normals.shape == (1, 3, *image.shape[1:])
    assert with_normals.device.type == dev.type

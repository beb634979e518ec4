"""The spherical-harmonics math of the ``sh`` relighter (:mod:`relit_k8s.relighters.sh` says
what it does and why). A module of its own, imported when the first image is relit: planning a
run resolves the relighter and checks its options without importing torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .sh import SHOptions

# Real SH normalisation constants for l <= 2.
_C0 = 0.5 * math.sqrt(1.0 / math.pi)  # 0.282095
_C1 = math.sqrt(3.0 / (4.0 * math.pi))  # 0.488603
_C2 = 0.5 * math.sqrt(15.0 / math.pi)  # 1.092548
_C3 = 0.25 * math.sqrt(5.0 / math.pi)  # 0.315392
_C4 = 0.25 * math.sqrt(15.0 / math.pi)  # 0.546274
#: Clamped-cosine convolution per coefficient (band 0, 1, 1, 1, 2 x 5).
COSINE_LOBE = (math.pi,) + (2.0 * math.pi / 3.0,) * 3 + (math.pi / 4.0,) * 5

#: Band weights (window) of the irradiance, band 1 and band 2: the order-2 clamped cosine goes
#: negative (to -0.04 of its peak, at about 122 degrees from the light), so a one-sided
#: coloured light rings: its colour's irradiance is clipped to zero where the light does not
#: reach while the ambient of the other colours is not, and the image turns the complementary
#: hue there. With these weights the kernel ``1/4 + w1 x / 2 + 5 w2 P2(x) / 16`` is
#: non-negative on the whole sphere, so no light ever subtracts: they are the non-negative
#: kernel closest (least squares over the sphere) to the exact clamped cosine ``max(0, x)``
#: (windowing, as in Sloan's "Stupid Spherical Harmonics (SH) Tricks"; found by a grid search,
#: checked by ``tests/test_sh_physics.py``).
NONNEGATIVE_WINDOW = (1.0,) + (0.8579,) * 3 + (0.9093,) * 5

_LUMA = (0.2126, 0.7152, 0.0722)  # Rec. 709 luminance of linear RGB


def sh_basis(d: torch.Tensor) -> torch.Tensor:
    """The 9 real SH basis functions at unit directions ``d`` (``... x 3``) -> ``... x 9``."""
    x, y, z = d.unbind(-1)
    return torch.stack(
        [
            torch.full_like(x, _C0),
            _C1 * y,
            _C1 * z,
            _C1 * x,
            _C2 * x * y,
            _C2 * y * z,
            _C3 * (3.0 * z * z - 1.0),
            _C2 * x * z,
            _C4 * (x * x - y * y),
        ],
        dim=-1,
    )


def env_directions(height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions (``h x w x 3``) and solid angles (``h x w``) of equirectangular pixel centres.

    Pixel (u, v) looks along theta = pi v from +y and phi = 2 pi (u - 0.5):
    ``d = (sin theta sin phi, cos theta, -sin theta cos phi)`` (DESIGN, conventions).
    """
    v = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width
    theta = (math.pi * v)[:, None].expand(height, width)
    phi = (2.0 * math.pi * (u - 0.5))[None, :].expand(height, width)
    d = torch.stack(
        [torch.sin(theta) * torch.sin(phi), torch.cos(theta), -torch.sin(theta) * torch.cos(phi)],
        dim=-1,
    )
    solid = torch.sin(theta) * (math.pi / height) * (2.0 * math.pi / width)
    return d, solid


def rotate_y(d: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate directions ``d`` (``... x 3``) about +y by each angle -> ``B x ... x 3``."""
    c = torch.cos(angles).view(-1, *([1] * (d.dim() - 1)))
    s = torch.sin(angles).view(-1, *([1] * (d.dim() - 1)))
    x, y, z = d.unbind(-1)
    return torch.stack([c * x + s * z, y.expand_as(c * x), -s * x + c * z], dim=-1)


def project_env(env: torch.Tensor, angles: torch.Tensor | None = None) -> torch.Tensor:
    """SH coefficients (``B x 9 x 3``) of an environment map ``3 x h x w`` (linear radiance),
    rotated about +y by each of ``angles`` (radians; none: one unrotated copy)."""
    _, h, w = env.shape
    d, solid = env_directions(h, w, env.device)
    if angles is None:
        angles = torch.zeros(1, device=env.device, dtype=torch.float64)
    basis = sh_basis(rotate_y(d, angles.to(torch.float64)))  # B x h x w x 9
    weighted = env.to(torch.float64) * solid  # 3 x h x w
    return torch.einsum("bhwk,chw->bkc", basis, weighted).to(torch.float32)


def irradiance(coeffs: torch.Tensor, normals: torch.Tensor,
               window: Sequence[float] | None = None) -> torch.Tensor:
    """Irradiance ``B x 3 x H x W`` at unit normals ``3 x H x W``, coefficients ``B x 9 x 3``;
    ``window``: weights per coefficient (:data:`NONNEGATIVE_WINDOW`), none: the exact order-2
    clamped cosine."""
    lobe = torch.tensor(COSINE_LOBE, device=coeffs.device, dtype=coeffs.dtype)
    if window is not None:
        lobe = lobe * torch.tensor(window, device=coeffs.device, dtype=coeffs.dtype)
    basis = sh_basis(normals.permute(1, 2, 0).to(coeffs.dtype))  # H x W x 9
    return torch.einsum("hwk,bkc->bchw", basis, coeffs * lobe[None, :, None])


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Luminance of linear RGB along dim -3 (keeps the dim)."""
    w = torch.tensor(_LUMA, device=rgb.device, dtype=rgb.dtype).view(3, 1, 1)
    return (rgb * w).sum(dim=-3, keepdim=True)


def box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a ``k x k`` window (``k`` odd) of an ``N x C x H x W`` tensor, edges replicated.

    Separable running sums (a cumulative sum along each axis, in float64 so that differences of
    large sums stay exact to float32), so the cost per pixel does not depend on ``k``. The window
    grows with the image; a square window made time grow with the square of the area
    (``benchmarks/sh_large_images.py``).
    """
    if k == 1:
        return x
    r = k // 2
    out = x.to(torch.float64)
    for dim in (-1, -2):
        pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
        c = F.pad(F.pad(out, pad, mode="replicate").cumsum(dim), (1, 0, 0, 0) if dim == -1
                  else (0, 0, 1, 0))
        n = c.shape[dim] - k
        out = (c.narrow(dim, k, n) - c.narrow(dim, 0, n)) / k
    return out.to(x.dtype)


def estimate_normals(image: torch.Tensor, dome: float, detail: float) -> torch.Tensor:
    """Camera-space unit normals ``3 x H x W`` for an sRGB image, when no normal map is given.

    A dome facing the camera (x right, y up, z toward the viewer) of strength ``dome``, tilted by
    ``detail`` times the gradient of the blurred luminance taken as height.
    """
    _, h, w = image.shape
    dev, dt = image.device, image.dtype
    scale = 2.0 / max(h, w)
    ys = (torch.arange(h, device=dev, dtype=dt) - (h - 1) / 2) * -scale  # +y up
    xs = (torch.arange(w, device=dev, dtype=dt) - (w - 1) / 2) * scale
    nx = dome * xs[None, :].expand(h, w)
    ny = dome * ys[:, None].expand(h, w)
    if detail and h >= 2 and w >= 2:  # gradients need two pixels a side
        lum = luminance(srgb_to_linear(image))[None]  # 1 x 1 x H x W
        blurred = box_blur(lum, max(1, (max(h, w) // 64) | 1))[0, 0]
        gy, gx = torch.gradient(blurred, spacing=scale)
        nx = nx - detail * gx
        ny = ny + detail * gy  # rows grow downwards, +y is up
    # z is 1 before normalising; the length from the components (a norm over the stacked first
    # dim is a strided reduction, the slowest step of the relighter at 4 MP).
    inv = torch.rsqrt(nx * nx + ny * ny + 1.0)
    return torch.stack([nx * inv, ny * inv, inv])


def seed_angles(rotation: str, seeds: Sequence[int]) -> torch.Tensor:
    """The environment's rotation about +y for each seed (radians): drawn from the seed, or
    none (``rotation="none"``)."""
    if rotation == "none":
        return torch.zeros(len(seeds), dtype=torch.float64)
    return torch.tensor(
        [2.0 * math.pi * np.random.default_rng(int(s)).random() for s in seeds],
        dtype=torch.float64,
    )


@torch.inference_mode()
def relight(opts: SHOptions, device: torch.device, image: torch.Tensor, reference: torch.Tensor,
            seeds: Sequence[int], normals: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`SHRelighter.relight <relit_k8s.relighters.sh.SHRelighter.relight>`, with the
    relighter's options and device."""
    image = image.to(device, torch.float32)
    lin = srgb_to_linear(image)
    if normals is None:
        normals = estimate_normals(image, opts.dome, opts.detail)
    normals = normals.to(device, torch.float32)
    coeffs = project_env(reference.to(device, torch.float32),
                         seed_angles(opts.rotation, seeds).to(device))
    window = NONNEGATIVE_WINDOW if opts.window == "nonnegative" else None
    target = irradiance(coeffs, normals, window).clamp_min(0.0)  # B x 3 x H x W
    source = source_irradiance(opts.source, lin, normals)  # 1 x 1 x H x W or scalar
    out = lin[None] * target / source
    # Exposure: keep the input's mean luminance.
    mean_in = luminance(lin).mean()
    mean_out = luminance(out).mean(dim=(-3, -2, -1), keepdim=True)
    out = out * (mean_in / mean_out.clamp_min(1e-8))
    return linear_to_srgb(out)


def source_irradiance(source: str, lin: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """The input's own irradiance, divided out: a constant (``neutral``) or a 1st-order SH fit
    to its luminance (``fit``)."""
    if source == "neutral":
        return torch.ones((), device=lin.device)
    lum = luminance(lin).reshape(-1)
    design = torch.cat([torch.ones_like(lum)[:, None], normals.reshape(3, -1).T], dim=1)
    coef = torch.linalg.lstsq(design, lum[:, None]).solution[:, 0]
    fitted = design @ coef
    floor = 0.2 * coef[0].abs().clamp_min(1e-6)
    return fitted.clamp_min(floor).reshape(1, 1, *lin.shape[1:])

"""``sh``: training-free, physically based relighting with 2nd-order spherical harmonics.

1. The reference environment map (equirectangular, linear radiance) is projected onto the 9
   real spherical harmonics of order <= 2 with solid-angle weights, and convolved with the
   clamped-cosine lobe (Ramamoorthi and Hanrahan, 2001): ``E(n) = sum_lm A_l L_lm Y_lm(n)``
   with ``A_0 = pi``, ``A_1 = 2 pi / 3``, ``A_2 = pi / 4``, bands 1 and 2 windowed so that
   no light's irradiance is negative anywhere (:data:`.harmonics.NONNEGATIVE_WINDOW`;
   ``window="none"``: exact, with its ringing).
2. Per-pixel normals come from the user's normal map (``--normals``) or an estimate: a gentle
   dome facing the camera (``dome``) tilted by the gradients of the blurred luminance
   (``detail``: brighter is nearer, a shape-from-shading prior).
3. The image is relit as a ratio, in linear light: ``out = in * E_target(n) / E_source(n)``.
   ``source="neutral"`` assumes the input was lit evenly (``E_source`` constant), so a uniform
   white environment leaves it unchanged; ``source="fit"`` fits a 1st-order SH irradiance to
   the image's luminance by least squares and divides it out.
4. Exposure is normalised (the output keeps the input's mean luminance), values are clipped to
   [0, 1] and sRGB-encoded.

Iterations differ through the seed: with ``rotation="seed"`` the environment is rotated about
+y by an angle drawn from the seed, so every seed lights the image from another side and the
same seed always gives the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .base import Relighter, RelighterOptions

if TYPE_CHECKING:
    import torch


class SHOptions(RelighterOptions):
    rotation: Literal["seed", "none"] = Field(
        "seed",
        description="seed: rotate the environment about +y by an angle drawn from the seed; "
        "none: use it exactly as given",
    )
    source: Literal["neutral", "fit"] = Field(
        "neutral",
        description="the input's own lighting: neutral (even, divided out as a constant) or "
        "fit (1st-order SH fitted to its luminance)",
    )
    window: Literal["nonnegative", "none"] = Field(
        "nonnegative",
        description="nonnegative: band weights that keep every light's irradiance >= 0 (no "
        "complementary hue where a coloured light does not reach); none: the exact order-2 "
        "clamped cosine, which rings (relit-k8s before 0.3)",
    )
    dome: float = Field(0.6, ge=0.0, le=10.0, description="curvature of the estimated normals")
    detail: float = Field(
        0.08, ge=0.0, le=10.0, description="weight of luminance gradients in estimated normals"
    )


class SHRelighter(Relighter):
    """Spherical-harmonics relighting; see the module docstring. Its math is in
    :mod:`.harmonics`, imported at the first call, so that a plan does not import torch."""

    name = "sh"
    Options = SHOptions
    options: SHOptions
    #: Order-2 SH need little resolution: references are averaged down to this once.
    reference_resolution = (64, 128)

    def relight(self, image: torch.Tensor, reference: torch.Tensor, seeds: Sequence[int],
                normals: torch.Tensor | None = None) -> torch.Tensor:
        from . import harmonics

        return harmonics.relight(self.options, self.device, image, reference, seeds, normals)

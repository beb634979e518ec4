"""A tiny relighter, as an example of a third-party plugin for relit-k8s.

The model is a per-pixel MLP (1x1 convolutions) that maps (pixel colour, the reference's mean
colour, a per-seed random code) to a new colour. Its weights come from a file (``-O
weights=path.pt``) or, for the demo, from a fixed random initialisation. Loading happens once,
in ``__init__``; ``relight`` runs all seeds of a pair as one batch.
"""

from __future__ import annotations

import torch
from pydantic import Field

from relit_k8s import Relighter, RelighterError, RelighterOptions

CODE = 4  # size of the per-seed random code


class TinyOptions(RelighterOptions):
    strength: float = Field(0.5, ge=0.0, le=1.0, description="blend of model output and input")
    hidden: int = Field(16, ge=1, le=256, description="hidden channels")
    weights: str | None = Field(None, description="a state_dict saved with torch.save")


class TinyRelighter(Relighter):
    name = "tiny"
    Options = TinyOptions
    reference_resolution = (32, 64)  # only the reference's mean colour is used

    def __init__(self, options=None, device="cpu"):
        super().__init__(options, device)
        h = self.options.hidden
        gen = torch.Generator().manual_seed(1234)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3 + 3 + CODE, h, 1), torch.nn.GELU(), torch.nn.Conv2d(h, 3, 1)
        )
        if self.options.weights:
            try:
                self.net.load_state_dict(torch.load(self.options.weights, map_location="cpu"))
            except (OSError, RuntimeError) as e:
                raise RelighterError(
                    f"tiny: cannot load weights {self.options.weights}: {e}"
                ) from e
        else:
            with torch.no_grad():
                for p in self.net.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.net.to(self.device).eval()

    @torch.inference_mode()
    def relight(self, image, reference, seeds, normals=None):
        b, (_, h, w) = len(seeds), image.shape
        ref_colour = reference.mean(dim=(1, 2))
        ref_colour = ref_colour / ref_colour.max().clamp_min(1e-6)
        codes = torch.stack([
            torch.randn(CODE, generator=torch.Generator().manual_seed(int(s))) for s in seeds
        ]).to(self.device)
        x = torch.cat([
            image[None].expand(b, 3, h, w),
            ref_colour.view(1, 3, 1, 1).expand(b, 3, h, w),
            codes.view(b, CODE, 1, 1).expand(b, CODE, h, w),
        ], dim=1)
        y = torch.sigmoid(self.net(x))
        s = self.options.strength
        return ((1 - s) * image[None] + s * y * image[None] * 2).clamp(0, 1)

"""The whole LumiNet model (the original ``ControlLDM``) and its noise schedule.

Submodules carry the checkpoint's names (``model.diffusion_model``, ``control_model`` with its
``prior_extracter``, ``first_stage_model``), so ``LumiNet.ckpt`` loads as it is. The
configuration (:mod:`.config`) is the original YAML (``models/cldm_v21_LumiNet.yaml``; the
full-size one is the default) with, for sizes the original code hard-codes, its
``oracle_hardcoded_overrides`` section.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LINEAR_END, LINEAR_START, TIMESTEPS, LumiNetConfig
from .intrinsics import LightingPrior
from .unet import ControlNet, UNet
from .vae import AutoencoderKL


def alphas_cumprod(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, TIMESTEPS,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


class _Holder(nn.Module):
    """``model``: holds ``diffusion_model`` (the original's DiffusionWrapper)."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.diffusion_model = unet


class LumiNet(nn.Module):
    """``apply_model``: one denoiser evaluation (v-prediction) for latents ``x`` at integer
    steps ``t``, a 6-channel hint (photo, reference lighting image; in [0, 1]) and the text
    context; ``decode``: latents to images in [-1, 1]."""

    alphas_cumprod: torch.Tensor

    def __init__(self, cfg: LumiNetConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Holder(UNet(cfg.unet))
        self.control_model = ControlNet(cfg.control, cfg.hint_channels, cfg.hint_hidden)
        self.control_model.prior_extracter = LightingPrior(cfg.prior)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.register_buffer("alphas_cumprod", alphas_cumprod())

    def lighting(self, hint: torch.Tensor, context: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ControlNet's hint feature map, the extended context): once per pair."""
        feature_map, tokens = self.control_model.prior_extracter(hint)
        return feature_map, torch.cat([context, tokens.to(context.dtype)], dim=1)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, hint: torch.Tensor | None,
                    context: torch.Tensor | None,
                    prepared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``prepared``: :meth:`lighting`'s result, when it was computed once for the pair."""
        if prepared is None:
            assert hint is not None and context is not None
            prepared = self.lighting(hint, context)
        feature_map, full_context = prepared
        control = self.control_model(x, feature_map, t, full_context)
        return self.model.diffusion_model(x, t, full_context, control)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.cfg.scale_factor)



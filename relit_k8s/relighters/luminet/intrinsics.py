"""LumiNet's lighting prior: the Latent-Intrinsics encoder and the lighting tokens.

The encoder (an EDM / DDPM++-style UNet's down path, ``prior_extracter.model_latents.enc``)
runs on the photo and on the reference lighting image. From the photo LumiNet keeps one
intrinsic feature map (the L2-normalised output of the third ``_final`` block: 1/8 of the image
side); from the reference its 16-d unit "light code". The light code becomes lighting tokens
(tiled, then an MLP whose last layer is followed by SiLU too) appended to the text context, and
is broadcast next to the intrinsic features to make the ControlNet's hint feature map.

Only what inference runs is built; the checkpoint's other Latent-Intrinsics weights (its
decoder, ``final``, its own ``light_decoder``; about 71 M parameters) are read and dropped by
the loader (:data:`UNUSED_PREFIXES`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import IntrinsicsConfig

#: Checkpoint keys under ``control_model.prior_extracter.model_latents.`` that inference never
#: uses (the Latent-Intrinsics decoder half).
UNUSED_PREFIXES = ("dec.", "final.", "light_decoder.", "pos_embed")


class GroupNorm(nn.GroupNorm):
    """EDM's group norm: at most 32 groups, at least 4 channels per group."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(min(32, channels // 4), channels, eps=eps)


class Conv(nn.Module):
    """A convolution, optionally after a depthwise 2x2 box down-sampling (``resample_filter``,
    stride 2), as EDM's ``Conv2d(down=True)``."""

    def __init__(self, cin: int, cout: int, kernel: int, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        # initialised as nn.Conv2d is (a checkpoint overwrites it; a random model, as
        # make-model writes, must not be left with whatever the memory held)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(cin * kernel * kernel),
                         1 / math.sqrt(cin * kernel * kernel))
        if down:
            self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25))
        else:
            self.resample_filter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_filter is not None:
            f = self.resample_filter.to(x.dtype).tile(x.shape[1], 1, 1, 1)
            x = F.conv2d(x, f, groups=x.shape[1], stride=2)
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


class Block(nn.Module):
    """EDM's UNetBlock as the encoder uses it: no embedding, no attention, skip scale 1."""

    def __init__(self, cin: int, cout: int, down: bool = False):
        super().__init__()
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv(cin, cout, 3, down)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv(cout, cout, 3)
        self.skip = Conv(cin, cout, 1, down) if (cin != cout or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = self.conv1(F.silu(self.norm1(h)))  # dropout: inactive at inference
        return h + (self.skip(x) if self.skip is not None else x)


class IntrinsicsEncoder(nn.Module):
    """``prior_extracter.model_latents``: its encoder (``enc``) and ``light_encoder``."""

    def __init__(self, cfg: IntrinsicsConfig):
        super().__init__()
        self.enc = nn.ModuleDict()
        cout = 3
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv(cout, cfg.model_channels, 3)
                cout = cfg.model_channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, down=True)
            for idx in range(cfg.num_blocks[level]):
                cin, cout = cout, cfg.model_channels * mult
                final = idx == cfg.num_blocks[level] - 1 and res in (128, 64, 32, 16, 8)
                self.enc[f"{res}x{res}_block{idx}{'_final' if final else ''}"] = Block(cin, cout)
        self.light_encoder = nn.Sequential(nn.Linear(cout, cout), nn.SiLU(),
                                           nn.Linear(cout, cfg.light_dim))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the normalised outputs of the ``_final`` blocks, the unit light code)."""
        features = []
        for name, block in self.enc.items():
            x = block(x)
            if name.endswith("_final"):
                features.append(F.normalize(x, dim=1))
        return features, F.normalize(self.light_encoder(x.mean(dim=(2, 3))), dim=-1)


class LightingPrior(nn.Module):
    """``control_model.prior_extracter``: the hint feature map and the lighting tokens from the
    6-channel hint (photo, reference lighting image; both in [0, 1])."""

    def __init__(self, cfg: IntrinsicsConfig):
        super().__init__()
        self.cfg = cfg
        self.model_latents = IntrinsicsEncoder(cfg)
        width = cfg.n_tokens * cfg.token_dim
        self.light_decoder = nn.Sequential(
            nn.Linear(width, cfg.light_hidden), nn.SiLU(),
            nn.Linear(cfg.light_hidden, cfg.light_hidden), nn.SiLU(),
            nn.Linear(cfg.light_hidden, width), nn.SiLU())

    def forward(self, hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hint feature map ``B x (C + 16) x s x s``, lighting tokens ``B x n x token_dim``)."""
        cfg = self.cfg
        features, _ = self.model_latents(hint[:, :3])
        _, light = self.model_latents(hint[:, 3:])
        intrinsic = features[cfg.feature_index]
        tokens = self.light_decoder(light.repeat(1, cfg.n_tokens * cfg.token_dim // light.shape[1]))
        code = light[:, :, None, None].expand(-1, -1, cfg.hint_spatial, cfg.hint_spatial)
        return (torch.cat([intrinsic, code.to(intrinsic.dtype)], dim=1),
                tokens.reshape(-1, cfg.n_tokens, cfg.token_dim))

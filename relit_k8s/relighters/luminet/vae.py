"""LumiNet's first stage: the latent-diffusion KL autoencoder, in the original layout
(``encoder.down.N.block.M``, ``decoder.up.N``, ``quant_conv``, ``post_quant_conv``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1)
                                                 for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in
                   (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: its blocks and (but at the end) its resampler."""

    block: nn.ModuleList
    attn: nn.ModuleList
    downsample: nn.Module
    upsample: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()  # attn_resolutions is empty in every LumiNet config


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        mult = (1, *cfg.ch_mult)
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = Level()
            cin, cout = cfg.ch * mult[i], cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = Middle(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(moments, the last feature of each level but the deepest)."""
        h = self.conv_in(x)
        skips = []
        for level in self.down:
            assert isinstance(level, Level)
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                skips.append(h)
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h))), skips


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = Middle(cin)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = Level()
            cout = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._decode(z, lambda level, h: level.upsample(h))

    def _decode(self, z: torch.Tensor,
                upsample: Callable[[Level, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The levels from the lowest up, each level's upsampling done by ``upsample``."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            assert isinstance(level, Level)
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = upsample(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class AutoencoderKL(nn.Module):
    """``first_stage_model``: decodes latents (divided by the scale factor) to [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class Merge(nn.Module):
    """A 3x3 convolution over the up-sampled features and an encoder skip, concatenated."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, skip], dim=1))


class MergingUpsample(Upsample):
    """The bypass decoder's up-sampler: nearest x2, a convolution, then a :class:`Merge` with
    the encoder's feature of that size."""

    def __init__(self, channels: int, skip_channels: int):
        super().__init__(channels)
        self.new_merge = Merge(channels + skip_channels, channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.new_merge(super().forward(x), skip)


class BigMerge(nn.Module):
    """Adds a correction from the decoded image and the input photo (3 + 3 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(6, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(torch.cat([x, photo], dim=1))))


class BypassDecoder(Decoder):
    """LumiNet's "new decoder": the decoder fed with the encoder's features of the input photo
    (``decode(z, skips)``), so that its details survive relighting."""

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg)
        for i in range(1, len(cfg.ch_mult)):
            level = self.up[i]
            assert isinstance(level, Level)
            width = cfg.ch * cfg.ch_mult[i]
            level.upsample = MergingUpsample(width, cfg.ch * cfg.ch_mult[i - 1])
        self.new_last_procee = BigMerge()

    def forward(self, z: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        skips = list(skips)  # [photo, the encoder's level features...]; used from the end
        h = self._decode(z, lambda level, h: level.upsample(h, skips.pop()))
        return self.new_last_procee(h, skips.pop())


class BypassAutoencoderKL(AutoencoderKL):
    """``new_decoder.ckpt``'s autoencoder: decodes with the input photo's encoder features."""

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg)
        self.decoder = BypassDecoder(cfg)

    def photo_features(self, photo: torch.Tensor) -> list[torch.Tensor]:
        """What the decoder needs from the photo (``B x 3 x H x W`` in [-1, 1])."""
        _, skips = self.encoder(photo)
        return [photo, *skips]

    def decode_with(self, z: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z), features)

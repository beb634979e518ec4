"""The denoiser of LumiNet: a latent-diffusion UNet and its ControlNet, in the original layout.

Module and parameter names follow the original checkpoint (``input_blocks.N.M...``,
``middle_block``, ``output_blocks``, ``zero_convs``), so its state dict loads as it is. The
building blocks are the latent-diffusion ones: residual blocks that add the time embedding,
spatial transformers with linear projections (self-attention, then cross-attention to the
context, then a GEGLU feed-forward), 3x3 stride-2 down-sampling and nearest up-sampling.
Normalisations run in float32 whatever the weights' type, as the original does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps: cosines of the first half, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """32 groups, computed in float32."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weights too: with bf16 weights group_norm refuses a float32 input
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        self.out_layers = nn.Sequential(GroupNorm32(out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = (nn.Identity() if out == channels
                                else nn.Conv2d(channels, out, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Group norm, a linear projection in, one transformer block, a linear projection out,
    added to the input."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y)
        return y.reshape(b, h, w, c).permute(0, 3, 1, 2) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Sequential):
    """Layers that take what they need: the time embedding (residual blocks), the context
    (transformers), or neither."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _encoder(cfg: UNetConfig, emb: int) -> tuple[nn.ModuleList, Stage, list[int], int, int]:
    """The input blocks and middle block both networks share; returns them with the channels
    of each input block's output, the last width and the last down-sampling factor."""
    mc = cfg.model_channels

    def attention(ch: int) -> SpatialTransformer:
        return SpatialTransformer(ch, ch // cfg.num_head_channels, cfg.num_head_channels,
                                  cfg.context_dim)

    blocks = nn.ModuleList([Stage(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(attention(ch))
            blocks.append(Stage(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(Stage(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    middle = Stage(ResBlock(ch, emb), attention(ch), ResBlock(ch, emb))
    return blocks, middle, chans, ch, ds


def _time_embed(mc: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(mc, 4 * mc), nn.SiLU(), nn.Linear(4 * mc, 4 * mc))


class UNet(nn.Module):
    """The denoising UNet; ``control`` residuals (a ControlNet's, last = middle) are added to
    the middle block's output and to the skips."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = _time_embed(mc)
        self.input_blocks, self.middle_block, chans, ch, ds = _encoder(cfg, emb)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), emb, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, ch // cfg.num_head_channels,
                                                     cfg.num_head_channels, cfg.context_dim))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Stage(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                control: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        residuals = list(control) if control is not None else None
        if residuals is not None:
            h = h + residuals.pop()
        for block in self.output_blocks:
            skip = hs.pop()
            if residuals is not None:
                skip = skip + residuals.pop()
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)


class ControlNet(nn.Module):
    """The ControlNet: the UNet's encoder half, a hint feature map added after its first
    convolution, and a 1x1 convolution on each block's output (13 residuals for SD 2.1)."""

    #: LumiNet's lighting prior, attached by the model (the checkpoint keeps it here)
    prior_extracter: nn.Module

    def __init__(self, cfg: UNetConfig, hint_channels: int, hint_hidden: int):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        self.time_embed = _time_embed(mc)
        self.input_blocks, self.middle_block, chans, ch, _ = _encoder(cfg, 4 * mc)
        # LumiNet's hint block: stride 1 throughout, on a feature map already at latent size
        self.input_hint_block = Stage(
            nn.Conv2d(hint_channels, hint_channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hint_channels, hint_hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hint_hidden, hint_hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hint_hidden, hint_hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hint_hidden, mc, 3, padding=1))
        self.zero_convs = nn.ModuleList([Stage(nn.Conv2d(c, c, 1)) for c in chans])
        self.middle_block_out = Stage(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        guided: torch.Tensor | None = self.input_hint_block(hint)
        outs = []
        h = x
        for block, zero_conv in zip(self.input_blocks, self.zero_convs, strict=True):
            h = block(h, emb, context)
            if guided is not None:
                h = h + guided
                guided = None
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs

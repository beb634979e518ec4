"""The whole LumiNet model (the original ``ControlLDM``), its configuration and its loader.

Submodules carry the checkpoint's names (``model.diffusion_model``, ``control_model`` with its
``prior_extracter``, ``first_stage_model``), so ``LumiNet.ckpt`` loads as it is. The
configuration is the original YAML (``models/cldm_v21_LumiNet.yaml``; the full-size one is
the default) with, for sizes the original code hard-codes, its ``oracle_hardcoded_overrides``
section.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .intrinsics import IntrinsicsConfig, LightingPrior
from .unet import ControlNet, UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

#: The 1000-step "linear" schedule of latent diffusion (betas from sqrt-spaced values).
TIMESTEPS, LINEAR_START, LINEAR_END = 1000, 0.00085, 0.012


@dataclass(frozen=True)
class LumiNetConfig:
    unet: UNetConfig = UNetConfig(attention_resolutions=(8, 4, 2, 1))
    control: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    prior: IntrinsicsConfig = IntrinsicsConfig()
    hint_hidden: int = 256
    scale_factor: float = 0.18215
    #: the bypass ("new") decoder's autoencoder (hard-coded in the original)
    bypass_vae: VAEConfig = VAEConfig()

    @property
    def hint_channels(self) -> int:
        """Channels of the hint feature map: the intrinsic features and the light code."""
        p = self.prior
        return p.model_channels * p.channel_mult[p.feature_index + 1] + p.light_dim

    @property
    def image_size(self) -> int:
        """Pixels a side the model runs at (the light code is broadcast to a fixed size)."""
        return self.prior.hint_spatial * 2 ** (len(self.vae.ch_mult) - 1)

    @classmethod
    def from_yaml(cls, data: dict[str, Any]) -> LumiNetConfig:
        """From the original YAML's ``model.params`` and ``oracle_hardcoded_overrides``."""
        params = data["model"]["params"]

        def pick(dc, values: dict[str, Any], **renames: str):
            names = {f.name for f in fields(dc)}
            out = {}
            for key, value in values.items():
                key = renames.get(key, key)
                if key in names:
                    out[key] = tuple(value) if isinstance(value, list) else value
            return dc(**out)

        unet = pick(UNetConfig, params["unet_config"]["params"])
        control = pick(UNetConfig, params["control_stage_config"]["params"])
        dd = dict(params["first_stage_config"]["params"]["ddconfig"])
        vae = pick(VAEConfig, {**dd, "embed_dim":
                               params["first_stage_config"]["params"].get("embed_dim", 4)})
        o = data.get("oracle_hardcoded_overrides") or {}
        prior = IntrinsicsConfig()
        mapping = {"li_img_resolution": "img_resolution", "li_model_channels": "model_channels",
                   "li_channel_mult": "channel_mult", "li_num_blocks": "num_blocks",
                   "li_light_hidden": "light_hidden", "n_light_tokens": "n_tokens",
                   "token_dim": "token_dim", "hint_spatial": "hint_spatial"}
        overrides: dict[str, Any] = {mapping[k]: tuple(v) if isinstance(v, list) else v
                                     for k, v in o.items() if k in mapping}
        prior = replace(prior, **overrides)
        bypass = pick(VAEConfig, o["nd_ddconfig"]) if o.get("nd_ddconfig") else VAEConfig()
        return cls(unet=unet, control=control, vae=vae, prior=prior,
                   hint_hidden=o.get("hint_hidden", 256),
                   scale_factor=float(params.get("scale_factor", 0.18215)), bypass_vae=bypass)


    def to_yaml(self) -> dict[str, Any]:
        """The original YAML's form (what :meth:`from_yaml` reads back to this configuration):
        ``model.params`` and, for the sizes the original code hard-codes,
        ``oracle_hardcoded_overrides``."""
        def unet(c: UNetConfig, **extra: Any) -> dict[str, Any]:
            return {"params": {
                "image_size": self.image_size // 2 ** (len(self.vae.ch_mult) - 1),
                "in_channels": c.in_channels, "model_channels": c.model_channels,
                "attention_resolutions": list(c.attention_resolutions),
                "num_res_blocks": c.num_res_blocks, "channel_mult": list(c.channel_mult),
                "num_head_channels": c.num_head_channels, "use_spatial_transformer": True,
                "use_linear_in_transformer": True, "transformer_depth": 1,
                "context_dim": c.context_dim, "legacy": False, **extra}}

        def ddconfig(v: VAEConfig) -> dict[str, Any]:
            return {"double_z": True, "z_channels": v.z_channels, "resolution": 256,
                    "in_channels": v.in_channels, "out_ch": v.out_ch, "ch": v.ch,
                    "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks,
                    "attn_resolutions": [], "dropout": 0.0}

        p = self.prior
        return {
            "model": {"target": "cldm.LumiNet.ControlLDM", "params": {
                "linear_start": LINEAR_START, "linear_end": LINEAR_END,
                "timesteps": TIMESTEPS, "scale_factor": self.scale_factor,
                "conditioning_key": "crossattn",
                "control_stage_config": {"target": "cldm.LumiNet.ControlNet",
                                         **unet(self.control, hint_channels=6)},
                "unet_config": {"target": "cldm.LumiNet.ControlledUnetModel",
                                **unet(self.unet, out_channels=self.unet.out_channels)},
                "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                       "params": {"embed_dim": self.vae.embed_dim,
                                                  "ddconfig": ddconfig(self.vae)}},
            }},
            "oracle_hardcoded_overrides": {
                "li_img_resolution": p.img_resolution, "li_model_channels": p.model_channels,
                "li_channel_mult": list(p.channel_mult), "li_num_blocks": list(p.num_blocks),
                "li_light_hidden": p.light_hidden, "n_light_tokens": p.n_tokens,
                "token_dim": p.token_dim, "hint_spatial": p.hint_spatial,
                "hint_hidden": self.hint_hidden, "nd_ddconfig": ddconfig(self.bypass_vae)},
        }


#: The tiny configuration of the golden fixture (``../shared/fixtures/luminet/tiny.yaml``): the
#: same architecture at 128 x 128 pixels, for CPU tests and ``make-model --kind luminet``.
_TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_head_channels=16,
                        context_dim=48)
_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
TINY = LumiNetConfig(
    unet=replace(_TINY_UNET, attention_resolutions=(8, 4, 2, 1)), control=_TINY_UNET,
    vae=_TINY_VAE, bypass_vae=_TINY_VAE, hint_hidden=32,
    prior=IntrinsicsConfig(model_channels=4, channel_mult=(1, 2, 2, 2, 4, 4), light_hidden=64,
                           token_dim=48, hint_spatial=16))


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


def read_config(path: str | Path) -> LumiNetConfig:
    """The configuration in a LumiNet YAML file (the original format); a file that is missing
    or not such a YAML is a :class:`RelighterError`."""
    import yaml

    from ...errors import RelighterError

    try:
        return LumiNetConfig.from_yaml(yaml.safe_load(Path(path).read_text()))
    except FileNotFoundError:
        raise RelighterError(f"luminet: no config file at {path}") from None
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise RelighterError(f"luminet: {path} is not a LumiNet YAML ({type(e).__name__}: "
                             f"{e})") from None

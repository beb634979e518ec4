"""LumiNet's sizes, its YAML configuration and its schedule's steps: what a plan checks options
against (the resolution a model runs at, the DDIM step counts its schedule allows). No torch
here, so that planning a luminet run does not import it (the model's code does)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

#: The 1000-step "linear" schedule of latent diffusion (betas from sqrt-spaced values).
TIMESTEPS, LINEAR_START, LINEAR_END = 1000, 0.00085, 0.012


def ddim_timesteps(steps: int, total: int = 1000) -> list[int]:
    """The original's uniform DDIM steps, ascending: 0, c, 2c, ... plus one (c = total // S)."""
    c = total // steps
    return [i + 1 for i in range(0, total, c)]


@dataclass(frozen=True)
class UNetConfig:
    """The sizes of a UNet or ControlNet (the YAML's ``unet_config`` / ``control_stage_config``)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    context_dim: int = 1024


@dataclass(frozen=True)
class VAEConfig:
    """``first_stage_config.params.ddconfig`` (and ``embed_dim``)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3


@dataclass(frozen=True)
class IntrinsicsConfig:
    """Sizes of the Latent-Intrinsics encoder and the lighting tokens (hard-coded in the
    original sources; the tiny fixture's YAML overrides them)."""

    img_resolution: int = 256  # only names the levels
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 4, 8, 16)
    num_blocks: tuple[int, ...] = (1, 2, 2, 4, 4, 4)
    light_hidden: int = 4096
    n_tokens: int = 3
    token_dim: int = 1024
    #: side of the light code's broadcast next to the intrinsic features (64: 512 x 512 input)
    hint_spatial: int = 64
    #: which ``_final`` output is the intrinsic feature map
    feature_index: int = 2
    light_dim: int = 16


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

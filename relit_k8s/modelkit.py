"""Write a random-weight model directory for the ``diffusion`` relighter (tests, benchmarks).

``sd21`` has the sizes of the seed's model (Stable Diffusion 2.1 at 512 x 512 with a 6-channel
ControlNet: UNet 866M, ControlNet 364M, VAE 84M parameters); ``tiny`` is a few hundred
thousand parameters, for CPU tests. Weights are random: outputs are noise-like images, which is
all that throughput and plumbing need. No weights are downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from .relighters.diffusion import EMBEDDINGS, import_diffusers
from .relighters.diffusion import native_resolution as model_resolution

SIZES = ("tiny", "sd21")


def _configs(size: str) -> tuple[dict, dict, dict, int, int]:
    """(unet, vae, controlnet extras, text length, text width)."""
    if size == "sd21":
        unet = dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )
        return unet, vae, {"conditioning_embedding_out_channels": (16, 32, 96, 256)}, 77, 1024
    if size == "tiny":
        unet = dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8,
        )
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        )
        return unet, vae, {"conditioning_embedding_out_channels": (16, 32)}, 8, 32
    raise ValueError(f"size must be one of {SIZES}")


def make_model(path: str | Path, size: Literal["tiny", "sd21"] = "tiny", seed: int = 0,
               distinct_uncond: bool = False, new_decoder: bool = False,
               device: str = "cpu") -> Path:
    """Write the model directory; returns its path."""
    lib = import_diffusers(needed_by="make-model")
    AutoencoderKL, ControlNetModel = lib.AutoencoderKL, lib.ControlNetModel
    DDIMScheduler, UNet2DConditionModel = lib.DDIMScheduler, lib.UNet2DConditionModel
    save_file = lib.save_file

    path = Path(path)
    unet_cfg, vae_cfg, cn_extra, text_len, text_dim = _configs(size)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=6, **cn_extra)
        vae = AutoencoderKL(**vae_cfg)
    unet.save_pretrained(path / "unet")
    controlnet.save_pretrained(path / "controlnet")
    vae.save_pretrained(path / "vae")
    if new_decoder:
        with torch.device(device):
            AutoencoderKL(**vae_cfg).save_pretrained(path / "vae_new_decoder")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  prediction_type="v_prediction").save_pretrained(path / "scheduler")
    g = torch.Generator().manual_seed(seed + 1)
    emb = {"cond": torch.randn(1, text_len, text_dim, generator=g) * 0.5}
    if distinct_uncond:
        emb["uncond"] = torch.randn(1, text_len, text_dim, generator=g) * 0.5
    save_file(emb, str(path / EMBEDDINGS))
    return path


def native_resolution(path: str | Path) -> int:
    """Pixels a side the model directory was made for (what the ``diffusion`` relighter uses
    unless ``-O resolution=N``)."""
    import json

    path = Path(path)
    return model_resolution(json.loads((path / "unet" / "config.json").read_text()),
                            json.loads((path / "vae" / "config.json").read_text()))


def parameter_counts(path: str | Path) -> dict[str, int]:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    path = Path(path)
    return {name: sum(p.numel() for p in cls.from_pretrained(path / name).parameters())
            for name, cls in (("unet", UNet2DConditionModel), ("controlnet", ControlNetModel),
                              ("vae", AutoencoderKL))}

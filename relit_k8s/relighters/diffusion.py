"""``diffusion``: the seed's kind of model (a ControlNet on a latent diffusion UNet), made fast.

The model directory (diffusers layout; local, or ``s3://`` downloaded once per node into the
cache) holds ``unet/``, ``controlnet/`` (6-channel hint: input ++ reference, values in [0, 1]),
``vae/``, ``scheduler/`` (DDIM, v-prediction), ``text_embeddings.safetensors`` (the fixed
conditioning: tensor ``cond``, and ``uncond`` when it differs) and, optionally,
``vae_new_decoder/`` (``new_decoder=true``). ``relit-k8s make-model`` writes one with random
weights, for tests and benchmarks.

What it does differently from the seed's loop:

* weights load once per worker, in bf16 on a GPU (fp32 on the CPU), with PyTorch's SDPA attention;
* all seeds of a pair run as one batch; each seed's starting noise comes from its own
  generator, so a batch equals one-by-one;
* one UNet + ControlNet pass per step when the unconditional branch equals the conditional one
  (same hint and text, as in the seed's model) or guidance is 1: the same result for half the
  work; otherwise both branches run in one batched call;
* per-pair work (resizing and tone-mapping the hint) is done once per pair, not per step or seed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import RelighterError
from .base import Relighter, RelighterOptions

EMBEDDINGS = "text_embeddings.safetensors"


class DiffusionOptions(RelighterOptions):
    model: str | None = Field(None, description="model directory (diffusers layout), local or "
                              "s3://; required")
    ddim_steps: int = Field(50, ge=1, le=1000, description="DDIM steps (the seed's default)")
    guidance_scale: float = Field(9.0, ge=0.0, description="classifier-free guidance scale")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0: deterministic)")
    resolution: int = Field(512, ge=16, le=2048, description="model resolution, pixels")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on the CPU")
    new_decoder: bool = Field(False, description="use the directory's vae_new_decoder/")
    compile: bool = Field(False, description="torch.compile the UNet and ControlNet (static "
                          "shapes): faster steps after a one-time compile, whose artefacts are "
                          "cached in TORCHINDUCTOR_CACHE_DIR (the Job puts it in /cache)")
    cache_dir: str | None = Field(None, description="where s3:// models are downloaded "
                                  "[default: $XDG_CACHE_HOME/relit-k8s/models]")


def _dtype(option: str, device: torch.device) -> torch.dtype:
    if option == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[option]


def fetch_model(uri: str, cache_dir: str | None = None) -> Path:
    """A local directory holding the model at ``uri``: itself, or a one-time download of an
    ``s3://`` prefix into the node-local cache, reused by every later worker on the node."""
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise RelighterError(f"diffusion: no model directory at {uri}")
        return path
    from ..storage import open_storage

    root = Path(cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", "/tmp"),
                                          "relit-k8s", "models"))
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = target / ".complete"
    if done.exists():
        return target
    store = open_storage(uri)
    keys = store.walk()
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    for key in keys:
        dest = staging / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.read(key))
    try:
        staging.rename(target)  # atomic: another worker may have won the race
    except OSError:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    if not (target / "unet").is_dir():
        raise RelighterError(f"diffusion: {uri} holds no model (no unet/)")
    done.touch()
    return target


class DiffusionRelighter(Relighter):
    """ControlNet relighting, batched over seeds; see the module docstring."""

    name = "diffusion"
    Options = DiffusionOptions

    def __init__(self, options=None, device="cpu"):
        super().__init__(options, device)
        o = self.options
        if not o.model:
            raise RelighterError("diffusion needs a model: -O model=DIR or s3://bucket/model "
                                 "(relit-k8s make-model DIR writes a random-weight one)")
        try:
            from diffusers import (
                AutoencoderKL,
                ControlNetModel,
                DDIMScheduler,
                UNet2DConditionModel,
            )
            from diffusers.utils import logging as diffusers_logging
            from safetensors.torch import load_file
        except ImportError as e:
            raise RelighterError("the diffusion relighter needs diffusers: "
                                 "pip install 'relit-k8s[diffusion]'") from e
        started = time.monotonic()
        path = fetch_model(o.model, o.cache_dir)
        self.dtype = _dtype(o.dtype, self.device)
        vae_dir = path / ("vae_new_decoder" if o.new_decoder else "vae")
        if o.new_decoder and not vae_dir.is_dir():
            raise RelighterError(f"diffusion: new_decoder=true, but {path} has no "
                                 "vae_new_decoder/ (only the standard vae/)")
        load = {"torch_dtype": self.dtype}
        diffusers_logging.set_verbosity_error()  # not the "install accelerate" advice per load
        self.unet = UNet2DConditionModel.from_pretrained(path / "unet", **load)
        self.controlnet = ControlNetModel.from_pretrained(path / "controlnet", **load)
        self.vae = AutoencoderKL.from_pretrained(vae_dir, **load)
        self.scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        if self.scheduler.config.prediction_type != "v_prediction":
            raise RelighterError(f"diffusion: {path}/scheduler predicts "
                                 f"{self.scheduler.config.prediction_type}, not v_prediction")
        emb = load_file(str(path / EMBEDDINGS))
        self.cond = emb["cond"].to(self.device, self.dtype)
        self.uncond = emb["uncond"].to(self.device, self.dtype) if "uncond" in emb else None
        for module in (self.unet, self.controlnet, self.vae):
            module.to(self.device).eval().requires_grad_(False)
            if self.device.type == "cuda":
                module.to(memory_format=torch.channels_last)  # faster bf16 convolutions
        if o.compile:
            self.unet = torch.compile(self.unet, dynamic=False)
            self.controlnet = torch.compile(self.controlnet, dynamic=False)
        self.latent_channels = self.unet.config.in_channels  # compiled modules forward it
        self.scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.load_seconds = time.monotonic() - started

    @property
    def one_pass(self) -> bool:
        """True when guidance cannot change the result: one UNet pass per step is exact."""
        o = self.options
        return (o.guidance_scale == 1.0 or self.uncond is None
                or torch.equal(self.uncond, self.cond))

    def _hint(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Input ++ tone-mapped reference, 6 x res x res in [0, 1]: once per pair."""
        res = self.options.resolution
        ref = reference.float()
        flat = ref.flatten()
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))
                      [:1_000_000].to(flat.device)] if flat.numel() > 1_000_000 else flat
        p95 = torch.quantile(sample, 0.95).clamp_min(1e-8)  # the seed's HDR mapping
        ldr = (ref / p95).clamp(0, 1) ** (1 / 2.2)
        img = F.interpolate(image[None].float(), (res, res), mode="bicubic", antialias=True)
        ref_r = F.interpolate(ldr[None], (res, res), mode="bilinear", antialias=True)
        return torch.cat([img, ref_r], dim=1).clamp(0, 1)[0]

    def _noise(self, seeds: Sequence[int]) -> torch.Tensor:
        side = self.options.resolution // self.scale
        return torch.stack([
            torch.randn(self.latent_channels, side, side,
                        generator=torch.Generator().manual_seed(int(s)))
            for s in seeds]).to(self.device, self.dtype)

    def _eps(self, latents, t, hint, text) -> torch.Tensor:
        down, mid = self.controlnet(latents, t, encoder_hidden_states=text,
                                    controlnet_cond=hint, return_dict=False)
        return self.unet(latents, t, encoder_hidden_states=text,
                         down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    @torch.inference_mode()
    def relight(self, image, reference, seeds, normals=None):
        o = self.options
        b = len(seeds)
        h, w = image.shape[1:]
        hint = self._hint(image.to(self.device), reference.to(self.device)).to(self.dtype)
        hints = hint[None].expand(b, -1, -1, -1)
        latents = self._noise(seeds)
        self.scheduler.set_timesteps(o.ddim_steps, device=self.device)
        one = self.one_pass
        cond = self.cond.expand(b, -1, -1)
        if not one:
            both_text = torch.cat([self.uncond.expand(b, -1, -1), cond])
            both_hint = torch.cat([hints, hints])
        # eta > 0 adds noise at each step: from each seed's own generator, so it stays per seed
        gens = ([torch.Generator().manual_seed(int(s) + 1) for s in seeds]
                if o.eta > 0 else None)
        for t in self.scheduler.timesteps:
            x = self.scheduler.scale_model_input(latents, t)
            if one:
                pred = self._eps(x, t, hints, cond)
            else:
                uncond_pred, cond_pred = self._eps(torch.cat([x, x]), t, both_hint,
                                                   both_text).chunk(2)
                pred = uncond_pred + o.guidance_scale * (cond_pred - uncond_pred)
            latents = self.scheduler.step(pred, t, latents, eta=o.eta,
                                          generator=gens).prev_sample
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor,
                                  return_dict=False)[0]
        out = ((decoded.float() + 1) / 2).clamp(0, 1)
        return F.interpolate(out, (h, w), mode="bicubic", antialias=True).clamp(0, 1)

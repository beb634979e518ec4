"""The ``luminet`` relighter: the official LumiNet checkpoint, run as the original code runs it.

Per pair (as the original multi-GPU script): the photo and the reference (an HDR one mapped to
[0, 1] by its 95th percentile and a 1/2.2 power, once per reference; an LDR one as its sRGB
values), are resized to the model's 512 x 512 with
OpenCV's bilinear filter and stacked into the 6-channel hint; the lighting prior and the
extended context are computed once per pair. Per seed: the starting latent from the seed's own
CPU generator, DDIM (50 steps, eta 0, guidance 9), the first stage's decode (or the bypass
"new decoder" with the photo's encoder features), then the original's post-processing: to
8 bits by truncation and back to the photo's size with OpenCV's Lanczos-4 filter, in that
order. With ``score`` (the default) every output is also scored by LumiNet's seed selector
(:mod:`.selector`), so that ``relit-k8s select`` can keep the seeds whose lighting is closest.

Guidance: the original gives both branches the same empty-prompt context and the same hint, so
in evaluation mode they are equal and guidance changes nothing; one model pass per step is then
exact (the original scripts also forget ``.eval()``, leaving dropout on in the lighting
prior; this relighter runs in evaluation mode, as the original demo does).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ... import images
from ...errors import NotFoundError, RelighterError
from ...storage import cached_file, file_size
from ..base import Relighter, RelighterOptions
from ..loading import (
    CudaStart,
    PhaseTimer,
    check_compiler,
    file_identity,
    measure_batch_size,
    model_cache_dir,
    probe_cache_path,
    read_cached_tensors,
    weights_dtype,
    write_cached_tensors,
)
from .checkpoint import load, load_safetensors, mismatch, read_state_dict
from .model import TIMESTEPS, LumiNet, LumiNetConfig, alphas_cumprod, read_config
from .sampler import ddim_sample, ddim_timesteps
from .selector import Selector
from .text import empty_prompt_context
from .vae import BypassAutoencoderKL

log = logging.getLogger("relit_k8s.relighters.luminet")
#: Seeds decoded at once (decode memory does not grow with the batch).
DECODE_CHUNK = 8
NO_CHECKPOINT = ("luminet needs the official checkpoint: -O checkpoint=PATH/LumiNet.ckpt or "
                 "s3://bucket/LumiNet.ckpt (Hugging Face xyxingx/LumiNet, gated: accept its "
                 "conditions, then download it)")
#: The original's classifier-free guidance scale.
GUIDANCE_SCALE = 9.0
#: What a missing new decoder's error adds.
NEW_DECODER_HINT = (" (--new-decoder looks beside the checkpoint, where the official download "
                    "puts new_decoder.ckpt; give another with -O new_decoder=PATH)")
#: The name of the empty-prompt context in the weights cache (not a model key).
CONTEXT_KEY = "relit_k8s.empty_prompt_context"
#: Bumped when the model's code changes what its weights mean (older cache files are unused).
WEIGHTS_CACHE_FORMAT = 1
#: Contexts computed from checkpoints, by checkpoint path: one per process.
_CONTEXTS: dict[str, torch.Tensor] = {}
_CONTEXT_LOCK = threading.Lock()


class LuminetOptions(RelighterOptions):
    checkpoint: str | None = Field(None, description="LumiNet.ckpt (or .safetensors): a file "
                                   "or s3:// URI; required")
    new_decoder: str | None = Field(None, description="new_decoder.ckpt: decode with the "
                                    "bypass decoder (keeps the photo's details); true (the "
                                    "seed's --new-decoder): the new_decoder.ckpt beside the "
                                    "checkpoint [default: off]")
    config: str | None = Field(None, description="the model's YAML in the original format "
                               "[default: the full-size LumiNet]")
    context: str | None = Field(None, description="a safetensors file whose 'context' (or "
                                "'context_cond') tensor, 1 x 77 x width, is the cross-attention "
                                "context [default: the empty prompt, computed from the "
                                "checkpoint's text encoder]")
    ddim_steps: int = Field(50, ge=1, le=999, description="DDIM steps (the original's 50)")
    uncond_context: str | None = Field(None, description="a safetensors file whose 'context' "
                                       "(or 'context_uncond') tensor is the unconditional "
                                       "branch's context: guidance then runs both branches "
                                       "[default: none: both branches are the context, equal, "
                                       "so one pass per step and guidance has no effect, as in "
                                       "LumiNet]")
    guidance_scale: float = Field(GUIDANCE_SCALE, ge=0.0, description="classifier-free "
                                  "guidance, with uncond_context (without it, both branches "
                                  "are equal)")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0: deterministic)")
    resolution: int = Field(512, description="the model's image size (LumiNet runs at 512 only;"
                            " a smaller test model at its own)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on the CPU")
    batch_size: int | None = Field(None, ge=1, le=1024, description="seeds per batch "
                                   "[default: measured at load from free GPU memory, at most "
                                   "32; 8 on the CPU]")
    compile: bool = Field(False, description="torch.compile the UNet and ControlNet (static "
                          "shapes: batches padded to a multiple of 8 seeds); the compiled code "
                          "is cached in TORCHINDUCTOR_CACHE_DIR")
    cache_dir: str | None = Field(None, description="where s3:// files are downloaded, and "
                                  "the weights cache kept [default: "
                                  "$XDG_CACHE_HOME/relit-k8s/models]")
    score: bool = Field(True, description="score every output against its reference with "
                        "LumiNet's seed selector (the light codes of seed_selection.py; float32, "
                        "from the bytes written): relit-k8s select ranks a pair's outputs by it")
    cache_weights: bool = Field(True, description="in bf16/fp16 (a GPU's default), keep the "
                                "weights as served (half the checkpoint's bytes) and the "
                                "empty-prompt context in cache_dir/luminet, which later workers "
                                "on the node load instead of the checkpoint")

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"batch_size", "compile", "cache_dir",
                                                   "cache_weights", "score"})
    LOCATIONS: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _new_decoder_beside_the_checkpoint(cls, data: object) -> object:
        """``new_decoder`` true (the seed's ``--new-decoder`` flag, or ``-O new_decoder=true``)
        is the official ``new_decoder.ckpt`` beside the checkpoint, where the official
        download puts both; false is off. A missing file is named when the model loads."""
        if not isinstance(data, dict) or "new_decoder" not in data:
            return data
        flag = data["new_decoder"]
        if isinstance(flag, str) and flag.lower() in ("true", "false"):
            flag = flag.lower() == "true"
        if flag is False:
            return {**data, "new_decoder": None}
        if flag is True:
            checkpoint = data.get("checkpoint")
            if not checkpoint:
                raise ValueError("new_decoder=true looks for new_decoder.ckpt beside the "
                                 "checkpoint: give -O checkpoint=..., or the file itself with "
                                 "-O new_decoder=PATH")
            folder = str(checkpoint).rpartition("/")[0]
            return {**data, "new_decoder": f"{folder}/new_decoder.ckpt" if folder
                    else "new_decoder.ckpt"}
        return data

    @model_validator(mode="after")
    def _guidance_needs_two_branches(self) -> LuminetOptions:
        """A guidance scale other than the default, without ``uncond_context``, would do
        nothing (both branches would be the same context): say so rather than accept it. (The
        default is the original's 9; options are validated again from a plan, with every
        field set, so it is the value that counts, not whether it was given.)"""
        if self.guidance_scale != GUIDANCE_SCALE and self.uncond_context is None:
            raise ValueError("guidance_scale has no effect without uncond_context: both "
                             "branches of guidance are the same context (as in LumiNet, in "
                             "evaluation mode); give -O uncond_context=FILE.safetensors too")
        return self

    @field_validator("ddim_steps")
    @classmethod
    def _within_the_schedule(cls, steps: int) -> int:
        """The original's step spacing (1000 // steps) reaches step 1000, one past its
        schedule, for some counts (3, 9, 27, 37, 101 to 111, 251 to 333, over 500): the
        original code fails there with an IndexError; say so before any weights are read."""
        if ddim_timesteps(steps)[-1] >= TIMESTEPS:
            good = [n for n in (50, 25, 20, 10, 5) if n < steps] or [2]
            raise ValueError(f"LumiNet's DDIM spacing (every {1000 // steps} steps from 1) "
                             f"runs past its 1000-step schedule with {steps} steps, as in the "
                             f"original code; choose another count, e.g. {good[0]}")
        return steps


def _local(uri: str, cache_dir: str | None, what: str, hint: str = "") -> Path:
    try:
        return cached_file(uri, model_cache_dir(cache_dir))
    except NotFoundError:
        raise RelighterError(f"luminet: no {what} at {uri}{hint}") from None


def _check_resolution(resolution: int, cfg: LumiNetConfig) -> None:
    if resolution != cfg.image_size:
        raise RelighterError(f"luminet: resolution={resolution}, but this model runs at "
                             f"{cfg.image_size} x {cfg.image_size} only (its light code is "
                             f"broadcast to a fixed {cfg.prior.hint_spatial} x "
                             f"{cfg.prior.hint_spatial} latent)")


class LuminetRelighter(Relighter):
    """LumiNet (a ControlNet on Stable Diffusion 2.1 with lighting tokens); see the module
    docstring."""

    #: outputs are the original's 8-bit values (``finish``)
    output_levels = 255
    name = "luminet"
    Options = LuminetOptions
    options: LuminetOptions
    batch_size = 8
    #: the new decoder (``new_decoder``), or None: the first stage's
    bypass: BypassAutoencoderKL | None = None

    @classmethod
    def preflight(cls, options: RelighterOptions, here: bool) -> None:
        assert isinstance(options, LuminetOptions)
        if not options.checkpoint:
            raise RelighterError(NO_CHECKPOINT)
        if here:
            try:  # contexts, .safetensors checkpoints and the weights cache are safetensors
                import safetensors.torch  # noqa: F401
            except ImportError:
                raise RelighterError("luminet needs the safetensors package: pip install "
                                     "'relit-k8s[luminet]'") from None
            for what, uri in (("checkpoint", options.checkpoint),
                              ("new decoder", options.new_decoder),
                              ("config", options.config), ("context", options.context),
                              ("unconditional context", options.uncond_context)):
                if uri and not uri.startswith("s3://") and not Path(
                        uri.removeprefix("file://")).expanduser().is_file():
                    raise RelighterError(f"luminet: no {what} file at {uri}"
                                         + (NEW_DECODER_HINT if what == "new decoder" else ""))
        if options.config is None or (here and not options.config.startswith("s3://")):
            # the model's size, from its YAML (no weights): a resolution it cannot run is
            # refused before a plan is written
            cfg = LumiNetConfig() if options.config is None else read_config(
                Path(options.config.removeprefix("file://")).expanduser())
            _check_resolution(options.resolution, cfg)

    @classmethod
    def scores(cls, options: RelighterOptions) -> bool:
        assert isinstance(options, LuminetOptions)
        return options.score

    @classmethod
    def fingerprint(cls, options: RelighterOptions) -> str | None:
        assert isinstance(options, LuminetOptions)
        """sha256 over the name and size of each file the options name (checkpoint, new
        decoder, config, context); None when one cannot be read from here."""
        import hashlib

        parts = []
        for uri in (options.checkpoint, options.new_decoder, options.config, options.context,
                    options.uncond_context):
            if uri is None:
                parts.append("-")
                continue
            size = file_size(uri)
            if size is None:
                return None
            parts.append(f"{uri.rstrip('/').rpartition('/')[2]}:{size}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def __init__(self, options=None, device="cpu"):
        super().__init__(options, device)
        o = self.options
        if not o.checkpoint:
            raise RelighterError(NO_CHECKPOINT)
        if o.compile:
            check_compiler(self.device, "luminet")
        timer = PhaseTimer()
        #: Seconds of each loading phase (the worker logs them with its start event).
        self.load_timings = timer.timings
        lap = timer.lap
        cuda = CudaStart(self.device)  # while the checkpoint is read on the CPU
        cfg = read_config(_local(o.config, o.cache_dir, "config")) if o.config \
            else LumiNetConfig()
        _check_resolution(o.resolution, cfg)
        checkpoint = _local(o.checkpoint, o.cache_dir, "checkpoint")
        new_decoder = _local(o.new_decoder, o.cache_dir, "new decoder", NEW_DECODER_HINT) \
            if o.new_decoder else None
        lap("fetch")
        self.cfg = cfg
        self.dtype = weights_dtype(o.dtype, self.device)
        cache = self._weights_cache_path(checkpoint)
        #: where the weights were read from: "checkpoint", or "cache" (:meth:`_weights_cache_path`)
        self.weights_from = "checkpoint"
        model, default_context, text = self._read_weights(cache, checkpoint, new_decoder)
        lap("read_weights")
        self.context = self._context(o, checkpoint, text, default_context)
        #: the unconditional branch's context (``uncond_context``), or None: one pass a step
        self.uncond_context = self._checked_context(self._context_file(
            o.uncond_context, ("context", "context_uncond"))) if o.uncond_context else None
        lap("context")
        #: the schedule, in float32 whatever the weights' type
        self.alphas_cumprod = model.alphas_cumprod.float().clone()
        if cuda.wait():
            lap("cuda_init")  # what is left of it (a cached model loaded to the device at once)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.bypass is not None:
            self.bypass = self.bypass.to(self.device, self.dtype).eval().requires_grad_(False)
        lap("to_device")
        if o.score:  # float32 from the checkpoint, whatever the serving dtype and the cache
            self.selector = Selector.load(checkpoint, cfg.prior, self.device)
            lap("selector")
        if cache is not None and text is not None:
            self._write_cache(cache, checkpoint, text)
            lap("write_cache")
        #: compiled: batches padded to a multiple of 8 seeds, so that few shapes are compiled
        self.static_shapes = o.compile
        self.batch_size = o.batch_size or (self._measure_batch_size()
                                           if self.device.type == "cuda" else 8)
        lap("batch_probe")
        if o.compile:
            self._compile()

    def _read_weights(self, cache: Path | None, checkpoint: Path, new_decoder: Path | None
                      ) -> tuple[LumiNet, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """(the model on the meta device's tensors as read, the cached empty-prompt context,
        the checkpoint's text encoder: None when read from the cache); sets :attr:`bypass`."""
        cfg = self.cfg
        model, default_context = self._from_cache(cache)
        text: dict[str, torch.Tensor] | None = None
        if model is None:
            with torch.device("meta"):
                model = LumiNet(cfg)
            text = load(model, checkpoint, assign=True)
        self.bypass = None
        if new_decoder is not None:
            with torch.device("meta"):
                bypass = BypassAutoencoderKL(cfg.bypass_vae)
            _load_bypass(bypass, new_decoder)
            self.bypass = bypass
        return model, default_context, text

    def _compile(self) -> None:
        """torch.compile the UNet and ControlNet (static shapes)."""
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True  # PyTorch's advice for diffusion UNets
        m = self.model
        m.model.diffusion_model = torch.compile(  # type: ignore[assignment]
            m.model.diffusion_model, dynamic=False)
        m.control_model = torch.compile(  # type: ignore[assignment]
            m.control_model, dynamic=False)

    def _measure_batch_size(self) -> int:
        """Seeds per batch on this GPU (:func:`~..loading.measure_batch_size`): one denoising
        step's peak memory at 4 and 8 seeds, one decode chunk's."""
        cfg, dev = self.cfg, self.device
        side, res = cfg.prior.hint_spatial, cfg.image_size
        hint = torch.rand(1, 6, res, res, device=dev, dtype=self.dtype)
        with torch.inference_mode():
            feature_map, context = self.model.lighting(hint, self.context.to(dev, self.dtype))
            features = (self.bypass.photo_features(hint[:, :3] * 2 - 1)
                        if self.bypass is not None else None)

        def latents(n: int) -> torch.Tensor:
            return torch.randn(n, cfg.unet.in_channels, side, side, device=dev, dtype=self.dtype)

        def step(b: int) -> None:
            self.model.apply_model(latents(b), torch.full((b,), 500, device=dev), None, None,
                                   prepared=(feature_map.expand(b, -1, -1, -1),
                                             context.expand(b, -1, -1)))

        cache = probe_cache_path(self.options.cache_dir, "luminet", dev, {
            "config": repr(cfg), "dtype": str(self.dtype), "bypass": self.bypass is not None})
        return measure_batch_size(step, lambda: self.decode(latents(DECODE_CHUNK), features),
                                  dev, who="luminet", cache=cache)

    def _weights_cache_path(self, checkpoint: Path) -> Path | None:
        """``<cache_dir>/luminet/<checkpoint>-<dtype>-<key>.safetensors``: the model's
        weights in its 16-bit serving dtype (half the bytes of the official fp32 file, no text
        encoder, no unused decoder) and the empty-prompt context, written by the first worker
        of a node and loaded by the later ones instead of the checkpoint; keyed by the
        checkpoint file (path, size, time), the configuration and the dtype. None: not cached
        (``cache_weights=false``, or fp32: the copy would be as large as the checkpoint)."""
        if not self.options.cache_weights or self.dtype == torch.float32:
            return None
        key = hashlib.sha256(f"{WEIGHTS_CACHE_FORMAT}|{file_identity(checkpoint)}|"
                             f"{self.cfg!r}|{self.dtype}".encode()).hexdigest()[:16]
        dtype = str(self.dtype).removeprefix("torch.")
        return (Path(model_cache_dir(self.options.cache_dir)) / "luminet"
                / f"{checkpoint.stem}-{dtype}-{key}.safetensors")

    def _from_cache(self, cache: Path | None) -> tuple[LumiNet | None, torch.Tensor | None]:
        """(the model, the empty-prompt context) from the weights cache; (None, None) when
        there is none, it does not fit the model, or it lacks the context that is needed."""
        state = read_cached_tensors(cache, self.device) if cache is not None else None
        if state is None:
            return None, None
        context = state.pop(CONTEXT_KEY, None)
        if context is not None:
            context = context.cpu()  # where one computed from the checkpoint would be
        if context is None and not self.options.context:
            return None, None
        with torch.device("meta"):
            model = LumiNet(self.cfg)
        try:
            model.load_state_dict({**state, "alphas_cumprod": alphas_cumprod()}, strict=True,
                                  assign=True)
        except RuntimeError as e:  # written by another version of this model's code
            log.warning("ignored the cached weights %s (%s): reading the checkpoint", cache,
                        str(e).splitlines()[0])
            return None, None
        self.weights_from = "cache"
        return model, context

    def _write_cache(self, cache: Path, checkpoint: Path, text: dict[str, torch.Tensor]
                     ) -> None:
        """The weights as they are served (after the cast to the serving dtype), and the
        empty-prompt context where the checkpoint has a text encoder to compute it with."""
        tensors = {k: v for k, v in self.model.state_dict().items() if k != "alphas_cumprod"}
        if self.options.context is None:
            tensors[CONTEXT_KEY] = self.context
        elif text:
            tensors[CONTEXT_KEY] = self._default_context(checkpoint, text).float()
        if not write_cached_tensors(cache, tensors):
            log.warning("could not write the weights cache %s: later workers read the "
                        "checkpoint again", cache)

    @staticmethod
    def _default_context(checkpoint: Path, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The empty-prompt context, from the checkpoint's text encoder: once per process."""
        with _CONTEXT_LOCK:
            key = str(checkpoint)
            if key not in _CONTEXTS:
                _CONTEXTS[key] = empty_prompt_context(text)
            return _CONTEXTS[key]

    def _context(self, o: LuminetOptions, checkpoint: Path, text: dict[str, torch.Tensor] | None,
                 cached: torch.Tensor | None) -> torch.Tensor:
        if o.context:
            context = self._context_file(o.context, ("context", "context_cond"))
        elif cached is not None:
            context = cached
        else:
            assert text is not None  # read from the checkpoint when the cache had no context
            context = self._default_context(checkpoint, text)
        return self._checked_context(context)

    def _context_file(self, uri: str, names: tuple[str, ...]) -> torch.Tensor:
        """The first tensor of ``names`` in the safetensors file at ``uri``."""
        data = load_safetensors(_local(uri, self.options.cache_dir, "context"))
        name = next((k for k in names if k in data), None)
        if name is None:
            raise RelighterError(f"luminet: {uri} has no {' or '.join(map(repr, names))} "
                                 f"tensor (it has {sorted(data)})")
        return data[name]

    def _checked_context(self, context: torch.Tensor) -> torch.Tensor:
        want = self.cfg.unet.context_dim
        if context.dim() != 3 or context.shape[0] != 1 or context.shape[2] != want:
            raise RelighterError(f"luminet: the context has shape {tuple(context.shape)}, "
                                 f"expected (1, tokens, {want})")
        return context.float()

    def reference_pixels(self, decoded: images.Decoded) -> np.ndarray:
        """The reference as the original's loader makes it: HDR tone-mapped (95th
        percentile, clip, 1/2.2), LDR as its plain sRGB values / 255."""
        if decoded.hdr:
            return images.tonemap_hdr(decoded.pixels)
        return decoded.pixels

    # --- one pair ----------------------------------------------------------------------------
    def hint(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``1 x 6 x res x res``: the photo and the reference lighting image (as
        :meth:`reference_pixels` made it), as the original prepares them (OpenCV bilinear
        resize; float64 photo, float32 reference)."""
        res = self.cfg.image_size
        photo = image.detach().cpu().double().permute(1, 2, 0).numpy()
        ref = reference.detach().cpu().float().permute(1, 2, 0).numpy()
        photo_r = cv2.resize(photo, (res, res), interpolation=cv2.INTER_LINEAR)
        ref_r = cv2.resize(ref.astype(np.float32), (res, res), interpolation=cv2.INTER_LINEAR)
        both = np.concatenate([photo_r, ref_r], axis=2).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(both.transpose(2, 0, 1)))[None]

    @torch.inference_mode()
    def relight(self, image, reference, seeds, normals=None):
        h, w = image.shape[1:]
        seeds = [int(s) for s in seeds]
        out = torch.empty(len(seeds), 3, h, w)
        if not seeds:
            return out
        hint = self.hint(image, reference).to(self.device, self.dtype)
        context = self.context.to(self.device, self.dtype)
        prepared = self.model.lighting(hint, context)
        unconditional = None if self.uncond_context is None else self.model.lighting(
            hint, self.uncond_context.to(self.device, self.dtype))
        features = None
        if self.bypass is not None:
            features = self.bypass.photo_features(hint[:, :3] * 2 - 1)
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start:start + self.batch_size]
            pad = 0
            if self.static_shapes:  # few compiled shapes: pad to a multiple of 8 seeds
                pad = min(-(-len(chunk) // 8) * 8, self.batch_size) - len(chunk)
            latents = self.sample(chunk + [chunk[-1]] * pad, prepared,
                                  unconditional)[:len(chunk)]
            for i in range(0, len(chunk), DECODE_CHUNK):
                part = latents[i:i + DECODE_CHUNK]
                decoded = self.decode(part, features)
                for j, pixels in enumerate(decoded):
                    out[start + i + j] = self.finish(pixels, h, w)
        return out

    def sample(self, seeds: Sequence[int], prepared: tuple[torch.Tensor, torch.Tensor],
               unconditional: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The final latents of ``seeds`` for one pair (its prepared hint and context; with
        ``unconditional``, the unconditional branch's, for guidance)."""
        o, cfg = self.options, self.cfg
        side = cfg.prior.hint_spatial
        b = len(seeds)
        x = torch.stack([torch.randn(cfg.unet.in_channels, side, side,
                                     generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(self.device, self.dtype)
        feature_map, full_context = prepared
        batch = (feature_map.expand(b, -1, -1, -1), full_context.expand(b, -1, -1))
        gens = [torch.Generator().manual_seed(s + 1) for s in seeds] if o.eta > 0 else None

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # both branches of guidance are the same (same context, same hint): one pass
            return self.model.apply_model(x, t, None, None, prepared=batch)

        if unconditional is not None:  # two contexts: both branches in one batch
            fm_u, ctx_u = unconditional
            both = (torch.cat([fm_u.expand(b, -1, -1, -1), batch[0]]),
                    torch.cat([ctx_u.expand(b, -1, -1), batch[1]]))

            def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # noqa: F811
                u, c = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), None, None,
                                              prepared=both).chunk(2)
                return u + o.guidance_scale * (c - u)

        return ddim_sample(denoise, x, self.alphas_cumprod, o.ddim_steps, eta=o.eta,
                           noise=gens, before_step=self.raise_if_stopped)

    def decode(self, latents: torch.Tensor, features: list[torch.Tensor] | None
               ) -> torch.Tensor:
        """Latents to images in [-1, 1] (the bypass decoder when ``new_decoder`` is set)."""
        z = latents / self.cfg.scale_factor
        if self.bypass is not None:
            assert features is not None
            n = len(z)
            return self.bypass.decode_with(z, [f.expand(n, -1, -1, -1) for f in features])
        return self.model.first_stage_model.decode(z)

    @staticmethod
    def finish(pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The original's output: (x + 1) / 2 clipped, to 8 bits by truncation, then back to
        the photo's size with Lanczos-4 on the 8-bit image (OpenCV rounds and saturates), as
        8-bit values / 255, which the worker's rounding to 8 bits keeps exactly. Per image, so
        a batch equals its seeds one by one; a flat image stays flat (Lanczos on 8 bits)."""
        rgb = ((pixels.float().cpu().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
        eight = (rgb * 255).astype(np.uint8)  # truncation, as the original's astype
        back = cv2.resize(eight, (w, h), interpolation=cv2.INTER_LANCZOS4)
        return torch.from_numpy(back.astype(np.float32) / 255).permute(2, 0, 1)


def _load_bypass(bypass: BypassAutoencoderKL, path: Path) -> None:
    state = read_state_dict(path, "new decoder")
    problem = mismatch(bypass.state_dict(), state)
    if problem:
        raise RelighterError(f"luminet: the new decoder {path} does not fit ({problem})")
    bypass.load_state_dict(state, strict=True, assign=True)

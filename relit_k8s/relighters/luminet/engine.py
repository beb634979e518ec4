"""The ``luminet`` relighter's model code: loading the checkpoint (or the node's weights
cache), the per-pair hint, DDIM sampling, decoding and the original's post-processing.
:class:`~.relighter.LuminetRelighter` (its options and planning checks, without torch) makes a
:class:`LoadedLuminet` when it is constructed; the module docstring of :mod:`.relighter`
says what it does and how it matches the original."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ... import images
from ...errors import NotFoundError, RelighterError
from ...storage import cached_file
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
from .config import LumiNetConfig, read_config
from .model import LumiNet, alphas_cumprod
from .relighter import (
    NEW_DECODER_HINT,
    NO_CHECKPOINT,
    LuminetOptions,
    LuminetRelighter,
    check_resolution,
)
from .sampler import ddim_sample
from .selector import Selector
from .text import empty_prompt_context
from .vae import BypassAutoencoderKL

log = logging.getLogger("relit_k8s.relighters.luminet")
#: Seeds decoded at once (decode memory does not grow with the batch).
DECODE_CHUNK = 8
#: The name of the empty-prompt context in the weights cache (not a model key).
CONTEXT_KEY = "relit_k8s.empty_prompt_context"
#: Bumped when the model's code changes what its weights mean (older cache files are unused).
WEIGHTS_CACHE_FORMAT = 1
#: Contexts computed from checkpoints, by checkpoint path: one per process.
_CONTEXTS: dict[str, torch.Tensor] = {}
_CONTEXT_LOCK = threading.Lock()


def _local(uri: str, cache_dir: str | None, what: str, hint: str = "") -> Path:
    try:
        return cached_file(uri, model_cache_dir(cache_dir))
    except NotFoundError:
        raise RelighterError(f"luminet: no {what} at {uri}{hint}") from None


class LoadedLuminet(LuminetRelighter):
    """LumiNet loaded onto its device: what ``LuminetRelighter(options, device)`` makes."""

    #: the new decoder (``new_decoder``), or None: the first stage's
    bypass: BypassAutoencoderKL | None = None

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
        check_resolution(o.resolution, cfg)
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

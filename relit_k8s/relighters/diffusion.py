"""``diffusion``: the seed's kind of model (a ControlNet on a latent diffusion UNet), made fast.

The model directory (diffusers layout; local, or ``s3://`` downloaded once per node into the
cache) holds ``unet/``, ``controlnet/`` (6-channel hint: input ++ reference, values in [0, 1]),
``vae/``, ``scheduler/`` (DDIM, v-prediction), ``text_embeddings.safetensors`` (the fixed
conditioning: tensor ``cond``, and ``uncond`` when it differs) and, optionally,
``vae_new_decoder/`` (``new_decoder=true``). ``relit-k8s make-model`` writes one with random
weights, for tests and benchmarks.

What it does differently from the seed's loop:

* weights load once per worker, in bf16 on a GPU (fp32 on the CPU), channels-last, with fused
  q/k/v projections and PyTorch's SDPA attention; in bf16/fp16 the first worker of a node keeps
  them as served in the cache folder (``cache_weights``), and later workers load that file
  straight to the device instead of building each module and reading the model folder;
* all seeds of a pair run as one batch; each seed's starting noise comes from its own
  generator, so a batch equals one-by-one;
* one UNet + ControlNet pass per step when the unconditional branch equals the conditional one
  (same hint and text, as in the seed's model) or guidance is 1: the same result for half the
  work; otherwise both branches run in one batched call;
* per-pair work (resizing and tone-mapping the hint) is done once per pair, not per step or seed;
* the batch size is measured, not guessed: unless ``batch_size`` is set, the relighter runs one
  denoising step at two batch sizes on the GPU at load time, takes the memory each extra seed
  costs, and picks the largest multiple of 8 that fits in 85% of the free memory (divided
  between the workers sharing the GPU; fewer than 8 when fewer fit), capped at
  :data:`AUTO_BATCH_CAP` (the benchmark's sweep: 64 seeds gain 2.4% for twice the memory);
* the VAE decodes in chunks of :data:`DECODE_CHUNK`, so decode memory does not grow with the batch;
* ``compile=true``: the UNet, ControlNet and VAE decoder are compiled with static shapes, and
  batches are padded to a multiple of 8 seeds, so a worker compiles a handful of shapes at most
  (the compiled code is cached on disk, see ``TORCHINDUCTOR_CACHE_DIR``);
* ``compile=aot``: the same three modules compiled ahead of time, once per node, into packages
  in the cache folder that later workers load instead of tracing (:mod:`.aot`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import NotFoundError, RelighterError
from ..storage import cached_copy, folder_fingerprint
from .base import Relighter, RelighterOptions
from .loading import (  # noqa: F401 - AUTO_BATCH_CAP, batch_for_memory: also imported from here
    AUTO_BATCH_CAP,
    CudaStart,
    PhaseTimer,
    batch_for_memory,
    check_compiler,
    folder_identity,
    measure_batch_size,
    model_cache_dir,
    probe_cache_path,
    read_cached_tensors,
    weights_dtype,
    write_cached_tensors,
)

log = logging.getLogger(__name__)

EMBEDDINGS = "text_embeddings.safetensors"
#: Latents decoded per VAE call.
DECODE_CHUNK = 8
#: Bumped when what the weights cache holds changes (older cache files are then unused).
WEIGHTS_CACHE_FORMAT = 1


class DiffusionOptions(RelighterOptions):
    model: str | None = Field(None, description="model directory (diffusers layout), local or "
                              "s3://; required")
    ddim_steps: int = Field(50, ge=1, le=1000, description="DDIM steps (the seed's default)")
    guidance_scale: float = Field(9.0, ge=0.0, description="classifier-free guidance scale")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0: deterministic)")
    resolution: int | None = Field(
        None, ge=16, le=2048, description="model resolution, pixels [default: the model's own, "
        "from its unet/config.json: sample_size x the VAE's scale, as diffusers; 512 for SD "
        "2.1, 32 for make-model --size tiny]")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on the CPU")
    new_decoder: bool = Field(False, description="use the directory's vae_new_decoder/")
    batch_size: int | None = Field(None, ge=1, le=1024, description="seeds per GPU batch "
                                   "[default: measured at load from free GPU memory, at most "
                                   f"{AUTO_BATCH_CAP}; 8 on the CPU]")
    compile: bool | Literal["aot"] = Field(
        False, description="true: torch.compile the UNet, ControlNet and VAE decoder (static "
        "shapes): faster steps after a one-time compile, whose kernels are cached in "
        "TORCHINDUCTOR_CACHE_DIR (the Job puts it in /cache), though each new worker traces "
        "again; aot: compile them ahead of time once per node into packages kept in the cache "
        "folder (cache_dir/aot), which later workers load instead of tracing")
    attention: Literal["auto", "flash", "cudnn", "efficient"] = Field(
        "auto", description="scaled-dot-product attention kernel on a GPU: PyTorch's choice, "
        "or one to use (relighter_throughput --sweep times each)")
    cache_dir: str | None = Field(None, description="where s3:// models are downloaded, and "
                                  "the weights cache kept [default: "
                                  "$XDG_CACHE_HOME/relit-k8s/models]")
    cache_weights: bool = Field(True, description="in bf16/fp16 (a GPU's default), keep the "
                                "UNet, ControlNet and VAE as served in cache_dir/diffusion, "
                                "which later workers of the node load straight to the device "
                                "instead of the model folder")

    RUNTIME: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "compile", "attention", "cache_dir", "cache_weights"})
    LOCATIONS: ClassVar[frozenset[str]] = frozenset({"model"})


#: PyTorch's SDPA kernel switches as the process started: ``attention=auto`` restores them.
_SDPA_DEFAULTS = {flag: getattr(torch.backends.cuda, f"{flag}_sdp_enabled")()
                  for flag in ("flash", "cudnn", "mem_efficient", "math")}


def use_backend(name: str) -> None:
    """Make ``name`` the process's SDPA attention kernel (the math one stays as a fallback);
    ``auto`` restores PyTorch's own switches, leaving the choice to it."""
    wanted = dict(_SDPA_DEFAULTS) if name == "auto" else {
        "flash": name == "flash", "cudnn": name == "cudnn",
        "mem_efficient": name == "efficient", "math": True}
    for flag, on in wanted.items():
        getattr(torch.backends.cuda, f"enable_{flag}_sdp")(on)


def _configs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet's and VAE's ``config.json`` of a local model directory."""
    try:
        return (json.loads((path / "unet" / "config.json").read_text()),
                json.loads((path / "vae" / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise RelighterError(f"diffusion: {path} has no readable unet/ and vae/ "
                             f"config.json ({e})") from None


def check_resolution(resolution: int, unet_config: Any, vae_config: Any) -> None:
    """A resolution the model can run: a multiple of the VAE's scale times the UNet's
    down-sampling (64 for SD 2.1), else a :class:`RelighterError` naming the nearest ones."""
    step = 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (
        len(unet_config["block_out_channels"]) - 1)
    if resolution % step:
        low = max(step, resolution // step * step)
        raise RelighterError(f"diffusion: resolution={resolution} does not fit this model: it "
                             f"must be a multiple of {step} (the VAE's scale times the UNet's "
                             f"down-sampling), e.g. {low} or {low + step}")


def native_resolution(unet_config: Any, vae_config: Any) -> int:
    """Pixels a side a model was made for, from its UNet's and VAE's configurations: the
    UNet's ``sample_size`` (latent pixels) times the VAE's scale, as diffusers' pipelines."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def fetch_model(uri: str, cache_dir: str | None = None) -> Path:
    """A local directory holding the model at ``uri``: itself, or a one-time download of an
    ``s3://`` prefix into the node-local cache (:func:`~relit_k8s.storage.cached_copy`)."""
    root = model_cache_dir(cache_dir)
    try:
        path = cached_copy(uri, root)
    except NotFoundError as e:
        raise RelighterError(f"diffusion: no model directory at {uri}") from e
    if uri.startswith("s3://") and not (path / "unet").is_dir():
        raise RelighterError(f"diffusion: {uri} holds no model (no unet/)")
    return path


NO_MODEL = ("diffusion needs a model: -O model=DIR or s3://bucket/model "
            "(relit-k8s make-model DIR writes a random-weight one)")


def import_diffusers(needed_by: str = "the diffusion relighter") -> Any:
    """diffusers' model classes and safetensors' loaders, as one namespace; a
    :class:`RelighterError` (exit 78) naming the extra when they are not installed."""
    from types import SimpleNamespace

    try:
        from diffusers import (
            AutoencoderKL,
            ControlNetModel,
            DDIMScheduler,
            UNet2DConditionModel,
        )
        from diffusers.utils import logging as diffusers_logging
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        raise RelighterError(f"{needed_by} needs diffusers: "
                             "pip install 'relit-k8s[diffusion]'") from e
    diffusers_logging.set_verbosity_error()  # not the "install accelerate" advice per load
    return SimpleNamespace(AutoencoderKL=AutoencoderKL, ControlNetModel=ControlNetModel,
                           DDIMScheduler=DDIMScheduler,
                           UNet2DConditionModel=UNet2DConditionModel, load_file=load_file,
                           save_file=save_file)


class DiffusionRelighter(Relighter):
    """ControlNet relighting, batched over seeds; see the module docstring."""

    name = "diffusion"
    Options = DiffusionOptions
    options: DiffusionOptions

    @classmethod
    def preflight(cls, options: RelighterOptions, here: bool) -> None:
        """A model is named; for a run on this machine, diffusers is installed and a local
        model directory exists (an ``s3://`` model is fetched by the workers)."""
        assert isinstance(options, DiffusionOptions)
        if not options.model:
            raise RelighterError(NO_MODEL)
        if here:
            import_diffusers()
            if not options.model.startswith("s3://"):
                path = Path(options.model.removeprefix("file://")).expanduser()
                if not path.is_dir():
                    raise RelighterError(f"diffusion: no model directory at {options.model} "
                                         "(relit-k8s make-model DIR writes a random-weight one)")
                if options.resolution is not None:
                    check_resolution(options.resolution, *_configs(path))

    @classmethod
    def fingerprint(cls, options: RelighterOptions) -> str | None:
        """sha256 over the model folder's file names and sizes and its JSON configurations
        (cheap: no weights are read); None when the folder cannot be listed from here."""
        assert isinstance(options, DiffusionOptions)
        if not options.model:
            return None
        return folder_fingerprint(options.model)

    def __init__(self, options=None, device="cpu"):
        """Load the model once: fetch it, read the weights, place them on the device, measure
        the batch size and (``compile=true``) compile; each phase is timed in
        :attr:`load_timings`."""
        super().__init__(options, device)
        o = self.options
        if not o.model:
            raise RelighterError(NO_MODEL)
        if o.compile:
            check_compiler(self.device, "diffusion")
        timer = PhaseTimer()
        #: Seconds of each loading phase (the worker logs them with its start event).
        self.load_timings = timer.timings
        lap = timer.lap
        cuda = CudaStart(self.device)  # while diffusers is imported and the model fetched
        diffusers = import_diffusers()
        lap("imports")
        path = fetch_model(o.model, o.cache_dir)
        lap("fetch")
        if cuda.wait():
            lap("cuda_init")  # what is left of it: the weights cache loads to the device
        self.dtype = weights_dtype(o.dtype, self.device)
        #: where the weights were read from: "model" (the folder), or "cache"
        #: (:meth:`_weights_cache_path`)
        self.weights_from = "model"
        cache = self._read_weights(diffusers, path)
        lap("read_weights")
        if cache is not None:
            self._write_cache(cache)
            lap("write_cache")
        self._place()
        lap("to_device")
        #: Pad batches to a multiple of 8 seeds and decode chunks to DECODE_CHUNK (compiled
        #: code is specialised to shapes: this keeps their number small).
        self.static_shapes = o.compile is True
        #: compile=aot: batches of at least 2 (the packages' smallest batch)
        self.aot = o.compile == "aot"
        self.batch_size = o.batch_size or (self._measure_batch_size()
                                           if self.device.type == "cuda" else 8)
        lap("batch_probe")
        if self.aot:
            self._load_compiled()
            lap("aot_load")
        elif o.compile:
            self._compile()
        self.load_seconds = time.monotonic() - timer.started  # compiling happens at the first call

    def _read_weights(self, diffusers, path: Path) -> Path | None:
        """The UNet, ControlNet, VAE (or its new decoder), scheduler and text embeddings of the
        model directory, in :attr:`dtype`: the modules from the weights cache where an earlier
        worker kept them, else from the folder (on the CPU). Returns the weights cache to
        write for the next worker, when they came from the folder and are to be cached."""
        o = self.options
        vae_dir = path / ("vae_new_decoder" if o.new_decoder else "vae")
        if o.new_decoder and not vae_dir.is_dir():
            raise RelighterError(f"diffusion: new_decoder=true, but {path} has no "
                                 "vae_new_decoder/ (only the standard vae/)")
        self.scheduler = diffusers.DDIMScheduler.from_pretrained(path / "scheduler")
        trained = self.scheduler.config.num_train_timesteps
        if o.ddim_steps >= trained:  # with steps_offset, the last step would be out of range
            raise RelighterError(f"diffusion: ddim_steps={o.ddim_steps}, but the model's "
                                 f"scheduler has {trained} timesteps: use fewer than {trained}")
        if self.scheduler.config.prediction_type != "v_prediction":
            raise RelighterError(f"diffusion: {path}/scheduler predicts "
                                 f"{self.scheduler.config.prediction_type}, not v_prediction")
        emb = diffusers.load_file(str(path / EMBEDDINGS))
        self.cond = emb["cond"].to(self.device, self.dtype)
        self.uncond = emb["uncond"].to(self.device, self.dtype) if "uncond" in emb else None
        folders = {"unet": (diffusers.UNet2DConditionModel, path / "unet"),
                   "controlnet": (diffusers.ControlNetModel, path / "controlnet"),
                   "vae": (diffusers.AutoencoderKL, vae_dir)}
        cache = self._weights_cache_path(path, vae_dir)
        modules = self._from_cache(cache, folders) if cache is not None else None
        if modules is not None:
            self.unet, self.controlnet, self.vae = modules
            return None
        load = {"torch_dtype": self.dtype}
        self.unet, self.controlnet, self.vae = (
            cls.from_pretrained(folder, **load) for cls, folder in folders.values())
        return cache

    def _write_cache(self, cache: Path) -> None:
        """The three modules' weights as read (in the serving dtype), prefixed with their
        names, for the later workers of the node."""
        tensors = {f"{name}.{k}": v for name, module in
                   (("unet", self.unet), ("controlnet", self.controlnet), ("vae", self.vae))
                   for k, v in module.state_dict().items()}
        if not write_cached_tensors(cache, tensors):
            log.warning("could not write the weights cache %s: later workers read the model "
                        "folder again", cache)

    def _weights_cache_path(self, path: Path, vae_dir: Path) -> Path | None:
        """``<cache_dir>/diffusion/<model>-<dtype>-<key>.safetensors``: the UNet, ControlNet
        and VAE in their 16-bit serving dtype (half the bytes of an fp32 folder), written by
        the first worker of a node and loaded by the later ones straight to the device, with
        no module initialisation (diffusers without ``accelerate`` initialises every module
        at random before reading its weights); keyed by the three folders' files (names,
        sizes, times) and the dtype. None: not cached (``cache_weights=false``, or fp32)."""
        if not self.options.cache_weights or self.dtype == torch.float32:
            return None
        identity = "|".join(folder_identity(d) for d in (path / "unet", path / "controlnet",
                                                         vae_dir))
        key = hashlib.sha256(f"{WEIGHTS_CACHE_FORMAT}|{identity}|{self.dtype}".encode())
        dtype = str(self.dtype).removeprefix("torch.")
        return (Path(model_cache_dir(self.options.cache_dir)) / "diffusion"
                / f"{path.resolve().name}-{dtype}-{key.hexdigest()[:16]}.safetensors")

    def _from_cache(self, cache: Path, folders: dict[str, tuple[Any, Path]]
                    ) -> tuple[Any, ...] | None:
        """The modules from the weights cache, built on the meta device (no memory, no random
        initialisation) from their folders' configurations and given the cached tensors;
        None when there is no cache file or it does not fit them (then the folder is read)."""
        state = read_cached_tensors(cache, self.device)
        if state is None:
            return None
        modules = []
        try:
            for name, (cls, folder) in folders.items():
                with torch.device("meta"):
                    module = cls.from_config(cls.load_config(folder))
                prefix = f"{name}."
                module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                        if k.startswith(prefix)}, strict=True, assign=True)
                left = [n for n, t in itertools.chain(module.named_parameters(),
                                                      module.named_buffers()) if t.is_meta]
                if left:
                    raise RuntimeError(f"{name}: the cache lacks {left[0]}")
                modules.append(module)
        except RuntimeError as e:
            log.warning("ignored the cached weights %s (%s): reading the model folder", cache,
                        str(e).splitlines()[0])
            return None
        self.weights_from = "cache"
        return tuple(modules)

    def _place(self) -> None:
        """Move the modules to the device in eval mode (channels-last on a GPU), fuse q/k/v,
        and derive what the sampler needs from their configs."""
        o = self.options
        if self.device.type == "cuda":
            use_backend(o.attention)
        for module in (self.unet, self.controlnet, self.vae):
            module.to(self.device).eval().requires_grad_(False)
            if self.device.type == "cuda":
                module.to(memory_format=torch.channels_last)  # faster bf16 convolutions
        # one matmul for q, k and v (k and v in cross-attention) instead of three: same result
        self.unet.fuse_qkv_projections()
        self.controlnet.fuse_qkv_projections()
        self.latent_channels = self.unet.config.in_channels
        self.scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        #: Pixels a side: the option, else the model's native size (as diffusers' pipelines).
        self.resolution = o.resolution or native_resolution(self.unet.config, self.vae.config)
        check_resolution(self.resolution, self.unet.config, self.vae.config)
        # True when guidance cannot change the result: one UNet pass per step is exact
        self.one_pass = (o.guidance_scale == 1.0 or self.uncond is None
                         or torch.equal(self.uncond, self.cond))
        self._decoder = self.vae.decoder

    def _compile(self) -> None:
        """torch.compile the UNet, ControlNet and VAE decoder with static shapes."""
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True  # PyTorch's advice for diffusion UNets
        self.unet = torch.compile(self.unet, dynamic=False)
        self.controlnet = torch.compile(self.controlnet, dynamic=False)
        self._decoder = torch.compile(self.vae.decoder, dynamic=False)

    def _load_compiled(self) -> None:
        """compile=aot: the UNet, ControlNet and VAE decoder as AOTInductor packages from the
        cache folder, compiled there first when no worker of this node has (:mod:`.aot`)."""
        from .aot import compiled_module

        res, dev, b = self.resolution, self.device, 2
        side = res // self.scale
        branches = 1 if self.one_pass else 2
        folder = Path(model_cache_dir(self.options.cache_dir)) / "aot"
        x = torch.randn(b, self.latent_channels, side, side, device=dev, dtype=self.dtype)
        t = torch.tensor(500, device=dev)
        text = self.cond.expand(b, -1, -1).contiguous()
        hint = torch.rand(b, 6, res, res, device=dev, dtype=self.dtype)
        timings = self.load_timings
        with torch.inference_mode():
            control_kwargs = {"encoder_hidden_states": text, "controlnet_cond": hint,
                              "return_dict": False}
            down, mid = self.controlnet(x, t, **control_kwargs)
            # the batch's bound does not follow the measured batch size (free memory varies
            # from worker to worker), so that every worker of a node finds the same package
            most = max(AUTO_BATCH_CAP, self.batch_size) * branches
            self.controlnet = compiled_module(
                "controlnet", self.controlnet, (x, t), control_kwargs, most, folder, timings)
            unet_kwargs = {"encoder_hidden_states": text,
                           "down_block_additional_residuals": tuple(down),
                           "mid_block_additional_residual": mid, "return_dict": False}
            self.unet = compiled_module(
                "unet", self.unet, (x, t), unet_kwargs, most, folder, timings)
            z = torch.randn(b, self.vae.config.latent_channels, side, side, device=dev,
                            dtype=self.dtype)
            self._decoder = compiled_module("vae_decoder", self.vae.decoder, (z,), {},
                                            DECODE_CHUNK, folder, timings)

    def _measure_batch_size(self) -> int:
        """Seeds per batch on this GPU (:func:`~.loading.measure_batch_size`), from the step's
        peak memory measured at 4 and 8 seeds and the decode's at DECODE_CHUNK."""
        res, dev = self.resolution, self.device
        side = res // self.scale
        branches = 1 if self.one_pass else 2
        if self.one_pass:
            text = self.cond
        else:
            assert self.uncond is not None  # two passes only with an unconditional branch
            text = torch.cat([self.uncond, self.cond])

        def latents(n: int) -> torch.Tensor:
            return torch.randn(n, self.latent_channels, side, side, device=dev, dtype=self.dtype)

        def step(b: int) -> None:
            hint = torch.rand(b * branches, 6, res, res, device=dev, dtype=self.dtype)
            self._eps(latents(b * branches), torch.tensor(500, device=dev), hint,
                      text.repeat_interleave(b, 0))

        configs = {name: {k: v for k, v in dict(m.config).items() if not k.startswith("_")}
                   for name, m in (("unet", self.unet), ("controlnet", self.controlnet),
                                   ("vae", self.vae))}
        cache = probe_cache_path(self.options.cache_dir, "diffusion", dev, {
            "configs": configs, "resolution": res, "dtype": str(self.dtype),
            "branches": branches, "attention": self.options.attention})
        return measure_batch_size(step, lambda: self._decode(latents(DECODE_CHUNK)), dev,
                                  cache=cache)

    def _hint(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Input ++ tone-mapped reference, 6 x res x res in [0, 1]: once per pair."""
        res = self.resolution
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
        side = self.resolution // self.scale
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

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode in chunks of DECODE_CHUNK (padded to it when compiled: one shape)."""
        vae = self.vae
        parts = []
        for chunk in latents.split(DECODE_CHUNK):
            n = len(chunk)
            if (self.static_shapes and n < DECODE_CHUNK) or (self.aot and n == 1):
                size = DECODE_CHUNK if self.static_shapes else 2
                chunk = torch.cat([chunk, chunk[-1:].expand(size - n, -1, -1, -1)])
            z = chunk / vae.config.scaling_factor
            if vae.post_quant_conv is not None:  # as AutoencoderKL.decode does
                z = vae.post_quant_conv(z)
            parts.append(self._decoder(z)[:n])
        return torch.cat(parts)

    @torch.inference_mode()
    def relight(self, image, reference, seeds, normals=None):
        h, w = image.shape[1:]
        seeds = [int(s) for s in seeds]
        # filled in place, a few seeds at a time: at the input's size the outputs are the
        # largest tensors here, so no second copy of them is ever made
        result = torch.empty(len(seeds), 3, h, w, device=self.device)
        if not seeds:
            return result
        hint = self._hint(image.to(self.device), reference.to(self.device)).to(self.dtype)
        for start in range(0, len(seeds), self.batch_size):  # at most batch_size per batch
            chunk = seeds[start:start + self.batch_size]
            pad = 0
            if self.static_shapes:  # few compiled shapes: pad to a multiple of 8 seeds
                pad = min(-(-len(chunk) // 8) * 8, self.batch_size) - len(chunk)
            elif self.aot and len(chunk) == 1:  # the packages take 2 seeds or more
                pad = 1
            out = self._denoise(hint, chunk + [chunk[-1]] * pad)[:len(chunk)]
            for i in range(0, len(chunk), DECODE_CHUNK):
                part = result[start + i:start + min(i + DECODE_CHUNK, len(chunk))]
                part.copy_(F.interpolate(out[i:i + len(part)], (h, w), mode="bicubic",
                                         antialias=True)).clamp_(0, 1)
        return result

    def _denoise(self, hint: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """The seeds' samples for one hint, ``len(seeds) x 3 x res x res`` in [0, 1]."""
        o = self.options
        b = len(seeds)
        hints = hint[None].expand(b, -1, -1, -1)
        latents = self._noise(seeds)
        self.scheduler.set_timesteps(o.ddim_steps, device=self.device)
        one = self.one_pass
        cond = self.cond.expand(b, -1, -1)
        if self.aot:  # compiled packages read their inputs as laid out when exported
            hints, cond = hints.contiguous(), cond.contiguous()
        if not one:
            assert self.uncond is not None  # two passes only with an unconditional branch
            both_text = torch.cat([self.uncond.expand(b, -1, -1), cond])
            both_hint = torch.cat([hints, hints])
        # eta > 0 adds noise at each step: from each seed's own generator, so it stays per seed
        gens = ([torch.Generator().manual_seed(int(s) + 1) for s in seeds]
                if o.eta > 0 else None)
        for t in self.scheduler.timesteps:
            self.raise_if_stopped()  # a stop waits for one step, not for the whole batch
            x = self.scheduler.scale_model_input(latents, t)
            if one:
                pred = self._eps(x, t, hints, cond)
            else:
                uncond_pred, cond_pred = self._eps(torch.cat([x, x]), t, both_hint,
                                                   both_text).chunk(2)
                pred = uncond_pred + o.guidance_scale * (cond_pred - uncond_pred)
            latents = self.scheduler.step(pred, t, latents, eta=o.eta,
                                          generator=gens).prev_sample
        return ((self._decode(latents).float() + 1) / 2).clamp(0, 1)

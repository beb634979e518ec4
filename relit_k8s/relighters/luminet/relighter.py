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

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ...errors import RelighterError
from ...storage import file_size
from ..base import Relighter, RelighterOptions
from .config import TIMESTEPS, LumiNetConfig, ddim_timesteps, read_config

NO_CHECKPOINT = ("luminet needs the official checkpoint: -O checkpoint=PATH/LumiNet.ckpt or "
                 "s3://bucket/LumiNet.ckpt (Hugging Face xyxingx/LumiNet, gated: accept its "
                 "conditions, then download it)")
#: The original's classifier-free guidance scale.
GUIDANCE_SCALE = 9.0
#: What a missing new decoder's error adds.
NEW_DECODER_HINT = (" (--new-decoder looks beside the checkpoint, where the official download "
                    "puts new_decoder.ckpt; give another with -O new_decoder=PATH)")


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


def check_resolution(resolution: int, cfg: LumiNetConfig) -> None:
    if resolution != cfg.image_size:
        raise RelighterError(f"luminet: resolution={resolution}, but this model runs at "
                             f"{cfg.image_size} x {cfg.image_size} only (its light code is "
                             f"broadcast to a fixed {cfg.prior.hint_spatial} x "
                             f"{cfg.prior.hint_spatial} latent)")


class LuminetRelighter(Relighter):
    """LumiNet (a ControlNet on Stable Diffusion 2.1 with lighting tokens); see the module
    docstring.

    What a plan needs (the options, :meth:`preflight`, :meth:`scores`, :meth:`fingerprint`)
    is here, without torch; the model's code is :class:`.engine.LoadedLuminet`, which
    constructing this class makes (as ``pathlib.Path()`` makes a ``PosixPath``). So a plan,
    a submit and the parent of a local run resolve luminet without importing torch."""

    #: outputs are the original's 8-bit values (``finish``)
    output_levels = 255
    name = "luminet"
    Options = LuminetOptions
    options: LuminetOptions
    batch_size = 8

    @classmethod
    def preflight(cls, options: RelighterOptions, here: bool) -> None:
        assert isinstance(options, LuminetOptions)
        if not options.checkpoint:
            raise RelighterError(NO_CHECKPOINT)
        if here:
            try:  # contexts, .safetensors checkpoints and the weights cache are safetensors
                import safetensors  # noqa: F401 - not its torch module, which imports torch
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
            check_resolution(options.resolution, cfg)

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

    def __new__(cls, *args: object, **kwargs: object) -> LuminetRelighter:
        if cls is LuminetRelighter:
            from .engine import LoadedLuminet

            cls = LoadedLuminet
        return super().__new__(cls)

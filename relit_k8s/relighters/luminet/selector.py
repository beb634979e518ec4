"""LumiNet's seed selection: how close a relit image's lighting is to its reference's.

LumiNet's README has users generate many seeds of a pair and keep those whose lighting is
closest to the reference, ranked by ``seed_selection.py``: the cosine similarity of the
Latent-Intrinsics light codes of the relit image and of the reference. This is that ranking,
exactly (the golden tests compare it with the original script's output within 1e-5):

* the selector is the Latent-Intrinsics encoder and its ``light_encoder``, the weights under
  ``control_model.prior_extracter.model_latents.`` of ``LumiNet.ckpt``, or the ``last.pth.tar``
  the original script downloads (``state_dict`` with ``module.`` prefixes);
* a picture is read as Pillow's ``convert("RGB")`` (an HDR reference is tone-mapped as
  LumiNet's loader does, then rounded to 8 bits), resized to 256 x 256 with Pillow's bilinear
  filter (which antialiases when it shrinks; OpenCV's or torch's would move the score by up to
  1e-3), scaled to [-1, 1], in float32 and evaluation mode;
* the score is the dot product of the two unit light codes (higher: closer lighting).

Unlike the original script it ranks most similar first, takes any number of images, and reads
``.hdr``/``.exr`` references (see the README's LumiNet section).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ... import images
from ...errors import ItemError, RelighterError
from .checkpoint import PRIOR, mismatch, read_state_dict
from .config import IntrinsicsConfig
from .intrinsics import UNUSED_PREFIXES, IntrinsicsEncoder

#: Pixels a side of what the selector sees (the original's ``Resize((256, 256))``).
SIDE = 256
#: Pictures per forward pass (the original runs them one by one: the same codes within 1e-6).
CHUNK = 16


def selector_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The selector's tensors (keys relative to ``model_latents``) from ``LumiNet.ckpt`` (or a
    ``.safetensors`` with its keys) or from ``last.pth.tar`` (``state_dict``, ``module.``
    prefixes, stripped as the original does: the text after the last ``module.``)."""
    if Path(path).suffix == ".safetensors":  # only the selector's tensors are read
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            names = [k for k in f.keys() if k.startswith(PRIOR)]  # noqa: SIM118
            if names:
                return {k[len(PRIOR):]: f.get_tensor(k) for k in names
                        if not k[len(PRIOR):].startswith(UNUSED_PREFIXES)}
    state = read_state_dict(path, "selector weights")
    if any(k.startswith(PRIOR) for k in state):
        state = {k[len(PRIOR):]: v for k, v in state.items() if k.startswith(PRIOR)}
    else:
        state = {k.split("module.")[-1]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}


def prior_config(config: str | Path | None) -> IntrinsicsConfig:
    """The Latent-Intrinsics sizes of a LumiNet YAML (as the relighter's ``config`` option
    reads it); the full-size model's without one."""
    from .config import read_config

    return IntrinsicsConfig() if config is None else read_config(config).prior


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to 8 bits as LumiNet's tone-mapped references are saved: float32
    multiply, round half to even, clip."""
    scaled = np.asarray(pixels, np.float32) * np.float32(255.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def picture(data: bytes, name: str) -> np.ndarray:
    """A file's bytes as the ``H x W x 3`` uint8 picture the original script would read:
    Pillow's ``convert("RGB")``; an HDR file (which the original cannot open) tone-mapped as
    LumiNet's loader does (95th percentile, clip, 1/2.2) and rounded to 8 bits."""
    if images.is_hdr_name(name):
        return to_8bit(images.tonemap_hdr(images.decode(data, name).pixels))
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ItemError(f"cannot read it as an image ({type(e).__name__}: {e})",
                        key=name) from None


def resized(picture: np.ndarray) -> np.ndarray:
    """The 256 x 256 uint8 picture the selector sees: Pillow's bilinear resize (antialiased
    when shrinking, aspect ratio not kept), as torchvision's ``Resize`` does on a PIL image."""
    return np.asarray(Image.fromarray(picture).resize((SIDE, SIDE), Image.Resampling.BILINEAR))


class Selector:
    """The seed selector on a device, in float32 (scores must not depend on the relighter's
    serving dtype, nor on TF32: a re-score of a written file gives the same number)."""

    def __init__(self, encoder: IntrinsicsEncoder, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.encoder = encoder.float().to(self.device).eval().requires_grad_(False)

    @classmethod
    def load(cls, weights: str | Path, config: str | Path | IntrinsicsConfig | None = None,
             device: str | torch.device = "cpu") -> Selector:
        """From ``LumiNet.ckpt`` or ``last.pth.tar`` (:func:`selector_state`), strictly: a
        missing, unknown or misshapen key names the first few and asks for ``config``."""
        cfg = config if isinstance(config, IntrinsicsConfig) else prior_config(config)
        with torch.device("meta"):
            encoder = IntrinsicsEncoder(cfg)
        state = selector_state(weights)
        problem = mismatch(encoder.state_dict(), state)
        if problem:
            raise RelighterError(
                f"luminet: the selector weights in {weights} do not fit the selector "
                f"({problem}); is --config the YAML of the model they come from?")
        encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True,
                                assign=True)
        return cls(encoder, device)

    @torch.inference_mode()
    def codes(self, pictures: Sequence[np.ndarray]) -> torch.Tensor:
        """``N x 16`` unit light codes of ``H x W x 3`` uint8 pictures (float32, on the CPU)."""
        out = []
        for start in range(0, len(pictures), CHUNK):
            batch = np.stack([resized(p) for p in pictures[start:start + CHUNK]])
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                _, code = self.encoder(x * 2 - 1)
            out.append(F.normalize(code.float(), p=2, dim=1).cpu())
        return torch.cat(out) if out else torch.empty(0, 16)

    def similarities(self, pictures: Sequence[np.ndarray], reference: torch.Tensor
                     ) -> list[float]:
        """The cosine similarity of each picture's light code to ``reference`` (a code from
        :meth:`codes`), as Python floats of the float32 result."""
        if not pictures:
            return []
        return [float(s) for s in (self.codes(pictures) @ reference.reshape(-1, 1)).flatten()]

    def score(self, data: bytes, name: str, reference: torch.Tensor) -> float:
        """The similarity of a written file (its bytes) to ``reference``."""
        return self.similarities([picture(data, name)], reference)[0]

    def reference_code(self, pixels: np.ndarray) -> torch.Tensor:
        """The light code of a reference as the relighter was handed it (``H x W x 3`` values
        in [0, 1]: an 8-bit file's values / 255, an HDR one tone-mapped), rounded to 8 bits
        as the original script reads it."""
        return self.codes([to_8bit(pixels)])[0]


__all__ = ["SIDE", "Selector", "picture", "prior_config", "resized", "selector_state", "to_8bit"]

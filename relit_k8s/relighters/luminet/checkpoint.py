"""Reading LumiNet's official checkpoint files as they are, strictly.

``LumiNet.ckpt`` is a torch pickle of ``{"state_dict": ...}`` with the original key names (a
``.safetensors`` file with the same keys also works). Every key is accounted for: loaded into
the model, or known and set aside (the schedule buffers, which are recomputed; the
Latent-Intrinsics decoder, which inference never runs; the text encoder, used only to compute
the empty-prompt context; the second name of the aliased hint block). A key missing, unknown
or of another shape is a configuration error that names the first few.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import RelighterError
from .intrinsics import UNUSED_PREFIXES
from .model import LumiNet, alphas_cumprod

#: The second name the original gives the ControlNet's hint block (same tensors).
HINT_ALIAS = "control_model.input_latent_hint_cat_atten_block."
HINT = "control_model.input_hint_block."
#: Buffers of the original's diffusion schedule: recomputed here, so only checked.
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
            "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
            "logvar")
TEXT_ENCODER = "cond_stage_model."
PRIOR = "control_model.prior_extracter.model_latents."


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise RelighterError(f"luminet: reading {path} needs safetensors: pip install "
                             "'relit-k8s[luminet]'") from None
    return load_file(str(path))


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a ``.ckpt``/``.pt`` (``state_dict`` inside, or the dict itself) or a
    ``.safetensors`` file; a corrupt or truncated file is a :class:`RelighterError`."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(path)
        try:  # mapped, not read into memory: the official checkpoint is 8 GB
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except FileNotFoundError:
        raise RelighterError(f"luminet: no {what} at {path}") from None
    except RelighterError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the readers raise
        raise RelighterError(f"luminet: {what} {path} cannot be read (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise RelighterError(f"luminet: {what} {path} holds no state dict of tensors")
    return data


def mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading strictly into a module whose state dict is
    ``expected`` (the first three keys missing, unexpected and of another shape), or None."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & state.keys()
                    if state[k].shape != expected[k].shape)
    if not (missing or unexpected or shapes):
        return None
    return (f"missing {missing[:3]}, unexpected {unexpected[:3]}, of another shape "
            f"{shapes[:3]}")


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def split_state_dict(state: dict[str, torch.Tensor], model: LumiNet
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(what loads into ``model``, the text encoder's tensors); raises on any key that is
    missing, unknown or of the wrong shape."""
    state = dict(state)
    if HINT_ALIAS + "0.weight" in state or HINT + "0.weight" in state:
        for key in [k for k in state if k.startswith(HINT_ALIAS)]:
            alias = state.pop(key)
            state.setdefault(HINT + key[len(HINT_ALIAS):], alias)
    text = {k: state.pop(k) for k in [k for k in state if k.startswith(TEXT_ENCODER)]}
    for key in SCHEDULE:
        value = state.pop(key, None)
        if value is not None and tuple(value.shape) != (1000,):
            raise RelighterError(f"luminet: checkpoint key {key} has shape "
                                 f"{tuple(value.shape)}, expected (1000,)")
    for key in [k for k in state if k.startswith(PRIOR)
                and k[len(PRIOR):].startswith(UNUSED_PREFIXES)]:
        del state[key]
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "alphas_cumprod"}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
              for k in expected.keys() & state.keys() if state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} of another shape: {_first(shapes, 3)}")
    if problems:
        raise RelighterError("luminet: the checkpoint does not fit the model's configuration ("
                             + "; ".join(problems) + "); is -O config the checkpoint's YAML?")
    return state, text


def load(model: LumiNet, path: str | Path, assign: bool = False) -> dict[str, torch.Tensor]:
    """Load the checkpoint at ``path`` into ``model`` (``assign``: take the tensors as they
    are, for a model built on the meta device); returns the text encoder's tensors."""
    state, text = split_state_dict(read_state_dict(path), model)
    model.load_state_dict({**state, "alphas_cumprod": alphas_cumprod()}, strict=True,
                          assign=assign)
    return text

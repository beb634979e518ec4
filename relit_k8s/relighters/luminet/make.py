"""A random-weight LumiNet in the official files' format (``relit-k8s make-model --kind
luminet``), for tests and benchmarks: nothing is downloaded, outputs are noise-like images.

The folder holds ``LumiNet.ckpt`` (a torch pickle of ``{"state_dict": ...}`` with the original
key names, as the official file) and ``config.yaml`` (the configuration in the original YAML's
form). ``full`` has the official sizes (about 1.3 billion parameters without the text encoder)
and a random OpenCLIP ViT-H-14 text tower under ``cond_stage_model.``, from which the relighter
computes its empty-prompt context as it does from the official file; ``tiny`` has the golden
fixture's sizes (128 x 128 pixels) and, its context width being too small for a text tower, a
``context.safetensors`` to pass with ``-O context=``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from .config import TINY, LumiNetConfig
from .model import LumiNet
from .text import PREFIX

SIZES = ("tiny", "full")
#: OpenCLIP ViT-H-14's text tower: vocabulary, tokens, width, layers.
TEXT_TOWER = (49408, 77, 1024, 24)


def random_text_tower(vocab: int, length: int, width: int, layers: int,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The ``cond_stage_model.model.*`` tensors the empty-prompt context is computed from,
    random (normal, std 0.02; layer norms at one and zero)."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    t = {"token_embedding.weight": rand(vocab, width),
         "positional_embedding": rand(length, width),
         "ln_final.weight": torch.ones(width), "ln_final.bias": torch.zeros(width)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        t |= {p + "ln_1.weight": torch.ones(width), p + "ln_1.bias": torch.zeros(width),
              p + "attn.in_proj_weight": rand(3 * width, width),
              p + "attn.in_proj_bias": torch.zeros(3 * width),
              p + "attn.out_proj.weight": rand(width, width),
              p + "attn.out_proj.bias": torch.zeros(width),
              p + "ln_2.weight": torch.ones(width), p + "ln_2.bias": torch.zeros(width),
              p + "mlp.c_fc.weight": rand(4 * width, width),
              p + "mlp.c_fc.bias": torch.zeros(4 * width),
              p + "mlp.c_proj.weight": rand(width, 4 * width),
              p + "mlp.c_proj.bias": torch.zeros(width)}
    return {PREFIX + k: v for k, v in t.items()}


def make_luminet(path: str | Path, size: Literal["tiny", "full"] = "tiny", seed: int = 0,
                 device: str = "cpu") -> Path:
    """Write the folder (see the module docstring); returns its path. ``device``: where the
    weights are initialised (``cuda`` is much faster for ``full``)."""
    import yaml

    cfg = TINY if size == "tiny" else LumiNetConfig()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LumiNet(cfg)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()
             if k != "alphas_cumprod"}  # recomputed by the relighter, as from the original
    del model
    generator = torch.Generator().manual_seed(seed)
    if size == "full":
        state |= random_text_tower(*TEXT_TOWER, generator=generator)
    else:
        try:
            from safetensors.torch import save_file
        except ImportError:
            from ...errors import RelighterError

            raise RelighterError("make-model --kind luminet --size tiny writes its context "
                                 "with safetensors: pip install 'relit-k8s[luminet]'") from None

        context = torch.randn(1, 77, cfg.unet.context_dim, generator=generator)
        save_file({"context": context}, str(path / "context.safetensors"))
    tmp = path / "LumiNet.ckpt.partial"
    torch.save({"state_dict": state}, tmp)
    tmp.replace(path / "LumiNet.ckpt")  # never a half-written checkpoint under its name
    (path / "config.yaml").write_text(
        "# A random-weight LumiNet written by relit-k8s make-model (not the official model).\n"
        + yaml.safe_dump(cfg.to_yaml(), sort_keys=False))
    return path


def run_options(path: str | Path) -> dict[str, str]:
    """The ``-O`` options that run the folder written by :func:`make_luminet`."""
    import yaml

    path = Path(path)
    options = {"checkpoint": str(path / "LumiNet.ckpt"), "config": str(path / "config.yaml")}
    if (path / "context.safetensors").exists():
        options["context"] = str(path / "context.safetensors")
    side = LumiNetConfig.from_yaml(yaml.safe_load((path / "config.yaml").read_text())).image_size
    if side != 512:  # the relighter's default resolution is the official model's
        options["resolution"] = str(side)
    return options

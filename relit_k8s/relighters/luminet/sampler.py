"""LumiNet's sampler: DDIM over the latent-diffusion schedule, v-prediction, as the original's
``ddim_hacked`` ("uniform" steps 1, 1 + 1000 // S, ..., visited from the last; the final
step's previous alpha is ``alphas_cumprod[0]``, not 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import ddim_timesteps

#: ``denoise(x, t) -> v``: one (guided) model evaluation.
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_sample(denoise: Denoise, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                eta: float = 0.0, noise: Sequence[torch.Generator] | None = None,
                on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                before_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Run DDIM from ``x`` (x_T); ``noise`` gives one generator per sample for ``eta > 0``;
    ``on_step(t, x_prev, pred_x0)`` sees each step, ``before_step()`` runs before each (a
    stop check)."""
    ts = ddim_timesteps(steps)
    ac = alphas_cumprod.float().cpu()
    alphas = ac[ts]
    prev = torch.cat([ac[:1], ac[ts[:-1]]])
    sigmas = eta * ((1 - prev) / (1 - alphas) * (1 - alphas / prev)).sqrt()
    for index in reversed(range(len(ts))):
        if before_step is not None:
            before_step()
        t = torch.full((x.shape[0],), ts[index], device=x.device, dtype=torch.long)
        v = denoise(x, t)
        a_t, a_prev, sigma = (float(alphas[index]), float(prev[index]), float(sigmas[index]))
        sqrt_at = torch.tensor(a_t).sqrt().item()
        sqrt_1m = torch.tensor(1.0 - a_t).sqrt().item()
        e_t = sqrt_at * v + sqrt_1m * x
        pred_x0 = sqrt_at * x - sqrt_1m * v
        dir_xt = torch.tensor(1.0 - a_prev - sigma ** 2).sqrt().item() * e_t
        x = torch.tensor(a_prev).sqrt().item() * pred_x0 + dir_xt
        if sigma > 0:
            assert noise is not None, "eta > 0 needs a generator per sample"
            z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in noise]).to(x)
            x = x + sigma * z
        if on_step is not None:
            on_step(ts[index], x, pred_x0)
    return x

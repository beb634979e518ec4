"""The ``luminet`` half of relighter_throughput.py: LumiNet's original loop style against the
``luminet`` relighter, on the same random-weight model (``make-model --kind luminet``).

* seed loop style (the original scripts' way, driven by the seed's launcher): the model loaded
  once per process (timed on its own), then fp32, one sample at a time, and at every DDIM step
  two denoiser passes
  (the conditional and the unconditional branch of guidance, identical inputs here as in
  LumiNet, whose prompt is empty for both), each recomputing the lighting prior from the hint;
* relit-k8s: the ``luminet`` relighter (bf16 on a GPU, all seeds of a pair in one batch, one
  pass per step, the lighting prior once per pair), loaded once.

FLOPs are counted, not estimated: ``torch.utils.flop_counter`` over one denoiser pass and one
decode of this very model, so the model FLOP utilisation needs no published figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import torch
from common import profile_step, relight_timings, run_fields, sync


def _create(folder: str, device, **options):
    from relit_k8s.relighters import create
    from relit_k8s.relighters.luminet.make import run_options

    return create("luminet", {**run_options(folder), **options}, device)


def inputs(res: int):
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, res, res, generator=g), torch.rand(3, res // 2, res, generator=g) * 4


def seed_loop(folder: str, steps: int, pairs: int, iterations: int, device) -> dict:
    """The original loop style (see the module docstring): :func:`common.seed_loop`'s
    fields."""
    from relit_k8s.relighters.luminet.sampler import ddim_sample

    image, ref = inputs(256)

    def sample(r, seed: int) -> None:
        """One sample as the original makes it: two passes per step, the prior in each."""
        with torch.inference_mode():
            hint = r.hint(image, ref).to(r.device)
            context = r.context.to(r.device)
            scale = r.options.guidance_scale
            side = r.cfg.prior.hint_spatial
            x = torch.randn(1, r.cfg.unet.in_channels, side, side,
                            generator=torch.Generator().manual_seed(seed)).to(r.device)

            def guided(x, t):
                cond = r.model.apply_model(x, t, hint, context)
                uncond = r.model.apply_model(x, t, hint, context)
                return uncond + scale * (cond - uncond)

            latents = ddim_sample(guided, x, r.alphas_cumprod, steps)
            r.model.first_stage_model.decode(latents / r.cfg.scale_factor)

    return common.seed_loop(
        lambda: _create(folder, device, dtype="fp32", ddim_steps=steps, batch_size=1),
        sample, pairs, iterations, device)


def ours(folder: str, steps: int, batch: int | None, batches: int, device,
         extra: dict | None = None) -> dict:
    """The luminet relighter: load and first-batch seconds (with ``compile=true``, the
    compile's too), steady samples/s; ``batch`` None: the relighter's own (measured) choice."""
    image, ref = inputs(256)
    start = time.perf_counter()
    options = {"ddim_steps": steps, **({"batch_size": batch} if batch else {}), **(extra or {})}
    r = _create(folder, device, **options)
    sync(device)
    loaded = time.perf_counter() - start
    first, rate, batch_seconds = relight_timings(r, image, ref, r.batch_size, batches, device,
                                                 start)
    return {"batch": r.batch_size, "load_seconds": loaded, "load_phases": r.load_timings,
            "first": first, "rate": rate, "batch_seconds": batch_seconds,
            "dtype": str(r.dtype).removeprefix("torch.")}


def _step_inputs(r, b: int) -> tuple:
    """(latents, timesteps, prepared) of one denoising step of ``b`` seeds, on a random hint."""
    cfg = r.cfg
    side, res = cfg.prior.hint_spatial, cfg.image_size
    hint = torch.rand(1, 6, res, res, device=r.device, dtype=r.dtype)
    feature_map, context = r.model.lighting(hint, r.context.to(r.device, r.dtype))
    x = torch.randn(b, cfg.unet.in_channels, side, side, device=r.device, dtype=r.dtype)
    return (x, torch.full((b,), 500, device=r.device),
            (feature_map.expand(b, -1, -1, -1), context.expand(b, -1, -1)))


def step_profile(folder: str, device, batch: int = 32) -> dict:
    """:func:`common.profile_step` of one eager denoising step at ``batch`` seeds."""
    r = _create(folder, device, batch_size=batch)
    with torch.inference_mode():
        x, t, prepared = _step_inputs(r, batch)
        return {"batch": batch, **profile_step(
            lambda: r.model.apply_model(x, t, None, None, prepared=prepared), device)}


def batch_sweep(folder: str, device, sizes=(8, 16, 24, 32, 48), reps: int = 3) -> dict:
    """Samples/s of one denoising step (UNet + ControlNet, eager) per batch size: the
    measurement behind the automatic batch size's cap."""
    r = _create(folder, device, batch_size=8)
    found = {}
    with torch.inference_mode():
        for b in sizes:
            x, t, prepared = _step_inputs(r, b)
            r.model.apply_model(x, t, None, None, prepared=prepared)  # warm
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                r.model.apply_model(x, t, None, None, prepared=prepared)
            sync(device)
            found[b] = round(b * reps / (time.perf_counter() - start), 2)
    return found


def tflop_per_sample(folder: str, steps: int, device) -> float:
    """TFLOP of one sample: ``steps`` denoiser passes (one per step, as relit-k8s runs them)
    and one decode, counted by torch's FLOP counter on this model."""
    from torch.utils.flop_counter import FlopCounterMode

    r = _create(folder, device, batch_size=1)
    image, ref = inputs(256)
    with torch.inference_mode():
        hint = r.hint(image, ref).to(r.device, r.dtype)
        prepared = r.model.lighting(hint, r.context.to(r.device, r.dtype))
        side = r.cfg.prior.hint_spatial
        x = torch.randn(1, r.cfg.unet.in_channels, side, side).to(r.device, r.dtype)
        t = torch.tensor([500], device=r.device)
        with FlopCounterMode(display=False) as step:
            r.model.apply_model(x, t, None, None, prepared=prepared)
        with FlopCounterMode(display=False) as decode:
            r.model.first_stage_model.decode(x / r.cfg.scale_factor)
    return (steps * step.get_total_flops() + decode.get_total_flops()) / 1e12


def tiny_settings(args) -> None:
    """``--tiny``: a CPU smoke test of a few seconds a sample."""
    args.steps, args.batch, args.batches = 2, 2, 1


def run(args, device, peak: float | None) -> dict:
    """The luminet measurements, as relighter_throughput.py reports them."""
    import tempfile

    from relit_k8s.relighters.luminet.make import make_luminet

    with tempfile.TemporaryDirectory() as tmp:
        folder, made = args.model, None
        if folder is None:
            t = time.perf_counter()
            folder = str(make_luminet(Path(tmp) / "luminet", "tiny" if args.tiny else "full",
                                      device=str(device)))
            made = round(time.perf_counter() - t, 1)
        seed = None if args.skip_seed_loop else seed_loop(
            folder, args.steps, args.seed_pairs, args.seed_iterations, device)
        sweep = batch_sweep(folder, device) if args.sweep else None
        if sweep:
            print("denoising-step samples/s by batch size (eager):", sweep, flush=True)
        profiled = step_profile(folder, device) if args.profile else None
        if profiled:
            print("one denoising step, profiled:", json.dumps(profiled, indent=1), flush=True)
        extra = dict(o.split("=", 1) for o in args.option)
        m = None if args.skip_eager else ours(folder, args.steps, args.batch, args.batches,
                                              device, extra)
        if m:
            print(f"luminet: {m['rate']:.3f} samples/s at batch {m['batch']}", flush=True)
        compiled = ours(folder, args.steps, args.batch, args.batches, device,
                        {**extra, "compile": "true"}) if args.compile else None
        if compiled:
            print(f"luminet compiled: {compiled['rate']:.3f} samples/s at batch "
                  f"{compiled['batch']}, first batch after {compiled['first']:.1f} s",
                  flush=True)
        tflop = tflop_per_sample(folder, args.steps, device)
    result = {
        "relighter": "luminet",
        "model": "random, " + ("tiny (the golden fixture's sizes)" if args.tiny
                               else "full (the official checkpoint's sizes)"),
        "model_made_seconds": made,
        **(seed or {"seed_loop_samples_per_s": None}),
        "run_samples": args.run_samples,
        "step_samples_per_s_by_batch": sweep,
        "step_profile": profiled,
        "tflop_per_sample": round(tflop, 4),
        "bf16_matmul_peak_tflops": round(peak, 1) if peak else None,
    }
    for name, found in (("relit", m), ("compiled", compiled)):
        if not found:
            continue
        result |= (run_fields(name, found, seed, args.run_samples)
                   | {f"{name}_dtype": found["dtype"]})
        if peak and not args.tiny:
            result[f"{name}_model_flop_utilisation"] = round(found["rate"] * tflop / peak, 3)
    return result

"""relighter_throughput: the seed's loop style against relit-k8s's ``diffusion`` relighter.

Both run the same random-weight model, side by side in one process on one device:

* seed loop style, as the seed's launcher runs it: the model loaded once per process (timed
  and reported on its own, and counted: ``seed_loop_model_loads``), then pairs of K iterations,
  fp32, one sample at a time, two UNet + ControlNet passes per step (the conditional and
  unconditional branches, identical inputs);
* relit-k8s: the ``diffusion`` relighter (bf16 on a GPU, SDPA, one pass per step when the
  branches are identical, all seeds of a pair in one batch), loaded once.

It prints samples/s of each and two ratios: steady state (samples/s over samples/s) and a
whole run of ``--run-samples`` samples per worker, each side paying its one load; on a GPU
also the bf16 matmul peak measured in the same run and the model FLOP utilisation (from the
per-step and per-decode FLOPs of SD2.1 sizes), and the time from worker start to the first
finished sample with the weights on local disk.

    python benchmarks/relighter_throughput.py --tiny            # CPU smoke test (CI)
    python benchmarks/relighter_throughput.py --out benchmarks/results/h200.json   # on a GPU

``--relighter luminet`` measures the ``luminet`` relighter the same way, against LumiNet's
original loop style, on a random model of the official checkpoint's sizes (see
``luminet_loop.py``; ``--model`` is then a folder written by ``make-model --kind luminet``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from common import (
    add_seed_loop_flags,
    device_for,
    header,
    parser,
    print_ratios,
    profile_step,
    relight_timings,
    run_fields,
    sync,
)

from relit_k8s.relighters.loading import AUTO_BATCH_CAP

#: FLOPs of the seed's model (SD2.1 sizes, 512 x 512) per sample, counted for its layers: 1.09 TFLOP
#: per denoising step of UNet + ControlNet, 2.5 TFLOP per VAE decode.
STEP_TFLOP, DECODE_TFLOP = 1.09, 2.5


def matmul_peak_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def inputs(res: int, device):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, res, res, generator=g).to(device)
    ref = (torch.rand(3, res // 2, res, generator=g) * 4).to(device)
    return image, ref


def seed_loop(model: str, res: int, steps: int, pairs: int, iterations: int, device) -> dict:
    """The seed's loop style (see the module docstring): :func:`common.seed_loop`'s fields."""

    def load():
        from relit_k8s.relighters import create

        return create("diffusion", {"model": model, "dtype": "fp32", "ddim_steps": steps,
                                    "resolution": res, "batch_size": 1},  # no memory probe
                      device)

    image, ref = inputs(res, device)

    def sample(r, seed: int) -> None:
        with torch.inference_mode():
            hint = r._hint(image, ref)[None]
            latents = r._noise([seed]).float()
            r.scheduler.set_timesteps(steps, device=r.device)
            for t in r.scheduler.timesteps:
                x = r.scheduler.scale_model_input(latents, t)
                uncond = r._eps(x, t, hint, r.cond)  # two full passes on identical inputs
                cond = r._eps(x, t, hint, r.cond)
                pred = uncond + r.options.guidance_scale * (cond - uncond)
                latents = r.scheduler.step(pred, t, latents).prev_sample
            r.vae.decode(latents / r.vae.config.scaling_factor)

    return common.seed_loop(load, sample, pairs, iterations, device)


def ours(model: str, res: int, steps: int, batch: int | None, batches: int, device,
         compiled: bool = False, extra: dict | None = None) -> dict:
    """The diffusion relighter: its batch size, load and first-batch seconds, steady samples/s,
    decode seconds per sample, and (eager only: compiled code would compile new shapes) the
    largest difference between a batch and the same seeds one by one."""
    from relit_k8s.relighters import create

    image, ref = inputs(res, device)
    start = time.perf_counter()
    options = {"model": model, "ddim_steps": steps, "resolution": res, "compile": compiled,
               **(extra or {})}
    if batch:
        options["batch_size"] = batch
    r = create("diffusion", options, device)
    sync(device)
    loaded = time.perf_counter() - start
    b = r.batch_size
    first, rate, batch_seconds = relight_timings(r, image, ref, b, batches, device, start)
    side = res // r.scale
    latents = torch.randn(b, r.latent_channels, side, side, device=device, dtype=r.dtype)
    with torch.inference_mode():
        r._decode(latents)  # warm
        sync(device)
        start = time.perf_counter()
        r._decode(latents)
        sync(device)
    decode = (time.perf_counter() - start) / b
    diff = None
    if not compiled:
        together = r.relight(image, ref, [1, 2, 3])
        alone = torch.cat([r.relight(image, ref, [s]) for s in (1, 2, 3)])
        diff = (together - alone).abs().max().item()
    return {"batch": b, "load_seconds": loaded, "load_phases": r.load_timings,
            "first": first, "rate": rate, "batch_seconds": batch_seconds,
            "decode_seconds_per_sample": decode, "one_pass": r.one_pass, "diff": diff}


def batch_sweep(model: str, res: int, device, sizes=(8, 16, 32, 48, 64), reps: int = 3) -> dict:
    """Samples/s of one denoising step (UNet + ControlNet, bf16, eager) per batch size: the
    measurement behind the automatic batch size's cap."""
    from relit_k8s.relighters import create

    r = create("diffusion", {"model": model, "resolution": res, "batch_size": 8}, device)
    side = res // r.scale
    t = torch.tensor(500, device=device)
    found = {}

    def rate(x, hint, text) -> float:
        """Samples/s of one step on these inputs, after a warm-up step."""
        r._eps(x, t, hint, text)
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            r._eps(x, t, hint, text)
        sync(device)
        return round(len(x) * reps / (time.perf_counter() - start), 2)

    with torch.inference_mode():
        for b in sizes:
            x = torch.randn(b, r.latent_channels, side, side, device=device, dtype=r.dtype)
            hint = torch.rand(b, 6, res, res, device=device, dtype=r.dtype)
            text = r.cond.expand(b, -1, -1)
            found[b] = rate(x, hint, text)
            if b == 32:  # each attention kernel, at the automatic batch size's cap
                from relit_k8s.relighters.diffusion import use_backend

                use_backend("math")
                reference = r._eps(x, t, hint, text).float()
                for name in ("flash", "cudnn", "efficient"):
                    use_backend(name)
                    diff = (r._eps(x, t, hint, text).float() - reference).abs().max().item()
                    found[f"32_attention_{name}_max_abs_diff_vs_math"] = round(diff, 4)
                    found[f"32_attention_{name}"] = rate(x, hint, text)
                use_backend("auto")  # PyTorch's own choice again
    return found


def step_profile(model: str, res: int, device, batch: int = AUTO_BATCH_CAP) -> dict:
    """:func:`common.profile_step` of one eager denoising step (UNet + ControlNet) at ``batch``
    seeds."""
    from relit_k8s.relighters import create

    r = create("diffusion", {"model": model, "resolution": res, "batch_size": batch}, device)
    side = res // r.scale
    t = torch.tensor(500, device=device)
    x = torch.randn(batch, r.latent_channels, side, side, device=device, dtype=r.dtype)
    hint = torch.rand(batch, 6, res, res, device=device, dtype=r.dtype)
    text = r.cond.expand(batch, -1, -1)
    with torch.inference_mode():
        return {"batch": batch, **profile_step(lambda: r._eps(x, t, hint, text), device)}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, help="seeds per batch (relit-k8s) [default: the "
                    "relighter's automatic choice]")
    ap.add_argument("--batches", type=int, default=3)
    add_seed_loop_flags(ap)
    ap.add_argument("--compile", action="store_true",
                    help="also measure the relighter with torch.compile (first run compiles; "
                    "a second run with the same TORCHINDUCTOR_CACHE_DIR shows the warm start)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time one denoising step at batch sizes 8 to 64 (GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one denoising step at the automatic batch size's cap "
                    "(eager, GPU): the top operators and kernels, achieved TFLOP/s")
    ap.add_argument("--skip-seed-loop", action="store_true")
    ap.add_argument("--skip-eager", action="store_true", help="with --compile: only compiled")
    ap.add_argument("--relighter", choices=("diffusion", "luminet"), default="diffusion")
    args = ap.parse_args()
    device = device_for(args)
    if args.relighter == "luminet":
        from luminet_loop import run, tiny_settings

        if args.tiny:
            tiny_settings(args)
        result = {**header("relighter_throughput", args, device), **run(
            args, device, matmul_peak_tflops(device))}
        result["command"] = " ".join(["python", "benchmarks/relighter_throughput.py",
                                      *sys.argv[1:]])
        print(json.dumps(result, indent=1))
        print_ratios(result)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return
    if args.tiny:
        args.steps, args.batch, args.batches = 4, 4, 2
    res = 32 if args.tiny else 512
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        made = None
        if model is None:
            from relit_k8s.modelkit import make_model

            t = time.perf_counter()
            model = str(make_model(Path(tmp) / "model", "tiny" if args.tiny else "sd21",
                                   device=str(device)))
            made = round(time.perf_counter() - t, 1)
        peak = matmul_peak_tflops(device)
        sweep = batch_sweep(model, res, device) if args.sweep else None
        if sweep:
            print("denoising-step samples/s by batch size (eager bf16):", sweep, flush=True)
        profiled = step_profile(model, res, device) if args.profile else None
        if profiled:
            print("one denoising step, profiled:", json.dumps(profiled, indent=1), flush=True)
        seed = None if args.skip_seed_loop else seed_loop(
            model, res, args.steps, args.seed_pairs, args.seed_iterations, device)
        extra = dict(o.split("=", 1) for o in args.option)
        eager = None if args.skip_eager else ours(model, res, args.steps, args.batch,
                                                  args.batches, device, extra=extra)
        if eager:
            print(f"diffusion (eager): {eager['rate']:.3f} samples/s at batch "
                  f"{eager['batch']}", flush=True)
        compiled = ours(model, res, args.steps, args.batch, args.batches, device, True,
                        extra) if args.compile else None
    flops = args.steps * STEP_TFLOP + DECODE_TFLOP
    result = {
        **header("relighter_throughput", args, device),
        "model_made_seconds": made,
        "resolution": res,
        "bf16_matmul_peak_tflops": round(peak, 1) if peak else None,
        "step_samples_per_s_by_batch": sweep,
        "step_profile": profiled,
        **(seed or {"seed_loop_samples_per_s": None}),
        "run_samples": args.run_samples,
    }
    for name, m in (("relit", eager), ("compiled", compiled)):
        if not m:
            continue
        result.update(run_fields(name, m, seed, args.run_samples))
        result.update({
            f"{name}_one_pass": m["one_pass"],
            f"{name}_decode_seconds_per_sample": round(m["decode_seconds_per_sample"], 4),
            f"{name}_batch_vs_one_by_one_max_abs_diff":
                round(m["diff"], 5) if m["diff"] is not None else None,
        })
        if peak and not args.tiny:
            result[f"{name}_model_flop_utilisation"] = round(m["rate"] * flops / peak, 3)
    result["relit_dtype"] = "bf16" if device.type == "cuda" else "fp32"
    result["command"] = " ".join(["python", "benchmarks/relighter_throughput.py", *sys.argv[1:]])
    print(json.dumps(result, indent=1))
    print_ratios(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

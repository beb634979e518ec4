"""relighter_throughput: the seed's loop style against relit-k8s's ``diffusion`` relighter.

Both run the same random-weight model, side by side in one process on one device:

* seed loop style: fp32, one sample at a time, two UNet + ControlNet passes per step (the
  conditional and unconditional branches, identical inputs), the model re-loaded from disk for
  every pair;
* relit-k8s: the ``diffusion`` relighter (bf16 on a GPU, SDPA, one pass per step when the
  branches are identical, all seeds of a pair in one batch), loaded once.

It prints samples/s of each and their ratio; on a GPU also the bf16 matmul peak measured in the
same run and the model FLOP utilisation (from the per-step and per-decode FLOPs of SD2.1 sizes),
and the time from worker start to the first finished sample with the weights on local disk.

    python benchmarks/relighter_throughput.py --tiny            # CPU smoke test (CI)
    python benchmarks/relighter_throughput.py --out benchmarks/results/h200.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

#: FLOPs of the seed's model (SD2.1 sizes, 512 x 512) per sample, from DESIGN.md: 1.09 TFLOP
#: per denoising step of UNet + ControlNet, 2.5 TFLOP per VAE decode.
STEP_TFLOP, DECODE_TFLOP = 1.09, 2.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def seed_loop(model: str, res: int, steps: int, samples: int, device) -> float:
    """Samples/s of the seed's loop style (see the module docstring)."""
    from relit_k8s.relighters import create

    image, ref = inputs(res, device)
    sync(device)
    start = time.perf_counter()
    for s in range(samples):
        r = create("diffusion", {"model": model, "dtype": "fp32", "ddim_steps": steps,
                                 "resolution": res}, device)  # re-loaded for every pair
        with torch.inference_mode():
            hint = r._hint(image, ref)[None]
            latents = r._noise([s]).float()
            r.scheduler.set_timesteps(steps, device=r.device)
            for t in r.scheduler.timesteps:
                x = r.scheduler.scale_model_input(latents, t)
                uncond = r._eps(x, t, hint, r.cond)  # two full passes on identical inputs
                cond = r._eps(x, t, hint, r.cond)
                pred = uncond + r.options.guidance_scale * (cond - uncond)
                latents = r.scheduler.step(pred, t, latents).prev_sample
            r.vae.decode(latents / r.vae.config.scaling_factor)
        sync(device)
    return samples / (time.perf_counter() - start)


def ours(model: str, res: int, steps: int, batch: int, batches: int, device,
         compiled: bool = False):
    """(samples/s steady, seconds from worker start to the first finished batch, ...)."""
    from relit_k8s.relighters import create

    image, ref = inputs(res, device)
    start = time.perf_counter()
    r = create("diffusion", {"model": model, "ddim_steps": steps, "resolution": res,
                             "compile": compiled}, device)
    r.relight(image, ref, list(range(batch)))
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for k in range(batches):
        r.relight(image, ref, list(range(batch * (k + 1), batch * (k + 2))))
    sync(device)
    rate = batch * batches / (time.perf_counter() - start)
    together = r.relight(image, ref, [1, 2, 3])
    alone = torch.cat([r.relight(image, ref, [s]) for s in (1, 2, 3)])
    return rate, first, r.one_pass, (together - alone).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    ap.add_argument("--model", help="model directory [default: a random one, made here]")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32, help="seeds per batch (relit-k8s)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--seed-samples", type=int, default=2, help="samples, seed loop style")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the relighter with torch.compile (first run compiles; "
                    "a second run with the same TORCHINDUCTOR_CACHE_DIR shows the warm start)")
    ap.add_argument("--skip-seed-loop", action="store_true")
    ap.add_argument("--skip-eager", action="store_true", help="with --compile: only compiled")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.steps, args.batch, args.batches, args.seed_samples = 4, 4, 2, 2
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
        seed_rate = None if args.skip_seed_loop else seed_loop(model, res, args.steps,
                                                                args.seed_samples, device)
        rate, first, one_pass, batch_diff = (None, None, None, None) if args.skip_eager else \
            ours(model, res, args.steps, args.batch, args.batches, device)
        compiled = ours(model, res, args.steps, args.batch, args.batches, device, True) \
            if args.compile else None
    result = {
        "benchmark": "relighter_throughput",
        "date": datetime.now(UTC).date().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "tiny (random)" if args.tiny else "SD2.1 sizes (random)",
        "model_made_seconds": made,
        "steps": args.steps,
        "resolution": res,
        "seed_loop_samples_per_s": round(seed_rate, 4) if seed_rate else None,
        "relit_samples_per_s": round(rate, 4) if rate else None,
        "speedup": round(rate / seed_rate, 2) if seed_rate and rate else None,
        "relit_batch": args.batch,
        "relit_one_pass": one_pass,
        "relit_dtype": "bf16" if device.type == "cuda" else "fp32",
        "batch_vs_one_by_one_max_abs_diff": round(batch_diff, 5) if rate else None,
        "first_sample_seconds_warm_node": round(first, 2) if rate else None,
        "bf16_matmul_peak_tflops": round(peak, 1) if peak else None,
    }
    flops = args.steps * STEP_TFLOP + DECODE_TFLOP
    if peak and rate and not args.tiny:
        result["model_flop_utilisation"] = round(rate * flops / peak, 3)
    if compiled:
        c_rate, c_first, _, c_diff = compiled
        result.update({
            "compiled_samples_per_s": round(c_rate, 4),
            "compiled_speedup": round(c_rate / seed_rate, 2) if seed_rate else None,
            "compiled_first_sample_seconds": round(c_first, 2),
            "compiled_batch_vs_one_by_one_max_abs_diff": round(c_diff, 5),
        })
        if peak and not args.tiny:
            result["compiled_model_flop_utilisation"] = round(c_rate * flops / peak, 3)
    result["command"] = "python benchmarks/relighter_throughput.py" + (
        " --tiny" if args.tiny else "")
    print(json.dumps(result, indent=1))
    if seed_rate and rate:
        print(f"seed loop {seed_rate:.3f} samples/s, relit-k8s {rate:.3f} samples/s: "
              f"{rate / seed_rate:.1f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What the diffusion benchmarks share: the device, the shared flags, the result's header."""

from __future__ import annotations

import argparse
import platform
import time
from datetime import UTC, datetime

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the flags every diffusion benchmark takes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    ap.add_argument("--model", help="model directory [default: a random one, made here]")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a diffusion relighter option for relit-k8s's runs (repeatable)")
    ap.add_argument("--out", help="write the result as JSON here")
    return ap


def device_for(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")


def header(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """The first fields of a result: what ran, when, where."""
    return {
        "benchmark": name,
        "date": datetime.now(UTC).date().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "tiny (random)" if args.tiny else "SD2.1 sizes (random)",
        "steps": args.steps,
    }


def run_fields(name: str, m: dict, seed_rate: float | None) -> dict:
    """The result fields every relighter measurement has, prefixed ``name_``: samples/s, the
    speed-up over the seed's loop, the batch, the load seconds and phases, the first sample."""
    return {
        f"{name}_samples_per_s": round(m["rate"], 4),
        f"{name}_speedup": round(m["rate"] / seed_rate, 2) if seed_rate else None,
        f"{name}_batch": m["batch"],
        f"{name}_load_seconds": round(m["load_seconds"], 2),
        f"{name}_load_phases": m["load_phases"],
        f"{name}_first_sample_seconds": round(m["first"], 2),
    }


def relight_timings(r, image, ref, batch: int, batches: int, device,
                    started: float) -> tuple[float, float]:
    """(seconds from ``started`` to the end of a first batch, then samples/s over ``batches``
    more batches of ``batch`` seeds each) of relighter ``r`` on one pair."""
    r.relight(image, ref, list(range(batch)))
    sync(device)
    first = time.perf_counter() - started
    start = time.perf_counter()
    for k in range(batches):
        r.relight(image, ref, list(range(batch * (k + 1), batch * (k + 2))))
    sync(device)
    return first, batch * batches / (time.perf_counter() - start)


def profile_step(step, device: torch.device, reps: int = 3, top: int = 15) -> dict:
    """Where one denoising step's time goes: ``step()`` run ``reps`` times under torch.profiler
    (after a warm-up); the ``top`` operators by their own time on the device (GPU time on a
    GPU, CPU time on the CPU), each with its share, and achieved TFLOP/s where torch counts its
    FLOPs (matmuls, convolutions); on a GPU also the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    own = "self_device_time_total" if gpu else "self_cpu_time_total"
    step()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])],
                 with_flops=True) as prof:
        for _ in range(reps):
            step()
        sync(device)
    events = [e for e in prof.key_averages() if getattr(e, own) > 0
              and not e.key.startswith(("cuda", "Memcpy", "Memset"))]
    ops = [e for e in events if e.key.startswith("aten::")]
    total = sum(getattr(e, own) for e in ops) or 1
    rows = [{"op": e.key, "share": round(getattr(e, own) / total, 3),
             "ms_per_step": round(getattr(e, own) / 1e3 / reps, 2)}
            for e in sorted(ops, key=lambda e: -getattr(e, own))[:top]]
    # FLOPs are counted on the operator called (aten::conv2d), its time is its children's
    inclusive = "device_time_total" if gpu else "cpu_time_total"
    flop_ops = [{"op": e.key, "tflop_per_step": round(e.flops / reps / 1e12, 3),
                 "ms_per_step": round(getattr(e, inclusive) / 1e3 / reps, 2),
                 "tflops": round(e.flops / (getattr(e, inclusive) / 1e6) / 1e12, 1)}
                for e in prof.key_averages() if e.flops and getattr(e, inclusive) > 0]
    kernels = sorted((e for e in events if gpu and not e.key.startswith("aten::")),
                     key=lambda e: -getattr(e, own))[:top]
    return {"clock": "gpu" if gpu else "cpu", "ms_per_step": round(total / 1e3 / reps, 2),
            "tflop_per_step": round(sum(e.flops for e in prof.key_averages()) / reps / 1e12, 3),
            "ops": rows, "flop_ops": flop_ops, "kernels": [{"kernel": e.key[:120],
                                      "share": round(getattr(e, own) / total, 3)}
                                     for e in kernels]}

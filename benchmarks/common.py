"""What the diffusion benchmarks share: the device, the shared flags, the result's header."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
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
    import provenance

    return {
        "benchmark": name,
        "date": datetime.now(UTC).date().isoformat(),
        "commit": provenance.commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "tiny (random)" if args.tiny else "SD2.1 sizes (random)",
        "steps": args.steps,
    }


def add_seed_loop_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seed-pairs", type=int, default=2,
                    help="pairs the seed's loop relights (after its one model load)")
    ap.add_argument("--seed-iterations", type=int, default=2,
                    help="samples per pair in the seed's loop, one at a time")
    ap.add_argument("--run-samples", type=int, default=1000,
                    help="samples per worker of the whole run the whole-run ratio stands "
                    "for (each side pays its one load and first batch, then its steady rate) "
                    "[default: 1000, 20 pairs x the seed's 50 iterations]")


def seed_loop(load: Callable[[], object], sample: Callable[[object, int], None], pairs: int,
              iterations: int, device: torch.device) -> dict:
    """The seed's loop as its launcher runs it: one model load per (GPU) process, timed on its
    own, then ``pairs`` pairs of ``iterations`` samples, one sample per call of ``sample(model,
    seed)``. Returns the ``seed_loop_*`` result fields; ``seed_loop_model_loads`` counts the
    relighters created meanwhile (``relit_k8s.relighters.create`` calls), load and samples
    together: one, as in the seed, or the loop is not the seed's."""
    import relit_k8s.relighters as relighters

    real_create, loads = relighters.create, []

    def counted(*args, **kwargs):
        loads.append(args[0] if args else kwargs.get("name"))
        return real_create(*args, **kwargs)

    relighters.create = counted
    try:
        sync(device)
        start = time.perf_counter()
        model = load()
        sync(device)
        loaded = time.perf_counter() - start
        seconds = []
        for n in range(pairs * iterations):
            t = time.perf_counter()
            sample(model, n)
            sync(device)
            seconds.append(time.perf_counter() - t)
    finally:
        relighters.create = real_create
    print(f"seed loop style: {len(seconds) / sum(seconds):.4f} samples/s after {len(loads)} "
          f"model load(s) of {loaded:.2f} s", flush=True)
    return {
        "seed_loop_model_loads": len(loads),
        "seed_loop_load_seconds": round(loaded, 3),
        "seed_loop_pairs": pairs,
        "seed_loop_iterations": iterations,
        "seed_loop_samples_per_s": round(len(seconds) / sum(seconds), 4),
        "seed_loop_sample_seconds": {"min": round(min(seconds), 3),
                                     "median": round(statistics.median(seconds), 3),
                                     "max": round(max(seconds), 3)},
    }


def run_fields(name: str, m: dict, seed: dict | None, run_samples: int) -> dict:
    """The result fields every relighter measurement has, prefixed ``name_``: samples/s, the
    batch, the load seconds and phases, the first batch; beside the seed's loop (``seed``, its
    fields) the steady-state ratio (``_speedup``: samples/s over samples/s, each side's load
    left out) and the whole-run ratio (``_whole_run_speedup``: ``run_samples`` samples on one
    worker, each side paying its one load: the seed's load plus its samples at its steady rate,
    against the relighter's time to its first batch, load, compile and probe included, plus the
    rest at its steady rate)."""
    fields = {
        f"{name}_samples_per_s": round(m["rate"], 4),
        f"{name}_speedup": None,
        f"{name}_whole_run_speedup": None,
        f"{name}_batch": m["batch"],
        f"{name}_load_seconds": round(m["load_seconds"], 2),
        f"{name}_load_phases": m["load_phases"],
        f"{name}_first_sample_seconds": round(m["first"], 2),
        f"{name}_batch_seconds": m.get("batch_seconds"),
    }
    if seed:
        seed_rate = seed["seed_loop_samples_per_s"]
        seed_run = seed["seed_loop_load_seconds"] + run_samples / seed_rate
        our_run = m["first"] + max(0, run_samples - m["batch"]) / m["rate"]
        fields[f"{name}_speedup"] = round(m["rate"] / seed_rate, 2)
        fields[f"{name}_whole_run_speedup"] = round(seed_run / our_run, 2)
    return fields


def print_ratios(result: dict, names: tuple[str, ...] = ("relit", "compiled")) -> None:
    """One line per measured relighter: its steady-state and whole-run ratios to the seed."""
    seed = result.get("seed_loop_samples_per_s")
    for name in names:
        if seed and result.get(f"{name}_samples_per_s"):
            print(f"seed loop {seed:.4f} samples/s (1 load, {result['seed_loop_load_seconds']} "
                  f"s), relit-k8s {name} {result[f'{name}_samples_per_s']:.4f} samples/s: "
                  f"{result[f'{name}_speedup']}x steady, "
                  f"{result[f'{name}_whole_run_speedup']}x over a run of "
                  f"{result['run_samples']} samples per worker")


def relight_timings(r, image, ref, batch: int, batches: int, device,
                    started: float) -> tuple[float, float, list[float]]:
    """(seconds from ``started`` to the end of a first batch, samples/s over ``batches`` more
    batches of ``batch`` seeds each, and those batches' seconds) of relighter ``r`` on one
    pair."""
    r.relight(image, ref, list(range(batch)))
    sync(device)
    first = time.perf_counter() - started
    seconds = []
    for k in range(batches):
        t = time.perf_counter()
        r.relight(image, ref, list(range(batch * (k + 1), batch * (k + 2))))
        sync(device)
        seconds.append(round(time.perf_counter() - t, 4))
    return first, batch * batches / sum(seconds), seconds


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

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

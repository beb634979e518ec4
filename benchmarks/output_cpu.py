"""output_cpu: the CPU time one output costs a worker, outside the relighter.

Per output at 1024 x 1024 (a bundled photo, scaled): decode the input JPEG, encode the output
(JPEG as the worker writes it, 4:4:4 at quality 95; PNG at several zlib levels, the worker's
``RELIT_PNG_LEVEL``), and write it to a local folder, each with the worker's own functions. It
prints CPU seconds per output (process time: every thread) and the outputs per second one core
sustains for each output format, so that a pod's CPU request can be sized against its GPU's
rate. On a GPU with torchvision it also times JPEG encoding on the GPU (nvJPEG,
``torchvision.io.encode_jpeg`` on CUDA tensors, 8 at a time), to see whether it is worth
moving there.

    python benchmarks/output_cpu.py                        # here (CI runs --quick)
    python benchmarks/output_cpu.py --out benchmarks/results/output_cpu_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from relit_k8s import images
from relit_k8s.settings import usable_cpus
from relit_k8s.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
PNG_LEVELS = (0, 1, 3, 6)


def photo(side: int) -> np.ndarray:
    """A bundled photo scaled to ``side`` x ``side``, as float32 in [0, 1] (a relit output's
    content: JPEG and PNG costs depend on it)."""
    path = sorted((ROOT / "examples" / "images").glob("*.jpg"))[0]
    im = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def cpu_seconds(fn: Callable[[], object], reps: int) -> float:
    """Process CPU seconds (all threads) per call of ``fn``, after one warm-up call."""
    fn()
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps


def gpu_jpeg(pixels: np.ndarray, reps: int) -> dict | None:
    """nvJPEG through torchvision on CUDA, 8 images per call: wall and CPU seconds per output
    (None without CUDA or torchvision)."""
    try:
        import torch
        import torchvision.io
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    batch = [torch.from_numpy(pixels).cuda().permute(2, 0, 1).contiguous() for _ in range(8)]

    def encode() -> list:
        as_bytes = [(p * 255 + 0.5).clamp(0, 255).to(torch.uint8) for p in batch]
        return [d.cpu() for d in torchvision.io.encode_jpeg(as_bytes, quality=images.JPEG_QUALITY)]

    cpu = cpu_seconds(encode, reps) / len(batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        out = encode()
    wall = (time.perf_counter() - start) / reps / len(batch)
    return {"cpu_seconds": round(cpu, 5), "wall_seconds": round(wall, 5),
            "bytes": int(out[0].numel()), "note": "torchvision's nvJPEG encoder subsamples "
            "chroma (4:2:0); the worker's Pillow JPEG keeps 4:4:4"}


def gpu_jpeg_or_why(pixels: np.ndarray, reps: int) -> dict | str | None:
    """:func:`gpu_jpeg`, or why it failed (the CPU figures are still worth having)."""
    try:
        return gpu_jpeg(pixels, reps)
    except Exception as e:  # noqa: BLE001 - reported in the result instead
        return f"failed: {type(e).__name__}: {e}"


def cpu_name() -> str:
    """The processor's model name (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=1024, help="output width and height, pixels")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="256 pixels, 2 repetitions (CI)")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.side, args.reps = 256, 2
    pixels = photo(args.side)
    jpeg_in = images.encode(pixels, "in.jpg")
    with tempfile.TemporaryDirectory() as tmp:
        store = open_storage(tmp)
        count = iter(range(10**9))
        data = {"jpeg": jpeg_in} | {f"png{level}": images.encode(pixels, "o.png", level)
                                    for level in PNG_LEVELS}
        per = {"decode_jpeg": cpu_seconds(lambda: images.decode(jpeg_in, "in.jpg"), args.reps),
               "encode_jpeg": cpu_seconds(lambda: images.encode(pixels, "o.jpg"), args.reps)}
        for level in PNG_LEVELS:
            per[f"encode_png{level}"] = cpu_seconds(
                lambda level=level: images.encode(pixels, "o.png", level), args.reps)
        per["write_jpeg"] = cpu_seconds(lambda: store.write(f"{next(count)}.jpg", data["jpeg"]),
                                        args.reps)
        per["write_png1"] = cpu_seconds(lambda: store.write(f"{next(count)}.png", data["png1"]),
                                        args.reps)
    totals = {"jpeg": per["decode_jpeg"] + per["encode_jpeg"] + per["write_jpeg"]}
    for level in PNG_LEVELS:
        totals[f"png{level}"] = per["decode_jpeg"] + per[f"encode_png{level}"] + per["write_png1"]
    result = {
        "benchmark": "output_cpu",
        "date": datetime.now(UTC).date().isoformat(),
        "cpu": cpu_name(),
        "cpus": usable_cpus(),
        "side": args.side,
        "reps": args.reps,
        "cpu_seconds_per_output": {k: round(v, 5) for k, v in per.items()},
        "output_bytes": {k: len(v) for k, v in data.items()},
        "cpu_seconds_per_output_total": {k: round(v, 5) for k, v in totals.items()},
        "outputs_per_core_second": {k: round(1 / v, 1) for k, v in totals.items()},
        "gpu_jpeg": gpu_jpeg_or_why(pixels, args.reps),
        "command": " ".join(["python", "benchmarks/output_cpu.py", *sys.argv[1:]]),
    }
    print(json.dumps(result, indent=1))
    print(f"outputs/s one core sustains at {args.side}x{args.side} (decode + encode + write): "
          + ", ".join(f"{k} {v}" for k, v in result["outputs_per_core_second"].items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

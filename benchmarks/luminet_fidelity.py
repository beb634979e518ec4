"""luminet_fidelity: how far bf16 and fp16 move LumiNet's 8-bit outputs from fp32's.

The same random-weight LumiNet (``make-model --kind luminet``, tiny or full size) relights the
same pair (a bundled example photo under a bundled HDR map) for several seeds in fp32, bf16 and
fp16, on the CPU (the differences are the dtype's, not the device's); each output as the worker
writes it (8 bits) against fp32's: mean and largest difference in levels, and the share of
values within one level. fp32 is the original's dtype: the exact mode.

    python benchmarks/luminet_fidelity.py --size tiny \
        --out benchmarks/results/luminet_fidelity_tiny_cpu.json
    python benchmarks/luminet_fidelity.py --size full --steps 5 --seeds 2 --dtypes bf16 \
        --out benchmarks/results/luminet_fidelity_full_cpu.json    # slow on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import provenance
import torch

from relit_k8s import images
from relit_k8s.relighters import create
from relit_k8s.relighters.luminet.make import make_luminet, run_options

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def pair(relighter) -> tuple[torch.Tensor, torch.Tensor]:
    """A bundled photo and HDR map, as the worker hands them to the relighter."""
    photo = images.decode((EXAMPLES / "images" / "astronaut.png").read_bytes(), "astronaut.png")
    ref = images.decode((EXAMPLES / "refs" / "sky_sun.hdr").read_bytes(), "sky_sun.hdr")

    def as_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()

    return as_tensor(images.as_display(photo)), as_tensor(relighter.reference_pixels(ref))


def eight_bits(out: torch.Tensor) -> np.ndarray:
    return (out.numpy() * 255 + 0.5).astype(np.int16)  # as the worker rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps [default: the original's]")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=("bf16", "fp16"),
                    help="compared with fp32 (fp16 on a CPU without fp16 arithmetic is very "
                    "slow at full size)")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    seeds = list(range(1, args.seeds + 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_luminet(Path(tmp) / "luminet", args.size)
        outputs, seconds = {}, {}
        for dtype in ("fp32", *args.dtypes):
            r = create("luminet", {**run_options(folder), "dtype": dtype,
                                   "ddim_steps": str(args.steps), "batch_size": "1",
                                   "cache_weights": "false"}, "cpu")
            photo, ref = pair(r)
            start = time.perf_counter()
            outputs[dtype] = eight_bits(r.relight(photo, ref, seeds))
            seconds[dtype] = round(time.perf_counter() - start, 1)
            print(f"{dtype}: {seconds[dtype]} s", flush=True)
    exact = outputs["fp32"]
    rows = {}
    for dtype in (*args.dtypes, "fp32"):
        diff = np.abs(outputs[dtype] - exact)
        per_seed = [float(d.mean()) for d in diff]
        rows[dtype] = {"mean_levels": round(float(diff.mean()), 3),
                       "mean_levels_per_seed": [round(x, 3) for x in per_seed],
                       "max_levels": int(diff.max()),
                       "within_one_level": round(float((diff <= 1).mean()), 4),
                       "equal": round(float((diff == 0).mean()), 4),
                       "seconds": seconds[dtype]}
        print(f"{dtype} against fp32: mean {rows[dtype]['mean_levels']} levels (seeds "
              f"{min(per_seed):.2f}-{max(per_seed):.2f}), max {rows[dtype]['max_levels']}, "
              f"within one level {rows[dtype]['within_one_level']:.1%}")
    result = {
        "benchmark": "luminet_fidelity", "date": datetime.now(UTC).date().isoformat(),
        "commit": provenance.commit(), "command": provenance.command("luminet_fidelity.py"),
        "machine": f"{platform.machine()}, CPU, torch {torch.__version__}",
        "model": f"random LumiNet, {args.size} size", "steps": args.steps, "seeds": seeds,
        "image": "examples/images/astronaut.png", "reference": "examples/refs/sky_sun.hdr",
        "spread": "mean_levels_per_seed: one figure per seed",
        "against_fp32": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "against_fp32"}, indent=1))


if __name__ == "__main__":
    main()

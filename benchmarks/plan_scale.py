"""plan_scale: plan 10,000 images x 1,000 references x 50 iterations; seconds and bytes.

The listing is synthetic (the planner is pure: listings + settings -> manifest), so this
measures planning itself: option validation, unit layout, run id, checksum and serialisation.

    python benchmarks/plan_scale.py [--images 10000] [--refs 1000] [--iterations 50]
                                    [--runs 5] [--out benchmarks/results/plan_scale_cpu.json]

Each figure is the median of ``--runs`` runs in this process; the JSON keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime

import provenance

from relit_k8s.manifest import Manifest
from relit_k8s.planner import PlanSettings, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--refs", type=int, default=1_000)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--parallelism", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    images = [f"dataset/part-{i // 1000:03d}/image-{i:06d}.jpg" for i in range(args.images)]
    refs = [f"hdri/env-{j:05d}.exr" for j in range(args.refs)]
    settings = PlanSettings(input="s3://bucket/in", refs="s3://bucket/refs",
                            output="s3://bucket/out", iterations=args.iterations,
                            workers=args.parallelism)
    plans, loads = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        m = plan(settings, images, refs)
        data = m.to_json()
        plans.append(time.perf_counter() - start)
        start = time.perf_counter()
        back = Manifest.from_json(data)
        units = back.shard_units(back.shards - 1)
        loads.append(time.perf_counter() - start)
    planned = statistics.median(plans)
    result = {
        "benchmark": "plan_scale", "date": datetime.now(UTC).date().isoformat(),
        "commit": provenance.commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "images": args.images, "references": args.refs, "iterations": args.iterations,
        "items": m.items, "shards": m.shards, "units": m.units,
        "plan_seconds": round(planned, 3), "plan_seconds_runs": [round(t, 4) for t in plans],
        "manifest_bytes": len(data),
        "load_and_one_shard_seconds": round(statistics.median(loads), 3),
        "load_and_one_shard_seconds_runs": [round(t, 4) for t in loads],
        "units_in_last_shard": len(units),
        "command": provenance.command("plan_scale.py"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    print(f"planned {m.items:,} items in {planned:.2f} s; manifest {len(data) / 1e6:.2f} MB "
          f"(targets: <= 2 s, <= 5 MB)")


if __name__ == "__main__":
    main()

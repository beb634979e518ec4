"""status_scale: seconds and S3 requests of the readers of a whole run, by its shard count.

A finished leases run of N shards (32 per worker, as the plan cuts them: N / 32 workers) is
written to SeaweedFS on 127.0.0.1 as its workers leave it: the manifest, a done report per
shard, and each worker's summary of the reports it finished. The readers then go through a
proxy that delays every request by ``--delay-ms`` (20: the order of a real S3 region's
first-byte latency; the server itself answers in about a millisecond):

* ``status``: :func:`relit_k8s.status.collect`, what ``relit-k8s status -o json`` prints;
* ``status, reports one by one``: the same with the summaries removed (what every status did
  before them; only up to ``--one-by-one-max`` shards: it takes N x delay / 32 s at best);
* ``resume --dry-run --trust-reports``: what a resume of the finished run would do;
* ``gallery``: the contact sheet (its samples are not written here: it lists their folders).

Each is timed ``--repeats`` times; the requests are counted by the S3 client (retries
included).

    python benchmarks/status_scale.py --out benchmarks/results/status_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import provenance
from s3_servers import start_seaweedfs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fault_proxy import FaultProxy  # noqa: E402  (the tests' proxy: one proxy for both)

SHARDS_PER_WORKER = 32


def write_run(client, bucket: str, shards: int):
    """Plan and write a finished run of ``shards`` shards straight to the server."""
    from relit_k8s.clock import now
    from relit_k8s.manifest import FoldedReports, ShardReport
    from relit_k8s.planner import PlanSettings, plan
    from relit_k8s.run import Run
    from relit_k8s.storage import open_storage

    settings = PlanSettings(input=f"s3://{bucket}/in", refs=f"s3://{bucket}/refs",
                            output=f"s3://{bucket}/out", iterations=50, shards=shards,
                            balance="leases")
    images = [f"photo{i:06d}.jpg" for i in range(max(1, shards // 4))]
    manifest = plan(settings, images, ["sky.hdr", "studio.exr", "sunset.hdr", "night.hdr"])
    store = open_storage(manifest.output)
    store.write(f"_relit/{manifest.run_id}/manifest.json", manifest.to_json())
    run = Run(manifest, store)
    end = now()
    workers: dict[int, FoldedReports] = {}

    def one(index: int) -> None:
        report = ShardReport(
            run_id=manifest.run_id, index=index, state="done",
            items_total=manifest.shard_items(index), items_done=manifest.shard_items(index),
            started_at=end - timedelta(seconds=600), updated_at=end, finished_at=end,
            host=f"pod-{index // SHARDS_PER_WORKER}", device="cuda:0 (NVIDIA H100)",
            relighter="luminet", exit_code=0, items_per_second=0.5,
            timings={"model_load": 20.0, "relight": 580.0})
        data = report.model_dump_json(indent=1).encode()
        store.write(run.paths.report(index), data)
        summary = workers[index // SHARDS_PER_WORKER]
        summary.reports[index] = report
        summary.sizes[index] = len(data)

    for w in range(-(-shards // SHARDS_PER_WORKER)):
        workers[w] = FoldedReports(writer=f"pod-{w}-1-abcd")
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(shards)))
    for summary in workers.values():
        store.write(f"{run.paths.folded}/{summary.writer}.json",
                    summary.model_dump_json().encode())
    return manifest, len(workers)


def timed(fn, repeats: int) -> dict:
    from relit_k8s.storage import S3_REQUESTS

    seconds, requests = [], []
    for _ in range(repeats):
        before = S3_REQUESTS.value
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
        requests.append(S3_REQUESTS.value - before)
    return {"seconds_median": round(statistics.median(seconds), 3),
            "seconds_min": round(min(seconds), 3), "seconds_max": round(max(seconds), 3),
            "requests": max(requests)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 8000, 32000])
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one-by-one-max", type=int, default=8000,
                    help="largest run whose 'reports one by one' row is measured")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    server = start_seaweedfs()
    proxy = FaultProxy(server.endpoint, stall=1.0, stall_seconds=args.delay_ms / 1000).start()
    os.environ.update(AWS_ACCESS_KEY_ID=server.access_key,
                      AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_REGION="us-east-1")
    rows = []
    try:
        direct = server.client()
        for shards in args.shards:
            bucket = f"scale-{shards}"
            direct.create_bucket(Bucket=bucket)
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint  # written without the delay
            _reset_clients()
            manifest, workers = write_run(direct, bucket, shards)
            os.environ["AWS_ENDPOINT_URL"] = proxy.url  # read through it
            _reset_clients()
            rows.append(measure(manifest, shards, workers, args))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proxy.stop()
        server.stop()
    result = {"benchmark": "status_scale", "date": time.strftime("%Y-%m-%d"),
              "commit": provenance.commit(), "command": provenance.command("status_scale.py"),
              "machine": "this machine (2 cores), SeaweedFS on 127.0.0.1 behind a proxy",
              "delay_ms_per_request": args.delay_ms, "repeats": args.repeats,
              "shards_per_worker": SHARDS_PER_WORKER, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def _reset_clients() -> None:
    from relit_k8s.storage import _client_for

    _client_for.cache_clear()


def measure(manifest, shards: int, workers: int, args) -> dict:
    from relit_k8s import gallery
    from relit_k8s.resume import plan_resume
    from relit_k8s.run import Run
    from relit_k8s.status import collect
    from relit_k8s.storage import open_storage

    run = Run.load(manifest.output, manifest.run_id)
    row = {"shards": shards, "workers": workers, "pairs": manifest.pairs,
           "outputs": manifest.items}
    status = collect(run)
    assert status.items_done == manifest.items and not status.notes, status.notes
    row["status"] = timed(lambda: collect(run), args.repeats)
    row["resume_dry_run_trust_reports"] = timed(
        lambda: plan_resume(run, workers, trust_reports=True), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        row["gallery"] = timed(lambda: gallery.build(manifest.output, manifest.run_id,
                                                     to=tmp), 1)
    if shards <= args.one_by_one_max:
        store = open_storage(manifest.output)
        for name in store.list_names(run.paths.folded):
            store.delete(f"{run.paths.folded}/{name}")
        row["status_reports_one_by_one"] = timed(lambda: collect(run), 1)
    return row


if __name__ == "__main__":
    main()

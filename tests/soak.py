"""Soak test: thousands of items through 4 local workers against a local S3 endpoint, with
random storage faults (a fault-injecting proxy) and random worker kills (SIGKILL); the same
command is rerun until it succeeds, as a user or the Job controller would. A checker then proves
that every planned output exists exactly once (no missing, no unexpected object), decodes, and
that every failure is accounted for (exactly the bad inputs' items, recorded in the reports).

    python tests/soak.py             # the short version CI runs (tests/test_reliability.py)
    python tests/soak.py --long      # by hand: ~10,000 items, more kills and faults

Only 127.0.0.1 is contacted: a SeaweedFS server (its own process) and the proxy (a thread).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from fault_proxy import FaultProxy  # noqa: E402
from s3_servers import ACCESS_KEY, SECRET_KEY, start_seaweedfs  # noqa: E402

from relit_k8s import images as imaging  # noqa: E402
from relit_k8s.manifest import Manifest, ShardReport, pair_seeds  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BAD = {"bad-empty.png": b"", "bad-text.jpg": b"this is not an image\n" * 4}


def _png(seed: int) -> bytes:
    arr = (np.random.default_rng(seed).random((12, 16, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _workers_of(pid: int) -> list[int]:
    """The worker processes (multiprocessing spawn children) of the `run` process ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def soak(endpoint: str, images: int, refs: int, iterations: int, workers: int, kills: int,
         fault_rate: float, seed: int, max_attempts: int = 10,
         keys: tuple[str, str] = (ACCESS_KEY, SECRET_KEY), attempt_timeout: float = 200) -> dict:
    """``keys``: the server's access key and secret (a real server checks them);
    ``attempt_timeout``: seconds one run of the command may take (the long soak sets more)."""
    rng = random.Random(seed)
    creds = {"AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1],
             "AWS_REGION": "us-east-1"}
    direct = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=keys[0], aws_secret_access_key=keys[1])
    bucket = f"soak-{uuid.uuid4().hex[:10]}"
    direct.create_bucket(Bucket=bucket)
    for i in range(images - len(BAD)):
        direct.put_object(Bucket=bucket, Key=f"in/img{i:04d}.png", Body=_png(seed * 10_000 + i))
    for name, data in BAD.items():
        direct.put_object(Bucket=bucket, Key=f"in/{name}", Body=data)
    ref_data = (EXAMPLES / "refs" / "sky_sun.hdr").read_bytes()
    for j in range(refs):
        direct.put_object(Bucket=bucket, Key=f"refs/env{j:03d}.hdr", Body=ref_data)

    share = fault_rate / 4
    proxy = FaultProxy(endpoint, seed=seed, reset=share, error500=share, slowdown=share,
                       stall=share, stall_seconds=1.5, credentials=keys).start()
    env = {**os.environ, **creds, "AWS_ENDPOINT_URL": proxy.url, "RELIT_S3_MAX_ATTEMPTS": "10",
           "RELIT_S3_READ_TIMEOUT": "1", "RELIT_S3_CONNECT_TIMEOUT": "1"}
    run_id = f"soak-{seed}"
    cmd = [str(Path(sys.executable).parent / "relit-k8s"), "run",
           "--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs",
           "--output", f"s3://{bucket}/out", "--iterations", str(iterations),
           "--workers", str(workers), "--device", "cpu", "--shards", str(workers * 4),
           "--batch-size", "4", "--run-id", run_id, "--no-progress"]
    killed = 0
    attempts = 0
    try:
        for attempt in range(1, max_attempts + 1):
            attempts = attempt
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            stop = threading.Event()

            def killer(proc=proc, stop=stop):
                nonlocal killed
                while killed < kills and not stop.wait(rng.uniform(1.0, 3.0)):
                    children = _workers_of(proc.pid)
                    if children:
                        os.kill(rng.choice(children), signal.SIGKILL)
                        killed += 1

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            try:  # a run that hangs fails here, with its log, and leaves no process behind
                _, err = proc.communicate(timeout=attempt_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, err = proc.communicate()
                raise RuntimeError(f"attempt {attempt} still running after {attempt_timeout} s "
                                   f"(killed): {err[-3000:]}") from None
            finally:
                stop.set()
            thread.join()
            if proc.returncode == 0:
                break
            if proc.returncode == 78:
                raise RuntimeError(f"configuration error: {err[-2000:]}")
        else:
            raise RuntimeError(f"still failing after {max_attempts} attempts: {err[-2000:]}")
    finally:
        proxy.stop()
    return check(direct, bucket, run_id, killed, attempts, proxy.counts)


def check(client, bucket: str, run_id: str, kills: int, attempts: int, faults: dict) -> dict:
    """Every planned output exactly once, every failure accounted for."""
    def read(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read()

    m = Manifest.from_json(read(f"_relit/{run_id}/manifest.json"))
    planned = {f"{img}_{ref}/{seed}_{Manifest.output_name(img)}": img
               for img in m.images for ref in m.references
               for seed in pair_seeds(m.base_seed, img, ref, m.iterations)}
    stored = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/"):
        stored += [o["Key"][4:] for o in page.get("Contents", [])
                   if not o["Key"].startswith("out/_relit/")]
    good = {k for k, img in planned.items() if img not in BAD}
    for key in stored:
        imaging.decode(read(key), key)  # each stored output is a whole image
    reports = [ShardReport.from_json(read(f"_relit/{run_id}/shards/{i}.json"))
               for i in range(m.shards)]
    for r in reports:
        assert r.state == "done", (r.index, r.state, r.error)
        assert r.items_done + r.items_skipped + r.items_failed == r.items_total, r.index
    failures = [f for r in reports for f in r.failures]
    assert {f.image for f in failures} <= set(BAD), failures[:3]
    return {
        "planned": len(planned),
        "outputs": len(stored),
        "missing": len(good - set(stored)),
        "unexpected": len(stored) - len(set(stored) & good),
        "bad_items": len(planned) - len(good),
        "failed_items": sum(r.items_failed for r in reports),
        "failure_records": len(failures),
        "kills": kills,
        "attempts": attempts,
        "faults": faults,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="~10,000 items, 6 kills, 6%% faults")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    server = start_seaweedfs()
    started = time.monotonic()
    try:
        if args.long:
            result = soak(server.endpoint, images=50, refs=10, iterations=20,
                          workers=4, kills=6, fault_rate=0.06, seed=args.seed,
                          attempt_timeout=3600)
        else:
            result = soak(server.endpoint, images=16, refs=4, iterations=16,
                          workers=4, kills=2, fault_rate=0.04, seed=args.seed)
    finally:
        server.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=1))
    ok = result["missing"] == 0 and result["unexpected"] == 0 and \
        result["failed_items"] == result["bad_items"]
    print("SOAK PASSED" if ok else "SOAK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

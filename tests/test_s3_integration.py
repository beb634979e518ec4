"""The worker and the local runner against a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES, cli, s3_outputs, upload_folder

from relit_k8s import images
from relit_k8s.manifest import pair_seeds
from relit_k8s.status import collect


@pytest.mark.slow
def test_plan_and_workers_on_s3_for_several_indexes(bucket, s3_client, s3_env):
    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    out = f"s3://{bucket}/out"
    result = cli("plan", "--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs",
                 "--output", out, "--iterations", "2", "--shards", "3", "--balance", "static",
                 check=True)  # worker i runs shard i (tests/test_balance.py: leases)
    manifest_uri = next(line.split(": ", 1)[1] for line in result.stdout.splitlines()
                        if line.startswith("manifest: "))
    assert manifest_uri.startswith(f"s3://{bucket}/out/_relit/relit-")
    for index in range(3):
        cli("worker", "--manifest", manifest_uri, "--index", str(index), "--device", "cpu",
            check=True)
    status = collect(out)
    assert status.state == "done" and status.items_done == 4 * 3 * 2
    objs = s3_outputs(s3_client, bucket, "out")
    expected = {f"{img}_{ref}/{seed}_{img}"
                for img in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
                for ref in ("sky_sun.hdr", "studio_softboxes.exr", "sunset.hdr")
                for seed in pair_seeds(0, img, ref, 2)}
    assert set(objs) == expected
    for key, data in objs.items():
        assert images.decode(data, key).pixels.ndim == 3

    # the same plan again: nothing written, everything skipped
    for index in range(3):
        cli("worker", "--manifest", manifest_uri, "--index", str(index), check=True)
    status = json.loads(cli("status", "--output", out, "-o", "json", check=True).stdout)
    assert status["items_skipped"] == 24 and status["items_done"] == 0


def test_local_run_reads_and_writes_s3(bucket, s3_client, s3_env):
    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    result = cli("run", "--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs",
                 "--output", f"s3://{bucket}/out", "--iterations", "1", "--img-pattern", "c*",
                 "--workers", "2", "--device", "cpu", "--no-progress", check=True)
    assert "written 6, skipped 0" in result.stdout
    assert len(s3_outputs(s3_client, bucket, "out")) == 2 * 3

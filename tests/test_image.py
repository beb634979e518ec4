"""The worker image, run the way its pods run (issue 14).

The Job comes from ``relit-k8s submit --dry-run -o json`` exactly as it would go to the API
server; :mod:`pod_containers` turns its pod template into one container per index, with the
pod's user, read-only root filesystem, dropped capabilities, volumes, memory limit, environment
(the S3 Secret included) and grace period. The containers use the host network and the suite's
S3 server (SeaweedFS) on 127.0.0.1.

Needs a container engine and the image: ``scripts/build-image.sh`` builds it and prints its
name, which goes in ``RELIT_TEST_IMAGE``. Without them these tests skip and say why; with
``RELIT_REQUIRE_IMAGE=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from conftest import EXAMPLES, _free_port, cli, s3_outputs, upload_folder
from pod_containers import Pod, docker, engine_available, pod_for_index
from s3_servers import ACCESS_KEY, SECRET_KEY

from relit_k8s.leases import FinishedSummary

IMAGE = os.environ.get("RELIT_TEST_IMAGE", "")
SECRETS = {"relit-s3": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}
#: The CPU image must stay under this (README, "The worker image").
MAX_IMAGE_BYTES = 2_000_000_000


@pytest.fixture(scope="module")
def image() -> str:
    why = None
    if not IMAGE:
        why = ("RELIT_TEST_IMAGE is not set: build the image with scripts/build-image.sh "
               "(it prints the name to set)")
    else:
        why = engine_available()
        if why is None and docker("image", "inspect", IMAGE, check=False).returncode != 0:
            why = f"image {IMAGE} is not built (scripts/build-image.sh)"
    if why:
        if os.environ.get("RELIT_REQUIRE_IMAGE"):
            pytest.fail(why)
        pytest.skip(why)
    return IMAGE


@pytest.fixture
def pods(tmp_path):
    """Makes the pods of a Job; removes their containers afterwards."""
    made: list[Pod] = []

    def make(job: dict, index: int, **env: str) -> Pod:
        pod = pod_for_index(job, index, SECRETS, tmp_path,
                            f"relit-test-{uuid.uuid4().hex[:8]}-{index}", env=env)
        made.append(pod)
        return pod

    yield make
    for pod in made:
        pod.remove()


def plan_job(image: str, s3_client, bucket: str, endpoint: str, *flags: str, shards: int = 2,
             iterations: int = 2, memory: str = "2Gi", grace: int = 30, cpu: str = "1",
             submit_flags: tuple[str, ...] = ()) -> dict:
    """Upload the examples, write the plan (``relit-k8s plan``) and return the Job that
    ``relit-k8s submit`` would create for it (the same run: same flags; ``submit_flags``:
    the Job's own, which ``plan`` does not take)."""
    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    selection = ["--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs", "--output",
                 f"s3://{bucket}/out", "--iterations", str(iterations), "--shards",
                 str(shards), *flags]
    cli("plan", *selection, check=True)
    return json.loads(cli(
        "submit", *selection, "--image", image, "--gpus-per-pod", "0", "--cpu", cpu,
        "--memory", memory, "--grace-period", str(grace), "--s3-endpoint", endpoint,
        "--s3-region", "us-east-1", "--image-pull-policy", "Never", *submit_flags, "--dry-run",
        "-o", "json", check=True).stdout)


def report(s3_client, bucket: str, job: dict, index: int) -> dict | None:
    run_id = job["metadata"]["name"]
    try:
        body = s3_client.get_object(Bucket=bucket,
                                    Key=f"out/_relit/{run_id}/shards/{index}.json")["Body"]
    except s3_client.exceptions.NoSuchKey:
        return None
    return json.loads(body.read())


@pytest.mark.slow
def test_every_index_runs_in_its_pod_and_a_second_run_rewrites_nothing(
        image, pods, bucket, s3_client, s3_endpoint, capsys):
    """Leases (the default: the server honours conditional writes): two worker pods claim the two
    shards; pods started again find every shard finished and exit 0 without touching an
    output or a report."""
    job = plan_job(image, s3_client, bucket, s3_endpoint)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    first = [pods(job, i).start() for i in range(job["spec"]["completions"])]
    codes = [p.wait() for p in first]
    assert codes == [0, 0], "\n".join(p.logs()[-3000:] for p in first)
    outputs = s3_outputs(s3_client, bucket)
    # every output of the examples exactly once, and nothing else (no temporary objects)
    assert len(outputs) == 4 * 3 * 2
    assert len({key.rsplit(".", 1)[0] for key in outputs}) == len(outputs)
    reports = [report(s3_client, bucket, job, i) for i in range(2)]
    assert [r["state"] for r in reports] == ["done", "done"]
    assert sum(r["items_done"] for r in reports) == len(outputs)
    # the root filesystem stayed read-only and untouched: all writing went to the volumes
    for pod in first:
        assert docker("diff", pod.name).stdout.strip() == ""
        written = sorted(str(p.relative_to(folder)) for folder in pod.folders.values()
                         for p in folder.rglob("*"))
        with capsys.disabled():
            print(f"\n{pod.name}: written in /tmp and /cache: {written[:20] or 'nothing'}")
    etags = {o["Key"]: o["ETag"] for o in s3_client.list_objects_v2(
        Bucket=bucket, Prefix="out/")["Contents"] if "/_relit/" not in o["Key"]}

    run_id = job["metadata"]["name"]
    done = sorted(o["Key"].rsplit("/", 1)[1] for o in s3_client.list_objects_v2(
        Bucket=bucket, Prefix=f"out/_relit/{run_id}/done/")["Contents"])
    assert done == ["0", "1"]
    left = {o["Key"].rsplit("/", 1)[1]: o["Key"] for o in s3_client.list_objects_v2(
        Bucket=bucket, Prefix=f"out/_relit/{run_id}/leases/").get("Contents", [])}
    # no lease left behind; finished.json is not a lease but the summary of finished shards a
    # worker may have published (never naming a shard that is not finished)
    assert not [name for name in left if name.endswith(".json") and name != "finished.json"]
    if "finished.json" in left:
        summary = FinishedSummary.model_validate_json(
            s3_client.get_object(Bucket=bucket, Key=left["finished.json"])["Body"].read())
        assert summary.shards() <= {0, 1}

    again = [pods(job, i).start() for i in range(2)]
    assert [p.wait() for p in again] == [0, 0]
    assert [report(s3_client, bucket, job, i) for i in range(2)] == reports  # untouched ...
    assert etags == {o["Key"]: o["ETag"] for o in s3_client.list_objects_v2(
        Bucket=bucket, Prefix="out/")["Contents"] if "/_relit/" not in o["Key"]}  # ... all
    assert "every shard of run" in again[0].logs()


def test_a_missing_or_tampered_manifest_is_78_and_unreachable_s3_is_75(
        image, pods, bucket, s3_client, s3_endpoint):
    job = plan_job(image, s3_client, bucket, s3_endpoint, shards=1)
    run_id = job["metadata"]["name"]
    missing = pods(job, 0, RELIT_MANIFEST=f"s3://{bucket}/out/_relit/nope/manifest.json")
    assert missing.run() == 78, missing.logs()[-2000:]
    key = f"out/_relit/{run_id}/manifest.json"
    body = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body["iterations"] = 3  # changed by hand, checksum left as it was
    s3_client.put_object(Bucket=bucket, Key="tampered/manifest.json",
                         Body=json.dumps(body).encode())
    tampered = pods(job, 0, RELIT_MANIFEST=f"s3://{bucket}/tampered/manifest.json")
    assert tampered.run() == 78
    assert "checksum" in tampered.logs()
    # the endpoint does not answer: botocore's retries (3 attempts here), then 75 for the Job
    # controller to retry the index
    away = pods(job, 0, AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}",
                RELIT_S3_MAX_ATTEMPTS="3")
    assert away.run() == 75, away.logs()[-2000:]
    assert s3_outputs(s3_client, bucket) == {}


def test_a_host_cache_the_kubelet_creates_root_owned_is_made_writable_by_the_init_container(
        image, pods, bucket, s3_client, s3_endpoint, tmp_path):
    """The kubelet creates a missing --cache-host-path directory owned by root, mode 0755, and
    fsGroup does not apply to hostPath: the worker (uid 10001) could not write its model
    cache. The Job's init container hands the directory to 10001; without it the worker exits
    78 at once, naming the fix, instead of failing deep inside a model download."""
    cache = tmp_path / "node-cache"  # missing: DirectoryOrCreate makes it root-owned, 0755
    job = plan_job(image, s3_client, bucket, s3_endpoint, shards=1,
                   submit_flags=("--cache-host-path", str(cache)))
    [init] = job["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == "cache-permissions"
    bare = json.loads(json.dumps(job))
    del bare["spec"]["template"]["spec"]["initContainers"]  # as if a policy had removed it
    refused = pods(bare, 0)
    assert refused.run() == 78, refused.logs()[-2000:]
    assert (cache.stat().st_uid, cache.stat().st_mode & 0o777) == (0, 0o755)
    said = " ".join(refused.logs().split())
    assert "not writable by uid 10001" in said and "install -d -o 10001 -g 10001" in said
    assert s3_outputs(s3_client, bucket) == {}

    pod = pods(job, 0)
    assert pod.run() == 0, pod.logs()[-2000:]
    assert cache.stat().st_uid == 10001 and len(s3_outputs(s3_client, bucket)) == 24


@pytest.mark.slow
def test_a_pod_stopped_mid_shard_exits_143_in_its_grace_period_and_its_retry_finishes(
        image, pods, bucket, s3_client, s3_endpoint):
    # 1,200 items and a heartbeat every 0.5 s: the shard is seen at work long before its end (a
    # fast machine did 600 items between two 5 s heartbeats, and the stop then found it done)
    job = plan_job(image, s3_client, bucket, s3_endpoint, shards=1, iterations=100, grace=30)
    total = 4 * 3 * 100
    pod = pods(job, 0, RELIT_REPORT_INTERVAL="0.5").start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = report(s3_client, bucket, job, 0)
        if r and r["state"] == "running" and r["items_done"] >= 10:
            break
        assert pod.state()["Running"], pod.logs()[-2000:]
        time.sleep(0.5)
    else:
        pytest.fail("the shard never got going")
    pod.stop()  # SIGTERM, then SIGKILL once the grace period is over
    # 143 is the worker's own exit after saving its report; a SIGKILL at the end of the grace
    # period would have given 137
    assert pod.wait() == 143, pod.logs()[-2000:]
    stopped = report(s3_client, bucket, job, 0)
    assert stopped["state"] == "stopped" and 0 < stopped["items_done"] < total
    retry = pods(job, 0)  # the Job controller's next pod for the index
    assert retry.run() == 0, retry.logs()[-2000:]
    done = report(s3_client, bucket, job, 0)
    assert done["state"] == "done" and done["items_done"] + done["items_skipped"] == total
    assert len(s3_outputs(s3_client, bucket)) == total


def test_a_memory_limit_too_small_kills_the_pod_and_leaves_nothing_half_written(
        image, pods, bucket, s3_client, s3_endpoint):
    """The kernel kills the container (137) on the big image; the small images before it are
    written whole, the report still says running (status flags it once its heartbeat is old),
    and no output of the big image exists under its final name."""
    import io

    import numpy as np
    from conftest import png_bytes
    from PIL import Image

    side = 6000  # 36 MP: well inside the default --max-pixels, far beyond 700 MiB of float32
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    big = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8)
    s3_client.put_object(Bucket=bucket, Key="in/zz_big.png", Body=png_bytes(big))
    job = plan_job(image, s3_client, bucket, s3_endpoint, "--ref-pattern", "sky*", shards=1,
                   iterations=1, memory="700Mi")
    pod = pods(job, 0)
    assert pod.run() == 137, pod.logs()[-2000:]
    assert pod.state()["OOMKilled"]
    r = report(s3_client, bucket, job, 0)
    assert r["state"] == "running" and r["items_total"] == 5
    outputs = s3_outputs(s3_client, bucket)
    print(f"written before the kill: {sorted(outputs)}")
    assert not [key for key in outputs if "zz_big" in key]
    for data in outputs.values():  # each written output is whole
        Image.open(io.BytesIO(data)).load()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a compile on 2 busy cores
def test_compile_works_in_the_cpu_image_on_a_tiny_model(image, pods, bucket, s3_client,
                                                        s3_endpoint, tmp_path):
    """-O compile=true in a pod: inductor builds its C++ kernels with the image's compiler
    and headers, under a read-only root, caching into /cache; the model comes from S3."""
    from relit_k8s.modelkit import make_model

    model = make_model(tmp_path / "model", "tiny")
    upload_folder(s3_client, model, bucket, "model")
    job = plan_job(image, s3_client, bucket, s3_endpoint, "--relighter", "diffusion", "-O",
                   f"model=s3://{bucket}/model", "-O", "compile=true", "--img-pattern",
                   "rocket*", "--ref-pattern", "sky*", shards=1, iterations=1, memory="4Gi",
                   cpu="2")  # inductor compiles its kernels in parallel
    pod = pods(job, 0)
    assert pod.run(timeout=900) == 0, pod.logs()[-3000:]
    assert len(s3_outputs(s3_client, bucket)) == 1
    cache = pod.folders["model-cache"]
    assert (cache / "torch" / "inductor").is_dir()  # compiled kernels, for the next pod
    assert list((cache / "relit-k8s" / "models").iterdir())  # the model, fetched once


def test_the_image_runs_as_its_non_root_user(image):
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "10001"
    helptext = docker("run", "--rm", "--read-only", image, "--help").stdout
    assert "Usage" in helptext and "submit" in helptext
    listed = docker("run", "--rm", "--read-only", "--cap-drop", "ALL", image,
                    "relighters").stdout
    for name in ("sh", "diffusion", "luminet"):
        assert name in listed


def test_the_cpu_image_size(image, capsys):
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    with capsys.disabled():
        print(f"\nimage {image}: {size / 1e6:.0f} MB")
    assert size < MAX_IMAGE_BYTES

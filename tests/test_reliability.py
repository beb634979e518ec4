"""Faults, bad input, duplicate attempts and secrets: what users must be able to trust."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
from conftest import (
    EXAMPLES,
    as_terminal_foreground,
    cli,
    photo,
    png_bytes,
    s3_outputs,
    upload_folder,
)
from fault_proxy import FaultProxy
from PIL import Image
from test_images import bomb_png

from relit_k8s import images
from relit_k8s.errors import EXIT_CONFIG, EXIT_OK, EXIT_SIGTERM, EXIT_TEMPORARY, Stopped
from relit_k8s.manifest import Manifest, ShardReport, pair_seeds
from relit_k8s.planner import PlanSettings, list_sources, plan, write_manifest
from relit_k8s.run import RunPaths
from relit_k8s.settings import WorkerSettings
from relit_k8s.storage import LocalStorage
from relit_k8s.worker import ShardRunner, save_abandoned

TESTS = Path(__file__).parent
WORKER = [sys.executable, "-m", "relit_k8s", "worker", "--device", "cpu"]


def planned(input_uri, refs_uri, out_uri, **kw) -> tuple[Manifest, str]:
    s = PlanSettings(input=str(input_uri), refs=str(refs_uri), output=str(out_uri),
                     **{"iterations": 2, **kw})
    return write_manifest(plan(s, *list_sources(s)[:2]))


def expected(m: Manifest, skip_images=()) -> set[str]:
    return {f"{img}_{ref}/{seed}_{Manifest.output_name(img)}"
            for img in m.images if img not in skip_images for ref in m.references
            for seed in pair_seeds(m.base_seed, img, ref, m.iterations)}


def local_outputs(out: Path) -> dict[str, bytes]:
    """The outputs at their final names. Unfinished writes (hidden ``.name.tmp-*`` files,
    which a SIGKILL can leave behind and which no listing shows) are not outputs; a file that
    a running worker renames while this lists it is seen on the next call."""
    found = {}
    for p in out.rglob("*"):
        if "_relit" in p.parts or p.name.startswith(".") or not p.is_file():
            continue
        try:
            found[p.relative_to(out).as_posix()] = p.read_bytes()
        except FileNotFoundError:
            continue
    return found


def s3_count(client, bucket: str, prefix: str = "out/") -> int:
    """Objects under ``prefix`` (listing only: cheap enough to poll)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(page.get("KeyCount", 0) for page in pages)


def all_decode(outputs: dict[str, bytes]) -> None:
    for key, data in outputs.items():
        assert images.decode(data, key).pixels.ndim == 3, key


def report_of(storage_read, m: Manifest, index: int) -> ShardReport:
    return ShardReport.from_json(storage_read(RunPaths(m.run_id).report(index)))


def one_image_dataset(tmp_path, size=(384, 512)) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    (tmp_path / "in" / "big.png").write_bytes(png_bytes(photo(*size)))
    (tmp_path / "refs" / "sky.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr").read_bytes())
    return tmp_path / "in", tmp_path / "refs"


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    assert predicate(), "timed out"


# --- 1. crash and retry ---------------------------------------------------------------------------
def test_sigkill_mid_shard_then_rerun_gives_every_output_exactly_once(tmp_path):
    in_dir, refs_dir = one_image_dataset(tmp_path, size=(192, 256))
    out = tmp_path / "out"
    m, uri = planned(in_dir, refs_dir, out, iterations=300, shards=1, batch_size=4)
    proc = subprocess.Popen([*WORKER, "--manifest", uri, "--index", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(local_outputs(out)) >= 12)
    proc.kill()
    proc.wait()
    partial = local_outputs(out)
    assert 12 <= len(partial) < m.items
    all_decode(partial)  # whatever stands at a final name is whole
    rerun = subprocess.run([*WORKER, "--manifest", uri, "--index", "0"], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == EXIT_OK, rerun.stderr
    final = local_outputs(out)
    assert set(final) == expected(m)
    all_decode(final)
    report = ShardReport.from_json((out / RunPaths(m.run_id).report(0)).read_bytes())
    assert report.state == "done" and report.items_failed == 0
    assert report.items_skipped >= len(partial)
    assert report.items_done + report.items_skipped == m.items


# --- 2. duplicate attempts -----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_attempts_at_one_index_at_once_agree(where, tmp_path, request):
    in_dir, refs_dir = one_image_dataset(tmp_path, size=(96, 128))
    env = dict(os.environ)
    if where == "s3":
        client, bucket = request.getfixturevalue("s3_client"), request.getfixturevalue("bucket")
        upload_folder(client, in_dir, bucket, "in")
        upload_folder(client, refs_dir, bucket, "refs")
        in_uri, refs_uri, out_uri = (f"s3://{bucket}/{p}" for p in ("in", "refs", "out"))
        env.update({k: os.environ[k] for k in os.environ if k.startswith("AWS_")})
    else:
        in_uri, refs_uri, out_uri = in_dir, refs_dir, tmp_path / "out"
    m, uri = planned(in_uri, refs_uri, out_uri, iterations=60, shards=1)
    procs = [subprocess.Popen([*WORKER, "--manifest", uri, "--index", "0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == EXIT_OK, err
    if where == "s3":
        outputs = s3_outputs(client, bucket)
        def read(key):
            return client.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read()
    else:
        outputs = local_outputs(tmp_path / "out")
        def read(key):
            return (tmp_path / "out" / key).read_bytes()
        assert not list((tmp_path / "out").rglob(".*"))
    assert set(outputs) == expected(m)
    all_decode(outputs)
    report = report_of(read, m, 0)
    assert report.state == "done" and report.items_failed == 0
    assert report.items_done + report.items_skipped == m.items  # consistent, whoever won


# --- 3. SIGTERM with a grace period --------------------------------------------------------------
def test_sigterm_abandons_a_batch_that_outlasts_the_grace_period(tmp_path):
    in_dir, refs_dir = one_image_dataset(tmp_path, size=(24, 32))
    out = tmp_path / "out"
    m, uri = planned(in_dir, refs_dir, out, iterations=8, shards=1,
                     relighter="plugins_for_tests:SlowRelighter")
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RELIT_STOP_GRACE": "2"}
    proc = subprocess.Popen([*WORKER, "--manifest", uri, "--index", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    report_path = out / RunPaths(m.run_id).report(0)
    wait_for(lambda: report_path.exists())
    time.sleep(1.0)  # inside the first (slow) batch
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    waited = time.monotonic() - sent
    assert proc.returncode == EXIT_SIGTERM, err
    assert waited < 30  # the slow batch alone would take 600 s
    report = ShardReport.from_json(report_path.read_bytes())
    assert report.state == "stopped" and report.exit_code == EXIT_SIGTERM
    assert "grace period" in report.error
    assert local_outputs(out) == {} and not list(out.rglob(".*.tmp-*"))


class SlowOutputs(LocalStorage):
    """A local folder whose outputs take 0.3 s each to write (an upload); reports do not."""

    def write(self, key: str, data: bytes) -> None:
        if not key.startswith("_relit/"):
            time.sleep(0.3)
        super().write(key, data)


def test_a_shard_abandoned_after_the_grace_period_counts_every_output_that_exists(tmp_path):
    """The grace period runs out with outputs queued and being written: none starts after the
    report is saved, those being written land first, and the report counts exactly what
    exists (status and a rerun's skips agree with the files)."""
    in_dir, refs_dir = one_image_dataset(tmp_path, size=(24, 32))
    out = tmp_path / "out"
    m, _ = planned(in_dir, refs_dir, out, iterations=24, shards=1, balance="static")
    runner = ShardRunner(m, device="cpu", settings=WorkerSettings(write_threads=2))
    runner.output = SlowOutputs(out)  # the relighter outpaces the writes: a backlog builds
    ended: list[BaseException] = []

    def shard() -> None:
        try:
            runner.run(0)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            ended.append(e)

    thread = threading.Thread(target=shard)
    thread.start()
    wait_for(lambda: len(local_outputs(out)) >= 2)
    # the grace period is over before the shard sees its stop: a shard that saw it first
    # would end on its own, "stopped by a signal" (the other path, tested elsewhere), and on a
    # loaded machine it did, between the stop and this call, once in a CI run
    save_abandoned(runner)
    saved = ShardReport.from_json((out / RunPaths(m.run_id).report(0)).read_bytes())
    runner.stop.set()  # SIGTERM
    thread.join(60)  # in a worker the process ends here; the backlog must not be written
    assert saved.state == "stopped" and "grace period" in saved.error
    assert 2 <= saved.items_done == len(local_outputs(out)) < m.items
    assert [type(e) for e in ended] == [Stopped]


def test_the_job_keeps_the_worker_grace_below_the_pod_grace():
    from relit_k8s.kube.job import JobSettings, build_job

    m = plan(PlanSettings(input="s3://b/i", refs="s3://b/r", output="s3://b/o"), ["a.jpg"],
             ["r.hdr"])
    for pod_grace in (5, 30, 120, 600):
        job = build_job(m, "u", JobSettings(image="i", termination_grace_seconds=pod_grace))
        pod = job["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert 1 <= int(env["RELIT_STOP_GRACE"]) < pod["terminationGracePeriodSeconds"]


# --- 4. storage faults ---------------------------------------------------------------------------
@pytest.fixture
def proxy(s3_endpoint):
    p = FaultProxy(s3_endpoint, seed=1, reset=0.03, error500=0.03, slowdown=0.03, stall=0.004,
                   stall_seconds=1.5).start()
    yield p
    p.stop()


def faulty_env(proxy) -> dict:
    return {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "RELIT_S3_MAX_ATTEMPTS": "10",
            "RELIT_S3_READ_TIMEOUT": "1", "RELIT_S3_CONNECT_TIMEOUT": "1"}


def tiny_s3_dataset(client, bucket, n_refs=10) -> None:
    client.put_object(Bucket=bucket, Key="in/t.png", Body=png_bytes(photo(8, 8)))
    hdr = (EXAMPLES / "refs/sky_sun.hdr").read_bytes()
    for j in range(n_refs):
        client.put_object(Bucket=bucket, Key=f"refs/r{j:02d}.hdr", Body=hdr)


@pytest.mark.slow
def test_a_few_thousand_items_through_storage_faults_lose_and_duplicate_nothing(
        bucket, s3_client, proxy):
    tiny_s3_dataset(s3_client, bucket)
    m, uri = planned(f"s3://{bucket}/in", f"s3://{bucket}/refs", f"s3://{bucket}/out",
                     iterations=200, shards=2, batch_size=50)
    assert m.items == 2000
    for index in range(2):
        proc = subprocess.run([*WORKER, "--manifest", uri, "--index", str(index)],
                              env=faulty_env(proxy), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert all(proxy.counts[k] > 0 for k in ("reset", "500", "503", "stall")), proxy.counts
    outputs = s3_outputs(s3_client, bucket)
    assert set(outputs) == expected(m)
    assert all(outputs.values())
    def read(key):
        return s3_client.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read()
    reports = [report_of(read, m, i) for i in range(2)]
    assert all(r.state == "done" and r.items_failed == 0 for r in reports)
    assert sum(r.items_done + r.items_skipped for r in reports) == m.items


@pytest.mark.slow
def test_faults_that_outlast_the_retries_exit_75_and_a_rerun_completes(bucket, s3_client,
                                                                       proxy):
    tiny_s3_dataset(s3_client, bucket, n_refs=4)
    proxy.rates = dict.fromkeys(proxy.rates, 0.0)
    m, uri = planned(f"s3://{bucket}/in", f"s3://{bucket}/refs", f"s3://{bucket}/out",
                     iterations=20, shards=1, batch_size=10,
                     relighter="plugins_for_tests:PacedRelighter")
    env = {**faulty_env(proxy), "RELIT_S3_MAX_ATTEMPTS": "3", "PYTHONPATH": str(TESTS)}
    # half a second per batch of 10: S3 goes down while the shard is at work
    proc = subprocess.Popen([*WORKER, "--manifest", uri, "--index", "0"],
                            env={**env, "RELIT_TEST_PACE": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: s3_count(s3_client, bucket) >= 20, timeout=120)
    proxy.always = "503"  # S3 is down for longer than the retry budget
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_TEMPORARY, err[-3000:]
    assert "SlowDown" in err or "kept failing" in err
    proxy.always = None
    assert 20 <= s3_count(s3_client, bucket) < m.items == 80  # it stopped mid-shard
    rerun = subprocess.run([*WORKER, "--manifest", uri, "--index", "0"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]
    assert set(s3_outputs(s3_client, bucket)) == expected(m)


# --- 5. bad input, and input that must work ------------------------------------------------------
def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_bad_inputs_fail_with_reasons_and_odd_good_inputs_succeed(bucket, s3_client, tmp_path):
    base = Image.fromarray(photo(20, 30))
    exif = base.getexif()
    exif[0x0112] = 6
    ramp16 = Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    nan_exr = np.full((8, 16, 3), 2.0, np.float32)
    nan_exr[0, 0] = [np.nan, np.inf, -1]
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGB": nan_exr}).write(str(tmp_path / "nan.exr"))
    bad = {
        "truncated.jpg": _encoded(base, "JPEG")[:300],
        "empty.png": b"",
        "text.jpg": b"not an image at all\n" * 20,
        "bomb.png": bomb_png(100_000, 100_000),
    }
    good = {
        "gray.png": _encoded(base.convert("L"), "PNG"),
        "palette.png": _encoded(base.convert("P"), "PNG"),
        "rgba.png": _encoded(base.convert("RGBA"), "PNG"),
        "cmyk.jpg": _encoded(base.convert("CMYK"), "JPEG"),
        "sixteen.png": _encoded(ramp16, "PNG"),
        "rotated.jpg": _encoded(base, "JPEG", exif=exif),
        "nan.exr": (tmp_path / "nan.exr").read_bytes(),
        "with space é #1 %20 ?x +y.png": _encoded(base, "PNG"),
    }
    for name, data in {**bad, **good}.items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{name}", Body=data)
    hdr = (EXAMPLES / "refs/sky_sun.hdr").read_bytes()
    s3_client.put_object(Bucket=bucket, Key="refs/sky.hdr", Body=hdr)
    square = np.ones((32, 32, 3), np.float32)  # not 2:1: used as if it were equirectangular
    s3_client.put_object(Bucket=bucket, Key="refs/square.png",
                         Body=png_bytes((square * 200).astype(np.uint8)))
    m, uri = planned(f"s3://{bucket}/in", f"s3://{bucket}/refs", f"s3://{bucket}/out",
                     iterations=1, shards=1)
    proc = subprocess.run([*WORKER, "--manifest", uri, "--index", "0"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr
    def read(key):
        return s3_client.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read()
    report = report_of(read, m, 0)
    reasons = {f.image: f.error for f in report.failures}
    assert set(reasons) == set(bad)
    assert "truncated" in reasons["truncated.jpg"] and "empty" in reasons["empty.png"]
    assert "not a decodable image" in reasons["text.jpg"]
    assert "pixels" in reasons["bomb.png"] and report.failures[0].kind
    outputs = s3_outputs(s3_client, bucket)
    assert set(outputs) == expected(m, skip_images=set(bad))
    all_decode(outputs)
    rotated = next(v for k, v in outputs.items() if k.startswith("rotated.jpg_sky"))
    assert images.decode(rotated, "r.jpg").pixels.shape == (30, 20, 3)  # EXIF applied
    nan_out = next(v for k, v in outputs.items() if k.startswith("nan.exr_sky"))
    assert np.isfinite(images.decode(nan_out, "n.png").pixels).all()


# --- 6. path safety ------------------------------------------------------------------------------
def test_a_manifest_with_unsafe_keys_is_a_configuration_error(tmp_path):
    m, uri = planned(EXAMPLES / "images", EXAMPLES / "refs", tmp_path / "out")
    for evil in ("../../etc/passwd.png", "/abs/x.png", "a\\..\\b.png"):
        raw = json.loads(Path(uri).read_text())
        raw["images"][0] = evil
        raw.pop("checksum")
        body = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
        import hashlib

        raw["checksum"] = "sha256:" + hashlib.sha256(body).hexdigest()  # a forged, valid sum
        path = tmp_path / "evil.json"
        path.write_text(json.dumps(raw))
        proc = subprocess.run([*WORKER, "--manifest", str(path), "--index", "0"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == EXIT_CONFIG, proc.stderr
        assert "unsafe" in proc.stderr
    assert not (tmp_path / "etc").exists()


def test_unsafe_s3_keys_are_never_listed(moto_endpoint, monkeypatch):
    """A store may hold keys with ``..``, ``//`` or backslashes (AWS S3 does); a real server of
    the suite refuses to store ``..``, so this test plants them in moto's server (a mock that
    stores any key)."""
    import boto3

    from relit_k8s.storage import open_storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mock")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mock")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="unsafe-keys")
    for key in ("in/ok.png", "in/../escape.png", "in//double.png", "in/a\\b.png"):
        client.put_object(Bucket="unsafe-keys", Key=key, Body=b"x")
    assert open_storage("s3://unsafe-keys/in").list() == ["ok.png"]


# --- 7. secrets ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_planted_secret_appears_in_no_manifest_job_report_or_log(bucket, s3_client, s3_env,
                                                                   monkeypatch, tmp_path):
    from conftest import PLANTED
    from fake_apiserver import FakeApiServer

    secret = PLANTED.secret_key  # an identity of the suite's server: requests signed with it
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLANTED.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    flags = ["--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs", "--output",
             f"s3://{bucket}/out", "--iterations", "1", "--img-pattern", "r*"]
    texts = []
    for args in (["run", *flags, "--device", "cpu"],
                 ["run", *flags, "--device", "cpu", "--ref-pattern", "nope*"],
                 ["status", "--output", f"s3://{bucket}/out", "-o", "json"],
                 ["submit", *flags, "--image", "x", "--s3-endpoint", "http://minio:9000",
                  "--dry-run", "-o", "yaml"]):
        result = cli(*args)
        texts += [result.stdout, result.stderr]
    server = FakeApiServer().start()
    try:
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kc")))
        result = cli("submit", *flags, "--image", "x", "--s3-endpoint", "http://minio:9000",
                     "--shards", "2", check=True)
        texts += [result.stdout, result.stderr, json.dumps(list(server.jobs.values()))]
    finally:
        server.stop()
    meta = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket,
                                                       Prefix="out/_relit/")["Contents"]]
    assert any(k.endswith("manifest.json") for k in meta)
    assert any(k.endswith("job.json") for k in meta) and any("/shards/" in k for k in meta)
    for key in meta:
        texts.append(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode())
    from relit_k8s.storage import S3Settings

    texts.append(repr(S3Settings.from_env()))
    for text in texts:
        assert secret not in text


# --- 9. soak (short; `python tests/soak.py --long` by hand) --------------------------------------
@pytest.mark.slow
def test_soak_short(s3_endpoint, tmp_path):
    import soak

    result = soak.soak(s3_endpoint, images=16, refs=4, iterations=16, workers=4, kills=2,
                       fault_rate=0.04, seed=3)
    assert result["missing"] == 0 and result["unexpected"] == 0, result
    assert result["failed_items"] == result["bad_items"] > 0
    assert result["outputs"] == result["planned"] - result["bad_items"]
    assert result["kills"] >= 1 and result["attempts"] >= 1


def test_a_second_ctrl_c_stops_at_once_and_the_reports_say_stopped(tmp_path):
    """A batch that ignores the stop (ten minutes, grace far away): the second Ctrl+C kills the
    workers, and the runner itself records their shards as stopped, never running."""
    in_dir, refs_dir = one_image_dataset(tmp_path, size=(24, 32))
    out = tmp_path / "out"
    exe = str(Path(sys.executable).parent / "relit-k8s")
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RELIT_STOP_GRACE": "1000"}
    proc = subprocess.Popen(
        [exe, "run", "--input", str(in_dir), "--refs", str(refs_dir), "--output", str(out),
         "--iterations", "4", "--shards", "2", "--workers", "2", "--device", "cpu",
         "--relighter", "plugins_for_tests:SlowRelighter", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=as_terminal_foreground)
    reports = out / "_relit"
    wait_for(lambda: len(list(reports.glob("*/shards/*.json"))) == 2)
    time.sleep(1.0)  # inside the slow batches
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("stopping:") == 1 and "stopping now" in err
    for path in reports.glob("*/shards/*.json"):
        report = ShardReport.from_json(path.read_bytes())
        assert report.state == "stopped" and report.exit_code == EXIT_SIGTERM
        assert "ended before it saved" in report.error and report.finished_at is not None
    status = json.loads(subprocess.run([exe, "status", "--output", str(out), "-o", "json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert status["state"] == "stopped"

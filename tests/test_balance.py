"""Balance by leases (issue 15): worker processes claim shards from the output store, a killed
worker's shard is taken over once its lease expires, SIGTERM frees a shard at once, a worker
whose lease was taken while it was paused writes nothing more for that shard, two local runs
share one S3 output, and a store that ignores conditional writes falls back to static shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, cli, photo, png_bytes, upload_folder
from fault_proxy import FaultProxy

from relit_k8s.errors import EXIT_OK, EXIT_SIGTERM
from relit_k8s.manifest import Manifest, ShardReport, pair_seeds
from relit_k8s.planner import PlanSettings, list_sources, plan, write_manifest
from relit_k8s.run import RunPaths

WORKER = [sys.executable, "-m", "relit_k8s", "worker", "--device", "cpu"]


#: Workers relight with tests/plugins_for_tests.py's PacedRelighter at a quarter of a second
#: per batch of 4: a shard of 60 items takes about 4 s of waiting (not of work), long enough
#: to be caught mid-way (the tests act after 8 outputs).
PACED = {"PYTHONPATH": str(Path(__file__).parent), "RELIT_TEST_PACE": "0.25"}


def paced_dataset(tmp_path: Path, images: int = 1, iterations: int = 60, shards: int = 1,
                  **kw) -> tuple[Manifest, str, Path]:
    """Small photos and many iterations, relit at the pace of ``PACED``."""
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    for i in range(images):
        (tmp_path / "in" / f"photo{i}.png").write_bytes(png_bytes(photo(24, 32, seed=i)))
    (tmp_path / "refs" / "sky.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr").read_bytes())
    out = tmp_path / "out"
    s = PlanSettings(input=str(tmp_path / "in"), refs=str(tmp_path / "refs"), output=str(out),
                     iterations=iterations, shards=shards, batch_size=4, balance="leases",
                     relighter="plugins_for_tests:PacedRelighter", **kw)
    m, uri = write_manifest(plan(s, *list_sources(s)[:2]))
    assert m.balance == "leases" and m.shards == shards
    return m, uri, out


def expected(m: Manifest) -> set[str]:
    return {m.output_key(image, ref, seed) for image in m.images for ref in m.references
            for seed in pair_seeds(m.base_seed, image, ref, m.iterations)}


def written(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*")
            if p.is_file() and "_relit" not in p.parts}


def start_worker(uri: str, index: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen([*WORKER, "--manifest", uri, "--index", str(index)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **PACED, "RELIT_REPORT_INTERVAL": "0.2", **env})


def wait_for_outputs(out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(written(out)) < n:
        time.sleep(0.05)
    assert len(written(out)) >= n, f"{len(written(out))} outputs after {timeout} s"


def pause_outside_writes(proc: subprocess.Popen, out: Path) -> None:
    """SIGSTOP ``proc`` at a moment it holds no folder lock of the local store's replaces (a
    worker stopped inside one holds up every replace in that folder: test_storage.py's
    ``test_a_local_replace_waits_a_while...``); it is resumed and stopped again until then."""
    import fcntl

    def free(folder: Path) -> bool:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # and our lock with it

    for _ in range(200):
        proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "the worker did not stop"
            time.sleep(0.005)
        if all(free(d) for d in (out / "_relit").rglob("*") if d.is_dir()):
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker held a folder lock at every try")


def leases(out: Path, m: Manifest, folder: str = "leases") -> list[str]:
    """The lease folder's objects (the local store's hidden lock files and the published
    list of finished shards, ``finished.json``, left out); ``done``: the finished shards'
    markers."""
    path = out / RunPaths(m.run_id).prefix / folder
    return sorted((p.name for p in path.iterdir() if not p.name.startswith(".")
                   and p.name != "finished.json"),
                  key=lambda n: (len(n), n))


def finished(out: Path, m: Manifest, shards: int) -> bool:
    """Every shard marked finished, and no lease left behind."""
    return leases(out, m, "done") == [str(s) for s in range(shards)] and leases(out, m) == []


def test_two_workers_share_the_shards_and_every_output_is_written_once(tmp_path):
    m, uri, out = paced_dataset(tmp_path, images=2, iterations=16, shards=8)
    procs = [start_worker(uri, i, RELIT_WORKERS="2") for i in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [EXIT_OK, EXIT_OK], results
    assert written(out) == expected(m)
    assert finished(out, m, 8)
    reports = [ShardReport.from_json((out / RunPaths(m.run_id).report(s)).read_bytes())
               for s in range(m.shards)]
    assert {r.state for r in reports} == {"done"}
    assert sum(r.items_done for r in reports) == m.items  # no item relit twice
    for _, stderr in results:  # each says it is done with the run, having done some of it
        assert "every shard of run" in stderr


def test_a_killed_workers_shard_is_taken_over_when_its_lease_expires(tmp_path):
    m, uri, out = paced_dataset(tmp_path, iterations=60, shards=2)
    lease_env = {"RELIT_LEASE_SECONDS": "3", "RELIT_WORKERS": "2"}
    a = start_worker(uri, 0, **lease_env)
    wait_for_outputs(out, 8)
    a.kill()  # kill -9: no report saved, no lease released
    a.communicate()
    assert "0.json" in leases(out, m)
    time.sleep(3.5)  # its lease goes silent; status says who held it and that it is silent
    shown = cli("status", "--output", str(out), env=lease_env, check=True).stdout
    assert "held leases" in shown and f"/{a.pid}/" in shown, shown
    status = json.loads(cli("status", "--output", str(out), "-o", "json", env=lease_env,
                            check=True).stdout)
    holders = status["leases"]["holders"]
    assert [h["shard"] for h in holders] == [0] and f"/{a.pid}/" in holders[0]["owner"]
    assert holders[0]["silent"] and status["leases"]["silent"] == 1
    b = start_worker(uri, 1, **lease_env)
    _, stderr = b.communicate(timeout=300)
    assert b.returncode == EXIT_OK, stderr
    assert "took shard 0 from" in stderr  # its own shard first, then the dead worker's
    assert written(out) == expected(m)  # every output, each once (outputs are named by seed)
    # what the killed worker left half-written (a hidden temporary file, if the kill came
    # inside a write) was removed by the worker that took its shard over
    assert not [p for p in out.rglob(".*.tmp-*") if "_relit" not in p.parts]
    assert finished(out, m, 2)
    report = ShardReport.from_json((out / RunPaths(m.run_id).report(0)).read_bytes())
    assert report.state == "done" and report.attempt == 2 and report.items_skipped >= 8


def test_sigterm_frees_the_shard_at_once(tmp_path):
    m, uri, out = paced_dataset(tmp_path, iterations=60, shards=1)
    long_lease = {"RELIT_LEASE_SECONDS": "3600"}  # only a release lets another take it
    a = start_worker(uri, 0, **long_lease)
    wait_for_outputs(out, 8)
    a.send_signal(signal.SIGTERM)
    _, stderr = a.communicate(timeout=60)
    assert a.returncode == EXIT_SIGTERM, stderr
    assert leases(out, m) == ["0.free"]  # released, nothing finished
    report = ShardReport.from_json((out / RunPaths(m.run_id).report(0)).read_bytes())
    assert report.state == "stopped"
    b = start_worker(uri, 0, **long_lease)
    _, stderr = b.communicate(timeout=240)
    assert b.returncode == EXIT_OK, stderr
    assert written(out) == expected(m)


def test_a_paused_worker_whose_lease_was_taken_writes_no_more_reports(tmp_path):
    """The known failure of heartbeats: a worker paused past its lease (a stalled node, a
    stop-the-world pause) comes back after another took its shard over. Its heartbeat and
    report writes are conditional, so it learns it and leaves the thief's report alone."""
    m, uri, out = paced_dataset(tmp_path, iterations=60, shards=1)
    env = {"RELIT_LEASE_SECONDS": "2"}
    a = start_worker(uri, 0, **env)
    wait_for_outputs(out, 8)
    pause_outside_writes(a, out)
    try:
        time.sleep(2.5)  # a's lease is stale now
        b = start_worker(uri, 0, **env)
        _, b_err = b.communicate(timeout=300)
        assert b.returncode == EXIT_OK, b_err
        assert "took shard 0" in b_err
        key = out / RunPaths(m.run_id).report(0)
        final = key.read_bytes()
        assert ShardReport.from_json(final).state == "done"
    finally:
        a.send_signal(signal.SIGCONT)
    _, a_err = a.communicate(timeout=120)
    assert a.returncode == EXIT_OK, a_err  # every shard is finished: nothing left for it
    assert "was taken by another worker" in a_err
    assert key.read_bytes() == final  # b's final report stands
    assert written(out) == expected(m)


def test_two_local_runs_on_one_s3_output_write_every_output_once(bucket, s3_client, s3_env,
                                                                 tmp_path):
    """Claims live in the output store: two `relit-k8s run` on different machines (here, two
    processes) work on the same run together, each claiming what is left."""
    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    args = ["run", "--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs",
            "--output", f"s3://{bucket}/out", "--iterations", "4", "--device", "cpu",
            "--no-progress"]
    exe = Path(sys.executable).parent / "relit-k8s"
    procs = [subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    keys = [o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="out/") for o in page.get("Contents", [])]
    outputs = [k for k in keys if "/_relit/" not in k]
    assert len(outputs) == len(set(outputs)) == 4 * 3 * 4
    [run_id] = {k.split("/")[2] for k in keys if "/_relit/" in k and "manifest" in k}
    reports = [k for k in keys if f"_relit/{run_id}/shards/" in k]
    done = sum(ShardReport.from_json(s3_client.get_object(Bucket=bucket, Key=k)["Body"].read())
               .items_done for k in reports)
    assert done == 48  # each output relit by one of the two runs only
    both = " ".join(out for out, _ in results)
    assert "written" in both


@pytest.mark.parametrize("mode,headers", [("ignore", {"if-none-match", "if-match"}),
                                          ("ignore", {"if-match"}),
                                          ("501", {"if-none-match", "if-match"})])
def test_a_store_without_conditional_writes_gets_static_shards_or_a_clear_refusal(
        s3_endpoint, bucket, s3_client, tmp_path, mode, headers):
    """A store that ignores If-None-Match and If-Match, one that ignores only If-Match, and
    one that answers 501 NotImplemented: ``auto`` falls back to static shards with a warning
    that says what the store got wrong; ``--balance leases`` is refused (exit 78) naming the
    store and the fallback; ``static`` is quiet. The probe leaves no object behind."""
    from s3_servers import ACCESS_KEY, SECRET_KEY

    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    proxy = FaultProxy(s3_endpoint, credentials=(ACCESS_KEY, SECRET_KEY)).start()
    try:
        proxy.conditional, proxy.conditional_headers = mode, headers
        env = {"AWS_ENDPOINT_URL": proxy.url}
        args = ["plan", "--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs",
                "--output", f"s3://{bucket}/out", "--iterations", "2"]
        fallback = cli(*args, env=env, check=True)
        warning = " ".join(fallback.stderr.split())
        assert "does not do conditional writes" in warning and "--balance static" in warning
        assert ("not implemented" if mode == "501" else "If-Match") in warning
        forced = cli(*args, "--balance", "leases", env=env)
        refusal = " ".join(forced.stderr.split())
        assert forced.returncode == 78, forced.stderr
        assert "--balance leases needs conditional writes" in refusal
        assert f"s3://{bucket}/out" in refusal and "--balance static" in refusal
        quiet = cli(*args, "--balance", "static", env=env, check=True)
        assert "warning" not in quiet.stderr
        assert proxy.counts["conditional"] > 0  # the store's behaviour was met, not assumed
    finally:
        proxy.stop()
    manifests = [Manifest.from_json(s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"]
                                    .read())
                 for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/_relit/")
                 ["Contents"] if o["Key"].endswith("manifest.json")]
    assert sorted(m.balance for m in manifests) == ["static"]  # auto and static: one plan
    assert not [o for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/_relit/")
                ["Contents"] if "probe" in o["Key"]]


def test_a_worker_whose_store_stopped_doing_conditional_writes_exits_78(
        s3_endpoint, bucket, s3_client, tmp_path):
    """The plan chose leases against the real server; its worker then meets the store through
    a proxy that ignores conditional writes (another endpoint, a changed store): it checks
    before its first claim and stops with exit 78, claiming nothing, instead of letting two
    workers win one shard."""
    from s3_servers import ACCESS_KEY, SECRET_KEY

    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    planned = cli("plan", "--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs",
                  "--output", f"s3://{bucket}/out", "--iterations", "1", check=True)
    assert "warning" not in planned.stderr
    [key] = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/_relit/")
             ["Contents"] if o["Key"].endswith("manifest.json")]
    proxy = FaultProxy(s3_endpoint, credentials=(ACCESS_KEY, SECRET_KEY)).start()
    try:
        proxy.conditional = "ignore"
        done = subprocess.run([*WORKER, "--manifest", f"s3://{bucket}/{key}", "--index", "0"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "AWS_ENDPOINT_URL": proxy.url})
    finally:
        proxy.stop()
    assert done.returncode == 78, done.stderr
    assert "does not do the conditional writes leases need" in " ".join(done.stderr.split())
    assert not [o for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/_relit/")
                ["Contents"] if "/leases/" in o["Key"] or "probe" in o["Key"]]


def test_a_pod_with_two_slots_runs_two_workers_and_exits_with_the_most_serious_code(tmp_path):
    """A pod with 2 GPUs runs 2 workers, one per GPU (here CPU stand-ins: --device cpu
    --workers 2), each claiming as a worker of its own; each log line says whose it is."""
    m, uri, out = paced_dataset(tmp_path, images=2, iterations=16, shards=8)
    proc = subprocess.run([*WORKER, "--manifest", uri, "--workers", "2"], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, **PACED, "JOB_COMPLETION_INDEX": "1",
                               "RELIT_WORKERS": "3"})
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "2 workers here (cpu, cpu), indexes 2..3 of 6" in proc.stderr
    for who in ("[worker 0]", "[worker 1]"):  # both worked, and both say so
        assert any(who in line and "every shard of run" in line
                   for line in proc.stderr.splitlines()), proc.stderr
    assert written(out) == expected(m)
    assert finished(out, m, 8)

    from relit_k8s.local import LocalResult, pod_exit_code

    def code(*codes: int, interrupted: bool = False) -> int:
        return pod_exit_code(LocalResult(dict(enumerate(codes)), [], interrupted))

    # 78 before 75 before 143 before 1 before 0
    assert code(0, 1, 143, 75, 78) == 78 and code(0, 1, 143, 75) == 75
    assert code(1, 143) == 143 and code(0, 1) == 1 and code(0, 0) == 0
    assert code(0, interrupted=True) == 143


def test_the_fleet_benchmark_runs_and_loses_nothing(tmp_path):
    """benchmarks/fleet.py --smoke: the real claiming code against a SeaweedFS server process
    (a real S3 server: signatures and conditional writes checked), a few simulated workers
    (one killed mid-shard), pods that pay their starts; its ratios are measured by hand
    (benchmarks/README.md)."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "fleet.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "fleet.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["balance"]: r for r in result["rows"]}
    assert sorted(rows) == ["leases", "static"] and result["seeds"] == [1]
    for row in rows.values():
        assert row["units_lost"] == 0 and row["units"] == 4 * 64
        assert row["twice_without_steal"] == 0 and row["twice_not_identical"] == 0
        assert row["makespan_over_ideal"] > 0
        assert (row["workers"], row["scenario"], row["seed"]) == (4, "mixed", 1)
        assert row["pod_start_seconds"]["warm"] < row["pod_start_seconds"]["cold"]
    # static: a pod per index (16), and one more for the killed pod's index; leases: a pod per
    # worker and one replacement
    assert rows["static"]["shards_per_worker"] == 4 and rows["static"]["pods_started"] == 17
    assert rows["leases"]["pods_started"] == 5
    assert rows["leases"]["claims"] >= rows["leases"]["shards"] and rows["leases"]["steals"] >= 1
    [summary] = result["summary"]["scenarios"]
    assert summary["static_best_shards_per_worker"] == 4
    assert summary["leases_vs_static_best"] == "too few seeds"  # one seed: no verdict
    assert "makespan / ideal" in done.stdout


def test_a_local_worker_retries_only_temporary_failures_and_says_why_it_ended():
    import queue

    from relit_k8s.errors import EXIT_CONFIG, EXIT_TEMPORARY, ConfigError, Stopped
    from relit_k8s.errors import StorageUnavailable as Down
    from relit_k8s.local import LOCAL_ATTEMPTS, RETRY_DELAY, _ClaimEvents

    events: queue.Queue = queue.Queue()
    hooks = _ClaimEvents(3, events)
    hooks.begin(5)
    # a temporary failure frees the shard and claims again, later each time, a few times
    assert hooks.retry(5, Down("store down"), 1) == RETRY_DELAY
    assert hooks.retry(5, Down("store down"), 2) == 2 * RETRY_DELAY
    assert hooks.retry(5, Down("store down"), LOCAL_ATTEMPTS) is None
    assert hooks.retry(5, ConfigError("bad option"), 1) is None  # never retried
    hooks.ended(ConfigError("bad option"))
    got = [events.get_nowait() for _ in range(events.qsize())]
    assert got[0] == ("begin", 5, 3)
    assert got[-1] == ("shard", 5, EXIT_CONFIG, "ConfigError: bad option")
    # between shards (a claim that could not be made): the process's own failure, not a crash
    hooks = _ClaimEvents(3, events)
    hooks.begin(6)
    hooks.finished(6)
    hooks.ended(Down("store down"))
    got = [events.get_nowait() for _ in range(events.qsize())]
    assert got[-2:] == [("shard", 6, EXIT_OK, None),
                        ("fatal", 3, EXIT_TEMPORARY, "worker 3 stopped: StorageUnavailable: "
                         "store down")]
    hooks.ended(Stopped("stopped"))  # a stop between shards: nothing of its own to say
    assert events.empty()


@pytest.mark.parametrize("balance", ["leases", "static"])
def test_a_worker_killed_while_it_sends_to_its_parent_stops_no_other_worker(tmp_path, balance):
    """A worker killed (the OOM killer's SIGKILL) while it held the locks of the queues between
    it and its parent (the write lock of its events', the read lock of the one it is handed
    shards on): the other worker goes on (each has queues of its own; one shared by all hung
    the run for good: events with either balance, shard indexes with static balance), the
    dead worker's lease is freed at once, not taken over a lease time later, the run ends, and
    the same command finishes it."""
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"photo{i}.png").write_bytes(png_bytes(photo(24, 32, seed=i)))
    args = ["run", "--input", str(tmp_path / "in"), "--refs", str(EXAMPLES / "refs"),
            "--ref-pattern", "sky*", "--output", str(tmp_path / "out"), "--iterations", "8",
            "--shards", "4", "--workers", "2", "--device", "cpu", "--no-progress",
            "--balance", balance, "--relighter", "plugins_for_tests:DiesHoldingItsQueueLock"]
    # leases of an hour: a shard left to wait for its lease to lapse would outlast the
    # timeout below (freed by the parent, or taken at once as a dead process's of this host)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent),
           "RELIT_TEST_DIE_ONCE": str(tmp_path / "died"), "RELIT_LEASE_SECONDS": "3600"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "relit-k8s"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "died").exists()
    assert proc.returncode == 1 and "died with exit code -9" in stderr, stderr
    again = cli(*args, env=env, check=True)
    assert "failed 0, of 16" in again.stdout
    assert len(written(tmp_path / "out")) == 16

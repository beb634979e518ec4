"""The Kubernetes path: the Job builder, submit/status/logs/cancel/resume through the official
client (against FakeApiServer, the one mock of the suite), and the objects the kit ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import EXAMPLES, ROOT, _free_port, cli, upload_folder
from fake_apiserver import FakeApiServer

from relit_k8s.errors import ConfigError
from relit_k8s.kube.job import JobSettings, build_job, parse_toleration
from relit_k8s.manifest import Manifest
from relit_k8s.planner import PlanSettings, plan
from relit_k8s.status import JOB_ENDED

#: Oldest and newest Kubernetes versions relit-k8s supports (README, "Kubernetes").
K8S_VERSIONS = ["1.31.0", "1.37.0"]


def validate_strict(obj: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def manifest(shards: int = 6, balance: str = "static") -> Manifest:
    s = PlanSettings(input="s3://b/in", refs="s3://b/refs", output="s3://b/out", iterations=4,
                     shards=shards, balance=balance)
    return plan(s, [f"i{i}.jpg" for i in range(5)], ["r.hdr", "q.exr"])


GPU = JobSettings(image="registry.example/relit-k8s:0.1.0", namespace="relit", parallelism=4,
                  s3_endpoint="http://minio:9000", s3_region="us-east-1",
                  node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                  priority_class="batch-low", queue="team-a")
CPU = JobSettings(image="relit-k8s:dev-cpu", gpus_per_pod=0, cpu="500m", memory="2Gi",
                  image_pull_policy="Never")


@pytest.mark.parametrize("settings", [GPU, CPU], ids=["gpu", "cpu"])
def test_jobs_validate_strictly_against_oldest_and_newest_kubernetes(settings):
    validate_strict(build_job(manifest(), "s3://b/out/_relit/x/manifest.json", settings))


def test_the_job_is_an_indexed_job_with_the_failure_policy():
    m = manifest()
    job = build_job(m, "s3://b/out/m.json", GPU)
    spec = job["spec"]
    assert job["metadata"]["name"] == m.run_id
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == m.shards == 6 and spec["parallelism"] == 4
    assert spec["backoffLimitPerIndex"] == 3 and 1 <= spec["maxFailedIndexes"] <= 6
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In",
                                                 "values": [78]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                     "status": "True"}]} in rules
    assert any(r["action"] == "Count" and r["onExitCodes"]["values"] == [75] for r in rules)
    assert spec["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    labels = job["metadata"]["labels"]
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by", "relit-k8s/run-id"):
        assert key in labels and key in spec["template"]["metadata"]["labels"]
    assert job["metadata"]["annotations"]["relit-k8s/manifest"] == "s3://b/out/m.json"
    # leases: one index per worker (completions = parallelism, so scale can change both), each
    # told how many workers there are (the claim order of worker i: i, i+W, ... first)
    m = manifest(shards=20, balance="leases")
    spec = build_job(m, "s3://b/out/m.json", GPU)["spec"]
    assert spec["completions"] == spec["parallelism"] == 4 and m.shards == 20
    assert 1 <= spec["maxFailedIndexes"] <= 4
    [env] = [c["env"] for c in spec["template"]["spec"]["containers"]]
    assert {"name": "RELIT_WORKERS", "value": "4"} in env
    few = manifest(shards=2, balance="leases")  # never more workers than shards
    assert build_job(few, "s3://b/out/m.json", GPU)["spec"]["completions"] == 2
    validate_strict(build_job(m, "s3://b/out/m.json", GPU))
    # Kueue: the queue label, and created suspended for Kueue to admit
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and spec["suspend"] is True
    assert "suspend" not in build_job(m, "u", CPU)["spec"]


def test_the_container_runs_the_worker_with_the_manifest_and_s3_settings():
    job = build_job(manifest(), "s3://b/out/m.json", GPU)
    pod = job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["command"] == ["relit-k8s"] and c["args"] == ["worker"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RELIT_MANIFEST"]["value"] == "s3://b/out/m.json"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "relit-s3", "key": key}
        assert "value" not in env[key]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["priorityClassName"] == "batch-low"
    cpu_pod = build_job(manifest(), "u", CPU)["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu_pod
    # a pod that requests no GPU sees none, even where the NVIDIA runtime is the default
    cpu_env = {e["name"]: e.get("value") for e in cpu_pod["containers"][0]["env"]}
    assert cpu_env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "NVIDIA_VISIBLE_DEVICES" not in env  # GPU pods: the device plugin decides
    no_secret = build_job(manifest(), "u", CPU.model_copy(update={"s3_secret": None}))
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in
                   no_secret["spec"]["template"]["spec"]["containers"][0]["env"])


def test_pods_are_hardened_and_use_no_host_paths_unless_asked():
    for settings in (GPU, CPU):
        pod = build_job(manifest(), "u", settings)["spec"]["template"]["spec"]
        sc = pod["containers"][0]["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert not any("hostPath" in v for v in pod["volumes"])
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts == {"/tmp", "/cache", "/dev/shm"}
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert "initContainers" not in pod  # only the host cache needs one
    asked = build_job(manifest(), "u", CPU.model_copy(update={"cache_host_path": "/var/relit"}))
    vols = asked["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-cache", "hostPath": {"path": "/var/relit",
                                                "type": "DirectoryOrCreate"}} in vols


def test_a_host_cache_gets_an_init_container_that_makes_it_writable_for_the_worker(tmp_path):
    """The kubelet creates a missing hostPath directory root-owned, 0755, and fsGroup does not
    apply to hostPath: an init container (root, CHOWN and FOWNER only) hands the directory to
    the worker's uid, or with --no-fixed-ids makes it sticky and world-writable. Running it is
    tested in test_image.py; here its fields, against the schemas."""
    for fixed, command in ((True, "chown 10001:10001 /cache && chmod 0775 /cache"),
                           (False, "chmod 1777 /cache")):
        job = build_job(manifest(), "u", GPU.model_copy(update={
            "cache_host_path": "/var/relit", "fixed_ids": fixed}))
        validate_strict(job)
        pod = job["spec"]["template"]["spec"]
        [init] = pod["initContainers"]
        assert init["image"] == pod["containers"][0]["image"]  # no second image to pull
        assert init["command"] == ["sh", "-c", command]
        assert init["volumeMounts"] == [{"name": "model-cache", "mountPath": "/cache"}]
        sc = init["securityContext"]
        assert (sc["runAsUser"], sc["runAsNonRoot"], sc["allowPrivilegeEscalation"]) == (
            0, False, False)
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    # the worker fails closed (78) on a cache it cannot write, before it loads anything
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("worker", "--manifest", str(tmp_path / "none.json"), "--index", "0",
                 env={"XDG_CACHE_HOME": str(blocker / "cache")})
    said = " ".join(result.stderr.split())
    assert result.returncode == 78, result.stderr
    assert f"the model cache {blocker / 'cache'} (XDG_CACHE_HOME) is not writable" in said
    assert "install -d -o 10001 -g 10001 DIR" in said and "Traceback" not in result.stderr


@pytest.mark.kube_client
def test_the_official_client_keeps_every_field_of_the_job():
    """The Job goes to the client as a plain dict (V1Job.from_dict exists only from client 37
    on), which every supported client version sends as it is."""
    from kubernetes.client import ApiClient

    job = build_job(manifest(), "s3://b/out/m.json", GPU)
    assert ApiClient().sanitize_for_serialization(job) == job


def test_tolerations_and_settings_are_checked():
    assert parse_toleration("gpu") == {"key": "gpu", "operator": "Exists"}
    assert parse_toleration("dedicated=ml:NoSchedule") == {
        "key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    with pytest.raises(Exception, match="toleration"):
        parse_toleration("x:Sometimes")
    with pytest.raises(ValueError, match="quantity"):
        JobSettings(image="i", memory="lots")


# --- the CLI against S3 (SeaweedFS) and the fake API server --------------------------------------
@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    server = FakeApiServer().start()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    server.stop()


@pytest.fixture
def s3_data(bucket, s3_client):
    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    upload_folder(s3_client, EXAMPLES / "refs", bucket, "refs")
    return bucket


#: The S3 endpoint as the pods would see it (this machine's SeaweedFS server is 127.0.0.1 to us).
POD_ENDPOINT = "http://minio.relit.svc:9000"


def submit_args(bucket: str, *extra: str) -> list[str]:
    return ["submit", "--input", f"s3://{bucket}/in", "--refs", f"s3://{bucket}/refs",
            "--output", f"s3://{bucket}/out", "--iterations", "2", "--image",
            "relit-k8s:test", "--s3-endpoint", POD_ENDPOINT, *extra]


def test_job_states_since_1_29_show_the_windows_before_complete_and_failed():
    """The controller sets SuccessCriteriaMet / FailureTarget first and Complete / Failed only
    once the pods are gone: status shows completing / failing, with the terminating pods."""
    from relit_k8s.kube.runs import job_summary

    def job(*conditions: str, **status) -> dict:
        return {"metadata": {"name": "relit-x", "namespace": "relit"}, "spec": {},
                "status": {"conditions": [{"type": c, "status": "True"} for c in conditions],
                           **status}}

    assert job_summary(job()).state == "running"
    completing = job_summary(job("SuccessCriteriaMet", terminating=2, succeeded=6))
    assert completing.state == "completing" and completing.terminating == 2
    assert job_summary(job("SuccessCriteriaMet", "Complete")).state == "complete"
    failing = job_summary(job("FailureTarget", terminating=1))
    assert failing.state == "failing" and failing.terminating == 1
    assert job_summary(job("FailureTarget", "Failed")).state == "failed"
    assert job_summary(job()).terminating == 0  # the field is absent before 1.28
    # status --watch keeps waiting through those windows: the Job has not ended
    for state, going in (("completing", True), ("failing", True), ("complete", False),
                         ("failed", False)):
        assert (state not in JOB_ENDED) is going


def test_a_loopback_s3_endpoint_is_refused_unless_given_for_the_pods(monkeypatch):
    from relit_k8s.kube.job import JobSettings

    for url in ("http://127.0.0.1:9000", "http://localhost:9000", "https://[::1]:9000",
                "http://0.0.0.0:9000", "http://minio.localhost"):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        with pytest.raises(ConfigError, match="loopback address that pods cannot reach.*"
                           "--s3-endpoint"):
            JobSettings.from_flags(image="i")
        assert JobSettings.from_flags(image="i", s3_endpoint=url).s3_endpoint == url
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.relit.svc:9000")
    assert JobSettings.from_flags(image="i").s3_endpoint == "http://minio.relit.svc:9000"


def test_submit_dry_run_prints_valid_objects_and_touches_nothing(s3_data, s3_client,
                                                                 monkeypatch, tmp_path):
    from conftest import PLANTED

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    # an identity of the suite's server whose secret must appear in nothing printed
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLANTED.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED.secret_key)
    for extra in ([], ["--gpus-per-pod", "0", "--parallelism", "2", "--cpu", "500m"]):
        result = cli(*submit_args(s3_data, "--parallelism", "8", "--dry-run", "-o", "yaml",
                                  *extra), check=True)
        [job] = list(yaml.safe_load_all(result.stdout))
        validate_strict(job)
        assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
        assert PLANTED.secret_key not in result.stdout + result.stderr
    # (submit plans without torch, as plan does: tests/test_cli.py)
    as_json = json.loads(cli(*submit_args(s3_data, "--dry-run", "-o", "json"),
                             without_torch=True, check=True).stdout)
    validate_strict(as_json)
    listing = s3_client.list_objects_v2(Bucket=s3_data, Prefix="out/")
    assert listing.get("KeyCount", 0) == 0, "a dry run wrote to storage"
    summary = cli(*submit_args(s3_data, "--dry-run"), check=True).stdout
    assert "Job" in summary and "indexes" in summary and "outputs" in summary


def test_submit_refuses_local_paths(tmp_path):
    result = cli("submit", "--input", str(EXAMPLES / "images"), "--refs",
                 str(EXAMPLES / "refs"), "--output", str(tmp_path / "o"), "--image", "x",
                 "--dry-run")
    assert result.returncode == 78 and "pods cannot read local paths" in result.stderr


@pytest.mark.slow
def test_submit_creates_the_job_and_status_logs_cancel_follow_it(s3_data, s3_client, fake_api):
    result = cli(*submit_args(s3_data, "--parallelism", "3"), check=True)
    [(ns, name)] = list(fake_api.jobs)
    assert ns == "relit"  # the kubeconfig context's namespace
    assert f"run {name}: Job {name} created in namespace relit" in result.stdout
    assert f"kubectl -n relit get jobs,pods -l relit-k8s/run-id={name}" in result.stdout
    dry, post = [r for r in fake_api.requests if r["method"] == "POST"]
    assert dry["query"].get("dryRun") == "All" and "dryRun" not in post["query"]
    assert post["path"] == dry["path"] == "/apis/batch/v1/namespaces/relit/jobs"
    assert dry["body"]["spec"] == post["body"]["spec"]  # the Job checked is the Job created
    sent = post["body"]
    validate_strict(sent)
    manifest_key = f"out/_relit/{name}/manifest.json"
    assert sent["metadata"]["annotations"]["relit-k8s/manifest"] == \
        f"s3://{s3_data}/{manifest_key}"
    stored = Manifest.from_json(s3_client.get_object(Bucket=s3_data, Key=manifest_key)["Body"]
                                .read())
    # leases (the server honours conditional writes): one index per worker, each claiming shards
    assert stored.balance == "leases" and stored.shards == 24  # 16 x 3 asked; 24 units
    assert sent["spec"]["completions"] == sent["spec"]["parallelism"] == 3
    [env] = [c["env"] for c in sent["spec"]["template"]["spec"]["containers"]]
    assert {"name": "RELIT_WORKERS", "value": "3"} in env
    assert "3 workers claiming 24 shards" in " ".join(result.stdout.split())
    record = json.loads(s3_client.get_object(
        Bucket=s3_data, Key=f"out/_relit/{name}/job.json")["Body"].read())
    assert record["namespace"] == "relit" and record["job"] == name

    # status: the Job's state next to the (still empty) shard reports
    fake_api.jobs[(ns, name)]["status"] = {
        "active": 2, "succeeded": 1, "failed": 1, "completedIndexes": "0",
        "failedIndexes": "3", "startTime": "2026-11-27T10:00:00Z"}
    status = json.loads(cli("status", name, "--output", f"s3://{s3_data}/out", "-o", "json",
                            check=True).stdout)
    assert status["job"]["state"] == "running" and status["job"]["active"] == 2
    assert status["job"]["completed_indexes"] == "0" and status["job"]["failed_indexes"] == "3"
    assert status["state"] == "pending" and len(status["shards"]) == stored.shards
    fake_api.jobs[(ns, name)]["status"]["conditions"] = [
        {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]
    table = cli("status", name, "--output", f"s3://{s3_data}/out", check=True).stdout
    assert f"job {name}: complete" in table

    # logs: the newest attempt of each index, prefixed by the index
    fake_api.add_pod(name, 0, f"{name}-0-aaaaa", "2026-11-27T10:00:00Z", "old attempt\n")
    fake_api.add_pod(name, 0, f"{name}-0-bbbbb", "2026-11-27T10:05:00Z", "new 0\nline 2\n")
    fake_api.add_pod(name, 1, f"{name}-1-ccccc", "2026-11-27T10:00:00Z", "shard 1\n")
    fake_api.add_pod("other-run", 0, "other-0-x", "2026-11-27T10:00:00Z", "not ours\n")
    logs = cli("logs", name, "--output", f"s3://{s3_data}/out", check=True).stdout
    assert logs.splitlines() == ["[0] new 0", "[0] line 2", "[1] shard 1"]
    one = cli("logs", name, "--namespace", "relit", "--index", "1", check=True).stdout
    assert one.splitlines() == ["shard 1"]
    selectors = [r["query"].get("labelSelector") for r in fake_api.requests
                 if r["path"].endswith("/pods")]
    assert f"relit-k8s/run-id={name},batch.kubernetes.io/job-completion-index=1" in selectors
    every = cli("logs", name, "--namespace", "relit", "--all-attempts", check=True).stdout
    assert "[0] old attempt" in every

    # scale: an elastic Indexed Job, parallelism and completions together (a merge patch)
    del fake_api.jobs[(ns, name)]["status"]["conditions"]
    scaled = cli("scale", name, "--parallelism", "5", "--output", f"s3://{s3_data}/out",
                 check=True)
    assert "3 -> 5 workers" in " ".join(scaled.stdout.split())
    [patch] = [r for r in fake_api.requests if r["method"] == "PATCH"]
    assert patch["path"] == f"/apis/batch/v1/namespaces/relit/jobs/{name}"
    assert patch["body"] == {"spec": {"parallelism": 5, "completions": 5}}
    assert "merge-patch" in patch["content_type"]
    spec = fake_api.jobs[(ns, name)]["spec"]
    assert spec["parallelism"] == spec["completions"] == 5
    status = json.loads(cli("status", name, "--output", f"s3://{s3_data}/out", "-o", "json",
                            check=True).stdout)
    assert status["job"]["parallelism"] == status["job"]["completions"] == 5
    cli("scale", name, "--parallelism", "2", "--namespace", "relit", check=True)
    assert spec["parallelism"] == spec["completions"] == 2
    fake_api.jobs[(ns, name)]["status"]["conditions"] = [
        {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]
    ended = cli("scale", name, "--parallelism", "4", "--namespace", "relit")
    assert ended.returncode == 78 and "has ended (Complete)" in ended.stderr

    # a second submit of the same plan: the Job exists
    again = cli(*submit_args(s3_data, "--parallelism", "3"))
    assert again.returncode == 78 and "already exists" in again.stderr

    # cancel: background propagation
    cli("cancel", name, "--output", f"s3://{s3_data}/out", check=True)
    [delete] = [r for r in fake_api.requests if r["method"] == "DELETE"]
    assert delete["path"] == f"/apis/batch/v1/namespaces/relit/jobs/{name}"
    propagation = (delete["body"] or {}).get("propagationPolicy") or \
        delete["query"].get("propagationPolicy")
    assert propagation == "Background"
    gone = json.loads(cli("status", name, "--output", f"s3://{s3_data}/out", "-o", "json",
                          check=True).stdout)
    assert gone["job"]["state"] == "gone"


@pytest.mark.slow
def test_cluster_errors_are_clear(s3_data, s3_client, fake_api, tmp_path, monkeypatch):
    def written() -> list[str]:
        listing = s3_client.list_objects_v2(Bucket=s3_data, Prefix="out/_relit/")
        return [o["Key"] for o in listing.get("Contents", [])]

    missing_ns = cli(*submit_args(s3_data, "--namespace", "nope"))
    assert missing_ns.returncode == 78 and "namespace 'nope' does not exist" in missing_ns.stderr
    fake_api.forbidden = True
    denied = cli(*submit_args(s3_data))
    assert denied.returncode == 78 and "forbidden" in denied.stderr
    assert "manifests/base" in denied.stderr
    fake_api.forbidden = False
    assert written() == []  # refused by the API server's dry run: nothing half-done
    fake_api.refuse_next_create = True  # passes the dry run, refused when created for real
    late = cli(*submit_args(s3_data))
    text = " ".join(late.stderr.split())
    assert late.returncode == 78 and "exceeded quota" in text
    assert "the manifest is written at s3://" in text and "the same command submits it" in text
    assert cli(*submit_args(s3_data)).returncode == 0  # ... and it does
    assert len(fake_api.jobs) == 1
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    no_config = cli(*submit_args(s3_data))
    assert no_config.returncode == 78 and "Kubernetes configuration" in no_config.stderr
    dead = FakeApiServer()
    dead._server.server_close()  # a port nobody answers on
    config = yaml.safe_load(fake_api.write_kubeconfig(tmp_path / "k").read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{_free_port()}"
    (tmp_path / "dead").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "dead"))
    unreachable = cli(*submit_args(s3_data))
    assert unreachable.returncode == 75 and "unreachable" in unreachable.stderr


def test_resume_submits_a_job_over_only_the_missing_units(s3_data, s3_client, fake_api):
    from relit_k8s.kube.runs import read_submission
    from relit_k8s.run import Run
    from relit_k8s.worker import ShardRunner

    cli(*submit_args(s3_data, "--parallelism", "2", "--shards", "4"), check=True)
    [(_, name)] = list(fake_api.jobs)
    m = Run.load(f"s3://{s3_data}/out", name).manifest
    # pods ran shards 0 and 2 only (here, in-process, against the same S3)
    runner = ShardRunner(m, device="cpu")
    runner.run(0)
    runner.run(2)
    result = cli("resume", name, "--output", f"s3://{s3_data}/out", check=True)
    new_jobs = [key for key in fake_api.jobs if key[1] != name]
    [(_, resumed_name)] = new_jobs
    assert resumed_name == f"{name}-r1" and f"new run {resumed_name}" in result.stdout
    resumed = Run.load(f"s3://{s3_data}/out", resumed_name).manifest
    assert resumed.resumed_from == name
    done_units = {u for i in (0, 2) for u in m.shard_range(i)}
    assert resumed.units == m.units - len(done_units)
    todo = [resumed.shard_units(i) for i in range(resumed.shards)]
    assert [u for shard in todo for u in shard] == [
        m.unit(u) for u in range(m.units) if u not in done_units]
    job = fake_api.jobs[("relit", resumed_name)]
    # the resumed run balances as its run did (leases): 2 workers claim its shards
    assert resumed.balance == m.balance == "leases" and resumed.shards == resumed.units == 6
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert read_submission(Run.of(resumed)).settings.image == "relit-k8s:test"
    validate_strict(job)


def test_resume_locally_finishes_a_run(tmp_path):
    out = tmp_path / "out"
    cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
        "--output", str(out), "--iterations", "2", "--device", "cpu", "--no-progress",
        "--balance", "static", check=True)  # 4 shards: units are whole pairs
    files = sorted(p for p in out.rglob("*") if p.is_file() and "_relit" not in p.parts)
    for p in files[::5]:
        p.unlink()
    run_id = json.loads(cli("status", "--output", str(out), "-o", "json",
                            check=True).stdout)["run_id"]
    result = cli("resume", run_id, "--output", str(out), "--device", "cpu", "--no-progress",
                 check=True)
    # units are whole pairs here: the other iteration of each pair is skipped, not redone
    deleted = len(files[::5])
    assert f"written {deleted}, skipped {deleted}" in result.stdout
    assert sorted(p for p in out.rglob("*") if p.is_file() and "_relit" not in p.parts) == files
    assert "nothing to resume" in cli("resume", run_id, "--output", str(out),
                                      check=True).stdout


# --- shipped objects: kustomize, Dockerfile, scripts ---------------------------------------------
def _need(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
        pytest.skip(f"{tool} is not installed here")
    return path


@pytest.mark.parametrize("folder", ["base", "dev"])
def test_kustomize_builds_and_every_object_validates(folder):
    kubectl = _need("kubectl")
    result = subprocess.run([kubectl, "kustomize", str(ROOT / "manifests" / folder)],
                            capture_output=True, text=True, check=True)
    assert "warning" not in result.stderr.lower(), result.stderr  # current fields only
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    secrets = [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]
    if folder == "base":
        # re-applying the base never overwrites the user's credentials with placeholders
        assert secrets == []
    else:
        assert {"Deployment", "Service", "PersistentVolumeClaim", "Job"} <= kinds
        assert "relit-s3" in secrets
    for obj in objects:
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == \
            "relit-k8s" or obj["kind"] != "Role", obj["metadata"]
    for obj in objects:
        validate_strict(obj)
    role = next(o for o in objects if o["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"],
         "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},  # FailedCreate
    ]


def test_the_example_secret_is_a_valid_secret_outside_the_base():
    secret = yaml.safe_load((ROOT / "manifests/examples/s3-secret.yaml").read_text())
    validate_strict(secret)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "relit-s3"
    base = yaml.safe_load((ROOT / "manifests/base/kustomization.yaml").read_text())
    assert not [r for r in base["resources"] if "secret" in r]


def test_the_kind_cluster_config_parses():
    config = yaml.safe_load((ROOT / "manifests/dev/kind.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run([_need("hadolint"), str(ROOT / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["relit-k8s"]' in text and "USER 10001" in text
    assert "BASE_IMAGE" in text and "TORCH_INDEX_URL" in text


def test_shellcheck_passes_on_the_scripts():
    scripts = [str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.sh")] + [".ci/run"]
    result = subprocess.run([_need("shellcheck"), "-x", *scripts], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


def test_plan_then_submit_dry_run_with_the_same_flags_is_the_same_run(s3_data, fake_api):
    # the documented path: relit-k8s plan <flags>; relit-k8s submit <flags> --dry-run -o yaml
    # | kubectl apply -f -. Without --shards the two must still agree on the run.
    flags = submit_args(s3_data)[1:]  # the selection flags and --image, without "submit"
    selection = [f for f in flags if f not in ("--image", "relit-k8s:test", "--s3-endpoint",
                                               POD_ENDPOINT)]
    planned = cli("plan", *selection, check=True)
    manifest_uri = next(line.split(": ", 1)[1] for line in planned.stdout.splitlines()
                        if line.startswith("manifest: "))
    [job] = list(yaml.safe_load_all(cli("submit", *flags, "--dry-run", "-o", "yaml",
                                        check=True).stdout))
    assert job["metadata"]["annotations"]["relit-k8s/manifest"] == manifest_uri
    run_id = manifest_uri.split("/")[-2]
    assert job["metadata"]["name"] == run_id
    # and submitting it for real continues the planned run (same manifest, no conflict)
    cli("submit", *flags, check=True)
    assert ("relit", run_id) in fake_api.jobs


# --- pods that do not start, logs, kubectl (issue 13, items 2, 4, 7, 9) ---------------------------
def running_job(fake_api, name: str = "relit-logs") -> str:
    fake_api.jobs[("relit", name)] = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": "relit", "uid": f"uid-{name}"},
        "spec": {"completions": 4, "parallelism": 4, "completionMode": "Indexed",
                 "template": {"spec": {"restartPolicy": "Never", "containers": [
                     {"name": "worker", "image": "relit-k8s:test"}]}}},
        "status": {"active": 4}}
    return name


def test_logs_show_why_a_pod_has_not_started_and_one_pod_never_ends_the_command(fake_api):
    name = running_job(fake_api)
    fake_api.add_pod(name, 0, f"{name}-0-a", "2026-11-27T10:00:00Z", "started 0\n")
    fake_api.add_pod(name, 1, f"{name}-1-a", "2026-11-27T10:00:00Z", "", waiting="ImagePullBackOff",
                     message='Back-off pulling image "relit-k8s:tpyo"')
    fake_api.add_pod(name, 2, f"{name}-2-a", "2026-11-27T10:00:00Z", "",
                     waiting="CreateContainerConfigError", message='secret "relit-s3" not found')
    fake_api.add_pod(name, 3, f"{name}-3-a", "2026-11-27T10:00:00Z", "", waiting="Unschedulable",
                     message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    result = cli("logs", name, "--namespace", "relit", check=True)
    assert result.stdout.splitlines() == ["[0] started 0"]  # stdout holds log lines only
    err = " ".join(result.stderr.split())
    assert f"[1] pod {name}-1-a has not started: ImagePullBackOff: Back-off pulling image" in err
    assert "--image-pull-secret" in err
    assert "[2]" in err and 'secret "relit-s3" not found' in err and "--s3-secret" in err
    assert "[3]" in err and "Unschedulable" in err and "Insufficient nvidia.com/gpu" in err

    # a pod that ended without ever running (evicted before its container started): said once,
    # also by -f, which must not wait for it
    fake_api.add_pod(name, 5, f"{name}-5-a", "2026-11-27T10:00:00Z", "",
                     waiting="ContainerCreating")
    fake_api.pod(f"{name}-5-a")["status"]["phase"] = "Failed"
    fake_api.jobs[("relit", name)]["status"]["conditions"] = [
        {"type": "Failed", "status": "True"}]
    followed = cli("logs", name, "--namespace", "relit", "--follow", "--index", "5",
                   timeout=60)
    assert followed.returncode == 0 and "ended without a log" in followed.stderr
    fake_api.jobs[("relit", name)]["status"].pop("conditions")

    # a pod that is running for the API server but whose log cannot be read (here: the kubelet
    # no longer has it) is reported, the others still show, and the exit code says so
    fake_api.add_pod(name, 4, f"{name}-4-a", "2026-11-27T10:00:00Z", "")
    del fake_api.logs[f"{name}-4-a"]
    broken = cli("logs", name, "--namespace", "relit")
    assert broken.returncode != 0 and broken.stdout.splitlines() == ["[0] started 0"]
    assert "[5] pod" in broken.stderr  # the ended pod is said, not an error
    assert f"cannot read the log of pod {name}-4-a" in " ".join(broken.stderr.split())


def test_logs_follow_waits_for_pods_to_start_and_for_new_pods_until_the_job_ends(fake_api):
    import threading
    import time

    from relit_k8s.kube.cluster import Cluster
    from relit_k8s.kube.pods import stream_logs

    name = running_job(fake_api)
    fake_api.add_pod(name, 0, f"{name}-0-a", "2026-11-27T10:00:00Z", "zero\n")
    fake_api.add_pod(name, 1, f"{name}-1-a", "2026-11-27T10:00:00Z", "one\n",
                     waiting="ContainerCreating")
    lines: list[str] = []
    notes: list[str] = []
    errors: list = []
    follow = threading.Thread(target=lambda: errors.extend(stream_logs(
        Cluster(namespace="relit"), name, lines.append, follow=True, note=notes.append,
        poll=0.05)))
    follow.start()

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 120  # generous: a loaded CI machine is slow to start
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        wait_until(lambda: notes and "[0] zero" in lines)
        time.sleep(0.3)  # several polls while the pod waits: announced once
        assert follow.is_alive() and "[0] zero" in lines and "[1] one" not in lines
        fake_api.start_pod(f"{name}-1-a")
        # index 2 gets its pod later (parallelism below completions), and it starts at once
        fake_api.add_pod(name, 2, f"{name}-2-a", "2026-11-27T10:01:00Z", "two\n")
        wait_until(lambda: len(lines) >= 3)
        assert follow.is_alive()  # the Job runs: more pods may come
    finally:  # the pods and the Job end, and with them the follow (also on a failed assert)
        for i in range(3):
            fake_api.finish_pod(f"{name}-{i}-a")
        fake_api.jobs[("relit", name)]["status"]["conditions"] = [
            {"type": "Complete", "status": "True"}]
        follow.join(60)
    assert not follow.is_alive(), "logs --follow did not end with the Job"
    assert sorted(lines) == ["[0] zero", "[1] one", "[2] two"] and errors == []
    assert notes == [f"[1] pod {name}-1-a has not started: ContainerCreating; waiting for it"]
    # one listing, then watches: no listing and no read per pod, whatever their number
    pod_requests = [r for r in fake_api.requests if "/pods" in r["path"]
                    and not r["path"].endswith("/log")]
    assert sum(r["query"].get("watch", "").lower() != "true" for r in pod_requests) == 1
    assert all(r["path"].endswith("/pods") for r in pod_requests)


def test_logs_follow_streams_a_bounded_number_of_logs_and_the_rest_as_they_end(fake_api):
    """At 500 pods one stream per pod is the API server's problem: --max-streams logs are open
    at once, the other pods' logs follow as those pods end; a pod deleted before it started
    is said once."""
    import threading
    import time

    from relit_k8s.kube.cluster import Cluster
    from relit_k8s.kube.pods import stream_logs

    name = running_job(fake_api)
    for i in range(12):
        fake_api.add_pod(name, i, f"{name}-{i}-a", "2026-11-27T10:00:00Z", f"log {i}\n")
    fake_api.add_pod(name, 12, f"{name}-12-a", "2026-11-27T10:00:00Z", "",
                     waiting="Unschedulable", message="0/3 nodes are available")
    lines: list[str] = []
    notes: list[str] = []
    follow = threading.Thread(target=lambda: stream_logs(
        Cluster(namespace="relit"), name, lines.append, follow=True, note=notes.append,
        poll=0.05, max_streams=3))
    follow.start()

    def wait_until(condition) -> bool:
        deadline = time.monotonic() + 120
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        return condition()

    try:
        assert wait_until(lambda: len(lines) == 3 and fake_api.open_logs == 3)
        time.sleep(0.5)
        assert len(lines) == 3  # the others wait for a stream to end
        assert any("following 3 logs at a time (--max-streams)" in n for n in notes)
        for i in range(12):  # the pods end one by one: their streams end, others begin
            fake_api.finish_pod(f"{name}-{i}-a")
        assert wait_until(lambda: len(lines) == 12)
        fake_api.delete_pod(f"{name}-12-a")
        assert wait_until(lambda: any("deleted before it started" in n for n in notes))
    finally:
        fake_api.jobs[("relit", name)]["status"]["conditions"] = [
            {"type": "Complete", "status": "True"}]
        follow.join(60)
    assert not follow.is_alive()
    assert sorted(lines) == sorted(f"[{i}] log {i}" for i in range(12))
    assert fake_api.most_open_logs == 3
    [waiting] = [n for n in notes if "has not started" in n]  # said once
    assert waiting.startswith(f"[12] pod {name}-12-a has not started: Unschedulable: 0/3 "
                              "nodes are available (no node fits the pod")


def status_lines(run_id: str, state: str, job) -> str:
    """What `relit-k8s status` prints, at 200 columns, for a run of no shards with this Job."""
    from relit_k8s.console import StatusView
    from relit_k8s.status import RunStatus

    view = StatusView(RunStatus(
        run_id=run_id, created_at="2026-11-27T10:00:00Z", output="s3://b/out", manifest="m",
        relighter="sh", state=state, items_total=0, items_done=0, items_skipped=0,
        items_failed=0, items_per_second=None, eta_seconds=None, resumed_from=None,
        stalled_shards=[], failure_reasons=[], timings={}, shards_total=0, shards=[],
        job=job))
    return "\n".join(p.plain for p in view.parts(200) if hasattr(p, "plain"))


def test_status_names_a_pod_stuck_terminating_on_a_lost_node_and_how_to_free_its_index(
        fake_api):
    """A pod on a node that is gone stays Terminating: with podReplacementPolicy: Failed the
    Job never replaces it, and a static Job never completes. status names it (looking only
    while the Job counts terminating pods) and says what frees the index."""
    from datetime import UTC, datetime, timedelta

    from relit_k8s.kube.cluster import Cluster
    from relit_k8s.kube.runs import add_job_details, job_summary

    name = running_job(fake_api)
    fake_api.add_pod(name, 0, f"{name}-0-a", "2026-11-27T10:00:00Z", "")
    fake_api.add_pod(name, 1, f"{name}-1-a", "2026-11-27T10:00:00Z", "")
    now = datetime.now(UTC)
    lost, going = fake_api.pod(f"{name}-0-a"), fake_api.pod(f"{name}-1-a")
    lost["metadata"]["deletionTimestamp"] = (now - timedelta(minutes=42)).isoformat()
    lost["spec"]["nodeName"] = "gpu-node-7"
    going["metadata"]["deletionTimestamp"] = (now - timedelta(seconds=20)).isoformat()
    job = fake_api.jobs[("relit", name)]
    summary = job_summary(job)
    add_job_details(Cluster(namespace="relit"), job, summary)
    assert summary.stuck == []  # the Job counts no terminating pod: nothing is listed
    assert not [r for r in fake_api.requests if r["path"].endswith("/pods")
                and "fieldSelector" not in r["query"]]
    job["status"]["terminating"] = 2
    summary = job_summary(job)
    add_job_details(Cluster(namespace="relit"), job, summary)
    [stuck] = summary.stuck  # the one deleted 20 s ago is in its grace period
    assert (stuck.name, stuck.index, stuck.node, stuck.minutes) == (
        f"{name}-0-a", "0", "gpu-node-7", 42)
    text = " ".join(status_lines(name, "running", summary).split())
    assert f"stuck terminating: pod {name}-0-a (index 0, node gpu-node-7), due to end 42 min" \
        in text
    assert "kubectl delete pod NAME --force --grace-period=0 -n relit" in text


def test_status_shows_pods_that_never_start_and_the_jobs_failedcreate_events(fake_api):
    name = running_job(fake_api)
    for i in range(3):
        fake_api.add_pod(name, i, f"{name}-{i}-a", "2026-11-27T10:00:00Z", "",
                         waiting="ImagePullBackOff",
                         message='Back-off pulling image "relit-k8s:tpyo"')
    fake_api.add_job_event(name, "SuccessfulCreate", f"Created pod: {name}-0-a",
                           type="Normal")
    fake_api.add_job_event(name, "FailedCreate", f'Error creating: pods "{name}-3-b" is '
                           'forbidden: violates PodSecurity "restricted:latest": hostPath '
                           'volumes (volume "model-cache")', count=7)
    fake_api.add_job_event("another-job", "FailedCreate", "not ours")
    from relit_k8s.kube.cluster import Cluster
    from relit_k8s.kube.runs import add_job_details, job_summary

    job = fake_api.jobs[("relit", name)]
    summary = job_summary(job)
    add_job_details(Cluster(namespace="relit"), job, summary)
    [waiting] = summary.waiting
    assert waiting.reason == "ImagePullBackOff" and waiting.indexes == ["0", "1", "2"]
    pod_lists = [r["query"] for r in fake_api.requests if r["path"].endswith("/pods")]
    assert pod_lists[-1]["fieldSelector"] == "status.phase=Pending"  # running pods not listed
    assert "image-pull-secret" in waiting.hint
    [event] = summary.events  # warnings of this Job only
    assert event.reason == "FailedCreate" and event.count == 7 and "PodSecurity" in event.message
    assert summary.details_error is None

    # the same through the CLI, for a submitted run
    from relit_k8s.status import JobSummary

    text = status_lines(name, "pending", summary)
    assert "not started: 3 pod(s) (index 0, 1, 2" in text and "ImagePullBackOff" in text
    assert "event FailedCreate (x7)" in text

    # a submitter without list on events: said, and the rest still shows
    fake_api.forbidden_resources = {"events"}
    summary = job_summary(job)
    add_job_details(Cluster(namespace="relit"), job, summary)
    assert summary.waiting and summary.events == []
    assert "grant the submitter list on events" in summary.details_error
    assert JobSummary.model_validate_json(summary.model_dump_json()) == summary


def test_submit_active_deadline_sets_a_hard_stop(s3_data):
    from relit_k8s.kube.job import parse_duration

    assert [parse_duration(t, "--x") for t in ("90", "45s", "30m", "6h", "2d", "1h30m")] == \
        [90, 45, 1800, 21600, 172800, 5400]
    for bad in ("", "6 hours", "h", "1.5h", "-3m"):
        with pytest.raises(ConfigError, match="--x .*90s, 30m, 6h"):
            parse_duration(bad, "--x")
    job = json.loads(cli(*submit_args(s3_data, "--active-deadline", "1h30m", "--dry-run", "-o",
                                      "json"), check=True).stdout)
    assert job["spec"]["activeDeadlineSeconds"] == 5400
    validate_strict(job)
    plain = json.loads(cli(*submit_args(s3_data, "--dry-run", "-o", "json"), check=True).stdout)
    assert "activeDeadlineSeconds" not in plain["spec"]  # no deadline unless asked
    bad = cli(*submit_args(s3_data, "--active-deadline", "soon", "--dry-run"))
    assert bad.returncode == 78 and "--active-deadline" in bad.stderr


@pytest.mark.slow
def test_cache_host_path_is_refused_where_pod_security_forbids_it(s3_data, s3_client, fake_api):
    host = ["--cache-host-path", "/var/cache/relit"]
    fake_api.namespace_labels["relit"] = {"pod-security.kubernetes.io/enforce": "restricted"}
    refused = cli(*submit_args(s3_data, *host))
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 78 and "pod-security.kubernetes.io/enforce=restricted" in err
    assert "Leave out --cache-host-path" in err
    assert not fake_api.jobs and not [r for r in fake_api.requests if r["method"] == "POST"]
    assert s3_client.list_objects_v2(Bucket=s3_data, Prefix="out/").get("KeyCount", 0) == 0
    fake_api.namespace_labels["relit"] = {"pod-security.kubernetes.io/enforce": "baseline"}
    assert cli(*submit_args(s3_data, *host)).returncode == 78  # baseline forbids hostPath too
    # labels not readable (namespaces are cluster-scoped; the Role cannot grant them): a warning
    fake_api.forbidden_resources = {"namespaces"}
    warned = cli(*submit_args(s3_data, *host), check=True)
    assert "warning: --cache-host-path: cannot read the labels" in " ".join(
        warned.stderr.split())
    [(_, name)] = list(fake_api.jobs)
    volumes = fake_api.jobs[("relit", name)]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-cache", "hostPath": {"path": "/var/cache/relit",
                                                "type": "DirectoryOrCreate"}} in volumes
    # a privileged namespace: no word about it; without the flag the labels are not even read
    fake_api.forbidden_resources = set()
    fake_api.namespace_labels["relit"] = {"pod-security.kubernetes.io/enforce": "privileged"}
    quiet = cli(*submit_args(s3_data, *host, "--run-id", "relit-hostpath-2"), check=True)
    assert "warning" not in quiet.stderr
    fake_api.requests.clear()
    cli(*submit_args(s3_data, "--run-id", "relit-no-hostpath"), check=True)
    assert not [r for r in fake_api.requests if r["path"] == "/api/v1/namespaces/relit"]
    helptext = " ".join(cli("submit", "--help", check=True).stdout.split())
    assert "restricted" in helptext and "hostPath" in helptext


def test_kubectl_finds_the_jobs_pods_and_logs_of_a_run():
    """kubectl get jobs,pods -l relit-k8s/run-id=RUN and kubectl logs -l ... --prefix: the
    Job and its pods carry the run label, the container is named after what it runs, and the
    README shows those commands next to the relit-k8s ones."""
    m = manifest()
    job = build_job(m, "s3://b/out/_relit/x/manifest.json", GPU)
    run_id = m.run_id
    assert job["metadata"]["labels"]["relit-k8s/run-id"] == run_id
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["relit-k8s/run-id"] == run_id  # on every pod
    [container] = template["spec"]["containers"]
    assert container["name"] == "worker" and container["args"] == ["worker"]
    # the index label (batch.kubernetes.io/job-completion-index) is the controller's, set on
    # every pod since 1.28: the oldest supported version has it
    assert K8S_VERSIONS[0] >= "1.28"
    readme = " ".join((ROOT / "README.md").read_text().split())
    for command in ("kubectl -n relit get jobs,pods -l relit-k8s/run-id=RUN -L "
                    "batch.kubernetes.io/job-completion-index",
                    "kubectl -n relit logs -l relit-k8s/run-id=RUN --prefix --tail=-1"):
        assert command in readme


def test_scale_changes_only_parallelism_of_a_static_job(s3_data, fake_api):
    """With static shards completions is the shard count: scale changes how many pods run at
    once, never which shards exist."""
    cli(*submit_args(s3_data, "--parallelism", "2", "--balance", "static"), check=True)
    [(ns, name)] = list(fake_api.jobs)
    spec = fake_api.jobs[(ns, name)]["spec"]
    assert spec["completions"] == 8 and spec["parallelism"] == 2  # 4 shards per worker
    scaled = cli("scale", name, "--parallelism", "6", "--namespace", "relit", check=True)
    assert "2 -> 6 pods at a time" in " ".join(scaled.stdout.split())
    assert (spec["completions"], spec["parallelism"]) == (8, 6)
    missing = cli("scale", "relit-nope", "--parallelism", "6", "--namespace", "relit")
    assert missing.returncode != 0 and "no Job relit-nope" in missing.stderr


# --- Kubernetes truths, round two --------------------------------------------------------------
def test_a_gpu_pod_that_sees_no_cuda_device_exits_78_naming_the_likely_causes(tmp_path):
    """This machine's torch is the CPU build: a pod that requested a GPU would relight on the
    CPU, a thousand times slower, unnoticed; it fails closed instead (78: FailJob)."""
    env = {e["name"]: e.get("value") for e in
           build_job(manifest(), "u", GPU)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RELIT_GPUS_EXPECTED"] == "1"
    cpu_env = {e["name"] for e in
               build_job(manifest(), "u", CPU)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "RELIT_GPUS_EXPECTED" not in cpu_env
    result = cli("worker", "--manifest", str(tmp_path / "none.json"), "--index", "0",
                 env={"RELIT_GPUS_EXPECTED": "1"})
    said = " ".join(result.stderr.split())
    assert result.returncode == 78, result.stderr
    assert "requested 1 GPU(s)" in said and "driver 580 or newer" in said
    assert "--runtime-class nvidia" in said and "device plugin" in said
    # --device cpu says the CPU is meant: then the manifest is what is missing
    meant = cli("worker", "--manifest", str(tmp_path / "none.json"), "--index", "0",
                "--device", "cpu", env={"RELIT_GPUS_EXPECTED": "1"})
    assert meant.returncode == 78 and "no manifest" in meant.stderr


def test_the_runtime_class_and_openshift_ids_are_set_when_asked():
    job = build_job(manifest(), "u", GPU.model_copy(update={"runtime_class": "nvidia",
                                                            "fixed_ids": False}))
    validate_strict(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    for context in (pod["securityContext"], pod["containers"][0]["securityContext"]):
        assert context["runAsNonRoot"] is True  # the SCC's uid is not 0
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & context.keys()
    fixed = build_job(manifest(), "u", GPU)["spec"]["template"]["spec"]
    assert fixed["securityContext"]["runAsUser"] == 10001 and "runtimeClassName" not in fixed


def test_a_leases_job_succeeds_with_its_first_worker_done_whatever_a_failed_index_says():
    leases = build_job(manifest(balance="leases"), "u", GPU)
    validate_strict(leases)
    assert leases["spec"]["successPolicy"] == {"rules": [{"succeededCount": 1}]}
    assert "successPolicy" not in build_job(manifest(), "u", GPU)["spec"]  # static: every index


def test_threads_follow_the_cpu_request_and_disk_is_requested_for_the_empty_dirs(monkeypatch):
    from relit_k8s.settings import usable_cpus

    job = build_job(manifest(), "u", GPU)
    container = job["spec"]["template"]["spec"]["containers"][0]
    ref = next(e for e in container["env"] if e["name"] == "RELIT_CPU_REQUEST")
    assert ref["valueFrom"]["resourceFieldRef"] == {
        "containerName": "worker", "resource": "requests.cpu", "divisor": "1"}
    assert container["resources"]["requests"]["ephemeral-storage"] == "60Gi"  # 10Gi + 50Gi
    host = build_job(manifest(), "u", GPU.model_copy(update={"cache_host_path": "/var/relit"}))
    assert host["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "ephemeral-storage"] == "10Gi"  # the cache is not an emptyDir there
    monkeypatch.setenv("RELIT_CPU_REQUEST", "1")
    assert usable_cpus() == 1  # however many cores this node has


def test_quantities_add_up_across_units():
    from relit_k8s.kube.job import add_quantities

    assert add_quantities("10Gi", "50Gi") == "60Gi"
    assert add_quantities("512Mi", "1Gi") == "1536Mi"
    assert add_quantities("1G", "1Gi") == f"{-(-(10**9 + 2**30) // 2**20)}Mi"


def test_tolerations_add_to_the_gpu_one_and_static_shards_take_one_gpu_a_pod():
    mine = parse_toleration("team=ml:NoSchedule")
    pod = build_job(manifest(), "u", GPU.model_copy(update={"tolerations": (mine,)}))
    tolerations = pod["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert mine in tolerations and len(tolerations) == 2
    with pytest.raises(ConfigError, match="one shard on one GPU"):
        build_job(manifest(), "u", GPU.model_copy(update={"gpus_per_pod": 2}))
    two = build_job(manifest(balance="leases"), "u", GPU.model_copy(update={"gpus_per_pod": 2}))
    assert two["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "2"


def test_scale_below_max_failed_indexes_keeps_the_job_valid_and_warns_of_kueue(s3_data,
                                                                              fake_api):
    """The API server refuses maxFailedIndexes > completions on every update (the fake one
    too): scaling a 40-worker Job (maxFailedIndexes 4) down to 3 lowers it with them."""
    from relit_k8s.kube.runs import queued_warning

    cli(*submit_args(s3_data, "--parallelism", "8", "--max-failed-indexes", "4"), check=True)
    [(ns, name)] = list(fake_api.jobs)
    spec = fake_api.jobs[(ns, name)]["spec"]
    assert spec["maxFailedIndexes"] == 4
    scaled = cli("scale", name, "--parallelism", "3", "--namespace", "relit")
    assert scaled.returncode == 0, scaled.stderr
    assert (spec["completions"], spec["parallelism"], spec["maxFailedIndexes"]) == (3, 3, 3)
    assert "Kueue" not in scaled.stderr  # not queued
    queued = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}}}
    assert "suspends the Job and queues it again" in queued_warning(queued)
    assert queued_warning({"metadata": {"labels": {}}}) is None

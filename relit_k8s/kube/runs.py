"""Runs on a cluster: submit, the Job's state, logs, cancel; the submission record.

``submit`` writes the manifest, creates the Job, and records the submission (namespace,
context, job settings) at ``<output>/_relit/<run>/job.json`` (``RunPaths.job``), so that
``status``, ``logs``, ``cancel`` and ``resume`` find the Job from the output alone. The rules a
library caller needs as much as the CLI live here: pods read only ``s3://`` data
(:func:`check_pod_uris`), and what the Job shows (:func:`job_state`: its state, the pods that
have not started and its warning events).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..clock import now
from ..errors import ConfigError, NotFoundError, RelitError
from ..manifest import Manifest
from ..run import Run
from ..status import JOB_ENDED, JobCondition, JobEvent, JobSummary
from .job import QUEUE_LABEL, JobSettings, build_job, job_name


class Submission(BaseModel):
    """``<output>/_relit/<run>/job.json``: where the run's Job lives and how it was made."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    job: str
    namespace: str
    context: str | None = None
    manifest: str
    settings: JobSettings
    submitted_at: datetime


def read_submission(run: Run) -> Submission | None:
    """The submission record of ``run``; None for a run that was never submitted."""
    try:
        data = run.output.read(run.paths.job)
    except NotFoundError:
        return None
    return Submission.model_validate_json(data)


def find_submission(output: str | None, run_id: str,
                    namespace: str | None = None) -> Submission | None:
    """Where the Job of ``run_id`` lives, for ``logs`` and ``cancel``: its submission record
    when ``output`` is given (None without it: the Job is then looked up by name in the
    namespace). A run of ``output`` that was never submitted ran locally and has no Job: a
    :class:`ConfigError` says so, unless a namespace is named explicitly."""
    if not output:
        return None
    run = Run.load(output, run_id)
    record = read_submission(run)
    if record is None and not namespace:
        raise ConfigError(f"run {run_id} ran on this machine (relit-k8s run), not on "
                          f"Kubernetes: it has no Job or pods. Its progress and failures: "
                          f"relit-k8s status {run_id} --output {output}")
    return record


def check_pod_uris(manifest: Manifest) -> None:
    """Pods cannot read this machine's folders: every URI of the plan must be ``s3://``."""
    local = [u for u in (manifest.input, manifest.refs, manifest.output, manifest.normals)
             if u and not u.startswith("s3://")]
    if local:
        raise ConfigError(f"pods cannot read local paths ({', '.join(local)}): put the data in "
                          "S3 or MinIO and pass s3:// URIs (relit-k8s run works on local paths)")


def plan_job(manifest: Manifest, settings: JobSettings) -> dict[str, Any]:
    """The Job that ``submit`` would create for ``manifest`` (nothing is written)."""
    check_pod_uris(manifest)
    return build_job(manifest, Run.of(manifest).manifest_uri, settings)


def submit(manifest: Manifest, settings: JobSettings, context: str | None = None,
           cluster=None, allow_mixed: bool = False,
           warn: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Submission]:
    """Write the manifest, create the Job, record the submission. Returns (Job, record).

    The Job is first sent as a server-side dry run: what the API server would refuse (a
    missing namespace, no permission, an invalid field, an admission policy) is found before
    anything is written. Should the real creation still fail, the error says that the
    manifest is written and that the same command submits it again. ``warn`` gets what may go
    wrong but cannot be checked (a namespace whose labels cannot be read).
    """
    from ..planner import write_run
    from .cluster import Cluster

    check_pod_uris(manifest)
    cluster = cluster or Cluster(context, settings.namespace)  # fails fast without kubeconfig
    settings = settings.model_copy(update={"namespace": cluster.namespace})
    if settings.cache_host_path:
        check_host_path_allowed(cluster, warn)
    cluster.create_job(build_job(manifest, Run.of(manifest).manifest_uri, settings),
                       dry_run=True)
    run = write_run(manifest, allow_mixed)
    manifest, uri = run.manifest, run.manifest_uri
    job = build_job(manifest, uri, settings)
    try:
        created = cluster.create_job(job)
    except RelitError as e:
        e.args = (f"{e} (the manifest is written at {uri}; the same command submits it "
                  "again)", *e.args[1:])
        raise
    record = Submission(run_id=manifest.run_id, job=job_name(manifest),
                        namespace=cluster.namespace, context=context, manifest=uri,
                        settings=settings, submitted_at=now())
    run.output.write(run.paths.job, record.model_dump_json(indent=1).encode())
    return created, record


#: Pod Security Standards levels that forbid hostPath volumes.
NO_HOST_PATH_LEVELS = ("baseline", "restricted")
PSS_ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"


def check_host_path_allowed(cluster, warn: Callable[[str], None] | None) -> None:
    """``--cache-host-path`` makes a hostPath volume, which the baseline and restricted Pod
    Security Standards forbid. Pod Security admission checks pods, not Jobs: the Job would be
    created and every pod refused (``FailedCreate`` events). Refuse it up front when the
    namespace's labels say so; warn when they cannot be read."""
    labels = cluster.namespace_labels()
    if labels is None:
        if warn:
            warn(f"--cache-host-path: cannot read the labels of namespace {cluster.namespace} "
                 "to check that its Pod Security level allows hostPath volumes (baseline and "
                 "restricted forbid them): if it does not, every pod is refused and relit-k8s "
                 "status shows FailedCreate events")
        return
    level = labels.get(PSS_ENFORCE_LABEL)
    if level in NO_HOST_PATH_LEVELS:
        raise ConfigError(
            f"--cache-host-path makes a hostPath volume, which namespace {cluster.namespace} "
            f"forbids ({PSS_ENFORCE_LABEL}={level}): every pod would be refused. Leave out "
            "--cache-host-path (each pod then caches the model in its own emptyDir), or submit "
            "to a namespace whose level is privileged (manifests/base enforces restricted)")


def cluster_for(record: Submission | None, context: str | None, namespace: str | None):
    from .cluster import Cluster

    return Cluster(context or (record.context if record else None),
                   namespace or (record.namespace if record else None))


def job_summary(job: dict[str, Any] | None) -> JobSummary | None:
    """The parts of a Job's status that tell how it goes."""
    if job is None:
        return None
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    types = {c["type"] for c in conditions}
    # Since 1.29 the controller sets SuccessCriteriaMet / FailureTarget first and Complete /
    # Failed only once the Job's pods are gone: the windows in between are completing/failing.
    if "Complete" in types:
        state = "complete"
    elif "Failed" in types:
        state = "failed"
    elif "FailureTarget" in types:
        state = "failing"
    elif "SuccessCriteriaMet" in types:
        state = "completing"
    elif spec.get("suspend"):
        state = "suspended"
    else:
        state = "running"
    return JobSummary(
        name=job["metadata"]["name"],
        namespace=job["metadata"].get("namespace"),
        state=state,
        conditions=[JobCondition(type=c["type"], reason=c.get("reason"),
                                 message=c.get("message")) for c in conditions],
        completions=spec.get("completions"),
        parallelism=spec.get("parallelism"),
        active=status.get("active", 0),
        ready=status.get("ready", 0),
        terminating=status.get("terminating") or 0,
        succeeded=status.get("succeeded", 0),
        failed=status.get("failed", 0),
        completed_indexes=status.get("completedIndexes", ""),
        failed_indexes=status.get("failedIndexes", ""),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
    )


def job_state(run: Run, namespace: str | None = None,
              context: str | None = None) -> JobSummary | None:
    """The Job of a submitted run; None for a local run (unless a namespace is named); the
    error when the cluster cannot be asked; state ``gone`` once the Job no longer exists."""
    record = read_submission(run)
    if record is None and not namespace:
        return None
    try:
        cluster = cluster_for(record, context, namespace)
        job = cluster.get_job(run.run_id)
    except RelitError as e:
        return JobSummary(error=str(e))
    summary = job_summary(job)
    if job is None or summary is None:
        return JobSummary(state="gone", name=run.run_id,
                          note="the Job no longer exists (deleted or expired by its TTL)")
    add_job_details(cluster, job, summary)
    return summary


def add_job_details(cluster, job: dict[str, Any], summary: JobSummary) -> None:
    """Why a Job may not progress: its pods that have not started (while it runs), its pods
    stuck terminating (while it counts terminating pods: a lost node) and its warning events
    (``FailedCreate`` when its pods are refused: a missing ServiceAccount, an admission
    policy, a quota). What cannot be read is said in ``details_error``."""
    from .pods import stuck_pods, waiting_groups

    problems = []
    if summary.state not in JOB_ENDED:
        try:
            summary.waiting = waiting_groups(cluster.list_pods(summary.name,
                                                               pending_only=True))
        except RelitError as e:
            problems.append(str(e))
    if summary.terminating:  # only then: the Job's own count says some pods are going
        try:
            summary.stuck = stuck_pods(cluster.list_pods(summary.name))
        except RelitError as e:
            problems.append(str(e))
    try:
        events = cluster.job_events(job)
    except RelitError as e:
        problems.append(str(e))
    else:
        summary.events = [JobEvent(reason=e.get("reason"), message=e.get("message"),
                                   count=e.get("count"),
                                   last_seen=e.get("lastTimestamp") or e.get("eventTime"))
                          for e in events if e.get("type") == "Warning"][-5:]
    summary.details_error = "; ".join(problems) or None


def scale(cluster, run_id: str, parallelism: int) -> tuple[int, int, bool, str | None]:
    """Change how many pods of a running Job work at once; returns (parallelism before,
    after, whether completions changed with it, a warning for a Job Kueue admits).

    With leases (``completions`` = ``parallelism``: one index per worker) both change
    together, an elastic Indexed Job: new indexes start workers that claim what is left, and
    removed ones are stopped (SIGTERM: their shards are released for the others). With static
    shards only ``parallelism`` changes (``completions`` is the shard count).
    """
    job = cluster.get_job(run_id)
    if job is None:
        raise NotFoundError(f"no Job {run_id} in namespace {cluster.namespace}")
    spec, status = job.get("spec") or {}, job.get("status") or {}
    ended = [c["type"] for c in status.get("conditions") or []
             if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"]
    if ended:
        raise ConfigError(f"Job {run_id} has ended ({ended[0]}): there is nothing to scale; "
                          f"relit-k8s resume {run_id} --output ... starts a new Job for what "
                          "is missing")
    leases = any(e.get("name") == "RELIT_WORKERS"
                 for c in spec["template"]["spec"]["containers"] for e in c.get("env") or [])
    change: dict[str, Any] = {"parallelism": parallelism}
    if leases:
        change["completions"] = parallelism
        # the API server requires maxFailedIndexes <= completions on every update
        if int(spec.get("maxFailedIndexes") or 0) > parallelism:
            change["maxFailedIndexes"] = parallelism
    after = cluster.patch_job_spec(run_id, change)["spec"]
    return (int(spec.get("parallelism") or 1), int(after["parallelism"]), leases,
            queued_warning(job))


def queued_warning(job: dict[str, Any] | None) -> str | None:
    """What ``scale`` says of a Job that Kueue admits: Kueue suspends and queues again a Job
    whose parallelism changes, unless its elastic-jobs feature is on for it."""
    labels = ((job or {}).get("metadata") or {}).get("labels") or {}
    if QUEUE_LABEL not in labels:
        return None
    return (f"the Job is queued by Kueue ({QUEUE_LABEL}={labels[QUEUE_LABEL]}): unless this "
            "Kueue supports elastic Jobs (workload slices, KEP-77) and has them on for it, it "
            "suspends the Job and queues it again with the new size: its pods stop (their "
            "shards are released) and start again once it is admitted")

"""Runs on a cluster: submit, the Job's state, logs, cancel; the submission record.

``submit`` writes the manifest, creates the Job, and records the submission (namespace,
context, job settings) at ``<output>/_relit/<run>/job.json``, so that ``status``, ``logs``,
``cancel`` and ``resume`` find the Job from the output alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import NotFoundError
from ..manifest import Manifest, now
from ..storage import join_key, open_storage
from .job import INDEX_LABEL, JobSettings, build_job, job_name

SUBMISSION_FILE = "job.json"


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


def manifest_uri_of(manifest: Manifest) -> str:
    return open_storage(manifest.output).uri_of(manifest.manifest_key)


def read_submission(manifest: Manifest) -> Submission | None:
    out = open_storage(manifest.output)
    try:
        data = out.read(join_key(manifest.meta_prefix, SUBMISSION_FILE))
    except NotFoundError:
        return None
    return Submission.model_validate_json(data)


def submit(manifest: Manifest, settings: JobSettings, context: str | None = None,
           cluster=None) -> tuple[dict[str, Any], Submission]:
    """Write the manifest, create the Job, record the submission. Returns (Job, record)."""
    from ..planner import write_manifest
    from .cluster import Cluster

    cluster = cluster or Cluster(context, settings.namespace)  # fails fast without kubeconfig
    settings = settings.model_copy(update={"namespace": cluster.namespace})
    manifest, uri = write_manifest(manifest)
    job = build_job(manifest, uri, settings)
    created = cluster.create_job(job)
    record = Submission(run_id=manifest.run_id, job=job_name(manifest),
                        namespace=cluster.namespace, context=context, manifest=uri,
                        settings=settings, submitted_at=now())
    open_storage(manifest.output).write(join_key(manifest.meta_prefix, SUBMISSION_FILE),
                                        record.model_dump_json(indent=1).encode())
    return created, record


def cluster_for(record: Submission | None, context: str | None, namespace: str | None):
    from .cluster import Cluster

    return Cluster(context or (record.context if record else None),
                   namespace or (record.namespace if record else None))


def job_summary(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a Job's status that tell how it goes."""
    if job is None:
        return None
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    types = {c["type"] for c in conditions}
    if "Complete" in types:
        state = "complete"
    elif "Failed" in types:
        state = "failed"
    elif "FailureTarget" in types:
        state = "failing"
    elif spec.get("suspend"):
        state = "suspended"
    else:
        state = "running"
    return {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"].get("namespace"),
        "state": state,
        "conditions": [{"type": c["type"], "reason": c.get("reason"),
                        "message": c.get("message")} for c in conditions],
        "completions": spec.get("completions"),
        "parallelism": spec.get("parallelism"),
        "active": status.get("active", 0),
        "ready": status.get("ready", 0),
        "succeeded": status.get("succeeded", 0),
        "failed": status.get("failed", 0),
        "completed_indexes": status.get("completedIndexes", ""),
        "failed_indexes": status.get("failedIndexes", ""),
        "start_time": status.get("startTime"),
        "completion_time": status.get("completionTime"),
    }


def newest_pods(pods: list[dict[str, Any]], all_attempts: bool = False) -> list[dict[str, Any]]:
    """Pods ordered by index; only the newest attempt of each index unless ``all_attempts``."""
    def index(p) -> int:
        labels = p["metadata"].get("labels") or {}
        annotations = p["metadata"].get("annotations") or {}
        return int(labels.get(INDEX_LABEL, annotations.get(INDEX_LABEL, -1)))

    pods = sorted(pods, key=lambda p: (index(p), p["metadata"].get("creationTimestamp") or ""))
    if all_attempts:
        return pods
    newest: dict[int, dict[str, Any]] = {}
    for p in pods:
        newest[index(p)] = p  # sorted by time within an index: the last one wins
    return [newest[i] for i in sorted(newest)]


def pod_index(pod: dict[str, Any]) -> str:
    labels = pod["metadata"].get("labels") or {}
    return labels.get(INDEX_LABEL, "?")

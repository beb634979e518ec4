"""The pods of a run: which attempt is the newest, why a pod has not started, and its logs.

A pod whose container has not started has no log: the API server answers 400 (``container
"worker" in pod ... is waiting to start: ContainerCreating``). :func:`stream_logs` shows such a
pod's waiting reason instead, and in follow mode waits for it and streams its log once it
runs; a pod whose log cannot be read never ends the command for the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, NotFoundError, RelitError, TransientError
from ..status import JOB_ENDED, PodsWaiting
from .job import INDEX_LABEL

#: What to do about a waiting reason that does not go away by itself.
WAITING_HINTS = {
    "ErrImagePull": "the node cannot pull --image: check its name and tag and "
                    "--image-pull-secret (on kind: kind load docker-image IMAGE)",
    "ImagePullBackOff": "the node cannot pull --image: check its name and tag and "
                        "--image-pull-secret (on kind: kind load docker-image IMAGE)",
    "InvalidImageName": "--image is not a valid image reference",
    "CreateContainerConfigError": "usually a missing Secret or key: the S3 Secret (--s3-secret, "
                                  "default relit-s3) must exist in the Job's namespace with "
                                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "CreateContainerError": "the container runtime refused the container: see kubectl "
                            "describe pod",
    "Unschedulable": "no node fits the pod (GPUs, CPU, memory, --node-selector, "
                     "--toleration); a cluster autoscaler may still add one",
}


def pod_index(pod: dict[str, Any]) -> str:
    """The pod's completion index (label since Kubernetes 1.28, annotation before), or ``?``."""
    meta = pod["metadata"]
    return str((meta.get("labels") or {}).get(
        INDEX_LABEL, (meta.get("annotations") or {}).get(INDEX_LABEL, "?")))


def newest_pods(pods: list[dict[str, Any]], all_attempts: bool = False) -> list[dict[str, Any]]:
    """Pods ordered by index; only the newest attempt of each index unless ``all_attempts``."""
    def key(p) -> tuple[int, str]:
        index = pod_index(p)
        return (int(index) if index.isdigit() else -1,
                p["metadata"].get("creationTimestamp") or "")

    pods = sorted(pods, key=key)
    if all_attempts:
        return pods
    newest: dict[int, dict[str, Any]] = {}
    for p in pods:
        newest[key(p)[0]] = p  # sorted by time within an index: the last one wins
    return [newest[i] for i in sorted(newest)]


def pod_waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """``(reason, message)`` while the pod's container has not started (not scheduled yet,
    pulling its image, its Secret missing ...); None once it runs, has run, or the pod ended."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):  # ended: it will not start any more
        return None
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("running") or state.get("terminated"):
            return None
        if state.get("waiting"):
            waiting = state["waiting"]
            return waiting.get("reason") or "Waiting", waiting.get("message") or ""
    if status.get("phase") not in (None, "Pending"):
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("reason") or "Unschedulable", cond.get("message") or ""
    return "Pending", ""


def waiting_groups(pods: list[dict[str, Any]]) -> list[PodsWaiting]:
    """The newest pods that have not started, grouped by reason (one line per reason, not one
    per pod, when a hundred pods cannot pull the image)."""
    groups: dict[str, PodsWaiting] = {}
    for pod in newest_pods(pods):
        waiting = pod_waiting(pod)
        if waiting is None:
            continue
        reason, message = waiting
        group = groups.setdefault(reason, PodsWaiting(
            reason=reason, message=message, hint=WAITING_HINTS.get(reason), indexes=[],
            example_pod=pod["metadata"]["name"]))
        group.indexes.append(pod_index(pod))
    return list(groups.values())


def describe_waiting(pod: dict[str, Any], reason: str, message: str) -> str:
    hint = WAITING_HINTS.get(reason)
    return (f"pod {pod['metadata']['name']} has not started: {reason}"
            + (f": {message}" if message else "") + (f" ({hint})" if hint else ""))


class _LogStream:
    """Shows the logs of one run's pods: ``emit`` gets log lines, ``note`` what is not a log
    line (a pod waiting, a log that cannot be read), both prefixed ``[<index>] `` when more than
    one index may show."""

    def __init__(self, cluster, emit: Callable[[str], None], note: Callable[[str], None],
                 prefix: bool, tail: int | None, poll: float):
        self.cluster, self.tail, self.poll, self.prefix = cluster, tail, poll, prefix
        self._emit, self._note = emit, note
        self.lock = threading.Lock()
        self.errors: list[RelitError] = []

    def note(self, text: str) -> None:
        with self.lock:
            self._note(text)

    def line(self, pod: dict[str, Any], text: str, note: bool = False) -> None:
        with self.lock:
            (self._note if note else self._emit)(
                f"[{pod_index(pod)}] {text}" if self.prefix else text)

    def show(self, pod: dict[str, Any], follow: bool) -> None:
        """The pod's log; in follow mode, first wait for its container to start."""
        from .cluster import PodNotStarted

        announced = None
        while True:
            waiting = pod_waiting(pod)
            if waiting is None:
                try:
                    for text in self.cluster.pod_logs(pod["metadata"]["name"], follow=follow,
                                                      tail=self.tail):
                        self.line(pod, text)
                    return
                except PodNotStarted as e:
                    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                        # it ended without ever running (evicted, refused at start)
                        self.line(pod, f"pod {pod['metadata']['name']} ended without a log: "
                                  f"{e}", note=True)
                        return
                    waiting = ("Waiting", str(e))  # it changed since we looked: look again
                except RelitError as e:
                    self.line(pod, f"cannot read the log of pod {pod['metadata']['name']}: "
                              f"{e}", note=True)
                    with self.lock:
                        self.errors.append(e)
                    return
            if waiting != announced:
                self.line(pod, describe_waiting(pod, *waiting)
                          + ("; waiting for it" if follow else ""), note=True)
                announced = waiting
            if not follow:
                return
            time.sleep(self.poll)
            try:
                pod = self.cluster.read_pod(pod["metadata"]["name"])
            except NotFoundError:
                self.line(pod, f"pod {pod['metadata']['name']} was deleted before it started",
                          note=True)
                return
            except RelitError as e:  # the API server did not answer: ask again
                self.line(pod, f"cannot read pod {pod['metadata']['name']}: {e}", note=True)


def stream_logs(cluster, run_id: str, emit: Callable[[str], None], index: int | None = None,
                follow: bool = False, tail: int | None = None, all_attempts: bool = False,
                note: Callable[[str], None] | None = None,
                poll: float = 2.0) -> list[RelitError]:
    """Hand every log line of the run's pods to ``emit`` and every pod that has not started
    (or whose log cannot be read) to ``note``. Returns the errors of the pods whose log could
    not be read; they never stop the others.

    With ``follow``: one thread per pod, each waiting for its pod to start; new pods (retries,
    indexes beyond ``parallelism``) are picked up every ``poll`` seconds, until the Job has
    ended (or is gone) and every log has been read to its end."""
    stream = _LogStream(cluster, emit, note or emit, prefix=index is None, tail=tail, poll=poll)
    if not follow:
        pods = newest_pods(cluster.list_pods(run_id, index), all_attempts)
        if not pods:
            raise ConfigError(_no_pods(cluster, run_id, index))
        stream.prefix = stream.prefix or len(pods) > 1
        for pod in pods:
            stream.show(pod, follow=False)
        return stream.errors
    threads: dict[str, threading.Thread] = {}
    while True:
        ended = _job_ended(cluster, run_id)  # asked before listing: no pod comes after it
        try:
            pods = newest_pods(cluster.list_pods(run_id, index), all_attempts)
        except TransientError as e:  # the API server is away for a moment: keep following
            stream.note(f"cannot list the pods of run {run_id}: {e}")
            time.sleep(poll)
            continue
        for pod in pods:
            name = pod["metadata"]["name"]
            if name not in threads:
                threads[name] = threading.Thread(target=stream.show, args=(pod, True),
                                                 daemon=True)
                threads[name].start()
        if ended and not any(t.is_alive() for t in threads.values()):
            if not threads:
                raise ConfigError(_no_pods(cluster, run_id, index))
            return stream.errors
        time.sleep(poll)


def _job_ended(cluster, run_id: str) -> bool:
    """Whether no new pod will come: the Job has ended or is gone (or cannot be read)."""
    from .runs import job_summary

    try:
        summary = job_summary(cluster.get_job(run_id))
    except TransientError:
        return False  # ask again at the next poll
    except RelitError:
        return True  # e.g. not allowed to read Jobs: follow the pods there are
    return summary is None or summary.state in JOB_ENDED


def _no_pods(cluster, run_id: str, index: int | None) -> str:
    return (f"no pods of run {run_id} in namespace {cluster.namespace}"
            + (f" for index {index}" if index is not None else ""))

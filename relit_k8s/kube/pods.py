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
from datetime import datetime, timedelta
from typing import Any

from .. import clock
from ..errors import ConfigError, RelitError, TransientError
from ..status import JOB_ENDED, PodStuck, PodsWaiting
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


#: A pod still there this long after its ``deletionTimestamp`` (the end of its grace period)
#: is stuck: its kubelet does not answer. The node controller itself deletes the pods of a
#: node that has not answered for 5 minutes; on a node that is gone for good they stay.
STUCK_AFTER = timedelta(minutes=5)


def stuck_pods(pods: list[dict[str, Any]]) -> list[PodStuck]:
    """The pods whose deletion was due more than :data:`STUCK_AFTER` ago (by
    :func:`relit_k8s.clock.now`)."""
    now = clock.now()
    stuck = []
    for pod in newest_pods(pods, all_attempts=True):
        due = (pod.get("metadata") or {}).get("deletionTimestamp")
        if not due:
            continue
        late = now - datetime.fromisoformat(due.replace("Z", "+00:00"))
        if late > STUCK_AFTER:
            stuck.append(PodStuck(name=pod["metadata"]["name"], index=pod_index(pod),
                                  node=(pod.get("spec") or {}).get("nodeName"), deleted_at=due,
                                  minutes=int(late.total_seconds() // 60)))
    return stuck


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

    def show(self, pod: dict[str, Any], follow: bool) -> bool:
        """The pod's log (``follow``: to the container's end), or why there is none. False when
        its container turned out not to have started yet (in follow mode: ask again later)."""
        from .cluster import PodNotStarted

        waiting = pod_waiting(pod)
        if waiting is not None:
            self.line(pod, describe_waiting(pod, *waiting), note=True)
            return True
        try:
            for text in self.cluster.pod_logs(pod["metadata"]["name"], follow=follow,
                                              tail=self.tail):
                self.line(pod, text)
        except PodNotStarted as e:
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                # it ended without ever running (evicted, refused at start)
                self.line(pod, f"pod {pod['metadata']['name']} ended without a log: {e}",
                          note=True)
                return True
            if follow:
                return False  # it changed since the pod was read: its next change tells
            self.line(pod, describe_waiting(pod, "Waiting", str(e)), note=True)
        except RelitError as e:
            self.line(pod, f"cannot read the log of pod {pod['metadata']['name']}: {e}",
                      note=True)
            with self.lock:
                self.errors.append(e)
        return True


#: Logs ``logs --follow`` streams at once (``--max-streams``; kubectl's --max-log-requests is
#: 5): each is an open connection through the API server to a kubelet.
MAX_STREAMS = 16


def stream_logs(cluster, run_id: str, emit: Callable[[str], None], index: int | None = None,
                follow: bool = False, tail: int | None = None, all_attempts: bool = False,
                note: Callable[[str], None] | None = None, poll: float = 2.0,
                max_streams: int = MAX_STREAMS) -> list[RelitError]:
    """Hand every log line of the run's pods to ``emit`` and every pod that has not started
    (or whose log cannot be read) to ``note``. Returns the errors of the pods whose log could
    not be read; they never stop the others.

    With ``follow`` see :class:`_Follower`: until the Job has ended (or is gone) and every log
    has been read to its end."""
    stream = _LogStream(cluster, emit, note or emit, prefix=index is None, tail=tail, poll=poll)
    if not follow:
        pods = newest_pods(cluster.list_pods(run_id, index), all_attempts)
        if not pods:
            raise ConfigError(_no_pods(cluster, run_id, index))
        stream.prefix = stream.prefix or len(pods) > 1
        for pod in pods:
            stream.show(pod, follow=False)
        return stream.errors
    return _Follower(cluster, run_id, index, all_attempts, stream, max_streams).run()


class _Follower:
    """``logs --follow``: the run's pods are listed once and then watched (one request every
    ``poll`` seconds whatever their number, never a listing or a read per pod); a waiting pod
    is announced once per reason; at most ``max_streams`` logs stream at once, the others
    (in index order) as streams end. New pods (retries, indexes beyond ``parallelism``) come
    with the watch."""

    def __init__(self, cluster, run_id: str, index: int | None, all_attempts: bool,
                 stream: _LogStream, max_streams: int):
        self.cluster, self.run_id, self.index = cluster, run_id, index
        self.all_attempts, self.stream, self.max_streams = all_attempts, stream, max_streams
        self.pods: dict[str, dict[str, Any]] = {}
        self.version: str | None = None  # where the watch goes on; None: list first
        self.announced: dict[str, tuple[str, str]] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.read: dict[str, bool] = {}  # pod -> what its stream's show() returned
        self.done: set[str] = set()  # pods whose log was read to its end (or never can be)
        self.told_queue = False

    def run(self) -> list[RelitError]:
        while True:
            ended = _job_ended(self.cluster, self.run_id)  # asked first: no pod comes after
            try:
                self._look()
            except TransientError as e:  # the API server is away for a moment: keep following
                self.stream.note(f"cannot watch the pods of run {self.run_id}: {e}")
                self.version = None
                time.sleep(self.stream.poll)
                continue
            left = self._dispatch()  # streams that ended since the last change make room
            if ended and not left:
                if not self.done:
                    raise ConfigError(_no_pods(self.cluster, self.run_id, self.index))
                return self.stream.errors

    def _look(self) -> None:
        """Bring :attr:`pods` up to date: a listing the first time (and after the server forgot
        where the watch was), then the changes for up to ``poll`` seconds, each acted on."""
        from .cluster import WatchExpired

        if self.version is None:
            pods, self.version = self.cluster.pods_at(self.run_id, self.index)
            self.pods = {p["metadata"]["name"]: p for p in pods}
            self._dispatch()
            if self.version is not None:
                return
        try:
            for kind, pod in self.cluster.pod_changes(self.run_id, self.index, self.version,
                                                      round(self.stream.poll)):
                name = pod["metadata"]["name"]
                self.version = pod["metadata"].get("resourceVersion") or self.version
                if kind == "DELETED":
                    self._deleted(self.pods.pop(name, pod))
                elif kind in ("ADDED", "MODIFIED"):
                    self.pods[name] = pod
                self._dispatch()
        except WatchExpired:
            self.version = None

    def _deleted(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        if name not in self.done and name not in self.threads and name in self.announced:
            self.stream.line(pod, f"pod {name} was deleted before it started", note=True)
            self.done.add(name)

    def _dispatch(self) -> bool:
        """Announce what waits, start the streams there is room for. Whether anything is left
        to show (a stream running, a pod not shown to its end)."""
        for name, thread in list(self.threads.items()):
            if not thread.is_alive():
                del self.threads[name]
                if self.read.pop(name, True):
                    self.done.add(name)
        ready = []
        pods = newest_pods(list(self.pods.values()), self.all_attempts)
        for pod in pods:
            name = pod["metadata"]["name"]
            if name in self.done or name in self.threads:
                continue
            waiting = pod_waiting(pod)
            if waiting is None:
                ready.append(pod)
            elif self.announced.get(name) != waiting:
                self.stream.line(pod, describe_waiting(pod, *waiting) + "; waiting for it",
                                 note=True)
                self.announced[name] = waiting
        room = self.max_streams - len(self.threads)
        for pod in ready[:max(room, 0)]:
            name = pod["metadata"]["name"]
            self.announced[name] = ("Started", "")
            self.threads[name] = threading.Thread(target=self._show, args=(pod,), daemon=True)
            self.threads[name].start()
        if len(ready) > room and not self.told_queue:
            self.stream.note(f"following {self.max_streams} logs at a time (--max-streams): "
                             "the other pods' logs follow as these end")
            self.told_queue = True
        return bool(self.threads) or any(p["metadata"]["name"] not in self.done for p in pods)

    def _show(self, pod: dict[str, Any]) -> None:
        self.read[pod["metadata"]["name"]] = self.stream.show(pod, follow=True)


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

"""Talk to the Kubernetes API through the official ``kubernetes`` client.

Configuration: in-cluster when running inside a pod (``KUBERNETES_SERVICE_HOST`` set), else the
kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``) and its current context, or ``--context``.
API errors are converted here into the project's errors: a missing kubeconfig, a missing
namespace, RBAC denial and an existing Job are configuration errors (exit 78); an unreachable
API server is temporary (exit 75).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError, NotFoundError, RelitError, TransientError
from .job import INDEX_LABEL, RUN_LABEL

#: Seconds to wait for the API server on each request (follow-mode logs excepted).
REQUEST_TIMEOUT = 30


class ClusterError(RelitError):
    """An API call failed for a reason that is neither configuration nor temporary."""


class WatchExpired(TransientError):
    """A watch began at a ``resourceVersion`` the API server no longer keeps (410 Gone): list
    again and watch from there."""


class PodNotStarted(RelitError):
    """The pod's container has no log yet: the API server answers 400 while it is waiting
    (``ContainerCreating``, ``ImagePullBackOff`` ...) or before the pod has a node."""


class Cluster:
    """One kube context and namespace."""

    def __init__(self, context: str | None = None, namespace: str | None = None):
        from kubernetes import client, config

        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
                config.load_incluster_config()
                default_ns = _incluster_namespace()
            else:
                # $KUBECONFIG read now (the client reads it once, when it is imported)
                kubeconfig = os.environ.get("KUBECONFIG") or None
                config.load_kube_config(config_file=kubeconfig, context=context)
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                default_ns = (active or {}).get("context", {}).get("namespace")
        except config.ConfigException as e:
            raise ConfigError(
                f"no usable Kubernetes configuration ({e}): set KUBECONFIG or create "
                "~/.kube/config (kind create cluster does), or pass --context"
            ) from e
        except FileNotFoundError as e:
            raise ConfigError(f"kubeconfig not found: {e}") from e
        self.namespace = namespace or default_ns or "default"
        self.batch = client.BatchV1Api()
        self.core = client.CoreV1Api()

    # --- calls -------------------------------------------------------------------------------
    def create_job(self, job: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Create the Job (a plain dict: every supported client version sends it as it is).
        ``dry_run``: the API server validates and admits it (schema, RBAC, namespace,
        admission) without storing anything."""
        name = job["metadata"]["name"]
        with _api_errors(f"creating Job {name} in namespace {self.namespace}", self.namespace,
                         exists=f"a Job named {name} already exists in namespace "
                         f"{self.namespace}: follow it with relit-k8s status {name}, or "
                         f"delete it with relit-k8s cancel {name}"):
            extra = {"dry_run": "All"} if dry_run else {}
            created = self.batch.create_namespaced_job(
                self.namespace, job, _request_timeout=REQUEST_TIMEOUT, **extra)
        return _plain(created)

    def get_job(self, name: str) -> dict[str, Any] | None:
        try:
            with _api_errors(f"reading Job {name}", self.namespace):
                job = self.batch.read_namespaced_job(name, self.namespace,
                                                     _request_timeout=REQUEST_TIMEOUT)
        except NotFoundError:
            return None
        return _plain(job)

    def patch_job_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Change fields of a Job's spec (a merge patch: the fields given, nothing else)."""
        with _api_errors(f"changing Job {name}", self.namespace):
            patched = self.batch.patch_namespaced_job(name, self.namespace, {"spec": spec},
                                                      _request_timeout=REQUEST_TIMEOUT)
        return _plain(patched)

    def delete_job(self, name: str) -> None:
        with _api_errors(f"deleting Job {name}", self.namespace):
            self.batch.delete_namespaced_job(name, self.namespace,
                                             propagation_policy="Background",
                                             _request_timeout=REQUEST_TIMEOUT)

    def list_pods(self, run_id: str, index: int | None = None,
                  pending_only: bool = False) -> list[dict[str, Any]]:
        """The run's pods (of one index); ``pending_only``: those not running yet (the API
        server filters them, so a Job of ten thousand pods costs little)."""
        extra = {"field_selector": "status.phase=Pending"} if pending_only else {}
        return self.pods_at(run_id, index, **extra)[0]

    def pods_at(self, run_id: str, index: int | None = None,
                **extra: Any) -> tuple[list[dict[str, Any]], str | None]:
        """The run's pods (of one index) and the ``resourceVersion`` of the listing: where a
        watch of their changes (:meth:`pod_changes`) begins."""
        with _api_errors(f"listing pods of {run_id}", self.namespace):
            pods = self.core.list_namespaced_pod(
                self.namespace, label_selector=_pod_selector(run_id, index),
                _request_timeout=REQUEST_TIMEOUT, **extra)
        return [_plain(p) for p in pods.items], pods.metadata.resource_version

    def pod_changes(self, run_id: str, index: int | None, since: str,
                    seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """What happens to the run's pods after ``since`` (a ``resourceVersion``), for about
        ``seconds``: ``(ADDED | MODIFIED | DELETED, pod)``, one watch request whatever the
        number of pods. :class:`WatchExpired` when ``since`` is too old (list again)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        with _api_errors(f"watching pods of {run_id}", self.namespace):
            try:
                for event in watch.Watch().stream(
                        self.core.list_namespaced_pod, self.namespace,
                        label_selector=_pod_selector(run_id, index), resource_version=since,
                        timeout_seconds=max(1, seconds),
                        _request_timeout=max(1, seconds) + REQUEST_TIMEOUT):
                    yield event["type"], event["raw_object"]
            except ApiException as e:
                if e.status == 410:  # "too old resource version": the server forgot it
                    raise WatchExpired(f"watching pods of {run_id}: {_reason(e)}") from e
                raise

    def read_pod(self, name: str) -> dict[str, Any]:
        with _api_errors(f"reading pod {name}", self.namespace):
            pod = self.core.read_namespaced_pod(name, self.namespace,
                                                _request_timeout=REQUEST_TIMEOUT)
        return _plain(pod)

    def job_events(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The events about this Job (``FailedCreate`` when its pods are refused ...), oldest
        first; events of an earlier Job of the same name are left out (by uid)."""
        name, uid = job["metadata"]["name"], job["metadata"].get("uid")
        with _api_errors(f"listing the events of Job {name}", self.namespace,
                         forbidden=f"the events of Job {name} are not readable: grant the "
                         "submitter list on events (the Role in manifests/base does)"):
            events = self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.kind=Job,"
                f"involvedObject.name={name}", _request_timeout=REQUEST_TIMEOUT)
        items = [_plain(e) for e in events.items]
        items = [e for e in items if not uid or (e.get("involvedObject") or {}).get("uid")
                 in (None, uid)]
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def namespace_labels(self) -> dict[str, str] | None:
        """The labels of the namespace; None when they cannot be read (reading a namespace is
        a cluster-wide permission that submitters often lack)."""
        try:
            with _api_errors(f"reading namespace {self.namespace}", self.namespace):
                ns = self.core.read_namespace(self.namespace, _request_timeout=REQUEST_TIMEOUT)
        except ConfigError:
            return None
        return dict(_plain(ns)["metadata"].get("labels") or {})

    def pod_logs(self, pod: str, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """Lines of the worker container's log; with ``follow``, until the container ends.
        :class:`PodNotStarted` while the container has not started."""
        from kubernetes.client.exceptions import ApiException

        from .job import CONTAINER

        with _api_errors(f"reading logs of pod {pod}", self.namespace):
            try:
                # with _preload_content=False the client returns the urllib3 response, unread
                resp: Any = self.core.read_namespaced_pod_log(
                    pod, self.namespace, container=CONTAINER, follow=follow, tail_lines=tail,
                    _preload_content=False,
                    _request_timeout=None if follow else REQUEST_TIMEOUT)
            except ApiException as e:
                if e.status == 400:  # "container ... is waiting to start: ContainerCreating"
                    raise PodNotStarted(_reason(e)) from e
                raise
        try:
            buf = b""
            for chunk in resp.stream(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if buf:
                yield buf.decode("utf-8", "replace")
        finally:
            resp.release_conn()


def _pod_selector(run_id: str, index: int | None) -> str:
    return f"{RUN_LABEL}={run_id}" + (f",{INDEX_LABEL}={index}" if index is not None else "")


def _incluster_namespace() -> str | None:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _plain(obj) -> dict[str, Any]:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


class _api_errors:
    """Convert ApiException and connection errors into the project's errors."""

    def __init__(self, what: str, namespace: str, exists: str | None = None,
                 forbidden: str | None = None):
        self.what, self.namespace, self.exists = what, namespace, exists
        self.forbidden = forbidden

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, RelitError):
            return False
        import urllib3
        from kubernetes.client.exceptions import ApiException

        if isinstance(exc, ApiException):
            status = exc.status or 0
            reason = _reason(exc)
            if status == 409 and self.exists:
                raise ConfigError(self.exists) from exc
            if status == 404:
                if "namespaces" in reason and self.namespace in reason:
                    raise ConfigError(
                        f"namespace {self.namespace!r} does not exist ({self.what}): create it "
                        "(kubectl apply -k manifests/base) or pass --namespace"
                    ) from exc
                raise NotFoundError(f"{self.what}: not found ({reason})") from exc
            if status in (401, 403) and self.forbidden:
                raise ConfigError(f"{self.forbidden} ({reason})") from exc
            if status in (401, 403):
                raise ConfigError(
                    f"forbidden {self.what}: {reason}. The submitter needs the Role in "
                    "manifests/base (jobs create/get/list/watch/patch/delete, pods "
                    "get/list/watch, "
                    "pods/log get, events list)"
                ) from exc
            if status == 422 or status == 400:
                raise ConfigError(f"the API server refused {self.what}: {reason}") from exc
            if status >= 500 or status == 429:
                raise TransientError(f"API server error {status} {self.what}: {reason}") from exc
            raise ClusterError(f"API error {status} {self.what}: {reason}") from exc
        if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            raise TransientError(
                f"Kubernetes API unreachable {self.what}: {exc}. Is the cluster up and the "
                "context right (kubectl cluster-info)?"
            ) from exc
        return False


def _reason(exc) -> str:
    import json

    try:
        body = json.loads(exc.body or "{}")
        return body.get("message") or exc.reason or ""
    except (ValueError, TypeError):
        return str(exc.reason or exc.body or "")

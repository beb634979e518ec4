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


class Cluster:
    """One kube context and namespace."""

    def __init__(self, context: str | None = None, namespace: str | None = None):
        from kubernetes import client, config

        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
                config.load_incluster_config()
                default_ns = _incluster_namespace()
            else:
                config.load_kube_config(context=context)
                _, active = config.list_kube_config_contexts()
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

    def delete_job(self, name: str) -> None:
        with _api_errors(f"deleting Job {name}", self.namespace):
            self.batch.delete_namespaced_job(name, self.namespace,
                                             propagation_policy="Background",
                                             _request_timeout=REQUEST_TIMEOUT)

    def list_pods(self, run_id: str, index: int | None = None) -> list[dict[str, Any]]:
        selector = f"{RUN_LABEL}={run_id}"
        if index is not None:
            selector += f",{INDEX_LABEL}={index}"
        with _api_errors(f"listing pods of {run_id}", self.namespace):
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector,
                                                 _request_timeout=REQUEST_TIMEOUT)
        return [_plain(p) for p in pods.items]

    def pod_logs(self, pod: str, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """Lines of the worker container's log; with ``follow``, until the container ends."""
        from .job import CONTAINER

        with _api_errors(f"reading logs of pod {pod}", self.namespace):
            # with _preload_content=False the client returns the urllib3 response, unread
            resp: Any = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=CONTAINER, follow=follow, tail_lines=tail,
                _preload_content=False,
                _request_timeout=None if follow else REQUEST_TIMEOUT)
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

    def __init__(self, what: str, namespace: str, exists: str | None = None):
        self.what, self.namespace, self.exists = what, namespace, exists

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
            if status in (401, 403):
                raise ConfigError(
                    f"forbidden {self.what}: {reason}. The submitter needs the Role in "
                    "manifests/base (jobs create/get/list/watch/delete, pods get/list/watch, "
                    "pods/log get)"
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

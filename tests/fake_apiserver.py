"""FakeApiServer: THE ONE MOCK IN THIS SUITE.

No Kubernetes cluster can run on the machines this suite runs on (no container engine), so the
client layer is tested against this stand-in for the API server: a real HTTP server on
127.0.0.1 that answers the few endpoints relit-k8s calls (create/read/delete Jobs, list and
read pods, pod logs, list events, read a namespace) with responses shaped like the real API
server's (objects, and ``Status`` bodies with the real messages for 400/404/409/403). Pod logs
behave as the kubelet's do: 400 ``is waiting to start`` while the container waits on a node, an
empty answer while the pod has no node. The official ``kubernetes`` client
talks to it over HTTP through an ordinary kubeconfig, so request building, label selectors,
serialisation and error mapping are exercised for real. It records every request.

The API server's rules it enforces (the others are checked against the official schemas in
test_kube.py): 409 on a second create of a Job; on a patch, ``completions`` changes only
together with ``parallelism`` while they are equal (elastic Indexed Jobs), and
``maxFailedIndexes <= completions`` (``validateJobSpec`` runs on every update); 404 for a
namespace or Job that is not there. Fields it does not know (``successPolicy``) are stored as
given.

Watches (``?watch=true`` on the pod list) behave as the API server's: a listing carries a
``resourceVersion``; a watch from it sends ``ADDED``/``MODIFIED``/``DELETED`` events, each
with its own ``resourceVersion``, for ``timeoutSeconds`` and then ends; an unknown version
gets an ``ERROR`` event with 410 Gone. Changes are found by comparing the pods with what was
last sent, so a test may edit a pod in place. A followed log (``follow=true``) stays open,
as the kubelet keeps it, until its pod has ended or is gone; ``open_logs`` counts the
followed logs open now and ``most_open_logs`` the most at once.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


class FakeApiServer:
    def __init__(self, namespaces=("relit", "default")):
        self.namespaces = set(namespaces)
        self.jobs: dict[tuple[str, str], dict] = {}
        #: refuse the next real (not dry-run) Job creation, as a quota reached meanwhile would
        self.refuse_next_create = False
        self.pods: list[dict] = []
        self.logs: dict[str, str] = {}
        self.requests: list[dict] = []
        self.forbidden = False
        #: resources answered with 403 (e.g. {"events", "namespaces"}: a Role without them)
        self.forbidden_resources: set[str] = set()
        self.events: list[dict] = []
        self.namespace_labels: dict[str, dict[str, str]] = {}
        #: resourceVersion -> the pods as they were then (name -> JSON): where a watch starts
        self._versions: dict[str, dict[str, str]] = {}
        self._version = 0
        self._lock = threading.Lock()
        self.open_logs = 0
        self.most_open_logs = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def write_kubeconfig(self, path: Path, namespace: str = "relit") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}],
        }))
        return path

    def add_pod(self, run_id: str, index: int, name: str, created: str, log: str,
                namespace: str = "relit", waiting: str | None = None,
                message: str = "") -> None:
        """A pod whose container runs (its log is ``log``), or with ``waiting`` a pod whose
        container has not started for that reason (``Unschedulable``: the pod has no node)."""
        self.pods.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created,
                         "labels": {"relit-k8s/run-id": run_id,
                                    "batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"containers": [{"name": "worker", "image": "x"}]},
            "status": {"phase": "Running"},
        })
        self.logs[name] = log
        if waiting:
            self.set_waiting(name, waiting, message)
        else:
            self.start_pod(name)

    def pod(self, name: str) -> dict:
        return next(p for p in self.pods if p["metadata"]["name"] == name)

    def set_waiting(self, name: str, reason: str, message: str = "") -> None:
        pod = self.pod(name)
        if reason == "Unschedulable":  # no node: no container status at all
            pod["spec"].pop("nodeName", None)
            pod["status"] = {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message}]}
            return
        pod["spec"]["nodeName"] = "node-1"
        pod["status"] = {"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}}}]}

    def start_pod(self, name: str) -> None:
        pod = self.pod(name)
        pod["spec"]["nodeName"] = "node-1"
        pod["status"] = {"phase": "Running", "containerStatuses": [{
            "name": "worker", "image": "x", "imageID": "", "ready": True, "restartCount": 0,
            "state": {"running": {"startedAt": "2026-11-27T10:00:00Z"}}}]}

    def finish_pod(self, name: str, code: int = 0) -> None:
        """The pod's container ended with ``code``: the pod Succeeded (0) or Failed."""
        pod = self.pod(name)
        pod["status"] = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [{
            "name": "worker", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0
                                     else "Error"}}}]}

    def delete_pod(self, name: str) -> None:
        self.logs.pop(name, None)  # first: a followed log ends when its pod's log is gone
        self.pods.remove(self.pod(name))

    def _remember(self, pods: dict[str, str]) -> str:
        """A new resourceVersion for the pods as they are in ``pods``."""
        with self._lock:
            self._version += 1
            version = str(self._version)
            self._versions[version] = dict(pods)
        return version

    def add_job_event(self, job: str, reason: str, message: str, namespace: str = "relit",
                      type: str = "Warning", count: int = 1) -> None:
        uid = self.jobs[(namespace, job)]["metadata"]["uid"] if (namespace, job) in self.jobs \
            else None
        self.events.append({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{job}.{len(self.events)}", "namespace": namespace},
            "involvedObject": {"kind": "Job", "name": job, "namespace": namespace,
                               "uid": uid, "apiVersion": "batch/v1"},
            "reason": reason, "message": message, "type": type, "count": count,
            "lastTimestamp": f"2026-11-27T10:{len(self.events):02d}:00Z",
            "source": {"component": "job-controller"}})

    # --- HTTP -------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1, as the API server: streamed answers (watches, followed logs) come in
            # chunks as they are written, which a client reads as they come
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _start_chunks(self, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

            def _chunk(self, data: bytes) -> None:
                """One chunk (an empty one ends the answer)."""
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _send(self, code: int, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append({"method": method, "path": url.path, "query": query,
                                      "body": body})
                self._query = query
                parts = url.path.strip("/").split("/")
                if fake.forbidden:
                    return self._send(403, _status(
                        403, "Forbidden", f'jobs.batch is forbidden: User "alice" cannot '
                        f'{method.lower()} resource "jobs" in API group "batch" in the '
                        f'namespace "{parts[4] if len(parts) > 4 else ""}"'))
                core = parts[:3] == ["api", "v1", "namespaces"]
                resource = (parts[4] if len(parts) > 4 else "namespaces") if core else "jobs"
                if resource in fake.forbidden_resources:
                    return self._send(403, _status(
                        403, "Forbidden", f'{resource} is forbidden: User "alice" cannot '
                        f'{"list" if len(parts) == 5 else "get"} resource "{resource}" in '
                        'API group ""' + (f' in the namespace "{parts[3]}"'
                                          if resource != "namespaces" else " at the cluster "
                                          "scope")))
                if parts[:3] == ["apis", "batch", "v1"] and parts[3] == "namespaces":
                    return self._jobs(method, parts[4], parts[6] if len(parts) > 6 else None,
                                      body)
                if core and len(parts) == 4:
                    return self._namespace(parts[3])
                if core and parts[4] == "pods":
                    if len(parts) == 5:
                        return self._list_pods(parts[3], query.get("labelSelector", ""),
                                               query.get("fieldSelector", ""))
                    if len(parts) == 6:
                        return self._read_pod(parts[5])
                    if len(parts) == 7 and parts[6] == "log":
                        return self._log(parts[5], query)
                if core and parts[4] == "events":
                    return self._list_events(parts[3], query.get("fieldSelector", ""))
                return self._send(404, _status(404, "NotFound", "the server could not find "
                                               "the requested resource"))

            def _jobs(self, method, ns, name, body):
                if ns not in fake.namespaces:
                    return self._send(404, _status(404, "NotFound",
                                                   f'namespaces "{ns}" not found',
                                                   {"name": ns, "kind": "namespaces"}))
                if method == "POST":
                    name = body["metadata"]["name"]
                    if (ns, name) in fake.jobs:
                        return self._send(409, _status(
                            409, "AlreadyExists", f'jobs.batch "{name}" already exists',
                            {"name": name, "group": "batch", "kind": "jobs"}))
                    job = json.loads(json.dumps(body))
                    job["metadata"].update(namespace=ns, uid=f"uid-{name}",
                                           creationTimestamp=datetime.now(UTC).strftime(
                                               "%Y-%m-%dT%H:%M:%SZ"))
                    job["status"] = {}
                    if self._query.get("dryRun") == "All":  # a dry run stores nothing
                        return self._send(201, job)
                    if fake.refuse_next_create:  # e.g. a quota reached since the dry run
                        fake.refuse_next_create = False
                        return self._send(403, _status(
                            403, "Forbidden", f'jobs.batch "{name}" is forbidden: exceeded '
                            'quota: relit-quota'))
                    fake.jobs[(ns, name)] = job
                    return self._send(201, job)
                job = fake.jobs.get((ns, name))
                if job is None:
                    return self._send(404, _status(404, "NotFound",
                                                   f'jobs.batch "{name}" not found',
                                                   {"name": name, "kind": "jobs"}))
                if method == "GET":
                    return self._send(200, job)
                if method == "PATCH":
                    # as the API server: a merge patch; an Indexed Job's completions change
                    # only together with parallelism, and only while they are equal (elastic
                    # Indexed Jobs, GA in 1.31)
                    fake.requests[-1]["content_type"] = self.headers.get("Content-Type")
                    spec, change = job["spec"], (body or {}).get("spec") or {}
                    if "completions" in change and not (
                            spec["completions"] == spec["parallelism"]
                            and change["completions"] == change.get("parallelism")):
                        return self._send(422, _status(
                            422, "Invalid", f'Job.batch "{name}" is invalid: spec.completions: '
                            "Invalid value: field is immutable"))
                    merged = {**spec, **change}
                    if (merged.get("maxFailedIndexes") or 0) > merged["completions"]:
                        # validateJobSpec, on create and on every update
                        return self._send(422, _status(
                            422, "Invalid", f'Job.batch "{name}" is invalid: '
                            f"spec.maxFailedIndexes: Invalid value: "
                            f"{merged['maxFailedIndexes']}: must be less than or equal to "
                            "completions"))
                    spec.update(change)
                    return self._send(200, job)
                if method == "DELETE":
                    del fake.jobs[(ns, name)]
                    return self._send(200, {"kind": "Status", "apiVersion": "v1",
                                            "status": "Success", "metadata": {},
                                            "details": {"name": name, "kind": "jobs"}})
                return self._send(405, _status(405, "MethodNotAllowed", "no"))

            def _list_pods(self, ns, selector, fields=""):
                wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
                phase = dict(term.split("=", 1) for term in fields.split(",") if term)
                assert set(phase) <= {"status.phase"}, fields  # the one field selector used

                def matching() -> dict[str, dict]:
                    return {p["metadata"]["name"]: p for p in list(fake.pods)
                            if p["metadata"]["namespace"] == ns and all(
                                p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
                            and p["status"]["phase"] == phase.get("status.phase",
                                                                  p["status"]["phase"])}

                if self._query.get("watch", "").lower() in ("true", "1"):  # 29.x sends True
                    return self._watch(matching)
                items = matching()
                version = fake._remember({n: json.dumps(p) for n, p in items.items()})
                return self._send(200, {"kind": "PodList", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": version},
                                        "items": list(items.values())})

            def _watch(self, matching):
                sent = fake._versions.get(self._query.get("resourceVersion", ""))
                self._start_chunks("application/json")
                try:
                    if sent is None:
                        self._event("ERROR", _status(410, "Expired",
                                                     "too old resource version"))
                    else:
                        self._watch_from(dict(sent), matching)
                finally:
                    self._chunk(b"")

            def _watch_from(self, sent: dict[str, str], matching) -> None:
                end = time.monotonic() + float(self._query.get("timeoutSeconds", 30))
                while time.monotonic() < end:
                    now = {n: json.dumps(p) for n, p in matching().items()}
                    changes = [("ADDED" if n not in sent else "MODIFIED", n) for n in now
                               if sent.get(n) != now[n]] + [
                        ("DELETED", n) for n in sent if n not in now]
                    for kind, name in changes:
                        pod = json.loads(now.get(name) or sent[name])
                        if kind == "DELETED":
                            del sent[name]
                        else:
                            sent[name] = now[name]
                        pod["metadata"]["resourceVersion"] = fake._remember(sent)
                        self._event(kind, pod)
                    time.sleep(0.02)

            def _event(self, kind: str, obj: dict) -> None:
                self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

            def _namespace(self, ns):
                if ns not in fake.namespaces:
                    return self._send(404, _status(404, "NotFound",
                                                   f'namespaces "{ns}" not found',
                                                   {"name": ns, "kind": "namespaces"}))
                return self._send(200, {"apiVersion": "v1", "kind": "Namespace", "metadata": {
                    "name": ns, "labels": {"kubernetes.io/metadata.name": ns,
                                           **fake.namespace_labels.get(ns, {})}}})

            def _read_pod(self, name):
                pod = next((p for p in fake.pods if p["metadata"]["name"] == name), None)
                if pod is None:
                    return self._send(404, _status(404, "NotFound", f'pods "{name}" not found',
                                                   {"name": name, "kind": "pods"}))
                return self._send(200, pod)

            def _list_events(self, ns, selector):
                wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
                fields = {"involvedObject.kind": lambda e: e["involvedObject"]["kind"],
                          "involvedObject.name": lambda e: e["involvedObject"]["name"]}
                items = [e for e in fake.events if e["metadata"]["namespace"] == ns and all(
                    fields[k](e) == v for k, v in wanted.items())]
                return self._send(200, {"kind": "EventList", "apiVersion": "v1",
                                        "metadata": {}, "items": items})

            def _log(self, pod, query):
                if pod not in fake.logs:
                    return self._send(404, _status(404, "NotFound", f'pods "{pod}" not found'))
                waiting = fake.pod(pod)["status"].get("containerStatuses", [{}])[0].get(
                    "state", {}).get("waiting")
                if not fake.pod(pod)["spec"].get("nodeName"):
                    return self._send(200, "", "text/plain")  # no node yet: an empty stream
                if waiting:  # what the kubelet answers, passed on by the API server
                    return self._send(400, _status(
                        400, "BadRequest", f'container "worker" in pod "{pod}" is waiting to '
                        f'start: {waiting["reason"]}'))
                lines = fake.logs[pod].splitlines(keepends=True)
                if "tailLines" in query:
                    lines = lines[-int(query["tailLines"]):]
                if query.get("follow", "").lower() not in ("true", "1"):  # 29.x sends True
                    return self._send(200, "".join(lines), "text/plain")
                # followed: open until the pod has ended or is gone, as the kubelet keeps it
                with fake._lock:
                    fake.open_logs += 1
                    fake.most_open_logs = max(fake.most_open_logs, fake.open_logs)
                try:
                    self._start_chunks("text/plain")
                    if lines:
                        self._chunk("".join(lines).encode())
                    while pod in fake.logs and fake.pod(pod)["status"]["phase"] not in (
                            "Succeeded", "Failed"):
                        time.sleep(0.02)
                    self._chunk(b"")
                finally:
                    with fake._lock:
                        fake.open_logs -= 1

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

            def do_PATCH(self):
                self._route("PATCH")

        return Handler

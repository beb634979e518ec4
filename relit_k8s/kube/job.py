"""Build the Indexed Job for a run: a pure function of the manifest and the job settings.

The Job is a plain dict, exactly what ``submit --dry-run -o yaml`` prints and what is sent to
the API server. Every field is chosen on purpose:

* ``completionMode: Indexed``; pod ``i`` gets ``JOB_COMPLETION_INDEX=i``. With leases (the
  default where the store allows), ``completions`` = ``parallelism`` = workers: worker ``i``
  claims shards from the output store until every shard is finished. With static balance,
  ``completions`` = shards: pod ``i`` runs shard ``i``; ``parallelism`` pods run at once.
* ``backoffLimitPerIndex`` retries each index on its own (a crashing shard does not use up the
  others' retries); ``maxFailedIndexes`` fails the Job early when too many shards fail for good.
* ``podFailurePolicy``: exit 78 (configuration error) fails the Job at once, since no retry can
  help; a ``DisruptionTarget`` pod condition (preemption, eviction, node drain) is ignored, so it
  does not count against the backoff; exit 75 (temporary) counts.
* ``podReplacementPolicy: Failed``: a replacement pod starts only once the old one is gone, so two
  attempts at one index rarely overlap (outputs are safe to write twice anyway).
* Pods run as non-root with a read-only root filesystem, no privilege escalation, no
  capabilities, seccomp ``RuntimeDefault``, no service-account token; ``/tmp``, the model cache
  and ``/dev/shm`` are ``emptyDir`` volumes. Credentials come only from a Secret.
* ``--cache-host-path``: the kubelet creates a missing node directory owned by root, mode 0755,
  and ``fsGroup`` does not apply to ``hostPath``; an init container (``cache-permissions``, the
  same image, as root with only ``CHOWN`` and ``FOWNER``) hands the directory itself, not its
  contents, to uid 10001 (without fixed ids: mode 1777, as ``/tmp``). A namespace that allows
  ``hostPath`` is at the ``privileged`` Pod Security level, which allows this container too.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import EXIT_CONFIG, EXIT_TEMPORARY, ConfigError
from ..manifest import Manifest

CONTAINER = "worker"
RUN_LABEL = "relit-k8s/run-id"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
MANIFEST_ANNOTATION = "relit-k8s/manifest"
OUTPUT_ANNOTATION = "relit-k8s/output"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"
#: The common toleration of GPU node taints, added when GPUs are requested and none is given.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
#: Non-root user the image runs as (see the Dockerfile).
UID = 10001
#: The init container that makes a --cache-host-path directory writable by the worker.
CACHE_INIT = "cache-permissions"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class JobSettings(BaseModel):
    """Everything about the Job that is not in the manifest (the ``submit`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(min_length=1, description="container image with relit-k8s installed")
    namespace: str | None = Field(
        None, description="None: left out of the Job, so kubectl apply uses the context's")
    parallelism: int = Field(8, ge=1, le=100_000, description="pods running at once")
    gpus_per_pod: int = Field(1, ge=0, description="nvidia.com/gpu per pod; 0 for CPU-only")
    cpu: str = Field("4", description="CPU request per pod")
    cpu_limit: str | None = Field(None, description="CPU limit (none: no CPU throttling)")
    memory: str = Field("16Gi", description="memory request and limit per pod")
    s3_secret: str | None = Field(
        "relit-s3", description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; "
        "None for pod identities (IRSA, workload identity)")
    s3_endpoint: str | None = Field(None, description="AWS_ENDPOINT_URL as seen from the pods")
    s3_region: str | None = Field(None, description="AWS_REGION for the pods")
    backoff_limit_per_index: int = Field(3, ge=0, description="retries of each index")
    max_failed_indexes: int | None = Field(
        None, ge=0, description="fail the Job when more indexes failed for good "
        "(default: a tenth of the shards, at least 1, at most 10,000)")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="a hard stop: the Job fails (reason DeadlineExceeded) and its "
        "pods are stopped this long after it started (none by default)")
    ttl_seconds_after_finished: int | None = Field(
        7 * 24 * 3600, ge=0, description="delete the finished Job after this long (default "
        "a week; reports stay in storage)")
    termination_grace_seconds: int = Field(
        120, ge=1, description="pod grace period; the worker saves its report well within it")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = Field(
        (), description="added to the nvidia.com/gpu NoSchedule toleration the pods have when "
        "they request GPUs")
    priority_class: str | None = None
    service_account: str | None = Field(None, description="pods need no API access")
    queue: str | None = Field(None, description="Kueue LocalQueue name")
    image_pull_policy: str = "IfNotPresent"
    image_pull_secret: str | None = None
    tmp_size: str = "10Gi"
    cache_size: str = Field("50Gi", description="model cache emptyDir size limit")
    shm_size: str = Field("8Gi", description="memory-backed /dev/shm size limit")
    cache_host_path: str | None = Field(
        None, description="opt-in: a node directory as the model cache, shared by the pods of "
        "a node (hostPath)")
    runtime_class: str | None = Field(
        None, description="runtimeClassName of the pods (nvidia on k3s, RKE2 and GPU Operator "
        "set-ups where the NVIDIA runtime is not the node's default)")
    fixed_ids: bool = Field(
        True, description="run as uid/gid 10001 (fsGroup too); off on OpenShift, whose "
        "restricted-v2 SCC assigns the namespace's own range (the image runs as any uid)")

    @field_validator("cpu", "memory", "tmp_size", "cache_size", "shm_size", "cpu_limit")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not _QUANTITY.match(v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (like 500m, 4, 16Gi)")
        return v

    @field_validator("tolerations", mode="before")
    @classmethod
    def _no_tolerations(cls, v: Any) -> Any:
        return () if v is None else v  # submission records of before 0.3 wrote null

    @field_validator("queue")
    @classmethod
    def _label_value(cls, v: str | None) -> str | None:
        if v is not None and not _LABEL_VALUE.match(v):
            raise ValueError(f"{v!r} is not a valid label value")
        return v

    @field_validator("image_pull_policy")
    @classmethod
    def _pull_policy(cls, v: str) -> str:
        if v not in ("Always", "IfNotPresent", "Never"):
            raise ValueError("image pull policy must be Always, IfNotPresent or Never")
        return v


    @classmethod
    def from_flags(cls, node_selector: list[str] | None = None,
                   toleration: list[str] | None = None, **fields: Any) -> JobSettings:
        """Settings from ``submit``'s flags: ``KEY=VALUE`` node selectors, ``key[=value][:effect]``
        tolerations, and the pods' S3 endpoint and region defaulting to the submitter's
        ``AWS_ENDPOINT_URL`` and ``AWS_REGION``. Invalid values are a :class:`ConfigError` that
        names the flag."""
        import os

        from pydantic import ValidationError

        selectors = {}
        for pair in node_selector or []:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"--node-selector {pair!r}: expected KEY=VALUE")
            selectors[key] = value
        if not fields.get("s3_endpoint"):
            fields["s3_endpoint"] = os.environ.get("AWS_ENDPOINT_URL") or None
            if fields["s3_endpoint"] and _loopback(fields["s3_endpoint"]):
                raise ConfigError(
                    f"AWS_ENDPOINT_URL is {fields['s3_endpoint']}, a loopback address that "
                    "pods cannot reach (every index would spend its retries on exit 75): pass "
                    "--s3-endpoint with the address the pods see (MinIO of manifests/dev: "
                    "http://minio.relit.svc:9000)")
        fields["s3_region"] = fields.get("s3_region") or os.environ.get("AWS_REGION") or None
        if "s3_secret" in fields:
            fields["s3_secret"] = fields["s3_secret"] or None  # '': pod identity
        try:
            return cls(node_selector=selectors, tolerations=tuple(
                parse_toleration(t) for t in toleration) if toleration else (), **fields)
        except ValidationError as e:
            raise ConfigError("; ".join(
                f"--{'-'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}"
                for x in e.errors())) from e


_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str) -> int:
    """Seconds in ``90``, ``45s``, ``30m``, ``6h``, ``2d`` or ``1h30m``."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"{flag} {text!r}: expected a duration such as 90s, 30m, 6h, 2d or "
                          "1h30m (a plain number is seconds)")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def _loopback(url: str) -> bool:
    """Whether an endpoint URL names this machine (localhost, 127.0.0.0/8, ::1, 0.0.0.0)."""
    import ipaddress
    from urllib.parse import urlparse

    host = (urlparse(url if "//" in url else f"//{url}").hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def parse_toleration(text: str) -> dict[str, Any]:
    """``key[=value][:Effect]`` -> a toleration (``Exists`` without a value)."""
    spec, _, effect = text.partition(":")
    key, eq, value = spec.partition("=")
    if not key or (effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute")):
        raise ConfigError(
            f"--toleration {text!r}: expected key[=value][:NoSchedule|PreferNoSchedule|NoExecute]"
        )
    tol: dict[str, Any] = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def add_quantities(*quantities: str) -> str:
    """The sum of byte quantities (``10Gi`` + ``50Gi`` = ``60Gi``), in Mi when they do not all
    share one binary unit."""
    amounts = []
    for q in quantities:
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kMGTPE]i?)?", q)
        if m is None:
            raise ConfigError(f"{q!r} is not a byte quantity (like 10Gi)")
        amounts.append((float(m.group(1)), m.group(2) or ""))
    units = {u for _, u in amounts}
    if len(units) == 1 and all(a.is_integer() for a, _ in amounts):
        return f"{int(sum(a for a, _ in amounts))}{units.pop()}"
    total = sum(a * _UNITS[u] for a, u in amounts)
    return f"{-(-int(total) // 2**20)}Mi"


def job_name(manifest: Manifest) -> str:
    """The Job is named after the run (a DNS label of at most 40 characters)."""
    return manifest.run_id


def run_labels(run_id: str) -> dict[str, str]:
    from .. import __version__

    return {
        "app.kubernetes.io/name": "relit-k8s",
        "app.kubernetes.io/instance": run_id,
        "app.kubernetes.io/managed-by": "relit-k8s",
        "app.kubernetes.io/version": __version__,
        RUN_LABEL: run_id,
    }


def stop_grace_for(termination_grace_seconds: int) -> int:
    """The worker's grace after SIGTERM: 15 s (or a quarter) less than the pod's."""
    return max(1, termination_grace_seconds - min(15, termination_grace_seconds // 4))


def job_indexes(manifest: Manifest, parallelism: int) -> int:
    """The Job's ``completions``. Static balance: one index per shard. Leases: one index per
    worker (``parallelism`` of them, at most one per shard), each claiming shards until none
    is left; ``completions`` equals ``parallelism``, so that ``relit-k8s scale`` can change
    both (an elastic Indexed Job)."""
    if manifest.balance == "leases":
        return min(parallelism, manifest.shards)
    return manifest.shards


def default_max_failed(shards: int) -> int:
    return min(10_000, max(1, shards // 10))


def _env(manifest: Manifest, manifest_uri: str, s: JobSettings, indexes: int
         ) -> list[dict[str, Any]]:
    """The worker container's environment."""
    env: list[dict[str, Any]] = [
        {"name": "RELIT_MANIFEST", "value": manifest_uri},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "RELIT_LOG_FORMAT", "value": "json"},  # one event per line for kubectl logs
        # The worker saves its report and exits this long after SIGTERM at the latest, well
        # inside the pod's grace period (after which the kubelet sends SIGKILL).
        {"name": "RELIT_STOP_GRACE", "value": str(stop_grace_for(s.termination_grace_seconds))},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "TORCH_HOME", "value": "/cache/torch"},
        # compiled kernels of torch.compile next to the weights: reused by later pods when the
        # cache is node-local (--cache-host-path)
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/cache/torch/inductor"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
    ]
    if s.gpus_per_pod:
        # a GPU pod that sees no CUDA device exits 78 instead of relighting on the CPU
        env.append({"name": "RELIT_GPUS_EXPECTED", "value": str(s.gpus_per_pod)})
    else:
        # Where the NVIDIA container runtime is the node's default, an image without this
        # would see every GPU of the node; a pod that requests none gets none.
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    if s.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s.s3_endpoint})
    if s.s3_region:
        env.append({"name": "AWS_REGION", "value": s.s3_region})
    if s.s3_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {
                "name": s.s3_secret, "key": key}}})
    # torch and the worker's thread pools size themselves from the CPU request, not from the
    # node's cores (without a CPU limit the cgroup does not say): the downward API gives it,
    # rounded up to whole cores
    env.append({"name": "RELIT_CPU_REQUEST", "valueFrom": {"resourceFieldRef": {
        "containerName": CONTAINER, "resource": "requests.cpu", "divisor": "1"}}})
    if manifest.balance == "leases":
        # the claim order of worker i: its own shards (i, i + workers, ...) first
        env.append({"name": "RELIT_WORKERS", "value": str(indexes)})
    return env


def _resources(s: JobSettings) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {"cpu": s.cpu, "memory": s.memory}
    limits: dict[str, str] = {"memory": s.memory}
    if s.cpu_limit:
        limits["cpu"] = s.cpu_limit
    if s.gpus_per_pod:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(s.gpus_per_pod)
    # the disk emptyDirs are node disk: the scheduler must count them (and the kubelet then
    # evicts a pod that outgrows them, rather than a node running out of disk)
    requests["ephemeral-storage"] = add_quantities(
        s.tmp_size, *([] if s.cache_host_path else [s.cache_size]))
    return {"requests": requests, "limits": limits}


def _volumes(s: JobSettings) -> list[dict[str, Any]]:
    cache: dict[str, Any] = (
        {"name": "model-cache", "hostPath": {"path": s.cache_host_path,
                                             "type": "DirectoryOrCreate"}}
        if s.cache_host_path else
        {"name": "model-cache", "emptyDir": {"sizeLimit": s.cache_size}}
    )
    return [{"name": "tmp", "emptyDir": {"sizeLimit": s.tmp_size}}, cache,
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}}]


def _container(s: JobSettings, env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["relit-k8s"],
        "args": ["worker"],
        "env": env,
        "resources": _resources(s),
        "securityContext": {
            "runAsNonRoot": True,
            **({"runAsUser": UID, "runAsGroup": UID} if s.fixed_ids else {}),
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "model-cache", "mountPath": "/cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def _cache_init(s: JobSettings) -> dict[str, Any]:
    """Makes the node's cache directory writable by the worker (see the module docstring)."""
    command = (f"chown {UID}:{UID} /cache && chmod 0775 /cache" if s.fixed_ids
               else "chmod 1777 /cache")
    return {
        "name": CACHE_INIT,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["sh", "-c", command],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                      "limits": {"memory": "16Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "model-cache", "mountPath": "/cache"}],
    }


def _pod_spec(s: JobSettings, container: dict[str, Any]) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": s.termination_grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            **({"runAsUser": UID, "runAsGroup": UID, "fsGroup": UID} if s.fixed_ids else {}),
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": _volumes(s),
    }
    if s.cache_host_path:
        pod_spec["initContainers"] = [_cache_init(s)]
    tolerations = ([dict(GPU_TOLERATION)] if s.gpus_per_pod else []) + [
        t for t in s.tolerations if t != GPU_TOLERATION]
    optional = {"serviceAccountName": s.service_account, "priorityClassName": s.priority_class,
                "runtimeClassName": s.runtime_class,
                "nodeSelector": dict(s.node_selector) or None, "tolerations": tolerations or None,
                "imagePullSecrets": [{"name": s.image_pull_secret}] if s.image_pull_secret
                else None}
    pod_spec.update({k: v for k, v in optional.items() if v})
    return pod_spec


def _failure_policy() -> dict[str, Any]:
    """Exit 78 fails the Job at once; disruptions (preemption, eviction, drain) are not held
    against an index; exit 75 counts against its retries."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {
            "containerName": CONTAINER, "operator": "In", "values": [EXIT_CONFIG]}},
        {"action": "Ignore", "onPodConditions": [
            {"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Count", "onExitCodes": {
            "containerName": CONTAINER, "operator": "In", "values": [EXIT_TEMPORARY]}},
    ]}


def build_job(manifest: Manifest, manifest_uri: str, s: JobSettings) -> dict[str, Any]:
    """The ``batch/v1`` Job for ``manifest`` (see the module docstring for each choice)."""
    if s.gpus_per_pod > 1 and manifest.balance == "static":
        raise ConfigError(f"--gpus-per-pod {s.gpus_per_pod} with static shards: a pod runs its "
                          "one shard on one GPU and would hold the others idle; use leases "
                          "(a pod runs a worker per GPU), or --gpus-per-pod 1")
    if manifest.shards > 100_000 or s.parallelism > 100_000:
        raise ConfigError("a Job holds at most 100,000 indexes here: use fewer --shards")
    name = job_name(manifest)
    labels = run_labels(name)
    indexes = job_indexes(manifest, s.parallelism)
    container = _container(s, _env(manifest, manifest_uri, s, indexes))
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": indexes,
        "parallelism": min(s.parallelism, indexes),
        "backoffLimitPerIndex": s.backoff_limit_per_index,
        "maxFailedIndexes": min(
            indexes,
            s.max_failed_indexes if s.max_failed_indexes is not None
            else default_max_failed(indexes)),
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": _failure_policy(),
        "template": {
            "metadata": {"labels": labels,
                         "annotations": {MANIFEST_ANNOTATION: manifest_uri}},
            "spec": _pod_spec(s, container),
        },
    }
    if manifest.balance == "leases":
        # a leases worker exits 0 only once every shard is finished: one success is the run
        # done, whatever an index that failed for good says (without this rule the Job ends
        # Failed, FailedIndexes); the controller then ends the pods still running
        spec["successPolicy"] = {"rules": [{"succeededCount": 1}]}
    if s.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = s.active_deadline_seconds
    if s.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = s.ttl_seconds_after_finished
    if s.queue:
        spec["suspend"] = True  # Kueue unsuspends the Job when it admits it
    metadata: dict[str, Any] = {"name": name}
    if s.namespace:
        metadata["namespace"] = s.namespace
    metadata["labels"] = {**labels, **({QUEUE_LABEL: s.queue} if s.queue else {})}
    metadata["annotations"] = {MANIFEST_ANNOTATION: manifest_uri,
                               OUTPUT_ANNOTATION: manifest.output}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}

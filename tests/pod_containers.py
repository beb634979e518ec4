"""Run a Job's pods as containers: the pod template of ``relit-k8s submit --dry-run -o json``,
turned into one ``docker run`` per index with the pod's own settings.

This runs pods, the way a kubelet would start them; it does not imitate the Job controller
(what the controller does with exit codes is checked against the Kubernetes schemas and
documentation in test_kube.py). What is carried over, field by field:

* ``command`` / ``args`` -> the entrypoint and its arguments; ``env`` with ``secretKeyRef``
  values taken from the given Secrets (a missing one fails, as the kubelet's
  ``CreateContainerConfigError`` would) and ``resourceFieldRef`` values from the container's
  resources (divided by the divisor, rounded up, as the kubelet does); ``JOB_COMPLETION_INDEX``
  per index, as the controller sets it;
* ``securityContext``: ``runAsUser``/``runAsGroup`` (and ``runAsNonRoot`` checked),
  ``fsGroup`` as a supplementary group, ``readOnlyRootFilesystem``, ``capabilities``,
  ``allowPrivilegeEscalation: false`` (no-new-privileges), seccomp ``RuntimeDefault`` (the
  engine's default profile), ``privileged``;
* volumes: a disk ``emptyDir`` is an empty, world-writable host folder (as the kubelet makes
  it; the folder is returned so a test can look at what was written there); ``medium: Memory``
  at ``/dev/shm`` is the shm size; ``hostPath`` is a bind mount (``DirectoryOrCreate``: made
  as the kubelet makes it, owned by root, mode 0755);
* ``initContainers``: each runs to its end before the container starts;
* ``resources.limits``: memory (swap off, as on a node) and CPU;
* ``terminationGracePeriodSeconds`` -> the stop timeout (``docker stop`` sends SIGTERM, then
  SIGKILL after it).

The containers use the host network: the S3 endpoint of the tests is on 127.0.0.1.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20,
          "Gi": 2**30, "Ti": 2**40, "m": 1e-3}


def quantity(text: str) -> float:
    """A Kubernetes quantity (``16Gi``, ``500m``, ``2``) as a number."""
    match = re.fullmatch(r"([0-9.]+)([kMGT]i?|m)?", str(text))
    if not match:
        raise ValueError(f"not a quantity: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def docker(*args: str, check: bool = True, timeout: float = 600,
           **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {result.returncode}\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@dataclass
class Pod:
    """One index of the Job, as a container."""

    name: str
    index: int
    run_args: list[str]
    #: volume name -> the host folder behind a disk emptyDir
    folders: dict[str, Path] = field(default_factory=dict)
    grace_seconds: int = 30
    #: the ``docker run`` arguments of its init containers, run in order before it
    init_run_args: list[list[str]] = field(default_factory=list)

    def start(self) -> Pod:
        for args in self.init_run_args:
            docker("run", "--rm", *args)  # a failure raises: the pod never starts
        docker("run", "-d", "--name", self.name, *self.run_args)
        return self

    def wait(self, timeout: float = 600) -> int:
        return int(docker("wait", self.name, timeout=timeout).stdout.strip())

    def run(self, timeout: float = 600) -> int:
        """Start the container and wait for its exit code."""
        self.start()
        return self.wait(timeout)

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self) -> dict[str, Any]:
        import json

        return json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)

    def stop(self) -> None:
        """What the kubelet does to a pod being deleted: SIGTERM, then SIGKILL after the
        pod's grace period."""
        docker("stop", "--time", str(self.grace_seconds), self.name,
               timeout=self.grace_seconds + 60)

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


def pod_for_index(job: dict[str, Any], index: int, secrets: dict[str, dict[str, str]],
                  workdir: Path, name: str, env: dict[str, str] | None = None) -> Pod:
    """The ``docker run`` arguments that start index ``index`` of ``job``'s pods. ``env``
    overrides variables of the container (a test's way to break one thing). Init containers
    run first, one after the other, each to its end (as the kubelet runs them); a failed one
    fails :meth:`Pod.start`."""
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]  # the worker is the Job's only container
    folders: dict[str, Path] = {}
    inits = [_container_args(init, spec, index, secrets, workdir, f"{name}-init{i}", folders)
             for i, init in enumerate(spec.get("initContainers") or [])]
    args = _container_args(container, spec, index, secrets, workdir, name, folders, env)
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    args = ["--stop-timeout", str(grace), *args]
    return Pod(name=name, index=index, run_args=args, folders=folders, grace_seconds=grace,
               init_run_args=inits)


def _container_args(container: dict[str, Any], spec: dict[str, Any], index: int,
                    secrets: dict[str, dict[str, str]], workdir: Path, name: str,
                    folders: dict[str, Path], env: dict[str, str] | None = None) -> list[str]:
    """The ``docker run`` arguments of one container of the pod; ``folders`` holds the host
    folders of the pod's disk emptyDirs (made on first use, shared by its containers)."""
    psc = spec.get("securityContext") or {}
    csc = container.get("securityContext") or {}
    args = ["--network", "host"]

    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        assert uid not in (None, 0), "runAsNonRoot without a non-root runAsUser"
    if uid is not None:
        args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if psc.get("fsGroup") is not None:
        args += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if csc.get("privileged"):
        args.append("--privileged")
    caps = csc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        args += ["--cap-drop", cap]
    for cap in caps.get("add") or []:
        args += ["--cap-add", cap]
    if csc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp not in (None, "RuntimeDefault"):  # the engine's default profile
        raise NotImplementedError(f"seccomp profile {seccomp}")

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        path = mount["mountPath"]
        if "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            if path != "/dev/shm":
                raise NotImplementedError("a memory emptyDir elsewhere than /dev/shm")
            size = volume["emptyDir"].get("sizeLimit")
            args += ["--shm-size", str(int(quantity(size)))] if size else []
        elif "emptyDir" in volume:
            if mount["name"] not in folders:
                folder = workdir / f"{name}-{mount['name']}"
                folder.mkdir(parents=True)
                folder.chmod(0o777)  # the kubelet makes emptyDirs world-writable
                folders[mount["name"]] = folder
            args += ["-v", f"{folders[mount['name']]}:{path}"]
        elif "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "DirectoryOrCreate" and not host.exists():
                host.mkdir(parents=True, mode=0o755)  # as the kubelet makes it: root, 0755
            args += ["-v", f"{host}:{path}"]
        else:
            raise NotImplementedError(f"volume {volume}")

    limits = (container.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        memory = str(int(quantity(limits["memory"])))
        args += ["--memory", memory, "--memory-swap", memory]  # nodes run without swap
    if "cpu" in limits:
        args += ["--cpus", str(quantity(limits["cpu"]))]
    if "nvidia.com/gpu" in limits:
        args += ["--gpus", str(limits["nvidia.com/gpu"])]

    variables = {"JOB_COMPLETION_INDEX": str(index)}
    for var in container.get("env") or []:
        if "value" in var:
            variables[var["name"]] = var["value"]
        elif "resourceFieldRef" in var["valueFrom"]:  # the downward API, as the kubelet does
            field_ref = var["valueFrom"]["resourceFieldRef"]
            kind, _, resource = field_ref["resource"].partition(".")
            amount = quantity(((container.get("resources") or {}).get(kind) or {})[resource])
            divisor = quantity(field_ref.get("divisor", "1"))
            variables[var["name"]] = str(math.ceil(amount / divisor))  # rounded up
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            variables[var["name"]] = secrets[ref["name"]][ref["key"]]
    variables.update(env or {})
    for key, value in variables.items():
        args += ["-e", f"{key}={value}"]

    if container.get("workingDir"):
        args += ["-w", container["workingDir"]]
    command = container.get("command") or []
    if command:
        args += ["--entrypoint", command[0]]
    return [*args, container["image"], *command[1:], *(container.get("args") or [])]


def engine_available() -> str | None:
    """None when a container engine answers, else why not."""
    from shutil import which

    if which("docker") is None:
        return "no docker client is installed"
    result = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ})
    if result.returncode != 0:
        return f"no container engine answers ({result.stderr.strip()[:200]})"
    return None

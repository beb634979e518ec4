"""The worker's tuning settings: every ``RELIT_*`` variable, read once, checked, documented.

:meth:`WorkerSettings.from_env` is the one place a worker reads its environment (the S3
variables are :class:`~relit_k8s.storage.S3Settings`'s). A value that is not a number, or is out
of range, is a :class:`~relit_k8s.errors.ConfigError` (exit 78) that names the variable: a typo
in a Job's env must not look like a crash (exit 1) that Kubernetes retries.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

GiB = 1024**3


class WorkerSettings(BaseModel):
    """Settings of one worker process; each field's variable is ``RELIT_<FIELD NAME>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    report_interval: float = Field(
        5.0, gt=0, description="seconds between two writes of the shard report while a shard "
        "runs: its heartbeat, which `status` reads to flag stalled shards")
    progress_seconds: float = Field(
        30.0, ge=0, description="seconds between two progress lines (rate, ETA) in the log")
    ref_cache_bytes: int = Field(
        2 * GiB, ge=0, description="bytes of decoded references kept in memory: a shard cycles "
        "through its references for every image, so all of them should fit (the sh "
        "relighter's 64x128 references: about 20,000 in the default)")
    call_output_bytes: int = Field(
        4 * GiB, ge=1, description="most bytes of output (float32, at the input's size) one "
        "relighter call may return: a very large image gets fewer seeds per call, which bounds "
        "GPU memory whatever the batch size")
    write_backlog_bytes: int = Field(
        4 * GiB, ge=1, description="most bytes of relit pixels waiting for the encode-and-write "
        "threads (one item always passes)")
    stop_grace: float = Field(
        30.0, ge=0, description="seconds a worker may take after SIGTERM to finish its batch; "
        "past them it abandons the batch (nothing half-written), saves its report and exits "
        "143. The Job sets it below the pod's terminationGracePeriodSeconds")
    write_threads: int | None = Field(
        None, ge=1, le=256, description="threads that encode and write outputs (default: the "
        "CPUs this process may use, from its affinity and its cgroup's CPU limit, between 4 "
        "and 32): encoding is most of a worker's CPU time (benchmarks/output_cpu.py)")
    png_level: int = Field(
        1, ge=0, le=9, description="zlib level of PNG outputs (0: none, 9: smallest). Pixels "
        "are the same at every level; Pillow's default, 6, costs about 4x the CPU of 1 for "
        "files about 15% smaller (benchmarks/output_cpu.py)")
    lease_seconds: float = Field(
        60.0, gt=0, description="balance leases: seconds after its last heartbeat that a "
        "shard's lease may be taken by another worker (its holder is presumed dead); the "
        "heartbeat renews it every third of this")
    lease_poll: float | None = Field(
        None, gt=0, description="balance leases: seconds a worker waits before it looks again "
        "when every unfinished shard is held by another, and how long the published list of "
        "finished shards is taken as it is (default: a sixth of lease_seconds, at most 10)")
    workers: int = Field(
        1, ge=1, description="balance leases: the workers of the run, for the order in which "
        "worker i claims shards (its own, i, i+workers, ..., first); the Job sets it")
    gpu_share: int = Field(
        1, ge=1, description="workers sharing this process's GPU (set by `relit-k8s run` when "
        "--workers exceeds the GPUs): relighters that size their batch from free GPU memory "
        "divide it by this")

    def encode_threads(self) -> int:
        """``write_threads``, or its default (see the field)."""
        return self.write_threads or min(32, max(4, usable_cpus()))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """The settings from ``RELIT_*`` variables (unset or empty: the default)."""
        env = os.environ if env is None else env
        given = {name: env[var] for name in cls.model_fields
                 if (var := cls.variable(name)) in env and env[var].strip()}
        try:
            return cls(**given)
        except ValidationError as e:
            problems = "; ".join(
                f"{cls.variable(str(x['loc'][0]))}={given.get(str(x['loc'][0]))!r}: {x['msg']}"
                for x in e.errors())
            raise ConfigError(f"invalid worker setting: {problems}") from None

    @staticmethod
    def variable(field: str) -> str:
        return f"RELIT_{field.upper()}"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU limit (a pod's
    ``resources.limits.cpu``), rounded up, and by ``RELIT_CPU_REQUEST`` (the Job sets it to
    the pod's CPU request through the downward API: without a limit the cgroup says nothing,
    and a pod that asked for 4 CPUs must not size its threads for a 192-core node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    request = os.environ.get("RELIT_CPU_REQUEST", "").strip()
    if request.isdigit() and int(request) > 0:
        cpus = min(cpus, int(request))
    return max(cpus, 1)


def cpu_threads(workers: int = 1) -> int:
    """Torch threads for each of ``workers`` worker processes sharing these CPUs: the usable
    CPUs (:func:`usable_cpus`, so a pod's CPU limit counts, not its node's cores) shared out,
    and no more than ``OMP_NUM_THREADS`` when that is set. More threads than CPUs make the
    OpenMP threads spin against each other: on 2 cores, the diffusion and LumiNet tests in two
    processes took 1.6 times as long with 2 threads each as with one."""
    threads = max(1, usable_cpus() // max(1, workers))
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) > 0:
        threads = min(threads, int(cap))
    return threads


__all__ = ["WorkerSettings", "cpu_threads", "usable_cpus"]

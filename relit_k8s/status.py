"""A run's state, read from storage: typed results for ``relit-k8s status``.

:func:`collect` returns a :class:`RunStatus`; ``status -o json`` prints its
``model_dump_json()``. The JSON keys are the documented ones (README, "Status"): sums over the
shards at the top, each shard's report under ``shards``, the Job under ``job`` when submitted.
"""

from __future__ import annotations

import socket
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .clock import now
from .errors import NotFoundError
from .manifest import Failure, ShardReport
from .run import Run
from .storage import Storage

#: A running shard whose report is older than this many seconds is flagged as stalled
#: (its heartbeat is every 5 s; a pod that died without a word stops it).
STALL_AFTER = 120.0

RunState = Literal["done", "running", "starting", "failed", "stopped", "pending", "incomplete"]
#: States after which nothing more happens unless someone starts the run again.
ENDED: frozenset[str] = frozenset({"done", "failed", "stopped", "incomplete"})
#: Job states (``JobSummary.state``) of a Job that has ended.
JOB_ENDED: frozenset[str] = frozenset({"complete", "failed", "gone"})


class Launch(BaseModel):
    """``<output>/_relit/<run>/launch.json``: ``relit-k8s run`` started workers on the run."""

    started_at: datetime
    host: str
    workers: int


class ShardStatus(ShardReport):
    """One shard: its report's fields, or a ``pending`` placeholder before any attempt wrote
    one; for running shards, the heartbeat's age and whether it is stalled."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["pending", "running", "done", "failed", "stopped"]  # type: ignore[assignment]
    started_at: datetime | None = None  # type: ignore[assignment]
    updated_at: datetime | None = None  # type: ignore[assignment]
    host: str | None = None  # type: ignore[assignment]
    device: str | None = None  # type: ignore[assignment]
    relighter: str | None = None  # type: ignore[assignment]
    attempt: int | None = None  # type: ignore[assignment]
    heartbeat_age_seconds: float | None = None
    stalled: bool = False

    @classmethod
    def pending(cls, run_id: str, index: int, items_total: int) -> ShardStatus:
        return cls(run_id=run_id, index=index, state="pending", items_total=items_total)


class FailureGroup(BaseModel):
    """Failed items that share a kind and a reason, with a few of the files at fault (the
    image, or the reference or normal map that failed them)."""

    kind: str
    reason: str
    count: int
    examples: list[str]


class JobCondition(BaseModel):
    type: str
    reason: str | None = None
    message: str | None = None


class PodsWaiting(BaseModel):
    """The newest pods of some indexes whose container has not started, for one reason
    (``ImagePullBackOff``, ``CreateContainerConfigError``, ``Unschedulable`` ...)."""

    reason: str
    message: str = ""
    #: what to do about it, for the reasons that do not go away by themselves
    hint: str | None = None
    indexes: list[str]
    example_pod: str


class PodStuck(BaseModel):
    """A pod of the Job still there long after its deletion was due: its kubelet does not
    answer (a lost node, usually), and the Job replaces it only once it is gone."""

    name: str
    index: str
    node: str | None = None
    #: when its grace period ended (``deletionTimestamp``)
    deleted_at: str
    minutes: int


class JobEvent(BaseModel):
    """A warning event about the Job (``FailedCreate``: the pods were refused)."""

    reason: str | None = None
    message: str | None = None
    count: int | None = None
    last_seen: str | None = None


class JobSummary(BaseModel):
    """The parts of a submitted run's Job that tell how it goes; ``state`` is ``gone`` once
    the Job was deleted, and ``error`` says why it could not be read."""

    name: str | None = None
    namespace: str | None = None
    state: str | None = None
    conditions: list[JobCondition] = Field(default_factory=list)
    completions: int | None = None
    parallelism: int | None = None
    active: int = 0
    ready: int = 0
    #: pods being terminated (a Job that completes or fails waits for them)
    terminating: int = 0
    succeeded: int = 0
    failed: int = 0
    completed_indexes: str = ""
    failed_indexes: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    #: pods that have not started, by reason (not read once the Job has ended)
    waiting: list[PodsWaiting] = Field(default_factory=list)
    #: pods stuck terminating (looked for only while the Job counts terminating pods)
    stuck: list[PodStuck] = Field(default_factory=list)
    #: the Job's warning events, newest last (``FailedCreate`` ...)
    events: list[JobEvent] = Field(default_factory=list)
    #: why the pods or events could not be read (e.g. no permission to list events)
    details_error: str | None = None
    note: str | None = None
    error: str | None = None


class LeaseHolder(BaseModel):
    """One held lease: who holds which shard, since when, how far it is."""

    shard: int
    owner: str = Field(description="host/pid/token of the worker holding it")
    claimed_at: datetime
    heartbeat_at: datetime
    silent: bool = Field(description="not renewed for the lease time: taken over next")
    steals: int = Field(description="times the shard was taken from a holder presumed dead")
    stolen_from: str | None = None
    items_done: int = 0
    items_total: int | None = None


class LeaseCounts(BaseModel):
    """``balance: leases``: the lease folders (a listing of ``leases/`` and one of ``done/``),
    and the first :data:`HOLDERS_SHOWN` held leases read (the silent ones first)."""

    held: int = Field(description="shards being worked on")
    silent: int = Field(description="of them, leases not renewed for the lease time (their "
                        "holder is presumed dead; the next worker that looks takes them over)")
    done: int = Field(description="shards finished")
    released: int = Field(0, description="shards released by a stopped worker, not claimed "
                          "again yet")
    lease_seconds: float
    holders: list[LeaseHolder] = Field(default_factory=list)


#: Held leases ``status`` reads (one request each) to say who holds them.
HOLDERS_SHOWN = 20


class RunStatus(BaseModel):
    """``relit-k8s status -o json``: sums over all shards, and every shard."""

    run_id: str
    created_at: datetime
    output: str
    manifest: str
    relighter: str
    state: RunState
    items_total: int
    items_done: int
    items_skipped: int
    items_failed: int
    items_per_second: float | None
    eta_seconds: float | None
    resumed_from: str | None
    stalled_shards: list[int]
    failure_reasons: list[FailureGroup]
    timings: dict[str, float]
    shards_total: int
    shards: list[ShardStatus]
    job: JobSummary | None = None
    #: When ``relit-k8s run`` last started workers on the run (None: never recorded).
    launched_at: datetime | None = None
    balance: str = "static"
    leases: LeaseCounts | None = None
    #: what the reader of the reports had to do otherwise (a summary it could not read)
    notes: list[str] = Field(default_factory=list)

    @property
    def going(self) -> bool:
        """Whether more will happen without anyone acting: a shard runs or is about to, a new
        attempt is starting, or the run's Job has not ended (``status --watch`` waits)."""
        if self.job is not None and self.job.state and self.job.state not in JOB_ENDED \
                and not self.job.error:
            return True
        return self.state not in ENDED

    @property
    def items_finished(self) -> int:
        return self.items_done + self.items_skipped + self.items_failed


def overall_state(states: list[str]) -> RunState:
    """done: every shard done; running: a shard runs; failed: a shard failed; stopped: a
    shard was stopped (Ctrl+C, SIGTERM) and none failed; pending: none started; incomplete:
    some done, the others not started (a partial run)."""
    if states and all(s == "done" for s in states):
        return "done"
    if "running" in states:
        return "running"
    if "failed" in states:
        return "failed"
    if "stopped" in states:
        return "stopped"
    return "pending" if all(s == "pending" for s in states) else "incomplete"


def throughput(reports: list[ShardReport], remaining: int,
               state: str) -> tuple[float | None, float | None]:
    """(items written per second over the run so far, seconds left at that rate)."""
    if not reports:
        return None, None
    start = min(r.started_at for r in reports)
    end = max(r.updated_at for r in reports)
    seconds = (end - start).total_seconds()
    done = sum(r.items_done for r in reports)
    if seconds <= 0 or done == 0:
        return None, None
    rate = done / seconds
    return round(rate, 3), (round(remaining / rate, 1) if state == "running" else None)


def failure_reasons(failures: list[Failure], limit: int = 20) -> list[FailureGroup]:
    """Failures grouped by kind and reason, most first."""
    groups: dict[tuple[str, str], FailureGroup] = {}
    for f in failures:
        reason = f.reason or f.error
        g = groups.setdefault((f.kind, reason),
                              FailureGroup(kind=f.kind, reason=reason, count=0, examples=[]))
        g.count += 1
        at_fault = f.key or f.image  # the file at fault: a bad reference, not its images
        if len(g.examples) < 3 and at_fault not in g.examples:
            g.examples.append(at_fault)
    return sorted(groups.values(), key=lambda g: -g.count)[:limit]


def _merge_timings(shards: list[ShardStatus]) -> dict[str, float]:
    timings: dict[str, float] = {}
    for sh in shards:
        for key, seconds in sh.timings.items():
            # a worker loads its model once for all its shards: the longest load, not a sum
            merge = max if key == "model_load" else (lambda a, b: a + b)
            timings[key] = round(merge(timings.get(key, 0.0), seconds), 3)
    return timings


def collect(output: str | Storage | Run, run_id: str | None = None,
            stall_after: float = STALL_AFTER) -> RunStatus:
    """The status of ``run_id`` (the newest run when None) in ``output``, from its reports."""
    run = output if isinstance(output, Run) else Run.load(output, run_id)
    manifest = run.manifest
    read = run.reports()
    reports = read.by_index
    current = now()
    shards: list[ShardStatus] = []
    for index in range(manifest.shards):
        report = reports.get(index)
        if report is None:
            shards.append(ShardStatus.pending(manifest.run_id, index,
                                              manifest.shard_items(index)))
            continue
        sh = ShardStatus(**dict(report))
        if sh.state == "running" and sh.updated_at:
            sh.heartbeat_age_seconds = round((current - sh.updated_at).total_seconds(), 1)
            sh.stalled = sh.heartbeat_age_seconds > stall_after
        shards.append(sh)
    done, skipped, failed = (sum(getattr(s, k) for s in shards)
                             for k in ("items_done", "items_skipped", "items_failed"))
    state = overall_state([s.state for s in shards])
    launched_at = _launched_at(run)
    if state in ENDED - {"done"} and launched_at is not None:
        newest = max((r.updated_at for r in reports.values()), default=None)
        if (newest is None or launched_at > newest) and \
                (current - launched_at).total_seconds() < stall_after:
            state = "starting"  # a rerun's workers are loading; their reports come next
    rate, eta = throughput(list(reports.values()), manifest.items - done - skipped - failed,
                           state)
    return RunStatus(
        run_id=manifest.run_id, created_at=manifest.created_at, output=manifest.output,
        manifest=run.manifest_uri, relighter=manifest.relighter.name, state=state,
        items_total=manifest.items, items_done=done, items_skipped=skipped, items_failed=failed,
        items_per_second=rate, eta_seconds=eta, resumed_from=manifest.resumed_from,
        stalled_shards=[sh.index for sh in shards if sh.stalled],
        failure_reasons=failure_reasons([f for sh in shards for f in sh.failures]),
        timings=_merge_timings(shards), shards_total=manifest.shards, shards=shards,
        launched_at=launched_at, balance=manifest.balance, leases=_lease_counts(run),
        notes=read.notes,
    )


def _lease_counts(run: Run) -> LeaseCounts | None:
    if run.manifest.balance != "leases":
        return None
    from .leases import LeaseBook

    book = LeaseBook(run.output, run.run_id)
    found = book.listing()
    held = found.held
    old = now() - timedelta(seconds=book.seconds)
    holders = []
    for shard in sorted(held, key=lambda s: (held[s] >= old, s))[:HOLDERS_SHOWN]:
        read = book.read(shard)
        if read is None:  # finished or released since the listing
            continue
        lease = read[0]
        holders.append(LeaseHolder(
            shard=shard, owner=lease.owner, claimed_at=lease.claimed_at,
            heartbeat_at=lease.heartbeat_at, silent=held[shard] < old, steals=lease.steals,
            stolen_from=lease.stolen_from, items_done=lease.done, items_total=lease.total))
    return LeaseCounts(held=len(held), silent=sum(1 for t in held.values() if t < old),
                       done=len(found.done), released=len(found.released),
                       lease_seconds=book.seconds, holders=holders)


def _launched_at(run: Run) -> datetime | None:
    try:
        return Launch.model_validate_json(run.output.read(run.paths.launch)).started_at
    except (NotFoundError, ValueError):
        return None


def record_launch(run: Run, workers: int) -> None:
    """Say that ``relit-k8s run`` is starting ``workers`` workers on the run (before they load
    their model and write reports): ``status`` then shows ``starting``, not the last
    attempt's end."""
    launch = Launch(started_at=now(), host=socket.gethostname(), workers=workers)
    run.output.write(run.paths.launch, launch.model_dump_json(indent=1).encode())


__all__ = ["FailureGroup", "JobEvent", "JobSummary", "LeaseCounts", "LeaseHolder",
           "PodsWaiting", "RunStatus",
           "ShardStatus", "collect"]

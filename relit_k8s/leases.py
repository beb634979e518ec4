"""Shards claimed through leases in the output store (issue 15, first part: the claiming).

A worker claims shard ``s`` of run ``R`` by creating ``<output>/_relit/R/leases/s.json`` with a
create-only write (S3 ``If-None-Match: *``; a local exclusive create): of racing workers
exactly one wins. It renews the lease with its heartbeat, a replace conditional on the version
it last wrote (S3 ``If-Match``), and releases it when the shard is done (``done``: never claimed
again) or when it is stopped (``released``: claimed again at once). A lease whose heartbeat is
older than the lease time (``RELIT_LEASE_SECONDS``, default 60) may be stolen: the thief's
write is conditional on the stale version, so exactly one thief wins, and the old holder's next
renewal fails with :class:`LeaseLost` (it must then stop writing that shard's report).

Clocks: staleness compares the lease's ``heartbeat_at`` (the holder's wall clock) with the
thief's; clocks of a cluster are within a second or so of each other, far inside 60 s.

Stores that ignore conditional writes (some S3-compatible servers) would let two workers win
the same shard: :func:`conditional_writes_work` finds out with one probe.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .errors import NotFoundError, RelitError, WriteConflict
from .storage import META_DIR, Storage

#: Seconds after its last heartbeat that a lease may be stolen (RELIT_LEASE_SECONDS).
LEASE_SECONDS = 60.0


class LeaseLost(RelitError):
    """The lease was stolen or taken over (its holder was presumed dead): stop the shard's
    writes of reports; the outputs already written are safe (writes are atomic and idempotent)."""


class Lease(BaseModel):
    """``<output>/_relit/<run>/leases/<shard>.json``."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    shard: int
    state: Literal["held", "released", "done"]
    #: who holds it: host, process and a token of its own (every claim is a new token)
    owner: str
    claimed_at: datetime
    heartbeat_at: datetime
    #: how many times the shard was taken from a holder presumed dead
    steals: int = 0
    #: the owner it was stolen from, when it was
    stolen_from: str | None = None


@dataclass(frozen=True)
class Claim:
    """A lease this worker holds: the version it last wrote, for the next conditional write."""

    shard: int
    version: str
    lease: Lease


def new_owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def lease_seconds() -> float:
    return float(os.environ.get("RELIT_LEASE_SECONDS") or LEASE_SECONDS)


def claim_order(index: int, workers: int, shards: int) -> Iterator[int]:
    """The shards in the order worker ``index`` of ``workers`` tries them: its own first
    (``index``, ``index + workers``, ...: the static split), then every other, starting after
    its own so that workers do not all race for shard 0."""
    own = list(range(index, shards, workers))
    yield from own
    mine = set(own)
    for k in range(shards):
        s = (index + k) % shards
        if s not in mine:
            yield s


class LeaseBook:
    """The leases of one run, as seen by one worker (``owner``)."""

    def __init__(self, storage: Storage, run_id: str, owner: str | None = None,
                 seconds: float | None = None):
        self.storage, self.run_id = storage, run_id
        self.owner = owner or new_owner()
        self.seconds = lease_seconds() if seconds is None else seconds

    def key(self, shard: int) -> str:
        return f"{META_DIR}/{self.run_id}/leases/{shard}.json"

    def _lease(self, shard: int, previous: Lease | None = None, stolen: bool = False) -> Lease:
        now = datetime.now(UTC)
        return Lease(run_id=self.run_id, shard=shard, state="held", owner=self.owner,
                     claimed_at=now, heartbeat_at=now,
                     steals=(previous.steals if previous else 0) + int(stolen),
                     stolen_from=previous.owner if stolen and previous else None)

    def read(self, shard: int) -> tuple[Lease, str] | None:
        """The lease of ``shard`` and its version; None when it was never claimed."""
        try:
            data, version = self.storage.read_versioned(self.key(shard))
        except NotFoundError:
            return None
        return Lease.model_validate_json(data), version

    def stale(self, lease: Lease) -> bool:
        age = datetime.now(UTC) - lease.heartbeat_at
        return lease.state == "held" and age > timedelta(seconds=self.seconds)

    def try_claim(self, shard: int) -> Claim | None:
        """Claim ``shard`` if nobody holds it: never claimed, released, or held by a worker
        whose heartbeat is older than the lease time (a steal). None if another holds it, it
        is done, or another worker won the race for it."""
        lease = self._lease(shard)
        try:
            return Claim(shard, self.storage.create(self.key(shard), _bytes(lease)), lease)
        except WriteConflict:
            pass
        found = self.read(shard)
        if found is None:  # it was there a moment ago: deleted by hand; try once more
            try:
                return Claim(shard, self.storage.create(self.key(shard), _bytes(lease)), lease)
            except WriteConflict:
                return None
        current, version = found
        if current.state == "done":
            return None
        stolen = self.stale(current)
        if current.state != "released" and not stolen:
            return None
        lease = self._lease(shard, current, stolen=stolen)
        try:
            return Claim(shard, self.storage.replace(self.key(shard), _bytes(lease), version),
                         lease)
        except WriteConflict:  # another worker took it first
            return None

    def claim_next(self, order: Sequence[int] | Iterator[int]) -> Claim | None:
        """The first shard of ``order`` this worker can claim; None when none is left."""
        for shard in order:
            claim = self.try_claim(shard)
            if claim is not None:
                return claim
        return None

    def renew(self, claim: Claim) -> Claim:
        """The heartbeat: :class:`LeaseLost` if the lease was taken meanwhile."""
        lease = claim.lease.model_copy(update={"heartbeat_at": datetime.now(UTC)})
        return self._replace(claim, lease)

    def release(self, claim: Claim, done: bool) -> Claim:
        """``done``: the shard is finished, never claimed again; else (stopped) it is free to
        claim at once. :class:`LeaseLost` if the lease was taken meanwhile."""
        lease = claim.lease.model_copy(update={"state": "done" if done else "released",
                                               "heartbeat_at": datetime.now(UTC)})
        return self._replace(claim, lease)

    def _replace(self, claim: Claim, lease: Lease) -> Claim:
        try:
            version = self.storage.replace(self.key(claim.shard), _bytes(lease), claim.version)
        except WriteConflict as e:
            raise LeaseLost(f"the lease of shard {claim.shard} of run {self.run_id} was taken "
                            "by another worker (this one was presumed dead)") from e
        return Claim(claim.shard, version, lease)


def conditional_writes_work(storage: Storage) -> bool:
    """Whether ``storage`` honours create-only writes: one probe object, written twice; the
    second write must lose. Stores that ignore ``If-None-Match`` let it win."""
    key = f"{META_DIR}/probe-{uuid.uuid4().hex}.json"
    storage.create(key, b"{}")
    try:
        storage.create(key, b"{}")
    except WriteConflict:
        return True
    finally:
        storage.delete(key)
    return False


def _bytes(lease: Lease) -> bytes:
    return lease.model_dump_json(indent=1).encode()

"""Shards claimed through leases in the output store (``balance: leases``, issue 15).

Under ``<output>/_relit/<run>/leases/``:

* ``<shard>.json``: the lease of a shard being worked on. A worker claims a shard by creating
  it with a create-only write (S3 ``If-None-Match: *``; a local exclusive create): of racing
  workers exactly one wins. Its heartbeat renews it with a write conditional on the version it
  last wrote (S3 ``If-Match``). A lease whose heartbeat is older than the lease time
  (``RELIT_LEASE_SECONDS``, default 60) may be stolen: the thief's write is conditional on the
  stale version, so exactly one thief wins, and the old holder's next renewal (or report write)
  fails with :class:`LeaseLost`: it stops working on that shard.
* ``<shard>.done``: the shard is finished (written before its lease is deleted); a finished
  shard is never claimed again.

A worker stopped by SIGTERM deletes its lease, so that another claims the shard at once. The
listing of the folder tells a worker, in one request per 1,000 shards, which shards are free
(no object), finished (``.done``) or possibly stale (a lease not modified for the lease time):
only those are read. Clocks: staleness compares the lease's ``heartbeat_at`` (the holder's
clock) with the thief's; a cluster's clocks agree within a second or so, far inside 60 s.

Stores that ignore conditional writes (some S3-compatible servers) would let two workers win
the same shard: :func:`conditional_writes_work` finds out with one probe, at plan time.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict

from .errors import NotFoundError, RelitError, WriteConflict
from .settings import WorkerSettings
from .storage import META_DIR, LocalStorage, Storage

log = logging.getLogger("relit_k8s.leases")

class LeaseLost(RelitError):
    """The lease was stolen (its holder was presumed dead): stop working on the shard and
    writing its report; the outputs already written are safe (atomic, idempotent writes)."""


class Lease(BaseModel):
    """``<output>/_relit/<run>/leases/<shard>.json``."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    shard: int
    #: who holds it: host, process and a token of its own (every claim is a new token)
    owner: str
    claimed_at: datetime
    heartbeat_at: datetime
    #: how many times the shard was taken from a holder presumed dead
    steals: int = 0
    #: the owner it was stolen from, when it was
    stolen_from: str | None = None
    #: the holder's progress on the shard, with each heartbeat: items finished of ``total``,
    #: at ``rate`` items/s (what an idle worker reads to take a straggler's shard over)
    done: int = 0
    total: int | None = None
    rate: float | None = None

    def seconds_left(self, at: datetime | None = None) -> float | None:
        """Seconds the holder needs to finish, at its rate, as of ``at`` (default: its last
        heartbeat); None before it reported progress."""
        if self.total is None or not self.rate:
            return None
        left = max(0, self.total - self.done) / self.rate
        if at is not None:
            left -= max(0.0, (at - self.heartbeat_at).total_seconds())
        return max(0.0, left)


#: Leases an idle worker reads per look, in the tail of a run, to find stragglers.
TAIL_SAMPLE = 16
#: An idle worker takes a live worker's shard over only when that worker would need more than
#: this many times as long as the idle one to finish it (a 3x slower node: yes; noise: no).
TAKEOVER_FACTOR = 2.0


@dataclass(frozen=True)
class Claim:
    """A lease this worker holds: the version it last wrote, for the next conditional write."""

    shard: int
    version: str
    lease: Lease


def new_owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def claim_order(index: int, workers: int, shards: int) -> Iterator[int]:
    """The shards in the order worker ``index`` of ``workers`` tries them: its own first
    (``index``, ``index + workers``, ...: the static split), then every other in an order of
    its own (a permutation seeded by ``index``), so that workers that run out of their own
    shards rarely race for the same one."""
    own = list(range(index % shards, shards, max(1, workers)))
    yield from own
    mine = set(own)
    others = [s for s in range(shards) if s not in mine]
    random.Random(index).shuffle(others)
    yield from others


class LeaseBook:
    """The leases of one run, as seen by one worker (``owner``)."""

    def __init__(self, storage: Storage, run_id: str, owner: str | None = None,
                 seconds: float | None = None):
        self.storage, self.run_id = storage, run_id
        self.owner = owner or new_owner()
        self.seconds = WorkerSettings.from_env().lease_seconds if seconds is None else seconds

    @property
    def folder(self) -> str:
        return f"{META_DIR}/{self.run_id}/leases"

    def key(self, shard: int) -> str:
        return f"{self.folder}/{shard}.json"

    def done_key(self, shard: int) -> str:
        return f"{self.folder}/{shard}.done"

    def _lease(self, shard: int, previous: Lease | None = None) -> Lease:
        now = datetime.now(UTC)
        return Lease(run_id=self.run_id, shard=shard, owner=self.owner, claimed_at=now,
                     heartbeat_at=now, steals=(previous.steals + 1) if previous else 0,
                     stolen_from=previous.owner if previous else None)

    def read(self, shard: int) -> tuple[Lease, str] | None:
        """The lease of ``shard`` and its version; None when nobody holds it."""
        try:
            data, version = self.storage.read_versioned(self.key(shard))
        except NotFoundError:
            return None
        return Lease.model_validate_json(data), version

    def listing(self) -> tuple[set[int], dict[int, datetime]]:
        """(finished shards, held shard -> when its lease was last written): one listing of
        the lease folder."""
        done, held = set(), {}
        for name, modified in self.storage.list_modified(self.folder).items():
            stem, _, ext = name.partition(".")
            if stem.isdigit() and ext == "done":
                done.add(int(stem))
            elif stem.isdigit() and ext == "json":
                held[int(stem)] = modified
        return done, held

    def is_done(self, shard: int) -> bool:
        return self.storage.exists(self.done_key(shard))

    def _straggler(self, lease: Lease, faster_than: float | None) -> bool:
        """A live holder so slow that this worker (``faster_than`` items/s) would finish the
        shard in under 1 / :data:`TAKEOVER_FACTOR` of its time, saving a sixth of a lease
        time at least (the holder's time left is counted from its last heartbeat)."""
        now = datetime.now(UTC)
        left = lease.seconds_left(at=now)
        if left is None or not faster_than or lease.total is None:
            return False
        elapsed = max(0.0, (now - lease.heartbeat_at).total_seconds())
        done = min(lease.total, lease.done + elapsed * (lease.rate or 0))
        mine = (lease.total - done) / faster_than
        return left > TAKEOVER_FACTOR * mine and left - mine > self.seconds / 6

    def stale(self, lease: Lease) -> bool:
        """Its heartbeat is older than the lease time, or its holder was a process of this
        host that is gone (a local run killed with -9 is taken over at once when run again)."""
        if datetime.now(UTC) - lease.heartbeat_at > timedelta(seconds=self.seconds):
            return True
        host, _, rest = lease.owner.partition("/")
        pid = rest.partition("/")[0]
        return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))

    def try_claim(self, shard: int, faster_than: float | None = None) -> Claim | None:
        """Claim ``shard`` if nobody holds it, or steal it from a holder whose heartbeat is
        older than the lease time, or (``faster_than``: this worker's items/s) from a live
        holder that would take :data:`TAKEOVER_FACTOR` times as long as this worker to finish
        it. None if it is finished, another holds it, or another worker won the race for it."""
        claim = self._create(shard)
        if claim is None:
            found = self.read(shard)
            if found is None:  # released (or finished) a moment ago
                claim = self._create(shard)
            elif self.stale(found[0]) or self._straggler(found[0], faster_than):
                lease = self._lease(shard, found[0])
                try:
                    version = self.storage.replace(self.key(shard), _bytes(lease), found[1])
                except WriteConflict:  # another thief was first, or the holder came back
                    return None
                claim = Claim(shard, version, lease)
                why = (f"no heartbeat for {self.seconds:.0f} s" if self.stale(found[0]) else
                       f"{found[0].seconds_left(at=datetime.now(UTC)):.0f} s left at its rate")
                log.warning("took shard %d from %s (%s)", shard, found[0].owner, why,
                            extra={"event": "lease_stolen", "fields": {
                                "shard": shard, "from": found[0].owner, "by": self.owner}})
        if claim is not None and self.is_done(shard):  # finished while we looked
            self._delete_if_mine(claim)
            return None
        return claim

    def _create(self, shard: int) -> Claim | None:
        lease = self._lease(shard)
        try:
            return Claim(shard, self.storage.create(self.key(shard), _bytes(lease)), lease)
        except WriteConflict:
            return None

    def renew(self, claim: Claim, done: int | None = None, total: int | None = None,
              rate: float | None = None) -> Claim:
        """The heartbeat, with the holder's progress: :class:`LeaseLost` if the lease was taken
        meanwhile."""
        update: dict = {"heartbeat_at": datetime.now(UTC)}
        if done is not None:
            update.update(done=done, total=total, rate=rate)
        lease = claim.lease.model_copy(update=update)
        try:
            version = self.storage.replace(self.key(claim.shard), _bytes(lease), claim.version)
        except WriteConflict as e:
            raise LeaseLost(f"the lease of shard {claim.shard} of run {self.run_id} was taken "
                            "by another worker (this one was presumed dead)") from e
        return Claim(claim.shard, version, lease)

    def finish(self, claim: Claim) -> None:
        """The shard is finished: mark it done (never claimed again), then drop its lease (a
        thief's too: it learns at its next renewal that there is nothing left to do)."""
        try:
            self.storage.create(self.done_key(claim.shard), b"")
        except WriteConflict:  # a thief finished it too
            pass
        self.storage.delete(self.key(claim.shard))

    def release(self, claim: Claim) -> None:
        """Stopped before the end: the shard is free to claim at once."""
        self._delete_if_mine(claim)

    def _delete_if_mine(self, claim: Claim) -> None:
        # A thief's lease is left alone (the window between this read and the delete is far
        # shorter than a lease: it would take a pause of a minute in between to lose it).
        found = self.read(claim.shard)
        if found is not None and found[1] == claim.version:
            self.storage.delete(self.key(claim.shard))


class Claimer:
    """The shards one worker (``index`` of ``workers``) works on, claimed one at a time.

    A listing of the lease folder gives the candidates: the free shards in
    :func:`claim_order`, then the leases not written for the lease time (and, when there are
    none, every lease: always on a local folder, where reads are cheap, once elsewhere: a
    holder may be a dead process of this host, taken over at once, see :meth:`LeaseBook.stale`;
    after that, in the tail of the run, a sample of them, to take a straggler's shard over when
    this worker would finish it in well under half the time: :meth:`LeaseBook.try_claim`).
    The
    worker claims from that list, and lists again as soon as a shard listed as free turns out to
    be taken (the list is out of date), so a claim usually costs a create and a check, not a
    listing. When a fresh listing yields
    nothing (every unfinished shard is held by a live worker), it waits ``poll`` seconds,
    doubling up to half the lease time (so a dead holder's shard is still taken within 1.5
    lease times), and lists again. Iteration ends when every shard is finished, or on ``stop``.
    """

    def __init__(self, book: LeaseBook, shards: int, index: int, workers: int,
                 poll: float | None = None, stop: threading.Event | None = None):
        self.book, self.shards, self.index, self.workers = book, shards, index, workers
        self.poll = poll if poll is not None else min(10.0, book.seconds / 6)
        self.stop = stop or threading.Event()
        self.order = list(claim_order(index, workers, shards))
        self._candidates: deque[int] = deque()
        self._free: set[int] = set()  # the candidates that were free when listed
        self._rng = random.Random(index)
        #: this worker's items/s so far (its runner sets it after each shard): with it, an idle
        #: worker takes over a live straggler's shard (:data:`TAKEOVER_FACTOR`)
        self.own_rate: float | None = None
        self._held_read = False  # whether the fresh leases were read once (dead local holders)
        #: claims made, steals among them, and listings of the lease folder
        self.claims = self.steals = self.listings = 0

    def state(self) -> tuple[set[int], dict[int, datetime]]:
        """(finished shards, held shard -> when its lease was last written), one listing."""
        self.listings += 1
        return self.book.listing()

    def _refresh(self) -> bool:
        """List the candidates again; False when every shard is finished."""
        done, held = self.state()
        if len(done) >= self.shards:
            return False
        old = datetime.now(UTC) - timedelta(seconds=self.book.seconds)
        free = [s for s in self.order if s not in done and s not in held]
        stale = [s for s in self.order if s not in done and s in held and held[s] < old]
        if not free and not stale:
            live = [s for s in self.order if s not in done and s in held]
            if isinstance(self.book.storage, LocalStorage) or not self._held_read:
                # read the live leases too: on a local folder always (reads are cheap),
                # elsewhere once (a run started again after `kill -9` takes its dead
                # processes' shards now)
                self._held_read = True
                stale = live
            elif self.own_rate:
                # the tail: look for a straggler among a few of them (each idle worker looks
                # at others, so together they see them all)
                stale = self._rng.sample(live, min(len(live), TAIL_SAMPLE))
        self._candidates = deque(free + stale)
        self._free = set(free)
        return True

    def next(self) -> Claim | None:
        """The next shard this worker holds; None when every shard is finished (or stopped)."""
        wait = self.poll
        while not self.stop.is_set():
            fresh = not self._candidates
            if fresh and not self._refresh():
                return None
            while self._candidates and not self.stop.is_set():
                shard = self._candidates.popleft()
                claim = self.book.try_claim(shard, faster_than=self.own_rate)
                if claim is not None:
                    self.claims += 1
                    self.steals += claim.lease.stolen_from is not None
                    return claim
                if shard in self._free:  # it was free when listed: the list is out of date
                    self._candidates.clear()
                    fresh = False
                    break
            if fresh:  # nothing to take now: others hold every unfinished shard
                self.stop.wait(wait)
                wait = min(2 * wait, max(self.poll, self.book.seconds / 2))
        return None

    def __iter__(self) -> Iterator[Claim]:
        while (claim := self.next()) is not None:
            yield claim


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _bytes(lease: Lease) -> bytes:
    return lease.model_dump_json(indent=1).encode()


__all__ = ["Claim", "Claimer", "Lease", "LeaseBook", "LeaseLost", "claim_order",
           "conditional_writes_work"]

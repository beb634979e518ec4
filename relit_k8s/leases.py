"""Shards claimed through leases in the output store (``balance: leases``, issue 15).

Under ``<output>/_relit/<run>/leases/``:

* ``<shard>.json``: the lease of a shard being worked on. A worker claims a shard by creating
  it with a create-only write (S3 ``If-None-Match: *``; a local exclusive create): of racing
  workers exactly one wins. Its heartbeat renews it with a write conditional on the version it
  last wrote (S3 ``If-Match``). A lease whose heartbeat is older than the lease time
  (``RELIT_LEASE_SECONDS``, default 60) may be stolen: the thief's write is conditional on the
  stale version, so exactly one thief wins, and the old holder's next renewal (or report write)
  fails with :class:`LeaseLost`: it stops working on that shard.
* ``<shard>.free``: a released shard. A worker stopped by SIGTERM writes it, then deletes its
  lease, so that another claims the shard at once (and deletes the marker).
* ``finished.json``: the finished shards as of a moment (``listed_at``) and the leases
  listed just before, published for the others: while it is younger than a poll interval
  (:attr:`Claimer.summary_seconds`) a worker's look reads it (one small read) instead of
  listing ``leases/`` and ``done/``; past its own shards, a worker whose look finds it older
  brings it up to date (a listing of ``leases/`` and one of ``done/``) and publishes it. So in
  the tail of a large run, when hundreds of workers look every few seconds, about one of them
  lists per poll interval for all. A summary only ever names shards whose ``done/`` marker
  exists, and what it lacks (shards claimed or finished since) costs a collision or a check,
  never a skipped shard.

and under ``<output>/_relit/<run>/done/``, ``<shard>``: the shard is finished (written before
its lease is deleted); a finished shard is never claimed again.

So a lease that goes away without a ``.free`` marker in its place was finished: a worker reads
the finished shards (``finished.json``, or ``done/``: one object per finished shard, one
request per 1,000) when it starts, and from then on a fresh ``finished.json``, or ``leases/``
(about one lease per busy worker), and follows the shards' fate from that; it takes a full
look again (through ``finished.json``) when its last look is too long ago for the leases it
saw to tell what was finished since (when it goes past its own shards), and before it stops
unless a summary named every shard. Clocks: staleness compares the lease's ``heartbeat_at``
(the holder's clock) with the thief's; a cluster's clocks agree within a second or so, far
inside 60 s.

The protocol once had more: a journal of finished shards, a marker for the one worker bringing
the summary up to date, a summary published in the background. ``benchmarks/fleet.py``'s
ablation found each within the noise at 16 and 64 workers (and the journal cost 8% more
requests): they were removed (benchmarks/README.md). The claim made ahead of a shard's end
(:meth:`Claimer.near_end`) stays: without it too, 16 workers were slower in every seed of one
side-by-side run, and in 4 of 5 seeds (equal in the fifth) of another.

Stores that ignore conditional writes (some S3-compatible servers) would let two workers win
the same shard: :func:`conditional_write_problem` finds out with one probe, at plan time and
when a worker starts on S3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, ValidationError

from . import clock
from .errors import NotFoundError, RelitError, Unsupported, WriteConflict
from .settings import WorkerSettings
from .storage import META_DIR, LocalStorage, Storage, process_alive

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
    #: at ``rate`` items/s (what ``status`` shows of the shards in progress)
    done: int = 0
    total: int | None = None
    rate: float | None = None


class FinishedSummary(BaseModel):
    """``<output>/_relit/<run>/leases/finished.json``: the shards finished when a worker
    listed ``done/``, as ``[first, last + 1)`` ranges, and the leases as that worker listed
    them a moment before: the picture of the run that a look needs, published by one worker
    per poll interval for all of them (:meth:`Claimer.state`)."""

    # fields added later are ignored by older readers, not a reason to list done/ again
    model_config = ConfigDict(extra="ignore")

    ranges: list[tuple[int, int]]
    #: every shard finished before this moment is named (the publisher's clock; None in
    #: summaries written before it was recorded: those are not read, but listed anew)
    listed_at: datetime | None = None
    #: the leases listed just before ``listed_at``: held shard -> when its lease was last
    #: written, and the released shards (None: not recorded; a look lists ``leases/``)
    held: dict[int, datetime] | None = None
    released: list[int] = []

    @classmethod
    def of(cls, shards: set[int], listed_at: datetime | None = None,
           leases: LeaseListing | None = None) -> FinishedSummary:
        ranges: list[tuple[int, int]] = []
        for s in sorted(shards):
            if ranges and ranges[-1][1] == s:
                ranges[-1] = (ranges[-1][0], s + 1)
            else:
                ranges.append((s, s + 1))
        if leases is None:
            return cls(ranges=ranges, listed_at=listed_at)
        return cls(ranges=ranges, listed_at=listed_at,
                   held={s: t for s, t in leases.held.items() if s not in shards},
                   released=sorted(leases.released - shards))

    def shards(self) -> set[int]:
        return {s for first, end in self.ranges for s in range(first, end)}

    def leases(self) -> LeaseListing:
        """The leases it records, as a listing of ``leases/`` made at ``listed_at`` shows them
        (a fresh summary)."""
        return LeaseListing(set(), dict(self.held or {}), set(self.released), self.listed_at,
                            self.listed_at)


SUMMARY = "finished.json"
#: Shards believed free but found finished (claimed and finished by others since this worker's
#: last look) before it lists again.
MISSES_BEFORE_LISTING = 16
#: Shards listed as free that another worker claimed first before a worker lists again.
COLLISIONS_BEFORE_LISTING = 4
#: About how many idle workers of a run look at the store per poll interval, together.
IDLE_POLLERS = 8
#: A worker claims its next shard this many claims' time before its current one ends
#: (:meth:`Claimer.near_end`), and at least this many seconds before.
AHEAD_CLAIMS = 4
AHEAD_MIN_SECONDS = 0.5
#: What a round of claiming ended with (:meth:`Claimer._round`).
_CLAIMED, _FINISHED, _IDLE, _RELIST = "claimed", "finished", "idle", "relist"
#: ... or the look brought the same picture again, whose free shards proved taken by others
_STALE = "stale"

#: The mechanisms of the protocol that ``benchmarks/fleet.py`` can switch off, one at a time,
#: to measure what each earns (its ablation rows); not a user option: only the benchmark sets
#: :data:`DISABLED`, in its own processes.
MECHANISMS = {
    "claim_ahead": "the next shard is claimed while the current one ends (Claimer.near_end)",
    "summary": "finished.json: a look reads one summary instead of listing leases/ and done/",
    "idle_backoff": "idle workers look the less often the more of them there are",
    "random_order": "past its own shards a worker tries the others in a random order",
}
#: The mechanisms switched off (names of :data:`MECHANISMS`); empty outside the benchmark.
DISABLED: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LeaseListing:
    """What one listing of ``leases/`` shows."""

    #: finished shards: none from :meth:`LeaseBook.leases` (a claimer infers them from the
    #: leases gone, or reads them, :meth:`LeaseBook.finished`), every one from
    #: :meth:`LeaseBook.listing`
    done: set[int]
    #: held shard -> when its lease was last written
    held: dict[int, datetime]
    #: shards released by a stopped worker, free to claim
    released: set[int]
    #: when ``finished.json`` was last published (None: never)
    summary_at: datetime | None = None
    #: when the listing began (this worker's clock)
    listed_at: datetime | None = None


@dataclass(frozen=True)
class Claim:
    """A lease this worker holds: the version it last wrote, for the next conditional write."""

    shard: int
    version: str
    lease: Lease


def new_owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def owner_process(owner: str) -> tuple[str, int | None]:
    """The host and process id of a lease's owner (:func:`new_owner`'s host/pid/token)."""
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    return host, int(pid) if pid.isdigit() else None


def default_poll(lease_seconds: float) -> float:
    """How long an idle worker waits before it looks again, by default: a sixth of the lease
    time, 10 s at most (``RELIT_LEASE_POLL`` sets it)."""
    return min(10.0, lease_seconds / 6)


def summary_seconds(lease_seconds: float, poll: float) -> float:
    """How long ``finished.json`` is taken as it is: ``poll`` seconds (2 at least: S3 times
    are to the second), half a lease time at most (see :attr:`Claimer.summary_seconds`)."""
    return max(2.0, min(lease_seconds / 2, poll))


def own_shards(index: int, workers: int, shards: int) -> range:
    """Worker ``index``'s own shards: ``index``, ``index + workers``, ... (the static split)."""
    return range(index % shards, shards, max(1, workers))


def claim_order(index: int, workers: int, shards: int) -> Iterator[int]:
    """The shards in the order worker ``index`` of ``workers`` tries them: its own first
    (``index``, ``index + workers``, ...: the static split), then the others in a random order
    of its own (seeded by ``index``), so that workers out of their own shards rarely race for
    the same shard. (In index order they race for the same few: the ablation of
    ``benchmarks/fleet.py``, in benchmarks/README.md, measured 1.35x of ideal without the
    random order against 1.09x with it, at 16 workers.)"""
    own = list(own_shards(index, workers, shards))
    yield from own
    mine = set(own)
    others = [s for s in range(shards) if s not in mine]
    if "random_order" not in DISABLED:
        random.Random(index).shuffle(others)
    yield from others


class LeaseBook:
    """The leases of one run, as seen by one worker (``owner``)."""

    def __init__(self, storage: Storage, run_id: str, owner: str | None = None,
                 seconds: float | None = None):
        self.storage, self.run_id = storage, run_id
        self.owner = owner or new_owner()
        self.seconds = WorkerSettings.from_env().lease_seconds if seconds is None else seconds
        #: shards this book saw finished: by its owner, or when a claim found them finished
        self.seen_done: set[int] = set()
        #: the bookkeeping thread of :meth:`finish_soon` (made on first use), its last job
        self._bookkeeper: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        #: guards ``_pending``: a claim made ahead (:meth:`Claimer.claim_ahead`) may settle from
        #: its thread while the worker's thread hands its finished shard over
        self._pending_lock = threading.Lock()

    @property
    def folder(self) -> str:
        return f"{META_DIR}/{self.run_id}/leases"

    @property
    def done_folder(self) -> str:
        return f"{META_DIR}/{self.run_id}/done"

    def key(self, shard: int) -> str:
        return f"{self.folder}/{shard}.json"

    def done_key(self, shard: int) -> str:
        return f"{self.done_folder}/{shard}"

    def _lease(self, shard: int, previous: Lease | None = None) -> Lease:
        now = clock.now()
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

    def free_key(self, shard: int) -> str:
        return f"{self.folder}/{shard}.free"

    def listing(self) -> LeaseListing:
        """The whole picture, for ``status`` and the CLI (not the claiming loop, which
        follows ``leases/``): one listing of ``leases/`` and one of ``done/``,
        with ``done`` every finished shard and ``held`` and ``released`` only unfinished
        ones."""
        found = self.leases()
        done = self.finished()
        return LeaseListing(done, {s: t for s, t in found.held.items() if s not in done},
                            found.released - done, found.summary_at)

    def finished(self) -> set[int]:
        """The finished shards (one listing of ``done/``)."""
        return {int(n) for n in self.storage.list_names(self.done_folder) if n.isdigit()}

    def publish(self, done: set[int], listed_at: datetime | None = None,
                leases: LeaseListing | None = None) -> None:
        """Write ``finished.json`` for the other workers: ``done``, every shard finished
        before ``listed_at``, and the ``leases`` listed just before (the held and released
        shards but the finished ones)."""
        self.publish_summary(FinishedSummary.of(done, listed_at, leases))

    def publish_summary(self, summary: FinishedSummary) -> None:
        """Write ``summary`` as ``finished.json`` (see :meth:`publish`)."""
        self.storage.write(self.summary_key, summary.model_dump_json().encode())

    @property
    def summary_key(self) -> str:
        return f"{self.folder}/{SUMMARY}"

    def published(self) -> set[int] | None:
        """The finished shards as another worker listed them (``finished.json``); None when
        there is none or it does not parse (then the caller lists ``done/``)."""
        summary = self.summary()
        return None if summary is None else summary.shards()

    def summary(self) -> FinishedSummary | None:
        """``finished.json``; None when there is none or it does not parse."""
        try:
            return FinishedSummary.model_validate_json(self.storage.read(self.summary_key))
        except NotFoundError:
            return None
        except ValidationError as e:
            log.warning("ignored %s: %s", self.summary_key, e.errors()[0]["msg"])
            return None

    def leases(self) -> LeaseListing:
        """One listing of ``leases/``: about one object per busy worker (``done`` empty: see
        :meth:`finished_since`)."""
        held: dict[int, datetime] = {}
        released: set[int] = set()
        summary_at = None
        listed_at = clock.now()
        for name, modified in self.storage.list_modified(self.folder).items():
            stem, _, ext = name.partition(".")
            if name == SUMMARY:
                summary_at = modified
            elif not stem.isdigit():
                continue
            elif ext == "json":
                held[int(stem)] = modified
            elif ext == "free":
                released.add(int(stem))
        return LeaseListing(set(), held, released, summary_at, listed_at)

    def is_done(self, shard: int) -> bool:
        return self.storage.exists(self.done_key(shard))

    def stale(self, lease: Lease) -> bool:
        """Its heartbeat is older than the lease time, or its holder was a process of this
        host that is gone (a local run killed with -9 is taken over at once when run again)."""
        if clock.now() - lease.heartbeat_at > timedelta(seconds=self.seconds):
            return True
        host, pid = owner_process(lease.owner)
        return host == socket.gethostname() and pid is not None and not process_alive(pid)

    def try_claim(self, shard: int, released: bool = False, held: bool = False,
                  check_first: bool = False, free: bool = False) -> Claim | None:
        """Claim ``shard`` if nobody holds it, or steal it from a holder whose heartbeat is
        older than the lease time (a live holder's shard is never taken, however slow it is:
        ``benchmarks/fleet.py`` measured no gain from that at 16 workers and, at 64, one shard
        passed from worker to worker hundreds of times, each thief found slow by the next).
        None if it is finished, another holds it, or another worker won the race for it.
        ``released``: the shard's lease was released (a ``.free`` marker): the marker is
        deleted once the shard is claimed or found finished (a marker left by a worker that
        claimed the shard without knowing would otherwise outlive it). ``held``: a listing
        showed it held: its lease is read first (a create would fail). ``check_first``: the
        shard may well be finished (another worker's, listed a while ago): its ``done/``
        marker is checked first, so that a shard found finished costs one request, not a
        create, a check and a delete. A shard claimed after its lease was found gone (released
        since the caller looked, by a summary a moment old) has its marker deleted too.
        ``free``: a look showed it free a moment ago: when the create fails, another worker
        claimed it since, and its lease (new: not stale) is not read (in the tail of a
        256-worker run, a read per shard lost to another worker was a fifth of the store's
        reads)."""
        claim, gone = self._try_claim(shard, held, check_first, free)
        if released and (claim is not None or shard in self.seen_done) or \
                gone and claim is not None:
            self.storage.delete(self.free_key(shard))
        return claim

    def _try_claim(self, shard: int, held: bool, check_first: bool,
                   free: bool) -> tuple[Claim | None, bool]:
        """:meth:`try_claim` but for the ``.free`` marker, and whether its lease was found
        gone; a shard found finished is added to :attr:`seen_done`."""
        if check_first and not held and self.is_done(shard):
            self.seen_done.add(shard)
            return None, False
        claim, gone = None if held else self._create(shard), False
        if claim is None and free:
            return None, False
        if claim is None:
            found = self.read(shard)
            if found is None:  # released (or finished) a moment ago
                claim, gone = self._create(shard), True
            elif self.stale(found[0]):
                lease = self._lease(shard, found[0])
                try:
                    version = self.storage.replace(self.key(shard), _bytes(lease), found[1])
                except WriteConflict:  # another thief was first, or the holder came back
                    return None, False
                claim = Claim(shard, version, lease)
                log.warning("took shard %d from %s (no heartbeat for %.0f s)", shard,
                            found[0].owner, self.seconds,
                            extra={"event": "lease_stolen", "fields": {
                                "shard": shard, "from": found[0].owner, "by": self.owner}})
        if claim is not None and self.is_done(shard):  # finished while we looked
            self.seen_done.add(shard)
            self.storage.delete(self.key(shard))  # gone without a .free marker: finished
            return None, gone
        return claim, gone

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
        update: dict = {"heartbeat_at": clock.now()}
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
        """The shard is finished: mark it done (never claimed again), then drop the lease (a
        thief's too: it learns at its next renewal that there is nothing left to do); the
        other workers see it finished at their next look (its lease gone without a ``.free``
        marker, or its ``done/`` marker)."""
        with contextlib.suppress(WriteConflict):  # a thief finished it too
            self.storage.create(self.done_key(claim.shard), b"")
        self.seen_done.add(claim.shard)
        self.storage.delete(self.key(claim.shard))

    def finish_soon(self, claim: Claim) -> None:
        """:meth:`finish` in this book's bookkeeping thread: the worker goes on to claim and
        run its next shard while the shard's two requests are made (they overlap with work
        instead of adding to every shard's time: ``benchmarks/fleet.py`` measured 90 ms a
        shard at 16 workers on moto, a GPU idle between shards). The shard counts as finished
        for this worker at once (:attr:`seen_done`). Finishes are made one at a time, in
        order; an error of one is raised by the next call or by :meth:`settle`. Should the
        process die before it is written, the shard is taken over when its lease goes stale
        and its outputs, all written, are skipped."""
        self.settle()
        self.seen_done.add(claim.shard)
        with self._pending_lock:
            if self._bookkeeper is None:
                self._bookkeeper = ThreadPoolExecutor(1, thread_name_prefix="relit-lease")
            self._pending = self._bookkeeper.submit(self.finish, claim)

    def settle(self) -> None:
        """Wait for the last :meth:`finish_soon`; raise its error, if it had one (in the
        thread that settles first, once)."""
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def release(self, claim: Claim) -> None:
        """Stopped before the end: the shard is free to claim at once. The ``.free`` marker
        is written before the lease is deleted: a lease gone without it means finished."""
        # A thief's lease is left alone (the window between this read and the delete is far
        # shorter than a lease: it would take a pause of a minute in between to lose it).
        found = self.read(claim.shard)
        if found is not None and found[1] == claim.version:
            self.storage.write(self.free_key(claim.shard), b"")
            self.storage.delete(self.key(claim.shard))


class Claimer:
    """The shards one worker (``index`` of ``workers``) works on, claimed one at a time.

    A listing gives the candidates: first the leases not written for the lease time (a dead
    holder's shard is taken as soon as it is stale, not at the end of the run, where it would
    make the tail), then the free shards in :func:`claim_order`. When there are none, the
    live leases: all of them on a local folder (reads are cheap) and on the first listing of a
    worker (a holder may be a dead process of this host, taken over at once, see
    :meth:`LeaseBook.stale`). The worker claims from that list, so a claim usually costs
    a create and a check, not a listing; it lists again after
    :data:`COLLISIONS_BEFORE_LISTING` shards listed as free turned out taken by others (the
    list is out of date), and does not try again a shard it found taken until a look newer
    than that. It claims another worker's shard listed as free only from a look younger than
    a poll interval (after a shard of its own, it looks again first). Others' shards are
    checked first (one request when finished) unless the look
    is fresh (:meth:`_fresh`).

    A look, a worker's first too, reads a ``finished.json`` younger than a poll interval (the
    finished shards and the leases another worker listed: one read); without one, a worker
    reads the finished shards (``done/``, one object per finished shard, see
    :meth:`_finished`) at its first look, and after that ``leases/`` (about one lease per busy
    worker: a lease gone without a ``.free`` marker was finished): a look costs a read or a
    small listing, not one of every finished shard (see :meth:`state`); it takes a full look
    again when its look before is too long ago (when it goes past its own shards), and before
    it stops (unless a summary named every shard); it looks again after
    :data:`MISSES_BEFORE_LISTING` shards believed free turned out finished. When a listing
    yields nothing free (every unfinished shard is held by a live worker), the worker waits,
    then looks again: ``poll`` seconds times the idle workers over :data:`IDLE_POLLERS` (so
    that a thousand idle workers do not ask the store a thousand times as often as eight), up
    to the lease time, jittered; while it waits it reads ``finished.json`` every half lease
    time, to leave soon after the run ends. Iteration ends when every shard is finished, or on
    ``stop``.
    """

    def __init__(self, book: LeaseBook, shards: int, index: int, workers: int,
                 poll: float | None = None, stop: threading.Event | None = None):
        self.book, self.shards, self.index, self.workers = book, shards, index, workers
        self.poll = poll if poll is not None else default_poll(book.seconds)
        self.stop = stop or threading.Event()
        self.order = list(claim_order(index, workers, shards))
        self._candidates: deque[int] = deque()
        self._free: set[int] = set()  # the candidates that were free when listed
        self._rng = random.Random(index)
        self._own = set(own_shards(index, workers, shards))
        self._init_picture()
        self._init_counters()
        self._init_ahead()

    def _init_picture(self) -> None:
        """What this worker knows of the store: the shards finished, held, released, taken."""
        #: what the listings showed: finished shards, the held and the released ones
        self._done: set[int] = set()
        #: the finished shards the store showed (summaries, listings, markers, checks), without
        #: the ones inferred from a lease gone (a lease deleted by hand must not count)
        self._verified: set[int] = set()
        self._held: dict[int, datetime] = {}
        self._released: set[int] = set()
        #: shards believed free that were found finished since the last listing
        self._misses = 0
        self._look_in_full = False  # whether the next look reads the finished shards
        #: shards listed as free found taken by another worker since the last listing
        self._collisions = 0
        #: those shards, with when: not candidates while this worker's picture of the leases
        #: (listed at ``_held_at``) is older than that (:meth:`_refresh`)
        self._taken: dict[int, datetime] = {}
        self._held_at: datetime | None = None
        #: the picture (``_held_at``) whose list was given up after too many collisions: a
        #: look that brings it again waits for a newer one (:meth:`_round`)
        self._lost_on: datetime | None = None
        self._beyond_own = False  # whether this worker went past its own shards
        self._full = False  # whether the last look read the finished shards too
        #: the moment up to which this worker knows the finished shards; None before its
        #: first look
        self._known_at: datetime | None = None
        self._looked_at = 0.0  # when it last listed (monotonic)
        self._ended = False  # finished.json named every shard while this worker waited
        self._why = "first"  # why the next look is made (:attr:`looks`)

    def _init_counters(self) -> None:
        """What this claimer did, for the logs and ``benchmarks/fleet.py``."""
        #: claims made, steals among them, looks made (listings of leases/, or reads of a
        #: fresh finished.json: :attr:`summary_looks`), listings of done/ made (each then
        #: published as finished.json), finished.json read in place of one, and looks that
        #: went on with an old summary for a random part of a poll interval (another worker
        #: is likely to bring it up to date meanwhile)
        self.claims = self.steals = self.listings = self.done_listings = self.summaries = 0
        self.deferred = 0
        #: looks made from a fresh ``finished.json`` with its leases, without a listing
        self.summary_looks = 0
        #: shards believed free found finished (misses), or taken by another worker
        #: (collisions), over this claimer's life
        self.missed = self.collided = 0
        #: the misses by whose shard (this worker's own, or others') and whether the look was
        #: fresh (:meth:`_fresh`: then a miss costs a create, a check and a delete)
        self.misses: Counter[str] = Counter()
        #: reads of ``finished.json`` by this worker while idle, to see the run finished
        #: (:meth:`_wait_idle`)
        self.end_checks = 0
        #: the looks this worker made, by why: its first look, its list of candidates used
        #: up, past its own shards, another's shard next on a list older than a poll interval
        #: (``old list``), too many misses, too many collisions, after an idle wait, the check
        #: before it stops (``benchmarks/fleet.py`` prints them)
        self.looks: Counter[str] = Counter()
        #: seconds a claim took of late (moving average), from the look to the lease written
        self.claim_seconds = AHEAD_MIN_SECONDS / AHEAD_CLAIMS

    def _init_ahead(self) -> None:
        """The claim made ahead, in a thread of this claimer (:meth:`claim_ahead`)."""
        #: the shard the worker runs while a claim is made ahead (not a candidate of it)
        self._current: int | None = None
        self._ahead: Future | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._ahead_lock = threading.Lock()

    def state(self) -> tuple[set[int], dict[int, datetime]]:
        """(finished shards, held shard -> when its lease was last written), as looked at now:
        from ``finished.json`` when another worker published it less than
        :attr:`summary_seconds` ago with the leases it listed (one small read:
        :meth:`_from_summary`), at a worker's first look too; otherwise listed
        (:meth:`_listed`)."""
        self.listings += 1
        self.looks[self._why] += 1
        self._why = "used up"  # unless told otherwise before the next one
        found = None if self._look_in_full else self._summary_look()
        if found is None:
            found = self._listed()
        self._looked_at = clock.monotonic()
        self._misses = 0
        self._held, self._released = found.held, found.released
        self._held_at = found.listed_at
        return self._done, self._held

    def _summary_look(self) -> LeaseListing | None:
        """A look from ``finished.json`` (:meth:`_from_summary`) when it records the leases
        and was listed less than :attr:`summary_seconds` ago (by the publisher's clock: a
        cluster's agree within a second or so). Past its own shards, a worker also takes one
        younger than :attr:`full_look_seconds`: it brings it up to date for the others (a
        listing of ``leases/`` and one of ``done/``), or, for a random part of a poll interval
        more, goes on with it; so hundreds of workers that find it old at once do not all
        list. None: this look lists (:meth:`_listed`)."""
        if "summary" in DISABLED:
            return None
        summary = self.book.summary()
        if summary is None or summary.held is None or summary.listed_at is None:
            return None
        age = (clock.now() - summary.listed_at).total_seconds()
        if age <= self.summary_seconds:
            return self._from_summary(summary)
        if not self._beyond_own or age > self.full_look_seconds:
            return None
        if age <= self.summary_seconds * (1 + self._rng.random()):
            # each worker waits a random part of a poll interval more before it lists, so
            # that of those that find it old at once, one brings it up to date and the others
            # read what it published
            self.deferred += 1
            return self._from_summary(summary)
        return self._from_summary(self._republished())

    def _brought_up_to_date(self, found: LeaseListing | None = None) -> FinishedSummary:
        """The run's picture for ``finished.json``, for the caller to publish: ``leases/`` as
        ``found`` (listed now when None) and ``done/`` listed now, with this worker's own
        finished shards (settled first: their ``done/`` markers exist). Two workers at it at
        once publish two pictures a moment apart, each true as of its ``listed_at``."""
        found = self.book.leases() if found is None else found
        self.book.settle()  # its own last shard is in what it publishes
        self.done_listings += 1
        listed_at = clock.now()
        done = self.book.finished() | self.book.seen_done
        return FinishedSummary.of(done, listed_at, found)

    def _from_summary(self, summary: FinishedSummary) -> LeaseListing:
        """A look at the run as another worker listed it a moment ago: the finished shards
        (complete as of its ``listed_at``) and the leases. In the tail of a large run hundreds
        of workers look every few seconds; with one worker listing for all per
        :attr:`summary_seconds`, a look is one read. What it lacks, shards claimed or finished
        since, costs a collision or a check (conditional writes and ``done/`` markers are the
        truth), never a shard skipped or done twice."""
        assert summary.listed_at is not None
        self.summary_looks += 1
        self._verified |= self.book.seen_done | summary.shards()
        self._done = set(self._verified)  # nothing inferred: no check before stopping
        self._full = True
        self._known_at = max(summary.listed_at, self._known_at or summary.listed_at)
        return summary.leases()

    def _listed(self) -> LeaseListing:
        """A look that lists ``leases/`` and reads the finished shards (:meth:`_finished`)
        at the first look and when a full look is due; otherwise it infers them from the
        look before: a lease gone without a ``.free`` marker was finished (a lease deleted by
        hand is checked before the worker stops)."""
        found = self.book.leases()
        assert found.listed_at is not None
        self._full = self._known_at is None or self._look_in_full or \
            (found.listed_at - self._known_at).total_seconds() > self.full_look_seconds
        if self._full:  # what the store says, in place of what was inferred
            finished, known_at = self._finished(found)
            # added to what earlier looks found (a shard once finished stays finished)
            self._verified |= self.book.seen_done | finished
            self._done = set(self._verified)
            self._look_in_full = False
            # what it knew stays known (a summary may be older than its last look)
            self._known_at = max(known_at, self._known_at or known_at)
        else:
            seen = set(self.book.seen_done)
            self._known_at = found.listed_at
            if self._summary_due(found):
                seen |= self._republished(found).shards()
            self._verified |= seen
            gone = set(self._held) - set(found.held) - found.released
            self._done |= seen | gone
        return found

    @property
    def full_look_seconds(self) -> float:
        """A look infers what was finished since the look before from the leases gone when
        that is at most this long ago (three poll intervals), and takes a full look otherwise
        (``finished.json``, or ``done/``): a shard claimed and finished between two looks is
        never seen held, and each such shard costs a check when it is tried."""
        return 3 * self.summary_seconds

    def _summary_due(self, found: LeaseListing) -> bool:
        """Whether this look, past this worker's own shards (in the tail of the run, when
        workers come back from their own shards and take full looks), brings
        ``finished.json`` up to date for the others (:meth:`_republished`): it is older than
        :attr:`summary_seconds`. So the summary they read stays a poll interval old or so."""
        if not self._beyond_own or found.summary_at is None or "summary" in DISABLED:
            return False
        age = (clock.now() - found.summary_at).total_seconds()
        return age > self.summary_seconds

    def _finished(self, found: LeaseListing) -> tuple[set[int], datetime]:
        """(The finished shards, the moment up to which they are complete): as another worker
        published them less than :attr:`summary_seconds` ago (``finished.json``, one request);
        else listed by this worker (``done/``, :meth:`_brought_up_to_date`) and published. A
        summary only ever names finished shards, so what it lacks costs checks, never a
        skipped shard."""
        if "summary" in DISABLED:
            self.done_listings += 1
            at = clock.now()
            return self.book.finished(), at
        if found.summary_at is not None and \
                clock.now() - found.summary_at <= timedelta(seconds=self.summary_seconds):
            summary = self.book.summary()
            if summary is not None and summary.listed_at is not None:
                self.summaries += 1
                return summary.shards(), summary.listed_at
        # none, an old one, or one of an older version (without listed_at)
        fresh = self._brought_up_to_date(found)
        done = fresh.shards()
        # nothing to tell (a new run), or a finished run that this worker did nothing of (a
        # rerun): left as it is, no write; a run that ends now is published finished, so that
        # the other workers see it with one request and leave
        if done and (len(done) < self.shards or self.claims):
            self.book.publish_summary(fresh)
        assert fresh.listed_at is not None
        return done, fresh.listed_at

    def _republished(self, found: LeaseListing | None = None) -> FinishedSummary:
        """``finished.json`` brought up to date (:meth:`_brought_up_to_date`, with the leases
        ``found`` when given) and published."""
        fresh = self._brought_up_to_date(found)
        self.book.publish_summary(fresh)
        return fresh

    @property
    def summary_seconds(self) -> float:
        """How long ``finished.json`` is taken as it is: ``poll`` seconds (2 at least: S3
        times are to the second), half a lease time at most. In the tail of a large run
        hundreds of shards finish a minute: an idle worker whose summary is older checks shard
        after finished shard; one worker lists ``done/`` anew instead, for all."""
        return summary_seconds(self.book.seconds, self.poll)

    def _refresh(self) -> bool:
        """List the candidates again; False when every shard is finished."""
        if self._ended:  # finished.json named every shard while this worker waited
            return False
        first = self.listings == 0
        done, held = self.state()
        if len(done) >= self.shards and not self._full:
            # before it stops, the worker checks what it inferred: a lease deleted by hand
            # (not finished, no .free marker) must not leave a shard undone
            self._look_in_full = True
            self._why = "before stopping"
            done, held = self.state()
        if len(done) >= self.shards:
            return False
        old = clock.now() - timedelta(seconds=self.book.seconds)
        # held by this worker (not a candidate of a claim ahead), or found taken by another
        # since the leases were listed: a look that reads the same summary again (at 256
        # workers, after a round of collisions, a moment later) would otherwise try the same
        # shards again, and again, until another worker published a newer one
        seen = self._held_at
        self._taken = {s: at for s, at in self._taken.items() if seen is None or at > seen}
        mine = {self._current} | self._taken.keys()
        free = [s for s in self.order if s not in done and s not in held and s not in mine]
        stale = [s for s in self.order if s not in done and s in held and held[s] < old
                 and s not in mine]
        if not free and not stale:
            live = [s for s in self.order if s not in done and s in held and s not in mine]
            if isinstance(self.book.storage, LocalStorage) or first:
                # read the live leases too: on a local folder always (reads are cheap),
                # elsewhere on a worker's first look (a run started again after `kill -9`
                # takes its dead processes' shards now)
                stale = live
        self._collisions = 0
        self._candidates = deque(stale + free)
        self._free = set(free)
        return True

    def _idle_wait(self) -> float:
        """How long an idle worker waits before it looks again: ``poll`` seconds times the
        idle workers over :data:`IDLE_POLLERS`, so that together they look about that many
        times per ``poll`` however many they are, up to the lease time (each idle worker
        looks that often at least, for silent leases to take over: without that cap 256 idle
        workers waited five minutes each, and ``benchmarks/fleet.py`` measured no gain, 1.29x
        of ideal against 1.22x and 1.26x with it).
        Meanwhile it notices the end of the run from ``finished.json`` (:meth:`_wait_idle`)."""
        if "idle_backoff" in DISABLED:
            return self.poll
        idle = max(1, self.workers - len(self._held))
        return min(max(self.poll, self.book.seconds),
                   self.poll * max(1.0, idle / IDLE_POLLERS))

    @property
    def end_check_seconds(self) -> float:
        """How often an idle worker that waits reads ``finished.json`` to see whether the run
        is finished (half a lease time, a poll interval at least): a worker leaves that soon
        after the run ends, whatever its wait between looks."""
        return max(self.poll, self.book.seconds / 2)

    def _wait_idle(self, seconds: float) -> None:
        """Wait ``seconds`` before the next look (or until stopped), reading ``finished.json``
        (one small object) every :attr:`end_check_seconds`: when it names every shard, the
        run is finished (a summary names only shards whose ``done/`` marker exists) and the
        next look is not made (:attr:`_ended`)."""
        end = clock.monotonic() + seconds
        if "summary" in DISABLED:  # nothing to read: the next look sees the run finished
            self.stop.wait(seconds)
            return
        while not self._ended:
            left = end - clock.monotonic()
            if left <= 0 or self.stop.wait(min(left, self.end_check_seconds)) or \
                    clock.monotonic() >= end:
                return
            self.end_checks += 1
            published = self.book.published()
            self._ended = published is not None and len(published) >= self.shards

    def next(self) -> Claim | None:
        """The next shard this worker holds; None when every shard is finished (or stopped).
        A claim made ahead (:meth:`claim_ahead`) is taken first."""
        claim = self._take_ahead()
        if claim is not None:
            return self._holding(claim)
        # the last shard is over (finished, lost, or released after a failure: then it may
        # be claimed again, by this worker too)
        self._current = None
        while not self.stop.is_set():
            claim, outcome = self._round()
            if claim is not None:
                return self._holding(claim)
            if outcome == _FINISHED:
                break
            if outcome == _IDLE:  # nothing to take now: others hold every unfinished shard
                self._wait_idle(self._idle_wait() * self._rng.uniform(0.75, 1.25))
                self._why = "idle"
            elif outcome == _STALE:  # until another worker publishes a newer picture
                self._wait_idle(self.summary_seconds * self._rng.uniform(0.5, 1.5))
                self._why = "stale"
        self.close()  # this worker's last finish is written before it leaves
        return None

    def _holding(self, claim: Claim) -> Claim:
        self._current = claim.shard
        return claim

    def _round(self) -> tuple[Claim | None, str]:
        """One try: the candidates listed (listing again when there are none left), tried in
        turn; (the claim, :data:`_CLAIMED`), or (None, why: :data:`_FINISHED`, :data:`_IDLE`
        when a fresh list had nothing to take, :data:`_RELIST` when the list proved out of
        date, :data:`_STALE` when the look brought the picture of a list given up again)."""
        started = clock.monotonic()
        fresh = not self._candidates
        if fresh and not self._refresh():
            return None, _FINISHED
        if fresh and self._lost_on is not None and self._held_at == self._lost_on:
            # the look read the summary whose free shards proved taken by others a moment
            # ago: at 256 workers, in the race for the last shards, hundreds of workers went
            # through the rest of it, a create that fails after another, on a store already
            # saturated; the worker waits for a newer one instead
            self._candidates.clear()
            return None, _STALE
        while self._candidates and not self.stop.is_set():
            shard = self._candidates.popleft()
            if shard in self._free and shard not in self._own:
                # another's shard, listed as free: claimed only from a look younger than a
                # poll interval. What a worker looked at before it worked through its own
                # shards, or before its last shard (half a minute or more), is out of date:
                # at 256 workers each first checked 16 finished shards before it listed
                # again, and later 9 of 10 misses came from going on with a list after a
                # shard. A look again costs a read of a fresh finished.json, mostly; in full
                # when the last one is too long ago (see state())
                first, self._beyond_own = not self._beyond_own, True
                if clock.monotonic() - self._looked_at > self.summary_seconds:
                    self._candidates.clear()
                    self._why = "past own" if first else "old list"
                    return None, _RELIST
            recent = self._fresh()
            claim = self.book.try_claim(shard, released=shard in self._released,
                                        held=shard in self._held,
                                        check_first=shard not in self._own and not recent,
                                        free=shard in self._free)
            if claim is not None:
                self.claims += 1
                self.steals += claim.lease.stolen_from is not None
                self.claim_seconds = 0.8 * self.claim_seconds + \
                    0.2 * (clock.monotonic() - started)
                return claim, _CLAIMED
            if shard in self.book.seen_done:  # finished while this worker looked away
                self._misses += 1
                self.missed += 1
                self.misses[("own" if shard in self._own else "others") +
                            (", fresh look" if recent else "")] += 1
                if self._misses < MISSES_BEFORE_LISTING:
                    continue
                self._candidates.clear()  # too many: the list is out of date
                self._why = "misses"
                return None, _RELIST
            if shard in self._free:  # it was free when listed: another worker was first
                self._taken[shard] = clock.now()
                self._collisions += 1
                self.collided += 1
                if self._collisions < COLLISIONS_BEFORE_LISTING:
                    continue
                self._candidates.clear()  # too many: the list is out of date
                self._why = "collisions"
                self._lost_on = self._held_at
                return None, _RELIST
        return None, (_IDLE if fresh else _RELIST)

    def _fresh(self) -> bool:
        """Whether this worker's picture of the run is at most :attr:`summary_seconds` old:
        then a shard it shows free is claimed without checking its ``done/`` marker first
        (finished within a poll interval of a look: seldom; the check after the create finds
        it). In the tail of a 256-worker run each claim of another's shard, and each
        collision, cost that check: a fifth of the requests on a saturated store. An older
        picture's free shards may well be finished: each is checked first (one request, not a
        create, a check and a delete)."""
        return self._known_at is not None and \
            (clock.now() - self._known_at).total_seconds() <= self.summary_seconds

    # --- claiming ahead ----------------------------------------------------------------------
    @property
    def lead_seconds(self) -> float:
        """How long before the end of its shard a worker claims its next one
        (:meth:`near_end`): :data:`AHEAD_CLAIMS` claims' time, as this worker's claims took
        of late (a held lease waits that long unused, a sliver of a shard)."""
        return max(AHEAD_MIN_SECONDS, AHEAD_CLAIMS * self.claim_seconds)

    def near_end(self, seconds_left: float) -> None:
        """Told by the worker as its shard runs: with ``seconds_left`` under
        :attr:`lead_seconds`, the next shard is claimed ahead (once per shard)."""
        if seconds_left <= self.lead_seconds and "claim_ahead" not in DISABLED:
            self.claim_ahead()

    def claim_ahead(self) -> None:
        """Claim the next shard in a thread of this claimer while the worker finishes its
        current one, so that the worker goes from shard to shard without waiting for the
        store (without it, 16 workers were slower: the module's words, benchmarks/README.md).
        One round of :meth:`next` without its idle wait: when there is nothing to take now,
        :meth:`next` looks again as it would have. Once per shard; a claim made ahead is
        returned by the next :meth:`next`, or released by :meth:`close`."""
        with self._ahead_lock:  # told from the worker's write threads
            if self._ahead is not None or self.stop.is_set():
                return
            if self._ahead_pool is None:
                self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="relit-claim")
            self._ahead = self._ahead_pool.submit(self._claim_once)

    def _claim_once(self) -> Claim | None:
        for _ in range(3):  # a list found out of date is made again, at most twice
            claim, outcome = self._round()
            if outcome != _RELIST or self.stop.is_set():
                return claim
        return None

    def _take_ahead(self) -> Claim | None:
        """The claim made ahead, if any (its error raised here); released when stopped."""
        with self._ahead_lock:
            ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        claim = ahead.result()
        if claim is not None and self.stop.is_set():
            self.book.release(claim)
            return None
        return claim

    def close(self) -> None:
        """The worker leaves (a failure, a stop): a claim made ahead is released at once, for
        another worker to take, and this worker's last finished shard is written."""
        try:
            claim = self._take_ahead()
            if claim is not None:
                self.book.release(claim)
        except RelitError as e:  # left to go stale and be taken over
            log.warning("could not release the shard claimed ahead: %s", e)
        finally:
            with self._ahead_lock:
                pool, self._ahead_pool = self._ahead_pool, None
            if pool is not None:
                pool.shutdown(wait=True)
            self.book.settle()

    def __iter__(self) -> Iterator[Claim]:
        while (claim := self.next()) is not None:
            yield claim


class ClaimHooks:
    """What :meth:`~relit_k8s.worker.ShardRunner.run_claimed` tells its caller (each does
    nothing here): the local runner turns them into events for its parent, and retries
    temporary failures."""

    def begin(self, shard: int) -> None:
        """This worker claimed ``shard`` and starts it."""

    def left(self, shard: int) -> None:
        """``shard`` is no longer this worker's (taken over, or released to be retried)."""

    def finished(self, shard: int) -> None:
        """``shard`` is done and marked finished."""

    def retry(self, shard: int, error: BaseException, in_a_row: int) -> float | None:
        """``shard`` failed (``in_a_row`` failures without a finished shard between them):
        seconds to wait before claiming again, or None to end with ``error``."""
        return None


def conditional_write_problem(storage: Storage) -> str | None:
    """What ``storage`` gets wrong about the conditional writes leases stand on, in words, or
    None when it does them all: a probe object created (``If-None-Match: *``) and created
    again, which must lose; replaced on its current version (``If-Match``), which must win;
    replaced on the version it had before, which must lose; then deleted. Stores that ignore
    the headers let the losers win; some answer ``501 NotImplemented``."""
    key = f"{META_DIR}/probe-{uuid.uuid4().hex}.json"
    problems = []
    try:
        storage.create(key, b'{"probe": 1}')
        try:
            storage.create(key, b'{"probe": 2}')
            problems.append("a second create-only write of one object (If-None-Match: *) won")
        except WriteConflict:
            pass
        stale = storage.read_versioned(key)[1]
        try:
            storage.replace(key, b'{"probe": 3}', stale)
        except WriteConflict:
            problems.append("a write conditional on the object's current version (If-Match) "
                            "lost")
        else:
            try:  # ``stale`` is the version it had before that write
                storage.replace(key, b'{"probe": 4}', stale)
                problems.append("a write conditional on a version the object no longer has "
                                "(If-Match) won")
            except WriteConflict:
                pass
    except Unsupported as e:
        problems.append(f"conditional writes are not implemented ({e})")
    finally:
        with contextlib.suppress(RelitError):
            storage.delete(key)
    return "; ".join(problems) or None


def conditional_writes_work(storage: Storage) -> bool:
    """Whether ``storage`` does the conditional writes leases need
    (:func:`conditional_write_problem` finds none)."""
    return conditional_write_problem(storage) is None


def _bytes(lease: Lease) -> bytes:
    return lease.model_dump_json(indent=1).encode()


__all__ = ["Claim", "Claimer", "FinishedSummary", "Lease", "LeaseBook", "LeaseLost",
           "claim_order", "conditional_write_problem", "conditional_writes_work"]

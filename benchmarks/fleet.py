"""Fleet balance: static shards against leases, as makespan / ideal at W simulated workers.

The real claiming code (relit_k8s.leases: LeaseBook, Claimer) runs against a real S3 server in
a process of its own on 127.0.0.1: SeaweedFS by default (``--store moto``: moto's server, a
mock, kept as a stress row). W worker threads stand for W GPU pods; their "relighter" keeps
to each item's scaled time, and each unit's output is a real object written to the store.

Time is scaled: a row's ideal makespan (``--seconds``) stands for ``--real-minutes`` of a real
run, and every real cost is scaled the same way:

* pods: every pod pays a start before its first item (scheduling, image, model load): a cold
  start (93 s, measured on an H200 node without the image) for the first pod of a slot and for
  a replacement (a killed pod's node is gone), a warm start (53 s, the measured warm worker
  start) for later pods of the same slot; a killed pod's index is retried after the Job
  controller's backoff (10 s, doubling per failure of that index, 6 minutes at most);
* static (one Job index per shard, ``completions`` = shards, at most ``parallelism`` = W pods
  at once): every index is a pod of its own, so a shard pays a start; swept over 1, 2, 4, 8,
  16 and 32 shards per worker;
* leases: W pods, one start each (a replacement: backoff + cold start), claiming 32 shards per
  worker (the planner's default) through leases; the lease time is the real default (60 s);
* the store's latency per request: drawn from a lognormal with p50 20 ms and p99 150 ms
  (``--latency-p50-ms``, ``--latency-p99-ms``; S3's first-byte latency for small objects, see
  benchmarks/README.md), scaled like the work and added in the client before each request is
  sent (a sleep: no CPU), on top of the local server's own.

Scenarios (``--scenario``, repeatable; each on its own seeds): ``uniform`` (every item takes
the same time), ``heavy-tail`` (lognormal item times, sigma 1), ``stragglers-1.5x``,
``stragglers-3x``, ``stragglers-10x`` (heavy-tailed items, 10% of the workers that much
slower), ``kills`` (heavy-tailed items, 5% of the workers killed mid-shard: kill -9, no report,
no release), ``mixed`` (heavy-tailed, 10% 3x slower, 5% killed: the one scenario of earlier
runs). ideal = total work / total worker speed, without pod starts.

Per row: makespan / ideal, units lost (must be 0), units processed twice (with leases only
after a steal, outputs byte-identical), claims, S3 requests and their latency. Then, per
workers and scenario over the seeds, the median and the range (min-max) of each balance, the
best static row beside leases, and "better" only where the ranges do not overlap.

Usage: python benchmarks/fleet.py --quick --jobs 3 --out benchmarks/results/fleet_quick_cpu.json
                                                   (19.7 minutes on this project's 2 cores)
       python benchmarks/fleet.py --workers 16 64 256 --seeds 1,2,3,4,5   (hours)
       python benchmarks/fleet.py --workers 16 --seeds 1,2 --scenario kills --out F.json
       python benchmarks/fleet.py --smoke     (a few seconds: the CI's check that it runs)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context

import provenance
from s3_servers import STORES, Server

from relit_k8s.leases import MECHANISMS
from relit_k8s.planner import LEASE_SHARDS_PER_WORKER

#: Seconds of ideal makespan per row by default: 3.75 s times the workers, so that every row
#: asks the store for about the same requests per second.
DEFAULT_SECONDS = {16: 60.0, 64: 240.0, 256: 960.0}
UNITS_PER_WORKER = 64
ITEMS_PER_UNIT = 32
#: Static shards per worker, swept (the Job's completions = this x W).
STATIC_SWEEP = (1, 2, 4, 8, 16, 32)
#: What the claimers did, summed over the row (Claimer's counters of the same names).
CLAIMER_COUNTS = ("listings", "summary_looks", "done_listings", "summaries", "deferred",
                  "missed", "collided", "end_checks")


@dataclass(frozen=True)
class Scenario:
    """How unkind a fleet is: item times, slow workers, killed workers."""

    items: str  # "uniform" or "lognormal" (sigma 1)
    slow_fraction: float = 0.0
    slow_factor: float = 1.0
    killed_fraction: float = 0.0


SCENARIOS = {
    "uniform": Scenario("uniform"),
    "heavy-tail": Scenario("lognormal"),
    "stragglers-1.5x": Scenario("lognormal", 0.10, 1.5),
    "stragglers-3x": Scenario("lognormal", 0.10, 3.0),
    "stragglers-10x": Scenario("lognormal", 0.10, 10.0),
    "kills": Scenario("lognormal", killed_fraction=0.05),
    "mixed": Scenario("lognormal", 0.10, 3.0, 0.05),
}


@dataclass(frozen=True)
class Pods:
    """What Kubernetes charges, in real seconds, and the real run a row stands for."""

    #: the real ideal makespan one row stands for (minutes): sets the time scale
    real_minutes: float = 30.0
    #: a pod's start on a node without the image (scheduling, pull, model load), and with it
    cold_seconds: float = 93.0
    warm_seconds: float = 53.0
    #: the Job controller's retry delay for a failed index: first, doubling, at most
    backoff_seconds: float = 10.0
    backoff_cap_seconds: float = 360.0
    #: the lease time (RELIT_LEASE_SECONDS's default)
    lease_seconds: float = 60.0
    #: ... but at least this many sim seconds: the lease protocol has costs that do not scale
    #: (request latency of the local server, thread wake-ups on 2 shared cores, the claim
    #: ahead's half second), and a lease of 1 sim second measured those (3.3x ideal, half the
    #: claims steals of live shards); a longer lease only makes a killed worker's shard wait
    #: longer, which favours static in the kill scenarios
    min_lease_sim_seconds: float = 5.0


@dataclass(frozen=True)
class Latency:
    """The store's latency per request (real milliseconds): lognormal through p50 and p99."""

    p50_ms: float = 20.0
    p99_ms: float = 150.0

    def sampler(self, scale: float, seed: int):
        """Seconds to wait before a request, scaled like the row's time (thread-safe)."""
        mu = math.log(self.p50_ms / 1000)
        sigma = math.log(self.p99_ms / self.p50_ms) / 2.3263  # z of the 99th percentile
        rng, lock = random.Random(seed), threading.Lock()

        def draw() -> float:
            with lock:
                return rng.lognormvariate(mu, sigma) * scale
        return draw


@dataclass
class Row:
    balance: str
    workers: int
    shards: int
    ideal_s: float
    scenario: str = "mixed"
    seed: int = 0
    shards_per_worker: int = 0
    #: sim seconds per real second (the row's ideal over --real-minutes)
    time_scale: float = 1.0
    #: what each pod paid to start (sim seconds): cold and warm, and how many pods started
    pod_start_seconds: dict = field(default_factory=dict)
    pods_started: int = 0
    #: leases: the mechanism switched off in this row (the ablation), or None
    disabled: str | None = None
    #: the machine's 1-minute load average as the row ended (rows run side by side)
    load_average: float = 0.0
    makespan_s: float = 0.0
    units: int = 0
    units_lost: int = 0
    units_twice: int = 0
    twice_without_steal: int = 0
    twice_not_identical: int = 0
    claims: int = 0
    steals: int = 0
    #: worker-seconds spent waiting for a claim (from the end of one shard to the start of
    #: the next, the first included; not the last wait, that ends with nothing left), and
    #: waiting for the previous shard's bookkeeping (LeaseBook.finish_soon)
    claiming_s: float = 0.0
    finishing_s: float = 0.0
    requests: int = 0
    #: the store's latency per request, ms (median, p90), over the row and from 90% of the
    #: ideal makespan on (the tail, when most workers are past their own shards)
    latency_ms: dict = field(default_factory=dict)
    killed: int = 0
    ops: dict = field(default_factory=dict)  # S3 requests by operation
    tail_ops: dict = field(default_factory=dict)  # the same, in the tail
    #: per tenth of the ideal makespan: requests, listings, latency's median
    timeline: list = field(default_factory=list)
    #: what the claimers did, summed (CLAIMER_COUNTS): looks (each a listing of leases/, or a
    #: read of finished.json with the leases another worker listed: summary_looks), listings
    #: of done/ (each published as finished.json), summaries read in place of one, looks that
    #: went on with an old summary for a random part of a poll interval more, misses,
    #: collisions, and reads of finished.json by idle workers to see the run finished
    claimers: dict = field(default_factory=dict)
    #: the claimers' looks as (seconds into the row, why, how), folded into the timeline
    look_log: list = field(default_factory=list, repr=False)

    @property
    def ratio(self) -> float:
        return round(self.makespan_s / self.ideal_s, 3)

    def as_dict(self) -> dict:
        d = self.__dict__.copy()
        d.pop("look_log")
        d["makespan_over_ideal"] = self.ratio
        d["claims_per_second"] = round(self.claims / self.makespan_s, 2) if self.claims else 0
        d["claiming_share"] = round(self.claiming_s / (self.workers * self.ideal_s), 3)
        return d


@dataclass
class Fleet:
    """One simulated run: its units, workers, kills and what pods cost, in scaled time."""

    workers: int
    seconds: float
    seed: int
    scenario: str
    pods: Pods
    items: list[list[float]] = field(default_factory=list)  # per unit: seconds per item
    speeds: list[float] = field(default_factory=list)
    kills: dict[int, float] = field(default_factory=dict)  # worker -> seconds into the run

    @classmethod
    def make(cls, workers: int, seconds: float, seed: int, scenario: str,
             pods: Pods) -> Fleet:
        sc, rng = SCENARIOS[scenario], random.Random(seed)
        n = workers * UNITS_PER_WORKER
        raw = [[rng.lognormvariate(0, 1.0) if sc.items == "lognormal" else 1.0
                for _ in range(ITEMS_PER_UNIT)] for _ in range(n)]
        slow = set(rng.sample(range(workers), round(sc.slow_fraction * workers)))
        speeds = [1 / sc.slow_factor if w in slow else 1.0 for w in range(workers)]
        scale = seconds * sum(speeds) / sum(map(sum, raw))  # total work / speed = seconds
        killed = rng.sample(range(workers), math.ceil(sc.killed_fraction * workers))
        kills = {w: rng.uniform(0.2, 0.6) * seconds for w in killed}
        return cls(workers, seconds, seed, scenario, pods, [[t * scale for t in u] for u in raw],
                   speeds, kills)

    @property
    def units(self) -> list[float]:
        """Seconds of work per unit, at speed 1."""
        return [sum(u) for u in self.items]

    @property
    def time_scale(self) -> float:
        """Sim seconds per real second."""
        return self.seconds / (self.pods.real_minutes * 60)

    @property
    def lease_seconds(self) -> float:
        return max(self.pods.lease_seconds * self.time_scale, self.pods.min_lease_sim_seconds)

    @property
    def cold_start(self) -> float:
        return self.pods.cold_seconds * self.time_scale

    @property
    def warm_start(self) -> float:
        return self.pods.warm_seconds * self.time_scale

    def backoff(self, failures: int) -> float:
        """The Job controller's delay before an index's ``failures``-th retry."""
        real = min(self.pods.backoff_cap_seconds, self.pods.backoff_seconds * 2 ** (failures - 1))
        return real * self.time_scale

    def shard_units(self, shards: int, index: int) -> range:
        n = len(self.items)
        return range(index * n // shards, (index + 1) * n // shards)


def expected_bytes(unit: int) -> bytes:
    return hashlib.sha256(f"unit {unit}".encode()).digest() * 8


class Store:
    """The output store of one row (a bucket of its own): outputs written, who processed what,
    and every request's latency as the workers saw it."""

    def __init__(self, endpoint: str, keys: tuple[str, str], bucket: str, latency=None):
        import boto3
        from botocore.config import Config

        from relit_k8s.storage import S3Storage

        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
                                   config=Config(max_pool_connections=512,
                                                 retries={"max_attempts": 10,
                                                          "mode": "standard"}))
        self.client.create_bucket(Bucket=bucket)
        self.requests = 0
        self.ops: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.client.meta.events.register("before-call.s3.*", self._count)
        self.client.meta.events.register("after-call.s3.*", self._timed)
        if latency is not None:  # the network and a real store's own time, in scaled time
            self.client.meta.events.register("before-send.s3.*",
                                             lambda **_: time.sleep(latency()))
        self._began = threading.local()  # per worker thread: when its call began
        self.created = time.monotonic()
        #: (seconds into the row, seconds the call took (retries included), operation) per
        #: request
        self.calls: list[tuple[float, float, str]] = []
        self.storage = S3Storage(bucket, "out", client=self.client)
        self.processed: Counter[int] = Counter()
        self.written: set[int] = set()
        self.last_write = 0.0

    def _count(self, event_name: str = "", params: dict | None = None, **_):
        params = params or {}
        self._began.at = time.monotonic()
        op = event_name.rsplit(".", 1)[-1]
        if op == "ListObjectsV2":  # which folder: leases/ or done/ (or the outputs)
            query = params.get("query_string") or {}
            op += ":" + str(query.get("prefix", "")).rstrip("/").rsplit("/", 1)[-1]
        self._began.op = op
        with self._lock:
            self.requests += 1
            self.ops[event_name.rsplit(".", 1)[-1]] += 1

    def _timed(self, **_):
        end = time.monotonic()
        with self._lock:
            self.calls.append((end - self.created, end - self._began.at, self._began.op))

    def latency_ms(self, after: float) -> dict:
        """The store's latency as the workers saw it (median, 90th percentile), over the row
        and over its tail (from ``after`` seconds on: every worker past its own shards)."""
        def pct(xs: list[float]) -> dict:
            xs = sorted(xs)
            return {"p50": round(1000 * xs[len(xs) // 2], 1),
                    "p90": round(1000 * xs[int(len(xs) * 0.9)], 1)} if xs else {}
        return {"all": pct([d for _, d, _ in self.calls]),
                "tail": pct([d for t, d, _ in self.calls if t >= after])}

    def timeline(self, step: float) -> list[dict]:
        """Per ``step`` seconds of the row: requests, listings, and the latency's median (ms):
        when the store saturated, not only whether."""
        rows: dict[int, list[tuple[float, str]]] = {}
        for t, d, op in self.calls:
            rows.setdefault(int(t // step), []).append((d, op))
        out = []
        for i in sorted(rows):
            ds = sorted(d for d, _ in rows[i])
            out.append({"from_s": round(i * step), "requests": len(ds),
                        "listings": sum(op.startswith("ListObjectsV2") for _, op in rows[i]),
                        "p50_ms": round(1000 * ds[len(ds) // 2], 1)})
        return out

    def tail_ops(self, after: float, until: float) -> dict:
        """Requests by operation from ``after`` seconds on to ``until`` (the tail, up to the
        last output written: not the workers' last looks before they leave)."""
        return dict(Counter(op for t, _, op in self.calls if after <= t <= until))

    def write(self, unit: int) -> None:
        self.storage.write(f"units/{unit}.bin", expected_bytes(unit))
        with self._lock:
            self.processed[unit] += 1
            self.written.add(unit)
            self.last_write = time.monotonic()


def _work(fleet: Fleet, store: Store, units: range, speed: float, killed: threading.Event,
          lost: threading.Event | None = None, progress: list | None = None,
          near_end=None) -> bool:
    """Process ``units`` item by item (skipping units written, as a worker does after listing
    its pairs); False when killed (or the lease lost) part-way. ``progress``: [items finished,
    items written], kept up to date for the heartbeat. ``near_end``: told the seconds left
    after each item, at the rate so far (as the worker's report tells its claimer).

    As the worker does, a unit's output is written by a thread while the next unit is
    relit, and the shard ends once its writes are done. The items' times are kept to a
    schedule (each item ends at the sum of the times so far), not slept one by one: on 2
    cores shared with the store and hundreds of threads, each sleep overran its time (34
    worker-seconds of 971 in the 16-worker row), an overhead no GPU has."""
    began, total = time.monotonic(), len(units) * ITEMS_PER_UNIT
    due = began

    def put(unit: int) -> None:
        store.write(unit)
        if progress is not None:
            progress[1] += ITEMS_PER_UNIT

    writes = []
    with ThreadPoolExecutor(1) as writer:
        for u in units:
            if u in store.written:
                if progress is not None:
                    progress[0] += ITEMS_PER_UNIT
                continue
            for seconds in fleet.items[u]:
                due += seconds / speed
                if killed.wait(max(0.0, due - time.monotonic())) or \
                        (lost is not None and lost.is_set()):
                    return False  # killed mid-unit: this unit's output is never written
                if progress is not None:
                    progress[0] += 1
                    if near_end is not None:
                        near_end((total - progress[0]) * (time.monotonic() - began) /
                                 progress[0])
            writes.append(writer.submit(put, u))
    for w in writes:
        w.result()  # a failed write fails the benchmark, not loses a unit quietly
    return True


def _kill_timer(fleet: Fleet, w: int, start: float) -> threading.Event:
    killed = threading.Event()
    if w in fleet.kills:
        t = threading.Timer(max(0.0, start + fleet.kills[w] - time.monotonic()), killed.set)
        t.daemon = True
        t.start()
    return killed


class _PodStarts:
    """The pods a row started and what they paid (sim seconds), across worker threads."""

    def __init__(self, fleet: Fleet):
        self.fleet, self.count, self._lock = fleet, 0, threading.Lock()

    def start(self, cold: bool, killed: threading.Event) -> bool:
        """A pod starts (cold or warm); False when its slot was killed meanwhile."""
        with self._lock:
            self.count += 1
        return not killed.wait(self.fleet.cold_start if cold else self.fleet.warm_start)

    def record(self, row: Row) -> None:
        row.pods_started = self.count
        row.time_scale = round(self.fleet.time_scale, 6)
        row.pod_start_seconds = {"cold": round(self.fleet.cold_start, 3),
                                 "warm": round(self.fleet.warm_start, 3),
                                 "cold_real": self.fleet.pods.cold_seconds,
                                 "warm_real": self.fleet.pods.warm_seconds}


def run_static(fleet: Fleet, store: Store, shards: int) -> Row:
    """Static shards as Kubernetes runs them: every index is a pod, handed to a free slot in
    order (at most W at once, as ``parallelism``), which pays a pod start (cold for the slot's
    first pod, warm after) before the shard's work; a killed pod's index is retried after the
    controller's backoff by a pod on another node (cold start, speed 1)."""
    pending = list(range(shards))
    failures: Counter[int] = Counter()
    lock = threading.Lock()
    pods = _PodStarts(fleet)
    start = time.monotonic()

    def slot(w: int) -> None:
        speed, killed = fleet.speeds[w], _kill_timer(fleet, w, start)
        retry: int | None = None
        cold = True
        while True:
            if retry is not None:
                index, retry = retry, None
            else:
                with lock:
                    if not pending:
                        return
                    index = pending.pop(0)
            alive = pods.start(cold, killed)
            cold = False
            if alive and _work(fleet, store, fleet.shard_units(shards, index), speed, killed):
                continue
            with lock:
                failures[index] += 1
                n = failures[index]
            time.sleep(fleet.backoff(n))  # the controller's delay, then a pod elsewhere
            killed, speed, retry, cold = threading.Event(), 1.0, index, True

    threads = [threading.Thread(target=slot, args=(w,)) for w in range(fleet.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = Row("static", fleet.workers, shards, fleet.seconds, killed=len(fleet.kills))
    row.makespan_s = round(store.last_write - start, 2)
    pods.record(row)
    return row


def run_leases(fleet: Fleet, store: Store, shards: int) -> Row:
    """Workers claim shards through leases, each its next shard ahead as its current one
    nears its end (as the worker does: Claimer.near_end, unless the ablation switched it
    off); a pod per worker, each paying one start, a killed one replaced after the backoff."""
    from relit_k8s.leases import Claimer, LeaseBook, LeaseLost

    class TimedClaimer(Claimer):
        """A claimer that notes when it looked, why, and how (a read of finished.json with
        the leases another worker listed; a listing with the finished shards, "full"; or a
        listing of leases/ alone), for the row's timeline."""

        def state(self):
            why, read = self._why, self.summary_looks
            found = super().state()
            how = "summary" if self.summary_looks > read else "full" if self._full else ""
            with lock:
                look_log.append((time.monotonic() - start, why, how))
            return found

    start = time.monotonic()
    look_log: list[tuple[float, str, str]] = []
    stolen: set[int] = set()
    totals = Counter()
    looks: Counter[str] = Counter()  # the claimers' listings of leases/, by why
    misses: Counter[str] = Counter()  # their misses, by whose shard and how fresh the look
    lock = threading.Lock()

    pods = _PodStarts(fleet)

    def worker(w: int) -> None:
        speed, killed = fleet.speeds[w], _kill_timer(fleet, w, start)
        failures = 0
        while True:
            if not pods.start(True, killed):  # killed while it started: no claim made
                failures += 1
                time.sleep(fleet.backoff(failures))
                killed, speed = threading.Event(), 1.0
                continue
            book = LeaseBook(store.storage, "fleet", seconds=fleet.lease_seconds)
            claimer = TimedClaimer(book, shards, w, fleet.workers)  # a kill lands mid-unit
            dead, written_items, busy = False, 0, 0.0
            asked = time.monotonic()
            for claim in claimer:
                with lock:  # between shards: the worker's GPU would be idle
                    totals["claiming_s"] += time.monotonic() - asked
                if claim.lease.stolen_from is not None:
                    with lock:
                        stolen.add(claim.shard)
                lost, beat_stop = threading.Event(), threading.Event()
                units = fleet.shard_units(shards, claim.shard)
                progress, began = [0, 0], time.monotonic()

                def beat(c=claim, lost=lost, beat_stop=beat_stop, units=units,
                         progress=progress, began=began, book=book, killed=killed) -> None:
                    # as the worker's heartbeat (every 5 s of a 60 s lease, scaled): renew
                    # every third of the lease time, and at once when there is progress to tell
                    renewed = time.monotonic()
                    while not beat_stop.wait(book.seconds / 12):
                        if killed.is_set():
                            return  # a dead worker does not beat
                        first = c.lease.total is None and progress[0] > 0
                        if not first and time.monotonic() - renewed < book.seconds / 3 - \
                                book.seconds / 12:
                            continue
                        elapsed = time.monotonic() - began
                        try:
                            c = book.renew(c, progress[0], len(units) * ITEMS_PER_UNIT,
                                           progress[0] / elapsed if progress[0] else None)
                        except LeaseLost:
                            lost.set()
                            return
                        renewed = time.monotonic()

                heart = threading.Thread(target=beat, daemon=True)
                heart.start()
                finished = _work(fleet, store, units, speed, killed, lost, progress,
                                 claimer.near_end)
                beat_stop.set()
                if killed.is_set():
                    dead = True
                    break
                if finished:
                    ended = time.monotonic()
                    book.finish_soon(claim)  # as the worker does: in the background
                    with lock:
                        totals["finishing_s"] += time.monotonic() - ended
                    written_items += progress[1]
                    busy += time.monotonic() - began
                asked = time.monotonic()
            with lock:
                totals["claims"] += claimer.claims
                totals["steals"] += claimer.steals
                for k in CLAIMER_COUNTS:
                    totals[k] += getattr(claimer, k)
                looks.update(claimer.looks)
                misses.update(claimer.misses)
            if not dead:
                return
            failures += 1
            time.sleep(fleet.backoff(failures))  # the controller's delay, then a pod elsewhere
            killed, speed = threading.Event(), 1.0

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(fleet.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = Row("leases", fleet.workers, shards, fleet.seconds,
              killed=len(fleet.kills),
              claims=totals["claims"], steals=totals["steals"],
              claimers={k: totals[k] for k in CLAIMER_COUNTS} | {"looks": dict(looks),
                                                                  "misses": dict(misses)})
    row.makespan_s = round(store.last_write - start, 2)
    pods.record(row)
    row.claiming_s, row.finishing_s = (round(totals[k], 1) for k in ("claiming_s",
                                                                     "finishing_s"))
    twice = [u for u, n in store.processed.items() if n > 1]
    shard_of = {u: s for s in range(shards) for u in fleet.shard_units(shards, s)}
    row.twice_without_steal = sum(1 for u in twice if shard_of[u] not in stolen)
    row.look_log = look_log
    return row


def check_outputs(fleet: Fleet, store: Store, row: Row) -> None:
    """Every unit's output exactly once in the listing; duplicates byte-identical."""
    names = store.storage.list_names("units")
    row.units = len(fleet.units)
    row.units_lost = sum(1 for u in range(row.units) if f"{u}.bin" not in names)
    twice = [u for u, n in store.processed.items() if n > 1]
    row.units_twice = len(twice)
    row.twice_not_identical = sum(
        1 for u in twice if store.storage.read(f"units/{u}.bin") != expected_bytes(u))
    row.requests = store.requests
    row.latency_ms = store.latency_ms(after=0.9 * fleet.seconds)
    row.tail_ops = store.tail_ops(after=0.9 * fleet.seconds,
                                  until=store.last_write - store.created)
    row.timeline = store.timeline(step=fleet.seconds / 10)
    step = fleet.seconds / 10
    for t, why, how in row.look_log:  # the claimers' looks per tenth, by why and how
        tenth = int(t // step)
        while len(row.timeline) <= tenth:
            row.timeline.append({"from_s": round(len(row.timeline) * step), "requests": 0,
                                 "listings": 0, "p50_ms": 0.0})
        looks = row.timeline[tenth].setdefault("looks", {})
        key = why + (f" ({how})" if how else "")
        looks[key] = looks.get(key, 0) + 1


def _ms(pct: dict) -> str:
    return f"{pct['p50']:.0f}/{pct['p90']:.0f} ms" if pct else "-"


@dataclass(frozen=True)
class RowSpec:
    """One row to run: which balance, fleet and shards per worker."""

    balance: str  # "static" or "leases"
    workers: int
    seconds: float
    scenario: str
    seed: int
    shards_per_worker: int
    #: leases: the mechanism switched off (relit_k8s.leases.MECHANISMS), for the ablation
    disabled: str | None = None


def run_row(spec: RowSpec, endpoint: str, keys: tuple[str, str], pods: Pods,
            latency: Latency | None) -> dict:
    """One row, in a process of its own (the pool's), against the store at ``endpoint``."""
    from relit_k8s import leases

    leases.DISABLED = frozenset([spec.disabled] if spec.disabled else [])
    fleet = Fleet.make(spec.workers, spec.seconds, spec.seed, spec.scenario, pods)
    bucket = f"fleet-{spec.balance}-{spec.workers}-{spec.scenario}-{spec.seed}-" \
             f"{spec.shards_per_worker}-{spec.disabled or ''}-{os.getpid()}".lower() \
        .replace(".", "-").replace("_", "-")
    draw = latency.sampler(fleet.time_scale, spec.seed) if latency else None
    store = Store(endpoint, keys, bucket[:63], draw)
    shards = spec.shards_per_worker * spec.workers
    if spec.balance == "static":
        row = run_static(fleet, store, shards)
    else:
        row = run_leases(fleet, store, shards)
    row.scenario, row.seed, row.shards_per_worker = spec.scenario, spec.seed, \
        spec.shards_per_worker
    row.disabled = spec.disabled
    check_outputs(fleet, store, row)
    row.ops = dict(store.ops)
    row.load_average = round(os.getloadavg()[0], 2)  # the machine's, as the row ended
    return row.as_dict()


def describe(row: dict) -> str:
    return (f"W={row['workers']:4d} {row['scenario']:15s} seed={row['seed']:<3d} "
            f"{row['balance'] + (' -' + row['disabled'] if row['disabled'] else ''):25s} "
            f"shards/worker={row['shards_per_worker']:3d} makespan/ideal="
            f"{row['makespan_over_ideal']:6.3f} pods={row['pods_started']:4d} "
            f"lost={row['units_lost']} twice={row['units_twice']} (without a steal: "
            f"{row['twice_without_steal']}, not identical: {row['twice_not_identical']}) "
            f"claims={row['claims']} steals={row['steals']} requests={row['requests']} "
            f"latency p50/p90 {_ms(row['latency_ms']['all'])}")


def stats(values: list[float]) -> dict:
    """Median (to 3 places), range and count of one row kind's values over the seeds."""
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values), "seeds": len(values)}


#: Seeds a side needs before a verdict is given (fewer: "too few seeds").
VERDICT_SEEDS = 3


def verdict(a: dict, b: dict, below: str, above: str) -> str:
    """``below`` when every seed of ``a`` is under every seed of ``b``, ``above`` when over,
    else "within the noise" (the ranges overlap); no verdict on fewer than
    :data:`VERDICT_SEEDS` seeds a side (benchmarks/figures.py gives its verdicts too)."""
    if min(a["seeds"], b["seeds"]) < VERDICT_SEEDS:
        return "too few seeds"
    return below if a["max"] < b["min"] else above if a["min"] > b["max"] else \
        "within the noise"


def summarise(rows: list[dict]) -> dict:
    """Over the seeds: per workers and scenario, static at each shards per worker and leases
    (median and range of makespan / ideal), the best static (lowest median) beside leases,
    "better" only where the ranges do not overlap; and the ablation: leases with each
    mechanism switched off beside leases with all, makespan / ideal and store requests."""
    ratio: dict[tuple, list[float]] = {}
    requests: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["workers"], r["scenario"], r["balance"], r["shards_per_worker"],
               r.get("disabled"))
        ratio.setdefault(key, []).append(r["makespan_over_ideal"])
        requests.setdefault(key, []).append(r["requests"])
    scenarios, ablation = [], []
    for w, scenario in sorted({(k[0], k[1]) for k in ratio}):
        static = {k[3]: stats(v) for k, v in ratio.items()
                  if k[:3] == (w, scenario, "static")}
        full = [k for k in ratio if k[:3] == (w, scenario, "leases") and k[4] is None]
        leases = stats(ratio[full[0]]) if full else None
        entry: dict = {"workers": w, "scenario": scenario, "leases": leases,
                       "static_by_shards_per_worker": {str(n): v for n, v in
                                                       sorted(static.items())}}
        if static:
            best = min(static, key=lambda n: static[n]["median"])
            entry |= {"static_best_shards_per_worker": best, "static_best": static[best]}
            if leases:
                entry["leases_vs_static_best"] = verdict(leases, static[best], "better",
                                                          "worse")
        if static or leases:
            scenarios.append(entry)
        for k, v in sorted((k, v) for k, v in ratio.items()
                           if k[:3] == (w, scenario, "leases") and k[4]):
            if not full:
                continue
            without, base = stats(v), leases
            ablation.append({
                "workers": w, "scenario": scenario, "disabled": k[4],
                "without": without, "with_all": base,
                "requests_without": stats(requests[k]),
                "requests_with_all": stats(requests[full[0]]),
                "verdict": verdict(without, base, "faster without it", "earns its keep")})
    return {"scenarios": scenarios, "ablation": ablation}


def _range(v: dict | None) -> str:
    if not v:
        return "-"
    return f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"


def print_summary(summary: dict) -> None:
    print("\nmakespan / ideal: median (range) over the seeds")
    print(f"{'W':>4}  {'scenario':15s}  {'static, best':>30s}  {'leases':>22s}  "
          f"{'verdict':16s}  static by shards per worker (median)")
    for e in summary["scenarios"]:
        sweep = " ".join(f"{n}:{v['median']:.2f}" for n, v in
                         e["static_by_shards_per_worker"].items())
        best = f"{_range(e.get('static_best'))} @{e.get('static_best_shards_per_worker', '-')}"
        print(f"{e['workers']:4d}  {e['scenario']:15s}  {best:>30s}  "
              f"{_range(e.get('leases')):>22s}  {e.get('leases_vs_static_best', '-'):16s}  "
              f"{sweep}")
    if summary["ablation"]:
        print("\nablation: leases with one mechanism switched off, against all on")
        print(f"{'W':>4}  {'scenario':15s}  {'switched off':19s}  {'without':>22s}  "
              f"{'with all':>22s}  {'requests without / with':>24s}  verdict")
    for a in summary["ablation"]:
        req = f"{a['requests_without']['median']:.0f} / {a['requests_with_all']['median']:.0f}"
        print(f"{a['workers']:4d}  {a['scenario']:15s}  {a['disabled']:19s}  "
              f"{_range(a['without']):>22s}  {_range(a['with_all']):>22s}  {req:>24s}  "
              f"{a['verdict']}")


def plan_rows(args) -> list[RowSpec]:
    """The rows asked for: per workers, scenario and seed, static at each swept shards per
    worker and leases; the ablation's rows (leases with one mechanism off) in the ablation's
    scenarios."""
    specs = []
    for w in args.workers:
        seconds = args.seconds or DEFAULT_SECONDS.get(w, 30.0)
        for scenario in sorted(set(args.scenario) | set(args.ablation_scenario)):
            for seed in args.seeds:
                if scenario in args.scenario and args.only != "leases":
                    specs += [RowSpec("static", w, seconds, scenario, seed, n)
                              for n in args.static_shards]
                if args.only != "static":
                    specs.append(RowSpec("leases", w, seconds, scenario, seed,
                                         args.lease_shards))
                if scenario in args.ablation_scenario:
                    specs += [RowSpec("leases", w, seconds, scenario, seed, args.lease_shards,
                                      off) for off in args.ablate]
    # the largest rows first, so that the pool's last rows are short ones; rows of one size in
    # a random order (seeded): rows run side by side share the 2 cores, and a fixed order ran
    # the ablation's rows together, each slowed by the others, against a leases row run beside
    # light static ones (seed 1 of a first quick run: 1.11 with every mechanism, 1.15-1.36
    # with any one switched off, even the ones that cannot act at 16 workers)
    random.Random(0).shuffle(specs)
    return sorted(specs, key=lambda r: -r.workers * r.seconds)


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--seconds", type=float, help="ideal makespan per row, sim seconds "
                    "[default: 60, 240, 960 s for 16, 64, 256 workers: W x 3.75 s]")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated fleet seeds, each a "
                    "row of its own [default: %(default)s]")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="repeatable [default: every scenario]")
    ap.add_argument("--static-shards", type=int, nargs="+", default=list(STATIC_SWEEP),
                    help="static shards per worker, swept [default: %(default)s]")
    ap.add_argument("--lease-shards", type=int, default=LEASE_SHARDS_PER_WORKER,
                    help="lease shards per worker [default: %(default)s, the planner's]")
    ap.add_argument("--real-minutes", type=float, default=Pods.real_minutes,
                    help="the real ideal makespan a row stands for, minutes: sets the scale "
                    "of pod starts, backoff and the lease time [default: %(default)s]")
    ap.add_argument("--cold-start", type=float, default=Pods.cold_seconds,
                    help="a pod's cold start, real seconds [default: %(default)s]")
    ap.add_argument("--warm-start", type=float, default=Pods.warm_seconds,
                    help="a pod's warm start, real seconds [default: %(default)s]")
    ap.add_argument("--store", choices=sorted(STORES), default="seaweedfs",
                    help="the S3 server, in its own process [default: %(default)s; moto: a "
                    "mock, for the stress row]")
    ap.add_argument("--latency-p50-ms", type=float, default=Latency.p50_ms)
    ap.add_argument("--latency-p99-ms", type=float, default=Latency.p99_ms)
    ap.add_argument("--no-latency", action="store_true",
                    help="no added latency: the local server's own only")
    ap.add_argument("--only", choices=["static", "leases"], help="run one balance only")
    ap.add_argument("--ablate", nargs="+", default=[], metavar="MECHANISM",
                    help="rows of leases with this mechanism switched off, one at a time "
                    f"(or 'all': {', '.join(MECHANISMS)})")
    ap.add_argument("--ablation-scenario", action="append", choices=sorted(SCENARIOS),
                    help="the scenarios of the ablation's rows, repeatable [default: mixed]")
    ap.add_argument("--jobs", type=int, default=4, help="rows run at once, each in a process "
                    "of its own [default: %(default)s]")
    ap.add_argument("--quick", action="store_true", help="16 workers, 20 s rows, seeds 1-3, "
                    "every scenario, static at 1, 4 and 32 shards per worker, leases, and the "
                    "ablation of every mechanism in the mixed scenario: 96 rows, 19.7 "
                    "minutes with --jobs 3 on 2 cores")
    ap.add_argument("--smoke", action="store_true", help="4 workers, 4 s: a check that it runs")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.workers, args.seconds, args.seeds = [16], 20.0, "1,2,3"
        args.static_shards, args.ablate = [1, 4, 32], ["all"]
    if args.smoke:
        args.workers, args.seconds, args.seeds = [4], 4.0, "1"
        args.scenario, args.static_shards, args.jobs = ["mixed"], [4], 1
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    args.scenario = args.scenario or list(SCENARIOS)
    args.ablation_scenario = (args.ablation_scenario or ["mixed"]) if args.ablate else []
    args.ablate = list(MECHANISMS) if "all" in args.ablate else args.ablate
    unknown = set(args.ablate) - set(MECHANISMS)
    if unknown:
        ap.error(f"no mechanism {', '.join(sorted(unknown))}: {', '.join(MECHANISMS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pods = Pods(args.real_minutes, args.cold_start, args.warm_start)
    latency = None if args.no_latency else Latency(args.latency_p50_ms, args.latency_p99_ms)
    server: Server = STORES[args.store]()
    specs = plan_rows(args)
    result = {
        "benchmark": "fleet",
        "date": datetime.now(UTC).date().isoformat(),
        "commit": provenance.commit(),
        "command": provenance.command("fleet.py", argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "store": f"{server.name} server in its own process on 127.0.0.1 (sharing the "
                 f"{os.cpu_count()} cores with the simulated workers)",
        "latency": asdict(latency) | {"scaled": "like the work (time_scale)",
                                      "added": "in the client, before each request"}
        if latency else None,
        "pods": asdict(pods),
        "seeds": args.seeds,
        "scenarios": {n: asdict(SCENARIOS[n]) for n in args.scenario},
        "fleet": {"units_per_worker": UNITS_PER_WORKER, "items_per_unit": ITEMS_PER_UNIT,
                  "lease_shards_per_worker": args.lease_shards,
                  "static_shards_per_worker": args.static_shards,
                  "killed": "mid-shard at 20-60% of the ideal makespan; the pod is replaced "
                            "after the Job controller's backoff, on another node (cold start)"},
        "rows": [],
        "ablation": {m: MECHANISMS[m] for m in args.ablate},
        "summary": {},
    }

    def save() -> None:
        """The rows so far, written after each row: a run stopped part-way keeps them."""
        result["rows"].sort(key=lambda r: (r["workers"], r["scenario"], r["seed"],
                                           r["balance"], r["shards_per_worker"],
                                           r["disabled"] or ""))
        result["summary"] = summarise(result["rows"])
        if args.out:
            partial = f"{args.out}.partial"
            with open(partial, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(partial, args.out)

    keys = (server.access_key, server.secret_key)
    try:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_row, spec, server.endpoint, keys, pods, latency)
                       for spec in specs]
            for fut in futures:
                row = fut.result()
                result["rows"].append(row)
                print(describe(row), flush=True)
                save()
    finally:
        server.stop()
    save()
    print_summary(result["summary"])
    return result


if __name__ == "__main__":
    main()

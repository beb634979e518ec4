"""Fleet balance: static shards against leases, as makespan / ideal at W simulated workers.

The real claiming code (relit_k8s.leases: LeaseBook, Claimer) runs against a real S3 endpoint
(moto in server mode, in a process of its own on 127.0.0.1). W worker threads stand for W GPU
pods; their "relighter" sleeps for each unit's time (scaled time), and each unit's output is a
real object written to the store. The fleet is unkind on purpose:

* item times are heavy-tailed (lognormal, sigma 1); a unit is 32 items (an input-reference pair
  and its seeds: one output object here, to keep the store's load within what a moto server
  sharing 2 cores with every simulated worker serves), and the holder's heartbeat reports
  progress per item, as a worker's does;
* 10% of the workers are 3x slower (a slow node, an older GPU);
* 5% of the workers are killed mid-shard (kill -9: no report, no release); Kubernetes starts a
  replacement pod for their index after the restart delay (= the lease time here).

static: shard i is Job index i (4 shards per worker, the static default); a free pod slot takes
the next pending index, as the Job controller does; a killed pod's index is retried by its
replacement, which skips the units already written.
leases: 32 shards per worker (the default, LEASE_SHARDS_PER_WORKER) claimed through leases; a
killed worker's shard is taken over once its lease is stale; the replacement claims like any
worker.

ideal = total work / total worker speed. Printed per row, side by side: makespan / ideal for
both, units lost (must be 0), units processed twice (with leases only after a steal, and their
outputs byte-identical), claims per second the store sustained, S3 requests and their latency
(over the row, and in its tail: from 90% of the ideal makespan on; the tail's requests by
operation, and listings by folder, up to the last output written), what the claimers did
(looks, and those that read ``finished.json`` in place of listing ``leases/``, listings of
``done/``, summaries read and brought up to date, misses and collisions, idle reads of
``finished.json``, looks by why), the requests, listings, median latency and the claimers'
looks (by why and how) per tenth of the ideal makespan (when the store saturated), and the
share of
the workers' time spent waiting for claims (between shards; scaled time makes shards short, the
store's latency is not scaled: at 16 workers a shard is about 2 s, on a real fleet minutes).

Usage: python benchmarks/fleet.py [--workers 16 64 256] [--out benchmarks/results/fleet_cpu.json]
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
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from relit_k8s.planner import LEASE_SHARDS_PER_WORKER

#: Seconds of ideal makespan per row: 3.75 s times the workers, so that every row asks the
#: store for about the same requests per second (about 8 claims/s, 60 requests/s in steady
#: state), which a moto server sharing this machine's 2 cores with every simulated worker keeps
#: up with. At 64 workers in 120 s (17 claims/s) the moto process ran at 0.7 of a core in
#: steady state and saturated in the tail: the row measured moto (1.17), not the claiming (1.08
#: at 240 s). Time is scaled: a unit of 32 items takes W x 3.75 / 64 s at full speed, a lease
#: ideal / 8.
DEFAULT_SECONDS = {16: 60.0, 64: 240.0, 256: 960.0}
UNITS_PER_WORKER = 64
ITEMS_PER_UNIT = 32
SLOW_FRACTION, SLOW_FACTOR = 0.10, 3.0
KILLED_FRACTION = 0.05
#: What the claimers did, summed over the row (Claimer's counters of the same names).
CLAIMER_COUNTS = ("listings", "summary_looks", "done_listings", "summaries", "updates",
                  "background", "deferred", "missed", "collided", "end_checks")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_store() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@dataclass
class Row:
    balance: str
    workers: int
    shards: int
    ideal_s: float
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
    #: of done/, summaries read in place of one, summaries brought up to date from the
    #: journal in place of one (those published in the background between shards among them:
    #: background), full looks deferred to another worker bringing it up to date,
    #: misses, collisions, and reads of finished.json by idle workers to see the run finished
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
    """One simulated run: its units, workers and the store."""

    workers: int
    seconds: float
    seed: int
    items: list[list[float]] = field(default_factory=list)  # per unit: seconds per item
    speeds: list[float] = field(default_factory=list)
    kills: dict[int, float] = field(default_factory=dict)  # worker -> seconds into the run

    @classmethod
    def make(cls, workers: int, seconds: float, seed: int = 0) -> Fleet:
        rng = random.Random(seed)
        n = workers * UNITS_PER_WORKER
        raw = [[rng.lognormvariate(0, 1.0) for _ in range(ITEMS_PER_UNIT)] for _ in range(n)]
        slow = set(rng.sample(range(workers), max(1, round(SLOW_FRACTION * workers))))
        speeds = [1 / SLOW_FACTOR if w in slow else 1.0 for w in range(workers)]
        scale = seconds * sum(speeds) / sum(map(sum, raw))  # total work / speed = seconds
        killed = rng.sample(range(workers), max(1, math.ceil(KILLED_FRACTION * workers)))
        kills = {w: rng.uniform(0.2, 0.6) * seconds for w in killed}
        return cls(workers, seconds, seed, [[t * scale for t in u] for u in raw], speeds, kills)

    @property
    def units(self) -> list[float]:
        """Seconds of work per unit, at speed 1."""
        return [sum(u) for u in self.items]

    @property
    def lease_seconds(self) -> float:
        """The lease time, and a replacement pod's start delay: scaled like the work."""
        return self.seconds / 8

    def shard_units(self, shards: int, index: int) -> range:
        n = len(self.items)
        return range(index * n // shards, (index + 1) * n // shards)


def expected_bytes(unit: int) -> bytes:
    return hashlib.sha256(f"unit {unit}".encode()).digest() * 8


class Store:
    """The output store of one row: outputs written, and who processed what."""

    def __init__(self, endpoint: str, bucket: str):
        import boto3
        from botocore.config import Config

        from relit_k8s.storage import S3Storage

        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id="bench", aws_secret_access_key="bench",
                                   config=Config(max_pool_connections=512,
                                                 retries={"max_attempts": 10,
                                                          "mode": "standard"}))
        self.client.create_bucket(Bucket=bucket)
        self.requests = 0
        self.ops: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.client.meta.events.register("before-call.s3.*", self._count)
        self.client.meta.events.register("after-call.s3.*", self._timed)
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


def run_static(fleet: Fleet, store: Store, shards: int) -> Row:
    """Indexes handed to free pod slots in order (the Job controller); a killed pod's index is
    retried by a replacement pod after the restart delay."""
    pending = list(range(shards))
    lock = threading.Lock()
    start = time.monotonic()

    def slot(w: int) -> None:
        speed, killed = fleet.speeds[w], _kill_timer(fleet, w, start)
        retry: int | None = None
        while True:
            if retry is not None:
                index, retry = retry, None
            else:
                with lock:
                    if not pending:
                        return
                    index = pending.pop(0)
            if not _work(fleet, store, fleet.shard_units(shards, index), speed, killed):
                time.sleep(fleet.lease_seconds)  # the replacement pod starts
                killed, speed, retry = threading.Event(), 1.0, index

    threads = [threading.Thread(target=slot, args=(w,)) for w in range(fleet.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = Row("static", fleet.workers, shards, fleet.seconds, killed=len(fleet.kills))
    row.makespan_s = round(store.last_write - start, 2)
    return row


def run_leases(fleet: Fleet, store: Store, shards: int, ahead: bool = True) -> Row:
    """Workers claim shards through leases, each its next shard ahead as its current one
    nears its end (``ahead``, as the worker does: Claimer.near_end), or only once it ended."""
    from relit_k8s.leases import Claimer, LeaseBook, LeaseLost

    class TimedClaimer(Claimer):
        """A claimer that notes when it looked, why, and how (a read of finished.json with
        the leases another worker listed; a listing with the finished shards, "full"; or a
        listing of leases/ and the journal since its look before), for the row's timeline."""

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

    def worker(w: int) -> None:
        speed, killed = fleet.speeds[w], _kill_timer(fleet, w, start)
        while True:
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
                                 claimer.near_end if ahead else None)
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
                    if written_items:  # items/s, as the lease's rate
                        claimer.own_rate = written_items / busy
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
            time.sleep(fleet.lease_seconds)  # the replacement pod starts, on another node
            killed, speed = threading.Event(), 1.0

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(fleet.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = Row("leases" if ahead else "leases-no-ahead", fleet.workers, shards, fleet.seconds,
              killed=len(fleet.kills),
              claims=totals["claims"], steals=totals["steals"],
              claimers={k: totals[k] for k in CLAIMER_COUNTS} | {"looks": dict(looks),
                                                                  "misses": dict(misses)})
    row.makespan_s = round(store.last_write - start, 2)
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--seconds", type=float, help="ideal makespan per row [default: 60, 240, "
                    "960 s for 16, 64, 256 workers: W x 3.75 s]")
    ap.add_argument("--static-shards", type=int, default=4, help="static shards per worker")
    ap.add_argument("--lease-shards", type=int, default=LEASE_SHARDS_PER_WORKER,
                    help="lease shards per worker [default: %(default)s, the planner's]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["static", "leases"], help="run one balance only")
    ap.add_argument("--no-ahead-too", action="store_true", help="add a row of leases claimed "
                    "only once the previous shard ended (no claim ahead), for comparison")
    ap.add_argument("--smoke", action="store_true", help="4 workers, 4 s: a check that it runs")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.workers, args.seconds = [4], 4.0
    proc, endpoint = start_store()
    rows: list[Row] = []
    result = {
        "benchmark": "fleet",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; store: moto server",
        "fleet": {"units_per_worker": UNITS_PER_WORKER, "items_per_unit": ITEMS_PER_UNIT,
                  "lease_shards_per_worker": args.lease_shards,
                  "static_shards_per_worker": args.static_shards,
                  "item_time": "lognormal, sigma 1", "slow": f"{SLOW_FRACTION:.0%} of "
                  f"workers {SLOW_FACTOR:g}x slower", "killed": f"{KILLED_FRACTION:.0%} of "
                  "workers mid-shard, replaced after the lease time",
                  "lease_seconds": "ideal / 8"},
        "rows": [],
    }

    def save() -> None:
        """The rows so far, written after each row: a run stopped part-way keeps them."""
        result["rows"] = [r.as_dict() for r in rows]
        if args.out:
            partial = f"{args.out}.partial"
            with open(partial, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(partial, args.out)

    try:
        for w in args.workers:
            seconds = args.seconds or DEFAULT_SECONDS.get(w, 30.0)
            fleet = Fleet.make(w, seconds, args.seed)
            for balance, per_worker, run in (
                    ("static", args.static_shards, run_static),
                    ("leases", args.lease_shards, run_leases),
                    ("leases-no-ahead", args.lease_shards,
                     lambda f, st, n: run_leases(f, st, n, ahead=False))):
                if args.only and not balance.startswith(args.only) or \
                        balance == "leases-no-ahead" and not args.no_ahead_too:
                    continue
                store = Store(endpoint, f"fleet-{balance}-{w}-{os.getpid()}")
                row = run(fleet, store, per_worker * w)
                check_outputs(fleet, store, row)
                row.ops = dict(store.ops)
                rows.append(row)
                print(f"W={w:4d} {balance:6s} shards={row.shards:5d} makespan/ideal="
                      f"{row.ratio:5.3f} ({row.makespan_s:.1f} s / {row.ideal_s:.1f} s) "
                      f"lost={row.units_lost} twice={row.units_twice} "
                      f"(without a steal: {row.twice_without_steal}, not identical: "
                      f"{row.twice_not_identical}) claims={row.claims} steals={row.steals} "
                      f"requests={row.requests} claiming={row.as_dict()['claiming_share']:.1%} "
                      f"of worker time; store latency p50/p90 {_ms(row.latency_ms['all'])}, "
                      f"in the tail {_ms(row.latency_ms['tail'])}; in the tail {row.tail_ops}; "
                      f"claimers {row.claimers}; per tenth of ideal: requests "
                      f"{[t['requests'] for t in row.timeline]}, listings "
                      f"{[t['listings'] for t in row.timeline]}, p50 ms "
                      f"{[round(t['p50_ms']) for t in row.timeline]}", flush=True)
                save()
    finally:
        proc.kill()
        proc.wait()
    print("\n  W   static   leases  (makespan / ideal)   lost  twice  claims/s  claiming")
    for w in ([] if args.only else args.workers):
        s, le = (next(r for r in rows if r.workers == w and r.balance == b)
                 for b in ("static", "leases"))
        print(f"{w:4d}  {s.ratio:6.3f}   {le.ratio:6.3f}   {' ' * 19}"
              f"{s.units_lost + le.units_lost:4d}  {le.units_twice:5d}  "
              f"{le.as_dict()['claims_per_second']:8.2f}  {le.as_dict()['claiming_share']:8.1%}")
    return result


if __name__ == "__main__":
    main()

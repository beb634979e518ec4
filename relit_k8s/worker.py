"""The worker: manifest + index -> its shard's units -> relit outputs + a shard report.

The same code runs in a Kubernetes pod (``relit-k8s worker``, index from
``JOB_COMPLETION_INDEX``) and in the local runner's processes. Per shard it

* lists each pair folder once and skips the items whose outputs exist;
* decodes each input and reference once (a small cache; decoding runs ahead in threads);
* relights the missing seeds of a pair in batches of ``manifest.batch_size`` (when the plan sets
  none, the relighter's own ``batch_size``; fewer for very large images, so that one call returns
  at most ``RELIT_CALL_OUTPUT_BYTES``; see :mod:`relit_k8s.settings`) on one device;
* encodes and writes outputs in threads (atomic writes: no half-written file at a final key);
* writes its report at start, every ``report_interval`` seconds, and at the end;
* records a bad image as failed items and goes on; stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import signal
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import images
from .clock import monotonic, now
from .errors import (
    EXIT_OK,
    ConfigError,
    ItemError,
    NotFoundError,
    RelitError,
    Stopped,
    WriteConflict,
    exit_code_for,
)
from .inputs import InputLoader
from .leases import Claim, Claimer, ClaimHooks, LeaseBook, LeaseLost, conditional_write_problem
from .manifest import (
    MAX_FAILURE_RECORDS,
    Failure,
    FoldedReports,
    Manifest,
    ShardReport,
    Unit,
    UnitScores,
    load_manifest,
    pair_seeds,
)
from .relighters import Relighter, create
from .run import Run
from .scores import best_seeds
from .settings import WorkerSettings, cpu_threads
from .storage import S3Storage, Storage, join_key

log = logging.getLogger("relit_k8s.worker")

#: Threads decoding inputs ahead of the GPU (those encoding and writing outputs:
#: RELIT_WRITE_THREADS, WorkerSettings.encode_threads).
DECODE_THREADS = 2
#: Decoded inputs kept in memory (a shard visits its pairs image by image).
IMAGE_CACHE = 4
#: Pairs decoded ahead of the one being relit.
LOOKAHEAD = 2
#: Unexpected relighter errors in a row (no success between them) that end the shard with
#: exit 1: fewer are recorded as failed items, since one odd input must not stop a shard.
UNEXPECTED_LIMIT = 3
#: Seconds at most an abandoned shard (the grace period after SIGTERM is over) waits for the
#: outputs being written to land before it saves its report (it waits only while some are):
#: every output it counts exists, and none lands after it unless its write outlasts this. The
#: pod's SIGKILL comes a quarter of the pod's grace, 15 s at most, after the worker's
#: (kube.job.stop_grace_for): 15 s with the default grace, room for this and the report.
ABANDON_WRITES_SECONDS = 2.0

ProgressFn = Callable[[int, int, int], None]  # (done, skipped, failed) increments


def _safe_host() -> str:
    """The host name as a key may hold it (a pod's name: letters, digits, '-', '.')."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:63]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


#: What a pod that requested GPUs and sees none is told (it exits 78: a retry cannot help).
NO_GPU = ("this pod requested {n} GPU(s) (RELIT_GPUS_EXPECTED) but torch sees no CUDA device, "
          "so it would relight on the CPU, a thousand times slower. Likely causes: the node's "
          "NVIDIA driver is older than the image's CUDA build needs (CUDA 13 wheels: driver "
          "580 or newer; nvidia-smi on the node tells); the NVIDIA container runtime is not "
          "the node's default (k3s, RKE2, some GPU Operator set-ups: submit with "
          "--runtime-class nvidia); the device plugin is missing or unhealthy; or the image is "
          "the CPU build. torch {torch} (CUDA build: {cuda}).")


def check_expected_gpus(device: str | None = None) -> None:
    """A pod that requested GPUs fails closed: :class:`ConfigError` when the Job says it asked
    for some (``RELIT_GPUS_EXPECTED``) and torch sees none, unless ``--device cpu`` says the
    CPU is meant."""
    expected = os.environ.get("RELIT_GPUS_EXPECTED", "").strip()
    if not expected.isdigit() or int(expected) == 0 or device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError(NO_GPU.format(n=expected, torch=torch.__version__,
                                        cuda=torch.version.cuda or "none"))


def check_cache_writable() -> None:
    """The model cache (``XDG_CACHE_HOME``: the Job's ``/cache``) must take files: a pod whose
    ``--cache-host-path`` directory stayed root-owned would otherwise fail deep inside a model
    download. :class:`ConfigError` (78: no retry helps) names the fix."""
    cache = os.environ.get("XDG_CACHE_HOME")
    if not cache:
        return
    try:
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as e:
        raise ConfigError(
            f"the model cache {cache} (XDG_CACHE_HOME) is not writable by uid {os.getuid()}: "
            f"{e.strerror or e}. A --cache-host-path directory is made writable by the Job's "
            "init container cache-permissions; if a policy removed it, create the directory "
            "on each node beforehand: install -d -o 10001 -g 10001 DIR") from e


def device_label(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


class _Cache:
    """An LRU of decode futures keyed by name, bounded by count and by the bytes of the decoded
    tensors: each object is decoded once while it stays cached."""

    def __init__(self, pool: ThreadPoolExecutor, load: Callable[[str], object],
                 size: int = 1 << 30, max_bytes: int | None = None):
        self.pool, self.load, self.size, self.max_bytes = pool, load, size, max_bytes
        self.items: OrderedDict[str, Future] = OrderedDict()

    @staticmethod
    def _bytes(fut: Future) -> int:
        if not fut.done() or fut.exception() is not None:
            return 0
        t = fut.result()
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    def get(self, key: str) -> Future:
        fut = self.items.get(key)
        if fut is not None:
            self.items.move_to_end(key)
            return fut
        fut = self.items[key] = self.pool.submit(self.load, key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        if self.max_bytes is not None:
            total = sum(self._bytes(f) for f in self.items.values())
            while total > self.max_bytes and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                total -= self._bytes(old)
        return fut


@dataclass
class _PairWork:
    """One unit of a shard: its pair, the items to make, and (with a relighter that scores)
    what its score record gathers."""

    unit: Unit
    todo: list[tuple[int, int]] = field(default_factory=list)  # (iteration, seed)
    skipped: list[int] = field(default_factory=list)  # seeds written before this pass
    #: the reference's code for the relighter's selector (computed once the pair is relit)
    code: torch.Tensor | None = None
    scores: dict[int, float] = field(default_factory=dict)  # seed -> score of this pass
    pending: int = 0  # items of ``todo`` not yet written or failed
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def image(self) -> str:
        return self.unit.image

    @property
    def ref(self) -> str:
        return self.unit.ref


class _Timer:
    """Adds the seconds spent inside ``with`` to the report's ``timings[what]``."""

    def __init__(self, reporter: _Reporter | None, what: str):
        self.reporter, self.what = reporter, what

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.reporter is not None:
            self.reporter.add_time(self.what, time.perf_counter() - self.start)
        return False


class _Reporter:
    """Holds the shard report; a thread writes it every ``interval`` seconds (the heartbeat).

    With a lease (``balance: leases``) the heartbeat renews the lease first, every third of the
    lease time at least, and the report is written only if it is still the version this
    worker last wrote (a conditional write): a worker whose lease was stolen while it was
    paused learns it there, sets ``lost`` and writes nothing more for that shard.
    """

    def __init__(self, storage: Storage, key: str, report: ShardReport, interval: float,
                 progress: ProgressFn | None, log_every: float,
                 lease: tuple[LeaseBook, Claim] | None = None,
                 near_end: Callable[[float], None] | None = None, batch: int = 1):
        self.storage, self.key, self.report = storage, key, report
        #: told, as items finish, the seconds left before the shard's last ``batch`` items
        #: begin (:meth:`Claimer.near_end`: progress comes a batch at a time, so the next
        #: shard is claimed while the last batch runs, not once it is written)
        self.near_end, self.batch = near_end, batch
        self.interval, self.progress, self.log_every = interval, progress, log_every
        self.book: LeaseBook | None = lease[0] if lease else None
        self.claim: Claim | None = lease[1] if lease else None
        if self.book is not None:
            self.interval = min(interval, self.book.seconds / 3)
        self._renewed = monotonic()  # the lease is renewed every third of the lease time
        #: set when the lease was lost: the shard pass stops, nothing more is written
        self.lost = threading.Event()
        self._version: str | None = None  # of the report, for the next conditional write
        self.lock = threading.Lock()
        self._started = monotonic()
        self._last_log = self._started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="relit-report", daemon=True)
        #: outputs being written now (:meth:`writing`), and whether no more may be (:meth:`close`)
        self._writing, self._closed = 0, False
        self._landed = threading.Condition(self.lock)
        #: bytes of the report's last write (its summary copy is known by them)
        self.size = 0

    def start(self) -> None:
        self.write()
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                # renew every third of the lease time, and as soon as there is progress to
                # tell (idle workers read it to find stragglers)
                first = self.claim is not None and self.claim.lease.total is None \
                    and self.report.items_finished > 0
                if self.book is not None and self.claim is not None and (first or (
                        monotonic() - self._renewed >= self.book.seconds / 3
                        - self.interval)):
                    with self.lock:
                        r = self.report
                        done, total = r.items_finished, r.items_total
                        elapsed = monotonic() - self._started
                    rate = round(done / elapsed, 4) if elapsed > 0 and done else None
                    self.claim = self.book.renew(self.claim, done, total, rate)
                    self._renewed = monotonic()
                self.write()
            except LeaseLost as e:
                log.warning("shard %d: %s; leaving the shard to it", self.report.index, e,
                            extra={"event": "lease_lost", "fields": {"shard": self.report.index}})
                self.lost.set()
                return
            except RelitError as e:  # a missed heartbeat is not fatal; the next one may pass
                log.warning("could not write the shard report: %s", e)
            if monotonic() - self._last_log >= self.log_every:
                self._last_log = monotonic()
                self.log_progress()

    def log_progress(self) -> None:
        with self.lock:
            r = self.report
            finished = r.items_done + r.items_skipped + r.items_failed
            rate = r.items_per_second
            eta = (r.items_total - finished) / rate if rate else None
            fields = {"index": r.index, "done": r.items_done, "skipped": r.items_skipped,
                      "failed": r.items_failed, "total": r.items_total,
                      "items_per_second": rate, "eta_seconds": round(eta, 1) if eta else None}
        log.info("shard %d: %d/%d items (%s items/s, eta %s s)", fields["index"], finished,
                 fields["total"], rate, fields["eta_seconds"],
                 extra={"event": "progress", "fields": fields})

    def write(self) -> None:
        with self.lock:
            r = self.report
            r.updated_at = now()
            elapsed = monotonic() - self._started
            r.items_per_second = round(r.items_done / elapsed, 3) if elapsed > 0 else None
            data = r.model_dump_json(indent=1).encode()
            self.size = len(data)
        if self.book is None:
            self.storage.write(self.key, data)
            return
        if self.lost.is_set():
            raise LeaseLost(f"shard {self.report.index}: the lease was lost")
        try:
            if self._version is not None:
                self._version = self.storage.replace(self.key, data, self._version)
                return
            for _ in range(3):  # the first write of this attempt: over whatever is there
                try:
                    _, current = self.storage.read_versioned(self.key)
                except NotFoundError:
                    current = None
                try:
                    self._version = (self.storage.create(self.key, data) if current is None
                                     else self.storage.replace(self.key, data, current))
                    return
                except WriteConflict:
                    continue
        except WriteConflict:
            pass
        self.lost.set()
        raise LeaseLost(f"the report of shard {self.report.index} was written by another "
                        "worker: its lease was taken")

    def add_time(self, what: str, seconds: float) -> None:
        with self.lock:
            self.report.timings[what] = round(self.report.timings.get(what, 0.0) + seconds, 4)

    def add(self, done: int = 0, skipped: int = 0, failures: list[Failure] | None = None,
            failed: int = 0) -> None:
        failures = failures or []
        failed = failed or len(failures)
        with self.lock:
            r = self.report
            r.items_done += done
            r.items_skipped += skipped
            r.items_failed += failed
            room = max(0, MAX_FAILURE_RECORDS - len(r.failures))
            r.failures.extend(failures[:room])
            r.failures_dropped += max(0, len(failures) - room)
            left = r.items_total - r.items_done - r.items_skipped - r.items_failed
            written = r.items_done
        if self.progress and (done or skipped or failed):
            self.progress(done, skipped, failed)
        if self.near_end is not None and (written or left <= 0):
            elapsed = monotonic() - self._started  # at the rate of the items written
            self.near_end(max(0, left - self.batch) * elapsed / written if written else 0.0)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around the write of one output, which counts it as done on success: refused
        (:class:`Stopped`, nothing written) once the report is :meth:`close`-d, so that a
        saved report counts every output that exists."""
        with self.lock:
            if self._closed:
                raise Stopped("the grace period is over: output not written")
            self._writing += 1
        try:
            yield
            self.add(done=1)
        finally:
            with self.lock:
                self._writing -= 1
                self._landed.notify_all()

    def close(self, timeout: float) -> int:
        """No output is written from now on; waits up to ``timeout`` seconds for those being
        written, and returns how many still are."""
        with self.lock:
            self._closed = True
            self._landed.wait_for(lambda: self._writing == 0, timeout)
            return self._writing

    def abandon(self) -> None:
        """The lease was lost: stop the heartbeat and write nothing more."""
        self.lost.set()
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def finish(self, state: str, error: str | None = None, exit_code: int | None = None,
               abandoned: bool = False) -> None:
        """Save the report in its final ``state``. Once it is :meth:`close`-d, only the
        grace period's end (:func:`save_abandoned`, ``abandoned``) saves it: the shard's own
        end, which the writes refused then bring about, leaves that report as it is (under
        load it came second and overwrote it, test_reliability.py)."""
        with self.lock:
            if self._closed and not abandoned:
                return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self.lock:
            self.report.state = state  # type: ignore[assignment]
            self.report.error = error
            self.report.exit_code = exit_code
            self.report.finished_at = now()
        self.write()


def _options_with_batch(manifest: Manifest) -> dict:
    """The relighter's options, with the plan's ``--batch-size`` as its ``batch_size`` option
    when it has one and the options do not set it (so ``diffusion`` batches the GPU the same)."""
    options = dict(manifest.relighter.options)
    if manifest.batch_size and "batch_size" in options and options["batch_size"] is None:
        options["batch_size"] = manifest.batch_size
    return options


class _Backlog:
    """Bytes of relit pixels queued for writing, bounded: ``take`` waits while over the bound
    (one item always passes, however large)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def take(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class ShardRunner:
    """Runs shards of one manifest with one loaded relighter (reused across shards)."""

    def __init__(
        self,
        manifest: Manifest,
        relighter: Relighter | None = None,
        device: str | None = None,
        stop: threading.Event | None = None,
        progress: ProgressFn | None = None,
        report_interval: float | None = None,
        settings: WorkerSettings | None = None,
    ):
        self.manifest = manifest
        #: The RELIT_* tuning settings (read from the environment unless given).
        self.settings = settings or WorkerSettings.from_env()
        self.device = device or default_device()
        self.stop = stop or threading.Event()
        self.progress = progress
        self.report_interval = report_interval or self.settings.report_interval
        self.relit_run = Run.of(manifest)
        self.output = self.relit_run.output
        started = monotonic()
        self.relighter = relighter or create(
            manifest.relighter.name, _options_with_batch(manifest), self.device
        )
        self.model_load_seconds = round(monotonic() - started, 4)
        # long relighter calls check it between their steps (Relighter.raise_if_stopped)
        self.relighter.stop_event = self.stop
        #: Seeds per relighter call: the plan's, else the relighter's choice for its device.
        self.batch_size = manifest.batch_size or self.relighter.batch_size
        #: Reads and decodes the plan's files into what the relighter is handed.
        self.loader = InputLoader(manifest, self.relighter.reference_resolution,
                                  pin_memory=torch.device(self.device).type == "cuda",
                                  reference_pixels=self.relighter.reference_pixels)
        #: Unexpected relighter errors in a row, across shards (UNEXPECTED_LIMIT ends one).
        self.unexpected_in_a_row = 0
        self._reporter: _Reporter | None = None
        #: items finished and seconds spent on the shards this runner finished (its rate)
        self._items, self._seconds = 0, 0.0
        #: (image, reference, error) failures already logged at warning level
        self.failures_said: set[tuple[str, str, str]] = set()
        #: the final reports of the shards this process finished, kept in one object of its
        #: own for the readers of the whole run (Run.reports): one read per worker, not per shard
        self._folded = FoldedReports(writer=f"{_safe_host()}-{os.getpid()}-{os.urandom(4).hex()}")

    # --- running -----------------------------------------------------------------------------
    def run(self, index: int, lease: tuple[LeaseBook, Claim] | None = None,
            near_end: Callable[[float], None] | None = None) -> ShardReport:
        """Run shard ``index``; returns its final report. Raises :class:`Stopped` on stop.

        ``lease``: the shard's lease (``balance: leases``), renewed by the heartbeat;
        :class:`LeaseLost` when another worker took it (nothing more is written for it).
        ``near_end``: told the seconds the shard has left as its items finish (the claimer's
        :meth:`~relit_k8s.leases.Claimer.near_end`: the next shard is claimed ahead).
        """
        units = self.manifest.shard_units(index)
        report = self._start_report(index, units, lease, near_end)
        try:
            _ShardPass(self, report).run(units)
        except LeaseLost:
            report.abandon()
            raise
        except Stopped:
            report.finish("stopped", "stopped by a signal before the shard was finished; "
                          "run the index again to finish it", Stopped.exit_code)
            self._let_go(report, done=False)
            raise
        except BaseException as e:
            report.finish("failed", f"{type(e).__name__}: {e}", exit_code_for(e))
            self._let_go(report, done=False)
            raise
        report.finish("done", exit_code=EXIT_OK)
        self._let_go(report, done=True)
        r = report.report
        self._fold(r, report.size)
        if r.items_done:  # skipped items are quick: they would overstate the rate
            self._items += r.items_done
            self._seconds += monotonic() - report._started
        log.info("shard %d done: %d written, %d skipped, %d failed (%s items/s)", index,
                 r.items_done, r.items_skipped, r.items_failed, r.items_per_second,
                 extra={"event": "end", "fields": {
                     "index": index, "done": r.items_done, "skipped": r.items_skipped,
                     "failed": r.items_failed, "total": r.items_total,
                     "items_per_second": r.items_per_second, "timings": r.timings}})
        return r

    def _start_report(self, index: int, units: list[Unit],
                      lease: tuple[LeaseBook, Claim] | None,
                      near_end: Callable[[float], None] | None) -> _Reporter:
        """The shard's report, written as running (its heartbeat starts), and the start event."""
        m = self.manifest
        attempt = self._previous_attempts(index) + 1
        report = _Reporter(
            self.output,
            self.relit_run.paths.report(index),
            ShardReport(
                run_id=m.run_id, index=index, state="running",
                items_total=sum(u.items for u in units), started_at=now(), updated_at=now(),
                host=socket.gethostname(), device=device_label(self.device),
                relighter=m.relighter.name, attempt=attempt,
                timings={"model_load": self.model_load_seconds},
            ),
            self.report_interval,
            self.progress,
            self.settings.progress_seconds,
            lease,
            near_end,
            self.batch_size,
        )
        self._reporter = report
        report.start()
        log.info("shard %d of run %s (attempt %d): %d items in %d units on %s, relighter %s",
                 index, m.run_id, attempt, report.report.items_total, len(units),
                 report.report.device, m.relighter.name,
                 extra={"event": "start", "fields": {
                     "run_id": m.run_id, "index": index, "attempt": attempt,
                     "items": report.report.items_total, "units": len(units),
                     "device": report.report.device, "host": report.report.host,
                     "relighter": m.relighter.name, "options": m.relighter.options,
                     "batch_size": self.batch_size, "model_load_seconds": self.model_load_seconds,
                     "model_load_phases": getattr(self.relighter, "load_timings", None),
                 }})
        return report

    def _fold(self, report: ShardReport, size: int) -> None:
        """Add a finished shard's report to this process's summary and write it (only this
        process writes it: nothing to merge, nothing lost). A summary not written costs the
        readers one more request per shard, no more: they read the report itself."""
        self._folded.reports[report.index] = report.model_copy(deep=True)
        self._folded.sizes[report.index] = size
        key = join_key(self.relit_run.paths.folded, f"{self._folded.writer}.json")
        try:
            self.output.write(key, self._folded.model_dump_json().encode())
        except RelitError as e:
            log.warning("could not write the summary of finished reports %s: %s", key, e)

    @staticmethod
    def _let_go(report: _Reporter, done: bool) -> None:
        """With a lease: mark the shard finished, or free it at once for another worker."""
        if report.book is None or report.claim is None or report.lost.is_set():
            return
        try:
            if done:  # written while the worker claims its next shard
                report.book.finish_soon(report.claim)
            else:
                report.book.release(report.claim)
        except RelitError as e:  # a lease left behind goes stale and is taken later
            if done:
                raise
            log.warning("could not release the lease of shard %d: %s", report.report.index, e)

    def claimer(self, index: int, workers: int | None = None) -> Claimer:
        """``balance: leases``: the shards this worker (``index`` of ``workers``; by default
        ``RELIT_WORKERS``) claims, one at a time, until every shard is finished."""
        book = LeaseBook(self.output, self.manifest.run_id, seconds=self.settings.lease_seconds)
        return Claimer(book, self.manifest.shards, index, workers or self.settings.workers,
                       poll=self.settings.lease_poll, stop=self.stop)

    def run_claimed(self, index: int, workers: int | None = None,
                    hooks: ClaimHooks | None = None) -> int:
        """``balance: leases``: run the shards this worker claims until every shard of the run
        is finished (by it or others); returns how many it finished. :class:`Stopped` when
        stopped first (its shard's lease is released, for another worker to take at once).

        A failed shard's error is raised (a pod exits with its code and Kubernetes retries the
        index) unless ``hooks.retry`` asks for another claim; ``hooks`` also hears each shard
        begin, end and be left to another worker (the local runner's events)."""
        hooks = hooks or ClaimHooks()
        self.check_leases_hold()
        claimer = self.claimer(index, workers)
        finished = in_a_row = 0
        try:
            for claim in claimer:
                hooks.begin(claim.shard)
                try:
                    self.run(claim.shard, (claimer.book, claim), claimer.near_end)
                except LeaseLost:
                    hooks.left(claim.shard)  # another worker finishes it
                    continue
                except Stopped:
                    raise
                except BaseException as e:
                    in_a_row += 1
                    delay = None if self.stop.is_set() else hooks.retry(claim.shard, e, in_a_row)
                    if delay is None:
                        raise
                    hooks.left(claim.shard)  # its lease is free: any worker may take it
                    self.stop.wait(delay)
                    continue
                in_a_row = 0
                finished += 1
                hooks.finished(claim.shard)
        finally:
            claimer.close()  # a shard claimed ahead is released at once
        if self.stop.is_set():
            raise Stopped("stopped before every shard of the run was finished")
        self.log_all_done(claimer, finished)
        return finished

    def check_leases_hold(self) -> None:
        """On S3, before its first claim, a worker checks that the store does the conditional
        writes its leases stand on (:func:`~relit_k8s.leases.conditional_write_problem`, a
        few requests): the plan's probe may have been made against another endpoint, or the
        store changed since, and two workers winning one shard would duplicate its work.
        :class:`ConfigError` (exit 78: retrying cannot help) when it does not."""
        if not isinstance(self.output, S3Storage):
            return
        problem = conditional_write_problem(self.output)
        if problem is not None:
            raise ConfigError(
                f"the output store {self.output.uri} does not do the conditional writes leases "
                f"need ({problem}): two workers could claim one shard. Plan the run again with "
                "--balance static, or use a store that does them (AWS S3, MinIO, SeaweedFS)")

    def items_rate(self) -> float | None:
        """Items written per second of shard time, over the shards this worker finished."""
        return round(self._items / self._seconds, 4) if self._seconds > 0 and self._items \
            else None

    def log_all_done(self, claimer: Claimer, finished: int) -> None:
        log.info("every shard of run %s is finished: this worker finished %d (%d claims, %d "
                 "of them taken from stalled workers)", self.manifest.run_id, finished,
                 claimer.claims, claimer.steals, extra={"event": "all_done", "fields": {
                     "finished": finished, "claims": claimer.claims,
                     "steals": claimer.steals}})

    def _previous_attempts(self, index: int) -> int:
        try:
            old = self.relit_run.read_report(index)
        except RelitError:  # unreadable: count this attempt as the first
            return 0
        return old.attempt if old else 0


class _ShardPass:
    """One pass over a shard's units: decode ahead in threads (bounded caches), relight each
    pair's missing seeds in batches, encode and write in threads (a bounded backlog), and
    record every item in the report as written, skipped or failed."""

    def __init__(self, runner: ShardRunner, report: _Reporter):
        self.runner, self.report = runner, report
        self.manifest, self.relighter = runner.manifest, runner.relighter
        self.loader, self.output, self.stop = runner.loader, runner.output, runner.stop
        self.errors: list[BaseException] = []  # from the write threads: they end the pass
        #: scores every output as it is written (:mod:`relit_k8s.scores`), if the relighter can
        self.selector = runner.relighter.selector
        self._codes: OrderedDict[str, torch.Tensor] = OrderedDict()  # reference -> its code
        self.backlog = _Backlog(runner.settings.write_backlog_bytes)

    def _timed(self, what: str) -> _Timer:
        return _Timer(self.report, what)

    def _load_image(self, key: str) -> torch.Tensor:
        with self._timed("decode"):
            return self.loader.image(key)

    def _load_ref(self, key: str) -> torch.Tensor:
        with self._timed("decode"):
            return self.loader.reference(key)

    def _load_normals(self, key: str) -> torch.Tensor | None:
        with self._timed("decode"):
            return self.loader.normal_map(key)

    def _pairs(self, units: list[Unit]) -> Iterator[_PairWork]:
        """Group the shard's units by pair and drop the items already written; what an
        earlier, killed attempt of the shard left half-written of the others is removed."""
        m = self.manifest
        for unit, todo in self.runner.relit_run.missing(units):
            skipped = unit.items - len(todo)
            if skipped:
                self.report.add(skipped=skipped)
            if todo:
                self.runner.output.remove_partial_writes(
                    m.pair_folder(unit.image, unit.ref),
                    [posixpath.basename(m.output_key(unit.image, unit.ref, s)) for _, s in todo])
            if todo or (skipped and self.selector is not None):
                making = {s for _, s in todo}
                seeds = pair_seeds(m.base_seed, unit.image, unit.ref, m.iterations)
                yield _PairWork(unit, todo, [seeds[i] for i in range(unit.start, unit.stop)
                                             if seeds[i] not in making], pending=len(todo))

    def run(self, units: list[Unit]) -> None:
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="relit-decode") as decode, \
                ThreadPoolExecutor(self.runner.settings.encode_threads(),
                                   thread_name_prefix="relit-write") as write:
            self.write_pool = write
            self.images = _Cache(decode, self._load_image, size=IMAGE_CACHE)
            self.refs = _Cache(decode, self._load_ref,
                               max_bytes=self.runner.settings.ref_cache_bytes)
            self.normals = (_Cache(decode, self._load_normals, size=IMAGE_CACHE)
                            if self.loader.normals else None)
            window: list[_PairWork] = []
            for w in self._pairs(units):
                window.append(w)
                if not w.todo:  # only its score record to complete
                    continue
                self.images.get(w.image)  # prefetch
                self.refs.get(w.ref)
                if self.normals:
                    self.normals.get(w.image)
                if len(window) > LOOKAHEAD:
                    self._relight_pair(window.pop(0))
            for w in window:
                self._relight_pair(w)
            write.shutdown(wait=True)
            self._raise_write_error()

    def _raise_if_stopped(self) -> None:
        if self.report.lost.is_set():
            raise LeaseLost(f"shard {self.report.report.index}: its lease was taken by another "
                            "worker")
        if self.stop.is_set():
            raise Stopped("stopped before the shard was finished")

    def _raise_write_error(self) -> None:
        if self.errors:
            raise self.errors[0]

    def _reference_code(self, key: str, ref: torch.Tensor) -> torch.Tensor:
        assert self.selector is not None
        code = self._codes.get(key)
        if code is None:
            with self._timed("score"):
                code = self.selector.reference_code(ref.permute(1, 2, 0).numpy())
            self._codes[key] = code
            while len(self._codes) > 4096:  # codes are 16 floats; references recur
                self._codes.popitem(last=False)
        return code

    def _relight_pair(self, w: _PairWork) -> None:
        self._raise_write_error()
        self._raise_if_stopped()
        if not w.todo:
            self._finish_unit(w)
            return
        try:
            image = self.images.get(w.image).result()
            ref = self.refs.get(w.ref).result()
            if self.selector is not None:
                w.code = self._reference_code(w.ref, ref)
            normals = self.normals.get(w.image).result() if self.normals else None
            if normals is not None and normals.shape != image.shape:
                raise ItemError(f"its normal map is {normals.shape[2]}x{normals.shape[1]}, the "
                                f"image {image.shape[2]}x{image.shape[1]}: they must have the "
                                "same size", key=w.image)
        except ItemError as e:
            self._fail(w, w.todo, e)
            self._settled(w, len(w.todo))
            return
        dev = self.relighter.device
        image_d = image.to(dev, non_blocking=True)
        ref_d = ref.to(dev, non_blocking=True)
        normals_d = normals.to(dev, non_blocking=True) if normals is not None else None
        seed_bytes = 3 * image.shape[1] * image.shape[2] * 4  # one float32 output
        bs = max(1, min(self.runner.batch_size,
                        self.runner.settings.call_output_bytes // seed_bytes))
        for start in range(0, len(w.todo), bs):
            self._raise_if_stopped()
            self._raise_write_error()
            batch = w.todo[start:start + bs]
            try:
                with self._timed("relight"):
                    out = self.relighter.relight(image_d, ref_d, [s for _, s in batch],
                                                 normals_d)
                    # to the host first: the clamped copy then costs host memory, not GPU
                    pixels = out.detach().cpu().float().clamp(0, 1).permute(0, 2, 3, 1).numpy()
                if tuple(out.shape) != (len(batch), 3, *image.shape[1:]):
                    raise ItemError(f"the relighter returned shape {tuple(out.shape)} for "
                                    f"{len(batch)} seeds of a {tuple(image.shape)} image")
            except ItemError as e:
                self._fail(w, batch, e)
                self._settled(w, len(batch))
                continue
            except (Stopped, MemoryError, torch.OutOfMemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - one odd input must not end the shard ...
                self.runner.unexpected_in_a_row += 1
                if self.runner.unexpected_in_a_row >= UNEXPECTED_LIMIT:  # ... a broken one must
                    raise
                log.exception("relighter failed on %s x %s", w.image, w.ref)
                self._fail(w, batch, e)
                self._settled(w, len(batch))
                continue
            self.runner.unexpected_in_a_row = 0
            for (it, seed), px in zip(batch, pixels, strict=True):
                self.backlog.take(px.nbytes)
                key = self.manifest.output_key(w.image, w.ref, seed)
                fut = self.write_pool.submit(self._write_one, key, px, w, seed)
                fut.add_done_callback(functools.partial(self._written, w=w, it=it, seed=seed,
                                                        nbytes=px.nbytes))

    def _write_one(self, key: str, pixels: np.ndarray, w: _PairWork, seed: int) -> None:
        with self._timed("encode"):
            data = images.encode(pixels, key, self.runner.settings.png_level)
        score = None
        if self.selector is not None and w.code is not None:
            try:
                with self._timed("score"):  # the bytes written: a re-score of the file agrees
                    score = self.selector.score(data, key, w.code)
            except Exception as e:  # noqa: BLE001 - a score is a record: never worth an output
                log.warning("could not score %s (%s: %s): written unscored", key,
                            type(e).__name__, e)
        with self._timed("write"), self.report.writing():
            self.output.write(key, data)
        if score is not None:
            with w.lock:
                w.scores[seed] = score

    def _written(self, fut: Future[None], *, w: _PairWork, it: int, seed: int,
                 nbytes: int) -> None:
        self.backlog.give(nbytes)
        exc = fut.exception()  # a written output was counted by _write_one
        if isinstance(exc, ItemError):
            self._fail(w, [(it, seed)], exc)
        elif exc is not None:
            self.errors.append(exc)
            return  # the pass ends: the unit is not finished
        self._settled(w, 1)

    def _settled(self, w: _PairWork, n: int) -> None:
        """``n`` items of ``w`` are written or failed; the last one finishes the unit."""
        with w.lock:
            w.pending -= n
            last = w.pending == 0
        if last:
            try:
                self._finish_unit(w)
            except BaseException as e:  # noqa: BLE001 - ends the pass, as a failed write does
                self.errors.append(e)

    def _finish_unit(self, w: _PairWork) -> None:
        """Write the unit's score record (with a relighter that scores): this pass's scores,
        and those of the outputs it skipped, from the record an earlier attempt wrote or, where
        it has none, scored from the files. With ``keep_top``, then prune the pair."""
        if self.selector is None:
            return
        m, out, run = self.manifest, self.output, self.runner.relit_run
        number = m.unit_number(w.unit)
        found: dict[int, float] = {}
        if w.skipped:
            old = run.read_unit_scores(number)
            found = old.by_seed() if old else {}
            unscored = [s for s in w.skipped if s not in found]
            if not unscored and not w.scores:
                return  # the record is complete already
            if unscored and w.code is None:  # (on the main thread: it reads the cache)
                try:
                    w.code = self._reference_code(w.ref, self.refs.get(w.ref).result())
                except ItemError:  # its items failed for it: nothing to score against
                    return
            for seed in unscored:
                key = m.output_key(w.image, w.ref, seed)
                try:
                    data = out.read(key)
                except NotFoundError:  # removed since the listing: the next attempt makes it
                    continue
                assert w.code is not None
                with self._timed("score"):
                    found[seed] = self.selector.score(data, key, w.code)
        with w.lock:
            found.update(w.scores)
        record = UnitScores(image=w.image, ref=w.ref,
                            scores={str(k): v for k, v in sorted(found.items())})
        out.write(run.paths.unit_scores(number), record.model_dump_json().encode())
        if m.keep_top is not None:
            self._keep_top(w.unit, found)

    def _keep_top(self, unit: Unit, scored: dict[int, float]) -> None:
        """``--keep-top K``: once every seed of the unit's pair is written and scored (all its
        units have their records), delete the pair's outputs but the K best. Deleting is
        idempotent, so two units finishing a pair at once both may; a pair with a failed
        item keeps all its outputs."""
        m, run = self.manifest, self.runner.relit_run
        first = unit.pair * m.units_per_pair
        this = m.unit_number(unit)
        found = dict(scored)
        for number in range(first, first + m.units_per_pair):
            if number == this:
                continue
            record = run.read_unit_scores(number)
            if record is None:
                return  # the pair is not finished yet: its last unit prunes it
            found.update(record.by_seed())
        seeds = pair_seeds(m.base_seed, unit.image, unit.ref, m.iterations)
        if not set(seeds) <= found.keys():
            return
        assert m.keep_top is not None
        keep = {s for s, _ in best_seeds(m, unit.image, unit.ref, found, m.keep_top)}
        for seed in seeds:
            if seed not in keep:
                self.output.delete(m.output_key(unit.image, unit.ref, seed))
        log.info("%s x %s: kept the %d best of %d outputs", unit.image, unit.ref, len(keep),
                 len(seeds), extra={"event": "kept_top", "fields": {
                     "image": unit.image, "ref": unit.ref, "kept": sorted(keep)}})

    def _fail(self, w: _PairWork, items: list[tuple[int, int]], exc: Exception) -> None:
        # once per pair and reason at warning level: a bad image fails each of its units
        said = (w.image, w.ref, str(exc))
        level = logging.DEBUG if said in self.runner.failures_said else logging.WARNING
        if len(self.runner.failures_said) < 100_000:  # bounded: a run of broken pairs
            self.runner.failures_said.add(said)
        log.log(level, "failed %s x %s (%d item%s): %s", w.image, w.ref, len(items),
                "" if len(items) == 1 else "s", exc,
                    extra={"event": "item_failed", "fields": {
                        "image": w.image, "ref": w.ref, "iterations": [i for i, _ in items],
                        "error": str(exc), "kind": type(exc).__name__}})
        self.report.add(failures=[Failure.of(w.image, w.ref, it, seed, exc)
                                  for it, seed in items])


def abandon(runner: ShardRunner | None) -> None:
    """The grace period after SIGTERM ran out: save the report as it stands and exit 143 now."""
    save_abandoned(runner)
    log.warning("grace period over: exiting with %d", Stopped.exit_code)
    logging.shutdown()
    os._exit(Stopped.exit_code)


def save_abandoned(runner: ShardRunner | None) -> None:
    """Save the report of ``runner``'s shard, if it is running, as stopped with its batch
    abandoned (:func:`abandon`, before the process ends).

    Outputs not yet written are lost, never half-written (atomic writes); a rerun redoes them.
    Those being written get :data:`ABANDON_WRITES_SECONDS` to land, and no other starts, so
    that the report counts every output that exists.
    """
    reporter = runner._reporter if runner is not None else None
    if reporter is None or reporter.report.state != "running":
        return
    try:
        left = reporter.close(ABANDON_WRITES_SECONDS)
        if left:
            log.warning("%d outputs were still being written: they may exist without being "
                        "counted in the report (a rerun skips them)", left)
        reporter.finish("stopped", "stopped by a signal; the grace period ran out, so the "
                        "current batch was abandoned (nothing half-written): run the index "
                        "again to finish it", Stopped.exit_code, abandoned=True)
    except BaseException:  # noqa: BLE001 - exiting regardless
        log.exception("could not save the report before exiting")


def install_stop_handlers(stop: threading.Event, overdue: Callable[[], None] | None = None,
                          grace: float = 30.0, announce: bool = True) -> None:
    """SIGTERM and SIGINT set ``stop``: the worker ends its current step (relighters that
    check :meth:`Relighter.raise_if_stopped`) or batch, saves its report as ``stopped``, and
    exits 143.

    If it is still running ``grace`` seconds later (``RELIT_STOP_GRACE``), ``overdue`` is called
    (from a timer thread): it abandons the batch, saves the report and ends the process.
    ``announce=False`` logs the signal at info level (``relit-k8s run`` says it once for all
    its workers).
    """

    def handler(signum, _frame):
        if stop.is_set():
            return
        log.log(logging.WARNING if announce else logging.INFO,
                "received %s: stopping after the current step (at most %.0fs)",
                signal.Signals(signum).name, grace)
        stop.set()
        if overdue is not None:
            timer = threading.Timer(grace, overdue)
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def job_index(index: int | None) -> int:
    """``--index``, else ``JOB_COMPLETION_INDEX``; a :class:`ConfigError` without either."""
    if index is None and os.environ.get("JOB_COMPLETION_INDEX") not in (None, ""):
        try:
            index = int(os.environ["JOB_COMPLETION_INDEX"])
        except ValueError:
            raise ConfigError(
                f"JOB_COMPLETION_INDEX={os.environ['JOB_COMPLETION_INDEX']!r} is not an integer"
            ) from None
    if index is None:
        raise ConfigError("no shard index: pass --index N or set JOB_COMPLETION_INDEX")
    return index


def main(manifest: str | None, index: int | None, device: str | None = None) -> int:
    """``relit-k8s worker``: run one shard and return the process exit code."""
    manifest = manifest or os.environ.get("RELIT_MANIFEST")
    if not manifest:
        raise ConfigError("no manifest: pass --manifest URI or set RELIT_MANIFEST")
    index = job_index(index)
    runner = start(manifest, device, index=index)
    if runner.manifest.balance == "leases":  # index: this worker, not a shard
        runner.run_claimed(index)
    else:
        runner.run(index)  # its "start" event tells the model load time
    return EXIT_OK


def start(manifest_uri: str, device: str | None = None, index: int | None = None,
          progress: ProgressFn | None = None, announce_stop: bool = True) -> ShardRunner:
    """The start of every worker process, a pod's or one of ``relit-k8s run``'s: SIGTERM and
    SIGINT stop it cleanly (its ``stop`` event; past the grace period the report is saved and
    the process exits 143), the manifest is read and checked (``index`` against its shards,
    before the model loads), and the relighter is loaded once."""
    settings = WorkerSettings.from_env()
    # torch's default is every core of the node, whatever the pod's CPU limit: capped here
    # (one of `relit-k8s run`'s processes has set its share already)
    torch.set_num_threads(min(torch.get_num_threads(), cpu_threads()))
    stop = threading.Event()
    runners: list[ShardRunner] = []
    install_stop_handlers(stop, lambda: abandon(runners[0] if runners else None),
                          settings.stop_grace, announce_stop)
    m = load_manifest(manifest_uri)
    if index is not None and m.balance == "static":
        m.shard_range(index)
    runners.append(ShardRunner(m, device=device, stop=stop, progress=progress,
                               settings=settings))
    return runners[0]

"""The local runner: W worker processes on one machine, like the pods of an Indexed Job.

Each worker process loads the relighter once, then asks the parent for a shard index each time
it is free (the seed's dynamic balancing, at shard granularity) and runs it with the same
:class:`~relit_k8s.worker.ShardRunner` a pod uses (``balance: leases``: it claims shards from the
output store instead). GPUs are given one per process through ``CUDA_VISIBLE_DEVICES``.
Progress and log lines come back to the parent through a queue of each worker's own.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.connection import wait

from .errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SIGTERM,
    EXIT_TEMPORARY,
    ConfigError,
    Stopped,
    exit_code_for,
)
from .leases import ClaimHooks
from .manifest import Manifest
from .settings import cpu_threads

log = logging.getLogger("relit_k8s.local")

#: Attempts per shard on a temporary failure (exit 75), like the Job's per-index backoff limit.
LOCAL_ATTEMPTS = 3
#: Seconds before the first retry of a shard; doubles with each attempt.
RETRY_DELAY = 2.0
#: Seconds a stopping worker gets to save its report before it is killed.
STOP_GRACE = 60.0
#: Seconds the parent waits for its workers' events when none has come (sooner when a
#: worker exits).
EVENT_WAIT = 0.05


@dataclass(frozen=True)
class Slot:
    """One worker process: its torch device, the GPU it may see (None: leave it as is), its CPU
    threads, and how many workers share its GPU."""

    device: str
    visible_gpu: str | None = None
    threads: int = 0
    gpu_share: int = 1


def preflight(manifest: Manifest) -> None:
    """What would stop the workers on this machine from starting (a missing extra, a model
    directory that does not exist), found before the manifest is written: a run that cannot
    start leaves nothing behind."""
    from .relighters import parse_options, resolve

    cls = resolve(manifest.relighter.name)
    cls.preflight(parse_options(cls, manifest.relighter.options), here=True)


def parse_gpus(text: str | None) -> list[int] | None:
    """``--gpus 0,1`` -> [0, 1]; None when not given."""
    if not text:
        return None
    try:
        return [int(g) for g in text.replace(" ", "").split(",") if g]
    except ValueError:
        raise ConfigError(f"--gpus {text!r}: expected GPU numbers such as 0,1") from None


def cuda_visible() -> bool:
    """Whether a CUDA GPU is visible. A CPU-only build of torch (the version of its CPU wheels
    ends in ``+cpu``) sees none, which is known without importing it: the parent of a run on
    the CPU, which relights nothing itself, then never imports torch (1.4 s of CPU)."""
    try:
        if metadata.version("torch").endswith("+cpu"):
            return False
    except metadata.PackageNotFoundError:
        pass  # the import below says what is missing
    import torch

    return torch.cuda.is_available()


def plan_slots(device: str | None, gpus: list[int] | None, workers: int | None) -> list[Slot]:
    """Worker slots for ``--device``, ``--gpus`` and ``--workers``."""
    if workers is not None and workers < 1:
        raise ConfigError("--workers must be at least 1")
    if device is None:
        device = "cuda" if (gpus or cuda_visible()) else "cpu"
    if device == "cuda":
        if not cuda_visible():
            raise ConfigError("--device cuda: no CUDA GPU is visible here (use --device cpu)")
        import torch

        count = torch.cuda.device_count()
        gpus = gpus if gpus else list(range(count))
        bad = [g for g in gpus if not 0 <= g < count]
        if bad:
            raise ConfigError(f"--gpus {bad}: this machine has GPUs 0..{count - 1}")
        n = workers or len(gpus)
        chosen = [gpus[i % len(gpus)] for i in range(n)]
        return [Slot("cuda:0", str(g), gpu_share=chosen.count(g)) for g in chosen]
    if device != "cpu":
        raise ConfigError(f"unknown --device {device!r}: use cpu or cuda")
    if gpus:
        raise ConfigError("--gpus needs --device cuda")
    n = workers or 1
    return [Slot("cpu", None, cpu_threads(n)) for _ in range(n)]


class _QueueLog(logging.Handler):
    def __init__(self, events):
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.put(("log", record.levelno, self.format(record)))
        except Exception:  # pragma: no cover - logging must never break the worker
            pass


def _retry_delay(events, shard: int, error: BaseException, attempt: int) -> float | None:
    """A local worker's retry policy, with leases or static shards: seconds to wait before
    attempt ``attempt + 1`` after a temporary failure (said in the log), doubling each time;
    None once ``LOCAL_ATTEMPTS`` are spent, or for any other failure."""
    if exit_code_for(error) != EXIT_TEMPORARY or attempt >= LOCAL_ATTEMPTS:
        return None
    events.put(("log", logging.WARNING, f"shard {shard}: {error}; retrying"))
    return RETRY_DELAY * 2 ** (attempt - 1)


class _ClaimEvents(ClaimHooks):
    """``balance: leases`` in a local worker process: the claiming loop's news, sent to the
    parent; a temporary failure frees the shard and the process claims again after a delay
    (the same shard or another); after ``LOCAL_ATTEMPTS`` of them in a row, or any other
    failure, the process ends, as a pod would."""

    def __init__(self, wid: int, events):
        self.wid, self.events = wid, events
        self.current: int | None = None  # the shard this process runs

    def begin(self, shard: int) -> None:
        self.current = shard
        self.events.put(("begin", shard, self.wid))

    def left(self, shard: int) -> None:
        self.current = None
        self.events.put(("left", shard))

    def finished(self, shard: int) -> None:
        self.current = None
        self.events.put(("shard", shard, EXIT_OK, None))

    def retry(self, shard: int, error: BaseException, in_a_row: int) -> float | None:
        return _retry_delay(self.events, shard, error, in_a_row)

    def ended(self, error: BaseException) -> None:
        """The loop ended on ``error``: the current shard's exit code, or the process's when
        it failed between shards (a claim that could not be made)."""
        code, what = exit_code_for(error), f"{type(error).__name__}: {error}"
        if self.current is not None:
            self.events.put(("shard", self.current, code, str(error) if code == EXIT_SIGTERM
                             else what))
        elif code != EXIT_SIGTERM:  # stopped between shards: nothing of its own to say
            self.events.put(("fatal", self.wid, code, f"worker {self.wid} stopped: {what}"))


def _claim_shards(runner, wid: int, position: tuple[int, int], events) -> None:
    """``balance: leases``: this process claims shards (as worker ``position`` = (its index,
    the workers) in the claim order) until every shard of the run is finished, here or by
    any other worker on the same output (pods of a Job included)."""
    hooks = _ClaimEvents(wid, events)
    try:
        runner.run_claimed(*position, hooks=hooks)
    except BaseException as e:  # noqa: BLE001 - its exit code goes to the parent
        hooks.ended(e)


def _worker_process(wid: int, claim: tuple[int, int], manifest_uri: str, slot: Slot, indexes,
                    events) -> None:
    """Body of one worker process (spawned; CUDA is not initialised before this point).
    ``claim``: (its index, the workers) in the claim order of ``balance: leases``."""
    if slot.visible_gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.visible_gpu
        # relighters that size batches from free GPU memory divide it by this (diffusion does)
        os.environ["RELIT_GPU_SHARE"] = str(slot.gpu_share)
    import torch

    from . import worker

    if slot.threads:
        torch.set_num_threads(slot.threads)
    root = logging.getLogger("relit_k8s")
    handler = _QueueLog(events)
    # which worker (GPU) each line comes from
    who = f"gpu {slot.visible_gpu}" if slot.visible_gpu is not None else f"worker {wid}"
    handler.setFormatter(logging.Formatter(f"[{who}] %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        runner = worker.start(manifest_uri, slot.device,
                              progress=lambda d, s, f: events.put(("progress", d, s, f)),
                              announce_stop=False)  # the parent says it once
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        events.put(("fatal", wid, exit_code_for(e),
                    f"worker {wid} could not start: {type(e).__name__}: {e}"))
        return
    if runner.manifest.balance == "leases":
        _claim_shards(runner, wid, claim, events)
        return
    stop = runner.stop
    while not stop.is_set():
        events.put(("next", wid))  # the parent answers on this worker's own queue
        index = _answer(indexes, stop)
        if index is None:
            break
        events.put(("begin", index, wid))
        for attempt in range(1, LOCAL_ATTEMPTS + 1):
            try:
                runner.run(index)
                events.put(("shard", index, EXIT_OK, None))
                break
            except Stopped as e:
                events.put(("shard", index, EXIT_SIGTERM, str(e)))
                return
            except BaseException as e:  # noqa: BLE001
                delay = None if stop.is_set() else _retry_delay(events, index, e, attempt)
                if delay is not None:
                    stop.wait(delay)
                    continue
                code = exit_code_for(e)
                events.put(("shard", index, code, f"{type(e).__name__}: {e}"))
                if code == EXIT_CONFIG:
                    return
                break


def _answer(indexes, stop) -> int | None:
    """The parent's answer to ``next``: a shard index, or None when none is left (or the
    worker was asked to stop meanwhile)."""
    while not stop.is_set():
        try:
            return indexes.get(timeout=0.5)
        except queue.Empty:
            continue
    return None


def _settle_reports(manifest_uri: str, begun: dict[int, int], procs, stopped: bool) -> None:
    """Reports that still say ``running`` after their worker ended (it was killed, or died,
    before saving them) get their true final state, so that ``status`` never shows a dead
    run as running."""
    from .clock import now
    from .errors import RelitError

    run = _open_run(manifest_uri, "settle the reports of killed workers")
    if run is None:
        return
    if run.manifest.balance == "leases":
        _release_dead(run, {p.pid for p in procs if p.exitcode not in (None, 0)})
    for index, wid in begun.items():
        try:
            report = run.read_report(index)
        except RelitError:
            continue
        if report is None or report.state != "running":
            continue
        code = procs[wid].exitcode
        if stopped:
            update = {"state": "stopped", "exit_code": EXIT_SIGTERM,
                      "error": "stopped: its worker process was ended before it saved this "
                               "report; run the same command again to finish it"}
        else:
            update = {"state": "failed", "exit_code": EXIT_FAILED,
                      "error": f"its worker process died (exit code {code}) before it saved "
                               "this report"}
        settled = report.model_copy(update={**update, "finished_at": now(), "updated_at": now()})
        try:
            run.output.write(run.paths.report(index), settled.model_dump_json(indent=1).encode())
        except RelitError as e:
            log.warning("could not settle the report of shard %d: %s", index, e)


def _finished_elsewhere(manifest_uri: str, codes: dict[int, int]) -> set[int]:
    """``balance: leases``: the shards marked finished that no worker of this run reported
    (another ``relit-k8s run`` or the pods of a Job on the same output finished them)."""
    from .errors import RelitError
    from .leases import LeaseBook

    run = _open_run(manifest_uri, "read which shards are finished")
    if run is None or run.manifest.balance != "leases":
        return set()
    try:
        done = LeaseBook(run.output, run.run_id).listing().done
    except RelitError as e:
        log.warning("could not read which shards are finished: %s", e)
        return set()
    return {s for s in done if s not in codes}


def _open_run(manifest_uri: str, why: str):
    """The run of ``manifest_uri``, or None (with a warning saying ``why`` it was wanted)
    when it cannot be read: what the parent does after its workers is best effort."""
    from .errors import RelitError
    from .manifest import load_manifest
    from .run import Run

    try:
        return Run.of(load_manifest(manifest_uri))
    except RelitError as e:
        log.warning("could not %s: %s", why, e)
        return None


def _release_dead_of(manifest_uri: str, pids: set[int]) -> None:
    run = _open_run(manifest_uri, "free the leases of dead workers")
    if run is not None and run.manifest.balance == "leases":
        _release_dead(run, pids)


def _release_dead(run, pids: set[int]) -> None:
    """Every lease that the killed worker processes ``pids`` (of this host) left behind is
    freed, so that the workers still running, the same command run again, or another machine
    take their shards at once, not a lease time (60 s) later: the shard a worker said it
    began, and also the one it claimed ahead, the one whose end it said while its lease was
    still being let go, and one claimed a moment before it said so."""
    import socket

    from .errors import RelitError
    from .leases import Claim, LeaseBook, owner_process

    book = LeaseBook(run.output, run.run_id)
    dead = {(socket.gethostname(), pid) for pid in pids}
    try:
        held = book.leases().held
    except RelitError as e:
        log.warning("could not list the leases of dead workers: %s", e)
        return
    for shard in sorted(held):
        try:
            found = book.read(shard)
            if found is not None and owner_process(found[0].owner) in dead:
                book.release(Claim(shard, found[1], found[0]))
        except RelitError as e:
            log.warning("could not free the lease of shard %d: %s", shard, e)


@dataclass
class LocalResult:
    shard_codes: dict[int, int]
    messages: list[str]
    interrupted: bool
    #: The exit code for an interruption: 130 for Ctrl+C (SIGINT), 143 for SIGTERM.
    interrupt_code: int = EXIT_INTERRUPTED

    @property
    def exit_code(self) -> int:
        codes = set(self.shard_codes.values())
        for code in (EXIT_CONFIG, EXIT_FAILED, EXIT_TEMPORARY, EXIT_SIGTERM):
            if code in codes:
                return code
        return EXIT_OK if codes else EXIT_FAILED


class _Supervisor:
    """The parent of ``run_local``'s worker processes: it hands out shard indexes, relays the
    workers' events, stops them on SIGTERM / Ctrl+C (a second Ctrl+C kills them), frees the
    shard of a worker killed mid-shard, and collects the exit codes."""

    def __init__(self, manifest_uri: str, slots: list[Slot], on_progress, on_log):
        self.manifest_uri, self.slots = manifest_uri, slots
        self.on_progress, self.on_log = on_progress, on_log
        self.ctx = mp.get_context("spawn")
        #: shard indexes not handed out yet (static balance: each to the worker that asks)
        self.pending: deque[int] = deque()
        #: one event queue per worker, and one for the indexes it is handed, never one for all:
        #: the writers of a multiprocessing Queue share a lock, held while a message goes into
        #: its pipe, and so do its readers, held while one waits for a message; a worker killed
        #: (SIGKILL, the OOM killer) while it held one blocked every other worker for good, and
        #: with them the run's end (tests/test_balance.py)
        self.events: list = []
        self.indexes: list = []
        self.procs: list = []
        self.codes: dict[int, int] = {}
        self.messages: list[str] = []
        self.interrupted = False
        self.interrupt_code = EXIT_INTERRUPTED
        self.deadline: float | None = None
        self.begun: dict[int, int] = {}  # shard index -> worker, while a worker runs it
        self.reaped: set[int] = set()  # workers found dead, whose leases were freed
        # Signals only set a flag: an exception raised inside a queue's get() would leave half
        # a message in its pipe, and the next read would fail.
        self.signals: list[int] = []

    def start(self, shards: int, first_index: int, workers: int | None) -> None:
        self.pending = deque(range(shards))
        self.events = [self.ctx.Queue() for _ in self.slots]
        self.indexes = [self.ctx.Queue() for _ in self.slots]
        self.procs = [
            self.ctx.Process(target=_worker_process,
                             args=(w, (first_index + w, workers or len(self.slots)),
                                   self.manifest_uri, slot, self.indexes[w], self.events[w]),
                             name=f"relit-worker-{w}")
            for w, slot in enumerate(self.slots)
        ]
        for p in self.procs:
            p.start()

    def handle(self, event) -> None:
        kind = event[0]
        if kind == "progress" and self.on_progress:
            self.on_progress(*event[1:])
        elif kind == "log" and self.on_log:
            self.on_log(event[1], event[2])
        elif kind == "next":
            self.indexes[event[1]].put(self.pending.popleft() if self.pending else None)
        elif kind == "begin":
            self.begun[event[1]] = event[2]
        elif kind == "left":
            self.begun.pop(event[1], None)
        elif kind == "shard":
            _, index, code, msg = event
            self.begun.pop(index, None)
            self.codes[index] = code
            if msg and code not in (EXIT_OK, EXIT_SIGTERM):  # a stop is said once, above
                self.messages.append(f"shard {index}: {msg}")
        elif kind == "fatal":
            _, wid, code, msg = event
            self.codes[-1 - wid] = code
            self.messages.append(msg)

    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def _stop(self, signum: int) -> None:
        """Ctrl+C reaches the workers too (one process group); SIGTERM to the parent alone
        does not: either way each worker gets SIGTERM, saves its report and stops."""
        if signum == signal.SIGTERM:
            self.interrupt_code = EXIT_SIGTERM
        if self.interrupted:  # a second Ctrl+C: stop now (the reports are fixed below)
            if self.on_log:
                self.on_log(logging.WARNING, "stopping now")
            for p in self.procs:
                p.kill()
            return
        self.interrupted = True
        if self.on_log:
            self.on_log(logging.WARNING, "stopping: each worker ends its current step and "
                        "saves its report (Ctrl+C again to stop at once)")
        for p in self.procs:
            if p.is_alive() and p.pid:
                p.terminate()
        self.deadline = time.monotonic() + STOP_GRACE

    def _receive(self) -> bool:
        """Handle what the workers have sent; whether anything had come."""
        got = False
        for events in self.events:
            while True:
                try:
                    self.handle(events.get_nowait())
                    got = True
                except queue.Empty:
                    break
        return got

    def loop(self) -> None:
        """Until every worker has exited."""
        while True:
            if not self._receive() and not self.signals:
                # nothing came: a short wait, cut short when a running worker exits (the
                # sentinel of one that has exited is always ready: waiting on it would spin)
                wait([p.sentinel for p in self.procs if p.exitcode is None], EVENT_WAIT)
            if self.signals:
                self._stop(self.signals.pop(0))
                continue
            if not any(p.is_alive() for p in self.procs):
                break
            dead = {w for w, p in enumerate(self.procs)
                    if p.exitcode not in (None, 0) and w not in self.reaped}
            if dead and not self.interrupted:  # killed: free every lease it held, now
                self.reaped |= dead
                _release_dead_of(self.manifest_uri, {self.procs[w].pid for w in dead})
            if self.deadline is not None and time.monotonic() > self.deadline:
                for p in self.procs:
                    p.kill()

    def result(self, shards: int) -> LocalResult:
        """After the loop: the events that arrived last, the reports of workers killed before
        they saved theirs, and a code for every shard."""
        for p in self.procs:
            p.join()
        self._receive()  # what arrived after the last check
        codes, messages = self.codes, self.messages
        # a worker that stopped on a signal of its own (not through this process) exits 143
        stopped_alone = {EXIT_SIGTERM, EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGINT}
        for p in self.procs:
            if p.exitcode not in (0, None) and not self.interrupted \
                    and p.exitcode not in stopped_alone:
                messages.append(f"{p.name} died with exit code {p.exitcode}")
                codes.setdefault(-100 - self.procs.index(p), EXIT_FAILED)
        stopped = (self.interrupted or EXIT_SIGTERM in codes.values()
                   or any(p.exitcode in stopped_alone for p in self.procs))
        if self.begun:  # killed before they saved their report: say so in it
            _settle_reports(self.manifest_uri, self.begun, self.procs, stopped)
        finished = _finished_elsewhere(self.manifest_uri, codes)
        for index in range(shards):
            if index in finished:  # balance leases: another worker on the same output did it
                codes[index] = EXIT_OK
            elif index not in codes:  # never started, or its worker died or stopped first
                codes[index] = EXIT_SIGTERM if stopped else EXIT_FAILED
                if not stopped:
                    messages.append(f"shard {index} did not finish")
        return LocalResult(codes, messages, self.interrupted, self.interrupt_code)


def run_local(
    manifest_uri: str,
    shards: int,
    slots: list[Slot],
    on_progress: Callable[[int, int, int], None] | None = None,
    on_log: Callable[[int, str], None] | None = None,
    first_index: int = 0,
    workers: int | None = None,
) -> LocalResult:
    """Run every shard of the manifest with one process per slot; returns per-shard exit codes.

    With leases, process ``w`` claims as worker ``first_index + w`` of ``workers`` (default:
    these processes alone); a pod's processes are numbered after the pod's index."""
    supervisor = _Supervisor(manifest_uri, slots, on_progress, on_log)
    supervisor.start(shards, first_index, workers)
    previous = {sig: signal.signal(sig, supervisor.on_signal)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        supervisor.loop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return supervisor.result(shards)


#: A pod's exit code from its workers' (issue 15): the first of these present. A configuration
#: error fails the Job, a temporary one is retried, a stop is a stop; only then a crash.
POD_SEVERITY = (EXIT_CONFIG, EXIT_TEMPORARY, EXIT_SIGTERM, EXIT_FAILED)


def pod_exit_code(result: LocalResult) -> int:
    codes = set(result.shard_codes.values())
    if result.interrupted:
        codes.add(EXIT_SIGTERM)
    return next((c for c in POD_SEVERITY if c in codes), EXIT_OK if codes else EXIT_FAILED)


def run_pod(manifest_uri: str, index: int, slots: list[Slot]) -> int | None:
    """``relit-k8s worker`` with several slots (a pod, or a machine, with several GPUs): one
    worker process per slot, each claiming shards as a worker of its own (index ``index *
    len(slots) + w`` of ``RELIT_WORKERS * len(slots)``); every log line says which GPU (or
    worker) it comes from; the exit code is the most serious of theirs (:data:`POD_SEVERITY`).
    None for a static run (one shard per index: the caller runs it in one process)."""
    from .manifest import load_manifest
    from .settings import WorkerSettings

    manifest = load_manifest(manifest_uri)
    if manifest.balance != "leases":
        log.warning("%d workers here, but run %s has static shards (one per index): one worker "
                    "runs shard %d, on %s", len(slots), manifest.run_id, index, slots[0].device)
        return None
    n = len(slots)
    width = WorkerSettings.from_env().workers * n
    log.info("%d workers here (%s), indexes %d..%d of %d", n,
             ", ".join(s.visible_gpu and f"GPU {s.visible_gpu}" or s.device for s in slots),
             index * n, index * n + n - 1, width)
    result = run_local(manifest_uri, manifest.shards, slots,
                       on_log=lambda level, text: log.log(level, "%s", text),
                       first_index=index * n, workers=width)
    for message in result.messages:
        log.error("%s", message)
    return pod_exit_code(result)

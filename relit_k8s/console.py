"""What the command line shows: tables, the status view, the progress bar, printed objects.

Views take typed results (``Manifest``, ``RunStatus``, Job objects) and print them; they make
no decisions. Text that comes from users or the system (paths, messages) is escaped, so square
brackets in it are printed as they are, never read as rich markup.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import clock
from .manifest import Manifest
from .status import RunStatus

#: Columns of output that goes to a file or a pipe (rich's own default is 80, which wraps
#: paths and table rows that a terminal would show whole); COLUMNS still decides when set.
PIPE_WIDTH = 160


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, width=PIPE_WIDTH if piped else None)


out = _console()
err = _console(stderr=True)


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def plan_summary(manifest: Manifest, title: str) -> None:
    """The plan's settings and size, as ``--dry-run`` and ``plan`` print it."""
    from .planner import estimate_output_bytes, human_bytes, summary

    table = Table(title=title, show_header=False, title_justify="left", box=None)
    table.add_column(style="bold cyan")
    table.add_column()
    rows = summary(manifest)
    size = estimate_output_bytes(manifest)
    rows["estimated size"] = f"~{human_bytes(size)} of outputs" if size else "unknown"
    for key, value in rows.items():
        table.add_row(key.replace("_", " "), escape(str(value)))
    out.print(table)


def left_out(counts: Mapping[str, Counter[str]]) -> None:
    """One line per listing that left files out (on stderr: ``-o yaml`` output stays clean)."""
    from .planner import describe_left_out

    for what, exts in counts.items():
        flag = "--img-formats" if what == "input images" else "--ref-formats"
        err.print(f"{what}: left out {escape(describe_left_out(exts))} (choose with {flag})",
                  highlight=False)


def run_outcome(status: RunStatus, reports_uri: str) -> None:
    """The last lines of ``relit-k8s run``: counts, where outputs and reports are."""
    out.print(f"written {status.items_done}, skipped {status.items_skipped} (already there), "
              f"failed {status.items_failed}, of {status.items_total}", highlight=False)
    where("outputs", status.output)
    where("reports", reports_uri)
    if status.items_failed:
        command("failures are listed in the reports:",
                ["relit-k8s", "status", status.run_id, "--output", status.output])


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 item``, ``2 items``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def where(label: str, path: str) -> None:
    """``label: path``, never wrapped (paths are copied) nor read as markup."""
    out.print(Text(f"{label}: {path}"), highlight=False, soft_wrap=True)


def command(intro: str, argv: Sequence[str]) -> None:
    """A command to copy, on its own line and never wrapped by us (the terminal may fold it);
    each argument quoted for a POSIX shell where it needs it (a path with spaces), so that the
    line pastes as it prints."""
    out.print(intro, highlight=False)
    out.print(Text("  " + shlex.join(argv)), highlight=False, soft_wrap=True)


def warning(message: str) -> None:
    err.print(Text.assemble(("warning: ", "bold yellow"), message), highlight=False)


def note(line: str) -> None:
    """A line about the output rather than of it (a pod still waiting), on stderr."""
    err.print(Text(line, style="yellow"), highlight=False, soft_wrap=True)


def problems(messages: list[str]) -> None:
    for msg in messages:
        err.print(Text(msg, style="red"), highlight=False)


def progress_runner(total: int, completed: int = 0):
    """A context manager yielding (on_progress, on_log) callbacks that drive a progress bar
    (``completed``: items finished before, by an earlier attempt: a continued run's bar
    starts there and ends at 100%)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())

    class _Bar:
        def __enter__(self):
            self.bar = Progress(*columns, console=err, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("relighting", total=total, rate="",
                                          completed=completed)
            self.failed = 0
            return self.on_progress, self.on_log

        def __exit__(self, *exc):
            return self.bar.__exit__(*exc)

        def on_progress(self, done: int, skipped: int, failed: int) -> None:
            self.failed += failed
            self.bar.advance(self.task, done + skipped + failed)
            t = self.bar.tasks[self.task]
            rate = f"{t.speed:.1f} items/s" if t.speed else ""
            if self.failed:
                rate += f" [red]{self.failed} failed[/]"
            self.bar.update(self.task, rate=rate)

        def on_log(self, level: int, msg: str) -> None:
            if level >= logging.WARNING:
                style = "yellow" if level == logging.WARNING else "red"
                self.bar.console.print(Text(msg, style=style), highlight=False)

    return _Bar()


def warn_log(level: int, msg: str) -> None:
    """Worker log lines at warning level and above, without a progress bar."""
    if level >= logging.WARNING:
        err.print(Text(msg), highlight=False)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _indexes(indexes: list[str], shown: int = 8) -> str:
    return ", ".join(indexes[:shown]) + (f" and {len(indexes) - shown} more"
                                         if len(indexes) > shown else "")


#: The shard table's column sets, widest first: the first that fits the terminal is drawn
#: (the host column is cut to fit, but to no fewer than ``_MIN_HOST`` characters).
_COLUMN_SETS = (
    ("shard", "state", "written", "skipped", "failed", "total", "items/s", "heartbeat",
     "attempt", "host / device"),
    ("shard", "state", "items", "failed", "items/s", "beat", "host / device"),
    ("shard", "state", "items", "failed", "items/s"),
    ("shard", "state", "items"),
)
_MIN_HOST = 12
#: Shards of a run's table: beyond it, only the shards not done nor pending are listed.
SHARD_ROWS = 16


class StatusView:
    """``relit-k8s status``: the run's line, its Job, the shard table, timings, failures.

    Laid out for the width it is drawn at (also when a live view's terminal is resized): the
    shard table keeps one line per shard, dropping or merging its least useful columns first.
    """

    def __init__(self, status: RunStatus):
        self.status = status

    def __rich_console__(self, console, options):
        yield Group(*self.parts(options.max_width))

    def job_lines(self) -> list[Any]:
        """The Job's state, conditions, pods that have not started and its events."""
        job, parts = self.status.job, []
        if job and job.error:
            parts.append(Text(f"Job state unavailable: {job.error}", style="yellow"))
        elif job:
            parts.append(Text(
                f"job {job.name}: {job.state}; active {job.active}, succeeded {job.succeeded}, "
                f"failed {job.failed}"
                + (f", terminating {job.terminating}" if job.terminating else "")
                + f"; completed indexes {job.completed_indexes or '-'}; "
                f"failed indexes {job.failed_indexes or '-'}"))
            for c in job.conditions:
                parts.append(Text(f"  {c.type}: {c.reason or ''} {c.message or ''}"))
            for w in job.waiting:
                parts.append(Text(
                    f"  not started: {len(w.indexes)} pod(s) (index {_indexes(w.indexes)}, e.g. "
                    f"{w.example_pod}): {w.reason}" + (f": {w.message}" if w.message else ""),
                    style="bold red" if w.hint and w.reason != "Unschedulable" else "yellow"))
                if w.hint:
                    parts.append(Text(f"    {w.hint}"))
            for p in job.stuck:
                parts.append(Text(
                    f"  stuck terminating: pod {p.name} (index {p.index}"
                    + (f", node {p.node}" if p.node else "") + f"), due to end {p.minutes} "
                    "min ago", style="bold red"))
            if job.stuck:
                parts.append(Text(
                    "    its node does not answer (kubectl get nodes); the Job starts a "
                    "replacement only once the pod is gone (podReplacementPolicy: Failed). If "
                    "the node is gone for good: kubectl delete pod NAME --force "
                    "--grace-period=0" + (f" -n {job.namespace}" if job.namespace else "")))
            for e in job.events:
                parts.append(Text(f"  event {e.reason}" + (f" (x{e.count})" if e.count and
                                                            e.count > 1 else "")
                                  + f": {e.message or ''}", style="red"))
            if job.details_error:
                parts.append(Text(f"  {job.details_error}", style="yellow"))
        return parts

    def parts(self, width: int) -> list[Any]:
        status = self.status
        parts: list[Any] = []
        rate, eta = status.items_per_second, status.eta_seconds
        speed = f", {rate:.2f} items/s" if rate else ""
        speed += f", eta {_age(eta)}" if eta else ""
        parts.append(Text.assemble(
            "run ", (status.run_id, "bold"),
            f" ({status.relighter}), {status.state}: {status.items_finished}/"
            f"{status.items_total} items ({status.items_done} written, {status.items_skipped} "
            f"skipped, {status.items_failed} failed){speed}"))
        parts += self.job_lines()
        if status.leases is not None:
            le = status.leases
            parts.append(Text(
                f"leases: {le.done}/{status.shards_total} shards finished, {le.held} held"
                + (f", {le.silent} silent for over {le.lease_seconds:.0f} s (taken over by the "
                   "next worker that looks)" if le.silent else "")
                + (f", {le.released} released (free to claim)" if le.released else ""),
                style="yellow" if le.silent else ""))
            if le.holders:
                parts.append(self.holder_table(le.holders, le.held))
        for note in status.notes:
            parts.append(Text(f"note: {note}", style="yellow"))
        if status.stalled_shards:
            parts.append(Text(f"stalled (no heartbeat): shards {status.stalled_shards}",
                              style="bold red"))
        parts.append(self.shard_table(width))  # (a line instead: every shard done or pending)
        if status.timings:
            parts.append(Text("time spent (s, summed over shards and threads): " + ", ".join(
                f"{k} {v:.1f}" for k, v in status.timings.items())))
        if status.failure_reasons:
            ft = Table("count", "kind", "reason", "e.g.", title="failures by reason",
                       title_justify="left")
            for g in status.failure_reasons:
                ft.add_row(str(g.count), g.kind, Text(g.reason), Text(", ".join(g.examples)))
            parts.append(ft)
        return parts

    @staticmethod
    def holder_table(holders, held: int) -> Table:
        """Who holds which shard (the silent leases first), since when, how far."""
        more = f" (the first {len(holders)} of {held})" if held > len(holders) else ""
        table = Table("shard", "holder", "held for", "beat", "items", "taken from",
                      title=f"held leases{more}", title_justify="left")
        at = clock.now()  # the clock status judged the leases silent by
        for h in holders:
            beat = Text(_age((at - h.heartbeat_at).total_seconds()) + " ago",
                        style="bold red" if h.silent else "")
            items = f"{h.items_done}/{h.items_total}" if h.items_total is not None else "-"
            table.add_row(str(h.shard), Text(h.owner), _age((at - h.claimed_at).total_seconds()),
                          beat, items, Text(h.stolen_from or ""))
        return table

    def shard_table(self, width: int) -> Table | Text:
        """One line per shard (of a run of more than :data:`SHARD_ROWS` shards: the shards
        not done nor pending, at most that many, and a caption that counts the others; just
        the count when none is left to show): the widest column set that fits ``width``."""
        shards = self.status.shards
        caption = None
        if len(shards) > SHARD_ROWS:
            shards = [sh for sh in shards if sh.state not in ("done", "pending")][:SHARD_ROWS]
            counts = Counter(sh.state for sh in self.status.shards)
            rest = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())
                             if state in ("done", "pending"))
            if not shards:
                return Text(f"shards: {rest} (-o json lists every shard)")
            caption = (f"{len(shards)} of {len(self.status.shards)} shards shown; not shown: "
                       + rest + (", and more" if len(shards) == SHARD_ROWS else "")
                       + " (-o json lists every shard)")
        cells = [self._cells(sh) for sh in shards]
        for heads in _COLUMN_SETS:
            widths = {h: max([len(h)] + [len(c[h].plain if isinstance(c[h], Text) else c[h])
                                         for c in cells]) for h in heads}
            borders = 3 * len(heads) + 1  # "│ " before each cell, " │" at the end
            spare = width - borders - sum(w for h, w in widths.items() if h != "host / device")
            if "host / device" in heads:
                if spare >= _MIN_HOST:
                    widths["host / device"] = min(widths["host / device"], spare)
                    break
            elif spare >= 0:
                break
        table = Table(caption=caption, caption_justify="left")
        for head in heads:
            table.add_column(head, no_wrap=True, overflow="ellipsis", width=widths[head],
                             justify="left" if head in ("state", "host / device") else "right")
        for c in cells:
            table.add_row(*(c[h] for h in heads))
        return table

    @staticmethod
    def _cells(sh) -> dict[str, Any]:
        colour = {"done": "green", "failed": "red", "running": "yellow", "pending": "dim",
                  "stopped": "magenta"}
        state = (Text("stalled", style="bold red") if sh.stalled
                 else Text(sh.state, style=colour[sh.state]))
        age = _age(sh.heartbeat_age_seconds)
        return {
            "shard": str(sh.index), "state": state, "written": str(sh.items_done),
            "skipped": str(sh.items_skipped), "failed": str(sh.items_failed),
            "total": str(sh.items_total),
            "items": f"{sh.items_done + sh.items_skipped + sh.items_failed}/{sh.items_total}",
            "items/s": f"{sh.items_per_second:.2f}" if sh.items_per_second else "",
            "heartbeat": age, "beat": age, "attempt": str(sh.attempt or ""),
            "host / device": Text(" / ".join(x for x in (sh.host, sh.device) if x)),
        }


def status_view(status: RunStatus) -> StatusView:
    """The renderable of ``relit-k8s status`` (see :class:`StatusView`)."""
    return StatusView(status)


def print_objects(objects: list[dict[str, Any]], fmt: str) -> None:
    """Kubernetes objects as YAML or JSON, ready for ``kubectl apply -f -``."""
    if fmt == "json":
        data = objects[0] if len(objects) == 1 else {"apiVersion": "v1", "kind": "List",
                                                     "items": objects}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))


def job_summary(job: dict[str, Any]) -> None:
    """The Job a dry run of ``submit`` would create, in a few rows."""
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    table = Table(title="Job", show_header=False, title_justify="left", box=None)
    table.add_column(style="bold cyan")
    table.add_column()
    rows = {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"].get("namespace", "(the context's)"),
        "image": container["image"],
        "indexes": f"{spec['completions']} ({spec['parallelism']} at a time)",
        "resources": ", ".join(f"{k}={v}" for k, v in container["resources"]["requests"]
                               .items()),
        "retries": f"{spec['backoffLimitPerIndex']} per index; an index that fails for good "
                   "makes the Job fail in the end (the other indexes still run); past "
                   f"{plural(spec['maxFailedIndexes'], 'failed index', 'failed indexes')}, "
                   "or on a configuration error, "
                   "it stops at once",
        "s3 secret": next((e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
                           if "valueFrom" in e), "(none: pod identity)"),
        "print it": "add -o yaml (pipe to kubectl apply -f - after relit-k8s plan)",
    }
    for key, value in rows.items():
        table.add_row(key, escape(str(value)))
    out.print(table)


def submitted(record, manifest: Manifest, created: dict[str, Any]) -> None:
    """What ``submit`` created, and the commands that follow it."""
    ns = record.namespace
    spec = created["spec"]
    how = (f"{spec['parallelism']} workers claiming {manifest.shards} shards"
           if manifest.balance == "leases" else
           f"{spec['completions']} indexes, {spec['parallelism']} at a time")
    out.print(f"run [bold]{record.run_id}[/]: Job {record.job} created in namespace {ns} "
              f"({how})", highlight=False)
    where("manifest", record.manifest)
    out.print("follow it with:")
    for line in kubectl_commands(record.run_id, manifest.output, ns):
        out.print(Text("  " + line), highlight=False, soft_wrap=True)


def kubectl_commands(run_id: str, output: str, namespace: str) -> list[str]:
    """The relit-k8s commands that follow a run, and their plain kubectl equivalents."""
    from .kube.job import INDEX_LABEL, RUN_LABEL

    sel = f"-l {RUN_LABEL}={run_id}"
    return [shlex.join(["relit-k8s", "status", run_id, "--output", output]),
            shlex.join(["relit-k8s", "logs", run_id, "--output", output, "--follow"]),
            f"kubectl -n {namespace} get jobs,pods {sel} -L {INDEX_LABEL}",
            f"kubectl -n {namespace} logs {sel} --prefix --tail=-1"]


def relighters_table(rows: list[tuple[str, str, str, bool]]) -> None:
    """(name, where from, options, loadable) per relighter."""
    table = Table("name", "from", "options")
    for name, target, opts, ok in rows:
        table.add_row(name, target, Text(opts, style="" if ok else "red"))
    out.print(table)

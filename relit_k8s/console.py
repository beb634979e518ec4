"""What the command line shows: tables, the status view, the progress bar, printed objects.

Views take typed results (``Manifest``, ``RunStatus``, Job objects) and print them; they make
no decisions. Text that comes from users or the system (paths, messages) is escaped, so square
brackets in it are printed as they are, never read as rich markup.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .manifest import Manifest
from .status import RunStatus

out = Console()
err = Console(stderr=True)


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
    out.print(f"outputs: {escape(status.output)}", highlight=False)
    out.print(f"reports: {escape(reports_uri)}", highlight=False)
    if status.items_failed:
        out.print(f"failures are listed in the reports: relit-k8s status {status.run_id} "
                  f"--output {escape(status.output)}", highlight=False)


def problems(messages: list[str]) -> None:
    for msg in messages:
        err.print(Text(msg, style="red"), highlight=False)


def progress_runner(total: int):
    """A context manager yielding (on_progress, on_log) callbacks that drive a progress bar."""
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
            self.task = self.bar.add_task("relighting", total=total, rate="")
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


def status_view(status: RunStatus) -> Group:
    """``relit-k8s status``: the run's line, its Job, the shard table, timings, failures."""
    parts: list[Any] = []
    rate, eta = status.items_per_second, status.eta_seconds
    speed = f", {rate:.2f} items/s" if rate else ""
    speed += f", eta {_age(eta)}" if eta else ""
    parts.append(Text.assemble(
        "run ", (status.run_id, "bold"),
        f" ({status.relighter}), {status.state}: {status.items_finished}/{status.items_total} "
        f"items ({status.items_done} written, {status.items_skipped} skipped, "
        f"{status.items_failed} failed){speed}"))
    job = status.job
    if job and job.error:
        parts.append(Text(f"Job state unavailable: {job.error}", style="yellow"))
    elif job:
        parts.append(Text(
            f"job {job.name}: {job.state}; active {job.active}, succeeded {job.succeeded}, "
            f"failed {job.failed}; completed indexes {job.completed_indexes or '-'}; "
            f"failed indexes {job.failed_indexes or '-'}"))
        for c in job.conditions:
            parts.append(Text(f"  {c.type}: {c.reason or ''} {c.message or ''}"))
    if status.stalled_shards:
        parts.append(Text(f"stalled (no heartbeat): shards {status.stalled_shards}",
                          style="bold red"))
    table = Table("shard", "state", "done", "skipped", "failed", "total", "items/s",
                  "heartbeat", "attempt", "host / device")
    colour = {"done": "green", "failed": "red", "running": "yellow", "pending": "dim"}
    for sh in status.shards:
        state = Text(sh.state, style=colour[sh.state])
        if sh.stalled:
            state.append(" stalled", style="bold red")
        table.add_row(
            str(sh.index), state, str(sh.items_done), str(sh.items_skipped),
            str(sh.items_failed), str(sh.items_total),
            f"{sh.items_per_second:.2f}" if sh.items_per_second else "",
            _age(sh.heartbeat_age_seconds), str(sh.attempt or ""),
            Text(" / ".join(x for x in (sh.host, sh.device) if x)))
    parts.append(table)
    if status.timings:
        parts.append(Text("time spent (s, summed over shards and threads): " + ", ".join(
            f"{k} {v:.1f}" for k, v in status.timings.items())))
    if status.failure_reasons:
        ft = Table("count", "kind", "reason", "e.g.", title="failures by reason",
                   title_justify="left")
        for g in status.failure_reasons:
            ft.add_row(str(g.count), g.kind, Text(g.reason), Text(", ".join(g.examples)))
        parts.append(ft)
    return Group(*parts)


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
        "retries": f"{spec['backoffLimitPerIndex']} per index; the Job fails past "
                   f"{spec['maxFailedIndexes']} failed indexes or on a configuration error",
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
    out.print(f"run [bold]{record.run_id}[/]: Job {record.job} created in namespace {ns} "
              f"({manifest.shards} indexes, {created['spec']['parallelism']} at a time)",
              highlight=False)
    out.print(f"manifest: {escape(record.manifest)}", highlight=False)
    out.print("follow it with:")
    for line in (f"relit-k8s status {record.run_id} --output {manifest.output}",
                 f"relit-k8s logs {record.run_id} --output {manifest.output} --follow",
                 f"kubectl -n {ns} get job {record.job}",
                 f"kubectl -n {ns} get pods -l relit-k8s/run-id={record.run_id}",
                 f"kubectl -n {ns} logs -l relit-k8s/run-id={record.run_id} --prefix"):
        out.print(Text("  " + line), highlight=False, soft_wrap=True)


def relighters_table(rows: list[tuple[str, str, str, bool]]) -> None:
    """(name, where from, options, loadable) per relighter."""
    table = Table("name", "from", "options")
    for name, target, opts, ok in rows:
        table.add_row(name, target, Text(opts, style="" if ok else "red"))
    out.print(table)

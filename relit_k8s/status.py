"""Read a run's state from storage: its manifest and shard reports."""

from __future__ import annotations

import posixpath
from typing import Any

from .errors import ConfigError, NotFoundError
from .manifest import Manifest, ShardReport
from .storage import META_DIR, Storage, open_storage


def list_runs(output: str) -> list[Manifest]:
    """Every run planned into ``output``, oldest first."""
    out = open_storage(output)
    runs = []
    for key in out.walk(META_DIR):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json":
            runs.append(Manifest.from_json(out.read(key), out.uri_of(key)))
    return sorted(runs, key=lambda m: m.created_at)


def load_run(output: str, run_id: str | None = None) -> Manifest:
    """The manifest of ``run_id`` in ``output``, or of the newest run when ``run_id`` is None."""
    out = open_storage(output)
    if run_id is None:
        runs = list_runs(output)
        if not runs:
            raise ConfigError(f"no runs in {out.uri}: start one with relit-k8s run or plan")
        return runs[-1]
    key = posixpath.join(META_DIR, run_id, "manifest.json")
    try:
        return Manifest.from_json(out.read(key), out.uri_of(key))
    except NotFoundError as e:
        known = ", ".join(m.run_id for m in list_runs(output)) or "none"
        raise ConfigError(f"no run {run_id!r} in {out.uri} (runs there: {known})") from e


def read_reports(out: Storage, manifest: Manifest) -> dict[int, ShardReport]:
    folder = posixpath.join(manifest.meta_prefix, "shards")
    reports = {}
    for name in out.list_names(folder):
        stem, ext = posixpath.splitext(name)
        if ext == ".json" and stem.isdigit():
            key = f"{folder}/{name}"
            reports[int(stem)] = ShardReport.from_json(out.read(key), out.uri_of(key))
    return reports


def overall_state(states: list[str]) -> str:
    """done: every shard done; running: a shard runs; failed: a shard failed; pending: none
    started; incomplete: some done, the others not started (a stopped or partial run)."""
    if states and all(s == "done" for s in states):
        return "done"
    if "running" in states:
        return "running"
    if "failed" in states:
        return "failed"
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


def collect(output: str, run_id: str | None = None) -> dict[str, Any]:
    """The status object of ``relit-k8s status -o json`` (sums over shards, and every shard)."""
    manifest = load_run(output, run_id)
    out = open_storage(output)
    reports = read_reports(out, manifest)
    shards: list[dict[str, Any]] = []
    for index in range(manifest.shards):
        report = reports.get(index)
        if report is None:
            shards.append({"run_id": manifest.run_id, "index": index, "state": "pending",
                           "items_total": manifest.shard_items(index), "items_done": 0,
                           "items_skipped": 0, "items_failed": 0, "failures": []})
        else:
            shards.append(report.model_dump(mode="json"))
    total = {k: sum(s[k] for s in shards) for k in ("items_done", "items_skipped",
                                                     "items_failed")}
    state = overall_state([s["state"] for s in shards])
    rate, eta = throughput(list(reports.values()), manifest.items - sum(total.values()), state)
    return {
        "run_id": manifest.run_id,
        "created_at": manifest.created_at.isoformat(),
        "output": manifest.output,
        "manifest": out.uri_of(manifest.manifest_key),
        "relighter": manifest.relighter.name,
        "state": state,
        "items_total": manifest.items,
        **total,
        "items_per_second": rate,
        "eta_seconds": eta,
        "resumed_from": manifest.resumed_from,
        "shards_total": manifest.shards,
        "shards": shards,
    }

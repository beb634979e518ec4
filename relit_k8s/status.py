"""Read a run's state from storage: its manifest and shard reports."""

from __future__ import annotations

import posixpath
from datetime import datetime
from typing import Any

from .errors import ConfigError, NotFoundError
from .manifest import Manifest, ShardReport, now
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


#: A running shard whose report is older than this many seconds is flagged as stalled
#: (its heartbeat is every 5 s; a pod that died without a word stops it).
STALL_AFTER = 120.0


def failure_reasons(shards: list[dict[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    """Failures grouped by reason (the error without the file name in front), most first."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for sh in shards:
        for f in sh.get("failures", []):
            reason = f["error"]
            for key in (f["image"], f["ref"]):
                if reason.startswith(key + ": "):
                    reason = reason[len(key) + 2:]
            g = groups.setdefault((f.get("kind", ""), reason),
                                  {"kind": f.get("kind", ""), "reason": reason, "count": 0,
                                   "examples": []})
            g["count"] += 1
            if len(g["examples"]) < 3 and f["image"] not in g["examples"]:
                g["examples"].append(f["image"])
    return sorted(groups.values(), key=lambda g: -g["count"])[:limit]


def collect(output: str, run_id: str | None = None,
            stall_after: float = STALL_AFTER) -> dict[str, Any]:
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
    current = now()
    for sh in shards:
        if sh["state"] == "running" and sh.get("updated_at"):
            age = (current - datetime.fromisoformat(sh["updated_at"])).total_seconds()
            sh["heartbeat_age_seconds"] = round(age, 1)
            sh["stalled"] = age > stall_after
    total = {k: sum(s[k] for s in shards) for k in ("items_done", "items_skipped",
                                                     "items_failed")}
    timings: dict[str, float] = {}
    for sh in shards:
        for key, seconds in (sh.get("timings") or {}).items():
            # a worker loads its model once for all its shards: the longest load, not a sum
            merge = max if key == "model_load" else (lambda a, b: a + b)
            timings[key] = round(merge(timings.get(key, 0.0), seconds), 3)
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
        "stalled_shards": [sh["index"] for sh in shards if sh.get("stalled")],
        "failure_reasons": failure_reasons(shards),
        "timings": timings,
        "shards_total": manifest.shards,
        "shards": shards,
    }

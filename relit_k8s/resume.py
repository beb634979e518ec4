"""Resume a run: a new run over only the units not yet written (or failed), renumbered 0..n-1.

Kubernetes cannot rerun chosen indexes of a Job (kubernetes/kubernetes#109131); relit-k8s
plans a new manifest whose units are the unfinished ones of the old run, so a new Job (or a
local run) does exactly the missing work.
"""

from __future__ import annotations

import re

from .clock import now
from .errors import ConfigError
from .manifest import Manifest
from .planner import default_shards
from .run import Run, list_runs

_RESUMED = re.compile(r"^(.*)-r(\d+)$")


def remaining_units(run: Run, trust_reports: bool = False) -> list[int]:
    """Full-numbering units of the run with at least one output missing.

    Every pair folder is listed once (outputs may have been deleted since the reports were
    written); with ``trust_reports``, shards reported ``done`` without failures are skipped
    unlisted, which is faster on very large runs.
    """
    manifest = run.manifest
    reports = run.read_reports() if trust_reports else {}

    def trusted(index: int) -> bool:
        report = reports.get(index)
        return bool(report and report.state == "done" and report.items_failed == 0)

    units = (u for index in range(manifest.shards) if not trusted(index)
             for u in manifest.shard_units(index))
    return [manifest.unit_number(unit) for unit, todo in run.missing(units) if todo]


def _ranges(units: list[int]) -> tuple[tuple[int, int], ...]:
    ranges: list[list[int]] = []
    for u in sorted(units):
        if ranges and ranges[-1][1] == u:
            ranges[-1][1] = u + 1
        else:
            ranges.append([u, u + 1])
    return tuple((a, b) for a, b in ranges)


def next_run_id(run: Run) -> str:
    """``<root>-r<n>``: the next free resume id in the run's output."""
    manifest = run.manifest
    m = _RESUMED.match(manifest.run_id)
    root, n = (m.group(1), int(m.group(2))) if m and manifest.resumed_from else (
        manifest.run_id, 0)
    taken = {r.run_id for r in list_runs(run.output)}
    while True:
        n += 1
        suffix = f"-r{n}"
        candidate = root[: 40 - len(suffix)].rstrip("-") + suffix
        if candidate not in taken:
            return candidate


def resume_on_cluster(run: Run, local: bool = False):
    """Where ``resume`` runs: on the cluster (returns the run's submission record, whose Job
    settings the new Job reuses) when the run was submitted and ``local`` is not asked for;
    here (None) otherwise."""
    if local:
        return None
    from .kube.runs import read_submission

    return read_submission(run)


def plan_resume(run: Run, workers: int = 1, shards: int | None = None,
                trust_reports: bool = False) -> Manifest | None:
    """The manifest of a run over the unfinished units, or None when nothing is left."""
    todo = remaining_units(run, trust_reports)
    if not todo:
        return None
    target = shards or default_shards(workers, run.manifest.balance)
    if target < 1:
        raise ConfigError("--shards must be at least 1")
    manifest = run.manifest
    data = manifest.model_dump(exclude={"checksum"})
    data.update(run_id=next_run_id(run), created_at=now(), resumed_from=manifest.run_id,
                only_units=_ranges(todo), shards=min(target, len(todo)))
    return Manifest(**data)

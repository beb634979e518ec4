"""A run: its manifest, the output store opened once, and the keys of everything it writes.

Everything relit-k8s keeps about a run lies under ``<output>/_relit/<run-id>/``
(:class:`RunPaths`); the outputs themselves are named by :meth:`Manifest.output_key`, and
:meth:`Run.existing_seeds` is the one question "which samples of this pair are written". The
worker, ``resume``, ``status``, the gallery and the Kubernetes code all go through a
:class:`Run`, so the output store is opened (and its S3 client built) once per command.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import ConfigError, NotFoundError
from .manifest import Manifest, ShardReport, Unit, pair_seeds
from .storage import META_DIR, Storage, join_key, open_storage


@dataclass(frozen=True)
class RunPaths:
    """Keys, relative to the output root, of what relit-k8s keeps about one run."""

    run_id: str

    @property
    def prefix(self) -> str:
        """``_relit/<run-id>``: the run's own folder."""
        return join_key(META_DIR, self.run_id)

    @property
    def manifest(self) -> str:
        return join_key(self.prefix, "manifest.json")

    @property
    def shards(self) -> str:
        """The folder of the shard reports."""
        return join_key(self.prefix, "shards")

    def report(self, index: int) -> str:
        return join_key(self.shards, f"{index}.json")

    @property
    def job(self) -> str:
        """The submission record of a run sent to Kubernetes (``kube.runs.Submission``)."""
        return join_key(self.prefix, "job.json")

    @property
    def launch(self) -> str:
        """When ``relit-k8s run`` last started workers on the run (:class:`Launch`): tells
        ``status`` that a new attempt is starting before its workers write their reports."""
        return join_key(self.prefix, "launch.json")

    @property
    def gallery(self) -> str:
        """The folder of the run's gallery (``index.html``, ``grid.png``, ``thumbs/``)."""
        return join_key(self.prefix, "gallery")


@dataclass(frozen=True)
class Run:
    """A planned run: its manifest and its opened output store."""

    manifest: Manifest
    output: Storage

    @classmethod
    def of(cls, manifest: Manifest, output: Storage | None = None) -> Run:
        """The run of ``manifest``; opens its output store unless one is given."""
        return cls(manifest, output or open_storage(manifest.output))

    @classmethod
    def load(cls, output: str | Storage, run_id: str | None = None) -> Run:
        """The run ``run_id`` stored in ``output``, or the newest one when ``run_id`` is None."""
        store = open_storage(output) if isinstance(output, str) else output
        if run_id is None:
            runs = list_runs(store)
            if not runs:
                raise ConfigError(f"no runs in {store.uri}: start one with relit-k8s run or "
                                  "plan")
            return runs[-1]
        key = RunPaths(run_id).manifest
        try:
            return cls(Manifest.from_json(store.read(key), store.uri_of(key)), store)
        except NotFoundError as e:
            known = ", ".join(r.run_id for r in list_runs(store)) or "none"
            raise ConfigError(f"no run {run_id!r} in {store.uri} (runs there: {known})") from e

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.manifest.run_id)

    @property
    def manifest_uri(self) -> str:
        return self.output.uri_of(self.paths.manifest)

    def uri_of(self, key: str) -> str:
        return self.output.uri_of(key)

    def read_report(self, index: int) -> ShardReport | None:
        """The shard report of ``index``, or None when no attempt has written one yet."""
        key = self.paths.report(index)
        try:
            return ShardReport.from_json(self.output.read(key), self.output.uri_of(key))
        except NotFoundError:
            return None

    def read_reports(self) -> dict[int, ShardReport]:
        """Every shard report written so far, by index (one listing)."""
        folder = self.paths.shards
        reports = {}
        for name in self.output.list_names(folder):
            stem, ext = posixpath.splitext(name)
            if ext == ".json" and stem.isdigit():
                key = join_key(folder, name)
                reports[int(stem)] = ShardReport.from_json(self.output.read(key),
                                                           self.output.uri_of(key))
        return reports

    def existing_seeds(self, image: str, ref: str) -> set[int]:
        """The seeds of the pair (image, ref) whose outputs are written (one listing)."""
        names = self.output.list_names(self.manifest.pair_folder(image, ref))
        suffix = "_" + self.manifest.output_name(image)
        seeds = (n[:-len(suffix)] for n in names if n.endswith(suffix))
        return {int(s) for s in seeds if s.isdigit() and str(int(s)) == s}

    def missing(self, units: Iterable[Unit]) -> Iterator[tuple[Unit, list[tuple[int, int]]]]:
        """Each unit with its (iteration, seed) items whose outputs are not written yet.

        The units of a pair are consecutive in a shard, so each pair folder is listed once.
        """
        m = self.manifest
        pair, existing = None, set()
        for unit in units:
            if (unit.image, unit.ref) != pair:
                pair = (unit.image, unit.ref)
                existing = self.existing_seeds(unit.image, unit.ref)
            seeds = pair_seeds(m.base_seed, unit.image, unit.ref, m.iterations)
            yield unit, [(it, seeds[it]) for it in range(unit.start, unit.stop)
                         if seeds[it] not in existing]


def list_runs(output: str | Storage) -> list[Run]:
    """Every run planned into ``output``, oldest first."""
    store = open_storage(output) if isinstance(output, str) else output
    runs = []
    for key in store.walk(META_DIR):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json":
            runs.append(Run(Manifest.from_json(store.read(key), store.uri_of(key)), store))
    return sorted(runs, key=lambda r: r.manifest.created_at)


__all__ = ["Run", "RunPaths", "list_runs"]

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

from .errors import ConfigError, ManifestError, NotFoundError
from .manifest import FoldedReports, Manifest, ShardReport, Unit, UnitScores, pair_seeds
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
    def folded(self) -> str:
        """The folder of the summaries of finished reports, one per worker process
        (:class:`~relit_k8s.manifest.FoldedReports`)."""
        return join_key(self.prefix, "folded")

    @property
    def scores(self) -> str:
        """The folder of the score records, one per finished unit (:mod:`relit_k8s.scores`)."""
        return join_key(self.prefix, "scores")

    def unit_scores(self, number: int) -> str:
        """The score record of unit ``number`` (full numbering)."""
        return join_key(self.scores, f"{number}.json")

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


#: Reports and summaries a reader of a whole run reads at once.
READ_THREADS = 32
#: How much later than a folded report's end its report may be listed and still be that copy
#: (the store's clock against the worker's); listed later, the shard ran again: it is read.
CLOCK_MARGIN = timedelta(seconds=60)


class Reports(NamedTuple):
    """What :meth:`Run.reports` read: the reports by index, and notes for the reader."""

    by_index: dict[int, ShardReport]
    notes: list[str]
    #: reports taken from the workers' summaries, and reports read one by one
    folded: int
    read: int


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
        """Every shard report written so far, by index (:meth:`reports`)."""
        return self.reports().by_index

    def reports(self) -> Reports:
        """Every shard report written so far, in about one request per worker rather than one
        per shard: a listing of the reports (with their times) and of the workers' summaries
        of finished reports, the summaries, and only the reports that are in none of them or
        were written again since (the shard ran again), read in parallel. A summary that
        cannot be read is skipped, with a note: its shards' reports are read instead."""
        folded, notes = self._folded()
        listed = self.output.list_info(self.paths.shards)
        by_index: dict[int, ShardReport] = {}
        todo = []
        for name, (modified, size) in listed.items():
            stem, ext = posixpath.splitext(name)
            if ext != ".json" or not stem.isdigit():
                continue
            copy, copy_size = folded.get(int(stem), (None, None))
            if copy is not None and copy.finished_at is not None and size == copy_size \
                    and modified <= copy.finished_at + CLOCK_MARGIN:
                by_index[int(stem)] = copy
            else:
                todo.append(int(stem))
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for index, report in zip(todo, pool.map(self._report_if_any, todo), strict=True):
                if report is not None:
                    by_index[index] = report
        unfolded = sum(1 for i in todo if i in by_index and by_index[i].state == "done"
                       and i not in folded)
        if unfolded:
            notes.append(f"{unfolded} finished shards are in no summary of finished reports "
                         "(their workers could not write one, or predate them): their reports "
                         "were read one by one")
        return Reports(by_index, notes, len(by_index) - len(todo), len(todo))

    def _report_if_any(self, index: int) -> ShardReport | None:
        try:
            return self.read_report(index)
        except NotFoundError:
            return None

    def _folded(self) -> tuple[dict[int, tuple[ShardReport, int | None]], list[str]]:
        """The finished reports the workers' summaries hold, with their sizes as written (the
        newest copy of a shard finished twice), and a note per summary that cannot be read."""
        folder = self.paths.folded
        names = sorted(n for n in self.output.list_names(folder) if n.endswith(".json"))
        notes: list[str] = []

        def read(name: str) -> FoldedReports | None:
            key = join_key(folder, name)
            try:
                return FoldedReports.from_json(self.output.read(key), self.output.uri_of(key))
            except (ManifestError, NotFoundError) as e:
                notes.append(f"skipped a summary of finished reports ({e}): the reports of its "
                             "shards were read one by one")
                return None

        reports: dict[int, tuple[ShardReport, int | None]] = {}
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for summary in pool.map(read, names):
                for index, report in (summary.reports.items() if summary else ()):
                    old = reports.get(index)
                    if old is None or (report.finished_at or report.updated_at) > (
                            old[0].finished_at or old[0].updated_at):
                        reports[index] = (report, summary.sizes.get(index) if summary else None)
        return reports, notes

    def read_unit_scores(self, number: int) -> UnitScores | None:
        """The score record of unit ``number``, or None when the unit has none (yet)."""
        key = self.paths.unit_scores(number)
        try:
            return UnitScores.from_json(self.output.read(key), self.output.uri_of(key))
        except NotFoundError:
            return None

    def existing_seeds(self, image: str, ref: str) -> set[int]:
        """The seeds of the pair (image, ref) whose outputs are written (one listing)."""
        names = self.output.list_names(self.manifest.pair_folder(image, ref))
        suffix = "_" + self.manifest.output_name(image)
        seeds = (n[:-len(suffix)] for n in names if n.endswith(suffix))
        return {int(s) for s in seeds if s.isdigit() and str(int(s)) == s}

    def missing(self, units: Iterable[Unit]) -> Iterator[tuple[Unit, list[tuple[int, int]]]]:
        """Each unit with its (iteration, seed) items whose outputs are not written yet.

        The units of a pair are consecutive in a shard, so each pair folder is listed once.
        With ``keep_top``, a unit whose score record holds all its seeds is finished, whatever
        its folder lacks: its pair's lesser outputs were deleted on purpose.
        """
        m = self.manifest
        pair, existing = None, set()
        for unit in units:
            if (unit.image, unit.ref) != pair:
                pair = (unit.image, unit.ref)
                existing = self.existing_seeds(unit.image, unit.ref)
            seeds = pair_seeds(m.base_seed, unit.image, unit.ref, m.iterations)
            todo = [(it, seeds[it]) for it in range(unit.start, unit.stop)
                    if seeds[it] not in existing]
            if todo and m.keep_top is not None:
                record = self.read_unit_scores(m.unit_number(unit))
                if record is not None and {s for _, s in todo} <= record.by_seed().keys():
                    todo = []
            yield unit, todo


def list_runs(output: str | Storage) -> list[Run]:
    """Every run planned into ``output``, oldest first."""
    store = open_storage(output) if isinstance(output, str) else output
    runs = []
    for key in store.walk(META_DIR):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json":
            runs.append(Run(Manifest.from_json(store.read(key), store.uri_of(key)), store))
    return sorted(runs, key=lambda r: r.manifest.created_at)


__all__ = ["Reports", "Run", "RunPaths", "list_runs"]

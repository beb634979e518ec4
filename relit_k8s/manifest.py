"""The plan of a run (Manifest), its work units and seeds, and the shard report.

Implicit enumeration: a manifest lists the image keys and the reference keys once; the items
(image x reference x iteration) are numbered, never listed, so 10,000 images x 1,000 references
x 50 iterations is a manifest of a few hundred KB. A *unit* is one (image, reference) pair with
a contiguous range of iterations; unit ``u`` is pair ``u // units_per_pair``; pair ``p`` is
image ``p // len(references)`` with reference ``p % len(references)``. Shard ``i`` of ``S``
takes units ``[i*U//S, (i+1)*U//S)``, so shards differ by at most one unit.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from datetime import datetime
from typing import Any, ClassVar, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, ManifestError, NotFoundError
from .images import is_hdr_name
from .storage import is_safe_key, split_uri

#: Version 2: ``batch_size`` may be null (each worker asks its relighter). Version 3: the
#: workers claim shards through leases (``balance: leases``); a static plan stays version 2, so
#: that the workers of older releases still read it.
MANIFEST_VERSION: Literal[2] = 2
LEASES_MANIFEST_VERSION: Literal[3] = 3
#: Versions this relit-k8s reads: version 1 manifests are valid version 2 ones.
READABLE_MANIFEST_VERSIONS = (1, 2, 3)

#: How shards reach workers: ``static``, shard ``i`` is Job index ``i`` (one pod per shard);
#: ``leases``, each worker claims shards until none is left (:mod:`relit_k8s.leases`).
Balance = Literal["static", "leases"]
REPORT_VERSION: Literal[1] = 1

#: Run ids are DNS-1123 labels of at most 40 characters, so Jobs and pods can be named after them.
RUN_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")

#: A shard report keeps at most this many failure records; ``failures_dropped`` counts the rest.
MAX_FAILURE_RECORDS = 1000

_SEED_SPACE = 2**32


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise ManifestError(
            f"invalid run id {run_id!r}: use at most 40 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return run_id


def pair_seeds(base_seed: int, image: str, ref: str, iterations: int) -> list[int]:
    """The seeds of all iterations of one pair: deterministic and distinct within the pair.

    Seed ``i`` is a hash of (base seed, image key, reference key, i) in ``[0, 2**32)``; in the
    rare case of a clash with an earlier iteration of the same pair it is re-hashed, so output
    names never collide.
    """
    seeds: list[int] = []
    seen: set[int] = set()
    for it in range(iterations):
        salt = 0
        while True:
            text = f"{base_seed}\x00{image}\x00{ref}\x00{it}\x00{salt}".encode()
            seed = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")
            seed %= _SEED_SPACE
            if seed not in seen:
                break
            salt += 1
        seen.add(seed)
        seeds.append(seed)
    return seeds


class Unit(NamedTuple):
    """One (image, reference) pair with iterations ``[start, stop)``."""

    pair: int
    image: str
    ref: str
    start: int
    stop: int

    @property
    def items(self) -> int:
        return self.stop - self.start


class Selection(BaseModel):
    """How the inputs and references were chosen (kept for the record and for `status`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    img_pattern: str = "*"
    ref_pattern: str = "*"
    img_formats: tuple[str, ...]
    ref_formats: tuple[str, ...]


class RelighterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """A versioned, checksummed plan: everything a worker needs to do its shard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1, 2, 3] = MANIFEST_VERSION
    run_id: str
    created_at: datetime
    input: str
    refs: str
    output: str
    normals: str | None = None
    selection: Selection
    images: tuple[str, ...]
    references: tuple[str, ...]
    iterations: int = Field(ge=1)
    base_seed: int = Field(ge=0)
    unit_size: int = Field(ge=1, description="iterations per work unit")
    shards: int = Field(ge=1)
    relighter: RelighterSpec
    batch_size: int | None = Field(None, ge=1, description="seeds per relighter call; none: "
                                   "the relighter's own choice, made on the worker's device")
    max_pixels: int = Field(ge=1)
    resumed_from: str | None = Field(None, description="the run this one finishes")
    only_units: tuple[tuple[int, int], ...] | None = Field(
        None, description="a resumed run's units: ranges [start, stop) of the full numbering")
    balance: Balance = Field("static", description="static: shard i is Job index i; leases: "
                             "workers claim shards from the output store until none is left")
    keep_top: int | None = Field(None, ge=1, description="outputs kept per pair, the best "
                                 "scored (a relighter that scores: luminet); the others are "
                                 "deleted once all the pair's seeds are written")
    checksum: str | None = None

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not RUN_ID_RE.match(v):
            raise ValueError("run id must be a DNS-1123 label of at most 40 characters")
        return v

    @model_validator(mode="after")
    def _layout(self) -> Manifest:
        if not self.images or not self.references:
            raise ValueError("a manifest needs at least one image and one reference")
        unsafe = [k for k in (*self.images, *self.references) if not is_safe_key(k)]
        if unsafe:  # keys with '..', a leading '/' or '\\' could reach outside the prefixes
            raise ValueError(f"unsafe keys {unsafe[:3]}: keys must be relative, without '..'")
        for a, b in self.only_units or ():
            if not 0 <= a < b <= self.all_units:
                raise ValueError(f"unit range [{a}, {b}) is outside 0..{self.all_units}")
        if (self.balance == "leases") != (self.version == LEASES_MANIFEST_VERSION):
            raise ValueError("balance: leases goes with manifest version 3, and only with it")
        if self.keep_top is not None and self.keep_top >= self.iterations:
            raise ValueError(f"keep_top {self.keep_top} keeps every one of the "
                             f"{self.iterations} iterations: give fewer, or none")
        if self.shards > self.units:
            raise ValueError(f"{self.shards} shards for {self.units} units: some would be empty")
        return self

    # --- enumeration -------------------------------------------------------------------------
    @property
    def pairs(self) -> int:
        return len(self.images) * len(self.references)

    @property
    def units_per_pair(self) -> int:
        return -(-self.iterations // self.unit_size)

    @property
    def all_units(self) -> int:
        """Units of the full plan (a resumed run runs a subset of them)."""
        return self.pairs * self.units_per_pair

    @property
    def units(self) -> int:
        if self.only_units is None:
            return self.all_units
        return sum(b - a for a, b in self.only_units)

    @property
    def items(self) -> int:
        if self.only_units is None:
            return self.pairs * self.iterations
        upp, size = self.units_per_pair, self.unit_size
        last = self.iterations - (upp - 1) * size  # a pair's last unit may be shorter
        total = 0
        for a, b in self.only_units:
            lasts = b // upp - a // upp  # units o in [a, b) with o % upp == upp - 1
            total += (b - a - lasts) * size + lasts * last
        return total

    def unit(self, u: int) -> Unit:
        """Unit ``u`` of this run (0..units-1)."""
        if self.only_units is None:
            return self.full_unit(u)
        for a, b in self.only_units:
            if u < b - a:
                return self.full_unit(a + u)
            u -= b - a
        raise IndexError(u)

    def full_unit(self, u: int) -> Unit:
        """Unit ``u`` of the full plan's numbering."""
        pair, chunk = divmod(u, self.units_per_pair)
        image, ref = divmod(pair, len(self.references))
        start = chunk * self.unit_size
        return Unit(pair, self.images[image], self.references[ref], start,
                    min(self.iterations, start + self.unit_size))

    def unit_number(self, unit: Unit) -> int:
        """``unit``'s number in the full plan's numbering."""
        return unit.pair * self.units_per_pair + unit.start // self.unit_size

    def shard_range(self, index: int) -> range:
        if not 0 <= index < self.shards:
            raise ManifestError(
                f"shard index {index} is out of range: run {self.run_id} has {self.shards} "
                f"shards (0..{self.shards - 1})"
            )
        return range(index * self.units // self.shards, (index + 1) * self.units // self.shards)

    def shard_units(self, index: int) -> list[Unit]:
        r = self.shard_range(index)
        if self.only_units is None:
            return [self.full_unit(u) for u in r]
        units: list[Unit] = []
        offset = 0
        for a, b in self.only_units:  # one pass over the ranges
            lo, hi = max(r.start, offset), min(r.stop, offset + b - a)
            units.extend(self.full_unit(a + u - offset) for u in range(lo, hi))
            offset += b - a
            if offset >= r.stop:
                break
        return units

    def shard_items(self, index: int) -> int:
        return sum(u.items for u in self.shard_units(index))

    # --- output layout: the only place that knows how outputs are named ----------------------
    @staticmethod
    def pair_folder(image: str, ref: str) -> str:
        """``<image key>_<reference key>``: the seed's ``<image file>_<reference file>``."""
        return f"{image}_{ref}"

    @staticmethod
    def output_name(image: str) -> str:
        """The file name of the image's outputs after ``<seed>_``: LDR inputs keep their name,
        format and extension; HDR inputs are written as ``.png``."""
        base = posixpath.basename(image)
        if is_hdr_name(base):
            return posixpath.splitext(base)[0] + ".png"
        return base

    def output_key(self, image: str, ref: str, seed: int) -> str:
        """``<image>_<ref>/<seed>_<image file>``: the key of one output under the output root."""
        return f"{self.pair_folder(image, ref)}/{seed}_{self.output_name(image)}"

    # --- serialisation -----------------------------------------------------------------------
    def body(self, exclude: set[str] | None = None) -> dict[str, Any]:
        """The manifest as JSON data without ``exclude``; ``balance`` only where it is not
        ``static`` and ``keep_top`` only where it is set (so that a plan's checksum and run id
        are what they were before the fields existed)."""
        return self.model_dump(mode="json", exclude=set(exclude or ()) | self._unset())

    def _unset(self) -> set[str]:
        """Fields left out of the JSON at their old default (:meth:`body`)."""
        return ({"balance"} if self.balance == "static" else set()) | (
            {"keep_top"} if self.keep_top is None else set())

    def body_digest(self) -> str:
        body = self.body({"checksum"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(canonical).hexdigest()

    def to_json(self) -> bytes:
        sealed = self.model_copy(update={"checksum": self.body_digest()})
        # readable by older workers
        return sealed.model_dump_json(indent=1, exclude=self._unset()).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where} is not valid JSON (truncated?): {e}") from e
        if not isinstance(raw, dict):
            raise ManifestError(f"{where} is not a relit-k8s manifest")
        if raw.get("version") not in READABLE_MANIFEST_VERSIONS:
            raise ManifestError(
                f"{where} has manifest version {raw.get('version')!r}; this relit-k8s reads "
                f"versions {', '.join(map(str, READABLE_MANIFEST_VERSIONS))}: use the "
                "relit-k8s (and worker image) that planned it, or plan the run again"
            )
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as e:
            raise ManifestError(f"{where} is invalid: {e}") from e
        if manifest.checksum != manifest.body_digest():
            raise ManifestError(f"{where} fails its checksum: it was changed or truncated")
        return manifest


def load_manifest(uri: str) -> Manifest:
    """Read and validate the manifest at ``uri`` (local path, file:// or s3://)."""
    storage, name = split_uri(uri)
    try:
        data = storage.read(name)
    except NotFoundError as e:
        raise ConfigError(f"no manifest at {uri}: plan the run first (relit-k8s plan)") from e
    return Manifest.from_json(data, where=uri)


class Failure(BaseModel):
    """One item that failed for good."""

    model_config = ConfigDict(extra="forbid")

    image: str
    ref: str
    iteration: int | None = None
    seed: int | None = None
    error: str = Field(description="the whole message: '<key>: <reason>'")
    kind: str = Field(description="the error class, e.g. DecodeError")
    key: str | None = Field(None, description="the file at fault: the image, the reference or "
                            "a normal map (none: not one file's fault)")
    reason: str | None = Field(None, description="what is wrong, without the key (reports "
                               "written before 0.2 have only 'error')")

    @classmethod
    def of(cls, image: str, ref: str, iteration: int | None, seed: int | None,
           exc: BaseException) -> Failure:
        """The record of an item that failed with ``exc`` (an ItemError carries its file)."""
        return cls(image=image, ref=ref, iteration=iteration, seed=seed, error=str(exc),
                   kind=type(exc).__name__, key=getattr(exc, "key", None),
                   reason=getattr(exc, "reason", None) or str(exc))


#: ``stopped``: the attempt was asked to stop (SIGTERM, Ctrl+C) and saved what it had done;
#: rerunning the index finishes it.
ShardState = Literal["running", "done", "failed", "stopped"]


class _Record(BaseModel):
    """A JSON record relit-k8s keeps in the output store (shard reports, their summaries,
    score records): :meth:`from_json` turns what does not validate into a
    :class:`ManifestError` that says where and what."""

    #: (what ``where`` defaults to, what the record is called in the error)
    NAME: ClassVar[tuple[str, str]]

    @classmethod
    def from_json(cls, data: bytes, where: str | None = None) -> Self:
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise ManifestError(f"{where or cls.NAME[0]} is not a valid {cls.NAME[1]}: "
                                f"{e}") from e


class UnitScores(_Record):
    """``<output>/_relit/<run>/scores/<unit>.json``: the scores of one finished unit's outputs
    (:mod:`relit_k8s.scores`)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    image: str
    ref: str
    #: seed (as text: JSON keys) -> how close the output's lighting is to the reference's
    scores: dict[str, float]

    def by_seed(self) -> dict[int, float]:
        return {int(k): v for k, v in self.scores.items()}

    NAME: ClassVar[tuple[str, str]] = ("score record", "score record")


class ShardReport(_Record):
    """``<output>/_relit/<run>/shards/<index>.json``: what one attempt at a shard did."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = REPORT_VERSION
    run_id: str
    index: int
    state: ShardState
    items_total: int
    items_done: int = 0
    items_skipped: int = 0
    items_failed: int = 0
    failures: list[Failure] = Field(default_factory=list)
    failures_dropped: int = 0
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    host: str
    device: str
    relighter: str
    attempt: int = Field(1, description="1 + the attempts at this index seen before")
    error: str | None = None
    exit_code: int | None = None
    timings: dict[str, float] = Field(
        default_factory=dict, description="seconds: model_load, decode, relight, encode, "
        "write (decode, encode and write summed over their threads)")
    items_per_second: float | None = Field(None, description="items written per second")

    @property
    def items_finished(self) -> int:
        return self.items_done + self.items_skipped + self.items_failed

    NAME: ClassVar[tuple[str, str]] = ("report", "shard report")


class FoldedReports(_Record):
    """``<output>/_relit/<run>/folded/<writer>.json``: the final reports of the shards one
    worker process finished (``done``: such a report never changes), kept by that process
    alone, so that a reader of a whole run reads one object per worker instead of one report
    per shard (:meth:`relit_k8s.run.Run.read_reports`)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    writer: str
    reports: dict[int, ShardReport] = Field(default_factory=dict)
    #: bytes of each report as written: a report listed with another size was written again
    sizes: dict[int, int] = Field(default_factory=dict)

    NAME: ClassVar[tuple[str, str]] = ("folded reports", "summary of shard reports")

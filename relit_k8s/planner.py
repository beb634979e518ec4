"""Plan a run: list inputs and references, choose units and shards, write the manifest.

:func:`plan` is pure (settings + listings -> :class:`Manifest`); :func:`list_sources` and
:func:`write_manifest` are the only parts that touch storage.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import images
from .clock import now
from .errors import ConfigError, NotFoundError, StorageConfigError
from .maker import check_maker, record_maker
from .manifest import (
    LEASES_MANIFEST_VERSION,
    MANIFEST_VERSION,
    Balance,
    Manifest,
    RelighterSpec,
    Selection,
    check_run_id,
)
from .relighters import parse_options, resolve
from .run import Run
from .storage import S3Storage, canonical_uri, open_storage

#: Every image format relit-k8s reads: the seed's ``--img-formats`` plus webp and tif/tiff
#: (a contract change: the seed left those out, and users have them).
DEFAULT_IMG_FORMATS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "exr", "hdr")
#: The seed's ``--ref-formats``.
DEFAULT_REF_FORMATS = ("png", "exr", "hdr")
#: Default shards per worker with static balance: several, so that fast workers take more
#: shards (the Job starts the next index on whichever pod slot frees first).
SHARDS_PER_WORKER = 4
#: Most shards a default static plan makes: each is a Job index, and very large Jobs stress
#: etcd; users may ask for more.
MAX_DEFAULT_SHARDS = 2000
#: Default shards per worker with leases: the tail of a run is about one shard's time (a slow
#: node's: three times that), so shards are small: benchmarks/fleet.py measured 16 per worker
#: at 1.13x the ideal makespan where 32 keep within 1.10x; a shard is a lease object in the
#: output store, not a Job index, so there can be many.
LEASE_SHARDS_PER_WORKER = 32
MAX_DEFAULT_LEASE_SHARDS = 20_000


class PlanSettings(BaseModel):
    """What the user asked for (the CLI's selection flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    refs: str
    output: str
    normals: str | None = None
    iterations: int = Field(50, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0)
    img_pattern: str = "*"
    ref_pattern: str = "*"
    img_formats: tuple[str, ...] = DEFAULT_IMG_FORMATS
    ref_formats: tuple[str, ...] = DEFAULT_REF_FORMATS
    relighter: str = "sh"
    options: dict[str, Any] = Field(default_factory=dict)
    shards: int | None = Field(None, ge=1)
    workers: int = Field(1, ge=1, description="workers the default shard count is made for")
    balance: Literal["auto", "static", "leases"] = Field(
        "auto", description="auto: leases where the output store honours conditional writes "
        "(probed when the manifest is written), else static")
    run_id: str | None = None
    batch_size: int | None = Field(None, ge=1, description="none: the relighter's choice")
    max_pixels: int = Field(images.DEFAULT_MAX_PIXELS, ge=1)
    keep_top: int | None = Field(None, ge=1, description="outputs kept per pair, the best "
                                 "scored; none: all")

    @field_validator("img_formats", "ref_formats")
    @classmethod
    def _formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(dict.fromkeys(f.lower().lstrip(".") for f in v if f.strip()))
        supported = set(images.LDR_FORMATS) | set(images.HDR_FORMATS)
        bad = [f for f in out if f not in supported]
        if bad:
            raise ValueError(f"unsupported formats {bad}; supported: {sorted(supported)}")
        if not out:
            raise ValueError("at least one format is needed")
        return out


def _excluded_prefix(root: str, output: str) -> str | None:
    """The output's key prefix when the output lies inside ``root`` (so outputs are not inputs)."""
    r, o = canonical_uri(root).rstrip("/"), canonical_uri(output).rstrip("/")
    return o[len(r) + 1:] + "/" if o.startswith(r + "/") else None


def _check_local_folder(flag: str, uri: str | None) -> None:
    """A local input must be an existing folder (an S3 prefix cannot be told apart from an
    empty one, so it is only found empty when listed)."""
    if uri is None or uri.startswith("s3://"):
        return
    path = Path(canonical_uri(uri))
    if not path.exists():
        raise ConfigError(f"{flag} {uri} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{flag} {uri} is a file: give the folder that holds it (and "
                          "--img-pattern or --ref-pattern to pick files)")


class Sources(NamedTuple):
    """What a plan's selection found."""

    images: list[str]
    references: list[str]
    #: per what ("input images", "references"): how many files were left out by extension
    #: (``""`` for none), among those the pattern matched.
    left_out: dict[str, Counter[str]]


def describe_left_out(counts: Counter[str]) -> str:
    """``"3 files with other extensions: .tif x2, .txt"``."""
    n = sum(counts.values())
    exts = ", ".join(f"{'.' + e if e else '(no extension)'}{f' x{c}' if c > 1 else ''}"
                     for e, c in counts.most_common())
    return f"{n} file{'s' if n != 1 else ''} with other extensions: {exts}"


def list_sources(settings: PlanSettings) -> Sources:
    """The image keys and reference keys the settings select (sorted), and what was left out."""
    output = canonical_uri(settings.output).rstrip("/")
    for flag, uri in (("--input", settings.input), ("--refs", settings.refs)):
        if canonical_uri(uri).rstrip("/") == output:
            raise ConfigError(f"--output is the same folder as {flag} ({uri}): outputs would "
                              "become inputs; write them to another folder")
    for flag, folder in (("--input", settings.input), ("--refs", settings.refs),
                         ("--normals", settings.normals)):
        _check_local_folder(flag, folder)
    found: list[list[str]] = []
    left_out: dict[str, Counter[str]] = {}
    for uri, pattern, formats, what in (
        (settings.input, settings.img_pattern, settings.img_formats, "input images"),
        (settings.refs, settings.ref_pattern, settings.ref_formats, "references"),
    ):
        matched = open_storage(uri).list(pattern)  # one listing; extensions sorted out here
        skip = _excluded_prefix(uri, settings.output)
        if skip:
            matched = [k for k in matched if not k.startswith(skip)]
        keys = [k for k in matched if images.extension(k) in formats]
        others = Counter(images.extension(k) for k in matched
                         if images.extension(k) not in formats)
        if others:
            left_out[what] = others
        if not keys:
            raise ConfigError(
                f"no {what} in {uri} match pattern {pattern!r} and formats "
                f"{' '.join(formats)}"
                + (f" (left out {describe_left_out(others)})" if others else "")
            )
        found.append(keys)
    return Sources(found[0], found[1], left_out)


def default_shards(workers: int = 1, balance: Balance = "static") -> int:
    """The shard count when none is asked for: ``SHARDS_PER_WORKER`` per worker, at most
    ``MAX_DEFAULT_SHARDS`` (with leases: ``LEASE_SHARDS_PER_WORKER``, at most
    ``MAX_DEFAULT_LEASE_SHARDS``). ``plan``, ``run``, ``submit`` and ``resume`` all use it."""
    if balance == "leases":
        return min(MAX_DEFAULT_LEASE_SHARDS, LEASE_SHARDS_PER_WORKER * max(1, workers))
    return min(MAX_DEFAULT_SHARDS, SHARDS_PER_WORKER * max(1, workers))


def choose_balance(settings: PlanSettings, probe: bool = True) -> tuple[Balance, str | None]:
    """The balance of a plan, and a warning when ``auto`` falls back to static. Leases need
    conditional writes: a local folder does them (exclusive creates); an S3 store is probed
    (:func:`~relit_k8s.leases.conditional_write_problem`: a probe object created twice,
    replaced on its current and on a stale version, deleted) for ``auto`` and for ``leases``
    (``probe=False``, for dry runs, assumes it does them). A store that does not makes
    ``auto`` static, with a warning, and refuses ``leases`` (:class:`StorageConfigError`)."""
    if settings.balance == "static":
        return "static", None
    output = open_storage(canonical_uri(settings.output))
    if not probe or not isinstance(output, S3Storage):
        return "leases", None
    from .leases import conditional_write_problem

    problem = conditional_write_problem(output)
    if problem is None:
        return "leases", None
    if settings.balance == "leases":
        raise StorageConfigError(
            f"--balance leases needs conditional writes, and {settings.output} does not do "
            f"them: {problem}. Two workers could then claim one shard. Use a store that does "
            "them (AWS S3, MinIO, SeaweedFS), or --balance static (--balance auto falls back "
            "to it with a warning)")
    return "static", (
        f"{settings.output} does not do conditional writes ({problem}), which leases need: "
        "shards are split statically (shard i is Job index i), so a slow or lost worker's "
        "shards wait for it. Use a store that does them (AWS S3, MinIO, SeaweedFS) or pass "
        "--balance static to silence this")


def layout(pairs: int, iterations: int, target_shards: int) -> tuple[int, int]:
    """(unit_size, shards): whole pairs as units when there are enough, else split iterations."""
    target = max(1, target_shards)
    chunks = 1 if pairs >= target else -(-target // pairs)
    unit_size = -(-iterations // min(chunks, iterations))
    units = pairs * -(-iterations // unit_size)
    return unit_size, min(target, units)


def derive_run_id(manifest: Manifest) -> str:
    """``relit-<10 hex>`` from the plan itself (URIs resolved, listings, settings): the same
    command gives the same run, so running it again continues that run."""
    body = manifest.body({"run_id", "created_at", "checksum"})
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return "relit-" + digest[:10]


def plan(
    settings: PlanSettings,
    image_keys: list[str],
    ref_keys: list[str],
    created_at: datetime | None = None,
    balance: Balance | None = None,
) -> Manifest:
    """Make the manifest. Pure: no storage is touched; the relighter's options are validated.
    ``balance``: as :func:`choose_balance` chose (default: the settings', ``auto`` as leases)."""
    if not image_keys or not ref_keys:
        raise ConfigError("a plan needs at least one image and one reference")
    cls = resolve(settings.relighter)
    options = parse_options(cls, settings.options)
    cls.preflight(options, here=False)
    if settings.keep_top is not None and not cls.scores(options):
        raise ConfigError(f"--keep-top needs a relighter that scores its outputs (luminet, "
                          f"with its score option on); {settings.relighter} does not")
    pairs = len(image_keys) * len(ref_keys)
    if balance is None:
        balance = "leases" if settings.balance == "auto" else settings.balance
    target = settings.shards or default_shards(settings.workers, balance)
    unit_size, shards = layout(pairs, settings.iterations, target)
    manifest = Manifest(
        run_id=check_run_id(settings.run_id) if settings.run_id else "pending",
        created_at=created_at or now(),
        input=canonical_uri(settings.input),
        refs=canonical_uri(settings.refs),
        output=canonical_uri(settings.output),
        normals=canonical_uri(settings.normals) if settings.normals else None,
        selection=Selection(
            img_pattern=settings.img_pattern,
            ref_pattern=settings.ref_pattern,
            img_formats=settings.img_formats,
            ref_formats=settings.ref_formats,
        ),
        images=tuple(image_keys),
        references=tuple(ref_keys),
        iterations=settings.iterations,
        base_seed=settings.seed,
        unit_size=unit_size,
        shards=shards,
        relighter=RelighterSpec(name=settings.relighter, options=options.model_dump(mode="json")),
        batch_size=settings.batch_size,
        max_pixels=settings.max_pixels,
        keep_top=settings.keep_top,
        balance=balance,
        version=LEASES_MANIFEST_VERSION if balance == "leases" else MANIFEST_VERSION,
    )
    if settings.run_id:
        return manifest
    return manifest.model_copy(update={"run_id": derive_run_id(manifest)})


_VOLATILE = {"created_at", "checksum"}


def write_run(manifest: Manifest, allow_mixed: bool = False) -> Run:
    """Store the manifest under ``<output>/_relit/<run>/``; returns the run (its output store
    opened once, for the caller to go on with).

    When the run exists with the same plan, the stored manifest is kept (a rerun of the same
    command resumes the same run); a different plan under the same run id is an error. A new
    run whose relighter, options or model differ from what made the folder's outputs is
    refused unless ``allow_mixed`` (:mod:`relit_k8s.maker`).
    """
    run = Run.of(manifest)
    key = run.paths.manifest
    try:
        existing = Manifest.from_json(run.output.read(key), run.uri_of(key))
    except NotFoundError:
        existing = None
    if existing is None:
        to_record = check_maker(manifest, run.output, allow_mixed)
        run.output.write(key, manifest.to_json())
        if to_record is not None:
            record_maker(run.output, to_record)
        return run
    if existing.model_dump(exclude=_VOLATILE) != manifest.model_dump(exclude=_VOLATILE):
        raise ConfigError(
            f"run {manifest.run_id} already exists in {run.output.uri} with a different "
            "plan: choose another --run-id"
        )
    return Run(existing, run.output)


def write_manifest(manifest: Manifest, allow_mixed: bool = False) -> tuple[Manifest, str]:
    """:func:`write_run`, as (the stored manifest, its URI)."""
    run = write_run(manifest, allow_mixed)
    return run.manifest, run.manifest_uri


def estimate_output_bytes(manifest: Manifest, sample: int = 20) -> int | None:
    """A rough output size: outputs x the mean size of up to ``sample`` inputs (read-only).

    Outputs keep their input's format and size, so this is usually within a factor of two;
    HDR inputs become PNGs of their own, smaller size.
    """
    store = open_storage(manifest.input)
    step = max(1, len(manifest.images) // sample)
    sizes = []
    for key in manifest.images[::step][:sample]:
        try:
            sizes.append(store.size(key))
        except NotFoundError:
            continue
    return int(manifest.items * sum(sizes) / len(sizes)) if sizes else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def summary(manifest: Manifest) -> dict[str, Any]:
    """The configuration summary printed by ``--dry-run`` and at the start of a run."""
    m = manifest
    per_shard = m.units // m.shards
    return {
        "run_id": m.run_id,
        "input": m.input,
        "refs": m.refs,
        "output": m.output,
        "normals": m.normals or "(estimated)",
        "img_pattern": m.selection.img_pattern,
        "ref_pattern": m.selection.ref_pattern,
        "img_formats": " ".join(m.selection.img_formats),
        "ref_formats": " ".join(m.selection.ref_formats),
        "images": len(m.images),
        "references": len(m.references),
        "pairs": m.pairs,
        "iterations": m.iterations,
        "outputs": m.items,
        "base_seed": m.base_seed,
        "relighter": m.relighter.name,
        "options": ", ".join(f"{k}={v}" for k, v in m.relighter.options.items()) or "-",
        "units": f"{m.units} ({m.unit_size} iteration{'' if m.unit_size == 1 else 's'} each)",
        "shards": f"{m.shards} ({per_shard}-{per_shard + (m.units % m.shards > 0)} units each)",
        "batch_size": m.batch_size or "the relighter's choice",
        "keep_top": (f"{m.keep_top} best scored of every pair's {m.iterations}: the others "
                     "are DELETED once the pair is finished" if m.keep_top else "all"),
    }

"""What made an output folder's outputs, so that a run made differently never silently skips.

Outputs are named by pair and seed only (``<image>_<reference>/<seed>_<image>``), so a run
with another relighter, other options or another model would find every name taken, skip all
of them and never run its model. The first run written to an output folder records its maker
in ``<output>/_relit/maker.json``: the relighter, the options that change what it makes (not
those that only change how fast, :attr:`RelighterOptions.RUNTIME`), and a fingerprint of its
model. A later run whose maker differs is refused with what differs, unless it is asked to add
to the folder anyway (``--allow-mixed-output``): then outputs already there are kept, not
remade, and the record keeps the first maker.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from .errors import ConfigError, NotFoundError
from .manifest import Manifest
from .relighters import parse_options, resolve
from .storage import META_DIR, Storage, join_key

MAKER_KEY = join_key(META_DIR, "maker.json")


class Maker(BaseModel):
    """``<output>/_relit/maker.json``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    relighter: str
    options: dict[str, Any]
    #: :meth:`Relighter.fingerprint` of the model; None: no model, or not known.
    model: str | None = None
    #: The options that say where the model is (:attr:`RelighterOptions.LOCATIONS`): when
    #: both makers have a fingerprint, it is compared instead of them (a model copied to
    #: S3 is the same model).
    locations: list[str] = []
    #: The run that recorded it.
    run_id: str | None = None


def maker_of(manifest: Manifest, fingerprint: bool = True) -> Maker:
    """The maker of a run's outputs (``fingerprint=False``: without reading the model)."""
    cls = resolve(manifest.relighter.name)
    options = parse_options(cls, manifest.relighter.options)
    kept = {k: v for k, v in options.model_dump(mode="json").items()
            if k not in type(options).RUNTIME}
    return Maker(relighter=manifest.relighter.name, options=kept,
                 model=cls.fingerprint(options) if fingerprint else None,
                 locations=sorted(type(options).LOCATIONS), run_id=manifest.run_id)


def differences(recorded: Maker, new: Maker) -> list[str]:
    """What differs, one phrase each (``"ddim_steps 50 -> 20"``); empty when the same."""
    out = []
    if recorded.relighter != new.relighter:
        return [f"relighter {recorded.relighter} -> {new.relighter}"]
    by_files = bool(recorded.model and new.model)
    for key in sorted(set(recorded.options) | set(new.options)):
        if by_files and key in new.locations:
            continue
        old, now = recorded.options.get(key, "(unset)"), new.options.get(key, "(unset)")
        if old != now:
            out.append(f"{key} {json.dumps(old)} -> {json.dumps(now)}")
    if recorded.model and new.model and recorded.model != new.model:
        out.append(f"model files (fingerprint {recorded.model[:12]} -> {new.model[:12]})")
    return out


def recorded_maker(output: Storage) -> Maker | None:
    """The folder's maker: its record, else (folders written before records were kept) the
    oldest run's manifest that has one; None for a folder without runs."""
    try:
        return Maker.model_validate_json(output.read(MAKER_KEY))
    except NotFoundError:
        pass
    from .run import list_runs

    runs = sorted(list_runs(output), key=lambda r: r.manifest.created_at)
    for run in runs:
        try:
            return maker_of(run.manifest, fingerprint=False)
        except Exception:  # a relighter that is not installed here: try the next run
            continue
    return None


def check_maker(manifest: Manifest, output: Storage, allow_mixed: bool = False) -> Maker | None:
    """Refuse a run whose maker differs from the output folder's (see the module docstring).

    Returns the maker to record once the run is written (:func:`record_maker`), or None when
    the folder already has its record. Writes nothing.
    """
    new = maker_of(manifest)
    recorded = recorded_maker(output)
    if recorded is None:
        return new
    diff = differences(recorded, new)
    if diff and not allow_mixed:
        raise ConfigError(
            f"{output.uri} holds outputs made differently (run {recorded.run_id}): "
            f"{'; '.join(diff)}. Outputs are named by seed only, so this run would skip "
            "every output already there instead of making its own. Write to a new "
            "--output, or pass --allow-mixed-output to add to this one anyway (outputs "
            "already there are kept, not remade)"
        )
    return None if output.exists(MAKER_KEY) else recorded


def record_maker(output: Storage, maker: Maker) -> None:
    output.write(MAKER_KEY, maker.model_dump_json(indent=1).encode())

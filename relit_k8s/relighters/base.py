"""The relighter plugin API and its registry.

A relighter is a :class:`Relighter` subclass with

* ``name``: the name users pass to ``--relighter``;
* ``Options``: a pydantic model (``extra="forbid"``) of its options, set with ``-O key=value``;
* ``__init__(options, device)``: loads weights once onto the device;
* ``relight(image, reference, seeds, normals=None)``: relights one (image, reference) pair for a
  list of seeds, as one batch.

Relighters are found by name, in this order: the built-ins (:data:`BUILTINS`), the entry-point
group ``relit_k8s.relighters`` of installed packages, and ``module:attribute`` paths.

This module does not import torch, nor do the modules of the ``sh`` and ``luminet`` classes: a
plan (``relit-k8s plan``, ``submit``, the parent of ``run``) resolves them, validates their
options and calls their class methods without it (importing torch costs 1.4 s of CPU a
process). A relighter whose module imports torch (``diffusion``, a plugin) still works; it only
makes those commands slower.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from .. import images
from ..errors import RelighterError, Stopped

if TYPE_CHECKING:
    import torch

ENTRY_POINT_GROUP = "relit_k8s.relighters"

#: Built-in relighters: name -> "module:attribute", imported only when used.
BUILTINS: dict[str, str] = {
    "sh": "relit_k8s.relighters.sh:SHRelighter",
    "diffusion": "relit_k8s.relighters.diffusion:DiffusionRelighter",
    "luminet": "relit_k8s.relighters.luminet:LuminetRelighter",
}


class Scorer(Protocol):
    """What the worker asks of a relighter's ``selector``."""

    def reference_code(self, pixels: np.ndarray) -> torch.Tensor:
        """What a reference (``H x W x 3``, as :meth:`Relighter.reference_pixels` made it) is
        compared by; computed once per reference."""

    def score(self, data: bytes, name: str, reference: torch.Tensor) -> float:
        """The score of a written output (its bytes and name): higher is closer."""


class RelighterOptions(BaseModel):
    """Base of every relighter's options: unknown keys are an error, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Options that change how the relighter runs (speed, memory, caches), never what it
    #: makes: left out of the output folder's maker record (:mod:`relit_k8s.maker`).
    RUNTIME: ClassVar[frozenset[str]] = frozenset()
    #: Options that say where the model's files are: where :meth:`Relighter.fingerprint`
    #: reads them, they are compared by those files rather than by their paths.
    LOCATIONS: ClassVar[frozenset[str]] = frozenset()


class Relighter(ABC):
    """Base class of relighters; see the module docstring for the contract."""

    name: ClassVar[str]
    Options: ClassVar[type[RelighterOptions]] = RelighterOptions
    #: If set, the worker resizes every reference (area average, linear radiance) to this
    #: (height, width) once, before caching it: keeps thousands of references in memory.
    reference_resolution: ClassVar[tuple[int, int] | None] = None
    #: If set, outputs are quantized to multiples of ``1 / output_levels`` (255: 8-bit values,
    #: as a model whose original post-processing truncates to 8 bits before it resizes). A
    #: batch may then differ from its seeds one by one by one level, where a value computed a
    #: hair differently in a batch falls on the other side of a level (the contract allows it
    #: in one value in a thousand at most); None: continuous outputs.
    output_levels: ClassVar[int | None] = None
    #: Seeds per ``relight`` call the worker uses when the plan sets no ``--batch-size``. A
    #: relighter may set it per instance, from its device (``diffusion`` measures free memory).
    batch_size: int = 8
    #: Set by the worker: the event that asks it to stop (SIGTERM, Ctrl+C). A relighter whose
    #: calls take long checks it with :meth:`raise_if_stopped` between steps, so that a stop
    #: need not wait for the whole call (the unfinished batch is redone by the next attempt).
    stop_event: threading.Event | None = None
    #: Set by a relighter that can score how close an output's lighting is to its reference
    #: (``luminet``: LumiNet's seed selector): the worker then records a score for every
    #: output it writes (:mod:`relit_k8s.scores`; ``relit-k8s select`` ranks by it).
    selector: Scorer | None = None

    def __init__(self, options: RelighterOptions | None = None, device: str | torch.device = "cpu"):
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise RelighterError(
                f"{type(self).__name__} needs {self.Options.__name__}, "
                f"got {type(self.options).__name__}"
            )
        import torch

        self.device = torch.device(device)

    @classmethod
    def preflight(cls, options: RelighterOptions, here: bool) -> None:
        """Find what would stop the relighter from starting, before anything is written.

        Called when a run is planned, with the validated ``options``; ``here`` is True when
        the workers will run on this machine (``relit-k8s run``), so installed packages and
        local files can be checked too (a pod's image and files may differ). Raise
        :class:`~relit_k8s.errors.RelighterError` saying what to do. The default checks
        nothing.
        """
        return None

    @classmethod
    def scores(cls, options: RelighterOptions) -> bool:
        """Whether, with ``options``, it sets :attr:`selector` (its outputs get scores: what
        ``--keep-top`` ranks by)."""
        return False

    @classmethod
    def fingerprint(cls, options: RelighterOptions) -> str | None:
        """A checksum of the model the options name (its files, not only its path), recorded
        with the outputs it makes so that another model is not mistaken for it; None for
        relighters without a model (the default), or when it cannot be read from here."""
        return None

    def reference_pixels(self, decoded: images.Decoded) -> np.ndarray:
        """What ``relight`` gets for a reference file (``H x W x 3`` float32), made once per
        reference by the worker: linear radiance by default (LDR files sRGB-decoded). A
        relighter that wants them otherwise (``luminet``: tone-mapped as the original does)
        overrides it."""
        return images.as_radiance(decoded)

    def raise_if_stopped(self) -> None:
        """Raise :class:`~relit_k8s.errors.Stopped` if the worker was asked to stop; call it
        between the steps of a long ``relight`` (``diffusion``: each denoising step)."""
        if self.stop_event is not None and self.stop_event.is_set():
            raise Stopped("stopped between two steps of the relighter")

    @abstractmethod
    def relight(
        self,
        image: torch.Tensor,
        reference: torch.Tensor,
        seeds: Sequence[int],
        normals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Relight one pair for each seed.

        Args:
            image: ``3 x H x W`` float32, sRGB-encoded in [0, 1], on ``self.device``.
            reference: ``3 x h x w`` float32 linear radiance, equirectangular (see DESIGN
                conventions), on ``self.device``.
            seeds: one output per seed; the same seed gives the same output.
            normals: optional ``3 x H x W`` unit camera-space normals, on ``self.device``.

        Returns:
            ``len(seeds) x 3 x H x W`` float, sRGB-encoded in [0, 1], on ``self.device``.
            Output ``b`` equals the output of ``relight(image, reference, [seeds[b]])``.
        """


def available() -> dict[str, str]:
    """Every relighter name that can be used without a path: name -> "module:attribute"."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTINS}


def _load_target(target: str, what: str) -> type[Relighter]:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise RelighterError(f"cannot load relighter {what} ({target}): {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, Relighter)):
        raise RelighterError(f"{target} is not a relit_k8s.Relighter subclass")
    return obj


def resolve(name: str) -> type[Relighter]:
    """The relighter class for a registered name or a ``module:attribute`` path."""
    known = available()
    if name in known:
        return _load_target(known[name], repr(name))
    if ":" in name:
        return _load_target(name, "path")
    raise RelighterError(
        f"unknown relighter {name!r}; available: {', '.join(sorted(known))} "
        "(or give a module:attribute path)"
    )


def describe_options(cls: type[Relighter]) -> str:
    parts = []
    for key, field in cls.Options.model_fields.items():
        default = field.default if field.default is not None else "none"
        parts.append(f"{key} (default {default})")
    return ", ".join(parts) if parts else "none"


def parse_options(cls: type[Relighter], raw: Mapping[str, Any]) -> RelighterOptions:
    """Validate ``raw`` (strings from ``-O key=value``, or JSON values) against ``cls.Options``."""
    unknown = sorted(set(raw) - set(cls.Options.model_fields))
    if unknown:
        raise RelighterError(
            f"relighter {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {describe_options(cls)}"
        )
    try:
        return cls.Options.model_validate(dict(raw))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        raise RelighterError(f"invalid options for relighter {cls.name!r}: {problems}") from e


def create(name: str, options: Mapping[str, Any], device: str | torch.device) -> Relighter:
    """Resolve, validate the options and construct (loading weights once)."""
    cls = resolve(name)
    return cls(parse_options(cls, options), device)

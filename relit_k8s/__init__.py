"""relit-k8s: relighting inference at scale, as Kubernetes Indexed Jobs or on one machine.

The public surface: the planner, the manifest models, storage, the relighter plugin API and the
exception tree. Everything else is private to the package.
"""

from .errors import (
    ConfigError,
    DecodeError,
    ImageTooLarge,
    ItemError,
    ManifestError,
    NotFoundError,
    RelighterError,
    RelitError,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
    Stopped,
    TransientError,
)
from .manifest import Manifest, ShardReport, Unit, pair_seeds
from .planner import PlanSettings, list_sources, plan, write_manifest
from .relighters import Relighter, RelighterOptions
from .storage import Storage, open_storage

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DecodeError",
    "ImageTooLarge",
    "ItemError",
    "Manifest",
    "ManifestError",
    "NotFoundError",
    "PlanSettings",
    "Relighter",
    "RelighterError",
    "RelighterOptions",
    "RelitError",
    "ShardReport",
    "Stopped",
    "Storage",
    "StorageConfigError",
    "StorageError",
    "StorageUnavailable",
    "TransientError",
    "Unit",
    "__version__",
    "list_sources",
    "open_storage",
    "pair_seeds",
    "plan",
    "write_manifest",
]

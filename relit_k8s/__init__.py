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
    Stopped,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
    TransientError,
)
from .manifest import Manifest, ShardReport, Unit, pair_seeds
from .storage import Storage, open_storage

__version__ = "0.1.0"

# These import torch: loaded on first use, so `relit-k8s --help` and `status` start fast.
_LAZY = {
    "PlanSettings": "planner",
    "list_sources": "planner",
    "plan": "planner",
    "write_manifest": "planner",
    "Relighter": "relighters",
    "RelighterOptions": "relighters",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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

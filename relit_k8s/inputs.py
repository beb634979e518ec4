"""What a relighter is handed: inputs, references and normal maps as tensors, from storage.

:class:`InputLoader` reads one plan's files and turns them into the tensors the relighter
contract promises (``(3, H, W)`` float32; images as display values in [0, 1], references as
linear radiance no larger than the relighter's ``reference_resolution``, normal maps as unit
vectors in camera space). The worker decodes through it in threads; benchmarks and tests use
it to get exactly what a worker would hand the relighter. A file that cannot be read or
decoded is an :class:`~relit_k8s.errors.ItemError` naming it.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import images
from .errors import ItemError, NotFoundError, ObjectUnreadable
from .manifest import Manifest
from .storage import Storage, open_storage

log = logging.getLogger("relit_k8s.worker")


class InputLoader:
    """Loads the files of one plan for one relighter; pins host memory when bound for CUDA."""

    def __init__(self, manifest: Manifest, reference_resolution: tuple[int, int] | None = None,
                 pin_memory: bool = False,
                 reference_pixels: Callable[[images.Decoded], np.ndarray] = images.as_radiance):
        self.max_pixels = manifest.max_pixels
        self.reference_resolution = reference_resolution
        #: how a decoded reference becomes what the relighter gets (its ``reference_pixels``)
        self.reference_pixels = reference_pixels
        self.pin_memory = pin_memory
        self.inputs = open_storage(manifest.input)
        self.refs = open_storage(manifest.refs)
        self.normals = open_storage(manifest.normals) if manifest.normals else None

    def decode(self, storage: Storage, key: str) -> images.Decoded:
        """The decoded file at ``key``; an :class:`ItemError` when it cannot be had."""
        try:
            data = storage.read(key)
        except NotFoundError as e:  # deleted since the plan: this item cannot be done
            raise ItemError(f"missing from {storage.uri} (deleted after planning?)",
                            key=key) from e
        except ObjectUnreadable as e:  # archived, or no permission on this one file
            raise ItemError(str(e), key=key) from e
        return images.decode(data, key, self.max_pixels)

    def image(self, key: str) -> torch.Tensor:
        """The input image ``key`` as display values in [0, 1], ``(3, H, W)``."""
        return self._tensor(images.as_display(self.decode(self.inputs, key)))

    def reference(self, key: str) -> torch.Tensor:
        """The reference ``key`` as the relighter wants it (linear radiance unless its
        ``reference_pixels`` says otherwise), area-averaged down to the relighter's
        ``reference_resolution`` when it is larger."""
        t = torch.from_numpy(np.ascontiguousarray(
            self.reference_pixels(self.decode(self.refs, key)))).permute(2, 0, 1).contiguous()
        size = self.reference_resolution
        if size and (t.shape[1] > size[0] or t.shape[2] > size[1]):
            t = F.adaptive_avg_pool2d(t[None], size)[0].contiguous()
        return t.pin_memory() if self.pin_memory else t

    def normal_map(self, key: str) -> torch.Tensor | None:
        """The normal map of input ``key`` (``<normals>/<folder>/<stem>.<ext>``) as unit
        vectors; None (with a warning) when there is none, so the relighter estimates them."""
        assert self.normals is not None, "the plan has no --normals"
        folder, name = posixpath.split(key)
        stem = posixpath.splitext(name)[0]
        matches = sorted(
            n for n in self.normals.list_names(folder)
            if posixpath.splitext(n)[0] == stem and images.extension(n) in images.LDR_FORMATS
        )
        if not matches:
            log.warning("no normal map for %s under %s: using the estimate",
                        key, self.normals.uri)
            return None
        nkey = posixpath.join(folder, matches[0]) if folder else matches[0]
        decoded = self.decode(self.normals, nkey)
        n = torch.from_numpy(decoded.pixels).permute(2, 0, 1) * 2.0 - 1.0
        norm = n.norm(dim=0, keepdim=True)
        flat = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand_as(n)
        return torch.where(norm > 1e-3, n / norm.clamp_min(1e-6), flat).contiguous()

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
        return t.pin_memory() if self.pin_memory else t


__all__ = ["InputLoader"]

"""The ``sh`` relighter before and after its non-negative window, as a contact sheet.

Rows: the bundled example photos. Columns: the photo; relit under a red light from the right
(with a faint neutral ambient) with ``-O window=none`` (the exact order-2 kernel, which rings:
teal where the red light does not reach) and with the default ``window=nonnegative``; the same
under the bundled ``studio_softboxes.exr``. Written to ``docs/sh_window.jpg``.

    python scripts/sh_contact_sheet.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from relit_k8s import images
from relit_k8s.relighters import create

ROOT = Path(__file__).resolve().parents[1]
SIDE = 200


def red_from_the_right(h: int = 64, w: int = 128) -> torch.Tensor:
    env = torch.full((3, h, w), 0.01)
    env[0, h // 2 - 12:h // 2 + 12, int(0.75 * w) - 6:int(0.75 * w) + 6] = 50.0
    return env


def tile(pixels: np.ndarray) -> Image.Image:
    im = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))
    im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (SIDE, SIDE), "white")
    canvas.paste(im, ((SIDE - im.width) // 2, (SIDE - im.height) // 2))
    return canvas


def main() -> None:
    studio = images.decode((ROOT / "examples/refs/studio_softboxes.exr").read_bytes(),
                           "studio_softboxes.exr")
    maps = {"red light, right": red_from_the_right(),
            "studio": torch.from_numpy(images.as_radiance(studio)).permute(2, 0, 1)}
    heads = ["photo"] + [f"{name}: {w}" for name in maps for w in ("none", "nonnegative")]
    photos = sorted(p for p in (ROOT / "examples/images").iterdir())
    sheet = Image.new("RGB", (SIDE * len(heads), SIDE * len(photos) + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for c, head in enumerate(heads):
        draw.text((c * SIDE + 6, 6), head, fill="black")
    for r, path in enumerate(photos):
        photo = images.as_display(images.decode(path.read_bytes(), path.name))
        image = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).float()
        cells = [photo]
        for env in maps.values():
            for window in ("none", "nonnegative"):
                r_ = create("sh", {"rotation": "none", "window": window}, "cpu")
                cells.append(r_.relight(image, env.float(), [0])[0].permute(1, 2, 0).numpy())
        for c, pixels in enumerate(cells):
            sheet.paste(tile(pixels), (c * SIDE, 24 + r * SIDE))
    out = ROOT / "docs" / "sh_window.jpg"
    sheet.save(out, quality=85)
    print(out)


if __name__ == "__main__":
    main()

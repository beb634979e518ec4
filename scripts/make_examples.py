"""Make the bundled examples: small photos and procedural HDR environment maps.

    python scripts/make_examples.py            # needs scikit-image (pip install -e '.[dev]')

examples/images: small copies of photographs bundled with scikit-image (see
examples/ATTRIBUTION.md). examples/refs: procedural equirectangular environment maps in linear
radiance, following the conventions in the README (u = 0.5 looks where the camera looks,
u = 0.25 is the camera's left, v = 0 is straight up).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import OpenEXR
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent / "examples"
PHOTOS = {"astronaut.png": 256, "rocket.jpg": 256, "chelsea.png": 256, "coffee.png": 256}
ENV_W, ENV_H = 256, 128


def photos() -> None:
    from skimage import data_dir

    out = ROOT / "images"
    out.mkdir(parents=True, exist_ok=True)
    for name, width in PHOTOS.items():
        im = Image.open(Path(data_dir) / name).convert("RGB")
        im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
        kwargs = {"quality": 92} if name.endswith(".jpg") else {"optimize": True}
        im.save(out / name, **kwargs)


def directions() -> np.ndarray:
    v = (np.arange(ENV_H) + 0.5) / ENV_H
    u = (np.arange(ENV_W) + 0.5) / ENV_W
    theta, phi = np.meshgrid(math.pi * v, 2 * math.pi * (u - 0.5), indexing="ij")
    return np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), -np.sin(theta) * np.cos(phi)], -1)


def unit(u: float, elevation_deg: float) -> np.ndarray:
    """Direction of the environment column u at an elevation above the horizon."""
    theta = math.radians(90 - elevation_deg)
    phi = 2 * math.pi * (u - 0.5)
    return np.array([math.sin(theta) * math.sin(phi), math.cos(theta),
                     -math.sin(theta) * math.cos(phi)])


def lobe(d: np.ndarray, centre: np.ndarray, radius_deg: float) -> np.ndarray:
    cos = np.clip(d @ centre, -1, 1)
    return (np.degrees(np.arccos(cos)) <= radius_deg).astype(np.float32)


def sky_with_sun() -> np.ndarray:
    d = directions()
    up = np.clip(d[..., 1], 0, 1)[..., None]
    sky = np.array([0.35, 0.55, 1.0]) * (0.4 + 0.6 * (1 - up)) * 1.5
    ground = np.array([0.25, 0.2, 0.15]) * 0.6
    env = np.where(d[..., 1:2] > 0, sky, ground)
    env = env + lobe(d, unit(0.35, 40), 3.0)[..., None] * np.array([1.0, 0.95, 0.85]) * 400
    return env.astype(np.float32)


def studio() -> np.ndarray:
    d = directions()
    env = np.full(d.shape, 0.03, np.float32)
    key = lobe(d, unit(0.32, 25), 14.0)[..., None] * np.array([1.0, 0.85, 0.7]) * 30
    fill = lobe(d, unit(0.72, 10), 18.0)[..., None] * np.array([0.6, 0.75, 1.0]) * 6
    return (env + key + fill).astype(np.float32)


def sunset() -> np.ndarray:
    d = directions()
    up = np.clip(d[..., 1], 0, 1)[..., None]
    sky = (np.array([1.0, 0.45, 0.2]) * (1 - up) ** 3 + np.array([0.15, 0.2, 0.45]) * up) * 1.2
    env = np.where(d[..., 1:2] > 0, sky, np.array([0.08, 0.06, 0.05]))
    env = env + lobe(d, unit(0.78, 4), 4.0)[..., None] * np.array([1.0, 0.55, 0.25]) * 150
    return env.astype(np.float32)


def write_hdr(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise RuntimeError(f"could not write {path}")


def write_exr(path: Path, rgb: np.ndarray) -> None:
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {"RGB": np.ascontiguousarray(rgb, dtype=np.float32)}).write(str(path))


def refs() -> None:
    out = ROOT / "refs"
    out.mkdir(parents=True, exist_ok=True)
    write_hdr(out / "sky_sun.hdr", sky_with_sun())
    write_exr(out / "studio_softboxes.exr", studio())
    write_hdr(out / "sunset.hdr", sunset())


if __name__ == "__main__":
    photos()
    refs()
    for p in sorted(ROOT.rglob("*.*")):
        if p.parent.name in ("images", "refs"):
            print(f"{p.relative_to(ROOT.parent)}: {p.stat().st_size // 1024} KB")

"""Decode and encode images; tone mapping; the decompression-bomb guard.

Pixel conventions used everywhere in relit-k8s:

* an *LDR* image decodes to float32 ``H x W x 3`` sRGB-encoded values in ``[0, 1]``;
* an *HDR* image (``.hdr`` Radiance, ``.exr`` OpenEXR) decodes to float32 ``H x W x 3`` linear
  radiance, values above 1 kept; NaN and negative values become 0, +Inf the largest finite value.

Pillow reads LDR formats (EXIF orientation applied; grayscale, palette, RGBA, CMYK -> RGB; alpha
is dropped), OpenCV reads ``.hdr`` as float radiance, and the ``OpenEXR`` package reads ``.exr``
(the current opencv wheels are built without OpenEXR).
"""

from __future__ import annotations

import io
import posixpath
import re
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import DecodeError, ImageTooLarge

LDR_FORMATS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")
HDR_FORMATS = ("hdr", "exr")

#: Largest image, in pixels (width x height), that is decoded at all; checked from the file's
#: header before any pixel is decoded, so a 100000 x 100000 PNG of a few KB cannot exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000

#: JPEG and WebP quality of written outputs (4:4:4 chroma, no subsampling, for JPEG).
JPEG_QUALITY = 95

_PIL_FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "webp": "WEBP",
    "tif": "TIFF",
    "tiff": "TIFF",
}


@dataclass(frozen=True)
class Decoded:
    """A decoded image: ``pixels`` as described in the module docstring, and whether it is HDR."""

    pixels: np.ndarray
    hdr: bool

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.pixels.shape[1], self.pixels.shape[0]


def extension(name: str) -> str:
    return posixpath.splitext(name)[1].lower().lstrip(".")


def is_hdr_name(name: str) -> bool:
    return extension(name) in HDR_FORMATS


def decode(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``data``, choosing the decoder by the extension of ``name``.

    Raises :class:`DecodeError` for anything that is not a valid image of that format, and
    :class:`ImageTooLarge` when the header claims more than ``max_pixels`` pixels.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)", key=name)
    ext = extension(name)
    if ext == "hdr":
        return Decoded(_decode_radiance(data, name, max_pixels), hdr=True)
    if ext == "exr":
        return Decoded(_decode_exr(data, name, max_pixels), hdr=True)
    if ext in _PIL_FORMATS:
        return Decoded(_decode_ldr(data, name, max_pixels), hdr=False)
    raise DecodeError(f"unsupported image format {ext!r}", key=name)


def _guard(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image size {width}x{height}", key=name)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,} (raise it with --max-pixels if the image is genuine)", key=name)


def _decode_ldr(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(io.BytesIO(data))
            _guard(name, im.width, im.height, max_pixels)
            im.load()
            im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:  # Pillow's own guard, at twice its limit
        raise ImageTooLarge(str(e), key=name) from e
    except UnidentifiedImageError as e:
        raise DecodeError("not a decodable image (unknown format or corrupt header)",
                          key=name) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image ({e})", key=name) from e
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.float32) / 65535.0
    elif im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / 65535.0 if im.mode == "I" else arr
    else:
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


_RADIANCE_SIZE = re.compile(rb"^([-+])([YX]) (\d+) ([-+])([YX]) (\d+)$")


def _radiance_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from a Radiance header, without decoding pixels."""
    if not (data.startswith(b"#?")):
        raise DecodeError("not a Radiance .hdr file (no '#?' signature)", key=name)
    head = data[:65536]
    end = head.find(b"\n\n")
    if end < 0:
        raise DecodeError("truncated Radiance header", key=name)
    line = head[end + 2 :].split(b"\n", 1)[0].strip()
    m = _RADIANCE_SIZE.match(line)
    if not m:
        raise DecodeError(f"invalid Radiance resolution line {line[:40]!r}", key=name)
    first, second = int(m.group(3)), int(m.group(6))
    return (second, first) if m.group(2) == b"Y" else (first, second)


def _quiet_cv2():
    """OpenCV, with its own log lines (``[ERROR:0@0.01] ... RGBE read error`` on stderr for
    every corrupt file) silenced: a decode failure is this module's :class:`DecodeError`,
    recorded once in the shard report."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


def _decode_radiance(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    cv2 = _quiet_cv2()

    width, height = _radiance_size(data, name)
    _guard(name, width, height, max_pixels)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.shape[2] < 3:
        raise DecodeError("corrupt Radiance .hdr file", key=name)
    return _sanitise(arr[:, :, 2::-1])


def _decode_exr(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    import OpenEXR

    try:
        header = OpenEXR.File(io.BytesIO(data), header_only=True).header()
        lo, hi = header["dataWindow"]
        _guard(name, int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1), max_pixels)
        channels = OpenEXR.File(io.BytesIO(data)).channels()
    except (ImageTooLarge, DecodeError):
        raise
    except Exception as e:  # OpenEXR raises plain RuntimeError/Exception for corrupt files
        raise DecodeError(f"corrupt OpenEXR file ({e})", key=name) from e
    for key in ("RGB", "RGBA"):
        if key in channels:
            arr = channels[key].pixels[:, :, :3]
            break
    else:
        mono = "Y" if "Y" in channels else next(iter(channels), None)
        if mono is None or channels[mono].pixels.ndim != 2:
            raise DecodeError("OpenEXR file has no RGB or Y channels", key=name)
        arr = np.repeat(channels[mono].pixels[:, :, None], 3, axis=2)
    return _sanitise(arr)


def _sanitise(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    arr = np.nan_to_num(arr, nan=0.0, posinf=float(np.finfo(np.float32).max), neginf=0.0)
    return np.ascontiguousarray(np.maximum(arr, 0.0))


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] to linear values (IEC 61966-2-1)."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear values to sRGB-encoded values in [0, 1] (clipped)."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055).astype(np.float32)


def tonemap_hdr(x: np.ndarray, percentile: float = 95.0, gamma: float = 2.2) -> np.ndarray:
    """The seed's HDR-to-LDR mapping: divide by the 95th percentile, clip to [0, 1], gamma 1/2.2."""
    x = np.asarray(x, dtype=np.float32)
    scale = float(np.percentile(x, percentile)) if x.size else 0.0
    if not np.isfinite(scale) or scale <= 0:
        scale = float(x.max()) if x.size and x.max() > 0 else 1.0
    return (np.clip(x / scale, 0.0, 1.0) ** (1.0 / gamma)).astype(np.float32)


def as_display(img: Decoded) -> np.ndarray:
    """An input image as sRGB-encoded values in [0, 1]: HDR inputs are tone-mapped (seed's way)."""
    return tonemap_hdr(img.pixels) if img.hdr else img.pixels


def as_radiance(img: Decoded) -> np.ndarray:
    """A reference as linear radiance: LDR references are sRGB-decoded."""
    return img.pixels if img.hdr else srgb_to_linear(img.pixels)


def encode(pixels: np.ndarray, name: str, png_level: int = 1) -> bytes:
    """Encode sRGB values in [0, 1] (``H x W x 3`` float) in the format of ``name``'s extension
    (PNG at zlib level ``png_level``: see ``RELIT_PNG_LEVEL``)."""
    from PIL import Image

    fmt = _PIL_FORMATS.get(extension(name))
    if fmt is None:
        raise ValueError(f"cannot encode {name!r}: unsupported output format")
    arr = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
    im = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8))
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, fmt, quality=JPEG_QUALITY, subsampling=0)
    elif fmt == "WEBP":
        im.save(buf, fmt, quality=JPEG_QUALITY)
    elif fmt == "PNG":
        im.save(buf, fmt, compress_level=png_level)
    else:
        im.save(buf, fmt)
    return buf.getvalue()

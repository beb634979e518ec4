from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import OpenEXR
import pytest
from conftest import EXAMPLES, photo, png_bytes
from PIL import Image

from relit_k8s import images
from relit_k8s.errors import DecodeError, ImageTooLarge
from relit_k8s.manifest import Manifest


def exr_bytes(rgb: np.ndarray, tmp_path) -> bytes:
    path = tmp_path / "x.exr"
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGB": rgb.astype(np.float32)}).write(str(path))
    return path.read_bytes()


def hdr_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".hdr", np.ascontiguousarray(rgb[..., ::-1].astype(np.float32)))
    assert ok
    return buf.tobytes()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, and almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


_COMBOS = {
    ("PNG", "png"): ["RGB", "L", "P", "RGBA", "LA"],
    ("JPEG", "jpg"): ["RGB", "L", "CMYK"],
    ("BMP", "bmp"): ["RGB", "L", "P"],
    ("WEBP", "webp"): ["RGB", "RGBA"],
    ("TIFF", "tiff"): ["RGB", "L", "P", "RGBA", "CMYK", "LA"],
}


@pytest.mark.parametrize("fmt,ext,mode", [(f, e, m) for (f, e), ms in _COMBOS.items()
                                          for m in ms])
def test_ldr_modes_decode_to_rgb_float(fmt, ext, mode):
    src = Image.fromarray(photo(20, 30)).convert(mode)
    buf = io.BytesIO()
    src.save(buf, fmt)
    dec = images.decode(buf.getvalue(), f"x.{ext}")
    assert not dec.hdr
    assert dec.pixels.shape == (20, 30, 3) and dec.pixels.dtype == np.float32
    assert 0.0 <= dec.pixels.min() and dec.pixels.max() <= 1.0


def test_16bit_png_keeps_its_precision():
    ramp = (np.linspace(0, 65535, 64 * 8).reshape(8, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    dec = images.decode(buf.getvalue(), "g16.png")
    assert dec.pixels.shape == (8, 64, 3)
    np.testing.assert_allclose(dec.pixels[..., 0], ramp / 65535.0, atol=1e-6)


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    dec = images.decode(buf.getvalue(), "rot.jpg")
    assert dec.pixels.shape == (20, 10, 3)
    assert dec.pixels[:10].mean() > 0.9 and dec.pixels[10:].mean() < 0.1  # top half white


def test_radiance_hdr_keeps_values_above_one():
    rgb = np.ones((8, 16, 3), np.float32) * 0.5
    rgb[2, 3] = [250.0, 120.0, 60.0]
    dec = images.decode(hdr_bytes(rgb), "env.hdr")
    assert dec.hdr and dec.pixels.shape == (8, 16, 3)
    np.testing.assert_allclose(dec.pixels[2, 3], [250.0, 120.0, 60.0], rtol=0.02)
    assert dec.pixels[2, 3, 0] > dec.pixels[2, 3, 2]  # RGB order, not BGR


def test_openexr_keeps_values_above_one_and_sanitises_nan_inf(tmp_path):
    rgb = np.full((4, 6, 3), 2.5, np.float32)
    rgb[0, 0] = [np.nan, np.inf, -3.0]
    dec = images.decode(exr_bytes(rgb, tmp_path), "env.exr")
    assert dec.hdr
    assert dec.pixels[1, 1, 0] == pytest.approx(2.5)
    assert np.isfinite(dec.pixels).all()
    assert dec.pixels[0, 0, 0] == 0.0 and dec.pixels[0, 0, 2] == 0.0
    assert dec.pixels[0, 0, 1] > 1e30


def test_bundled_examples_decode():
    for path in sorted((EXAMPLES / "refs").iterdir()):
        dec = images.decode(path.read_bytes(), path.name)
        assert dec.hdr and dec.pixels.shape[1] == 2 * dec.pixels.shape[0]
        assert dec.pixels.max() > 1.0, f"{path.name} lost its dynamic range"
    for path in sorted((EXAMPLES / "images").iterdir()):
        if path.suffix in (".png", ".jpg"):
            assert images.decode(path.read_bytes(), path.name).pixels.ndim == 3


@pytest.mark.parametrize("data,name,match", [
    (b"", "empty.jpg", "empty file"),
    (b"this is text, not an image\n" * 5, "notes.png", "not a decodable image"),
    (png_bytes(photo(), "JPEG")[:300], "truncated.jpg", "corrupt or truncated"),
    (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 4 +X 8\n\x01", "bad.hdr", "corrupt"),
    (b"not an exr at all", "bad.exr", "corrupt OpenEXR"),
    (b"GIF89a....", "x.gif", "unsupported"),
])
def test_bad_files_raise_decode_errors(data, name, match):
    with pytest.raises(DecodeError, match=match):
        images.decode(data, name)


def test_pixel_guard_stops_before_decoding():
    with pytest.raises(ImageTooLarge, match="10000000000 pixels"):
        images.decode(bomb_png(100_000, 100_000), "bomb.png")
    with pytest.raises(ImageTooLarge, match="9000x9000"):
        images.decode(bomb_png(9000, 9000), "bomb.png")
    with pytest.raises(ImageTooLarge):
        images.decode(png_bytes(photo(20, 30)), "small.png", max_pixels=500)
    header = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 90000 +X 90000\n"
    with pytest.raises(ImageTooLarge):
        images.decode(header, "huge.hdr")


def test_tonemap_is_the_seeds_formula():
    x = np.arange(1, 101, dtype=np.float32).reshape(10, 10, 1).repeat(3, axis=2)
    p95 = np.percentile(x, 95)
    expected = np.clip(x / p95, 0, 1) ** (1 / 2.2)
    np.testing.assert_allclose(images.tonemap_hdr(x), expected, rtol=1e-6)


def test_srgb_round_trip():
    x = np.linspace(0, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(images.linear_to_srgb(images.srgb_to_linear(x)), x, atol=1e-5)


@pytest.mark.parametrize("name", ["o.jpg", "o.png", "o.webp", "o.bmp", "o.tif"])
def test_encode_round_trips_in_the_named_format(name):
    arr = photo(16, 24).astype(np.float32) / 255.0
    data = images.encode(arr, name)
    back = images.decode(data, name).pixels
    tolerance = 0.04 if name.endswith((".jpg", ".webp")) else 1 / 255
    assert np.abs(back - arr).mean() < tolerance


def test_png_level_changes_the_size_never_the_pixels():
    arr = photo(64, 96).astype(np.float32) / 255.0
    stored = images.encode(arr, "o.png", png_level=0)
    fast = images.encode(arr, "o.png")  # the default level, 1
    small = images.encode(arr, "o.png", png_level=9)
    assert len(stored) > len(fast) >= len(small)
    pixels = [images.decode(d, "o.png").pixels for d in (stored, fast, small)]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])


def test_output_names_keep_ldr_and_turn_hdr_into_png():
    assert Manifest.output_name("dir/photo.JPG") == "photo.JPG"
    assert Manifest.output_name("dir/scan.exr") == "scan.png"
    assert Manifest.output_name("a b+c.hdr") == "a b+c.png"

"""The gallery, rendered in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from conftest import EXAMPLES, cli
from PIL import Image


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed here (apt-get install chromium)")
    return path


def render(page, tmp_path, *args: str) -> str:
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
         "--virtual-time-budget=10000", *args, f"file://{page}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_gallery_renders_the_expected_thumbnails_in_a_browser(tmp_path):
    images_dir = tmp_path / "in"
    shutil.copytree(EXAMPLES / "images", images_dir)
    (images_dir / "broken #1.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    cli("run", "--input", str(images_dir), "--refs", str(EXAMPLES / "refs"), "--output",
        str(out), "--iterations", "3", "--device", "cpu", "--no-progress", check=True)
    result = cli("gallery", "--output", str(out), "--samples", "2", check=True)
    assert "5 images x 3 references" in result.stdout and "3 failed pairs" in result.stdout
    [page] = list(out.glob("_relit/*/gallery/index.html"))
    dom = render(page, tmp_path, "--dump-dom")
    loaded = re.findall(r'<img class="(\w+)"[^>]*data-loaded="1"', dom)
    # 4 good inputs, 3 references, 4 x 3 pairs x 2 samples; the broken input has none
    assert loaded.count("input") == 4 and loaded.count("ref") == 3
    assert loaded.count("sample") == 4 * 3 * 2
    assert 'data-failed="1"' not in dom
    assert dom.count('class="failed"') == 3 and "not a decodable image" in dom
    # samples link to the full outputs, relative to the gallery
    hrefs = re.findall(r'<a href="([^"]+)">', dom)
    assert len(hrefs) == 24 and all(h.startswith("../../../") for h in hrefs)
    for href in hrefs[:3]:
        from urllib.parse import unquote

        assert (page.parent / unquote(href)).resolve().is_file()
    # thumbnails, not the full images
    thumbs = list(page.parent.glob("thumbs/*.jpg"))
    assert thumbs and all(max(Image.open(t).size) <= 160 for t in thumbs)
    grid = Image.open(page.parent / "grid.png")
    assert grid.size == (4 * 128, 6 * 128)  # (refs + 1) x (images + 1) tiles
    shot = tmp_path / "shot.png"
    render(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert Image.open(shot).size == (1200, 900)

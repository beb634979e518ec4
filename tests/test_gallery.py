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


def test_the_gallery_of_a_bucket_is_copied_here_whole_and_opens(bucket, s3_client, tmp_path):
    from conftest import upload_folder

    upload_folder(s3_client, EXAMPLES / "images", bucket, "in")
    out = f"s3://{bucket}/out"
    cli("run", "--input", f"s3://{bucket}/in", "--refs", str(EXAMPLES / "refs"), "--output",
        out, "--iterations", "2", "--img-pattern", "c*", "--device", "cpu", "--no-progress",
        check=True)
    in_bucket = cli("gallery", "--output", out, check=True).stdout
    assert f"gallery: {out}/_relit/" in in_bucket
    assert f"relit-k8s gallery --output {out} --to gallery/" in in_bucket  # how to view it

    here = tmp_path / "gallery"
    result = cli("gallery", "--output", out, "--to", str(here), "--samples", "2", check=True)
    assert f"gallery: {here / 'index.html'}" in result.stdout and "s3://" not in result.stdout
    dom = render(here / "index.html", tmp_path, "--dump-dom")
    loaded = re.findall(r'<img class="(\w+)"[^>]*data-loaded="1"', dom)
    assert loaded.count("input") == 2 and loaded.count("ref") == 3
    assert loaded.count("sample") == 2 * 3 * 2 and 'data-failed="1"' not in dom
    hrefs = re.findall(r'<a href="([^"]+)">', dom)
    assert len(hrefs) == 12 and all(h.startswith("full/") for h in hrefs)
    for href in hrefs:  # the full samples, copied byte for byte
        key = href.removeprefix("full/")
        body = s3_client.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read()
        assert (here / "full" / key).read_bytes() == body


def test_the_grid_labels_its_rows_and_columns(tmp_path):
    out = tmp_path / "out"
    cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
        "--output", str(out), "--iterations", "1", "--img-pattern", "[ar]*", "--device", "cpu",
        "--no-progress", check=True)
    cli("gallery", "--output", str(out), check=True)
    [grid] = list(out.glob("_relit/*/gallery/grid.png"))
    im = Image.open(grid).convert("L")
    assert im.size == (4 * 128, 3 * 128)  # a header column + 3 references, a header row + 2

    def dark(box) -> int:
        return sum(im.crop(box).histogram()[:100])  # pixels darker than 100 of 255

    assert dark((0, 0, 128, 128)) > 30  # "columns: references", "rows: inputs"
    for c in range(1, 4):  # each reference's name in the band under its tile
        assert dark((c * 128, 114, (c + 1) * 128, 128)) > 15, c
    for r in range(1, 3):  # each input's name under its tile
        assert dark((0, (r + 1) * 128 - 14, 128, (r + 1) * 128)) > 15, r

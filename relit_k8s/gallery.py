"""A contact sheet of a run: inputs x references with a few samples each, as HTML and PNG.

Written to ``<output>/_relit/<run>/gallery/``: ``index.html`` (thumbnails linking to the full
files, references shown tone-mapped, failed pairs marked with their reason), ``grid.png`` (one
sample per pair; its first row and column are the references and inputs, labelled with their
file names) and ``thumbs/``. Thumbnails are generated; full images are never embedded.
``relit-k8s gallery --to DIR`` writes it, with copies of the samples it links to, to a folder of
its own: the way to look at the gallery of outputs that are in a bucket.
"""

from __future__ import annotations

import html
import io
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import images
from .errors import ItemError, NotFoundError
from .manifest import Manifest, pair_seeds
from .run import Run
from .scores import read_scores
from .storage import Storage, join_key, open_storage

THUMB = 160  # pixels, the longer side of a thumbnail


def _thumb(pixels: np.ndarray, size: int = THUMB) -> bytes:
    im = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _decode(storage: Storage, key: str, max_pixels: int) -> images.Decoded | None:
    try:
        return images.decode(storage.read(key), key, max_pixels)
    except (ItemError, NotFoundError):
        return None


class _Sheet:
    """Where a gallery is written, and what it has drawn so far: the thumbnails of inputs and
    references, the grid's tiles, and each shown pair's samples."""

    def __init__(self, run: Run, to: str | None):
        self.run, self.to = run, to
        self.dest, self.prefix = ((run.output, run.paths.gallery) if to is None
                                  else (open_storage(to), ""))
        self.thumbs: dict[str, str] = {}  # source key -> thumbnail file name in the gallery
        self.tiles: dict[tuple[int, int], np.ndarray] = {}
        #: pair -> [(thumb, full href, score or None)]
        self.cells: dict[tuple[str, str], list[tuple[str, str, float | None]]] = {}

    def link(self, key: str, data: bytes) -> str:
        """The href of a full output from the gallery page (copied when the gallery is not
        next to the outputs)."""
        if self.to is None:
            return "../../../" + quote(key)
        self.dest.write(join_key(self.prefix, "full", key), data)
        return "full/" + quote(key)

    def put_thumb(self, name: str, pixels: np.ndarray) -> str:
        self.dest.write(join_key(self.prefix, "thumbs", name), _thumb(pixels))
        return f"thumbs/{name}"

    def heads(self, shown_images: list[str], shown_refs: list[str]) -> None:
        """The row and column heads: the inputs, the references tone-mapped."""
        m = self.run.manifest
        inputs, refs = open_storage(m.input), open_storage(m.refs)
        for i, key in enumerate(shown_images):
            dec = _decode(inputs, key, m.max_pixels)
            if dec is not None:
                pixels = images.as_display(dec)
                self.thumbs[f"in:{key}"] = self.put_thumb(f"in-{i}.jpg", pixels)
                self.tiles[(i + 1, 0)] = pixels
        for j, key in enumerate(shown_refs):
            dec = _decode(refs, key, m.max_pixels)
            if dec is not None:
                # the seed's tone mapping, at the 99.5th percentile so that small lights show
                pixels = images.tonemap_hdr(images.as_radiance(dec), percentile=99.5)
                self.thumbs[f"ref:{key}"] = self.put_thumb(f"ref-{j}.jpg", pixels)
                self.tiles[(0, j + 1)] = pixels

    def samples(self, i: int, img: str, j: int, ref: str, samples: int,
                scores: dict[int, float]) -> None:
        """Up to ``samples`` written outputs of the pair (the best scored first, if scored)."""
        m, out = self.run.manifest, self.run.output
        present = self.run.existing_seeds(img, ref)
        ordered = sorted(pair_seeds(m.base_seed, img, ref, m.iterations),
                         key=lambda s: -scores.get(s, float("-inf")))
        self.cells[(img, ref)] = []
        for k, seed in enumerate([s for s in ordered if s in present][:samples]):
            key = m.output_key(img, ref, seed)
            try:
                data = out.read(key)
                dec = images.decode(data, key, m.max_pixels)
            except (ItemError, NotFoundError):
                continue
            thumb = self.put_thumb(f"out-{i}-{j}-{k}.jpg", dec.pixels)
            self.cells[(img, ref)].append((thumb, self.link(key, data), scores.get(seed)))
            if k == 0:
                self.tiles[(i + 1, j + 1)] = dec.pixels


def build(output: str, run_id: str | None = None, samples: int = 3, max_images: int = 12,
          max_refs: int = 8, to: str | None = None) -> dict[str, Any]:
    """Write the gallery of a run; returns its URIs and what it shows.

    By default it goes next to the run (``<output>/_relit/<run>/gallery/``) and links to the
    outputs where they are. With ``to`` (a folder, typically local when the outputs are in a
    bucket) it is written there instead, whole: the samples it links to are copied into
    ``<to>/full/``, so that it opens in a browser without access to the bucket.
    """
    run = Run.load(output, run_id)
    m = run.manifest
    failed: dict[tuple[str, str], str] = {}
    for report in run.read_reports().values():
        for f in report.failures:
            failed.setdefault((f.image, f.ref), f.error)
    sheet = _Sheet(run, to)
    shown_images, shown_refs = list(m.images[:max_images]), list(m.references[:max_refs])
    sheet.heads(shown_images, shown_refs)
    scored = read_scores(run)  # a run that scores its outputs: the most similar first
    for i, img in enumerate(shown_images):
        for j, ref in enumerate(shown_refs):
            sheet.samples(i, img, j, ref, samples, scored.get((img, ref), {}))
    dest, prefix = sheet.dest, sheet.prefix
    page = _html(m, shown_images, shown_refs, sheet.thumbs, sheet.cells, failed)
    dest.write(join_key(prefix, "index.html"), page.encode())
    labels = ([_short(k) for k in shown_images], [_short(k) for k in shown_refs])
    dest.write(join_key(prefix, "grid.png"), _grid(
        sheet.tiles, labels, {(shown_images.index(a) + 1, shown_refs.index(b) + 1)
                              for a, b in failed if a in shown_images and b in shown_refs}))
    return {
        "html": dest.uri_of(join_key(prefix, "index.html")),
        "png": dest.uri_of(join_key(prefix, "grid.png")),
        "images": len(shown_images),
        "references": len(shown_refs),
        "thumbnails": sum(len(v) for v in sheet.cells.values()) + len(sheet.thumbs),
        "failed_pairs": sum(1 for p in failed if p[0] in shown_images and p[1] in shown_refs),
    }


def _html(m: Manifest, shown_images, shown_refs, thumbs, cells, failed) -> str:
    esc = html.escape

    def img_tag(src: str, alt: str, cls: str) -> str:
        return (f'<img class="{cls}" src="{esc(src)}" alt="{esc(alt)}" loading="eager" '
                'onload="this.dataset.loaded=1" onerror="this.dataset.failed=1">')

    def head(kind: str, key: str, cls: str) -> str:
        tag = img_tag(thumbs[f"{kind}:{key}"], key, cls) if f"{kind}:{key}" in thumbs else ""
        return f'<th class="{cls}">{tag}<div>{esc(key)}</div></th>'

    rows = ["<tr><th></th>" + "".join(head("ref", r, "ref") for r in shown_refs) + "</tr>"]
    for img in shown_images:
        row = [head("in", img, "input")]
        for ref in shown_refs:
            if (img, ref) in failed:
                row.append(f'<td class="failed" title="{esc(failed[(img, ref)])}"><b>failed</b>'
                           f"<div>{esc(failed[(img, ref)][:160])}</div></td>")
            elif cells[(img, ref)]:
                row.append("<td>" + "".join(
                    f'<a href="{esc(href)}">{img_tag(thumb, f"{img} x {ref}", "sample")}</a>'
                    + ("" if score is None else
                       f'<div class="score" title="light-match score">{score:.4f}</div>')
                    for thumb, href, score in cells[(img, ref)]) + "</td>")
            else:
                row.append('<td class="missing">not written yet</td>')
        rows.append("<tr>" + "".join(row) + "</tr>")
    more = ""
    if len(shown_images) < len(m.images) or len(shown_refs) < len(m.references):
        more = (f"<p>Showing {len(shown_images)} of {len(m.images)} images and "
                f"{len(shown_refs)} of {len(m.references)} references.</p>")
    scores_note = ""
    if any(score is not None for pair in cells.values() for _, _, score in pair):
        scores_note = (", the closest lighting first, with its light-match score (LumiNet's "
                       "seed selection; relit-k8s select)")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>relit-k8s {esc(m.run_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: center; }}
th div, td div {{ font-size: 11px; max-width: 170px; overflow-wrap: anywhere; }}
img.sample {{ height: 110px; margin: 2px; }}
img.input {{ height: 110px; }}
img.ref {{ width: 160px; }}
td.failed {{ background: #fde2e2; color: #a40000; max-width: 180px; }}
td.missing {{ color: #999; }}
</style></head><body>
<h1>{esc(m.run_id)}</h1>
<p>{len(m.images)} images x {len(m.references)} references x {m.iterations} iterations,
relighter <code>{esc(m.relighter.name)}</code>. Rows: inputs; columns: references (tone-mapped);
cells: samples, each linking to the full file{scores_note}.</p>
{more}
<table>
{chr(10).join(rows)}
</table>
</body></html>
"""


def _short(key: str, most: int = 20) -> str:
    """A file name cut to fit under a grid tile (``long_na...me.jpg``; the default font has
    ASCII only)."""
    name = key.rsplit("/", 1)[-1]
    return name if len(name) <= most else name[: most - 10] + "..." + name[-7:]


def _grid(tiles: dict[tuple[int, int], np.ndarray], labels: tuple[list[str], list[str]],
          failed: set[tuple[int, int]], size: int = 128) -> bytes:
    """One tile per pair; the first row holds the references and the first column the
    inputs, each with its file name under it; the corner says which is which."""
    row_names, col_names = labels
    band = 14  # pixels of label under each header tile
    sheet = Image.new("RGB", ((len(col_names) + 1) * size, (len(row_names) + 1) * size),
                      (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for (r, c), pixels in tiles.items():
        room = size - 4 - (0 if r and c else band)  # header tiles leave room for the label
        im = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))
        im.thumbnail((size - 4, room), Image.Resampling.LANCZOS)
        sheet.paste(im, (c * size + (size - im.width) // 2,
                         r * size + 2 + (room - im.height) // 2))
    headers = [((0, j + 1), name) for j, name in enumerate(col_names)]
    headers += [((i + 1, 0), name) for i, name in enumerate(row_names)]
    for (r, c), name in headers:
        draw.text((c * size + size // 2, (r + 1) * size - 3), name, fill=(20, 20, 20),
                  font=font, anchor="md")
    draw.text((size // 2, size // 2 - 8), "columns: references", fill=(20, 20, 20), font=font,
              anchor="mm")
    draw.text((size // 2, size // 2 + 8), "rows: inputs", fill=(20, 20, 20), font=font,
              anchor="mm")
    for r, c in failed:
        draw.rectangle([c * size + 2, r * size + 2, (c + 1) * size - 3, (r + 1) * size - 3],
                       outline=(200, 0, 0), width=4)
        draw.line([c * size + 8, r * size + 8, (c + 1) * size - 9, (r + 1) * size - 9],
                  fill=(200, 0, 0), width=3)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


__all__ = ["build"]

"""Every figure of the READMEs is generated from a result file (benchmarks/figures.py): a block
that differs from its JSON, or a result file without its provenance, fails here."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

FIGURES = ROOT / "benchmarks" / "figures.py"


def test_every_figure_block_is_what_its_json_gives():
    done = subprocess.run([sys.executable, str(FIGURES), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_fails_on_a_figure_that_differs_from_its_json(tmp_path, monkeypatch):
    sys.path.insert(0, str(FIGURES.parent))
    try:
        import figures
    finally:
        sys.path.remove(str(FIGURES.parent))
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    start = readme.index("<!-- figures:plan-scale-cpu -->\n") + len(
        "<!-- figures:plan-scale-cpu -->\n")
    end = readme.index("<!-- /figures:plan-scale-cpu -->")
    body = readme[start:end]
    assert "takes" in body and "s and gives a manifest" in body  # a real block, rendered
    edited = readme[:start] + body.replace(" s and gives", "1 s and gives") + readme[end:]
    _, changed = figures.render(edited, ROOT / "benchmarks" / "README.md")
    assert changed == ["plan-scale-cpu"]
    _, unchanged = figures.render(readme, ROOT / "benchmarks" / "README.md")
    assert unchanged == []


def test_every_result_file_says_where_it_came_from():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        for key in ("command", "date", "commit"):
            assert data.get(key), f"{path.name} has no {key}"
        assert data.get("machine") or data.get("device"), f"{path.name}: no machine or card"


def test_no_block_is_left_unrendered_and_every_block_has_a_renderer():
    sys.path.insert(0, str(FIGURES.parent))
    try:
        import figures
    finally:
        sys.path.remove(str(FIGURES.parent))
    names = set()
    for doc in figures.DOCS:
        for m in figures.BLOCK.finditer(doc.read_text()):
            assert m["name"] in figures.BLOCKS, m["name"]
            assert m["body"].strip(), f"{doc.name}: the block {m['name']} is empty"
            names.add(m["name"])
    assert names == set(figures.BLOCKS)  # each renderer is used somewhere

"""LumiNet's seed selection: ``relit-k8s score`` against the original ``seed_selection.py``,
and the scores a ``luminet`` run records for ``relit-k8s select``.

The golden values (``../shared/fixtures/seed_selection/``, read in place; see its FACTS.md)
were made by the original script with a tiny selector, given here in both weight formats: the
seed selection's ``last.pth.tar`` form and the LumiNet tiny checkpoint it was cut from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, require_fixture, shared_fixture
from PIL import Image

from relit_k8s.relighters.luminet.config import IntrinsicsConfig, LumiNetConfig
from relit_k8s.relighters.luminet.intrinsics import IntrinsicsEncoder
from relit_k8s.relighters.luminet.make import TINY, make_luminet, run_options
from relit_k8s.relighters.luminet.selector import Selector, picture, resized

SELECTION = shared_fixture("seed_selection", "RELIT_SEED_SELECTION_FIXTURE")
LUMINET = shared_fixture("luminet", "RELIT_LUMINET_FIXTURE")
TOL = 1e-5  # FACTS.md's suggested tolerance on codes and similarities
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def expected():
    require_fixture(SELECTION)
    return json.loads((SELECTION / "expected.json").read_text())


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    """The tiny model's YAML (its selector has the fixture's widths: 4, [1, 2, 2, 2, 4, 4])."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY.to_yaml()))
    return path


def weights(kind: str) -> Path:
    if kind == "pth.tar":
        return SELECTION / "selector_tiny.pth.tar"
    require_fixture(LUMINET)
    return LUMINET / "luminet_tiny.ckpt"


def test_the_tiny_yaml_gives_the_fixtures_selector_widths(expected, tiny_yaml):
    prior = LumiNetConfig.from_yaml(yaml.safe_load(tiny_yaml.read_text())).prior
    cfg = expected["tiny_config"]
    assert prior.model_channels == cfg["model_channels"]
    assert list(prior.channel_mult) == cfg["channel_mult"]
    assert list(prior.num_blocks) == cfg["num_blocks_list"]


@pytest.mark.parametrize("kind", ["pth.tar", "LumiNet.ckpt"])
def test_light_codes_and_similarities_equal_the_originals(expected, tiny_yaml, kind):
    selector = Selector.load(weights(kind), tiny_yaml)
    relit = expected["relit"]
    pictures = [picture((SELECTION / r["file"]).read_bytes(), r["file"]) for r in relit]
    for r, p in zip(relit, pictures, strict=True):  # what the original's Resize made, exactly
        seen = np.asarray(Image.open(SELECTION / r["resized_256_png"]).convert("RGB"))
        assert np.array_equal(resized(p), seen), r["file"]
    codes = selector.codes(pictures)
    want = torch.tensor([r["light_code"] for r in relit])
    assert (codes - want).abs().max() < TOL
    for ref in expected["references"]:
        # the HDR reference itself (the original cannot open it) and the PNG its loader makes
        sources = [ref["script_input"]] + (["refs/raw_reference.hdr"] if ref["id"] == "hdr"
                                           else [])
        for source in sources:
            code = selector.codes([picture((SELECTION / source).read_bytes(), source)])[0]
            assert (code - torch.tensor(ref["light_code"])).abs().max() < TOL, source
            got = selector.similarities(pictures, code)
            for r, s in zip(relit, got, strict=True):
                assert abs(s - ref["similarity"][r["file"]]) < TOL, (source, r["file"])


def test_the_hdr_reference_is_tone_mapped_to_the_png_the_originals_loader_makes():
    require_fixture(SELECTION)
    hdr = picture((SELECTION / "refs/raw_reference.hdr").read_bytes(), "raw_reference.hdr")
    png = np.asarray(Image.open(SELECTION / "refs/raw_reference_tonemapped.png"))
    assert np.array_equal(hdr, png)


@pytest.mark.parametrize("ref_id", ["ldr", "hdr"])
def test_score_ranks_most_similar_first_as_json_lines(expected, tiny_yaml, ref_id):
    ref = next(r for r in expected["references"] if r["id"] == ref_id)
    reference = SELECTION / ("refs/raw_reference.hdr" if ref_id == "hdr" else ref["file"])
    result = cli("score", str(SELECTION / "relit"), "--reference", str(reference),
                 "--weights", str(weights("pth.tar")), "--config", str(tiny_yaml),
                 "--format", "json", check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert ["relit/" + Path(x["file"]).name for x in lines] == ref["descending_most_similar_first"]
    for x in lines:
        assert abs(x["similarity"] - ref["similarity"]["relit/" + Path(x["file"]).name]) < TOL


def test_the_full_size_selector_has_a_1x1_skip_exactly_where_a_block_changes_width():
    """FACTS.md section 3: the full-size encoder has skips at 64x64_block0 and 8x8_block0
    (where its width changes) that the tiny one has not; built from the widths, never from a
    fixed list."""
    def skips(cfg: IntrinsicsConfig) -> set[str]:
        with torch.device("meta"):
            enc = IntrinsicsEncoder(cfg)
        return {k.removesuffix(".skip.weight") for k in enc.state_dict()
                if k.endswith(".skip.weight") and "_block" in k}

    full, tiny = skips(IntrinsicsConfig()), skips(TINY.prior)
    assert full - tiny == {"enc.64x64_block0", "enc.8x8_block0"}
    assert {"enc.128x128_block0", "enc.16x16_block0"} <= full & tiny  # both change width there
    assert "enc.32x32_block0" not in full | tiny  # neither does there


def test_score_errors_are_clear(tmp_path, tiny_yaml):
    require_fixture(SELECTION)
    full = cli("score", str(SELECTION / "relit"), "--reference",
               str(SELECTION / "refs/ref_ldr.png"), "--weights",
               str(SELECTION / "selector_tiny.pth.tar"))  # tiny weights, full-size widths
    assert full.returncode == 78
    said = " ".join(full.stderr.split())
    assert "do not fit the selector" in said and "--config" in said
    none = cli("score", str(tmp_path / "nothing"), "--reference",
               str(SELECTION / "refs/ref_ldr.png"), "--weights",
               str(SELECTION / "selector_tiny.pth.tar"), "--config", str(tiny_yaml))
    assert none.returncode != 0 and "no image file or folder" in none.stderr


# --- scores in a run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_luminet(tmp_path_factory) -> dict[str, str]:
    return run_options(make_luminet(tmp_path_factory.mktemp("luminet") / "tiny", "tiny"))


def luminet_run(tiny_luminet: dict[str, str], out: Path, *extra: str, iterations: int = 8,
                without_torch: bool = False):
    options = [f for k, v in tiny_luminet.items() for f in ("-O", f"{k}={v}")]
    return cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
               "--img-pattern", "[ar]*", "--ref-pattern", "s[ku]*", "--output", str(out),
               "--relighter", "luminet", *options, "--ddim-steps", "2", "--iterations",
               str(iterations), "--workers", "1", "--no-progress", *extra, timeout=600,
               without_torch=without_torch)


def test_a_luminet_run_scores_its_outputs_and_select_keeps_the_best(tmp_path, tiny_luminet):
    """Done-when of the issue: run 8 seeds, then select the top 2 of every pair; the recorded
    scores equal ``relit-k8s score`` on the written files (a .jpg output included: scored from
    the bytes written)."""
    out = tmp_path / "out"
    # the run's parent plans and checks the luminet files without torch (tests/test_cli.py)
    assert luminet_run(tiny_luminet, out, without_torch=True).returncode == 0
    chosen = [json.loads(x) for x in cli("select", "--output", str(out), "--top", "2",
                                         "--format", "json", check=True).stdout.splitlines()]
    pairs = {(c["image"], c["ref"]) for c in chosen}
    assert pairs == {(i, r) for i in ("astronaut.png", "rocket.jpg")
                     for r in ("sky_sun.hdr", "sunset.hdr")}
    assert len(chosen) == 2 * len(pairs)
    for image, ref in pairs:
        mine = [c for c in chosen if (c["image"], c["ref"]) == (image, ref)]
        assert [c["rank"] for c in mine] == [1, 2]
        folder = Path(mine[0]["file"]).parent
        assert len(list(folder.iterdir())) == 8
        scored = [json.loads(x) for x in cli(
            "score", str(folder), "--reference", str(EXAMPLES / "refs" / ref), "--weights",
            tiny_luminet["checkpoint"], "--config", tiny_luminet["config"], "--format",
            "json", check=True).stdout.splitlines()]
        assert [Path(s["file"]).name for s in scored[:2]] == [Path(c["file"]).name
                                                              for c in mine]
        for c, s in zip(mine, scored, strict=False):
            assert abs(c["similarity"] - s["similarity"]) < TOL
    cli("gallery", "--output", str(out), "--samples", "3", check=True)
    page = next(out.glob("_relit/*/gallery/index.html")).read_text()
    cells = re.findall(r"<td>(.*?)</td>", page)
    assert len(cells) == len(pairs)
    for cell in cells:  # each pair's samples, the closest lighting first, with their scores
        shown = [float(x) for x in re.findall(r'class="score"[^>]*>([0-9.]+)<', cell)]
        assert len(shown) == 3 and shown == sorted(shown, reverse=True)
    best = {round(c["similarity"], 4) for c in chosen if c["rank"] == 1}
    assert {float(re.findall(r'class="score"[^>]*>([0-9.]+)<', c)[0]) for c in cells} == best
    copied = cli("select", "--output", str(out), "--top", "1", "--to", str(tmp_path / "best"),
                 check=True)
    assert "4 outputs copied" in copied.stdout
    assert len([p for p in (tmp_path / "best").rglob("*") if p.is_file()]) == 4


def test_a_rerun_completes_the_records_from_the_files(tmp_path, tiny_luminet):
    """An attempt killed after writing outputs but before a unit's record: the rerun scores
    what it skips from the files, and the record equals the one a whole run writes. (Static
    balance: the rerun runs every shard again; with leases a finished shard is not rerun.)"""
    out = tmp_path / "out"
    assert luminet_run(tiny_luminet, out, "--balance", "static", iterations=3).returncode == 0
    records = sorted((out / "_relit").glob("*/scores/*.json"))
    assert records
    whole = {p.name: json.loads(p.read_text()) for p in records}
    records[0].unlink()  # the unit's record was never written ...
    pair = whole[records[0].name]
    seeds = sorted(pair["scores"])
    folder = next(out.glob(f"{pair['image']}_{pair['ref']}"))
    next(folder.glob(f"{seeds[0]}_*")).unlink()  # ... and one of its outputs neither
    assert luminet_run(tiny_luminet, out, "--balance", "static", iterations=3).returncode == 0
    again = json.loads(records[0].read_text())
    assert again["scores"].keys() == pair["scores"].keys()
    for seed, value in pair["scores"].items():
        assert abs(again["scores"][seed] - value) < TOL


def test_select_without_scores_says_which_relighter_records_them(tmp_path):
    out = tmp_path / "out"
    cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
        "--output", str(out), "--iterations", "1", "--workers", "1", "--no-progress",
        check=True)
    result = cli("select", "--output", str(out), "--top", "2")
    assert result.returncode == 78 and "only a relighter that scores" in result.stderr


def test_scoring_is_off_with_score_false(tmp_path, tiny_luminet):
    out = tmp_path / "out"
    assert luminet_run(tiny_luminet, out, "-O", "score=false", iterations=1).returncode == 0
    assert not list(out.glob("_relit/*/scores/*.json"))
    assert len([p for p in out.rglob("*_*/*") if "_relit" not in p.parts]) == 4



def test_keep_top_deletes_all_but_the_best_of_each_pair_and_a_rerun_makes_none_again(
        tmp_path, tiny_luminet):
    out = tmp_path / "out"
    first = luminet_run(tiny_luminet, out, "--keep-top", "2", "--balance", "static",
                        "--shards", "4", iterations=5)  # 5 seeds in 2 units per pair
    assert first.returncode == 0, first.stderr
    records = {}
    for path in out.glob("_relit/*/scores/*.json"):
        rec = json.loads(path.read_text())
        records.setdefault((rec["image"], rec["ref"]), {}).update(rec["scores"])
    assert len(records) == 4 and all(len(r) == 5 for r in records.values())
    for (image, ref), scores in records.items():
        best = sorted(scores, key=lambda s: -scores[s])[:2]
        kept = sorted(p.name.split("_")[0] for p in (out / f"{image}_{ref}").iterdir())
        assert kept == sorted(best), (image, ref)
    chosen = [json.loads(x) for x in cli("select", "--output", str(out), "--top", "5",
                                         "--format", "json", check=True).stdout.splitlines()]
    assert len(chosen) == 8 and all(Path(c["file"]).exists() for c in chosen)
    again = luminet_run(tiny_luminet, out, "--keep-top", "2", "--balance", "static",
                        "--shards", "4", iterations=5)
    assert again.returncode == 0, again.stderr
    assert "written 0, skipped 20" in " ".join(again.stdout.split())
    assert sum(1 for p in out.rglob("*") if p.is_file() and "_relit" not in p.parts) == 8
    run_id = next(out.glob("_relit/*/manifest.json")).parent.name
    resumed = cli("resume", run_id, "--output", str(out), "--local", "--dry-run")
    assert "nothing" in resumed.stdout.lower(), resumed.stdout


def test_keep_top_is_refused_for_a_relighter_that_does_not_score(tmp_path):
    result = cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
                 "--output", str(tmp_path / "out"), "--iterations", "4", "--keep-top", "2")
    assert result.returncode == 78
    assert "--keep-top needs a relighter that scores" in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()

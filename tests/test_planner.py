from __future__ import annotations

import json
from collections import Counter

import pytest

from relit_k8s.errors import ConfigError, ManifestError, RelighterError
from relit_k8s.manifest import Manifest, pair_seeds
from relit_k8s.planner import (
    PlanSettings,
    describe_left_out,
    layout,
    list_sources,
    plan,
    write_manifest,
)


def settings(tmp_path, **kw) -> PlanSettings:
    base = dict(input=str(tmp_path / "in"), refs=str(tmp_path / "refs"),
                output=str(tmp_path / "out"), iterations=5)
    return PlanSettings(**{**base, **kw})


def make(tmp_path, n_images=3, n_refs=2, **kw) -> Manifest:
    imgs = [f"img{i}.jpg" for i in range(n_images)]
    refs = [f"ref{j}.hdr" for j in range(n_refs)]
    return plan(settings(tmp_path, **kw), imgs, refs)


def test_plan_is_pure_it_opens_no_storage(monkeypatch):
    from relit_k8s import planner

    def no_storage(uri):
        raise AssertionError(f"plan opened {uri}")

    monkeypatch.setattr(planner, "open_storage", no_storage)
    s = PlanSettings(input="s3://bucket/in/", refs="s3://bucket/refs", output="s3://bucket/out")
    m = plan(s, ["a.jpg"], ["r.hdr"])
    assert (m.input, m.refs, m.output) == ("s3://bucket/in", "s3://bucket/refs",
                                           "s3://bucket/out")


def test_seeds_are_deterministic_distinct_and_depend_on_every_input():
    a = pair_seeds(0, "x.jpg", "r.hdr", 50)
    assert a == pair_seeds(0, "x.jpg", "r.hdr", 50)
    assert len(set(a)) == 50
    assert all(0 <= s < 2**32 for s in a)
    assert a[:10] == pair_seeds(0, "x.jpg", "r.hdr", 10)
    assert a != pair_seeds(1, "x.jpg", "r.hdr", 50)
    assert a != pair_seeds(0, "y.jpg", "r.hdr", 50)
    assert a != pair_seeds(0, "x.jpg", "q.hdr", 50)


@pytest.mark.parametrize("n_images,n_refs,iterations,shards", [
    (3, 2, 5, 4), (1, 1, 50, 16), (7, 3, 2, 5), (10, 10, 1, 7), (2, 1, 3, 64)])
def test_every_item_is_in_exactly_one_shard_and_shards_are_balanced(
        tmp_path, n_images, n_refs, iterations, shards):
    m = make(tmp_path, n_images, n_refs, iterations=iterations, shards=shards)
    assert m.shards <= shards
    seen = Counter()
    sizes = []
    for i in range(m.shards):
        units = m.shard_units(i)
        sizes.append(len(units))
        for u in units:
            for it in range(u.start, u.stop):
                seen[(u.image, u.ref, it)] += 1
    assert len(seen) == n_images * n_refs * iterations == m.items
    assert set(seen.values()) == {1}
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1


def test_default_shards_give_several_per_worker(tmp_path):
    m = make(tmp_path, 10, 10, workers=3, balance="static")
    assert m.shards == 12 and m.unit_size == m.iterations
    # few pairs: iterations are split so every worker still gets several shards
    m = make(tmp_path, 1, 1, iterations=50, workers=2, balance="static")
    assert m.shards == 8 and m.unit_size < 50
    # leases (the default): smaller shards, 32 per worker, since the tail is one shard long
    m = make(tmp_path, 10, 10, workers=3)
    assert m.balance == "leases" and m.shards == 96 and m.version == 3
    m = make(tmp_path, 1, 1, iterations=50, workers=2)
    assert (m.shards, m.unit_size) == (50, 1)  # 64 asked: every unit is a shard


def test_a_static_plan_is_the_manifest_older_releases_wrote_and_read(tmp_path):
    """Static plans stay version 2 with no balance field: their checksum, their run id (the
    same command continues the same run) and older workers reading them are unchanged."""
    static = make(tmp_path, balance="static")
    data = json.loads(static.to_json())
    assert data["version"] == 2 and "balance" not in data
    assert Manifest.from_json(static.to_json()) == static.model_copy(
        update={"checksum": data["checksum"]})
    leases = make(tmp_path)
    assert json.loads(leases.to_json())["balance"] == "leases"
    assert Manifest.from_json(leases.to_json()).balance == "leases"
    assert leases.run_id != static.run_id  # a different plan, a different run
    with pytest.raises(ValueError, match="version 3"):
        Manifest.model_validate({**data, "balance": "leases"})


def test_layout_splits_iterations_only_when_pairs_are_too_few():
    assert layout(pairs=100, iterations=50, target_shards=8) == (50, 8)
    assert layout(pairs=2, iterations=50, target_shards=8) == (13, 8)
    assert layout(pairs=1, iterations=2, target_shards=8) == (1, 2)


def test_manifest_is_implicit_and_small_at_scale(tmp_path):
    imgs = [f"dataset/part-{i // 1000:03d}/image-{i:06d}.jpg" for i in range(10_000)]
    refs = [f"hdri/env-{j:04d}.exr" for j in range(1_000)]
    m = plan(settings(tmp_path, iterations=50, shards=2000), imgs, refs)
    data = m.to_json()
    assert m.items == 500_000_000
    assert len(data) < 2_000_000, len(data)
    last = m.shard_units(m.shards - 1)[-1]
    assert (last.image, last.ref, last.stop) == (imgs[-1], refs[-1], 50)


def test_manifest_round_trips_and_detects_tampering(tmp_path):
    m = make(tmp_path)
    data = m.to_json()
    back = Manifest.from_json(data)
    assert back.model_dump(exclude={"checksum"}) == m.model_dump(exclude={"checksum"})
    raw = json.loads(data)
    raw["iterations"] = 500
    with pytest.raises(ManifestError, match="checksum"):
        Manifest.from_json(json.dumps(raw).encode())
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json(data[: len(data) // 2])
    raw = json.loads(data)
    raw["surprise"] = 1
    with pytest.raises(ManifestError, match="invalid"):
        Manifest.from_json(json.dumps(raw).encode())
    raw = json.loads(data)
    raw["version"] = 99
    with pytest.raises(ManifestError, match="version 99"):
        Manifest.from_json(json.dumps(raw).encode())


def test_version_1_manifests_are_still_read(tmp_path):
    m = make(tmp_path, balance="static")
    assert m.version == 2 and m.batch_size is None  # no --batch-size: the relighter chooses
    old = m.model_copy(update={"version": 1, "batch_size": 8})  # as earlier relit-k8s wrote them
    back = Manifest.from_json(old.to_json())
    assert back.version == 1 and back.batch_size == 8


def test_run_id_is_a_dns_label_and_stable(tmp_path):
    a, b = make(tmp_path), make(tmp_path)
    assert a.run_id == b.run_id and a.run_id.startswith("relit-") and len(a.run_id) <= 40
    assert make(tmp_path, iterations=6).run_id != a.run_id
    assert make(tmp_path, run_id="my-run-1").run_id == "my-run-1"
    with pytest.raises(ConfigError, match="run id"):
        make(tmp_path, run_id="Bad_Name")


def test_relighter_options_are_validated_when_planning(tmp_path):
    m = make(tmp_path, options={"rotation": "none"})
    assert m.relighter.options["rotation"] == "none"
    with pytest.raises(RelighterError, match="no option 'ddim_steps'.*rotation"):
        make(tmp_path, options={"ddim_steps": "20"})
    with pytest.raises(RelighterError, match="rotation"):
        make(tmp_path, options={"rotation": "sideways"})
    with pytest.raises(RelighterError, match="unknown relighter 'nope'"):
        make(tmp_path, relighter="nope")


def test_list_sources_applies_patterns_and_formats(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "refs").mkdir()
    for name in ("in/a.JPG", "in/b.png", "in/sub/c.jpeg", "in/skip.txt", "refs/r.hdr",
                 "refs/s.exr", "refs/t.png", "refs/u.jpg"):
        (tmp_path / name).write_bytes(b"x")
    imgs, refs, _ = list_sources(settings(tmp_path))
    assert imgs == ["a.JPG", "b.png", "sub/c.jpeg"]
    assert refs == ["r.hdr", "s.exr", "t.png"]
    imgs, refs, _ = list_sources(settings(tmp_path, img_pattern="[ab]*", ref_formats=("EXR",)))
    assert imgs == ["a.JPG", "b.png"] and refs == ["s.exr"]
    with pytest.raises(ConfigError, match="no input images"):
        list_sources(settings(tmp_path, img_pattern="zzz*"))


def test_files_left_out_by_extension_are_counted_by_extension(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    for name in ("in/a.jpg", "in/b.WEBP", "in/c.tif", "in/d.tiff", "in/notes.txt", "in/e.txt",
                 "in/README", "in/x.psd", "refs/r.hdr", "refs/s.jpg"):
        (tmp_path / name).write_bytes(b"x")
    src = list_sources(settings(tmp_path))
    assert src.images == ["a.jpg", "b.WEBP", "c.tif", "d.tiff"]  # webp and tif by default
    assert src.left_out["input images"] == {"txt": 2, "": 1, "psd": 1}
    assert src.left_out["references"] == {"jpg": 1}
    assert describe_left_out(src.left_out["input images"]) == (
        "4 files with other extensions: .txt x2, (no extension), .psd")
    src = list_sources(settings(tmp_path, img_formats=("jpg",), img_pattern="[a-c]*"))
    assert src.images == ["a.jpg"] and src.left_out["input images"] == {"webp": 1, "tif": 1}
    with pytest.raises(ConfigError, match=r"no input images .* \(left out 2 files with other "
                       r"extensions: \.txt x2\)"):
        list_sources(settings(tmp_path, img_pattern="*.txt"))


def test_outputs_inside_the_input_folder_are_not_inputs(tmp_path):
    (tmp_path / "in" / "out" / "a.jpg_r.hdr").mkdir(parents=True)
    (tmp_path / "in" / "out" / "a.jpg_r.hdr" / "1_a.jpg").write_bytes(b"x")
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "r.hdr").write_bytes(b"x")
    imgs, _, left_out = list_sources(settings(tmp_path, output=str(tmp_path / "in" / "out")))
    assert left_out == {}  # the outputs inside are neither inputs nor left-out files
    assert imgs == ["a.jpg"]


def test_write_manifest_reuses_the_same_plan_and_refuses_another(tmp_path):
    m = make(tmp_path)
    stored, uri = write_manifest(m)
    assert uri.endswith(f"_relit/{m.run_id}/manifest.json")
    again, _ = write_manifest(make(tmp_path))
    assert again.created_at == stored.created_at
    with pytest.raises(ConfigError, match="different plan"):
        write_manifest(make(tmp_path, iterations=9, run_id=m.run_id))


def test_bad_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported formats"):
        settings(tmp_path, img_formats=("gif",))

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, _free_port, photo, png_bytes
from PIL import Image

from relit_k8s import images
from relit_k8s.errors import EXIT_CONFIG, EXIT_OK, EXIT_SIGTERM, EXIT_TEMPORARY
from relit_k8s.manifest import Manifest, RelighterSpec, ShardReport, pair_seeds
from relit_k8s.planner import PlanSettings, list_sources, plan, write_manifest
from relit_k8s.run import RunPaths
from relit_k8s.worker import ShardRunner

WORKER = [sys.executable, "-m", "relit_k8s", "worker"]


def planned(images_dir, refs_dir, out, **kw) -> tuple[Manifest, str]:
    """A written plan; static balance (shard i is index i) unless ``balance`` says otherwise
    (tests/test_balance.py covers leases)."""
    s = PlanSettings(input=str(images_dir), refs=str(refs_dir), output=str(out),
                     **{"iterations": 2, "balance": "static", **kw})
    return write_manifest(plan(s, *list_sources(s)[:2]))


def expected_outputs(m: Manifest) -> set[str]:
    keys = set()
    for image in m.images:
        for ref in m.references:
            for seed in pair_seeds(m.base_seed, image, ref, m.iterations):
                keys.add(f"{image}_{ref}/{seed}_{Manifest.output_name(image)}")
    return keys


def written(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*")
            if p.is_file() and "_relit" not in p.parts}


def run_all(m: Manifest) -> list[ShardReport]:
    runner = ShardRunner(m, device="cpu", report_interval=0.2)
    return [runner.run(i) for i in range(m.shards)]


def worker(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run([*WORKER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_shards_write_every_output_in_the_seed_layout_and_reports(small_dataset):
    images_dir, refs_dir, out = small_dataset
    m, _ = planned(images_dir, refs_dir, out, shards=3)
    reports = run_all(m)
    assert written(out) == expected_outputs(m)
    assert len(expected_outputs(m)) == 2 * 2 * 2
    for key in expected_outputs(m):
        arr = images.decode((out / key).read_bytes(), key).pixels
        assert arr.shape == (24, 32, 3)
    assert sum(r.items_done for r in reports) == m.items
    for i, r in enumerate(reports):
        stored = json.loads((out / RunPaths(m.run_id).report(i)).read_text())
        for field in ("run_id", "index", "state", "items_total", "items_done", "items_skipped",
                      "items_failed", "failures", "started_at", "updated_at", "host", "device"):
            assert field in stored
        assert stored["state"] == "done" and stored["index"] == i
        assert stored["items_total"] == m.shard_items(i) == r.items_done


def test_rerun_writes_nothing_and_reports_everything_skipped(small_dataset):
    images_dir, refs_dir, out = small_dataset
    m, _ = planned(images_dir, refs_dir, out, shards=2)
    run_all(m)
    stamps = {k: (out / k).stat().st_mtime_ns for k in written(out)}
    time.sleep(0.01)
    reports = run_all(m)
    assert {k: (out / k).stat().st_mtime_ns for k in written(out)} == stamps
    assert sum(r.items_skipped for r in reports) == m.items
    assert sum(r.items_done for r in reports) == 0


def test_only_missing_outputs_are_redone(small_dataset):
    images_dir, refs_dir, out = small_dataset
    m, _ = planned(images_dir, refs_dir, out, shards=1)
    run_all(m)
    victim = sorted(written(out))[3]
    before = (out / victim).read_bytes()
    (out / victim).unlink()
    [report] = run_all(m)
    assert report.items_done == 1 and report.items_skipped == m.items - 1
    assert (out / victim).read_bytes() == before  # same seed, same output


def test_a_killed_attempts_unfinished_write_is_removed_when_the_shard_runs_again(small_dataset):
    """A worker killed inside a write leaves a hidden temporary file beside the output it was
    writing; the next attempt of the shard removes it as it writes that output."""
    import socket

    images_dir, refs_dir, out = small_dataset
    m, _ = planned(images_dir, refs_dir, out, shards=1)
    run_all(m)
    victim = out / sorted(written(out))[3]
    victim.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    leftover = victim.with_name(f".{victim.name}.tmp-{int(dead.stdout)}-0123456789ab-"
                                f"{socket.gethostname()}")
    leftover.write_bytes(victim.name.encode()[:3])  # a write cut short
    [report] = run_all(m)
    assert report.items_done == 1 and victim.is_file() and not leftover.exists()
    assert not list(out.rglob(".*.tmp-*"))


@pytest.mark.parametrize("name,data", [
    ("corrupt.jpg", png_bytes(photo(), "JPEG")[:400]),
    ("empty.png", b""),
    ("text.jpg", b"I am not an image\n" * 10),
])
def test_a_bad_image_becomes_recorded_failures_and_the_rest_completes(small_dataset, name, data):
    images_dir, refs_dir, out = small_dataset
    (images_dir / name).write_bytes(data)
    m, uri = planned(images_dir, refs_dir, out, shards=2)
    proc = worker("--manifest", uri, "--index", "0", "--device", "cpu")
    proc1 = worker("--manifest", uri, "--index", "1", "--device", "cpu")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc1.returncode == EXIT_OK, proc1.stderr
    reports = [ShardReport.from_json((out / RunPaths(m.run_id).report(i)).read_bytes())
               for i in range(2)]
    failures = [f for r in reports for f in r.failures]
    assert sum(r.items_failed for r in reports) == len(failures) == 2 * 2  # 2 refs x 2 iters
    assert {f.image for f in failures} == {name}
    assert all(f.kind == "DecodeError" and f.seed is not None and f.error for f in failures)
    good = {k for k in expected_outputs(m) if not k.startswith(name)}
    assert written(out) == good
    assert all(r.state == "done" for r in reports)


def test_an_unreadable_reference_fails_its_items_only(small_dataset):
    images_dir, refs_dir, out = small_dataset
    (refs_dir / "broken.hdr").write_bytes(b"#?RADIANCE\ngarbage")
    m, _ = planned(images_dir, refs_dir, out, shards=1)
    [report] = run_all(m)
    assert report.items_failed == 2 * 2 and report.items_done == m.items - 4
    assert {f.ref for f in report.failures} == {"broken.hdr"}


def test_nested_keys_hdr_inputs_and_odd_names(tmp_path):
    (tmp_path / "in" / "set a").mkdir(parents=True)
    (tmp_path / "refs").mkdir()
    (tmp_path / "in" / "set a" / "ph #1 %?+é.jpg").write_bytes(png_bytes(photo(), "JPEG"))
    (tmp_path / "in" / "scan.exr").write_bytes((EXAMPLES / "refs/studio_softboxes.exr")
                                               .read_bytes())
    (tmp_path / "refs" / "sky.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr").read_bytes())
    m, _ = planned(tmp_path / "in", tmp_path / "refs", tmp_path / "out", iterations=1)
    run_all(m)
    got = written(tmp_path / "out")
    assert got == expected_outputs(m)
    assert any(k.startswith("set a/ph #1 %?+é.jpg_sky.hdr/") and k.endswith("_ph #1 %?+é.jpg")
               for k in got)
    hdr_out = [k for k in got if k.startswith("scan.exr_sky.hdr/")]
    assert len(hdr_out) == 1 and hdr_out[0].endswith("_scan.png")
    assert Image.open(tmp_path / "out" / hdr_out[0]).format == "PNG"


def test_png_outputs_are_written_at_the_png_level_setting(tmp_path):
    from relit_k8s.settings import WorkerSettings

    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    (tmp_path / "in" / "scan.png").write_bytes(png_bytes(photo(48, 64)))
    (tmp_path / "refs" / "sky.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr").read_bytes())
    sizes = {}
    for level in (0, 9):
        m, _ = planned(tmp_path / "in", tmp_path / "refs", tmp_path / f"out{level}",
                       iterations=1, shards=1)
        ShardRunner(m, device="cpu", settings=WorkerSettings(png_level=level)).run(0)
        (out,) = [p for p in (tmp_path / f"out{level}").rglob("*.png") if "_relit" not in p.parts]
        sizes[level] = (out.stat().st_size, np.asarray(Image.open(out)))
    assert sizes[0][0] > sizes[9][0]  # level 0 stores, level 9 compresses
    assert np.array_equal(sizes[0][1], sizes[9][1])  # the same pixels


def test_normal_maps_are_matched_by_path_and_used(small_dataset, tmp_path):
    images_dir, refs_dir, out = small_dataset
    normals = tmp_path / "normals"
    normals.mkdir()
    left = np.zeros((24, 32, 3), np.uint8)
    left[..., 0], left[..., 1], left[..., 2] = 0, 128, 128  # n = (-1, 0, 0): facing left
    (normals / "a.png").write_bytes(png_bytes(left))
    m_est, _ = planned(images_dir, refs_dir, tmp_path / "est", options={"rotation": "none"})
    m_nrm, _ = planned(images_dir, refs_dir, tmp_path / "nrm", normals=str(normals),
                       options={"rotation": "none"})
    run_all(m_est)
    run_all(m_nrm)
    key = next(k for k in expected_outputs(m_nrm) if k.startswith("a.png_studio"))
    est = images.decode((tmp_path / "est" / key).read_bytes(), key).pixels
    nrm = images.decode((tmp_path / "nrm" / key).read_bytes(), key).pixels
    assert np.abs(est - nrm).mean() > 0.01
    # b.jpg has no normal map: the estimate is used, identical to the run without normals
    key_b = next(k for k in expected_outputs(m_nrm) if k.startswith("b.jpg_studio"))
    assert (tmp_path / "est" / key_b).read_bytes() == (tmp_path / "nrm" / key_b).read_bytes()


def test_worker_reads_its_index_from_the_job_environment(small_dataset):
    images_dir, refs_dir, out = small_dataset
    m, uri = planned(images_dir, refs_dir, out, shards=2)
    proc = worker(env={"RELIT_MANIFEST": uri, "JOB_COMPLETION_INDEX": "1"})
    assert proc.returncode == EXIT_OK, proc.stderr
    paths = RunPaths(m.run_id)
    assert (out / paths.report(1)).exists() and not (out / paths.report(0)).exists()


def test_configuration_errors_exit_78(small_dataset, tmp_path):
    images_dir, refs_dir, out = small_dataset
    m, uri = planned(images_dir, refs_dir, out, shards=2)
    cases = {
        "missing manifest": ["--manifest", str(tmp_path / "nope.json"), "--index", "0"],
        "index out of range": ["--manifest", uri, "--index", "2"],
        "no index": ["--manifest", uri],
    }
    tampered = tmp_path / "tampered.json"
    raw = json.loads(Path(uri).read_text())
    raw["iterations"] = 3
    tampered.write_text(json.dumps(raw))
    cases["tampered manifest"] = ["--manifest", str(tampered), "--index", "0"]
    bad = m.model_copy(update={"relighter": RelighterSpec(name="nope"), "run_id": "bad-run"})
    (tmp_path / "bad.json").write_bytes(bad.to_json())
    cases["unknown relighter"] = ["--manifest", str(tmp_path / "bad.json"), "--index", "0"]
    for what, args in cases.items():
        proc = worker(*args)
        assert proc.returncode == EXIT_CONFIG, (what, proc.stderr)
        assert "error:" in proc.stderr, what
    assert "relit-k8s plan" in worker(*cases["missing manifest"]).stderr
    assert "checksum" in worker(*cases["tampered manifest"]).stderr


@pytest.mark.parametrize("variable, value", [("RELIT_REPORT_INTERVAL", "5s"),
                                             ("RELIT_STOP_GRACE", "-1"),
                                             ("RELIT_CALL_OUTPUT_BYTES", "4GiB"),
                                             ("RELIT_WRITE_THREADS", "0"),
                                             ("RELIT_PNG_LEVEL", "10")])
def test_a_bad_worker_setting_is_a_configuration_error(small_dataset, variable, value):
    # a typo in the Job's env must not look like a crash (exit 1) that Kubernetes retries
    images_dir, refs_dir, out = small_dataset
    _, uri = planned(images_dir, refs_dir, out, shards=1)
    proc = worker("--manifest", uri, "--index", "0", env={variable: value})
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert f"{variable}={value!r}" in proc.stderr
    assert not list(out.rglob("*.png")), "nothing is relit with a bad setting"


def test_worker_settings_come_from_relit_variables():
    from relit_k8s.settings import WorkerSettings

    s = WorkerSettings.from_env({"RELIT_REPORT_INTERVAL": "0.5", "RELIT_GPU_SHARE": "2",
                                 "RELIT_REF_CACHE_BYTES": "", "OTHER": "x"})
    assert s.report_interval == 0.5 and s.gpu_share == 2
    assert s.ref_cache_bytes == WorkerSettings().ref_cache_bytes  # empty: the default
    # encode threads: as set, else the usable CPUs between 4 and 32
    assert WorkerSettings.from_env({"RELIT_WRITE_THREADS": "3"}).encode_threads() == 3
    from relit_k8s.settings import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))  # a cgroup limit may lower it
    assert WorkerSettings().encode_threads() == min(32, max(4, usable_cpus()))


def test_unreachable_storage_exits_75(small_dataset, tmp_path):
    images_dir, refs_dir, out = small_dataset
    m, _ = planned(images_dir, refs_dir, out)
    dead = m.model_copy(update={"output": "s3://bucket/out", "run_id": "dead-run"})
    (tmp_path / "dead.json").write_bytes(dead.to_json())
    proc = worker("--manifest", str(tmp_path / "dead.json"), "--index", "0", env={
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1", "RELIT_S3_MAX_ATTEMPTS": "2"})
    assert proc.returncode == EXIT_TEMPORARY, proc.stderr
    assert "unreachable" in proc.stderr


def test_sigterm_saves_the_report_and_exits_143_then_a_rerun_finishes(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    (tmp_path / "in" / "photo.png").write_bytes(png_bytes(photo(24, 32)))
    (tmp_path / "refs" / "sky.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr").read_bytes())
    out = tmp_path / "out"
    m, uri = planned(tmp_path / "in", tmp_path / "refs", out, iterations=120, shards=1,
                     batch_size=4, relighter="plugins_for_tests:PacedRelighter")
    plugins = {"PYTHONPATH": str(Path(__file__).parent)}
    # a quarter of a second per batch of 4: the shard lasts 7.5 s, and is stopped in it
    proc = subprocess.Popen([*WORKER, "--manifest", uri, "--index", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **plugins, "RELIT_TEST_PACE": "0.25"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(written(out)) < 8:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SIGTERM, stderr
    report = ShardReport.from_json((out / RunPaths(m.run_id).report(0)).read_bytes())
    assert report.state == "stopped" and report.exit_code == EXIT_SIGTERM
    assert "stopped" in report.error
    done = written(out)
    assert 8 <= len(done) < m.items and report.items_done == len(done)
    assert not [p for p in out.rglob(".*")], "a temporary file was left behind"
    for key in done:
        images.decode((out / key).read_bytes(), key)  # every file that stands is whole
    proc = worker("--manifest", uri, "--index", "0", "--device", "cpu", timeout=240,
                  env=plugins)  # at full speed
    assert proc.returncode == EXIT_OK, proc.stderr
    report = ShardReport.from_json((out / RunPaths(m.run_id).report(0)).read_bytes())
    assert report.state == "done" and report.items_skipped == len(done)
    assert written(out) == expected_outputs(m)


def test_odd_inputs_and_relighter_errors_fail_only_their_items(small_dataset):
    images_dir, refs_dir, out = small_dataset
    (images_dir / "thin.png").write_bytes(png_bytes(photo(1, 200)))  # one row
    (images_dir / "narrow.png").write_bytes(png_bytes(photo(24, 7)))  # PickyRelighter refuses
    m, _ = planned(images_dir, refs_dir, out, shards=1,
                   relighter="plugins_for_tests:PickyRelighter")
    [report] = run_all(m)
    assert report.state == "done"
    assert {f.image for f in report.failures} == {"narrow.png"}
    assert all(f.kind == "RuntimeError" and "picky" in f.error for f in report.failures)
    assert report.items_failed == 2 * 2 and report.items_done == m.items - 4
    assert any(k.startswith("thin.png_") for k in written(out))


def test_a_normal_map_of_another_size_fails_that_image_only(small_dataset, tmp_path):
    images_dir, refs_dir, out = small_dataset
    normals = tmp_path / "normals"
    normals.mkdir()
    (normals / "a.png").write_bytes(png_bytes(photo(12, 16)))  # the image is 24 x 32
    m, _ = planned(images_dir, refs_dir, out, normals=str(normals), shards=1)
    [report] = run_all(m)
    assert {f.image for f in report.failures} == {"a.png"}
    assert "same size" in report.failures[0].error
    assert report.items_done == m.items - 4


def worker_with_plugin(small_dataset, relighter: str):
    """Shard 0 of a one-shard plan with a relighter of plugins_for_tests, in a worker process:
    (the process, its shard report)."""
    images_dir, refs_dir, out = small_dataset
    m, uri = planned(images_dir, refs_dir, out, shards=1,
                     relighter=f"plugins_for_tests:{relighter}")
    proc = worker("--manifest", uri, "--index", "0", "--device", "cpu",
                  env={"PYTHONPATH": str(Path(__file__).parent)})
    return proc, ShardReport.from_json((out / RunPaths(m.run_id).report(0)).read_bytes())


def test_a_relighter_that_always_fails_ends_the_shard_with_exit_1(small_dataset):
    proc, report = worker_with_plugin(small_dataset, "BrokenRelighter")
    assert proc.returncode == 1, proc.stderr
    assert report.state == "failed" and "broken: always fails" in report.error


def test_out_of_memory_is_temporary_exit_75(small_dataset):
    proc, report = worker_with_plugin(small_dataset, "OOMRelighter")
    assert proc.returncode == EXIT_TEMPORARY, proc.stderr
    assert report.exit_code == EXIT_TEMPORARY


def test_each_reference_is_decoded_once_per_shard(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"i{i}.png").write_bytes(png_bytes(photo(seed=i)))
    for j in range(5):
        (tmp_path / "refs" / f"r{j}.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr")
                                                      .read_bytes())
    m, _ = planned(tmp_path / "in", tmp_path / "refs", tmp_path / "out", iterations=1,
                   shards=1)
    runner = ShardRunner(m, device="cpu")
    decoded: list[str] = []
    real = runner.loader.reference

    def counting(key):
        decoded.append(key)
        return real(key)

    monkeypatch.setattr(runner.loader, "reference", counting)
    runner.run(0)
    assert sorted(decoded) == [f"r{j}.hdr" for j in range(5)]


def test_json_logs_are_one_event_per_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    (tmp_path / "in" / "big.png").write_bytes(png_bytes(photo(192, 256)))
    (tmp_path / "in" / "bad.jpg").write_bytes(b"")
    (tmp_path / "refs" / "sky.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr").read_bytes())
    m, uri = planned(tmp_path / "in", tmp_path / "refs", tmp_path / "out", iterations=120,
                     shards=1, batch_size=4)
    proc = worker("--manifest", uri, "--index", "0", "--device", "cpu", "--log-format", "json",
                  env={"RELIT_REPORT_INTERVAL": "0.2", "RELIT_PROGRESS_SECONDS": "0"})
    assert proc.returncode == EXIT_OK, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert "progress" in kinds and "item_failed" in kinds
    start = events[0]
    assert start["relighter"] == "sh" and start["device"] == "cpu" and start["items"] == 240
    progress = next(e for e in events if e["event"] == "progress")
    assert {"done", "total", "items_per_second", "eta_seconds"} <= set(progress)
    failed = next(e for e in events if e["event"] == "item_failed")
    assert failed["image"] == "bad.jpg" and "empty" in failed["error"]
    end = events[-1]
    assert end["done"] == 120 and end["failed"] == 120
    assert {"decode", "relight", "encode", "write", "model_load"} <= set(end["timings"])
    assert all({"ts", "level", "msg"} <= set(e) for e in events)


def test_reports_carry_timings_rate_and_attempts(small_dataset):
    images_dir, refs_dir, out = small_dataset
    m, _ = planned(images_dir, refs_dir, out, shards=1)
    [first] = run_all(m)
    assert first.attempt == 1 and first.items_per_second > 0
    assert set(first.timings) == {"model_load", "decode", "relight", "encode", "write"}
    assert all(v >= 0 for v in first.timings.values()) and first.timings["relight"] > 0
    [second] = run_all(m)
    assert second.attempt == 2


def test_batches_follow_the_plan_or_else_the_relighters_choice(small_dataset):
    from plugins_for_tests import CountingRelighter

    images_dir, refs_dir, out = small_dataset
    m, _ = planned(images_dir, refs_dir, out, iterations=7, shards=1,
                   relighter="plugins_for_tests:CountingRelighter")
    assert m.batch_size is None  # no --batch-size: the relighter chooses on its device
    CountingRelighter.calls.clear()
    [report] = run_all(m)
    assert report.items_done == m.items
    assert CountingRelighter.calls == [3, 3, 1] * m.pairs
    m2, _ = planned(images_dir, refs_dir, out / "two", iterations=7, shards=1, batch_size=5,
                    relighter="plugins_for_tests:CountingRelighter")
    CountingRelighter.calls.clear()
    run_all(m2)
    assert CountingRelighter.calls == [5, 2] * m2.pairs


def test_the_plans_batch_size_reaches_a_relighter_that_batches_itself(tmp_path):
    from relit_k8s.modelkit import make_model

    model = make_model(tmp_path / "m", "tiny")
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(photo(24, 32)))
    (tmp_path / "refs" / "sky.hdr").write_bytes((EXAMPLES / "refs/sky_sun.hdr").read_bytes())
    options = {"model": str(model), "ddim_steps": 2, "resolution": 32}
    m, _ = planned(tmp_path / "in", tmp_path / "refs", tmp_path / "out", batch_size=3,
                   relighter="diffusion", options=options)
    runner = ShardRunner(m, device="cpu")
    assert runner.relighter.batch_size == 3 and runner.batch_size == 3
    m2, _ = planned(tmp_path / "in", tmp_path / "refs", tmp_path / "out2",
                    relighter="diffusion", options={**options, "batch_size": 2})
    assert ShardRunner(m2, device="cpu").relighter.batch_size == 2  # its own option stays


def test_calls_for_very_large_outputs_take_fewer_seeds(small_dataset, monkeypatch):
    from plugins_for_tests import CountingRelighter

    images_dir, refs_dir, out = small_dataset  # 24 x 32 images: 9,216 bytes per output
    monkeypatch.setenv("RELIT_CALL_OUTPUT_BYTES", str(2 * 9216))
    monkeypatch.setenv("RELIT_WRITE_BACKLOG_BYTES", "9216")  # one queued write at a time
    m, _ = planned(images_dir, refs_dir, out, iterations=5, shards=1,
                   relighter="plugins_for_tests:CountingRelighter")
    CountingRelighter.calls.clear()
    [report] = run_all(m)
    assert report.items_done == m.items and written(out) == expected_outputs(m)
    assert CountingRelighter.calls == [2, 2, 1] * m.pairs

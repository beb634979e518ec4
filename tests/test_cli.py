"""The command line as users run it: the installed `relit-k8s` script in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, as_terminal_foreground, cli, photo, png_bytes

from relit_k8s import local
from relit_k8s.errors import ConfigError
from relit_k8s.local import plan_slots

EXAMPLE_ARGS = ["--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs")]


def outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and "_relit" not in p.parts)


def test_run_on_the_examples_then_again_then_status(tmp_path):
    """With static balance a second run lists every pair's outputs and skips them (with leases,
    tests/test_balance.py, a finished run is finished: nothing is listed again)."""
    out = tmp_path / "out"
    first = cli("run", *EXAMPLE_ARGS, "--output", str(out), "--iterations", "2",
                "--device", "cpu", "--balance", "static", check=True)
    assert "relighting" in first.stderr and "24/24" in first.stderr  # the progress bar
    assert "written 24, skipped 0 (already there), failed 0, of 24" in first.stdout
    files = outputs(out)
    assert len(files) == 24
    assert {p.parent.name for p in files} == {
        f"{i}_{r}" for i in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
        for r in ("sky_sun.hdr", "studio_softboxes.exr", "sunset.hdr")}
    assert all(re.fullmatch(r"\d+_" + re.escape(p.parent.name.split("_")[0]), p.name)
               for p in files)
    stamps = {p: p.stat().st_mtime_ns for p in files}

    again = cli("run", *EXAMPLE_ARGS, "--output", str(out), "--iterations", "2",
                "--device", "cpu", "--balance", "static", check=True)
    assert "written 0, skipped 24" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in outputs(out)} == stamps

    table = cli("status", "--output", str(out), check=True).stdout
    assert "done" in table and "24 skipped" in table
    status = json.loads(cli("status", "--output", str(out), "-o", "json", check=True).stdout)
    for key in ("run_id", "items_total", "items_done", "items_skipped", "items_failed",
                "shards"):
        assert key in status
    assert status["items_total"] == 24 and status["items_skipped"] == 24
    assert len(status["shards"]) == 4 and all(s["state"] == "done" for s in status["shards"])
    by_id = json.loads(cli("status", status["run_id"], "--output", str(out), "-o", "json",
                           check=True).stdout)
    assert by_id["run_id"] == status["run_id"]


def test_failed_items_are_counted_and_strict_turns_them_into_exit_1(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(png_bytes(photo()))
    (images / "zero.jpg").write_bytes(b"")
    args = ["run", "--input", str(images), "--refs", str(EXAMPLES / "refs"), "--output",
            str(tmp_path / "out"), "--iterations", "1", "--device", "cpu", "--no-progress"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "written 3, skipped 0 (already there), failed 3, of 6" in result.stdout
    assert "relit-k8s status" in result.stdout
    assert cli(*args, "--strict").returncode == 1
    narrow = cli(*args, env={"COLUMNS": "40"})  # the command to copy is never wrapped
    assert re.search(r"^  relit-k8s status relit-\w+ --output " + re.escape(str(tmp_path / "out"))
                     + "$", narrow.stdout, re.M), narrow.stdout
    status = cli("status", "--output", str(tmp_path / "out"), check=True).stdout
    assert "zero.jpg" in status and "empty file" in status


def test_printed_commands_paste_into_a_shell_with_odd_paths(tmp_path):
    """A path with spaces and non-ASCII letters: each command relit-k8s prints to copy is
    quoted, and pasted into a shell it names the same output (and runs)."""
    import shlex

    images = tmp_path / "my in"
    images.mkdir()
    (images / "ok.png").write_bytes(png_bytes(photo()))
    (images / "zero.jpg").write_bytes(b"")
    out = tmp_path / "my out" / "öut put"
    args = ["run", "--input", str(images), "--refs", str(EXAMPLES / "refs"), "--ref-pattern",
            "sky*", "--output", str(out), "--iterations", "1", "--device", "cpu",
            "--no-progress"]
    first = cli(*args, check=True).stdout
    again = cli(*args, check=True).stdout
    printed = [line.strip() for text in (first, again) for line in text.splitlines()
               if line.startswith("  relit-k8s ")]
    assert {shlex.split(line)[1] for line in printed} == {"status", "resume"}, printed
    for line in printed:
        argv = shlex.split(line)
        assert argv[argv.index("--output") + 1] == str(out)
        pasted = subprocess.run(["bash", "-c", line.replace("relit-k8s", shlex.quote(
            str(Path(sys.executable).parent / "relit-k8s")), 1)], capture_output=True,
            text=True, timeout=120)
        assert pasted.returncode == 0, (line, pasted.stderr)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = cli("run", *EXAMPLE_ARGS, "--output", str(out), "--iterations", "3", "--dry-run",
                 check=True)
    text = result.stdout
    for expected in ("images", "references", "pairs", "outputs", "36", "relighter", "shards",
                     "jpg jpeg png bmp webp tif tiff exr hdr"):
        assert expected in text, expected
    assert "left out" not in result.stderr  # the examples hold images only
    assert not out.exists()
    assert cli("plan", *EXAMPLE_ARGS, "--output", str(out), "--dry-run", check=True)
    assert not out.exists()


def test_planning_and_the_parent_of_a_cpu_run_never_import_torch(tmp_path):
    """A plan resolves the relighter and validates its options, and the parent of a run on the
    CPU relights nothing, without torch (its import is 1.4 s of CPU a command): here they run
    where importing torch fails. The workers the run starts import it as usual."""
    out = tmp_path / "out"
    plan = cli("plan", *EXAMPLE_ARGS, "--output", str(tmp_path / "plan"), "-O", "window=none",
               without_torch=True, check=True)
    assert "manifest:" in plan.stdout
    bad = cli("plan", *EXAMPLE_ARGS, "--output", str(tmp_path / "bad"), "-O", "dome=-1",
              without_torch=True)
    assert bad.returncode == 78 and "dome" in bad.stderr and "torch" not in bad.stderr
    run = cli("run", *EXAMPLE_ARGS, "--output", str(out), "--iterations", "1",
              without_torch=True, check=True)
    assert "written 12, skipped 0 (already there), failed 0, of 12" in run.stdout
    assert len(outputs(out)) == 12
    # the check is real: a command that relights in its own process fails there
    manifest = plan.stdout.split("manifest: ", 1)[1].split()[0]
    worker = cli("worker", "--manifest", manifest, "--index", "0", "--device", "cpu",
                 without_torch=True)
    assert worker.returncode != 0 and "import of torch halted" in worker.stderr


def test_plans_report_the_files_they_leave_out(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(png_bytes(photo()))
    (images / "ok.webp").write_bytes(png_bytes(photo()))  # read by default since 0.2
    for name in ("notes.txt", "more.txt", "layers.psd"):
        (images / name).write_text("x")
    args = ["--input", str(images), "--refs", str(EXAMPLES / "refs"),
            "--output", str(tmp_path / "out"), "--dry-run"]
    line = ("input images: left out 3 files with other extensions: .txt x2, .psd "
            "(choose with --img-formats)")
    for command in ("plan", "run"):  # on stderr, so that submit -o yaml prints plain YAML
        result = cli(command, *args, check=True)
        assert line in " ".join(result.stderr.split()), command
        assert "images" in result.stdout and "left out" not in result.stdout
    plan = cli("plan", *args, "--img-formats", "png", check=True)
    assert "left out 4 files" in plan.stderr and ".webp" in plan.stderr
    assert not (tmp_path / "out").exists()


def test_option_errors_name_the_options(tmp_path):
    result = cli("run", *EXAMPLE_ARGS, "--output", str(tmp_path / "o"), "--ddim-steps", "20")
    assert result.returncode == 78
    assert "no option 'ddim_steps'" in result.stderr and "rotation" in result.stderr
    result = cli("run", *EXAMPLE_ARGS, "--output", str(tmp_path / "o"), "-O", "rotation")
    assert result.returncode == 78 and "KEY=VALUE" in result.stderr
    result = cli("run", *EXAMPLE_ARGS, "--output", str(tmp_path / "o"), "--relighter", "nope")
    assert result.returncode == 78 and "available" in result.stderr
    result = cli("run", "--input", str(tmp_path), "--refs", str(EXAMPLES / "refs"),
                 "--output", str(tmp_path / "o"))
    assert result.returncode == 78 and "no input images" in result.stderr
    assert not (tmp_path / "o").exists()


def test_options_reach_the_relighter(tmp_path):
    base = ["run", *EXAMPLE_ARGS, "--img-pattern", "rocket*", "--ref-pattern", "studio*",
            "--iterations", "2", "--device", "cpu", "--no-progress"]
    cli(*base, "--output", str(tmp_path / "a"), "-O", "rotation=none", check=True)
    files = outputs(tmp_path / "a")
    assert len(files) == 2
    assert files[0].read_bytes() == files[1].read_bytes()  # no rotation: seeds look the same
    cli(*base, "--output", str(tmp_path / "b"), check=True)
    files = outputs(tmp_path / "b")
    assert files[0].read_bytes() != files[1].read_bytes()


def test_help_lists_the_commands_and_the_shared_flags():
    text = cli("--help", check=True).stdout
    for command in ("plan", "run", "worker", "status", "relighters"):
        assert command in text
    text = cli("run", "--help", check=True).stdout
    for flag in ("--input", "--refs", "--output", "--iterations", "--seed", "--img-pattern",
                 "--ref-pattern", "--img-formats", "--ref-formats", "--relighter", "--option",
                 "--ddim-steps", "--new-decoder", "--shards", "--dry-run", "--gpus", "--workers",
                 "--device", "--strict"):
        assert flag in text, flag


def test_the_third_party_plugin_runs_through_its_entry_point(tmp_path):
    result = cli("run", *EXAMPLE_ARGS, "--output", str(tmp_path / "o"), "--relighter", "tiny",
                 "-O", "strength=0.8", "--iterations", "1", "--device", "cpu", "--no-progress",
                 check=True)
    assert "written 12" in result.stdout
    manifest = next((tmp_path / "o" / "_relit").glob("*/manifest.json"))
    spec = json.loads(manifest.read_text())["relighter"]
    assert spec["name"] == "tiny" and spec["options"]["strength"] == 0.8


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_cleanly_and_the_same_command_continues(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "photo.png").write_bytes(png_bytes(photo(24, 32)))
    out = tmp_path / "out"
    args = ["run", "--input", str(images), "--refs", str(EXAMPLES / "refs"), "--output",
            str(out), "--iterations", "80", "--device", "cpu", "--workers", "2",
            "--batch-size", "2", "--shards", "2",  # large shards: the stop lands in them
            "--relighter", "plugins_for_tests:PacedRelighter"]
    plugins = {"PYTHONPATH": str(Path(__file__).parent)}
    exe = str(Path(sys.executable).parent / "relit-k8s")
    # A terminal sends Ctrl+C's SIGINT to the whole foreground process group. A tenth of a
    # second per batch of 2: a shard of 120 items lasts 6 s, and the run is stopped in them.
    proc = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=as_terminal_foreground,
                            env={**os.environ, **plugins, "RELIT_TEST_PACE": "0.1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(outputs(out)) < 10:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    assert stderr.count("stopping") == 1, stderr  # one Ctrl+C, one message
    assert "died" not in stderr and "did not finish" not in stderr
    done = len(outputs(out))
    assert 10 <= done < 240
    assert not list(out.rglob(".*")), "a temporary file was left behind"
    status = json.loads(cli("status", "--output", str(out), "-o", "json", check=True).stdout)
    assert status["state"] == "stopped"  # not failed: nothing went wrong
    stopped = [s for s in status["shards"] if s.get("exit_code") == 143]
    assert stopped and all(s["state"] == "stopped" for s in stopped)
    assert not [s for s in status["shards"] if s["state"] in ("running", "failed")]
    assert status["items_done"] == done
    result = cli(*args, "--no-progress", env=plugins, check=True)  # at full speed
    assert "failed 0, of 240" in result.stdout and len(outputs(out)) == 240
    # the items of the stopped shards written before the stop are skipped, not redone
    status = json.loads(cli("status", "--output", str(out), "-o", "json", check=True).stdout)
    assert status["items_done"] + status["items_skipped"] == 240
    assert status["items_done"] == 240 - status["items_skipped"] <= 240 - 10


def test_device_flags_are_checked():
    assert [s.device for s in plan_slots("cpu", None, 3)] == ["cpu"] * 3
    with pytest.raises(ConfigError, match="--gpus needs --device cuda"):
        plan_slots("cpu", [0], None)
    with pytest.raises(ConfigError, match="unknown --device"):
        plan_slots("tpu", None, None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            plan_slots("cuda", None, None)


def test_cpu_workers_share_the_usable_cpus_and_keep_to_omp_num_threads(monkeypatch):
    from relit_k8s import settings

    monkeypatch.setattr(settings, "usable_cpus", lambda: 8)  # a pod's limit, or the machine
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert [s.threads for s in plan_slots("cpu", None, 3)] == [2, 2, 2]
    assert [s.threads for s in plan_slots("cpu", None, 16)] == [1] * 16
    assert settings.cpu_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's cap is kept
    assert [s.threads for s in plan_slots("cpu", None, 2)] == [1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a number: ignored
    assert settings.cpu_threads(2) == 4


def test_workers_sharing_a_gpu_know_how_many_share_it(monkeypatch):
    # no GPU here: torch is told there are two (plan_slots only counts them)
    monkeypatch.setattr(local, "cuda_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    slots = plan_slots("cuda", None, 3)
    assert [(s.visible_gpu, s.gpu_share) for s in slots] == [("0", 2), ("1", 1), ("0", 2)]
    assert [s.gpu_share for s in plan_slots("cuda", [1], 2)] == [2, 2]
    assert [s.gpu_share for s in plan_slots("cuda", None, None)] == [1, 1]


def test_a_cpu_only_torch_sees_no_gpu_without_being_asked(monkeypatch):
    """A CPU build of torch (version '+cpu') cannot see a GPU: known from its version, so the
    parent of a run does not import torch to ask; any other build is asked."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(1) or True)
    monkeypatch.setattr(local.metadata, "version", lambda name: "2.13.0+cpu")
    assert local.cuda_visible() is False and asked == []
    assert plan_slots(None, None, None)[0].device == "cpu"
    monkeypatch.setattr(local.metadata, "version", lambda name: "2.13.0")  # a CUDA build
    assert local.cuda_visible() is True and asked == [1]


def test_output_equal_to_input_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(photo()))
    result = cli("run", "--input", str(images), "--refs", str(EXAMPLES / "refs"), "--output",
                 str(images), "--iterations", "1")
    assert result.returncode == 78 and "same folder as --input" in result.stderr
    assert [p.name for p in images.iterdir()] == ["a.png"]


def test_sigterm_to_run_stops_its_workers_and_exits_143(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "big.png").write_bytes(png_bytes(photo(384, 512)))
    out = tmp_path / "out"
    exe = str(Path(sys.executable).parent / "relit-k8s")
    proc = subprocess.Popen([exe, "run", "--input", str(images), "--refs",
                             str(EXAMPLES / "refs"), "--output", str(out), "--iterations", "80",
                             "--device", "cpu", "--workers", "2", "--batch-size", "2",
                             "--no-progress", "--shards", "2"],  # the stop lands in a shard
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(outputs(out)) < 10:
        time.sleep(0.1)
    proc.terminate()  # SIGTERM to the parent only, as a scheduler or systemd would send it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    settled = len(outputs(out))
    time.sleep(3)
    assert len(outputs(out)) == settled, "a worker outlived the run"
    status = json.loads(cli("status", "--output", str(out), "-o", "json", check=True).stdout)
    assert status["state"] == "stopped" and status["items_done"] == settled


def test_status_flags_stalled_shards_and_groups_failures_by_reason(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(png_bytes(photo()))
    for name in ("e1.png", "e2.jpg"):
        (images / name).write_bytes(b"")
    out = tmp_path / "out"
    cli("run", "--input", str(images), "--refs", str(EXAMPLES / "refs"), "--output", str(out),
        "--iterations", "1", "--device", "cpu", "--no-progress", "--shards", "3", check=True)
    status = json.loads(cli("status", "--output", str(out), "-o", "json", check=True).stdout)
    [reason] = status["failure_reasons"]
    assert reason["count"] == 6 and reason["reason"] == "empty file (0 bytes)"
    assert sorted(reason["examples"]) == ["e1.png", "e2.jpg"]
    assert status["timings"]["relight"] > 0
    # a shard whose pod vanished: its report says running, its heartbeat is old
    report_path = next(out.glob("_relit/*/shards/0.json"))
    report = json.loads(report_path.read_text())
    report.update(state="running", updated_at="2026-01-01T00:00:00Z", finished_at=None)
    report_path.write_text(json.dumps(report))
    status = json.loads(cli("status", "--output", str(out), "-o", "json", "--stall-after",
                            "60", check=True).stdout)
    assert status["stalled_shards"] == [0] and status["state"] == "running"
    table = cli("status", "--output", str(out), check=True).stdout
    assert "stalled" in table and "failures by reason" in table and "empty file" in table
    dry = cli("run", "--input", str(images), "--refs", str(EXAMPLES / "refs"), "--output",
              str(tmp_path / "o2"), "--dry-run", check=True).stdout
    assert "estimated size" in dry


COMMANDS = ["plan", "run", "worker", "status", "submit", "logs", "scale", "cancel", "resume",
            "gallery", "make-model", "relighters"]


def test_help_reads_well_every_option_explained_no_type_tags_brackets_kept():
    import typer.main

    from relit_k8s.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"relit-k8s {name} {param.opts[0]} has no help text"
    pages = {name: cli(*([name] if name else []), "--help", env={"COLUMNS": "250"},
                       check=True).stdout
             for name in ["", *COMMANDS]}
    for name, page in pages.items():
        for tag in ("<bool>", "<str>", "<int", "<float", "<list", "[x>="):
            assert tag not in page, f"relit-k8s {name} --help shows {tag!r}"
    # at 80 columns nothing is cut: every option name and every word whole
    for name in COMMANDS:
        narrow = cli(name, "--help", env={"COLUMNS": "80"}, check=True).stdout
        assert "…" not in narrow, f"relit-k8s {name} --help cuts a word at 80 columns"
        assert max(map(len, narrow.splitlines())) <= 80
        options = [p for p in group.commands[name].params if p.param_type_name == "option"]
        for opt in options:
            assert opt.opts[0] in narrow and not opt.secondary_opts, (name, opt.opts)
    # square brackets written in help texts survive (rich markup would eat them)
    from relit_k8s.planner import DEFAULT_IMG_FORMATS

    assert f"[default: all it reads, {' '.join(DEFAULT_IMG_FORMATS)}]" in pages["run"]
    assert "[default: next to the run, <output>/_relit/<run>/gallery/]" in pages["gallery"]
    assert ("Number of shards [default: 32 per worker with leases, 4 with static balance]."
            in pages["plan"])
    assert "[default: the run's]" in pages["resume"]
    assert "as a new Job when the run was submitted" in pages["resume"]


def test_error_messages_keep_their_square_brackets(tmp_path):
    result = cli("run", *EXAMPLE_ARGS, "--output", str(tmp_path / "o"), "--img-formats", "xyz",
                 env={"COLUMNS": "250"})
    assert result.returncode == 78
    assert "--img-formats: unsupported formats ['xyz']; supported: ['bmp'," in result.stderr


def test_a_run_that_cannot_start_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    cases = {
        "no model": ["--relighter", "diffusion"],
        "no model directory": ["--relighter", "diffusion", "-O", f"model={tmp_path / 'nope'}"],
    }
    for what, extra in cases.items():
        result = cli("run", *EXAMPLE_ARGS, "--output", str(out), "--iterations", "1", *extra)
        assert result.returncode == 78, (what, result.stderr)
        assert not out.exists(), f"{what}: something was written"
    assert "diffusion needs a model" in cli("run", *EXAMPLE_ARGS, "--output", str(out),
                                            "--relighter", "diffusion").stderr
    # without the diffusion extra (a stand-in package that fails to import, as a missing one)
    fake = tmp_path / "site"
    (fake / "diffusers").mkdir(parents=True)
    (fake / "diffusers" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'diffusers'\")\n")
    env = {"PYTHONPATH": str(fake), "COLUMNS": "250"}
    model = tmp_path / "model"
    model.mkdir()
    result = cli("run", *EXAMPLE_ARGS, "--output", str(out), "--relighter", "diffusion",
                 "-O", f"model={model}", env=env)
    assert result.returncode == 78 and "pip install 'relit-k8s[diffusion]'" in result.stderr
    assert not out.exists()
    made = cli("make-model", str(tmp_path / "m"), env=env)
    assert made.returncode == 78 and "Traceback" not in made.stderr
    assert made.stderr.strip().splitlines() == [
        "error: make-model needs diffusers: pip install 'relit-k8s[diffusion]'"]


def test_missing_inputs_and_unwritable_outputs_are_configuration_errors(tmp_path):
    missing = cli("run", "--input", str(tmp_path / "nope"), "--refs", str(EXAMPLES / "refs"),
                  "--output", str(tmp_path / "o"), env={"COLUMNS": "250"})
    assert missing.returncode == 78 and "does not exist" in missing.stderr
    a_file = cli("run", "--input", str(EXAMPLES / "images" / "rocket.jpg"), "--refs",
                 str(EXAMPLES / "refs"), "--output", str(tmp_path / "o"), env={"COLUMNS": "250"})
    assert a_file.returncode == 78 and "is a file" in a_file.stderr
    (tmp_path / "taken").write_text("a file where the output folder should be")
    blocked = cli("run", *EXAMPLE_ARGS, "--output", str(tmp_path / "taken" / "out"),
                  "--iterations", "1", env={"COLUMNS": "250"})
    assert blocked.returncode == 78, blocked.stderr
    assert "choose a writable --output" in blocked.stderr


def test_cluster_commands_on_a_local_run_say_it_was_local_and_resume_takes_the_newest(
        tmp_path):
    out = tmp_path / "out"
    cli("run", *EXAMPLE_ARGS, "--output", str(out), "--iterations", "1", "--device", "cpu",
        "--no-progress", check=True)
    run_id = json.loads(cli("status", "--output", str(out), "-o", "json",
                            check=True).stdout)["run_id"]
    for command in ("logs", "cancel"):
        result = cli(command, run_id, "--output", str(out), env={"COLUMNS": "250"})
        assert result.returncode == 78, result.stderr
        assert f"run {run_id} ran on this machine (relit-k8s run)" in result.stderr
        assert "Kubernetes configuration" not in result.stderr
    resumed = cli("resume", "--output", str(out), check=True)
    assert f"run {run_id}: every output is written; nothing to resume" in resumed.stdout


def test_an_output_made_differently_is_refused_with_what_differs(tmp_path):
    out = ["--output", str(tmp_path / "out")]
    cli("plan", *EXAMPLE_ARGS, *out, check=True)
    for command in (["run", "--dry-run"], ["plan"], ["run", "--device", "cpu"]):
        refused = cli(*command, *EXAMPLE_ARGS, *out, "-O", "rotation=none")
        assert refused.returncode == 78, refused.stderr
        text = " ".join(refused.stderr.split())
        assert 'made differently' in text and 'rotation "seed" -> "none"' in text
        assert "--allow-mixed-output" in text
    assert len(list((tmp_path / "out" / "_relit").glob("relit-*"))) == 1  # nothing written
    cli("plan", *EXAMPLE_ARGS, *out, "-O", "rotation=none", "--allow-mixed-output", check=True)
    assert len(list((tmp_path / "out" / "_relit").glob("relit-*"))) == 2

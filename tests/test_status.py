"""What ``status`` says about a run between attempts: stopped, starting again, still going."""

from __future__ import annotations

from datetime import timedelta

from relit_k8s.clock import now
from relit_k8s.manifest import ShardReport
from relit_k8s.planner import PlanSettings, plan, write_run
from relit_k8s.run import Run
from relit_k8s.status import JobSummary, collect, record_launch


def a_run(tmp_path, states: list[str], age_seconds: float = 30.0):
    settings = PlanSettings(input=str(tmp_path / "in"), refs=str(tmp_path / "refs"),
                            output=str(tmp_path / "out"), iterations=2, shards=len(states))
    run = write_run(plan(settings, ["a.jpg", "b.jpg"], ["r.hdr"]))
    then = now() - timedelta(seconds=age_seconds)
    for index, state in enumerate(states):
        report = ShardReport(run_id=run.run_id, index=index, state=state,
                             items_total=run.manifest.shard_items(index), started_at=then,
                             updated_at=then, host="h", device="cpu", relighter="sh",
                             exit_code=143 if state == "stopped" else None)
        run.output.write(run.paths.report(index), report.model_dump_json().encode())
    return run


def test_a_stopped_run_is_stopped_not_failed_and_has_ended(tmp_path):
    status = collect(a_run(tmp_path, ["done", "stopped"]))
    assert status.state == "stopped" and not status.going
    assert collect(a_run(tmp_path / "2", ["stopped", "failed"])).state == "failed"
    assert collect(a_run(tmp_path / "3", ["done", "done"])).state == "done"


def test_a_rerun_shows_as_starting_until_its_workers_report(tmp_path):
    run = a_run(tmp_path, ["done", "stopped"])
    record_launch(run, workers=2)  # relit-k8s run, again: its workers are loading
    status = collect(run)
    assert status.state == "starting" and status.going  # status --watch waits for them
    assert status.launched_at is not None
    # a launch whose workers never wrote a report is over after --stall-after seconds
    assert collect(run, stall_after=0.0).state == "stopped"
    # once a report is newer than the launch, the reports tell the state again
    fresh = a_run(tmp_path / "fresh", ["done", "stopped"], age_seconds=30)
    record_launch(fresh, workers=1)
    report = fresh.read_report(1).model_copy(update={"state": "running", "updated_at": now()})
    fresh.output.write(fresh.paths.report(1), report.model_dump_json().encode())
    assert collect(fresh).state == "running"


def test_a_done_run_is_never_starting_and_a_live_job_keeps_watch_going(tmp_path):
    run = a_run(tmp_path, ["done", "done"])
    record_launch(run, workers=1)  # a rerun of a finished run has nothing to do
    status = collect(run)
    assert status.state == "done" and not status.going
    status.job = JobSummary(name="relit-x", state="running", active=1)
    assert status.going  # pods still exiting: the Job has not ended
    status.job = JobSummary(name="relit-x", state="complete")
    assert not status.going


def test_watch_waits_for_a_starting_attempt_and_leaves_an_ended_run(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "relit-k8s")
    run = a_run(tmp_path, ["done", "stopped"])
    out = str(tmp_path / "out")
    ended = subprocess.run([exe, "status", "--output", out, "--watch", "--no-cluster"],
                           capture_output=True, text=True, timeout=60)
    assert ended.returncode == 0 and "stopped" in ended.stdout
    record_launch(run, workers=1)
    watch = subprocess.Popen([exe, "status", "--output", out, "--watch", "--no-cluster",
                              "--interval", "0.5", "--stall-after", "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert watch.poll() is None  # waiting for the new attempt's workers
    report = run.read_report(1).model_copy(update={"state": "done", "updated_at": now(),
                                                   "exit_code": 0})
    run.output.write(run.paths.report(1), report.model_dump_json().encode())
    stdout, _ = watch.communicate(timeout=60)  # they reported: the run is done, watch ends
    assert watch.returncode == 0 and "done" in stdout


# --- summaries of finished reports: status in about one read per worker ----------------------
def test_workers_finishing_shards_at_once_fold_every_report_and_status_reads_no_report(
        finished_examples):
    # a real run of 2 processes (they claimed and finished 12 shards at once, each folding
    # its finished reports into its own summary): conftest.examples_run
    run = Run.load(str(finished_examples))
    summaries = run.output.list_names(run.paths.folded)
    assert len(summaries) == 2  # one per worker process: no two writers share an object
    read = run.reports()
    assert read.folded == 12 and read.read == 0 and not read.notes
    one_by_one = {i: run.read_report(i) for i in range(12)}
    assert read.by_index == one_by_one  # the same reports, field for field
    status = collect(run)
    assert status.items_done == run.manifest.items and status.state == "done"


def test_a_corrupt_or_missing_summary_makes_status_read_the_reports_and_say_so(
        finished_examples):
    run = Run.load(str(finished_examples))
    before = collect(run).model_dump(exclude={"notes"})
    first, second = sorted(run.output.list_names(run.paths.folded))
    run.output.write(f"{run.paths.folded}/{first}", b"{not json")
    status = collect(run)
    assert status.model_dump(exclude={"notes"}) == before
    assert any("skipped a summary" in n for n in status.notes)
    assert any("read one by one" in n for n in status.notes)
    run.output.delete(f"{run.paths.folded}/{first}")
    run.output.delete(f"{run.paths.folded}/{second}")
    status = collect(run)  # no summary at all: every report is read
    assert status.model_dump(exclude={"notes"}) == before
    assert status.notes == ["12 finished shards are in no summary of finished reports "
                            "(their workers could not write one, or predate them): their "
                            "reports were read one by one"]
    assert run.reports().read == 12


def test_a_shard_run_again_is_read_from_its_report_not_its_old_summary(finished_examples):
    run = Run.load(str(finished_examples))
    again = run.read_report(3).model_copy(update={"state": "running", "attempt": 2,
                                                   "finished_at": None, "updated_at": now()})
    run.output.write(run.paths.report(3), again.model_dump_json(indent=1).encode())
    read = run.reports()
    assert read.by_index[3].state == "running" and read.read == 1 and read.folded == 11
    assert collect(run).state == "running"


def test_a_large_runs_table_lists_the_shards_at_work_and_counts_the_rest(tmp_path):
    from io import StringIO

    from rich.console import Console

    from relit_k8s.console import SHARD_ROWS, status_view

    states = ["done"] * 50 + ["running", "failed"] + ["pending"] * 10
    status = collect(a_run_of(tmp_path, states))
    buffer = StringIO()
    Console(file=buffer, width=120).print(status_view(status))
    text = buffer.getvalue()
    assert len(status.shards) > SHARD_ROWS
    assert "2 of 62 shards shown; not shown: 50 done, 10 pending" in text
    assert text.count("running") >= 1 and " failed " in text
    done = collect(a_run_of(tmp_path / "done", ["done"] * 20))
    buffer = StringIO()
    Console(file=buffer, width=120).print(status_view(done))
    assert "shards: 20 done (-o json lists every shard)" in buffer.getvalue()
    assert "┃ shard" not in buffer.getvalue()  # no table of 20 done rows


def a_run_of(tmp_path, states: list[str]):
    settings = PlanSettings(input=str(tmp_path / "in"), refs=str(tmp_path / "refs"),
                            output=str(tmp_path / "out"), iterations=len(states),
                            shards=len(states))
    run = write_run(plan(settings, ["a.jpg"], ["r.hdr"]))
    then = now() - timedelta(seconds=5)
    for index, state in enumerate(states):
        if state == "pending":
            continue
        report = ShardReport(run_id=run.run_id, index=index, state=state,
                             items_total=run.manifest.shard_items(index), started_at=then,
                             updated_at=then, host="h", device="cpu", relighter="sh")
        run.output.write(run.paths.report(index), report.model_dump_json().encode())
    return run


def test_a_corrupt_reference_is_named_as_the_cause_and_opencv_says_nothing(tmp_path):
    """Every item of a broken map fails, once each, in the report; status names the map (not
    the images it failed), and OpenCV's own log line is not on stderr."""
    import json
    import shutil

    from conftest import EXAMPLES, cli

    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(EXAMPLES / "refs" / "sky_sun.hdr", refs)
    (refs / "broken.hdr").write_bytes((EXAMPLES / "refs" / "sunset.hdr").read_bytes()[:300])
    ran = cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(refs), "--output",
              str(tmp_path / "out"), "--iterations", "1", "--no-progress", check=True)
    assert "[ERROR" not in ran.stderr and "RGBE" not in ran.stderr
    status = json.loads(cli("status", "--output", str(tmp_path / "out"), "-o", "json",
                            check=True).stdout)
    assert status["items_failed"] == 4
    [group] = status["failure_reasons"]
    assert group["examples"] == ["broken.hdr"] and group["count"] == 4


def test_a_broken_pair_is_said_once_and_piped_output_and_watch_read_whole(tmp_path):
    """A pair whose reference is broken fails in each of its units; the run says so once.
    Piped (no COLUMNS), lines are not wrapped at 80 columns; `status --watch` to a pipe prints
    the view and ends with the run."""
    import shutil

    from conftest import EXAMPLES, cli

    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "broken.hdr").write_bytes((EXAMPLES / "refs" / "sunset.hdr").read_bytes()[:300])
    shutil.copy(EXAMPLES / "refs" / "sky_sun.hdr", refs)
    out = tmp_path / "a very long folder name that would wrap at eighty columns" / "out"
    ran = cli("run", "--input", str(EXAMPLES / "images"), "--img-pattern", "a*", "--refs",
              str(refs), "--ref-pattern", "broken*", "--output", str(out), "--iterations", "8",
              "--shards", "4", "--workers", "1", "--no-progress", env={"COLUMNS": ""})
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.count("failed astronaut.png x broken.hdr") == 1, ran.stderr
    first = next(line for line in ran.stdout.splitlines() if line.startswith("run relit-"))
    assert len(first) > 80 and first.endswith("on 1 worker(s), cpu")  # not wrapped at 80
    watched = cli("status", "--output", str(out), "--watch", env={"COLUMNS": ""}, timeout=60)
    assert watched.returncode == 0 and "8/8 items" in watched.stdout


def test_a_continued_runs_progress_bar_starts_at_what_was_finished():
    from io import StringIO

    from rich.console import Console

    from relit_k8s import console

    buffer = StringIO()
    saved = console.err
    console.err = Console(file=buffer, width=120, force_terminal=False)
    try:
        with console.progress_runner(10, completed=6) as (on_progress, _):
            on_progress(4, 0, 0)
    finally:
        console.err = saved
    assert "10/10" in buffer.getvalue() and "100%" in buffer.getvalue()

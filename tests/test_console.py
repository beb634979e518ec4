"""What ``relit-k8s status`` draws, at the widths users' terminals have."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from rich.console import Console

from relit_k8s.console import StatusView
from relit_k8s.status import FailureGroup, RunStatus, ShardStatus

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def shard(index: int, state: str, **kw) -> ShardStatus:
    base = dict(run_id="relit-0123456789", index=index, state=state, items_total=1250,
                started_at=NOW, updated_at=NOW, relighter="diffusion", attempt=2,
                host="relit-0123456789-7-x2k9q.gpu-pool-a100-europe-west4", device="cuda:0",
                items_done=617, items_skipped=512, items_failed=3, items_per_second=12.25,
                heartbeat_age_seconds=97.0)
    return ShardStatus(**{**base, **kw})


def a_run() -> RunStatus:
    shards = [shard(0, "done", items_done=1000, items_skipped=247), shard(1, "running"),
              shard(2, "running", stalled=True, heartbeat_age_seconds=611.0),
              shard(3, "failed", items_failed=1250, items_done=0, items_skipped=0),
              ShardStatus.pending("relit-0123456789", 10, 1250)]
    return RunStatus(
        run_id="relit-0123456789", created_at=NOW, output="s3://bucket/a/long/output/prefix",
        manifest="s3://bucket/a/long/output/prefix/_relit/relit-0123456789/manifest.json",
        relighter="diffusion", state="running", items_total=6250, items_done=2234,
        items_skipped=1024, items_failed=1259, items_per_second=24.5, eta_seconds=3600,
        resumed_from=None, stalled_shards=[2], timings={"relight": 1234.5},
        failure_reasons=[FailureGroup(kind="decode", reason="cannot identify image file",
                                      count=9, examples=["a/b/c.jpg", "d/e.png"])],
        shards_total=5, shards=shards)


def draw(status: RunStatus, width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(StatusView(status))
    return console.file.getvalue().splitlines()


@pytest.mark.parametrize("width", [60, 80, 100, 120, 200])
def test_status_fits_the_terminal_with_one_line_per_shard(width):
    lines = draw(a_run(), width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    top = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    bottom = next(i for i, line in enumerate(lines) if line.startswith("└"))
    rows = [line.split("│")[1].strip() for line in lines[top + 1:bottom]]
    assert rows == ["0", "1", "2", "3", "10"], "\n".join(lines)  # no shard row wraps
    header = next(line for line in lines if line.startswith("┃"))
    assert "…" not in header  # headers are whole words, never "skip…"
    text = "\n".join(lines)
    assert "stalled" in text and "failed" in text and "pending" in text


def test_the_columns_are_chosen_by_width():
    def heads(width):
        header = next(line for line in draw(a_run(), width) if line.startswith("┃"))
        return [h.strip() for h in header.strip("┃").split("┃")]

    assert heads(120) == ["shard", "state", "written", "skipped", "failed", "total", "items/s",
                          "heartbeat", "attempt", "host / device"]
    assert heads(80) == ["shard", "state", "items", "failed", "items/s", "beat",
                         "host / device"]
    assert heads(60) == ["shard", "state", "items", "failed", "items/s"]
    row = next(line for line in draw(a_run(), 80) if line.startswith("│     1"))
    assert "1132/1250" in row and "97s" in row  # finished of total; the heartbeat's age
    assert "relit-0123456789-7-…" in row  # the host is cut to fit, marked as cut
    wide = next(line for line in draw(a_run(), 200) if line.startswith("│     1"))
    assert "relit-0123456789-7-x2k9q.gpu-pool-a100-europe-west4 / cuda:0" in wide

"""The one clock of relit-k8s: UTC stamps (reports, leases, heartbeats, summaries) and
monotonic durations (how long a worker has waited, when a heartbeat is due).

Everything that compares a time against a threshold (a lease's age, a summary's age, a
stalled shard, a heartbeat due) reads it here, so a test moves this clock forward instead of
sleeping past the threshold: :meth:`Clock.advance` moves both readings by the same amount.
Times written by the object store (``LastModified``) are the store's own: after an advance
they look older, as they would after waiting. Outside the tests the clock is the system's.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta


class Clock:
    """The system clock, plus an offset that only tests change."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The time as a UTC stamp."""
        return datetime.now(UTC) + timedelta(seconds=self._offset)

    def monotonic(self) -> float:
        """Seconds for durations: only differences mean anything."""
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move both readings forward (tests: instead of sleeping past a threshold)."""
        with self._lock:
            self._offset += seconds

    def reset(self) -> None:
        with self._lock:
            self._offset = 0.0


#: The clock every module reads.
CLOCK = Clock()


def now() -> datetime:
    return CLOCK.now()


def monotonic() -> float:
    return CLOCK.monotonic()

"""Relighters that misbehave on purpose, loaded by ``module:attribute`` path in tests."""

from __future__ import annotations

import torch

from relit_k8s.relighters.sh import SHRelighter


class PickyRelighter(SHRelighter):
    """The sh relighter, except that it raises a plain RuntimeError on images 7 pixels wide."""

    name = "picky"

    def relight(self, image, reference, seeds, normals=None):
        if image.shape[2] == 7:
            raise RuntimeError("picky: cannot handle 7-pixel-wide images")
        return super().relight(image, reference, seeds, normals)


class BrokenRelighter(SHRelighter):
    """Fails on every input: a bug, which must end the shard rather than fail every item."""

    name = "broken"

    def relight(self, image, reference, seeds, normals=None):
        raise RuntimeError("broken: always fails")


class OOMRelighter(SHRelighter):
    """Runs out of GPU memory: a temporary failure (exit 75)."""

    name = "oom"

    def relight(self, image, reference, seeds, normals=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class SlowRelighter(SHRelighter):
    """Takes ten minutes per batch: for the SIGTERM grace period."""

    name = "slow"

    def relight(self, image, reference, seeds, normals=None):
        import time

        time.sleep(600)
        return super().relight(image, reference, seeds, normals)


class CountingRelighter(SHRelighter):
    """Prefers 3 seeds per call and records the size of every call it gets."""

    name = "counting"
    batch_size = 3
    calls: list[int] = []

    def relight(self, image, reference, seeds, normals=None):
        CountingRelighter.calls.append(len(seeds))
        return super().relight(image, reference, seeds, normals)


class PacedRelighter(SHRelighter):
    """The sh relighter, slowed to ``RELIT_TEST_PACE`` seconds per batch (not at all when it is
    unset): a test stops or breaks a run mid-shard on tiny images, and the same run, rerun
    without it, finishes at once."""

    name = "paced"

    def relight(self, image, reference, seeds, normals=None):
        import os
        import time

        time.sleep(float(os.environ.get("RELIT_TEST_PACE", "0")))
        return super().relight(image, reference, seeds, normals)


class DiesHoldingItsQueueLock(SHRelighter):
    """The first call in any worker process (the file ``RELIT_TEST_DIE_ONCE`` names marks it)
    kills that process with SIGKILL while it holds the write lock of the queue that carries
    its events to the parent, and the read lock of every queue it could read (the one it is
    handed shard indexes on): the moments the OOM killer may pick, made certain."""

    name = "dies-holding-its-queue-lock"

    def relight(self, image, reference, seeds, normals=None):
        import logging
        import os
        import signal

        try:
            os.close(os.open(os.environ["RELIT_TEST_DIE_ONCE"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().relight(image, reference, seeds, normals)
        import gc
        from multiprocessing.queues import Queue

        [handler] = logging.getLogger("relit_k8s").handlers  # relit_k8s.local._QueueLog
        handler.events._wlock.acquire()  # noqa: SLF001 - what a write holds, then the kill
        for queue in (q for q in gc.get_objects() if isinstance(q, Queue) and
                      q is not handler.events):
            queue._rlock.acquire()  # noqa: SLF001 - what a read holds while it waits
        os.kill(os.getpid(), signal.SIGKILL)

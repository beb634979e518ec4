"""What every result file records about where it came from: the commit, and the command."""

from __future__ import annotations

import os
import subprocess
import sys


def commit() -> str | None:
    """The short hash of the checked-out commit, with ``+changes`` when the tree differs from
    it (None outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=here).stdout.strip()
        # result files a benchmark just wrote are not changes to the code it measured
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top)", ":(top,exclude)benchmarks/results"],
                               capture_output=True, text=True, check=True,
                               cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran ``script`` (``benchmarks/<name>.py``), as typed from the
    repository's root (or, run from elsewhere in it, from there: ``cd benchmarks && ...``, so
    that relative paths in it mean what they meant)."""
    args = sys.argv[1:] if argv is None else argv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.relpath(os.getcwd(), root)
    if here == ".":
        return " ".join(["python", f"benchmarks/{script}", *args])
    path = os.path.relpath(os.path.join(root, "benchmarks", script))
    return f"cd {here} && " + " ".join(["python", path, *args])

"""The README's Quick start example is what the Quick start prints (scripts/readme_example.py)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

from conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("readme_example",
                                                  ROOT / "scripts" / "readme_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_example_is_what_a_new_run_prints():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_example.py"),
                           "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_check_ignores_what_differs_between_machines_and_nothing_else():
    example = load_script()
    shown = example.current()
    assert "is finished: all 24 shards are done" in shown  # the second run does nothing
    other_machine = re.sub(r"relit-[0-9a-f]{10}", "relit-0123456789", shown)
    other_machine = other_machine.replace("on 1 worker(s), cpu", "on 2 worker(s), GPU 0,1")
    assert example.normalised(other_machine) == example.normalised(shown)
    stale = shown.replace("(24 written, 0 skipped", "(0 written, 24 skipped")
    assert example.normalised(stale) != example.normalised(shown)

"""The README's Quick start example, made from a real run of the Quick start.

Runs what a new user runs after the first Quick start command (in a scratch folder holding the
bundled examples): the run, the same run again, ``status`` in a 100-column terminal and
``gallery``; and writes their output, with the output tree, into README.md between the markers
``<!-- readme_example: start -->`` and ``<!-- readme_example: end -->``.

What differs from machine to machine is shown as one machine had it: the folder (shown as
``/home/you/relit-k8s``), the host name (``vm``), rates and timings, the worker count, and the
run id (derived from the plan, whose URIs are absolute). ``--check`` makes the example again
and fails if the README differs in anything else; ``tests/test_readme.py`` runs it.

    python scripts/readme_example.py [--check]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- readme_example: start -->", "<!-- readme_example: end -->"
SHOWN_ROOT = "/home/you/relit-k8s"
SHOWN_HOST = "vm"
RUN = ["run", "--input", "examples/images", "--refs", "examples/refs", "--output", "out",
       "--iterations", "2"]


def relit(*args: str, cwd: Path) -> str:
    exe = Path(sys.executable).parent / "relit-k8s"
    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb"}
    done = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"relit-k8s {' '.join(args)} -> {done.returncode}\n{done.stderr}")
    return done.stdout


def tree(out: Path) -> list[str]:
    """The output folder as the README draws it: the first pair whole, the rest elided."""
    pairs = sorted(p for p in out.iterdir() if p.is_dir() and p.name != "_relit")
    run = next((out / "_relit").glob("relit-*"))
    lines = ["out/"]
    for pair in pairs[:2]:
        lines.append(f"├── {pair.name}/")
        files = sorted(f.name for f in pair.iterdir())
        if pair == pairs[0]:
            lines += [f"│   {'└' if i == len(files) - 1 else '├'}── {name}"
                      for i, name in enumerate(files)]
        else:
            lines.append("│   └── ...")
    lines.append(f"├── ... ({len(pairs)} folders: image x reference)")
    lines.append(f"└── _relit/{run.name}/")
    lines.append("    ├── manifest.json")

    def listed(folder: str) -> str:
        names = sorted((p.name for p in (run / folder).iterdir() if not p.name.startswith(".")),
                       key=lambda n: (0, int(n.split(".")[0]), n) if n.split(".")[0].isdigit()
                       else (1, 0, n))
        return " ".join(names) if len(names) <= 4 else f"{names[0]} {names[1]} ... {names[-1]}"

    if (run / "leases").is_dir():
        lines.append(f"    ├── done/{listed('done')}")
    if (run / "folded").is_dir():
        workers = len([p for p in (run / "folded").iterdir() if not p.name.startswith(".")])
        lines.append(f"    ├── folded/<host>-<pid>-<token>.json ({workers}: the finished "
                     "reports of each worker)")
        lines.append(f"    ├── leases/{listed('leases')}")
    lines.append(f"    └── shards/{listed('shards')}")
    return lines


def make() -> str:
    """The example block (without its markers), from a real run."""
    scratch = Path(tempfile.mkdtemp(prefix="relit-readme-"))
    try:
        shutil.copytree(ROOT / "examples" / "images", scratch / "examples" / "images")
        shutil.copytree(ROOT / "examples" / "refs", scratch / "examples" / "refs")
        first = relit(*RUN, "--no-progress", cwd=scratch)
        again = relit(*RUN, "--no-progress", cwd=scratch)
        files = tree(scratch / "out")
        status = relit("status", "--output", "out", cwd=scratch)
        gallery = relit("gallery", "--output", "out", cwd=scratch)
        command = "relit-k8s " + " ".join(RUN)
        text = "\n".join([
            "What the first command prints (its progress bar, on stderr, left out):",
            "",
            "```",
            f"$ {command}",
            first.rstrip(),
            "```",
            "",
            "Your run id differs (it is derived from the plan, whose paths are absolute), and "
            "so do",
            "the rates; the rest is what you will see. What you get, in the seed's layout:",
            "",
            "```",
            *files,
            "```",
            "",
            "Run the same command again: the run is finished, so nothing is relit or "
            "rewritten. Then look",
            "at the run, and at its results:",
            "",
            "```",
            f"$ {command}",
            again.rstrip(),
            "$ relit-k8s status --output out",
            status.rstrip(),
            "$ relit-k8s gallery --output out",
            gallery.rstrip(),
            "```",
        ])
        text = text.replace(str(scratch.resolve()), SHOWN_ROOT).replace(str(scratch), SHOWN_ROOT)
        return re.sub(rf"\b{re.escape(socket.gethostname())}\b", SHOWN_HOST, text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def normalised(text: str) -> list[str]:
    """What must match between two runs: all but run ids, numbers with decimals, the worker
    count and device, and table padding."""
    text = re.sub(r"relit-[0-9a-f]{10}", "RUN", text)
    text = re.sub(r"\d+\.\d+", "N", text)
    text = re.sub(r"on \d+ worker\(s\), [^\n]+", "on W", text)
    text = re.sub(r"[━─┏┓┗┛┃│┡┩└┘┳┻╇┴┬]", " ", text)
    return text.split()


def current() -> str:
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="fail if the README's example differs from a new run (but for what "
                    "differs between machines)")
    args = ap.parse_args()
    fresh = make()
    if args.check:
        if normalised(fresh) != normalised(current()):
            print("README.md's Quick start example is not what the Quick start prints now; "
                  "run: python scripts/readme_example.py\n--- a new run gives:\n" + fresh)
            raise SystemExit(1)
        print("README.md's Quick start example matches a new run")
        return
    readme = README.read_text()
    head, rest = readme.split(START, 1)
    README.write_text(head + START + "\n" + fresh + "\n" + END + rest.split(END, 1)[1])
    print("README.md: example updated")


if __name__ == "__main__":
    main()

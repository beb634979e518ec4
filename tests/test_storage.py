from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading

import pytest
from conftest import _free_port

from relit_k8s.errors import (
    ConfigError,
    NotFoundError,
    ObjectUnreadable,
    StorageConfigError,
    StorageUnavailable,
    WriteConflict,
)
from relit_k8s.storage import (
    LocalStorage,
    S3Storage,
    cached_copy,
    canonical_uri,
    check_key,
    open_storage,
    split_uri,
)


def test_a_local_replace_waits_a_while_for_a_folder_a_stopped_process_holds_then_says_so(
        tmp_path, monkeypatch):
    """A process stopped inside its replace (Ctrl+Z on another run on the same output) keeps
    its folder's lock: a replace waits RELIT_LOCAL_LOCK_SECONDS for it, then fails as a
    temporary error (75) that says what to do, instead of hanging as long as the other is
    stopped; once the lock is free, it goes through."""
    import fcntl
    import time

    store = LocalStorage(tmp_path)
    version = store.create("shards/0.json", b"first")
    monkeypatch.setenv("RELIT_LOCAL_LOCK_SECONDS", "0.5")
    held = os.open(tmp_path / "shards", os.O_RDONLY | os.O_DIRECTORY)  # the stopped replace
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="stopped in the middle of a write") as e:
            store.replace("shards/0.json", b"second", version)
        assert 0.5 <= time.monotonic() - started < 10 and e.value.exit_code == 75
        assert store.read("shards/0.json") == b"first"  # nothing written
        monkeypatch.setenv("RELIT_LOCAL_LOCK_SECONDS", "60")
        threading.Timer(0.3, os.close, [held]).start()  # the other process goes on
        version = store.replace("shards/0.json", b"second", version)
        assert store.read("shards/0.json") == b"second"
        monkeypatch.setenv("RELIT_LOCAL_LOCK_SECONDS", "soon")
        with pytest.raises(ConfigError, match="RELIT_LOCAL_LOCK_SECONDS must be a number"):
            store.replace("shards/0.json", b"third", version)
    finally:
        with contextlib.suppress(OSError):
            os.close(held)


def make_tree(storage):
    for key in ("a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.hdr", "notes.txt",
                ".hidden.png", "_relit/run/manifest.json", "with space #%?+é.png"):
        storage.write(key, key.encode())


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    bucket = request.getfixturevalue("bucket")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_list_filters_by_format_case_insensitively_and_hides_internal_files(storage):
    make_tree(storage)
    assert storage.list(extensions=["jpg", "jpeg", "png", "hdr"]) == [
        "a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.hdr", "with space #%?+é.png"]
    assert storage.list() == ["a.JPG", "b.png", "notes.txt", "sub/c.jpeg", "sub/deeper/d.hdr",
                              "with space #%?+é.png"]


def test_list_glob_matches_file_name_or_whole_key(storage):
    make_tree(storage)
    assert storage.list("*.png") == ["b.png", "with space #%?+é.png"]
    assert storage.list("c*") == ["sub/c.jpeg"]
    assert storage.list("sub/*") == ["sub/c.jpeg", "sub/deeper/d.hdr"]
    assert storage.list(prefix="sub/deeper") == ["sub/deeper/d.hdr"]


def test_read_write_exists_and_list_names(storage):
    storage.write("x/y/z.bin", b"\x00\x01")
    storage.write("x/y/w.bin", b"w")
    storage.write("x/y/deeper/v.bin", b"v")
    assert storage.read("x/y/z.bin") == b"\x00\x01"
    assert storage.exists("x/y/z.bin") and not storage.exists("x/y/nope.bin")
    assert storage.list_names("x/y") == {"z.bin", "w.bin"}
    assert storage.list_names("x/none") == set()
    storage.write("x/y/z.bin", b"new")
    assert storage.read("x/y/z.bin") == b"new"
    with pytest.raises(NotFoundError):
        storage.read("x/y/nope.bin")


@pytest.mark.parametrize("key", ["../escape.png", "/abs.png", "a/../../b.png", "a\\b.png", "",
                                 "a//b.png", "./a.png"])
def test_unsafe_keys_are_refused(storage, key):
    with pytest.raises(ConfigError):
        storage.write(key, b"x")
    with pytest.raises(ConfigError):
        check_key(key)


def test_local_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path)
    store.write("f.bin", b"old")
    real_replace = os.replace

    def crash(src, dst):
        raise OSError("disk died during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Exception, match="disk died"):
        store.write("f.bin", b"new content")
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.read("f.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_unfinished_writes_of_a_killed_writer_are_removed_and_live_ones_kept(tmp_path):
    """A writer SIGKILLed between its temporary file and the rename leaves a hidden
    ``.<name>.tmp-*`` file; the next writer of that name removes it, but never the temporary
    file of a write still in progress (a living process), nor anything of another name."""
    import subprocess
    import sys
    import time

    store = LocalStorage(tmp_path)
    folder = tmp_path / "pair"
    folder.mkdir()
    # a real writer, stopped for good inside its write (the rename never comes)
    code = ("import os, signal, sys; from relit_k8s.storage import LocalStorage; "
            "os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL); "
            "LocalStorage(sys.argv[1]).write('pair/1_a.png', b'half')")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60)
    assert killed.returncode == -9
    left = [p.name for p in folder.iterdir()]
    assert len(left) == 1 and left[0].startswith(".1_a.png.tmp-"), left
    # this process's own write in progress, and another output's leftover: both stay
    live = folder / f".2_a.png.tmp-{os.getpid()}-0123456789ab-{socket.gethostname()}"
    live.write_bytes(b"being written")
    other = folder / left[0].replace("1_a.png", "3_a.png")
    other.write_bytes(b"not asked about")
    assert store.remove_partial_writes("pair", ["1_a.png", "2_a.png"]) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, other.name])
    # another host's (or an older release's) temporary file goes once it is an hour old
    remote = folder / ".2_a.png.tmp-1-0123456789ab-another-host"
    remote.write_bytes(b"?")
    assert store.remove_partial_writes("pair", ["2_a.png"]) == 0
    hour_ago = time.time() - 3601
    os.utime(remote, (hour_ago, hour_ago))
    assert store.remove_partial_writes("pair", ["2_a.png"]) == 1
    assert live.exists() and not remote.exists()
    assert store.remove_partial_writes("no/such/folder", ["x.png"]) == 0


def test_local_concurrent_writers_leave_one_whole_file(tmp_path):
    store = LocalStorage(tmp_path)
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=store.write, args=("same.bin", p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read("same.bin") in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["same.bin"]


def test_uris(tmp_path):
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(f"file://{tmp_path}").uri == str(tmp_path)
    with pytest.raises(ConfigError, match="unsupported"):
        open_storage("gs://bucket/x")
    store, name = split_uri(f"{tmp_path}/runs/manifest.json")
    assert name == "manifest.json" and store.uri == str(tmp_path / "runs")


def test_canonical_uri_is_the_opened_storage_uri_without_opening_it(tmp_path, monkeypatch):
    from relit_k8s import storage as storage_module

    def no_client(*args, **kwargs):
        raise AssertionError("canonical_uri built an S3 client")

    monkeypatch.setattr(storage_module, "make_s3_client", no_client)
    storage_module._client_for.cache_clear()
    assert canonical_uri("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert canonical_uri("s3://bucket") == "s3://bucket"
    assert canonical_uri(f"file://{tmp_path}/x") == str(tmp_path / "x")
    with pytest.raises(ConfigError, match="needs a bucket"):
        canonical_uri("s3:///prefix")
    with pytest.raises(ConfigError, match="unsupported"):
        canonical_uri("gs://bucket/x")


def test_cached_copy_downloads_an_s3_prefix_once_and_keeps_local_folders(bucket, tmp_path):
    store = open_storage(f"s3://{bucket}/weights")
    store.write("unet/a.bin", b"A")
    store.write("b.json", b"{}")
    cache = tmp_path / "cache"
    local = cached_copy(f"s3://{bucket}/weights", cache)
    assert (local / "unet" / "a.bin").read_bytes() == b"A" and (local / ".complete").exists()
    store.write("unet/a.bin", b"changed")
    assert cached_copy(f"s3://{bucket}/weights", cache) == local  # not read again
    assert (local / "unet" / "a.bin").read_bytes() == b"A"
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]
    assert cached_copy(str(tmp_path), cache) == tmp_path
    with pytest.raises(NotFoundError):
        cached_copy(str(tmp_path / "missing"), cache)


def test_s3_stores_with_the_same_settings_share_one_client(s3_env):
    a, b = open_storage("s3://one/x"), open_storage("s3://two")
    assert a._client is b._client


def test_s3_missing_bucket_is_a_config_error(s3_env):
    store = open_storage("s3://no-such-bucket-relit/x")
    with pytest.raises(StorageConfigError, match="does not exist"):
        store.list()
    with pytest.raises(StorageConfigError, match="does not exist"):
        store.write("a.bin", b"x")


def test_s3_missing_credentials_is_a_config_error(bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageConfigError, match="no S3 credentials"):
        open_storage(f"s3://{bucket}/p").read("a.bin")


def test_s3_access_denied_is_a_config_error(bucket, s3_client, monkeypatch):
    """An identity of the suite's server that may list and write, not read: the server denies
    the read (403 AccessDenied), which no retry mends."""
    from conftest import NO_READ

    s3_client.put_object(Bucket=bucket, Key="p/secret.bin", Body=b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", NO_READ.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", NO_READ.secret_key)
    store = open_storage(f"s3://{bucket}/p")
    assert store.list() == ["secret.bin"]  # it may list
    with pytest.raises(StorageConfigError, match="access denied"):
        store.read("secret.bin")


def test_s3_unreachable_endpoint_is_temporary_after_retries(monkeypatch, s3_env):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(StorageUnavailable, match="unreachable"):
        open_storage("s3://any-bucket/x").read("a.bin")


def test_s3_repr_and_uri_hold_no_credentials(bucket):
    store = open_storage(f"s3://{bucket}/p")
    assert isinstance(store, S3Storage)
    assert "testing-secret" not in repr(store) and "testing-secret" not in store.uri


@pytest.mark.parametrize("code,status,expected", [
    ("NoSuchBucket", 404, StorageConfigError),
    ("NoSuchKey", 404, NotFoundError),
    ("InvalidObjectState", 403, ObjectUnreadable),
    ("AccessDenied", 403, StorageConfigError),
    ("ExpiredToken", 400, StorageConfigError),
    ("SlowDown", 503, StorageUnavailable),
    ("TooManyRequests", 429, StorageUnavailable),
    ("InternalError", 500, StorageUnavailable),
])
def test_s3_error_codes_map_to_what_they_mean(code, status, expected):
    from botocore.exceptions import ClientError

    from relit_k8s.storage import _s3_errors

    error = ClientError({"Error": {"Code": code, "Message": "x"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    with pytest.raises(expected), _s3_errors("bucket", "key"):
        raise error


def test_s3_body_cut_short_is_temporary():
    from botocore.exceptions import IncompleteReadError

    from relit_k8s.storage import _s3_errors

    with pytest.raises(StorageUnavailable), _s3_errors("bucket", "key"):
        raise IncompleteReadError(actual_bytes=10, expected_bytes=100)


def test_a_local_file_without_read_permission_is_unreadable_not_a_config_error(
        tmp_path, monkeypatch):
    from pathlib import Path

    store = LocalStorage(tmp_path)
    store.write("x.png", b"x")

    def denied(self):  # root reads every file, so the refusal is simulated at the OS call
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ObjectUnreadable, match="permission denied"):
        store.read("x.png")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_output_is_a_configuration_error(tmp_path, monkeypatch, code):
    # root ignores permission bits, so the file system's answer is injected at os.replace
    def refuse(src, dst):
        raise OSError(code, os.strerror(code))

    store = LocalStorage(tmp_path)
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StorageConfigError, match="permission denied|choose a writable --output"):
        store.write("a/b.png", b"x")
    monkeypatch.undo()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a temporary file was left"


def test_a_conditional_write_sent_again_after_its_first_attempt_landed_is_won(
        bucket, s3_endpoint, monkeypatch):
    """A create or replace whose first attempt lands but is answered after the client's read
    timeout: botocore sends it again, and the second attempt gets 412 from the first. The
    write is won (the object holds this very body); a conflict with another body stands."""
    from conftest import ACCESS_KEY, SECRET_KEY
    from fault_proxy import FaultProxy

    proxy = FaultProxy(s3_endpoint, stall_seconds=1.5, credentials=(ACCESS_KEY, SECRET_KEY))
    proxy.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("RELIT_S3_READ_TIMEOUT", "1")
        store = open_storage(f"s3://{bucket}/p")
        proxy.late = 1
        version = store.create("lease", b"mine, with my token")
        assert proxy.late == 0 and store.read_versioned("lease") == (b"mine, with my token",
                                                                     version)
        proxy.late = 1
        newer = store.replace("lease", b"mine, renewed", version)
        assert store.read_versioned("lease") == (b"mine, renewed", newer) and newer != version
        proxy.late = 1  # another writer's create, sent again, still loses
        with pytest.raises(WriteConflict):
            store.create("lease", b"somebody else's")
        with pytest.raises(WriteConflict):  # and a replace of a stale version, sent once
            store.replace("lease", b"somebody else's", version)
        assert store.read("lease") == b"mine, renewed"
    finally:
        proxy.stop()

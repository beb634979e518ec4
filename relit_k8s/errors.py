"""The exception tree of relit-k8s, and the exit code each error ends a command with.

::

    RelitError                   exit 1   anything we raise on purpose
    ├── ConfigError              exit 78  retrying cannot help: fix the input, flags or manifest
    │   ├── ManifestError                 manifest missing, invalid, tampered, other version
    │   ├── RelighterError                unknown relighter, bad options
    │   └── StorageConfigError            missing bucket, missing credentials, access denied
    │       └── Unsupported               the store does not implement a request (HTTP 501)
    ├── TransientError           exit 75  worth retrying later: the Job retries the index
    │   └── StorageUnavailable            endpoint unreachable / throttled after retries
    ├── StorageError             exit 1   base of the storage errors (the two above are too)
    │   ├── ObjectUnreadable              this one object cannot be read (archived, permission)
    │   │   └── NotFoundError             no object at that key
    │   └── WriteConflict                 a conditional write lost (the object exists, or
    │                                     changed since it was read): another writer won
    ├── ItemError                --       one item cannot be relit (bad image): recorded
    │   ├── DecodeError                   with its ``key`` (the file) and ``reason``
    │   └── ImageTooLarge
    └── Stopped                  exit 143 SIGTERM, after the report was saved
                                 exit 130 Ctrl+C (SIGINT) ended ``relit-k8s run``

Lower-layer errors (botocore, Pillow, OpenEXR, pydantic) are converted where they enter the
package, with ``raise ... from``; :func:`exit_code_for` is the one place that decides what a
failure means for the process.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TEMPORARY = 75  # EX_TEMPFAIL
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl+C
EXIT_SIGTERM = 143  # 128 + SIGTERM


class RelitError(Exception):
    """Base of every error relit-k8s raises on purpose."""

    exit_code = EXIT_FAILED


class ConfigError(RelitError):
    """A configuration error: the same command will fail again until the user changes something."""

    exit_code = EXIT_CONFIG


class ManifestError(ConfigError):
    """The manifest is missing, unreadable, invalid, tampered with, or of an unknown version."""


class RelighterError(ConfigError):
    """Unknown relighter name, a plugin that cannot be loaded, or invalid relighter options."""


class TransientError(RelitError):
    """A temporary failure (storage unreachable after retries, out of memory): retry later."""

    exit_code = EXIT_TEMPORARY


class StorageError(RelitError):
    """Base of the storage errors."""


class ObjectUnreadable(StorageError):
    """One object cannot be read (archived, no permission on that file): others may be fine."""


class NotFoundError(ObjectUnreadable):
    """No object or file at the key asked for."""


class WriteConflict(StorageError):
    """A conditional write lost: a create-only write found an object, or a replace found the
    object changed (or gone) since the version it names. Another writer won; not a failure."""


class StorageConfigError(StorageError, ConfigError):
    """The storage cannot be used as configured: missing bucket, credentials or permission."""


class Unsupported(StorageConfigError):
    """The store does not implement a request relit-k8s made (S3 ``501 NotImplemented``, or a
    ``NotImplemented`` error code): conditional writes on some S3-compatible servers."""


class StorageUnavailable(StorageError, TransientError):
    """The storage did not answer, or kept failing, after botocore's retries."""


class ItemError(RelitError):
    """One item (an image or reference) cannot be processed; the rest of the shard goes on.

    ``key`` names the file at fault (the image, the reference or a normal map; None when the
    fault is not one file's) and ``reason`` says what is wrong with it, without the key; the
    shard report records both.
    """

    def __init__(self, reason: str, *, key: str | None = None):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key, self.reason = key, reason


class DecodeError(ItemError):
    """The file is not a decodable image of the format its name says."""


class ImageTooLarge(ItemError):
    """The image's header claims more pixels than the configured guard allows."""


class Stopped(RelitError):
    """The process was asked to stop (SIGTERM, Ctrl+C); what was done is saved."""

    exit_code = EXIT_SIGTERM


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ended a command."""
    if isinstance(exc, RelitError):
        return exc.exit_code
    if isinstance(exc, MemoryError) or _is_cuda_oom(exc):
        return EXIT_TEMPORARY
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGTERM
    return EXIT_FAILED


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return isinstance(exc, torch.OutOfMemoryError)

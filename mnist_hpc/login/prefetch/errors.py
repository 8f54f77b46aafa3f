"""Prefetch's error types, and the hints their messages share.

Every error says why it happened and what to do; the cache is left untouched when one is raised.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional

PROG = "mnist-hpc-prefetch"

# Errnos of a write into the cache meaning "this directory cannot take the file".
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class PrefetchError(RuntimeError):
    """Prefetch failed; the message says why and what to do. The cache was left untouched."""


class NetworkError(PrefetchError):
    """The server could not be reached (no route, refused, DNS, timeout, TLS)."""


class HttpError(PrefetchError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, status: int, url: str) -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class HashMismatchError(PrefetchError):
    """The file's sha256 differs from the expected one."""

    def __init__(self, message: str, expected: str, got: Optional[str]) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class TruncatedDownloadError(PrefetchError):
    """The server closed the connection before sending the whole file."""


class DownloadTimeoutError(NetworkError):
    """The download, all attempts included, did not finish within its overall deadline."""


class DownloadTooLargeError(PrefetchError):
    """The server announced, or sent, more bytes than any MNIST-like npz holds; not retried."""

    def __init__(self, message: str, announced: Optional[int], received: int) -> None:
        super().__init__(message)
        self.announced = announced  # the Content-Length, if the server sent a number
        self.received = received  # body bytes that had arrived when the download was stopped


class LockError(PrefetchError):
    """The cache's lock file cannot be opened or locked; the message names the file."""


class SourceError(PrefetchError):
    """The ``--from`` path is missing, unreadable or incomplete."""


class CacheNotWritableError(PrefetchError):
    """The cache directory cannot be created or written."""


class CacheFullError(CacheNotWritableError):
    """The cache directory's filesystem (or quota) ran out of space."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; raised (like KeyboardInterrupt) so that cleanup runs on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def move_hint() -> str:
    return (
        "choose a writable directory that compute nodes also see, e.g. "
        "`export MNIST_HPC_CACHE=/scratch/$USER/mnist-hpc` or pass `data.cache_dir=/scratch/$USER/mnist-hpc`"
    )


def cache_error(exc: OSError, cache_dir: Path, doing: str, size: Optional[int] = None) -> CacheNotWritableError:
    """Turn an OSError met while writing into the cache into an error that says what to do.

    ``size`` is the byte count of the file being placed (its object's size), when known: the
    space a full disk must find. It varies with the source (Keras' compressed npz is 11 MB, an
    uncompressed one converted from IDX files 55 MB), so no fixed figure is given without it.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE:
        need = (f"It needs {size / 1e6:.3g} MB ({size:,} bytes) free there: free space or quota, or"
                if size is not None else "Free space or quota there, or")
        return CacheFullError(
            f"no space left in the cache directory {cache_dir} while {doing} ({reason}); nothing was "
            f"written. {need} {move_hint()}"
        )
    return CacheNotWritableError(
        f"cannot write to the cache directory {cache_dir} while {doing} ({reason}); nothing was "
        f"written. Make it writable, or {move_hint()}"
    )


def hand_copy_hint(url: str, sha256: str) -> str:
    return (
        "If this machine has no internet, copy the file by hand: on a machine with internet run "
        f"`curl -L -o mnist.npz {url}` and check that `sha256sum mnist.npz` prints {sha256}, copy it over "
        "(`scp mnist.npz <login-node>:/path/to/mnist.npz`), then run "
        f"`{PROG} --from /path/to/mnist.npz`. Or point --url at a mirror you can reach; if the "
        "login node reaches the internet only through a proxy, set HTTPS_PROXY."
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

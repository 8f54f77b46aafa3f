"""The cache directory as prefetch writes it: writability probe, lock, staging, install, stale sweep."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system; the rename alone stays atomic
    fcntl = None  # type: ignore[assignment]

from mnist_hpc.cache import manifest_path
from mnist_hpc.io import atomic_path
from mnist_hpc.login.prefetch.errors import PROG, PrefetchError, cache_error

LOCK_NAME = ".mnist-hpc-prefetch.lock"
STAGING_PREFIX = ".mnist-hpc-staging-"
PROBE_PREFIX = ".mnist-hpc-probe-"
# flock() on some network filesystems (older NFS, Lustre mounted without -o flock) fails with these.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

log = logging.getLogger("mnist_hpc.login.prefetch")


def ensure_writable(cache_dir: Path) -> None:
    """Create the cache directory and prove a file can be written there, before any download.

    Raises:
        CacheNotWritableError: the directory cannot be created or written (CacheFullError if full).
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=cache_dir)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
    except OSError as exc:
        raise cache_error(exc, cache_dir, "checking that it is writable") from exc


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the cache's lock file; yield whether the lock is real.

    The lock file is removed on release, so a finished prefetch leaves nothing behind. That is
    only safe with the inode check: a process that opened the file before it was unlinked finds
    the path gone (or pointing at a new file) once it gets the lock, and starts over.
    Where flock is unsupported (some shared filesystems) this carries on unlocked: the final
    rename is still atomic, so the worst case is two downloads of the same file.
    """
    path = cache_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise cache_error(exc, cache_dir, "creating the lock file") from exc
        locked = False
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another %s that holds %s", PROG, path)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise PrefetchError(f"cannot lock {path}: {exc.strerror or exc}") from exc
            log.warning("cannot lock %s (%s); continuing without a lock", path, exc.strerror)
        if locked:
            same = False
            with contextlib.suppress(FileNotFoundError):
                st_fd, st_path = os.fstat(fd), os.stat(path)
                same = (st_fd.st_dev, st_fd.st_ino) == (st_path.st_dev, st_path.st_ino)
            if not same:
                os.close(fd)
                continue
        try:
            yield locked
        finally:
            # Unlink while still holding the lock (see above), then release it by closing.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
        return


def sweep_stale(cache_dir: Path, target: Path) -> None:
    """Remove staging leftovers of a prefetch that was killed (SIGKILL skips ``finally``).

    Only called while holding the lock, when no other prefetch can be writing them.
    """
    for stale in cache_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Probes are not swept: they are written before the lock is taken and removed at once.
    for stale in cache_dir.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def install(staged: Path, target: Path, manifest: dict[str, Any]) -> None:
    """Rename the staged npz into place, then its manifest; both are complete before either moves.

    The manifest's temporary file is written first so that a full disk fails before anything
    lands. The npz is renamed first and its manifest second: a crash in between leaves a file
    whose manifest is missing or stale, which the loader refuses and the next prefetch replaces.
    """
    landed = False
    try:
        with atomic_path(manifest_path(target)) as manifest_tmp:
            manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            with atomic_path(target) as npz_tmp:
                os.replace(staged, npz_tmp)
            landed = True
    except BaseException:
        if landed:
            # The npz is in but its manifest is not: take it out rather than leave it unverified.
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        raise

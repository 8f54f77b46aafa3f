"""The cache directory as prefetch writes it: writability probe, lock, staging, install, clean-up.

The names and the manifest are :mod:`mnist_hpc.cache`'s; this module performs the writes in
the order that keeps every reader safe (object first, then the manifest that points at it,
then the link for people), and keeps a cache shared by a group usable by all its members:
what it creates in a group-writable directory (the cache directory itself when it makes it,
the lock, the manifest, the object store, staging areas and every temporary file) is
group-writable too (or group-readable, for the immutable objects), whatever the umask of
whoever ran it. :func:`shared_mode` is the one rule for all of them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system; the rename alone stays atomic
    fcntl = None  # type: ignore[assignment]

from mnist_hpc import cache
from mnist_hpc.io import atomic_path, fsync_dir
from mnist_hpc.login.prefetch.errors import PROG, LockError, cache_error

LOCK_NAME = ".mnist-hpc-prefetch.lock"
STAGING_PREFIX = ".mnist-hpc-staging-"
PROBE_PREFIX = ".mnist-hpc-probe-"
# A replaced object stays this long, so that a job that has just read the old manifest still
# finds the object it names (on NFS, a manifest can look unchanged for up to a minute).
GC_GRACE_S = 300.0
# flock() on some network filesystems (older NFS, Lustre mounted without -o flock) fails with these.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

log = logging.getLogger("mnist_hpc.login.prefetch")


def shared_mode(cache_dir: Path, mode: int) -> int:
    """``mode`` less the umask, plus the group bits of ``mode`` when ``cache_dir`` is a group's space.

    A group's space is group-writable but not world-writable: ``/tmp`` or a 1777 scratch is
    group-writable too, and there the group is whatever the writer's primary group is (often
    one that every user shares), so nothing made there gets more than the umask allows.
    """
    mask = os.umask(0)
    os.umask(mask)
    try:
        dir_mode = cache_dir.stat().st_mode
    except OSError:
        dir_mode = 0
    shared = dir_mode & stat.S_IWGRP and not dir_mode & stat.S_IWOTH
    return (mode & ~mask) | (mode & 0o070 if shared else 0)


def _share_dir(directory: Path, cache_dir: Path, mode: int) -> None:
    """chmod a directory we made to ``shared_mode``, keeping the setgid bit it inherited (which
    gives what is created inside it the cache's group)."""
    os.chmod(directory, shared_mode(cache_dir, mode) | (directory.stat().st_mode & stat.S_ISGID))


def _make_dirs(directory: Path) -> None:
    """``mkdir -p``, where each directory made inside a group-writable one is shared like it."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for made in reversed(missing):
        try:
            made.mkdir()
        except FileExistsError:  # another prefetch made it meanwhile
            continue
        _share_dir(made, made.parent, 0o777)


def ensure_writable(cache_dir: Path, size: Optional[int] = None) -> None:
    """Create the cache directory and prove a file can be written there, before any download.

    ``size``: the bytes the prefetch will place, if known (named when the disk is full).

    Raises:
        CacheNotWritableError: the directory cannot be created or written (CacheFullError if full).
    """
    try:
        _make_dirs(cache_dir)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=cache_dir)
        try:
            os.fchmod(fd, shared_mode(cache_dir, 0o666))  # never swept: one left behind is not private
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
    except OSError as exc:
        raise cache_error(exc, cache_dir, "checking that it is writable", size) from exc


def _describe_owner(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "owner unknown"
    try:
        import pwd

        owner = pwd.getpwuid(st.st_uid).pw_name
    except (ImportError, KeyError):
        owner = f"uid {st.st_uid}"
    return f"owner {owner}, mode {stat.S_IMODE(st.st_mode):04o}"


def _open_lock(path: Path, cache_dir: Path) -> int:
    """Open (creating it if needed) the lock file; read-only when another user's file is not writable."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        try:  # flock() needs no write access on local filesystems
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise LockError(
                f"cannot open the lock file {path} ({_describe_owner(path)}: {exc.strerror}); its owner can "
                f"run `chmod g+rw {path}` (a cache shared by a group needs it group-writable), "
                "or use a data.cache_dir of your own"
            ) from exc
    except OSError as exc:
        raise cache_error(exc, cache_dir, f"creating the lock file {path}") from exc
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, shared_mode(cache_dir, 0o666))
    return fd


def _flock(fd: int, path: Path, wait: bool) -> bool:
    """Take the exclusive lock; False where the filesystem has no flock (then carry on unlocked)."""
    if fcntl is None:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            log.info("waiting for another %s that holds %s", PROG, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            log.warning("cannot lock %s (%s); continuing without a lock", path, exc.strerror)
            return False
        # EBADF: a read-only descriptor, where the filesystem's flock needs write access (NFS).
        raise LockError(
            f"cannot lock {path} ({_describe_owner(path)}: {exc.strerror}); its owner can run "
            f"`chmod g+rw {path}`, or use a data.cache_dir of your own"
        ) from exc
    return True


@contextlib.contextmanager
def cache_lock(cache_dir: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the cache directory's lock file; yield whether it is real.

    The lock file is never removed: with a remove, a process still holding the old file and one
    that created a new file would both "hold the lock". The kernel releases the lock of a process
    that dies, so a file left behind by a killed prefetch blocks no one. Where flock is
    unsupported this carries on unlocked: every rename is still atomic.

    Raises:
        LockError: the file cannot be opened or locked (names it, its owner and the fix).
        BlockingIOError: ``wait=False`` and another process holds the lock.
    """
    path = cache_dir / LOCK_NAME
    fd = _open_lock(path, cache_dir)
    try:
        locked = _flock(fd, path, wait)
        yield locked
    finally:
        os.close(fd)  # releases the lock


def make_staging(cache_dir: Path, size: Optional[int] = None) -> Path:
    """A private staging directory in the cache (same filesystem, so the final rename is atomic)."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=cache_dir))
        # Group-accessible like the cache, so another member can sweep it if this process is killed.
        _share_dir(staging, cache_dir, 0o770)
    except OSError as exc:
        raise cache_error(exc, cache_dir, "creating a staging directory", size) from exc
    return staging


def staged_file_mode(staging: Path) -> int:
    """The mode of a file written into ``staging``: shared like the cache directory that holds it."""
    return shared_mode(staging.parent, 0o666)


def stage_bytes(staged: Path, data: bytes) -> None:
    """Write ``data`` to a new file in a staging directory, given :func:`staged_file_mode` before any byte."""
    staged.touch(exist_ok=False)
    os.chmod(staged, staged_file_mode(staged.parent))
    staged.write_bytes(data)


def sweep_stale(cache_dir: Path, target: Path) -> None:
    """Remove the leftovers of a prefetch that was killed (SIGKILL skips ``finally``).

    Only called while holding the lock, when no other prefetch can be writing them.
    """
    for stale in cache_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Probes are not swept: they are written before the lock is taken and removed at once.
    for stale in cache_dir.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _current_sha256(target: Path) -> Optional[str]:
    try:
        return cache.read_manifest(target)[0]["sha256"]
    except cache.CacheError:
        return None


def install(staged: Path, target: Path, manifest: dict[str, Any]) -> None:
    """Place the staged npz as its object, then switch the manifest to it, then the link.

    The manifest's temporary file is written first, so that a full disk fails before anything
    lands. Until the manifest's rename every reader sees the previous dataset, after it the new
    one; a failure in between removes the new object again (unless it is the current one).
    """
    cache_dir = target.parent
    obj = cache.object_path(target, manifest["sha256"])
    previous = _current_sha256(target)
    placed = False
    try:
        with atomic_path(cache.manifest_path(target), mode=shared_mode(cache_dir, 0o666)) as manifest_tmp:
            manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if not obj.parent.is_dir():
                obj.parent.mkdir(exist_ok=True)
                _share_dir(obj.parent, cache_dir, 0o777)
            os.chmod(staged, shared_mode(cache_dir, 0o444))  # immutable: its name is its hash
            with open(staged, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(staged, obj)
            placed = True
            fsync_dir(obj.parent)
    except BaseException:
        if placed and previous != manifest["sha256"]:
            with contextlib.suppress(OSError):
                obj.unlink()
        raise
    update_view(target, manifest["sha256"])


def update_view(target: Path, sha256: str) -> None:
    """Point the symbolic link ``target`` at the current object (for people; readers use the manifest)."""
    link = cache.view_target(target, sha256)
    with contextlib.suppress(OSError):
        if os.readlink(target) == link:
            return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(link, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cannot link %s to %s (%s); jobs read the manifest, not this link", target, link, exc.strerror)


def needs_tidying(target: Path, manifest: dict[str, Any], grace_s: float = GC_GRACE_S) -> bool:
    """Whether the link is stale or replaced objects are past their grace period (cheap: no reads)."""
    with contextlib.suppress(OSError):
        if os.readlink(target) != cache.view_target(target, manifest["sha256"]):
            return True
    try:
        names = os.listdir(cache.objects_dir(target))
        switched = cache.manifest_path(target).stat().st_mtime
    except OSError:
        return False
    return names != [f"{manifest['sha256']}.npz"] and time.time() - switched >= grace_s


def tidy(target: Path, grace_s: float = GC_GRACE_S) -> None:
    """Point the link at the current object and drop replaced ones past their grace (holding the lock)."""
    current = _current_sha256(target)
    if current is not None:
        if target.is_symlink():  # a file put there by hand is not ours to replace
            update_view(target, current)
        collect_garbage(target, grace_s)


def collect_garbage(target: Path, grace_s: float = GC_GRACE_S) -> list[Path]:
    """Remove the objects the manifest no longer names, once it switched ``grace_s`` ago; return them.

    Call it holding the lock. Nothing is removed while the current manifest cannot be read.
    """
    current = _current_sha256(target)
    try:
        switched = cache.manifest_path(target).stat().st_mtime
        entries = list(cache.objects_dir(target).iterdir())
    except OSError:
        return []
    if current is None or time.time() - switched < grace_s:
        return []
    removed = []
    for entry in entries:
        if entry.name != f"{current}.npz":
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed

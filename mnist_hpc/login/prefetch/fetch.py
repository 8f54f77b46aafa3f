"""Login-node prefetch: put a verified ``mnist.npz`` and its manifest into the cache.

Compute nodes have no internet, so this runs once on a login node (or anywhere that can
write the shared cache) and training jobs only ever read the result (see
:func:`mnist_hpc.data.load_mnist`). Three ways to fill the cache:

* download Keras' ``mnist.npz`` (or a mirror's, ``--url``), checked against a sha256;
* ``--from FILE.npz``: a file copied over by hand (``scp``) from a machine with internet;
* ``--from DIR``: the four original IDX files (optionally gzipped), converted to the npz.

Whatever the source, the file is staged inside the cache directory, validated (keys, dtypes,
shapes, labels), then renamed into place, and its manifest is written after it; on any
failure the staging area is removed, so the cache never holds a partial or invalid file.

Nothing here imports TensorFlow, directly or indirectly: the login node stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # numpy is imported where arrays are built: a valid cache is checked without it
    import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system; the rename alone stays atomic
    fcntl = None  # type: ignore[assignment]

from mnist_hpc import __version__
from mnist_hpc.config import KERAS_MNIST_SHA256, KERAS_MNIST_URL
from mnist_hpc.cache import (
    CacheCorruptError,
    CacheMissingError,
    DatasetError,
    check_cached,
    manifest_path,
    read_npz,
    validate_arrays,
)
from mnist_hpc.io import atomic_path, sha256_file

PROG = "mnist-hpc-prefetch"
LOCK_NAME = ".mnist-hpc-prefetch.lock"
STAGING_PREFIX = ".mnist-hpc-staging-"
PROBE_PREFIX = ".mnist-hpc-probe-"

# The four original files of LeCun's distribution, by the npz key each one becomes.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type MNIST uses

# Errnos of a write into the cache meaning "this directory cannot take the file".
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
# flock() on some network filesystems (older NFS, Lustre mounted without -o flock) fails with these.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

_HASH_GOT = re.compile(r"but got ([0-9a-fA-F]{64})")

log = logging.getLogger(__name__)


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


class SourceError(PrefetchError):
    """The ``--from`` path is missing, unreadable or incomplete."""


class CacheNotWritableError(PrefetchError):
    """The cache directory cannot be created or written."""


class CacheFullError(CacheNotWritableError):
    """The cache directory's filesystem (or quota) ran out of space."""


def _move_hint() -> str:
    return (
        "choose a writable directory that compute nodes also see, e.g. "
        "`export MNIST_HPC_CACHE=/scratch/$USER/mnist-hpc` or pass `data.cache_dir=/scratch/$USER/mnist-hpc`"
    )


def _cache_error(exc: OSError, cache_dir: Path, doing: str) -> CacheNotWritableError:
    """Turn an OSError met while writing into the cache into an error that says what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        return CacheFullError(
            f"no space left in the cache directory {cache_dir} while {doing} ({reason}); nothing was "
            f"written. Free space or quota there (MNIST needs about 12 MB), or {_move_hint()}"
        )
    return CacheNotWritableError(
        f"cannot write to the cache directory {cache_dir} while {doing} ({reason}); nothing was "
        f"written. Make it writable, or {_move_hint()}"
    )


def _hand_copy_hint(url: str, sha256: str) -> str:
    return (
        "If this machine has no internet, copy the file by hand: on a machine with internet run "
        f"`curl -L -o mnist.npz {url}` and check that `sha256sum mnist.npz` prints {sha256}, copy it over "
        "(`scp mnist.npz <login-node>:/path/to/mnist.npz`), then run "
        f"`{PROG} --from /path/to/mnist.npz`. Or point --url at a mirror you can reach; if the "
        "login node reaches the internet only through a proxy, set HTTPS_PROXY."
    )


# ---------------------------------------------------------------------------- sources


@dataclass
class _Plan:
    """What a prefetch will place, known before anything is written."""

    kind: str  # "download", "npz" or "idx"
    source: str  # URL or absolute path, recorded in the manifest
    expected_sha256: Optional[str]  # the npz's hash, when known in advance
    idx_files: dict[str, Path] = field(default_factory=dict)  # npz key -> IDX file (kind "idx")
    source_files: dict[str, str] = field(default_factory=dict)  # IDX file name -> sha256


def _normalise_sha256(value: str) -> str:
    """Lower-case hex digest, accepting pooch's ``sha256:`` prefix.

    Raises:
        ValueError: not 64 hex digits.
    """
    hexdigest = value.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ValueError(f"{value!r} is not a sha256 (64 hex digits, as printed by `sha256sum`)")
    return hexdigest


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    # The usual spelling, and the dotted one some mirrors and archives use.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) of unsigned bytes into an array of its shape.

    The format: two zero bytes, a type code (0x08 = ubyte), the number of dimensions, one
    big-endian uint32 per dimension, then the data.

    Raises:
        DatasetError: the file is not a complete IDX file of unsigned bytes.
    """
    import numpy as np

    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path} is not a readable gzip file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (it does not start with the IDX magic number)")
    if raw[2] != IDX_UBYTE:
        raise DatasetError(f"{path} holds IDX type 0x{raw[2]:02x}, expected 0x08 (unsigned bytes) as in MNIST")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path} has a truncated or invalid IDX header ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise DatasetError(
            f"{path} declares shape {dims} ({count} bytes of data) but holds {len(raw) - header} "
            "(truncated or corrupt copy)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _plan(url: str, sha256: Optional[str], source: Optional[Path]) -> _Plan:
    """Resolve the source and the hash the cached npz must have.

    Raises:
        SourceError: the ``--from`` path is missing, unreadable or incomplete.
        HashMismatchError: an npz source differs from an explicitly expected sha256.
    """
    if source is None:
        return _Plan("download", url, sha256 or KERAS_MNIST_SHA256)
    try:
        if source.is_dir():
            if sha256 is not None:
                raise SourceError(
                    f"--sha256 checks an npz, but {source} is a directory of IDX files that is converted "
                    "here (the npz's hash is not known in advance); drop --sha256 (each IDX file's "
                    "sha256 is recorded in the manifest)"
                )
            found = {key: _find_idx(source, stem) for key, stem in IDX_FILES.items()}
            missing = [IDX_FILES[key] for key, path in found.items() if path is None]
            if missing:
                present = sorted(p.name for p in source.iterdir())
                raise SourceError(
                    f"{source} lacks the IDX file(s) {missing} (each may end in .gz); it holds {present}. "
                    f"Copy all four of {list(IDX_FILES.values())}, or pass --from a mnist.npz"
                )
            files = {key: path for key, path in found.items() if path is not None}
            return _Plan(
                "idx",
                str(source),
                None,
                idx_files=files,
                source_files={path.name: sha256_file(path) for path in files.values()},
            )
        if not source.is_file():
            raise SourceError(
                f"--from {source}: no such file or directory; give the copied mnist.npz or a directory "
                "holding the four MNIST IDX files"
            )
        # Without --sha256 the expected hash is the source's own: the cache then counts as
        # up to date exactly when it already holds this very file.
        digest = sha256_file(source)
    except OSError as exc:
        raise SourceError(f"cannot read --from {source}: {exc.strerror or exc}") from exc
    if sha256 is not None and digest != sha256:
        raise HashMismatchError(
            f"sha256 mismatch for {source}: expected {sha256}, got {digest}. The copy is incomplete "
            "or a different file; copy it again (or pass the right --sha256 for a file you trust)",
            expected=sha256,
            got=digest,
        )
    return _Plan("npz", str(source), digest)


# ---------------------------------------------------------------------------- the cache


def _cached_manifest(target: Path, plan: _Plan) -> Optional[dict[str, Any]]:
    """The manifest of a cached file that already satisfies ``plan``, else None (and why, logged)."""
    if not target.exists() and not manifest_path(target).exists():
        return None
    try:
        # Hash against manifest, then the arrays' headers: the file that passed full validation.
        manifest = check_cached(target)
        if plan.expected_sha256 is not None and manifest["sha256"] != plan.expected_sha256:
            log.info(
                "%s holds sha256 %s (from %s), not the expected %s; replacing it",
                target,
                manifest["sha256"],
                manifest.get("source", "unknown source"),
                plan.expected_sha256,
            )
            return None
        if plan.kind == "idx" and manifest.get("source_files") != plan.source_files:
            log.info("%s was not built from these IDX files; replacing it", target)
            return None
    except (CacheMissingError, CacheCorruptError, DatasetError, OSError) as exc:
        log.info("not using the cached file: %s", exc)
        return None
    return manifest


def _ensure_writable(cache_dir: Path) -> None:
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
        raise _cache_error(exc, cache_dir, "checking that it is writable") from exc


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[bool]:
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
            raise _cache_error(exc, cache_dir, "creating the lock file") from exc
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


def _sweep_stale(cache_dir: Path, target: Path) -> None:
    """Remove staging leftovers of a prefetch that was killed (SIGKILL skips ``finally``).

    Only called while holding the lock, when no other prefetch can be writing them.
    """
    for stale in cache_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Probes are not swept: they are written before the lock is taken and removed at once.
    for stale in cache_dir.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


# ---------------------------------------------------------------------------- download


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    # pooch logs "Downloading data from ... to file <staging path>": the private staging path
    # would only confuse; we log our own line naming the final target instead.
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(
    url: str,
    staging: Path,
    fname: str,
    sha256: str,
    *,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    progress: bool,
) -> Path:
    """Download ``url`` into ``staging`` with pooch, retrying transient failures.

    pooch does the streaming, the hash check and the removal of a bad download. We wrap it in
    our own retry loop rather than using ``pooch.create(retry_if_failed=...)``: pooch retries
    every RequestException and ValueError alike, with a linear wait, so it would retry a 404
    or a hash mismatch (which cannot succeed) just as often as a dropped connection. Here only
    transient failures (connection errors, timeouts, truncated bodies, HTTP 5xx and 429) are
    retried, with exponential backoff.

    Raises:
        NetworkError, HttpError, TruncatedDownloadError, HashMismatchError.
    """
    # Imported here so that `--help` and the already-cached path do not pay for them.
    import pooch
    import requests

    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=timeout_s)
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            with _quiet_pooch():
                return Path(
                    pooch.retrieve(
                        url, known_hash=f"sha256:{sha256}", fname=fname, path=staging, downloader=downloader
                    )
                )
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            reason = exc.response.reason if exc.response is not None else ""
            cause = f"HTTP {status} {reason}".strip()
            transient = status >= 500 or status == 429
            advice = {
                404: "check --url (the file is not there)",
                401: "the server wants credentials; download the file elsewhere and use --from",
                403: "access denied (a proxy or firewall may block it); download the file elsewhere and use --from",
            }.get(status, "try again later, use a mirror with --url, or copy the file by hand and use --from")
            error: PrefetchError = HttpError(f"{cause} from {url} ({attempt} attempt(s)); {advice}", status, url)
            error.__cause__ = exc
        except requests.exceptions.SSLError as exc:
            transient = False  # a certificate problem does not go away by itself
            cause = _reason(exc)
            error = NetworkError(
                f"TLS error talking to {url}: {cause}. If your site inspects HTTPS, point "
                f"REQUESTS_CA_BUNDLE at its CA certificate. {_hand_copy_hint(url, sha256)}"
            )
            error.__cause__ = exc
        except requests.exceptions.ChunkedEncodingError as exc:
            # urllib3 enforces Content-Length: a body that ends early surfaces here.
            transient = True
            cause = _reason(exc)
            error = TruncatedDownloadError(
                f"the download from {url} was cut off before the end ({cause}; {attempt} attempt(s)). The "
                f"connection is unreliable; try again later. {_hand_copy_hint(url, sha256)}"
            )
            error.__cause__ = exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            transient = True
            cause = f"timed out after {timeout_s:g} s" if isinstance(exc, requests.Timeout) else _reason(exc)
            error = NetworkError(f"cannot reach {url}: {cause} ({attempt} attempt(s)). {_hand_copy_hint(url, sha256)}")
            error.__cause__ = exc
        except requests.RequestException as exc:
            # Malformed or unsupported URLs (no scheme, file://): retrying cannot help.
            raise PrefetchError(
                f"cannot download {url!r}: {exc}. Give an http(s) URL with --url, or a local file with --from"
            ) from exc
        except ValueError as exc:
            # pooch raises a bare ValueError on a hash mismatch, after deleting the download.
            match = _HASH_GOT.search(str(exc))
            got = match.group(1).lower() if match else None
            raise HashMismatchError(
                f"sha256 mismatch for {url}: expected {sha256}, got {got or 'another hash'}. The download "
                "was corrupted, or the server sent a different file (e.g. an error page); nothing was "
                "kept. If you use a mirror (--url) that serves a rebuilt file you trust, pass its hash "
                "with --sha256",
                expected=sha256,
                got=got,
            ) from exc
        if not transient or attempt == attempts:
            raise error
        delay_s = backoff_s * 2 ** (attempt - 1)
        log.warning("attempt %d of %d for %s failed (%s); retrying in %.1f s", attempt, attempts, url, cause, delay_s)
        time.sleep(delay_s)
    raise AssertionError("unreachable: the loop returns or raises")


def _reason(exc: BaseException) -> str:
    """The useful part of a requests error, e.g. "[Errno 111] Connection refused".

    requests nests urllib3's errors into long reprs ("HTTPConnectionPool(...): Max retries
    exceeded ... (Caused by NewConnectionError(...))"); users need only the innermost reason.
    """
    text = str(exc)
    incomplete = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text)
    if incomplete:
        return f"received {incomplete.group(1)} bytes, {incomplete.group(2)} more were announced"
    errno_reason = re.search(r"\[Errno -?\d+\] [^'\"()]+", text)
    if errno_reason:
        return errno_reason.group(0).strip()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- staging


def _stage(plan: _Plan, staging: Path, fname: str, **download: Any) -> Path:
    """Produce the candidate npz inside ``staging`` from the plan's source."""
    if plan.kind == "download":
        assert plan.expected_sha256 is not None
        return _download(plan.source, staging, fname, plan.expected_sha256, **download)
    import numpy as np

    staged = staging / fname
    if plan.kind == "npz":
        shutil.copyfile(plan.source, staged)
        return staged
    arrays = {key: read_idx(path) for key, path in plan.idx_files.items()}
    validate_arrays(arrays, source=plan.source)
    with open(staged, "wb") as fh:
        # Uncompressed, like Keras' own mnist.npz, so reading it costs no decompression.
        np.savez(fh, **arrays)
    return staged


def _install(staged: Path, target: Path, manifest: dict[str, Any]) -> None:
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


# ---------------------------------------------------------------------------- public API


def prefetch(
    target: Path,
    *,
    url: str = KERAS_MNIST_URL,
    sha256: Optional[str] = None,
    source: Optional[Path] = None,
    force: bool = False,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: Optional[bool] = None,
) -> dict[str, Any]:
    """Place a verified MNIST npz at ``target`` with its manifest beside it; return the manifest.

    Idempotent: when ``target`` already matches its manifest, holds valid arrays and has the
    expected hash, nothing is fetched. Concurrent calls on the same cache serialise on a lock
    file and the later one finds the earlier one's result.

    Args:
        target: Final path of the npz (``mnist_hpc.config.cache_file``).
        url: Where to download from when ``source`` is None.
        sha256: Expected hex sha256 of the npz. None means Keras' pinned hash for a download,
            and no check (beyond the arrays' validation) for ``source``.
        source: A hand-copied ``.npz``, or a directory of the four MNIST IDX files (each
            optionally ``.gz``), to import instead of downloading.
        force: Replace the cached file even when it is valid.
        retries: Extra attempts after a transient network failure.
        backoff_s: Wait before the first retry; doubled for each further one.
        timeout_s: Timeout of each network request (connect, and between bytes).
        progress: Show a progress bar; None shows one when stderr is a terminal.

    Returns:
        The manifest: source, sha256, size, shapes, created (ISO-8601 UTC), mnist_hpc version.

    Raises:
        PrefetchError: a subclass naming the failure (network, HTTP status, hash, truncation,
            source, unwritable or full cache).
        DatasetError: the file is not a valid MNIST npz (or the IDX files are invalid).
    """
    target = Path(target).expanduser().absolute()
    cache_dir = target.parent
    expected = _normalise_sha256(sha256) if sha256 is not None else None
    source = Path(source).expanduser().absolute() if source is not None else None
    plan = _plan(url, expected, source)

    if not force and (manifest := _cached_manifest(target, plan)) is not None:
        log.info("already cached and verified: %s", target)
        return manifest

    _ensure_writable(cache_dir)
    with _cache_lock(cache_dir) as locked:
        # Another prefetch may have filled the cache while we waited for the lock.
        if not force and (manifest := _cached_manifest(target, plan)) is not None:
            log.info("already cached and verified: %s", target)
            return manifest
        if locked:
            _sweep_stale(cache_dir, target)
        log.info("fetching %s -> %s", plan.source, target)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=cache_dir))
        except OSError as exc:
            raise _cache_error(exc, cache_dir, "creating a staging directory") from exc
        try:
            staged = _stage(
                plan,
                staging,
                target.name,
                retries=retries,
                backoff_s=backoff_s,
                timeout_s=timeout_s,
                progress=sys.stderr.isatty() if progress is None else progress,
            )
            shapes = _validate_staged(staged, plan)
            digest = sha256_file(staged)
            if plan.expected_sha256 is not None and digest != plan.expected_sha256:
                # The download was checked by pooch; this catches a source changed while copied.
                raise HashMismatchError(
                    f"sha256 mismatch for {plan.source}: expected {plan.expected_sha256}, got {digest} "
                    "(the file changed while it was copied?); try again",
                    expected=plan.expected_sha256,
                    got=digest,
                )
            manifest = {
                "source": plan.source,
                "source_kind": plan.kind,
                "sha256": digest,
                "size": staged.stat().st_size,
                "shapes": shapes,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "mnist_hpc_version": __version__,
            }
            if plan.source_files:
                manifest["source_files"] = plan.source_files
            _install(staged, target, manifest)
        except OSError as exc:
            # requests' exceptions are OSErrors too, but _download has translated them all.
            if exc.errno in _NO_SPACE | _NOT_WRITABLE:
                raise _cache_error(exc, cache_dir, f"writing {target.name}") from exc
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("cached and verified: %s (sha256 %s)", target, manifest["sha256"])
    return manifest


def _validate_staged(staged: Path, plan: _Plan) -> dict[str, list[int]]:
    """Validate the staged npz, naming the real source (the staging path is private)."""
    try:
        return validate_arrays(read_npz(staged), source=plan.source)
    except DatasetError as exc:
        message = str(exc).replace(str(staged), "the file")
        raise DatasetError(f"rejected {plan.source}: {message}; nothing was written to the cache") from exc


# ---------------------------------------------------------------------------- CLI


def _sha256_arg(value: str) -> str:
    try:
        return _normalise_sha256(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _bounded(kind: type, minimum: float, *, inclusive: bool) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` that is >= (or >) ``minimum``."""
    relation = ">=" if inclusive else ">"

    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {relation} {minimum:g}, got {value!r}") from None
        if not (number >= minimum if inclusive else number > minimum):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"must be {relation} {minimum:g}, got {value}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-hpc-prefetch`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Put a verified mnist.npz into the cache that training jobs read (data.cache_dir).\n"
            "Run it on a login node: compute nodes have no internet. Prints the cached file's path."
        ),
        epilog=(
            "Without internet: download the file elsewhere, copy it over and use --from. Examples:\n"
            f"  {PROG}\n"
            f"  {PROG} data.cache_dir=/scratch/$USER/mnist-hpc\n"
            f"  {PROG} --from ~/mnist.npz\n"
            f"  {PROG} --from ~/mnist-idx/   # train-images-idx3-ubyte(.gz) and the other three"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=f"download from this URL (default: {KERAS_MNIST_URL})")
    where.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="PATH",
        help="import a hand-copied mnist.npz, or a directory holding the four MNIST IDX files (optionally .gz)",
    )
    parser.add_argument(
        "--sha256",
        type=_sha256_arg,
        metavar="HEX",
        help=(
            "expected sha256 of the npz (default for downloads: the hash Keras pins; "
            "with --from: checked only if given)"
        ),
    )
    parser.add_argument("--force", action="store_true", help="replace the cached file even if it is valid")
    parser.add_argument(
        "--retries",
        type=_bounded(int, 0, inclusive=True),
        default=3,
        metavar="N",
        help="retries after a transient network error (default: 3)",
    )
    parser.add_argument(
        "--backoff-s",
        type=_bounded(float, 0, inclusive=True),
        default=1.0,
        metavar="S",
        help="wait before the first retry, doubled for each further one (default: 1.0)",
    )
    parser.add_argument(
        "--timeout-s",
        type=_bounded(float, 0, inclusive=False),
        default=60.0,
        metavar="S",
        help="timeout per network request (default: 60)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides of the training config, e.g. data.cache_dir=/scratch/$USER/mnist-hpc",
    )
    return parser


def _describe_config_error(exc: BaseException) -> str:
    # Hydra's own message is terse ("Could not override 'data.x'") and suggests `+key=`, which
    # the schema would reject anyway; the cause (e.g. "Key 'x' not in 'DataConfig'") says more.
    lines = []
    current: Optional[BaseException] = exc
    while current is not None:
        first = _first_line(current).rstrip(".")
        if first not in lines:
            lines.append(first)
        current = current.__cause__
    return "; ".join(lines)


def target_from_overrides(overrides: Sequence[str]) -> Path:
    """Compose the training config with ``overrides`` and return its cache file path.

    Uses the same YAML and schema as the training jobs, so prefetch fills exactly the file
    that they will read.

    Raises:
        mnist_hpc.config.ConfigError, hydra.errors.HydraException, omegaconf.errors.OmegaConfBaseException.
    """
    from hydra import compose, initialize_config_dir

    from mnist_hpc.config import cache_file, conf_dir, register_configs, to_typed

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return cache_file(to_typed(cfg).data)


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``mnist-hpc-prefetch``; return the exit code (0 ok, 1 failure, 2 usage error)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mnist_hpc.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help; return the code instead
        return exc.code if isinstance(exc.code, int) else 2
    try:
        target = target_from_overrides(args.overrides)
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: invalid override(s) {' '.join(args.overrides)}: {_describe_config_error(exc)}",
              file=sys.stderr)
        return 2

    # A handler per call, bound to the current stderr (tests swap it), removed afterwards.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        prefetch(
            target,
            url=args.url or KERAS_MNIST_URL,
            sha256=args.sha256,
            source=args.source,
            force=args.force,
            retries=args.retries,
            backoff_s=args.backoff_s,
            timeout_s=args.timeout_s,
        )
    except (PrefetchError, DatasetError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())

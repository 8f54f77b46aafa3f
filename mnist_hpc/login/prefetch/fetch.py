"""``prefetch()``: put a verified ``mnist.npz`` and its manifest into the cache (login node).

Compute nodes have no internet, so this runs once on a login node (or anywhere that can
write the shared cache) and training jobs only ever read the result (see
:func:`mnist_hpc.compute.data.load_mnist`). Three ways to fill the cache:

* download Keras' ``mnist.npz`` (or a mirror's, ``--url``), checked against a sha256;
* ``--from FILE.npz``: a file copied over by hand (``scp``) from a machine with internet;
* ``--from DIR``: the four original IDX files (optionally gzipped), converted to the npz.

A local source is validated before the cache is touched; a download is staged inside the
cache directory and validated there. The validated bytes become a content-addressed object,
and the manifest is switched to it last (see :mod:`mnist_hpc.cache`): a job never sees a
partial, invalid or mismatched file, and on any failure the staging area is removed.

Nothing here imports TensorFlow, directly or indirectly: the login node stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from mnist_hpc import __version__
from mnist_hpc.cache import FORMAT, KERAS_MNIST_SHA256, KERAS_MNIST_URL, CacheError, check_cached, manifest_path
from mnist_hpc.dataset import MAX_NPZ_BYTES, DatasetError, load_arrays
from mnist_hpc.login.prefetch import store
from mnist_hpc.login.prefetch.errors import (
    NO_SPACE,
    NOT_WRITABLE,
    PROG,
    PrefetchError,
    cache_error,
)
from mnist_hpc.login.prefetch.sources import (
    Plan,
    normalise_sha256,
    plan_source,
    prepare,
)

# The whole download's deadline: MNIST's 11 MB at 12 KB/s. requests' timeout is per read, so
# a server trickling a byte now and then would otherwise keep a prefetch going for hours.
DEFAULT_MAX_TIME_S = 900.0

log = logging.getLogger("mnist_hpc.login.prefetch")


def _up_to_date(target: Path, plan: Plan, *, explain: bool) -> Optional[dict[str, Any]]:
    """The manifest of a cache that already satisfies ``plan`` (logged), else None (why: logged if ``explain``)."""
    say = log.info if explain else log.debug
    try:
        # Manifest, object hash, then the arrays' headers: the file that passed full validation.
        manifest = check_cached(target)
    except CacheError as exc:
        if isinstance(exc.__cause__, PermissionError):
            # Not missing: another member's dataset, which their jobs may be reading.
            raise PrefetchError(f"{exc}. A plain {PROG} does not replace a cache it cannot read; "
                                "--force replaces it") from exc
        if manifest_path(target).exists() or os.path.lexists(target):
            say("not using the cached file: %s", exc)
        return None
    if plan.expected_sha256 is not None and manifest["sha256"] != plan.expected_sha256:
        say("%s holds sha256 %s (from %s), not the expected %s; replacing it",
            target, manifest["sha256"], manifest["source"], plan.expected_sha256)
        return None
    if plan.kind == "idx" and manifest.get("source_files") != plan.source_files:
        say("%s was not built from these IDX files; replacing it", target)
        return None
    note = ""
    if plan.kind == "download" and manifest["sha256"] != KERAS_MNIST_SHA256:
        # A plain prefetch after `--from`: the imported file is valid and stays.
        note = (f" (sha256 {manifest['sha256'][:12]}…, from {manifest['source']}; it differs from the "
                f"file Keras pins, {KERAS_MNIST_SHA256[:12]}…; --force replaces it with a download)")
    log.info("already cached and verified: %s%s", target, note)
    return manifest


def _tidy(target: Path, manifest: dict[str, Any], grace_s: float) -> None:
    """Repair the link and drop replaced objects when due; never waits and never fails the caller."""
    if not store.needs_tidying(target, manifest, grace_s):
        return
    try:
        with store.cache_lock(target.parent, wait=False):
            store.tidy(target, grace_s)
    except (BlockingIOError, PrefetchError, OSError) as exc:  # busy or read-only for us: next time
        log.debug("cache not tidied: %s", exc)


def _candidate(
    plan: Plan, prepared: Optional[tuple[bytes, dict[str, list[int]]]], staged: Path, **options: Any
) -> tuple[Path, bytes, dict[str, list[int]]]:
    """The staged npz, its bytes and their validated shapes: a local source's, or a download's."""
    if prepared is not None:
        data, shapes = prepared
        store.stage_bytes(staged, data)
        return staged, data, shapes
    from mnist_hpc.login.prefetch.download import (
        download,  # not needed on the valid-cache path
    )

    # The bound that --from applies (sources.plan_source), enforced while the bytes arrive.
    staged = download(plan.source, staged.parent, staged.name, plan.expected_sha256 or KERAS_MNIST_SHA256,
                      max_bytes=MAX_NPZ_BYTES, **options)
    data = staged.read_bytes()
    return staged, data, load_arrays(data, plan.source)[1]


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
    max_time_s: float = DEFAULT_MAX_TIME_S,
    progress: Optional[bool] = None,
    grace_s: float = store.GC_GRACE_S,
) -> dict[str, Any]:
    """Place a verified MNIST npz at ``target`` with its manifest beside it; return the manifest.

    Idempotent: a cache that matches its manifest, holds valid arrays and has the expected hash
    is kept and nothing is fetched. Without ``sha256`` any valid cache counts as up to date for
    a download (a file imported with ``source`` stays; ``force`` replaces it). Concurrent calls
    on the same cache serialise on a lock file and the later one finds the earlier one's result.

    Args:
        target: The npz's path, ``mnist_hpc.cache.cache_file`` (a link to the current object).
        url: Where to download from when ``source`` is None.
        sha256: Expected hex sha256 of the npz. None: Keras' pinned hash checks a download, and
            an existing valid cache is kept whatever its hash.
        source: A hand-copied ``.npz``, or a directory of the four MNIST IDX files (each
            optionally ``.gz``), to import instead of downloading.
        force: Replace the cached file even when it is valid.
        retries: Extra attempts after a transient network failure.
        backoff_s: Wait before the first retry; doubled for each further one.
        timeout_s: Timeout of each network request (connect, and between bytes).
        max_time_s: Deadline of the whole download, all attempts and waits included.
        progress: Show a progress bar; None shows one when stderr is a terminal.
        grace_s: How long a replaced object stays for jobs that read the previous manifest.

    Returns:
        The manifest: source, sha256, size, shapes, created (ISO-8601 UTC), mnist_hpc version.

    Raises:
        PrefetchError: a subclass naming the failure (network, HTTP status, deadline, hash,
            truncation, source, lock, unwritable or full cache).
        DatasetError: the file is not a valid MNIST npz (or the IDX files are invalid).
    """
    target = Path(target).expanduser().absolute()
    cache_dir = target.parent
    expected = normalise_sha256(sha256) if sha256 is not None else None
    source = Path(source).expanduser().absolute() if source is not None else None
    plan = plan_source(url, expected, source)

    if not force and (manifest := _up_to_date(target, plan, explain=True)) is not None:
        _tidy(target, manifest, grace_s)
        return manifest

    prepared = None
    if plan.kind != "download":
        try:  # validated before anything is written: a bad file leaves no trace
            prepared = prepare(plan)
        except DatasetError as exc:
            raise DatasetError(f"{exc}; nothing was written to the cache") from exc
    # The bytes the cache must take (named if the disk is full); a download's are known once they arrive.
    size = len(prepared[0]) if prepared is not None else None
    store.ensure_writable(cache_dir, size)
    with store.cache_lock(cache_dir):
        # Another prefetch may have filled the cache while we waited for the lock.
        if not force and (manifest := _up_to_date(target, plan, explain=False)) is not None:
            return manifest
        store.sweep_stale(cache_dir, target)
        log.info("fetching %s -> %s", plan.label or plan.source, target)
        staging = store.make_staging(cache_dir, size)
        try:
            staged, data, shapes = _candidate(
                plan, prepared, staging / target.name, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                max_time_s=max_time_s, progress=sys.stderr.isatty() if progress is None else progress,
            )
            size = len(data)
            manifest = {
                "format": FORMAT,
                "source": plan.source,
                "source_kind": plan.kind,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "shapes": shapes,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "mnist_hpc_version": __version__,
            }
            if plan.source_files:
                manifest["source_files"] = plan.source_files
            store.install(staged, target, manifest)
        except DatasetError as exc:
            raise DatasetError(f"{exc}; nothing was written to the cache") from exc
        except OSError as exc:
            # requests' exceptions are OSErrors too, but download() has translated them all.
            if exc.errno in NO_SPACE | NOT_WRITABLE:
                raise cache_error(exc, cache_dir, f"writing {target.name}", size) from exc
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            store.collect_garbage(target, grace_s)
    log.info("cached and verified: %s (sha256 %s)", target, manifest["sha256"])
    return manifest

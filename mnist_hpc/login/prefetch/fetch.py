"""``prefetch()``: put a verified ``mnist.npz`` and its manifest into the cache (login node).

Compute nodes have no internet, so this runs once on a login node (or anywhere that can
write the shared cache) and training jobs only ever read the result (see
:func:`mnist_hpc.compute.data.load_mnist`). Three ways to fill the cache:

* download Keras' ``mnist.npz`` (or a mirror's, ``--url``), checked against a sha256;
* ``--from FILE.npz``: a file copied over by hand (``scp``) from a machine with internet;
* ``--from DIR``: the four original IDX files (optionally gzipped), converted to the npz.

Whatever the source, the file is staged inside the cache directory, validated (keys, dtypes,
shapes, labels), then renamed into place, and its manifest is written after it; on any
failure the staging area is removed, so the cache never holds a partial or invalid file.

Nothing here imports TensorFlow, directly or indirectly: the login node stays fast.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from mnist_hpc import __version__
from mnist_hpc.cache import (
    CacheCorruptError,
    CacheMissingError,
    DatasetError,
    check_cached,
    manifest_path,
    read_npz,
    validate_arrays,
)
from mnist_hpc.config import KERAS_MNIST_URL
from mnist_hpc.io import sha256_file
from mnist_hpc.login.prefetch.download import download
from mnist_hpc.login.prefetch.errors import NO_SPACE, NOT_WRITABLE, HashMismatchError, cache_error
from mnist_hpc.login.prefetch.sources import Plan, normalise_sha256, plan_source, write_source
from mnist_hpc.login.prefetch.store import STAGING_PREFIX, cache_lock, ensure_writable, install, sweep_stale

log = logging.getLogger("mnist_hpc.login.prefetch")


def _cached_manifest(target: Path, plan: Plan) -> Optional[dict[str, Any]]:
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


def stage(plan: Plan, staging: Path, fname: str, **options: Any) -> Path:
    """Produce the candidate npz inside ``staging`` from the plan's source."""
    if plan.kind == "download":
        assert plan.expected_sha256 is not None
        return download(plan.source, staging, fname, plan.expected_sha256, **options)
    return write_source(plan, staging / fname)


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
    expected = normalise_sha256(sha256) if sha256 is not None else None
    source = Path(source).expanduser().absolute() if source is not None else None
    plan = plan_source(url, expected, source)

    if not force and (manifest := _cached_manifest(target, plan)) is not None:
        log.info("already cached and verified: %s", target)
        return manifest

    ensure_writable(cache_dir)
    with cache_lock(cache_dir) as locked:
        # Another prefetch may have filled the cache while we waited for the lock.
        if not force and (manifest := _cached_manifest(target, plan)) is not None:
            log.info("already cached and verified: %s", target)
            return manifest
        if locked:
            sweep_stale(cache_dir, target)
        log.info("fetching %s -> %s", plan.source, target)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=cache_dir))
        except OSError as exc:
            raise cache_error(exc, cache_dir, "creating a staging directory") from exc
        try:
            staged = stage(
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
            install(staged, target, manifest)
        except OSError as exc:
            # requests' exceptions are OSErrors too, but _download has translated them all.
            if exc.errno in NO_SPACE | NOT_WRITABLE:
                raise cache_error(exc, cache_dir, f"writing {target.name}") from exc
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("cached and verified: %s (sha256 %s)", target, manifest["sha256"])
    return manifest


def _validate_staged(staged: Path, plan: Plan) -> dict[str, list[int]]:
    """Validate the staged npz, naming the real source (the staging path is private)."""
    try:
        return validate_arrays(read_npz(staged), source=plan.source)
    except DatasetError as exc:
        message = str(exc).replace(str(staged), "the file")
        raise DatasetError(f"rejected {plan.source}: {message}; nothing was written to the cache") from exc

"""Checks before anything is queued: a job that cannot succeed is refused on the login node.

Each check raises :class:`PreflightError`, whose message starts with "nothing was queued" and
says what to do. Numpy at most, never TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from hydra.errors import CompactHydraException

from mnist_hpc.config import Config, cache_file

if TYPE_CHECKING:  # pragma: no cover
    from mnist_hpc.login.launcher.compose import PlannedJob


class PreflightError(CompactHydraException):
    """A check before queueing failed; nothing was submitted.

    A CompactHydraException, so Hydra prints the message alone, not a traceback.
    """


def check_cache(cfg: Config) -> None:
    """Refuse to queue a job whose data cache is missing or invalid (numpy only, no TensorFlow)."""
    from mnist_hpc.cache import CacheCorruptError, CacheMissingError, DatasetError, check_cached

    path = cache_file(cfg.data)
    try:
        check_cached(path)
    except (CacheMissingError, CacheCorruptError, DatasetError) as exc:
        raise PreflightError(f"nothing was queued: {exc}") from exc


def check_writable(directory: Path) -> None:
    """Refuse to queue when the run directories cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            f"nothing was queued: cannot write to the output directory {directory} ({exc.strerror}); "
            "set paths.output_root to a writable location (e.g. on $SCRATCH)"
        ) from exc


def preflight(planned: Sequence["PlannedJob"]) -> None:
    """Check every distinct cache and run directory before anything is queued."""
    seen_caches: set[Path] = set()
    for job in planned:
        path = cache_file(job.typed.data)
        if path not in seen_caches:
            check_cache(job.typed)
            seen_caches.add(path)
    for parent in sorted({job.run_dir.parent for job in planned}):
        check_writable(parent)

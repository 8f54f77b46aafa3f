"""``mnist-hpc-prefetch``: put a verified ``mnist.npz`` and its manifest into the cache (login node).

The parts, by concern: :mod:`.errors` (error types and their hints), :mod:`.sources` (what to
fetch, the IDX reader), :mod:`.download` (HTTP with retries), :mod:`.store` (the cache
directory: lock, staging, install), :mod:`.fetch` (:func:`prefetch` itself), :mod:`.cli`.
"""

from mnist_hpc.login.prefetch.cli import main, target_from_overrides
from mnist_hpc.login.prefetch.errors import (
    CacheFullError,
    CacheNotWritableError,
    DownloadTooLargeError,
    HashMismatchError,
    HttpError,
    NetworkError,
    PrefetchError,
    SourceError,
    TruncatedDownloadError,
)
from mnist_hpc.login.prefetch.fetch import prefetch

__all__ = [
    "CacheFullError",
    "CacheNotWritableError",
    "DownloadTooLargeError",
    "HashMismatchError",
    "HttpError",
    "NetworkError",
    "PrefetchError",
    "SourceError",
    "TruncatedDownloadError",
    "main",
    "prefetch",
    "target_from_overrides",
]

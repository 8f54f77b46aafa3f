"""``mnist-hpc-prefetch``: put a verified ``mnist.npz`` and its manifest into the cache (login node)."""

from mnist_hpc.login.prefetch.fetch import main, prefetch

__all__ = ["main", "prefetch"]

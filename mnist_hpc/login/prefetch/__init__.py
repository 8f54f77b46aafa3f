"""``mnist-hpc-prefetch``: put a verified ``mnist.npz`` and its manifest into the cache (login node).

The parts, by concern: :mod:`.errors` (error types and their hints), :mod:`.sources` (what to
fetch, the IDX reader), :mod:`.download` (HTTP with retries), :mod:`.store` (the cache
directory: lock, staging, install), :mod:`.fetch` (:func:`prefetch` itself), :mod:`.cli`. Import
them by name: this package's face imports nothing, so that its modules import one another one way.
"""

"""Hostile tester's second pass (issue 21, I6): the cache's readers open a FIFO and block.

``cache.read_manifest`` and ``cache._read_object`` use plain ``open``: a FIFO in place of
``mnist.npz.manifest.json`` or of the object in ``.mnist.npz.objects/`` (both in a directory the
group may write, by design, in a shared cache) blocks whoever reads the cache: seen, the
launcher's preflight (``check_cached``, holding the sweep's launch lock), ``mnist-hpc-prefetch``,
and so every job. Every other reader of a file another process wrote refuses what is not a
regular file (mnist_hpc.io).

Found by the second hostile pass (issue 21); the reader runs in a child process with a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, fill_cache

CHECK = (
    "import sys\n"
    "from pathlib import Path\n"
    "from mnist_hpc import cache\n"
    "try:\n"
    "    cache.check_cached(Path(sys.argv[1]))\n"
    "    print('accepted')\n"
    "except cache.CacheError as exc:\n"
    "    print('refused:', exc)\n"
)


@pytest.mark.parametrize("which", ["manifest", "object"])
def test_a_fifo_in_the_cache_is_refused_without_blocking(tmp_path: Path, which: str) -> None:
    npz = fill_cache(tmp_path / "cache")
    victim = npz.with_name(npz.name + ".manifest.json") if which == "manifest" else npz.resolve()
    victim.unlink()
    os.mkfifo(victim)
    try:
        proc = subprocess.run([sys.executable, "-c", CHECK, str(npz)], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"checking the cache blocked on the FIFO {victim} for 30 s")
    assert proc.returncode == 0 and proc.stdout.startswith("refused:") and victim.name in proc.stdout, \
        proc.stdout + proc.stderr[-2000:]

"""Jobs reading the cache while ``prefetch --force`` replaces it, in real processes.

A reader process loads the dataset in a loop (the compute-node loader) while a writer process
switches the cache between two datasets, each switch removing the replaced object at once (no
grace period: the hardest case for readers). Every load must give arrays and a sha256 that
belong together, or one of the cache's own errors; never one dataset's arrays with the other's
hash.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from mnist_hpc.login.prefetch import fetch as prefetch_fetch
from tests.helpers import subprocess_env, synthetic_mnist, write_npz

SWITCHES = 16
FINGERPRINT = textwrap.dedent("""
    import hashlib
    def fingerprint(data):
        parts = (data.x_train, data.y_train, data.x_test, data.y_test)
        return hashlib.sha256(b"".join(a.tobytes() for a in parts)).hexdigest()
""")

READER = FINGERPRINT + textwrap.dedent("""
    import sys
    from pathlib import Path
    from mnist_hpc.cache import CacheError
    from mnist_hpc.compute.data import load_mnist
    from mnist_hpc.config import DataConfig
    cache_dir, stop = sys.argv[1], Path(sys.argv[2])
    cfg = DataConfig(cache_dir=cache_dir)
    print("started", flush=True)
    while not stop.exists():
        try:
            data = load_mnist(cfg)
            print("ok", data.sha256, fingerprint(data), flush=True)
        except CacheError as exc:
            print("error", type(exc).__name__, str(exc).replace("\\n", "<NL>"), flush=True)
""")

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mnist_hpc.login.prefetch.fetch import prefetch
    target, switches, sources = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    for i in range(switches):
        prefetch(target, source=Path(sources[i % 2]), force=True, grace_s=0.0)
        print("switched", i, flush=True)
""")


def expected_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    parts = [arrays[k].reshape((arrays[k].shape[0], -1)) for k in ("x_train", "y_train", "x_test", "y_test")]
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in parts)).hexdigest()


def test_readers_see_consistent_pairs_while_force_replaces_the_cache(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    datasets = [synthetic_mnist(n_train=200, n_test=50, seed=1), synthetic_mnist(n_train=300, n_test=50, seed=2)]
    sources = [write_npz(tmp_path / f"incoming-{i}" / "mnist.npz", d) for i, d in enumerate(datasets)]
    pairs = {}
    for source, arrays in zip(sources, datasets):
        manifest = prefetch_fetch.prefetch(cache_dir / "mnist.npz", source=source, force=True, grace_s=0.0)
        pairs[manifest["sha256"]] = expected_fingerprint(arrays)
    assert len(set(pairs)) == 2 and len(set(pairs.values())) == 2

    stop = tmp_path / "stop"
    env = subprocess_env()
    reader = subprocess.Popen([sys.executable, "-c", READER, str(cache_dir), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert reader.stdout.readline().strip() == "started", reader.stderr.read()
        writer = subprocess.run([sys.executable, "-c", WRITER, str(cache_dir / "mnist.npz"), str(SWITCHES),
                                 *map(str, sources)], capture_output=True, text=True, env=env, timeout=300)
    finally:
        stop.touch()
        reader_out, reader_err = reader.communicate(timeout=120)
    lines = reader_out.splitlines()
    assert writer.returncode == 0, writer.stderr
    assert reader.returncode == 0, reader_err  # no traceback: only the cache's own errors were caught
    switches = len(writer.stdout.splitlines())
    loads = [line.split() for line in lines if line.startswith("ok ")]
    errors = [line for line in lines if line.startswith("error ")]
    # The reader really ran across switches: it saw the dataset change under it more than once.
    changes = sum(a[1] != b[1] for a, b in zip(loads, loads[1:]))
    assert switches == SWITCHES and changes >= 2, (switches, changes, len(loads), errors[:3])
    wrong = [(sha, fp) for _, sha, fp in loads if pairs[sha] != fp]
    assert not wrong, f"{len(wrong)} of {len(loads)} loads paired arrays with another file's sha256"
    # A clean error is allowed (the cache kept changing under a reader), never a crash.
    assert all(e.split()[1] in ("CacheMissingError", "CacheCorruptError") for e in errors), errors[:3]
    assert len(errors) < len(loads)

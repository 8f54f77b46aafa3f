"""XLA programs kept between jobs (``paths.compile_cache``): same results, nothing unsafe ever loaded.

Each run is its own process (TensorFlow reads its XLA flags once per process).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TRAIN, strip_seconds, tiny_overrides, train_cli, weights

SAVED = "compile cache: saved"


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "not" / "there" / "yet"


def run(synthetic_cache: Path, tmp_path: Path, store_root: Path, name: str, *extra: str) -> tuple[str, Path]:
    """One run in its own process: (its log, its run directory)."""
    run_dir = tmp_path / name
    args = tiny_overrides(synthetic_cache, tmp_path) + [
        "train.epochs=2", "model.dropout=0.2", f"paths.compile_cache={store_root}", f"hydra.run.dir={run_dir}", *extra,
    ]
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc[-3000:]
    return proc.stdout + proc.stderr, run_dir


def entries(store_root: Path) -> list[Path]:
    """<root>/<TensorFlow build, CPU, flags>/<shapes>/<entry>.<sha256>"""
    return sorted(p for p in store_root.glob("*/*/*") if not p.name.startswith("."))


def loaded(log: str, n: int) -> bool:
    return f"compile cache: {n} program(s) for this trial's shapes" in log


def result(run_dir: Path) -> tuple[dict, list[np.ndarray]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    kept = {k: v for k, v in metrics.items() if k not in ("wall_time_s", "train_time_s", "phases")}
    kept["history"] = strip_seconds(kept["history"])
    return kept, weights(run_dir)


def assert_same(a: tuple[dict, list[np.ndarray]], b: tuple[dict, list[np.ndarray]]) -> None:
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_a_warm_store_gives_the_cold_runs_results_without_compiling(synthetic_cache, tmp_path, store_root):
    cold, cold_dir = run(synthetic_cache, tmp_path, store_root, "cold")
    assert SAVED in cold, cold[-3000:]
    stored = entries(store_root)
    assert stored, "the cold run saved no program"
    for entry in stored:  # each named by its content's sha256, private to this user
        assert entry.name.rsplit(".", 1)[1] == hashlib.sha256(entry.read_bytes()).hexdigest()
        assert entry.stat().st_mode & 0o077 == 0
    assert (store_root.stat().st_mode & 0o777) == 0o700

    warm, warm_dir = run(synthetic_cache, tmp_path, store_root, "warm")
    assert loaded(warm, len(stored)), warm[-3000:]
    # TensorFlow saves what it compiles: nothing saved is nothing compiled.
    assert SAVED not in warm, warm[-3000:]
    assert entries(store_root) == stored
    assert_same(result(cold_dir), result(warm_dir))


@pytest.mark.slow
def test_damaged_or_foreign_entries_are_never_loaded(synthetic_cache, tmp_path, store_root):
    _, cold_dir = run(synthetic_cache, tmp_path, store_root, "cold")
    stored = entries(store_root)
    [entry] = stored  # the training loop's program
    content = entry.read_bytes()
    half = content[: len(content) // 2]
    # Half a file under its own sha256: what publishing a file TensorFlow could not finish would give.
    entry.with_name(f"{entry.name.rsplit('.', 1)[0]}.{hashlib.sha256(half).hexdigest()}").write_bytes(half)
    flipped = bytearray(content)
    flipped[len(flipped) // 2] ^= 0xFF
    entry.write_bytes(bytes(flipped))  # damaged after it was saved
    (entry.parent / "xla_compile_cache__1__2__XLA_CPU_JIT.pb.not-a-hash").write_bytes(b"junk")
    planted = 0
    if os.getuid() == 0:  # CI runs as root: a file of another user's is never loaded either
        other = entry.parent / f"xla_compile_cache__9__9__XLA_CPU_JIT.pb.{hashlib.sha256(content).hexdigest()}"
        other.write_bytes(content)
        os.chown(other, 65534, 65534)
        planted = 1

    again, again_dir = run(synthetic_cache, tmp_path, store_root, "again")
    assert f"skipped {2 + planted} damaged, incomplete or not yours" in again, again[-3000:]
    assert loaded(again, 0)
    assert SAVED in again  # compiled again, and saved whole
    assert_same(result(cold_dir), result(again_dir))


@pytest.mark.slow
def test_a_store_others_can_write_is_not_used(synthetic_cache, tmp_path, store_root):
    _, cold_dir = run(synthetic_cache, tmp_path, store_root, "cold")
    store_root.chmod(0o777)
    shared, shared_dir = run(synthetic_cache, tmp_path, store_root, "shared")
    assert "compile cache off" in shared and "writable by others" in shared, shared[-3000:]
    assert "Traceback" not in shared
    assert_same(result(cold_dir), result(shared_dir))


@pytest.mark.slow
def test_off_when_null(synthetic_cache, tmp_path):
    proc, _ = run(synthetic_cache, tmp_path, tmp_path / "unused", "off", "paths.compile_cache=null")
    assert "compile cache" not in proc
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_two_jobs_filling_one_store_at_once(synthetic_cache, tmp_path, store_root):
    """Both compile and publish the same programs at the same time; the store stays whole."""
    procs = []
    for name in ("a", "b"):
        args = tiny_overrides(synthetic_cache, tmp_path) + [
            "train.epochs=2", "model.dropout=0.2", f"paths.compile_cache={store_root}", f"hydra.run.dir={tmp_path / name}",
        ]
        procs.append(subprocess.Popen(TRAIN + args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for entry in entries(store_root):
        assert entry.name.rsplit(".", 1)[1] == hashlib.sha256(entry.read_bytes()).hexdigest()
    assert not [p for p in store_root.glob("*/.*")], "a temporary file was left behind"
    warm, warm_dir = run(synthetic_cache, tmp_path, store_root, "warm")
    assert SAVED not in warm, warm[-3000:]
    assert_same(result(tmp_path / "a"), result(warm_dir))


@pytest.mark.slow
def test_the_flag_does_not_reach_child_processes_and_the_store_is_keyed_by_machine(tmp_path):
    code = (
        "import json, os, sys\n"
        "from mnist_hpc.compute.runtime import import_tensorflow\n"
        "tf = import_tensorflow()\n"
        "from mnist_hpc.compute import compile_cache\n"
        "from pathlib import Path\n"
        f"store = compile_cache.enable(Path({str(tmp_path / 'root')!r}))\n"
        "print(json.dumps({'store': str(store), 'env': os.environ.get('TF_XLA_FLAGS'),\n"
        "                  'again': str(compile_cache.enable(Path('/elsewhere')))}))\n"
    )

    def enable(**env: str) -> dict:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env}, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain = enable()
    assert plain["env"] is None  # restored: jobs this process starts do not inherit the private directory
    assert plain["again"] == plain["store"]  # decided once per process
    other = enable(XLA_FLAGS="--xla_cpu_enable_fast_math=true")
    assert other["store"] != plain["store"]  # programs compiled under other XLA flags are kept apart
    own = enable(TF_XLA_FLAGS="--tf_xla_persistent_cache_directory=/somewhere")
    assert own["store"] == "None" and own["env"] == "--tf_xla_persistent_cache_directory=/somewhere"


@pytest.mark.slow
def test_each_trial_of_a_process_loads_and_saves_under_its_own_store_root(tmp_path):
    """A packed task's trials may differ in ``paths``: the first trial turns the cache on, and
    every trial then uses the store its own config names (or none)."""
    whole = entry_bytes(b"key", b"hlo", b"executable")
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from mnist_hpc.compute.runtime import import_tensorflow\n"
        "import_tensorflow()\n"
        "from mnist_hpc.compute import compile_cache as cc\n"
        "a, b = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "store = cc.enable(a)\n"
        "saved = []\n"
        "for i, (root, shapes) in enumerate([(b, 'k'), (None, 'k'), (a, 'k'), (b, 'k')]):\n"
        "    loaded = cc.prepare(root, shapes)\n"
        "    (cc._active.private / f'entry_{i}.pb').write_bytes(bytes.fromhex(sys.argv[3]))\n"
        "    saved.append([loaded, cc.publish()])\n"
        "cc.prepare(b, 'k')\n"  # a trial that fails before it publishes: the next trial's prepare does
        "(cc._active.private / 'entry_4.pb').write_bytes(bytes.fromhex(sys.argv[3]))\n"
        "cc.prepare(a, 'k2')\n"  # a trial whose store cannot take its program (its shape directory gone)
        "(cc._active.private / 'entry_5.pb').write_bytes(bytes.fromhex(sys.argv[3]))\n"
        "shape = cc._active.shape; shape.rmdir(); shape.write_text('not a directory')\n"
        "saved.append([0, cc.publish()])\n"
        "cc.prepare(b, 'k3')\n"  # the next trial never saves the other's program under its own store
        "saved.append([0, cc.publish()])\n"
        "print(json.dumps({'store': str(store), 'saved': saved}))\n"
    )
    a, b = tmp_path / "a", tmp_path / "b"
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b), whole.hex()], capture_output=True, text=True,
                         timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    machine = Path(got["store"]).name
    assert Path(got["store"]) == a.resolve() / machine
    # Trial 0 saves its program under b; trial 1 (null) saves nothing, and its program is never
    # saved by a later trial either; trial 2 saves its own under a; trial 3 finds b's program in
    # this process already (nothing to load) and saves its own under b.
    assert got["saved"] == [[0, 1], [0, 0], [0, 1], [0, 1], [0, 0], [0, 0]]
    names = lambda root: sorted(p.name.split(".")[0] for p in (root / machine).glob("*/*.pb.*"))  # noqa: E731
    assert names(b) == ["entry_0", "entry_3", "entry_4"] and names(a) == ["entry_2"]


@pytest.mark.slow
def test_the_first_trial_decides_and_a_later_one_is_told_the_cache_is_off(tmp_path):
    code = (
        "import json, logging, sys\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from mnist_hpc.compute.runtime import import_tensorflow\n"
        "import_tensorflow()\n"
        "from mnist_hpc.compute import compile_cache as cc\n"
        "root = Path(sys.argv[1])\n"
        "print(json.dumps([str(cc.enable(None)), str(cc.enable(root)), cc.prepare(root, 'k'), cc.prepare(root, 'k')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "root")], capture_output=True, text=True,
                         timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["None", "None", 0, 0]
    assert out.stderr.count("compile cache off in this process (its first trial decided") == 1, out.stderr
    assert not (tmp_path / "root").exists()


def test_the_store_is_under_the_output_root_unless_absolute():
    from mnist_hpc.compute.compile_cache import store_root
    from mnist_hpc.config import PathsConfig

    assert store_root(PathsConfig(output_root="/scratch/me/mnist-hpc", compile_cache="compile-cache")) == Path(
        "/scratch/me/mnist-hpc/compile-cache")
    assert store_root(PathsConfig(output_root="/scratch/me", compile_cache="/home/me/xla")) == Path("/home/me/xla")
    assert store_root(PathsConfig(output_root="/scratch/me", compile_cache=None)) is None
    assert store_root(PathsConfig(output_root="/scratch/me", compile_cache="")) is None


def entry_bytes(key: bytes, hlo: bytes, executable: bytes) -> bytes:
    """A cache entry as TensorFlow writes one: fields 1, 2 and 3, each length-delimited."""
    def field(number: int, data: bytes) -> bytes:
        length, out = len(data), bytearray()
        while True:
            out.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
            length >>= 7
            if not length:
                break
        return bytes([number << 3 | 2]) + bytes(out) + data
    return field(1, key) + field(2, hlo) + field(3, executable)


def test_only_whole_entries_are_taken_and_no_reader_input_makes_it_raise():
    from mnist_hpc.compute.compile_cache import whole_entry

    whole = entry_bytes(b"k" * 52, b"h" * 1000, b"x" * 300)
    assert whole_entry(whole)
    assert not any(whole_entry(whole[:cut]) for cut in range(len(whole)))  # cut short anywhere
    assert not whole_entry(whole + b"\x00")
    assert not whole_entry(entry_bytes(b"k", b"h", b""))  # no executable
    assert not whole_entry(entry_bytes(b"k", b"h", b"x") + entry_bytes(b"k", b"h", b"x"))  # fields twice
    rng = np.random.default_rng(0)
    for size in list(range(40)) + [1000] * 200:
        whole_entry(rng.integers(0, 256, size, dtype=np.uint8).tobytes())  # garbage: False or True, never raises
    for cut in range(0, len(whole), 7):
        damaged = bytearray(whole)
        damaged[cut] ^= 0xFF
        whole_entry(bytes(damaged))


def test_the_store_keeps_the_shapes_used_last_within_its_budget(tmp_path):
    """Pure file handling (no TensorFlow): a publishing job removes whole shapes, least recently used first."""
    from mnist_hpc.compute import compile_cache

    store = tmp_path / "store"
    for i in range(5):
        shape = store / f"shape{i}"
        shape.mkdir(parents=True)
        content = entry_bytes(b"k", b"h", bytes([i]) * 1000)
        (shape / f"xla_compile_cache__{i}__{i}__XLA_CPU_JIT.pb.{hashlib.sha256(content).hexdigest()}").write_bytes(content)
        os.utime(shape, (1000 + i, 1000 + i))  # shape4 was used last
    stale = store / "shape4" / ".incoming-abc"
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    assert compile_cache.prune(store, budget=2500) == 3
    assert sorted(p.name for p in store.iterdir()) == ["shape3", "shape4"]
    assert not stale.exists()  # a killed publisher's temporary file

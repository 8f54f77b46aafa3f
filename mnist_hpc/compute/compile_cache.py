"""XLA programs kept between processes (``paths.compile_cache``): a job's first epoch without compiling.

TensorFlow can save every XLA program it compiles and load it in a later process instead of
compiling again (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR``). A packed task or a
search worker already compiles once per shape (:mod:`mnist_hpc.compute.engine`); this saves
that one compilation too, ~0.9 s of a one-CPU task's start-up, whenever an earlier job of the
same user compiled the same program: the next sweep, a requeued or resumed job, the second
task of a sweep once the first has finished.

Used as TensorFlow ships it, that directory is not safe to share between processes, and a bad
file in it fails the job: TensorFlow writes entries in place (a concurrent reader can see half
a file), fails a compilation whose entry cannot be read or written, and does not key entries by
its own version or by the CPU the program was compiled for (an AVX-512 program on an AVX2 node
dies). So the process never gives TensorFlow the shared store; instead:

- the store is ``<paths.compile_cache>/<TensorFlow version, build, CPU and XLA flags>/``,
  created private (0700) and used only if this user alone can write it;
- each process gets a private directory on node-local storage, filled with copies of the store's
  entries whose content matches the sha256 in their file name (a truncated, damaged or foreign
  file is skipped, never loaded), and TensorFlow reads and writes only there;
- after a trial, the programs TensorFlow added are copied into the store under their sha256,
  through a temporary file and a rename: a reader sees a whole entry or none, and two jobs
  publishing the same program write the same bytes.

A program loaded from the store is the program compilation would have built from the same HLO
(TensorFlow checks the key and the whole HLO before loading it), so results are unchanged:
``tests/test_compile_cache.py`` compares a run with a cold store against one with a warm store.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from mnist_hpc.config import PathsConfig

log = logging.getLogger(__name__)

FLAG = "--tf_xla_persistent_cache_directory"
# TensorFlow's entry names: xla_compile_cache__<signature>__<HLO fingerprint>__<device>.pb
ENTRY = re.compile(r"^[A-Za-z0-9_]+\.pb$")
# A store entry: <TensorFlow's entry name>.<sha256 of its content>
STORED = re.compile(r"^(?P<name>[A-Za-z0-9_]+\.pb)\.(?P<sha>[0-9a-f]{64})$")
# Below this much free space in the private directory the cache stays off: TensorFlow fails a
# compilation whose program it cannot write.
MIN_FREE_BYTES = 256 << 20
# A job copies the newest programs, up to this many bytes (~240 of the lesson's, 0.27 MB each);
# a job that publishes prunes the oldest beyond the store's budget.
LOAD_BYTES = 64 << 20
STORE_BYTES = 256 << 20


class _Active:
    def __init__(self, store: Path, private: Path, known: set[str]) -> None:
        self.store = store
        self.private = private
        self.known = known  # entry names the private directory holds that the store has too


_active: Optional[_Active] = None
_decided = False  # this process has decided (cache on, or off for a reason it logged)


def machine_key() -> str:
    """What a compiled program depends on beyond its HLO: TensorFlow's build, the CPU, XLA's flags."""
    import tensorflow as tf

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "flags", "Features", "CPU part") and line not in cpu:
                cpu += line + "\n"
    except OSError:
        import platform

        cpu = platform.processor() or platform.machine()
    parts = [tf.__version__, tf.version.GIT_VERSION, cpu, os.environ.get("XLA_FLAGS", ""),
             os.environ.get("TF_XLA_FLAGS", "")]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"tf-{tf.__version__}-{digest}"


def _private_to_me(path: Path) -> Optional[str]:
    """Why ``path`` is not this user's alone, or None if it is."""
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {st.st_mode & 0o777:o})"
    return None


def store_root(paths: PathsConfig) -> Optional[Path]:
    """``paths.compile_cache`` as a directory: a relative one is under ``paths.output_root``; None: off.

    (Relative rather than an ``${paths.output_root}`` interpolation: a sweep that overrides the
    output root then needs no other key rebuilt on the login node.)
    """
    if not paths.compile_cache:
        return None
    return Path(paths.output_root).expanduser() / Path(paths.compile_cache).expanduser()


def enable(root: Optional[Path]) -> Optional[Path]:
    """Give this process's XLA compilations the store under ``root``; None leaves the cache off.

    Decided once per process (TensorFlow reads its XLA flags once): later calls return the
    first call's store. Must run before the process compiles its first XLA program, which it
    does itself here (a one-op program) so that TensorFlow reads the flag now and the flag
    does not stay in the environment of processes this one starts.
    """
    global _active, _decided
    if _decided:
        return _active.store if _active else None
    _decided = True
    if not root:
        return None
    if FLAG in os.environ.get("TF_XLA_FLAGS", ""):
        log.info("compile cache: TF_XLA_FLAGS names its own %s; leaving it to TensorFlow", FLAG)
        return None
    try:
        store = root.resolve() / machine_key()
        for d in (store.parent, store):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            why = _private_to_me(d)
            if why:
                log.warning("compile cache off: %s; programs a job loads must be yours alone "
                            "(set paths.compile_cache to a directory of your own, or null)", why)
                return None
        private = Path(tempfile.mkdtemp(prefix="mnist-hpc-xla-"))
    except OSError as exc:
        log.warning("compile cache off: %s (set paths.compile_cache to a writable directory of your own, or null)", exc)
        return None
    if shutil.disk_usage(private).free < MIN_FREE_BYTES:
        log.warning("compile cache off: less than %d MB free in %s", MIN_FREE_BYTES >> 20, private.parent)
        shutil.rmtree(private, ignore_errors=True)
        return None
    _active = _Active(store, private, set())
    atexit.register(_close)
    loaded, skipped = _fill(store, private)
    _active.known = loaded
    _point_tensorflow_at(private)
    log.info("compile cache: %s (%d program(s)%s)", store, len(loaded),
             f"; skipped {skipped} damaged or incomplete" if skipped else "")
    return store


def _entries(store: Path) -> list[tuple[float, int, str]]:
    """The store's entries as (mtime, size, name), newest first; a file gone meanwhile is left out."""
    found = []
    try:
        names = os.listdir(store)
    except OSError:
        return []
    for name in names:
        if STORED.match(name):
            try:
                st = (store / name).stat()
            except OSError:
                continue
            found.append((st.st_mtime, st.st_size, name))
    return sorted(found, reverse=True)


def _fill(store: Path, private: Path, budget: int = LOAD_BYTES) -> tuple[set[str], int]:
    """Copy the newest store entries whose content matches their sha256 into ``private``, up to
    ``budget`` bytes; (the names copied, how many were damaged or incomplete)."""
    loaded: set[str] = set()
    skipped = 0
    used = 0
    for _, size, stored in _entries(store):
        m = STORED.match(stored)
        assert m is not None
        if m["name"] in loaded:
            continue
        if used + size > budget:
            break
        try:
            content = (store / stored).read_bytes()
        except FileNotFoundError:  # pruned by another job meanwhile
            continue
        except OSError:
            skipped += 1
            continue
        if hashlib.sha256(content).hexdigest() != m["sha"]:
            skipped += 1
            continue
        try:
            (private / m["name"]).write_bytes(content)
        except OSError as exc:  # node-local space ran out: the rest compile as without a cache
            log.warning("compile cache: stopped copying programs into %s: %s", private, exc)
            (private / m["name"]).unlink(missing_ok=True)
            break
        loaded.add(m["name"])
        used += len(content)
    return loaded, skipped


def prune(store: Path, budget: int = STORE_BYTES) -> int:
    """Delete the oldest entries until the store holds at most ``budget`` bytes; how many were deleted.

    A search over a continuous hyperparameter that the program holds as a constant (a dropout
    rate) compiles a program per trial; without a bound its store would grow by each of them.
    """
    deleted = 0
    total = 0
    for _, size, name in _entries(store):
        total += size
        if total > budget:
            try:
                (store / name).unlink()
                deleted += 1
            except OSError:
                pass
    return deleted


def _point_tensorflow_at(private: Path) -> None:
    """Make TensorFlow read its XLA flags now, with the private directory; restore the environment."""
    import tensorflow as tf

    before = os.environ.get("TF_XLA_FLAGS")
    os.environ["TF_XLA_FLAGS"] = f"{before or ''} {FLAG}={private}".strip()
    try:
        tf.function(lambda x: x + 1, jit_compile=True)(tf.constant(0)).numpy()
    finally:
        if before is None:
            del os.environ["TF_XLA_FLAGS"]
        else:
            os.environ["TF_XLA_FLAGS"] = before


def publish() -> int:
    """Copy the programs TensorFlow added to the private directory into the store; how many."""
    if _active is None:
        return 0
    added = 0
    try:
        names = sorted(os.listdir(_active.private))
    except OSError:
        return 0
    for name in names:
        if name in _active.known or not ENTRY.match(name):
            continue
        try:
            content = (_active.private / name).read_bytes()
            final = _active.store / f"{name}.{hashlib.sha256(content).hexdigest()}"
            fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=_active.store)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # a full or vanished store costs the next job a compilation, nothing more
            log.warning("compile cache: could not save %s: %s", name, exc)
            continue
        _active.known.add(name)
        added += 1
    if added:
        pruned = prune(_active.store)
        log.info("compile cache: saved %d new program(s) to %s%s", added, _active.store,
                 f" (removed the {pruned} oldest, over {STORE_BYTES >> 20} MB)" if pruned else "")
    return added


def _close() -> None:
    global _active
    if _active is None:
        return
    publish()
    shutil.rmtree(_active.private, ignore_errors=True)
    _active = None

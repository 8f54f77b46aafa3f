"""XLA programs kept between processes (``paths.compile_cache``): a job's first epoch without compiling.

TensorFlow can save every XLA program it compiles and load it in a later process instead of
compiling again (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR``). A packed task or a
search worker already compiles once per shape (:mod:`mnist_hpc.compute.engine`); this saves
that one compilation too, ~1 s of a one-CPU task's start-up, whenever an earlier job of the
same user compiled the same program: the next sweep, a requeued or resumed job, the second
task of a sweep once the first has finished.

Used as TensorFlow ships it, that directory is not safe to share between processes, and a bad
file in it fails the job: TensorFlow writes entries in place (a concurrent reader can see half
a file, and a full disk leaves one), fails a compilation whose entry cannot be read or written,
and does not key entries by its own version or by the CPU the program was compiled for (an
AVX-512 program on an AVX2 node dies). So TensorFlow never sees the shared store:

- the store is ``<paths.compile_cache>/<TensorFlow version and build, CPU, XLA flags>/<shapes>/``,
  one directory per shape of training (:func:`mnist_hpc.compute.engine.shapes_key`), created
  private (0700) and used only if this user alone can write it; CUDA and ROCm builds of
  TensorFlow leave the cache off (their programs would also depend on the GPU model);
- each process gets a private directory on node-local storage; before a trial, the entries of
  the trial's shape that are whole (:func:`whole_entry`), match the sha256 in their file name
  and are this user's own files are copied there, and TensorFlow reads and writes only there;
- after a trial, the whole programs TensorFlow added are copied into the trial's shape
  directory under their sha256, through a temporary file and a rename: a reader sees a whole
  entry or none, and two jobs publishing the same program write the same bytes. The shapes used
  least recently are removed when the store outgrows its budget.

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
import stat
import tempfile
import time
from pathlib import Path
from typing import Optional

from mnist_hpc.config import PathsConfig

log = logging.getLogger(__name__)

FLAG = "--tf_xla_persistent_cache_directory"
# TensorFlow's entry names: xla_compile_cache__<signature>__<HLO fingerprint>__<device>.pb
ENTRY = re.compile(r"^[A-Za-z0-9_]+\.pb$")
# A store entry: <TensorFlow's entry name>.<sha256 of its content>
STORED = re.compile(r"^(?P<name>[A-Za-z0-9_]+\.pb)\.(?P<sha>[0-9a-f]{64})$")
INCOMING = ".incoming-"
# Below this much free space in the private directory the cache stays off: TensorFlow fails a
# compilation whose program it cannot write.
MIN_FREE_BYTES = 256 << 20
# A job that publishes removes the shapes used least recently beyond this (the lesson's
# program is 0.27 MB; a search over a dropout rate compiles one per trial).
STORE_BYTES = 256 << 20
# A temporary file of a publisher killed mid-write is removed after this long.
STALE_INCOMING_S = 3600


class _Active:
    def __init__(self, store: Path, machine: str, private: Path) -> None:
        self.store = store  # <root>/<machine key> of the call that turned the cache on
        self.machine = machine  # machine_key(), the same for every trial of this process
        self.private = private
        self.known: set[str] = set()  # entry names in the private directory that a store directory has
        self.shape: Optional[Path] = None  # the store directory of the trial in progress


_active: Optional[_Active] = None
_decided = False  # this process has decided (cache on, or off for a reason it logged)
_told_off = False  # a trial that named a store was told the cache is off in this process


def store_root(paths: PathsConfig) -> Optional[Path]:
    """``paths.compile_cache`` as a directory: a relative one is under ``paths.output_root``; None: off.

    (Relative rather than an ``${paths.output_root}`` interpolation: a sweep that overrides the
    output root then needs no other key rebuilt on the login node.)
    """
    if not paths.compile_cache:
        return None
    return Path(paths.output_root).expanduser() / Path(paths.compile_cache).expanduser()


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


def _not_mine(st: os.stat_result, what: str) -> Optional[str]:
    """Why a file or directory with this stat is not this user's alone, or None if it is."""
    if st.st_uid != os.getuid():
        return f"{what} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{what} is writable by others (mode {st.st_mode & 0o777:o})"
    return None


def _private_dir(path: Path) -> None:
    """Create ``path`` (0700, parents as needed) and check it is this user's alone.

    Raises:
        PermissionError: it is not (naming why); OSError: it cannot be created.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    why = _not_mine(os.stat(path, follow_symlinks=False), str(path))
    if why:
        raise PermissionError(why)


def enable(root: Optional[Path]) -> Optional[Path]:
    """Point this process's XLA compilations at a private directory fed from the store under ``root``.

    Decided once per process, by its first call (TensorFlow reads its XLA flags once); returns
    the store, or None with the cache off. Each trial then names its own store root to
    :func:`prepare` (a packed task's trials may have different ``paths``). Must run before
    anything lists TensorFlow's devices (which reads the flags) and runs nothing itself, so
    thread pools, GPU memory growth and multi-worker collectives can still be configured
    afterwards.
    """
    global _active, _decided
    if _decided:
        return _active.store if _active else None
    _decided = True
    if root is None:
        return None
    import tensorflow as tf

    if FLAG in os.environ.get("TF_XLA_FLAGS", ""):
        log.info("compile cache: TF_XLA_FLAGS names its own %s; leaving it to TensorFlow", FLAG)
        return None
    build = tf.sysconfig.get_build_info()
    if build.get("is_cuda_build") or build.get("is_rocm_build"):
        log.info("compile cache off: this TensorFlow is a GPU build, whose programs would also depend on the GPU model")
        return None
    private: Optional[Path] = None
    try:
        machine = machine_key()
        store = root.resolve() / machine
        _private_dir(root.resolve())
        _private_dir(store)
        private = Path(tempfile.mkdtemp(prefix="mnist-hpc-xla-"))
        if any(c.isspace() or c in "'\"\\" for c in str(private)):
            raise OSError(f"the temporary directory {private} has a space or quote in its name, which TF_XLA_FLAGS "
                          "cannot carry; set TMPDIR to a plain path")
        if shutil.disk_usage(private).free < MIN_FREE_BYTES:
            raise OSError(f"less than {MIN_FREE_BYTES >> 20} MB free in {private.parent}")
    except OSError as exc:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        log.warning("compile cache off: %s (programs a job loads must be yours alone: set paths.compile_cache to a "
                    "writable directory of your own, or null)", exc)
        return None
    before = os.environ.get("TF_XLA_FLAGS")
    os.environ["TF_XLA_FLAGS"] = f"{before or ''} {FLAG}={private}".strip()
    try:
        tf.config.list_physical_devices()  # TensorFlow reads its XLA flags here, once
    finally:
        if before is None:  # jobs this process starts do not inherit the private directory
            del os.environ["TF_XLA_FLAGS"]
        else:
            os.environ["TF_XLA_FLAGS"] = before
    _active = _Active(store, machine, private)
    atexit.register(_close)
    log.info("compile cache: %s", store)
    return store


def prepare(root: Optional[Path], shapes: Optional[str]) -> int:
    """Before a trial: copy the programs for ``shapes`` from the store under ``root`` into the private directory.

    ``root``: the trial's :func:`store_root`; ``shapes``: its
    :func:`~mnist_hpc.compute.engine.shapes_key`. Either None: this trial neither loads nor
    saves (its ``paths.compile_cache`` is null, or it does not use XLA). Returns how many
    programs were copied.
    """
    global _told_off
    if _active is None:
        if root is not None and shapes is not None and _decided and not _told_off:
            _told_off = True
            log.info("compile cache off in this process (its first trial decided: TensorFlow reads the flag once); "
                     "this trial compiles")
        return 0
    publish()  # what the previous trial compiled belongs to its store (if it ended before publishing)
    _settle()  # and what could not be saved there is never saved under another trial's store
    _active.shape = None
    if root is None or shapes is None:
        return 0
    store = root.resolve() / _active.machine
    shape = store / hashlib.sha256(shapes.encode()).hexdigest()[:16]
    try:
        for directory in (root.resolve(), store, shape):
            _private_dir(directory)
        os.utime(shape)  # used now: pruning removes the shapes used least recently
    except OSError as exc:
        log.warning("compile cache: not for this trial: %s", exc)
        return 0
    _active.shape = shape
    loaded, skipped = _fill(shape, _active.private, _active.known)
    if loaded or skipped:
        log.info("compile cache: %d program(s) for this trial's shapes%s", loaded,
                 f"; skipped {skipped} damaged, incomplete or not yours" if skipped else "")
    return loaded


def whole_entry(content: bytes) -> bool:
    """Whether ``content`` is a whole TensorFlow cache entry (a protobuf of three length-delimited fields).

    Its fields 1 (key), 2 (HLO module) and 3 (executable) each once, the executable not empty, and
    nothing after them: a file cut short anywhere (a full disk while TensorFlow wrote it) is not.
    """
    seen: dict[int, int] = {}
    i, n = 0, len(content)
    while i < n:
        tag, i = _varint(content, i)
        length, i = _varint(content, i) if tag & 7 == 2 else (-1, i)
        field = tag >> 3
        if length < 0 or field not in (1, 2, 3) or field in seen or i + length > n:
            return False
        seen[field] = length
        i += length
    return i == n and set(seen) == {1, 2, 3} and seen[3] > 0


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            return -1, len(data) + 1  # cut short: no whole entry
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _read_own(path: Path) -> Optional[bytes]:
    """The content of a regular file of this user's alone (not a link); None otherwise or if it vanished."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or _not_mine(st, str(path)):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _fill(shape: Path, private: Path, known: set[str]) -> tuple[int, int]:
    """Copy ``shape``'s good entries into ``private``; (copied, skipped as damaged, incomplete or not ours)."""
    copied = skipped = 0
    try:
        names = sorted(os.listdir(shape))
    except OSError:
        return 0, 0
    for stored in names:
        m = STORED.match(stored)
        if not m or m["name"] in known:
            continue
        content = _read_own(shape / stored)
        if content is None or hashlib.sha256(content).hexdigest() != m["sha"] or not whole_entry(content):
            skipped += (shape / stored).exists()  # one pruned meanwhile is not damaged
            continue
        try:
            (private / m["name"]).write_bytes(content)
        except OSError as exc:  # node-local space ran out: the rest compile as without a cache
            log.warning("compile cache: stopped copying programs into %s: %s", private, exc)
            (private / m["name"]).unlink(missing_ok=True)
            break
        known.add(m["name"])
        copied += 1
    return copied, skipped


def publish() -> int:
    """After a trial: copy the whole programs TensorFlow added into the trial's shape directory; how many.

    A trial that neither loads nor saves keeps what it compiled to this process: its programs
    are never published, under its own shapes or a later trial's.
    """
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
        if _active.shape is None:
            _active.known.add(name)
            continue
        try:
            content = (_active.private / name).read_bytes()
            if not whole_entry(content):  # TensorFlow could not finish writing it: never shared
                log.warning("compile cache: not saving %s: it is incomplete", name)
                _active.known.add(name)
                continue
            final = _active.shape / f"{name}.{hashlib.sha256(content).hexdigest()}"
            fd, tmp = tempfile.mkstemp(prefix=INCOMING, dir=_active.shape)
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
        pruned = prune(_active.shape.parent)
        log.info("compile cache: saved %d new program(s) to %s%s", added, _active.shape,
                 f" (removed {pruned} shape(s) used least recently, over {STORE_BYTES >> 20} MB)" if pruned else "")
    return added


def _settle() -> None:
    """Take every program now in the private directory as known: none is published later."""
    try:
        _active.known.update(name for name in os.listdir(_active.private) if ENTRY.match(name))
    except OSError:
        pass


def prune(store: Path, budget: int = STORE_BYTES) -> int:
    """Remove whole shape directories, least recently used first, until ``store`` holds at most ``budget`` bytes.

    Also removes temporary files of publishers killed mid-write. Returns the shapes removed.
    """
    shapes = []
    now = time.time()
    try:
        subdirs = [store / name for name in os.listdir(store)]
    except OSError:
        return 0
    for shape in subdirs:
        try:
            used = shape.stat().st_mtime
            size = 0
            for entry in shape.iterdir():
                st = entry.stat()
                if entry.name.startswith(INCOMING) and now - st.st_mtime > STALE_INCOMING_S:
                    entry.unlink(missing_ok=True)
                    continue
                size += st.st_size
        except OSError:
            continue
        shapes.append((used, size, shape))
    removed = 0
    total = 0
    for _, size, shape in sorted(shapes, reverse=True):
        total += size
        if total > budget:
            shutil.rmtree(shape, ignore_errors=True)
            removed += 1
    return removed


def _close() -> None:
    global _active
    if _active is None:
        return
    publish()
    shutil.rmtree(_active.private, ignore_errors=True)
    _active = None

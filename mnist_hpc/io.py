"""Files written so that a reader never sees half of one, and read without trusting their writer.

Writers are atomic: a reader sees the old file or the complete new one. :func:`read_json`
reads a JSON file that another process or person wrote: bounded in size and depth, regular
files only, no NaN or Infinity; whatever the bytes, it returns a value or raises
:class:`UntrustedFileError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Optional

log = logging.getLogger(__name__)


def _file_mode() -> int:
    """Mode a plain ``open()`` would give: mkstemp's 0600 would hide shared caches from the group."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = "", mode: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it over ``target``.

    The caller writes the file at the yielded path (by any means, e.g. ``model.save``). On an
    exception the temporary file is removed and ``target`` is left untouched. ``suffix`` keeps
    an extension that a writer insists on (Keras wants ``.keras``). ``mode`` is the file's
    permission bits, exactly (not masked by the umask); None gives what a plain ``open()`` would.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    file_mode = _file_mode() if mode is None else mode
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        try:  # the temporary has its mode from the start: one left by a killed writer is not private
            os.fchmod(fd, file_mode)
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode)  # again: a writer may have replaced the file at the yielded path
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def sync_filesystem(directory: Path) -> bool:
    """Flush the filesystem holding ``directory`` to disk (Linux ``syncfs``); False where unsupported."""
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(directory, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


def write_files_atomic(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write many files, each atomically, with one flush of their filesystems instead of an fsync each.

    Every file is written under a temporary name first; one ``syncfs`` per filesystem makes
    all of them durable; only then are they renamed into place, and a second ``syncfs`` makes
    the renames durable. A reader sees each file old or complete (a crash between the two
    flushes leaves some renamed, some not, none partial). Where ``syncfs`` is unavailable each
    file is fsynced as :func:`atomic_path` does. On an error before the renames no target
    has changed and the temporary files are gone.
    """
    pending: list[tuple[Path, Path, bytes]] = []
    try:
        for target, data in files:
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Named as mkstemp names them (remove_stale_temporaries knows the pattern), created
            # with open()'s mode; mkstemp's own name search costs more than the write here.
            tmp = target.parent / f".{target.name}.{os.getpid()}-{len(pending)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:  # left by a dead process that had our pid
                fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                tmp = Path(name)
                os.fchmod(fd, _file_mode())
            pending.append((tmp, target, data))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        roots = _filesystems(target.parent for _, target, _ in pending)
        synced = all(sync_filesystem(root) for root in roots)
        if not synced:
            for tmp, _, _ in pending:
                with contextlib.suppress(FileNotFoundError):
                    with open(tmp, "rb+") as fh:
                        os.fsync(fh.fileno())
        for tmp, target, data in pending:
            try:
                os.replace(tmp, target)
            except FileNotFoundError:
                # Its temporary was removed meanwhile: a job that started in that directory took
                # the lease and cleared what it took for a dead writer's leftovers. Write it alone.
                write_bytes_atomic(target, data)
    except BaseException:
        for tmp, _, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    if synced:
        for root in roots:
            sync_filesystem(root)
    else:
        for directory in {target.parent for _, target, _ in pending}:
            fsync_dir(directory)


def _filesystems(directories: Iterable[Path]) -> list[Path]:
    """One directory per filesystem among ``directories``."""
    seen: dict[int, Path] = {}
    for directory in directories:
        seen.setdefault(os.stat(directory).st_dev, directory)
    return list(seen.values())


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_bytes_if_absent(target: Path, data: bytes) -> bool:
    """Write ``target`` whole unless it exists, which is then left as it is; whether it was written.

    The file appears whole or not at all (a hard link of a synced temporary, which fails if the
    target exists); on a filesystem without hard links, it is checked first and then renamed.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            if target.exists():
                return False
            os.replace(tmp, target)
        fsync_dir(target.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json_atomic(target: Path, obj: Any) -> None:
    write_bytes_atomic(target, _json_bytes(obj))


def write_json_if_absent(target: Path, obj: Any) -> bool:
    """:func:`write_bytes_if_absent` of ``obj`` as :func:`write_json_atomic` writes it."""
    return write_bytes_if_absent(target, _json_bytes(obj))


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created group-writable) for the duration; carries on
    unlocked, with a warning, where the filesystem does not support flock."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("cannot lock %s (%s); going on without the lock", path, exc.strerror)
        yield
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    """The time recorded in files: ISO 8601 in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_utc(text: str) -> Optional[datetime]:
    """A time :func:`utc_now` wrote (any ISO 8601 time with its UTC offset), as an aware datetime;
    None for anything else: a time without an offset names no instant (whose clock?)."""
    try:
        when = datetime.fromisoformat(text.strip()) if isinstance(text, str) else None
    except ValueError:
        return None
    return when if when is not None and when.utcoffset() is not None else None


# --- reading what another process wrote --------------------------------------------------------

# No file of ours nests deeper than a few levels (a history list of epoch records is three).
MAX_JSON_DEPTH = 16


class UntrustedFileError(ValueError):
    """A file written by another process cannot be used; the message names it and what is wrong."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (``1e999``) is refused, not read as inf."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of a float's range")
    return value


def _open_regular(path: Path) -> Optional[int]:
    """A read-only descriptor of ``path`` if it is a regular file; None when it is absent.

    Opened without blocking (opening a FIFO for reading would wait for a writer), then
    checked: a FIFO, device (``/dev/zero``), socket or directory is refused unread.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UntrustedFileError(f"{path} is unreadable ({exc.strerror or exc})") from exc
    except ValueError as exc:  # a NUL in a path that a file named (a log path in job.json)
        raise UntrustedFileError(f"{path!r} is not a usable path ({exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedFileError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


# What Linux filesystems allow: a name of at most NAME_MAX bytes, a path shorter than PATH_MAX.
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4096


def path_problem(path: Path, setting: str = "") -> Optional[str]:
    """Why ``path`` can never name a file here (a part longer than a name may be, or the whole
    longer than a path may be), naming ``setting`` as what to change; None when it can."""
    fix = f"choose a shorter {setting}" if setting else "choose a shorter name"
    whole = os.fsencode(os.path.abspath(path))
    if len(whole) >= PATH_MAX_BYTES:
        return f"{str(path)[:80]}... is {len(whole):,} bytes long, and a path holds fewer than {PATH_MAX_BYTES:,}: {fix}"
    for part in whole.split(b"/"):
        if len(part) > NAME_MAX_BYTES:
            shown = os.fsdecode(part[:40])
            return (f"{str(path)[:200]}: its part {shown!r}... is {len(part)} bytes long, and a file name holds at most "
                    f"{NAME_MAX_BYTES}: {fix}")
    return None


def open_regular_file(path: Path) -> BinaryIO:
    """``open(path, "rb")`` for a file another process or person may have replaced: a FIFO, device,
    socket or directory in its place raises ``OSError(EINVAL)`` at once instead of blocking (a FIFO
    opened for reading waits for a writer; ``/dev/zero`` never ends). Raises OSError as open does."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _too_big(path: Path, max_bytes: int, size: Optional[int] = None) -> UntrustedFileError:
    held = f"{size:,} bytes" if size is not None else f"more than {max_bytes:,} bytes"
    return UntrustedFileError(
        f"{path} is too big: it holds {held}, and such a file never holds more than {max_bytes:,}"
    )


def read_bytes_bounded(path: Path, max_bytes: int) -> Optional[bytes]:
    """The bytes of a regular file of at most ``max_bytes``; None when it is absent.

    A file whose size says it is too big is refused without reading it; one that grows while
    it is read (or whose size lies, as /proc's do) is refused after ``max_bytes + 1`` bytes.

    Raises:
        UntrustedFileError: not a regular file, unreadable, or larger than ``max_bytes``.
    """
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise _too_big(path, max_bytes, size)
        chunks, read = [], 0
        while read <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - read))
            if not chunk:
                break
            chunks.append(chunk)
            read += len(chunk)
    except OSError as exc:
        raise UntrustedFileError(f"{path} is unreadable ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if read > max_bytes:
        raise _too_big(path, max_bytes)
    return b"".join(chunks)


def read_tail_bounded(path: Path, max_bytes: int) -> Optional[bytes]:
    """The last ``max_bytes`` (at most) of a regular file; None when it is absent.

    For logs, which may be long: only their end is read.

    Raises:
        UntrustedFileError: not a regular file (a FIFO would block, ``/dev/zero`` never ends), or unreadable.
    """
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        start = max(0, os.fstat(fd).st_size - max_bytes)
        chunks, read = [], 0
        while read < max_bytes:
            chunk = os.pread(fd, min(1 << 20, max_bytes - read), start + read)
            if not chunk:
                break
            chunks.append(chunk)
            read += len(chunk)
    except OSError as exc:
        raise UntrustedFileError(f"{path} is unreadable ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    return b"".join(chunks)


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), without recursion.

    Level by level, holding references to containers only: a 4 MB file of a million empty
    objects costs a list of a million pointers, not a tuple per item.
    """
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        below: list[Any] = []
        for item in level:
            below.extend(c for c in (item.values() if isinstance(item, dict) else item) if isinstance(c, (dict, list)))
        level = below
    return depth


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unencodable_text(value: Any) -> Optional[str]:
    """The first string in ``value`` (a key or a value, at any depth) that is not valid Unicode.

    JSON's ``\\ud800`` escape gives a lone surrogate, which no UTF-8 output (a terminal, a
    report file) can take: printing it would raise where the file is shown, not where it is read.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):  # YAML builds tuples and sets too
            stack.extend(item)
    return None


def read_json(path: Path, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value in ``path``, read without trusting it.

    Every float in the value is finite and every string valid Unicode.

    Raises:
        FileNotFoundError: the file is absent.
        UntrustedFileError: not a regular file, unreadable, over ``max_bytes``, not UTF-8, not
            JSON, holding NaN, Infinity or a number beyond a float's range, holding a lone
            surrogate (``\\ud800``), or nested deeper than ``max_depth``.
    """
    raw = read_bytes_bounded(path, max_bytes)
    if raw is None:
        raise FileNotFoundError(f"no {path}")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    except RecursionError:
        raise UntrustedFileError(f"{path} nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise UntrustedFileError(f"{path} is not valid JSON ({exc})") from exc
    if json_depth(data) > max_depth:
        raise UntrustedFileError(f"{path} nests deeper than {max_depth} levels")
    # Text decoded from UTF-8 holds a lone surrogate only by a \uD800-\uDFFF escape: walk the
    # value only when the bytes hold one.
    if _SURROGATE_ESCAPE.search(raw) and (text := _unencodable_text(data)) is not None:
        raise UntrustedFileError(f"{path} holds a string that is not valid Unicode ({text[:40]!r})")
    return data


# No YAML file we read nests deeper than a few levels (config.yaml's train.epochs is two).
MAX_YAML_DEPTH = 16


def _bounded_yaml_loader() -> type:
    """PyYAML's safe loader, refusing aliases and nesting beyond :data:`MAX_YAML_DEPTH`.

    An alias shares one node many times: nine levels of ten aliases each are a billion strings
    to whatever walks the result (``str()``, a comparison), from a file of a few hundred bytes.
    Neither writer of our YAML (OmegaConf, Hydra) writes aliases. The composer recurses once per
    level, so the depth is capped long before Python's recursion limit.
    """
    import yaml  # PyYAML comes with omegaconf

    class BoundedSafeLoader(yaml.SafeLoader):  # the pure-Python one: the C loader composes in C
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                problem = "an alias (*name), which none of our files uses"
            elif self.depth >= MAX_YAML_DEPTH:
                problem = f"nesting deeper than {MAX_YAML_DEPTH} levels"
            else:
                self.depth += 1
                try:
                    return super().compose_node(parent, index)
                finally:
                    self.depth -= 1
            raise yaml.composer.ComposerError(None, None, f"found {problem}", self.peek_event().start_mark)

    return BoundedSafeLoader


def read_yaml(path: Path, max_bytes: int) -> Any:
    """The YAML value in ``path``, read without trusting it (as :func:`read_json` reads JSON).

    Raises:
        FileNotFoundError: the file is absent.
        UntrustedFileError: not a regular file, unreadable, over ``max_bytes``, not UTF-8, not
            YAML, holding an alias, nested deeper than :data:`MAX_YAML_DEPTH`, holding a value
            PyYAML cannot build, or a string that is not valid Unicode.
    """
    raw = read_bytes_bounded(path, max_bytes)
    if raw is None:
        raise FileNotFoundError(f"no {path}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    import yaml

    try:
        data = yaml.load(text, Loader=_bounded_yaml_loader())  # noqa: S506 (a SafeLoader)
    # PyYAML's constructors raise more than YAMLError on hostile scalars (ValueError for an int
    # of 5,000 digits or a 13th month, AttributeError for a bad !!timestamp): each means the file
    # cannot be used, and none may stop a status or a report.
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise UntrustedFileError(f"{path} is not readable YAML ({reason[:300]})") from exc
    if (bad := _unencodable_text(data)) is not None:
        raise UntrustedFileError(f"{path} holds a string that is not valid Unicode ({bad[:40]!r})")
    return data

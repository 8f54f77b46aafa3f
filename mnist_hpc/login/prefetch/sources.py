"""Where the npz comes from: planning a source (download, hand-copied npz, IDX directory) and the IDX reader.

A local source is read, hashed and validated in memory before the cache is touched, so a
file that is not MNIST (a bare ``.npy``, a pickle, a FIFO, a link to some other file) is
refused with nothing written, and the bytes that land are the very bytes that were checked.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # numpy is imported where arrays are built: a valid cache is checked without it
    import numpy as np

from mnist_hpc.dataset import (
    MAX_IMAGES,
    MAX_NPZ_BYTES,
    PIXELS,
    DatasetError,
    load_arrays,
    validate_arrays,
)
from mnist_hpc.io import sha256_file
from mnist_hpc.login.prefetch.errors import HashMismatchError, SourceError

# The four original files of LeCun's distribution, by the npz key each one becomes.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type MNIST uses
_IDX_MAX_BYTES = 4 + 4 * 3 + MAX_IMAGES * PIXELS  # the largest IDX file of MNIST-like data
_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass
class Plan:
    """What a prefetch will place, known before anything is written."""

    kind: str  # "download", "npz" or "idx"
    source: str  # URL or absolute path, recorded in the manifest
    # The hash the cache must hold: --sha256, or an npz source's own. None: any valid MNIST will do.
    expected_sha256: Optional[str]
    label: str = ""  # the source as messages name it (a symbolic link shows its target)
    data: bytes = b""  # kind "npz": the file's bytes, read once
    idx_files: dict[str, Path] = field(default_factory=dict)  # npz key -> IDX file (kind "idx")
    source_files: dict[str, str] = field(default_factory=dict)  # IDX file name -> sha256


def normalise_sha256(value: str) -> str:
    """Lower-case hex digest, accepting pooch's ``sha256:`` prefix.

    Raises:
        ValueError: not 64 hex digits.
    """
    hexdigest = value.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ValueError(f"{value!r} is not a sha256 (64 hex digits, as printed by `sha256sum`)")
    return hexdigest


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    # The usual spelling, and the dotted one some mirrors and archives use.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) of unsigned bytes into an array of its shape.

    The format: two zero bytes, a type code (0x08 = ubyte), the number of dimensions, one
    big-endian uint32 per dimension, then the data.

    Raises:
        DatasetError: the file is not a complete IDX file of unsigned bytes.
    """
    import numpy as np

    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as fh:
            raw = fh.read(_IDX_MAX_BYTES + 1)  # bounded: a gzip bomb is not inflated past MNIST's size
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path} is not a readable gzip file: {exc}") from exc
    if len(raw) > _IDX_MAX_BYTES:
        raise DatasetError(f"{path} holds more than {MAX_IMAGES} images, more than any MNIST-like set")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (it does not start with the IDX magic number)")
    if raw[2] != IDX_UBYTE:
        raise DatasetError(f"{path} holds IDX type 0x{raw[2]:02x}, expected 0x08 (unsigned bytes) as in MNIST")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path} has a truncated or invalid IDX header ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise DatasetError(
            f"{path} declares shape {dims} ({count} bytes of data) but holds {len(raw) - header} "
            "(truncated or corrupt copy)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _label(source: Path) -> str:
    if source.is_symlink():
        return f"{source} (a symbolic link to {os.path.realpath(source)})"
    return str(source)


def _plan_idx(source: Path, sha256: Optional[str]) -> Plan:
    if sha256 is not None:
        raise SourceError(
            f"--sha256 checks an npz, but {source} is a directory of IDX files that is converted "
            "here (the npz's hash is not known in advance); drop --sha256 (each IDX file's "
            "sha256 is recorded in the manifest)"
        )
    found = {key: _find_idx(source, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in found.items() if path is None]
    if missing:
        present = sorted(p.name for p in source.iterdir())
        raise SourceError(
            f"{source} lacks the IDX file(s) {missing} (each may end in .gz); it holds {present}. "
            f"Copy all four of {list(IDX_FILES.values())}, or pass --from a mnist.npz"
        )
    files = {key: path for key, path in found.items() if path is not None}
    sums = {path.name: sha256_file(path) for path in files.values()}
    return Plan("idx", str(source), None, label=_label(source), idx_files=files, source_files=sums)


def plan_source(url: str, sha256: Optional[str], source: Optional[Path]) -> Plan:
    """Resolve the source, and the hash the cache must hold to count as up to date.

    Raises:
        SourceError: the ``--from`` path is missing, unreadable, not a file, or incomplete.
        HashMismatchError: an npz source differs from an explicitly expected sha256.
        DatasetError: an npz source far larger than any MNIST-like npz.
    """
    if source is None:
        return Plan("download", url, sha256)
    label = _label(source)
    try:
        mode = source.stat().st_mode
        if stat.S_ISDIR(mode):
            return _plan_idx(source, sha256)
        kind = next((name for test, name in _FILE_KINDS if test(mode)), None)
        if kind is not None:  # never opened: reading a FIFO would block
            raise SourceError(
                f"--from {label} is {kind}, not a file; give the copied mnist.npz or a directory "
                "holding the four MNIST IDX files"
            )
        with open(source, "rb") as fh:
            data = fh.read(MAX_NPZ_BYTES + 1)
    except FileNotFoundError:
        raise SourceError(
            f"--from {label}: no such file or directory; give the copied mnist.npz or a directory "
            "holding the four MNIST IDX files"
        ) from None
    except OSError as exc:
        raise SourceError(f"cannot read --from {label}: {exc.strerror or exc}") from exc
    if len(data) > MAX_NPZ_BYTES:
        raise DatasetError(f"rejected {label}: it is larger than any MNIST-like npz ({MAX_NPZ_BYTES} bytes at most)")
    # Without --sha256 the expected hash is the source's own: the cache then counts as
    # up to date exactly when it already holds this very file.
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise HashMismatchError(
            f"sha256 mismatch for {source}: expected {sha256}, got {digest}. The copy is incomplete "
            "or a different file; copy it again (or pass the right --sha256 for a file you trust)",
            expected=sha256,
            got=digest,
        )
    return Plan("npz", str(source), digest, label=label, data=data)


def prepare(plan: Plan) -> tuple[bytes, dict[str, list[int]]]:
    """The validated npz bytes of a local source (read, or converted from IDX) and their shapes.

    Raises:
        DatasetError: the source is not valid MNIST.
    """
    if plan.kind == "npz":
        return plan.data, load_arrays(plan.data, plan.label)[1]
    import numpy as np

    arrays = {key: read_idx(path) for key, path in plan.idx_files.items()}
    shapes = validate_arrays(arrays, source=plan.label)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # uncompressed, like Keras' own mnist.npz: reading costs no inflating
    return buffer.getvalue(), shapes

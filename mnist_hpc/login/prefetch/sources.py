"""Where the npz comes from: planning a source (download, hand-copied npz, IDX directory) and the IDX reader."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # numpy is imported where arrays are built: a valid cache is checked without it
    import numpy as np

from mnist_hpc.cache import DatasetError, validate_arrays
from mnist_hpc.config import KERAS_MNIST_SHA256
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


@dataclass
class Plan:
    """What a prefetch will place, known before anything is written."""

    kind: str  # "download", "npz" or "idx"
    source: str  # URL or absolute path, recorded in the manifest
    expected_sha256: Optional[str]  # the npz's hash, when known in advance
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
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path} is not a readable gzip file: {exc}") from exc
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


def plan_source(url: str, sha256: Optional[str], source: Optional[Path]) -> Plan:
    """Resolve the source and the hash the cached npz must have.

    Raises:
        SourceError: the ``--from`` path is missing, unreadable or incomplete.
        HashMismatchError: an npz source differs from an explicitly expected sha256.
    """
    if source is None:
        return Plan("download", url, sha256 or KERAS_MNIST_SHA256)
    try:
        if source.is_dir():
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
            return Plan(
                "idx",
                str(source),
                None,
                idx_files=files,
                source_files={path.name: sha256_file(path) for path in files.values()},
            )
        if not source.is_file():
            raise SourceError(
                f"--from {source}: no such file or directory; give the copied mnist.npz or a directory "
                "holding the four MNIST IDX files"
            )
        # Without --sha256 the expected hash is the source's own: the cache then counts as
        # up to date exactly when it already holds this very file.
        digest = sha256_file(source)
    except OSError as exc:
        raise SourceError(f"cannot read --from {source}: {exc.strerror or exc}") from exc
    if sha256 is not None and digest != sha256:
        raise HashMismatchError(
            f"sha256 mismatch for {source}: expected {sha256}, got {digest}. The copy is incomplete "
            "or a different file; copy it again (or pass the right --sha256 for a file you trust)",
            expected=sha256,
            got=digest,
        )
    return Plan("npz", str(source), digest)


def write_source(plan: Plan, staged: Path) -> Path:
    """Write the npz of a local source (a copied npz, or IDX files converted) at ``staged``."""
    import numpy as np

    if plan.kind == "npz":
        shutil.copyfile(plan.source, staged)
        return staged
    arrays = {key: read_idx(path) for key, path in plan.idx_files.items()}
    validate_arrays(arrays, source=plan.source)
    with open(staged, "wb") as fh:
        # Uncompressed, like Keras' own mnist.npz, so reading it costs no decompression.
        np.savez(fh, **arrays)
    return staged

"""The dataset cache on disk: its file, its manifest, and the checks that make it trustworthy.

Shared by both sides: the login-node prefetch validates a file before placing it and checks a
valid cache in milliseconds (hash and ``.npy`` headers, no numpy), and the compute-node loader
(:mod:`mnist_hpc.compute.data`) reads the cache only through :func:`read_verified`. Only numpy
is imported here, and only by the functions that handle arrays.
"""

from __future__ import annotations

import ast
import json
import math
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    import numpy as np

from mnist_hpc.config import DataConfig, cache_file
from mnist_hpc.io import sha256_file

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
MANIFEST_SUFFIX = ".manifest.json"


class DatasetError(ValueError):
    """A file is not a valid MNIST npz (wrong format, keys, shapes, dtypes or labels)."""


class CacheMissingError(FileNotFoundError):
    """No verified dataset in the cache; the message gives the prefetch command to run."""


class CacheCorruptError(RuntimeError):
    """The cached dataset no longer matches its manifest (truncated or changed on disk)."""


def manifest_path(npz_path: Path) -> Path:
    """The manifest that sits beside a cached dataset file."""
    return npz_path.with_name(npz_path.name + MANIFEST_SUFFIX)


def prefetch_hint(cache_dir: Path) -> str:
    """The login-node command that fills ``cache_dir``."""
    return f"mnist-hpc-prefetch data.cache_dir={cache_dir}"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an npz without unpickling anything.

    Raises:
        DatasetError: the file is not an npz, or holds object arrays.
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DatasetError(f"{path} is a bare .npy array, not an npz archive of the four MNIST arrays")
            return {key: npz[key] for key in npz.files}
    except DatasetError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        head = _peek(path)
        kind = " (it looks like an HTML page, e.g. an error page from a proxy)" if b"<html" in head.lower() else ""
        raise DatasetError(f"{path} is not a readable npz archive{kind}: {exc}") from exc


def _peek(path: Path, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _validate_layout(layout: Mapping[str, tuple[tuple[int, ...], str]], source: str) -> None:
    """Check keys, dtypes and shapes, given as ``{key: (shape, dtype)}``, of the four MNIST arrays."""
    missing = [k for k in REQUIRED_KEYS if k not in layout]
    if missing:
        raise DatasetError(
            f"{source} lacks the key(s) {missing}; an MNIST npz holds {list(REQUIRED_KEYS)}, found {sorted(layout)}"
        )
    for key in REQUIRED_KEYS:
        if layout[key][1] != "uint8":
            raise DatasetError(f"{source}: {key} has dtype {layout[key][1]}, expected uint8")
    for split in ("train", "test"):
        x, y = layout[f"x_{split}"][0], layout[f"y_{split}"][0]
        if len(x) != 3 or tuple(x[1:]) != IMAGE_SHAPE:
            raise DatasetError(f"{source}: x_{split} has shape {tuple(x)}, expected (N, 28, 28)")
        if len(y) != 1:
            raise DatasetError(f"{source}: y_{split} has shape {tuple(y)}, expected (N,)")
        if x[0] != y[0]:
            raise DatasetError(f"{source}: x_{split} has {x[0]} images but y_{split} has {y[0]} labels")
        if x[0] == 0:
            raise DatasetError(f"{source}: x_{split} is empty")


def validate_arrays(arrays: Mapping[str, np.ndarray], source: str = "dataset") -> dict[str, list[int]]:
    """Check the four MNIST arrays; return their shapes.

    Raises:
        DatasetError: naming the first problem found and the file it came from.
    """
    _validate_layout({key: (tuple(a.shape), str(a.dtype)) for key, a in arrays.items()}, source)
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if int(y.max()) >= NUM_CLASSES:
            raise DatasetError(f"{source}: y_{split} holds label {int(y.max())}; labels must lie in 0-9")
    return {key: list(arrays[key].shape) for key in REQUIRED_KEYS}


def _npy_header(member: Any, name: str) -> dict[str, Any]:
    """The header dict of a ``.npy`` stream: ``descr``, ``fortran_order``, ``shape`` (format 1-3)."""
    magic = member.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        raise ValueError(f"member {name} is not a .npy array")
    length_format = "<H" if magic[6] == 1 else "<I"
    (length,) = struct.unpack(length_format, member.read(struct.calcsize(length_format)))
    header = ast.literal_eval(member.read(length).decode("utf-8" if magic[6] == 3 else "latin1"))
    if not isinstance(header, dict) or not {"descr", "shape"} <= header.keys():
        raise ValueError(f"member {name} has a malformed .npy header")
    return header


def _dtype_name(descr: Any) -> str:
    """numpy's name for a simple ``.npy`` descr (``'|u1'`` -> ``'uint8'``, ``'<f4'`` -> ``'float32'``)."""
    kinds = {"u": "uint", "i": "int", "f": "float"}
    if isinstance(descr, str) and len(descr) >= 3 and descr[1] in kinds and descr[2:].isdigit():
        return f"{kinds[descr[1]]}{int(descr[2:]) * 8}"
    return str(descr)


def read_npz_layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` of an npz's arrays, read from their ``.npy`` headers only.

    Neither numpy nor the arrays' data is touched, so this costs milliseconds where importing
    numpy and decompressing MNIST costs a third of a second.

    Raises:
        DatasetError: the file is not a zip of ``.npy`` arrays, or a header is unreadable.
    """
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    header = _npy_header(member, name)
                key = name[: -len(".npy")] if name.endswith(".npy") else name
                layout[key] = (tuple(header["shape"]), _dtype_name(header["descr"]))
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path} is not a readable npz archive: {exc}") from exc
    return layout


def read_manifest(npz_path: Path) -> Optional[dict[str, Any]]:
    """The manifest beside a cached file, or None when it is absent or unreadable."""
    try:
        return json.loads(manifest_path(npz_path).read_text())
    except (OSError, ValueError):
        return None


def verify_cached(npz_path: Path) -> dict[str, Any]:
    """Check a cached file against its manifest's sha256; return the manifest.

    Raises:
        CacheMissingError: no file or no manifest at the path.
        CacheCorruptError: the file's size or sha256 differs from the manifest.
    """
    hint = prefetch_hint(npz_path.parent)
    if not npz_path.is_file():
        raise CacheMissingError(f"no cached MNIST at {npz_path}; run `{hint}` on a login node first")
    manifest = read_manifest(npz_path)
    if manifest is None or "sha256" not in manifest:
        raise CacheMissingError(
            f"{npz_path} has no readable manifest at {manifest_path(npz_path)}, so it was not placed by a "
            f"verified prefetch; run `{hint}` on a login node"
        )
    size = npz_path.stat().st_size
    if "size" in manifest and size != manifest["size"]:
        raise CacheCorruptError(
            f"{npz_path} is {size} bytes but its manifest records {manifest['size']} (truncated or replaced); "
            f"run `{hint} --force` on a login node"
        )
    digest = sha256_file(npz_path)
    if digest != manifest["sha256"]:
        raise CacheCorruptError(
            f"{npz_path} has sha256 {digest} but its manifest records {manifest['sha256']} (corrupted or "
            f"replaced after prefetch); run `{hint} --force` on a login node"
        )
    return manifest


def check_cached(npz_path: Path) -> dict[str, Any]:
    """The login node's check of a cached file: hash against manifest, then keys/dtypes/shapes.

    The sha256 ties the file to the one that passed :func:`validate_arrays` (labels included)
    when prefetch placed it; the array headers are checked again, and against the shapes the
    manifest records, without decompressing the arrays. Returns the manifest.

    Raises:
        CacheMissingError, CacheCorruptError: as :func:`verify_cached`.
        DatasetError: the headers do not describe the MNIST arrays the manifest records.
    """
    manifest = verify_cached(npz_path)
    layout = read_npz_layout(npz_path)
    _validate_layout(layout, source=str(npz_path))
    shapes = {key: list(layout[key][0]) for key in REQUIRED_KEYS}
    recorded = manifest.get("shapes")
    if recorded is not None and recorded != shapes:
        raise CacheCorruptError(
            f"{npz_path} holds arrays of shapes {shapes} but its manifest records {recorded}; "
            f"run `{prefetch_hint(npz_path.parent)} --force` on a login node"
        )
    return manifest


def split_index(n: int, validation_split: float) -> int:
    """Index where the held-out validation tail starts (Keras' ``validation_split`` rule)."""
    return int(math.ceil(n * (1.0 - validation_split)))


def validation_cut(n: int, validation_split: float) -> int:
    """:func:`split_index`, refusing a split that leaves either part empty.

    Raises:
        DatasetError: naming ``data.validation_split`` and what it leaves.
    """
    cut = split_index(n, validation_split)
    if cut < 1 or cut >= n:
        raise DatasetError(
            f"data.validation_split={validation_split} leaves {cut} of {n} "
            "training samples; choose a split that keeps both parts non-empty"
        )
    return cut


def read_verified(cfg: DataConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The cached arrays, checked against the manifest and validated, with the manifest.

    Raises:
        CacheMissingError, CacheCorruptError, DatasetError: as :func:`load_mnist`.
    """
    path = cache_file(cfg)
    manifest = verify_cached(path)
    arrays = read_npz(path)
    validate_arrays(arrays, source=str(path))
    return arrays, manifest



"""The dataset cache on disk: its names, its manifest, and the checks that make it trustworthy.

Layout of ``data.cache_dir`` for ``data.filename=mnist.npz`` (the only module that knows it)::

    mnist.npz.manifest.json     the pointer: names the current object by its sha256, records
                                source, size and shapes; replaced atomically to switch datasets
    .mnist.npz.objects/<sha256>.npz   immutable, content-addressed copies of validated files
    mnist.npz                   symbolic link to the current object, for people and tools;
                                without it the cache counts as missing (deleting it deletes the cache)

Readers (:func:`read_verified` on compute nodes, :func:`check_cached` on login nodes) read the
manifest once, read the object it names into memory once, hash those bytes and parse those same
bytes, so a dataset replaced meanwhile (``prefetch --force``) can never pair one file's arrays
with another's manifest. A reader that finds its object gone re-reads the manifest. Array
shapes are checked in the ``.npy`` headers and the zip directory before anything is
decompressed. Only numpy is imported here, and only where arrays are built.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import io
import json
import math
import os
import re
import shlex
import struct
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import numpy as np

from mnist_hpc.config import KERAS_MNIST_URL, DataConfig, cache_file

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (28, 28)
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
NUM_CLASSES = 10
MANIFEST_SUFFIX = ".manifest.json"
FORMAT = 2  # manifest format: 2 = content-addressed objects beside a manifest that points at one
# MNIST-like sets (MNIST, Fashion-, K-, QMNIST, EMNIST digits) hold at most 240,000 images per split;
# anything claiming more is another dataset or a decompression bomb, refused before inflating it.
MAX_IMAGES = 300_000
MAX_MEMBERS = 16
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own limit (np.load's max_header_size)
# An npz is never larger than its arrays: two splits of at most MAX_IMAGES images and labels.
MAX_NPZ_BYTES = 2 * MAX_IMAGES * (PIXELS + 1) + (1 << 20)
READ_ATTEMPTS = 5  # re-reads of the manifest when a prefetch switches datasets under a reader
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DatasetError(ValueError):
    """A file is not a valid MNIST npz (wrong format, keys, shapes, dtypes or labels)."""


class CacheError(Exception):
    """The cache cannot be used; the message alone says what is wrong and what to run."""


class CacheMissingError(CacheError, FileNotFoundError):
    """No verified dataset in the cache; the message gives the prefetch command to run."""


class CacheCorruptError(CacheError, RuntimeError):
    """The cache no longer matches its manifest, or the manifest is unreadable."""


class CacheInvalidError(CacheCorruptError, DatasetError):
    """The cached file matches its manifest but its arrays are not valid MNIST (forged manifest)."""


# ---------------------------------------------------------------------------- names


def filename_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be ``data.filename`` (a plain name inside the cache), or None."""
    if not name or name in (".", ".."):
        return "give a file name such as mnist.npz"
    if "/" in name or "\\" in name or "\0" in name:
        return "must be a plain file name inside data.cache_dir (no '/'); put directories in data.cache_dir"
    if name.startswith("."):
        return "names starting with '.' are reserved for the cache's own files; use e.g. mnist.npz"
    if name.endswith(MANIFEST_SUFFIX):
        return f"names ending in {MANIFEST_SUFFIX} are reserved for manifests; use e.g. mnist.npz"
    return None


def manifest_path(npz_path: Path) -> Path:
    """The manifest (the pointer to the current object) beside a cached dataset's name."""
    return npz_path.with_name(npz_path.name + MANIFEST_SUFFIX)


def objects_dir(npz_path: Path) -> Path:
    """The directory of the content-addressed objects behind ``npz_path``."""
    return npz_path.with_name(f".{npz_path.name}.objects")


def object_path(npz_path: Path, sha256: str) -> Path:
    """The object holding the bytes whose sha256 is ``sha256``."""
    return objects_dir(npz_path) / f"{sha256}.npz"


def view_target(npz_path: Path, sha256: str) -> str:
    """What the symbolic link at ``npz_path`` points to (relative, so the directory can move)."""
    return f"{objects_dir(npz_path).name}/{sha256}.npz"


def prefetch_command(npz_path: Path, manifest: Optional[dict[str, Any]] = None, *, force: bool = False) -> str:
    """The login-node command that fills ``npz_path``; given a manifest, the one that refetches
    its recorded source (``--from`` a file, ``--url`` of a mirror) with ``--force``."""
    words = ["mnist-hpc-prefetch", f"data.cache_dir={npz_path.parent}"]
    if npz_path.name != DataConfig.filename:
        words.append(f"data.filename={npz_path.name}")
    if manifest is not None:
        if manifest["source_kind"] in ("npz", "idx"):
            words += ["--from", manifest["source"]]
        elif manifest["source"] != KERAS_MNIST_URL:
            words += ["--url", manifest["source"], "--sha256", manifest["sha256"]]
    if force or manifest is not None:
        words.append("--force")
    return " ".join(shlex.quote(w) for w in words)


# ---------------------------------------------------------------------------- manifest


def _manifest_problem(manifest: Any) -> Optional[str]:
    """What is wrong with a parsed manifest, or None."""
    if not isinstance(manifest, dict):
        kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
        return f"holds {kinds.get(type(manifest), 'a number')}, not a JSON object"
    if manifest.get("format") != FORMAT:
        return f"has format {manifest.get('format')!r}, not {FORMAT} (written by another mnist-hpc version)"
    if not isinstance(manifest.get("sha256"), str) or not _SHA256.fullmatch(manifest["sha256"]):
        return "has no valid sha256"
    if type(manifest.get("size")) is not int or not 0 < manifest["size"] <= MAX_NPZ_BYTES:
        return "has no valid size"
    source, kind = manifest.get("source"), manifest.get("source_kind")
    if not isinstance(source, str) or not source.isprintable() or kind not in ("download", "npz", "idx"):
        return "has no valid source"
    shapes = manifest.get("shapes")
    if not isinstance(shapes, dict) or sorted(shapes) != sorted(REQUIRED_KEYS) or not all(
        isinstance(s, list) and all(type(n) is int and n >= 0 for n in s) for s in shapes.values()
    ):
        return "has no valid shapes"
    return None


def parse_manifest(raw: bytes, npz_path: Path) -> dict[str, Any]:
    """The manifest read from ``raw`` (the bytes of :func:`manifest_path`), fully checked.

    Raises:
        CacheCorruptError: naming the manifest, what it holds instead, and the command to run.
    """
    try:
        manifest: Any = json.loads(raw)
        problem = _manifest_problem(manifest)
    except (ValueError, RecursionError):
        manifest, problem = None, "is not valid JSON (truncated or overwritten?)"
    if problem is not None and isinstance(manifest, dict) and "format" not in manifest and "sha256" in manifest:
        adopt = f"{prefetch_command(npz_path)} --from {shlex.quote(str(npz_path))}"
        raise CacheCorruptError(f"{npz_path} was cached by an older mnist-hpc; adopt it with `{adopt}` on a login node")
    if problem is not None:
        raise CacheCorruptError(
            f"the manifest {manifest_path(npz_path)} {problem}; run `{prefetch_command(npz_path, force=True)}` "
            "(with `--from FILE` if you imported one) on a login node"
        )
    return manifest


def _missing(npz_path: Path) -> CacheMissingError:
    return CacheMissingError(f"no cached MNIST at {npz_path}; run `{prefetch_command(npz_path)}` on a login node first")


def read_manifest(npz_path: Path) -> tuple[dict[str, Any], bytes]:
    """The checked manifest of ``npz_path`` and its raw bytes (to notice a switch later).

    Raises:
        CacheMissingError: no manifest (nothing was prefetched there).
        CacheCorruptError: an unreadable or invalid manifest.
    """
    path = manifest_path(npz_path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(1 << 16)
    except FileNotFoundError:
        raise _missing(npz_path) from None
    except OSError as exc:
        raise CacheCorruptError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_manifest(raw, npz_path), raw


# ---------------------------------------------------------------------------- npz headers


def describe_bytes(head: bytes) -> str:
    """What a file that is not an npz looks like, from its first bytes ("a bare .npy array" ...)."""
    lowered = head[:512].lower()
    if not head:
        return "it is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a bare .npy array (one array), not a zip of the four MNIST arrays"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle (not loaded: unpickling can run code)"
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed (gunzip it; IDX files are passed as their directory)"
    if head[:3] == b"\x00\x00\x08":
        return "it is a single IDX file (pass the directory holding all four)"
    if b"<html" in lowered or b"<!doctype html" in lowered:
        return "it looks like an HTML page, e.g. an error page from a proxy"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head[:512]):
        return "it is a text file"
    return "it is not a zip archive"


def _npy_header(member: Any, name: str) -> tuple[dict[str, Any], int]:
    """The header dict of a ``.npy`` stream (format 1-3) and the header's length in bytes.

    ``name`` says where the stream is ("f.npz: member x.npy") in the messages.
    """
    magic = member.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        raise DatasetError(f"{name} is not a .npy array")
    length_format = "<H" if magic[6] == 1 else "<I"
    (length,) = struct.unpack(length_format, member.read(struct.calcsize(length_format)))
    if length > MAX_NPY_HEADER_BYTES:
        raise DatasetError(f"{name} has a .npy header of {length} bytes (numpy allows {MAX_NPY_HEADER_BYTES})")
    text = member.read(length).decode("utf-8" if magic[6] == 3 else "latin1")
    header = ast.literal_eval(text)
    shape = header.get("shape") if isinstance(header, dict) else None
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) or "descr" not in header:
        raise DatasetError(f"{name} has a malformed .npy header")
    return header, 8 + struct.calcsize(length_format) + length


def _dtype(descr: Any) -> tuple[str, Optional[int]]:
    """numpy's name and item size of a simple ``.npy`` descr (``'|u1'`` -> ``('uint8', 1)``), else ``(descr, None)``."""
    kinds = {"u": "uint", "i": "int", "f": "float", "b": "bool"}
    if isinstance(descr, str) and len(descr) >= 3 and descr[1] in kinds and descr[2:].isdigit():
        size = int(descr[2:])
        return ("bool" if descr[1] == "b" else f"{kinds[descr[1]]}{size * 8}"), size
    return str(descr), None


def read_npz_layout(source: Union[Path, bytes], name: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` of an npz's arrays, from the ``.npy`` headers and the zip directory.

    Each member's size in the zip directory must match what its header declares, and no array
    may exceed the bounds of MNIST-like data, so nothing is ever inflated beyond that. Costs
    milliseconds and no numpy import.

    Raises:
        DatasetError: the bytes are not a zip of sane ``.npy`` arrays; says what they are instead.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    name = name or str(source)
    if not data.startswith(b"PK"):
        raise DatasetError(f"{name} is not a readable npz archive: {describe_bytes(data)}")
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_MEMBERS:
                raise DatasetError(f"{name} holds {len(infos)} members; an MNIST npz holds {len(REQUIRED_KEYS)}")
            for info in infos:
                with archive.open(info) as member:
                    header, header_bytes = _npy_header(member, f"{name}: member {info.filename}")
                key = info.filename.removesuffix(".npy")
                shape, (dtype, size) = header["shape"], _dtype(header["descr"])
                count = math.prod(shape)
                if (key in REQUIRED_KEYS and shape and shape[0] > MAX_IMAGES) or count * (size or 1) > MAX_NPZ_BYTES:
                    raise DatasetError(
                        f"{name}: {key} claims shape {shape}; MNIST-like data holds at most {MAX_IMAGES} "
                        "images per split (another dataset, or a decompression bomb)"
                    )
                if size is not None and info.file_size != header_bytes + count * size:
                    raise DatasetError(
                        f"{name}: {key} declares shape {shape} ({header_bytes + count * size} bytes) but the "
                        f"zip directory records {info.file_size} bytes (damaged or forged archive)"
                    )
                layout[key] = (shape, dtype)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, struct.error,
            SyntaxError, MemoryError, RecursionError, NotImplementedError, RuntimeError, OverflowError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"{name} is not a readable npz archive (damaged or truncated zip: {reason})") from exc
    return layout


def _validate_layout(layout: dict[str, tuple[tuple[int, ...], str]], source: str) -> dict[str, list[int]]:
    """Check keys, dtypes and shapes, given as ``{key: (shape, dtype)}``; return the shapes."""
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
    return {key: list(layout[key][0]) for key in REQUIRED_KEYS}


def validate_arrays(arrays: dict[str, np.ndarray], source: str = "dataset") -> dict[str, list[int]]:
    """Check the four MNIST arrays; return their shapes.

    Raises:
        DatasetError: naming the first problem found and the file it came from.
    """
    shapes = _validate_layout({key: (tuple(a.shape), str(a.dtype)) for key, a in arrays.items()}, source)
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if int(y.max()) >= NUM_CLASSES:
            raise DatasetError(f"{source}: y_{split} holds label {int(y.max())}; labels must lie in 0-9")
    return shapes


def load_arrays(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Parse and validate the four MNIST arrays of an npz held in memory; return them and their shapes.

    The headers are checked (:func:`read_npz_layout`) before numpy inflates anything, and only
    the four arrays are read, never pickles.

    Raises:
        DatasetError: naming ``source`` and the first problem found.
    """
    import numpy as np

    _validate_layout(read_npz_layout(data, source), source)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in REQUIRED_KEYS}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DatasetError(f"{source} is not a readable npz archive: {exc}") from exc
    return arrays, validate_arrays(arrays, source)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four MNIST arrays of an npz file, checked (see :func:`load_arrays`)."""
    return load_arrays(Path(path).read_bytes(), str(path))[0]


# ---------------------------------------------------------------------------- readers


def _fault(kind: type[CacheError], what: str, npz_path: Path, manifest: dict[str, Any]) -> CacheError:
    """A cache error whose message ends with the command that refetches the recorded source."""
    return kind(f"{what}; run `{prefetch_command(npz_path, manifest)}` on a login node")


def _manifest_bytes(npz_path: Path) -> Optional[bytes]:
    try:
        return manifest_path(npz_path).read_bytes()
    except OSError:
        return None


def _read_object(npz_path: Path) -> tuple[bytes, dict[str, Any]]:
    """The bytes of the current object and the manifest that names them, sha256 verified.

    A prefetch that switches datasets meanwhile makes the object vanish (after a grace period)
    or the manifest change: then the manifest is read again, so a pair is always consistent.
    """
    if not os.path.lexists(npz_path):  # deleting the link (the user-facing name) deletes the dataset
        raise _missing(npz_path)
    for attempt in range(1, READ_ATTEMPTS + 1):
        manifest, raw = read_manifest(npz_path)
        obj, size = object_path(npz_path, manifest["sha256"]), manifest["size"]
        try:
            with open(obj, "rb") as fh:
                data = fh.read(size + 1)  # one byte more shows a file grown since
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise _fault(CacheCorruptError, f"cannot read {obj}: {exc.strerror}", npz_path, manifest) from exc
            problem = (CacheMissingError, f"{npz_path}: its manifest names {obj}, which is missing")
        else:
            if len(data) != size:
                problem = (CacheCorruptError, f"{obj} is {len(data)} bytes but its manifest records {size} "
                                              "(truncated or replaced)")
            elif (digest := hashlib.sha256(data).hexdigest()) != manifest["sha256"]:
                problem = (CacheCorruptError, f"{obj} has sha256 {digest} but its manifest records "
                                              f"{manifest['sha256']} (corrupted or replaced after prefetch)")
            else:
                return data, manifest
        if attempt == READ_ATTEMPTS or _manifest_bytes(npz_path) == raw:  # not a switch under our feet
            raise _fault(*problem, npz_path, manifest)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _checked(data: bytes, npz_path: Path, manifest: dict[str, Any]) -> dict[str, list[int]]:
    """The verified object's shapes from its headers, which must be MNIST's and the manifest's."""
    try:
        shapes = _validate_layout(read_npz_layout(data, str(npz_path)), str(npz_path))
    except DatasetError as exc:
        raise _fault(CacheInvalidError, str(exc), npz_path, manifest) from exc
    if shapes != manifest["shapes"]:
        what = f"{npz_path} holds arrays of shapes {shapes} but its manifest records {manifest['shapes']}"
        raise _fault(CacheCorruptError, what, npz_path, manifest)
    return shapes


def check_cached(npz_path: Path) -> dict[str, Any]:
    """The login node's check of a cache: manifest, object hash, ``.npy`` headers; return the manifest.

    The sha256 ties the object to the file that passed :func:`validate_arrays` (labels
    included) when prefetch placed it; the headers are checked again, without decompressing.

    Raises:
        CacheMissingError, CacheCorruptError (CacheInvalidError for invalid arrays).
    """
    data, manifest = _read_object(npz_path)
    _checked(data, npz_path, manifest)
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
    """The cached arrays, parsed from the very bytes whose sha256 matched the manifest, with the manifest.

    Raises:
        CacheMissingError, CacheCorruptError (CacheInvalidError for invalid arrays): one line
        saying what is wrong and which command fixes it.
    """
    path = cache_file(cfg)
    data, manifest = _read_object(path)
    _checked(data, path, manifest)
    try:
        arrays, _ = load_arrays(data, str(path))
    except DatasetError as exc:
        raise _fault(CacheInvalidError, str(exc), path, manifest) from exc
    return arrays, manifest

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

import errno
import hashlib
import json
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import numpy as np

from mnist_hpc.dataset import (
    MAX_NPZ_BYTES,
    REQUIRED_KEYS,
    DatasetError,
    _validate_layout,
    load_arrays,
    read_npz_layout,
)
from mnist_hpc.io import open_regular_file

# Keras' own download of the lesson's file, and the sha256 Keras pins for it: what prefetch fetches by default.
KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
# data.filename's default: the name Keras gives the file.
DEFAULT_FILENAME = "mnist.npz"
MANIFEST_SUFFIX = ".manifest.json"
FORMAT = 2  # manifest format: 2 = content-addressed objects beside a manifest that points at one
READ_ATTEMPTS = 5  # re-reads of the manifest when a prefetch switches datasets under a reader
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    if npz_path.name != DEFAULT_FILENAME:
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


def _cannot_read(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be read; for a file another member left private, what its owner can run."""
    fix = f" (its owner can run `chmod g+r {shlex.quote(str(path))}`)" if exc.errno == errno.EACCES else ""
    return f"cannot read {path}: {exc.strerror or exc}{fix}"


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
        with open_regular_file(path) as fh:
            raw = fh.read(1 << 16)
    except FileNotFoundError:
        raise _missing(npz_path) from None
    except OSError as exc:
        raise CacheCorruptError(_cannot_read(path, exc)) from exc
    return parse_manifest(raw, npz_path), raw


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
            with open_regular_file(obj) as fh:
                data = fh.read(size + 1)  # one byte more shows a file grown since
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise _fault(CacheCorruptError, _cannot_read(obj, exc), npz_path, manifest) from exc
            problem = (CacheMissingError, f"{npz_path}: its manifest names {obj}, which is missing")
        else:
            if len(data) != size:
                # At most one byte past the size was read: a longer file is known to be longer only.
                length = f"more than {size}" if len(data) > size else str(len(data))
                problem = (CacheCorruptError, f"{obj} is {length} bytes but its manifest records {size} "
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


def cache_file(data: Any) -> Path:
    """Absolute path of the cached dataset named by a config's ``data`` section (its cache_dir and filename)."""
    return Path(data.cache_dir).expanduser().resolve() / data.filename


def read_verified(cfg: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The cached arrays, parsed from the very bytes whose sha256 matched the manifest, with the manifest.

    Raises:
        CacheMissingError, CacheCorruptError (CacheInvalidError for invalid arrays): one line
        saying what is wrong and which command fixes it.
    """
    global _inflated
    path = cache_file(cfg)
    data, manifest = _read_object(path)
    _checked(data, path, manifest)
    if _inflated is not None and _inflated[0] == manifest["sha256"]:
        return dict(_inflated[1]), manifest  # these very bytes, verified again above, were parsed before
    try:
        arrays, _ = load_arrays(data, str(path))
    except DatasetError as exc:
        raise _fault(CacheInvalidError, str(exc), path, manifest) from exc
    for array in arrays.values():
        array.flags.writeable = False  # shared by the process's later trials
    _inflated = (manifest["sha256"], arrays)
    return arrays, manifest


# The arrays this process last parsed from a verified object, by that object's sha256. The trials
# of a packed task or a search worker read the same object: each reads and hashes its bytes
# again (a changed or damaged cache is caught as before) but inflates them only once.
_inflated: Optional[tuple[str, dict[str, np.ndarray]]] = None

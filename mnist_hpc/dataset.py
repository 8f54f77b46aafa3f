"""What an MNIST npz is: four uint8 arrays of the right shapes, checked without trusting the file.

The checks run on bytes in memory: the ``.npy`` headers and the zip directory are read and
bounded before anything is decompressed (a zip bomb that claims ten million images is refused
from its header), then the arrays themselves (dtype, shapes, counts, labels 0-9). Shared by the
login-node prefetch (which validates a file before placing it) and :mod:`mnist_hpc.cache`
(which serves the validated file to jobs). Only numpy is imported here, and only where arrays
are built.
"""

from __future__ import annotations

import ast
import io
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import numpy as np

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (28, 28)
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
NUM_CLASSES = 10
# MNIST-like sets (MNIST, Fashion-, K-, QMNIST, EMNIST digits) hold at most 240,000 images per split;
# anything claiming more is another dataset or a decompression bomb, refused before inflating it.
MAX_IMAGES = 300_000
MAX_MEMBERS = 16
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own limit (np.load's max_header_size)
# An npz is never larger than its arrays: two splits of at most MAX_IMAGES images and labels.
MAX_NPZ_BYTES = 2 * MAX_IMAGES * (PIXELS + 1) + (1 << 20)
class DatasetError(ValueError):
    """A file is not a valid MNIST npz (wrong format, keys, shapes, dtypes or labels)."""


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



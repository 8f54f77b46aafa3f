"""Tests of the login-node prefetch, all offline: downloads come from a loopback HTTP server.

Every failure test also checks that the cache directory gained nothing: no npz, no manifest,
no object, no temporary file, no staging directory (only the lock file, which stays by design).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mnist_hpc import __version__
from mnist_hpc.cache import check_cached, manifest_path
from mnist_hpc.compute.data import load_mnist
from mnist_hpc.cache import KERAS_MNIST_SHA256
from mnist_hpc.config import DataConfig
from mnist_hpc.dataset import DatasetError, read_npz
from mnist_hpc.io import sha256_file
from mnist_hpc.login.prefetch import cli as prefetch_cli, fetch as prefetch_fetch
from mnist_hpc.login.prefetch import download, fetch, sources, store
from mnist_hpc.login.prefetch.errors import (
    CacheFullError,
    CacheNotWritableError,
    HashMismatchError,
    HttpError,
    NetworkError,
    PrefetchError,
    SourceError,
    TruncatedDownloadError,
)
from tests.helpers import IN_CI, assert_clean, listing, make_arrays, npz_bytes, sha, subprocess_env
from tests.http_fixture import LoopbackServer, Route

# No proxy may swallow the requests meant for the loopback server (conftest.no_proxy).
pytestmark = pytest.mark.usefixtures("no_proxy")

FAST = {"retries": 1, "backoff_s": 0.0, "timeout_s": 10.0, "progress": False}


# ---------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def tmpfs(mountpoint: Path, options: str) -> None:
    """Mount a tmpfs (needs root and CAP_SYS_ADMIN, as CI has).

    Where that is impossible the test skips locally, with the reason, and fails under CI=true:
    these are the only tests of real ENOSPC/EROFS errors, so CI must not pass without them.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        problem = "no mount(8) on PATH"
    else:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], capture_output=True, text=True
        )
        if result.returncode == 0:
            return
        problem = f"mount -t tmpfs failed: {result.stderr.strip() or result.returncode}"
    if IN_CI:
        pytest.fail(f"{problem}; CI runs as root and must run this filesystem test")
    pytest.skip(f"{problem} (needs root); CI fails here instead of skipping")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for mountpoint in reversed(mounted):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


# ---------------------------------------------------------------------------- download


def test_download_places_file_and_manifest(server: LoopbackServer, good, cache: Path) -> None:
    arrays, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    target = cache / "mnist.npz"
    before = datetime.now(timezone.utc).replace(microsecond=0)

    manifest = prefetch_fetch.prefetch(target, url=url, sha256=digest, **FAST)

    assert server.count("/mnist.npz") == 1
    assert target.read_bytes() == data
    on_disk = json.loads(manifest_path(target).read_text())
    assert on_disk == manifest
    assert manifest["sha256"] == digest == sha256_file(target)
    assert manifest["size"] == len(data)
    assert manifest["source"] == url
    assert manifest["source_kind"] == "download"
    assert manifest["shapes"] == {"x_train": [20, 28, 28], "y_train": [20], "x_test": [10, 28, 28], "y_test": [10]}
    assert manifest["mnist_hpc_version"] == __version__
    created = datetime.fromisoformat(manifest["created"])
    assert created.utcoffset().total_seconds() == 0 and created >= before
    # The loader's own check accepts it, and the arrays are the ones served.
    assert check_cached(target) == manifest
    loaded = read_npz(target)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    # ... and so does the compute-node loader that training uses.
    data_for_training = load_mnist(DataConfig(cache_dir=str(cache)))
    assert data_for_training.x_train.shape == (20, 784) and data_for_training.sha256 == digest
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_valid_cache_makes_no_request(server: LoopbackServer, good, cache: Path, capsys) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    target = cache / "mnist.npz"
    first = prefetch_fetch.prefetch(target, url=url, sha256=digest, **FAST)
    mtime = target.stat().st_mtime_ns

    second = prefetch_fetch.prefetch(target, url=url, sha256=digest, **FAST)
    rc = prefetch_cli.main(["--url", url, "--sha256", digest, f"data.cache_dir={cache}"])

    assert server.count("/mnist.npz") == 1
    assert second == first
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(target)
    assert f"already cached and verified: {target}" in err
    assert target.stat().st_mtime_ns == mtime
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_valid_cache_needs_no_network_at_all(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    target = cache / "mnist.npz"
    prefetch_fetch.prefetch(target, url=server.add("/mnist.npz", Route(body=data)), sha256=digest, **FAST)
    # Nothing listens on this port: a request would fail.
    manifest = prefetch_fetch.prefetch(target, url=f"http://127.0.0.1:{free_port()}/mnist.npz", sha256=digest, **FAST)
    assert manifest["sha256"] == digest


def test_corrupted_cache_is_replaced(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    target = cache / "mnist.npz"
    prefetch_fetch.prefetch(target, url=url, sha256=digest, **FAST)
    target.write_bytes(data[:-10] + b"0123456789")  # same size, different content

    prefetch_fetch.prefetch(target, url=url, sha256=digest, **FAST)

    assert server.count("/mnist.npz") == 2
    assert target.read_bytes() == data
    assert check_cached(target)["sha256"] == digest


def test_cache_with_other_hash_is_replaced_and_force_redownloads(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    other = npz_bytes(make_arrays(seed=1))
    target = cache / "mnist.npz"
    prefetch_fetch.prefetch(target, url=server.add("/other.npz", Route(body=other)), sha256=sha(other), **FAST)
    url = server.add("/mnist.npz", Route(body=data))

    prefetch_fetch.prefetch(target, url=url, sha256=digest, **FAST)  # expected hash differs: replace
    prefetch_fetch.prefetch(target, url=url, sha256=digest, **FAST)  # now valid: no request
    prefetch_fetch.prefetch(target, url=url, sha256=digest, force=True, **FAST)

    assert server.count("/mnist.npz") == 2
    assert check_cached(target)["sha256"] == digest
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_leftovers_of_a_killed_prefetch_are_swept(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    cache.mkdir()
    (cache / ".mnist-hpc-staging-dead").mkdir()
    (cache / ".mnist-hpc-staging-dead" / "mnist.npz").write_bytes(b"partial")
    (cache / ".mnist.npz.abc123.tmp").write_bytes(b"partial")
    prefetch_fetch.prefetch(cache / "mnist.npz", url=server.add("/m", Route(body=data)), sha256=digest, **FAST)
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


# ---------------------------------------------------------------------------- download failures


def test_hash_mismatch(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    wrong = "ab" * 32
    with pytest.raises(HashMismatchError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=wrong, **FAST)
    message = str(info.value)
    assert f"expected {wrong}" in message and f"got {digest}" in message
    assert "--sha256" in message and url in message
    assert (info.value.expected, info.value.got) == (wrong, digest)
    assert server.count("/mnist.npz") == 1  # a hash mismatch is not retried
    assert_clean(cache)


def test_truncated_body_is_retried_then_reported(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data, truncate_to=len(data) // 3))
    with pytest.raises(TruncatedDownloadError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=digest, **{**FAST, "retries": 2})
    message = str(info.value)
    assert "cut off" in message and url in message
    assert f"received {len(data) // 3} bytes" in message
    assert server.count("/mnist.npz") == 3
    assert_clean(cache)


def test_http_404_is_not_retried(server: LoopbackServer, cache: Path) -> None:
    url = server.url("/missing.npz")
    with pytest.raises(HttpError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, **{**FAST, "retries": 3})
    assert info.value.status == 404 and isinstance(info.value, PrefetchError)
    assert "HTTP 404" in str(info.value) and url in str(info.value) and "--url" in str(info.value)
    assert server.count("/missing.npz") == 1
    assert_clean(cache)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_http_5xx_and_429_are_retried(server: LoopbackServer, cache: Path, status: int) -> None:
    url = server.add("/mnist.npz", Route(status=status, body=b"busy", content_type="text/plain"))
    with pytest.raises(HttpError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, **{**FAST, "retries": 2})
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value) and "3 attempt(s)" in str(info.value)
    assert server.count("/mnist.npz") == 3
    assert_clean(cache)


def test_retry_succeeds_after_a_transient_error(server: LoopbackServer, good, cache: Path, monkeypatch) -> None:
    _, data, digest = good
    route = Route(status=503, body=b"busy")
    url = server.add("/mnist.npz", route)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        route.status, route.body = 200, data  # the server recovers during the backoff

    monkeypatch.setattr(download.time, "sleep", sleep)
    prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=digest, retries=3, backoff_s=0.5, progress=False)
    assert server.count("/mnist.npz") == 2
    assert sleeps == [0.5]


def test_backoff_is_exponential(server: LoopbackServer, cache: Path, monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    url = server.add("/mnist.npz", Route(status=500))
    with pytest.raises(HttpError):
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, retries=3, backoff_s=0.25, progress=False)
    assert sleeps == [0.25, 0.5, 1.0]


def test_unreachable_host_explains_the_hand_copy(cache: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/mnist.npz"
    with pytest.raises(NetworkError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, **FAST)
    message = str(info.value)
    assert url in message and "Connection refused" in message
    assert "--from /path/to/mnist.npz" in message and "scp" in message and "--url" in message
    assert KERAS_MNIST_SHA256 in message  # so the hand copy can be checked
    assert_clean(cache)


def test_html_page_with_matching_hash_fails_validation(server: LoopbackServer, cache: Path) -> None:
    page = b"<!DOCTYPE html><html><body>Please log in to the proxy</body></html>"
    url = server.add("/mnist.npz", Route(body=page, content_type="text/html"))
    with pytest.raises(DatasetError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=sha(page), **FAST)
    message = str(info.value)
    assert "HTML page" in message and url in message and "nothing was written" in message
    assert ".mnist-hpc-staging" not in message  # the private staging path is not shown
    assert_clean(cache)


def _bad(change: str) -> dict[str, np.ndarray]:
    arrays = make_arrays()
    if change == "keys":
        arrays["images"] = arrays.pop("x_train")
    elif change == "shape":
        arrays["x_train"] = arrays["x_train"].reshape(20, 784)
    elif change == "dtype":
        arrays["x_test"] = arrays["x_test"].astype(np.float32)
    elif change == "labels":
        arrays["y_train"][3] = 11
    elif change == "count":
        arrays["y_test"] = arrays["y_test"][:5]
    return arrays


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("keys", "lacks the key(s) ['x_train']"),
        ("shape", "x_train has shape (20, 784), expected (N, 28, 28)"),
        ("dtype", "x_test has dtype float32, expected uint8"),
        ("labels", "holds label 11; labels must lie in 0-9"),
        ("count", "x_test has 10 images but y_test has 5 labels"),
    ],
)
def test_invalid_content_is_rejected(server: LoopbackServer, cache: Path, change: str, expected: str) -> None:
    data = npz_bytes(_bad(change))
    url = server.add("/mnist.npz", Route(body=data))
    with pytest.raises(DatasetError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=sha(data), **FAST)
    assert expected in str(info.value) and url in str(info.value)
    assert_clean(cache)


def test_invalid_content_does_not_replace_a_valid_cache(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    target = cache / "mnist.npz"
    prefetch_fetch.prefetch(target, url=server.add("/good", Route(body=data)), sha256=digest, **FAST)
    bad = npz_bytes(_bad("labels"))
    with pytest.raises(DatasetError):
        prefetch_fetch.prefetch(target, url=server.add("/bad", Route(body=bad)), sha256=sha(bad), force=True, **FAST)
    assert check_cached(target)["sha256"] == digest
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


# ---------------------------------------------------------------------------- --from


def test_from_npz(tmp_path: Path, good, cache: Path) -> None:
    arrays, data, digest = good
    source = tmp_path / "copied.npz"
    source.write_bytes(data)
    target = cache / "mnist.npz"

    manifest = prefetch_fetch.prefetch(target, source=source)
    again = prefetch_fetch.prefetch(target, source=source)  # same file: nothing to do

    assert manifest["sha256"] == digest and manifest["source"] == str(source) and manifest["source_kind"] == "npz"
    assert again == manifest
    assert target.read_bytes() == data
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_from_npz_checks_sha256_when_given(tmp_path: Path, good, cache: Path) -> None:
    _, data, digest = good
    source = tmp_path / "copied.npz"
    source.write_bytes(data)
    with pytest.raises(HashMismatchError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", source=source, sha256="cd" * 32)
    assert f"got {digest}" in str(info.value) and str(source) in str(info.value)
    assert_clean(cache)
    assert prefetch_fetch.prefetch(cache / "mnist.npz", source=source, sha256=f"sha256:{digest.upper()}")["sha256"] == digest


def test_from_invalid_npz(tmp_path: Path, cache: Path) -> None:
    source = tmp_path / "copied.npz"
    source.write_bytes(npz_bytes(_bad("dtype")))
    with pytest.raises(DatasetError, match="dtype float32"):
        prefetch_fetch.prefetch(cache / "mnist.npz", source=source)
    assert_clean(cache)


def test_from_missing_path(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(SourceError, match="no such file or directory"):
        prefetch_fetch.prefetch(cache / "mnist.npz", source=tmp_path / "nope.npz")
    assert_clean(cache)


def make_idx_dir(directory: Path, arrays: dict[str, np.ndarray]) -> Path:
    directory.mkdir()
    # Mixed on purpose: plain, gzipped, and the dotted spelling.
    write_idx(directory / "train-images-idx3-ubyte.gz", arrays["x_train"])
    write_idx(directory / "train-labels-idx1-ubyte", arrays["y_train"])
    write_idx(directory / "t10k-images.idx3-ubyte", arrays["x_test"])
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", arrays["y_test"])
    return directory


def test_from_idx_directory(tmp_path: Path, cache: Path) -> None:
    arrays = make_arrays()
    source = make_idx_dir(tmp_path / "idx", arrays)
    target = cache / "mnist.npz"

    manifest = prefetch_fetch.prefetch(target, source=source)

    loaded = read_npz(target)
    assert sorted(loaded) == sorted(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == np.uint8
        np.testing.assert_array_equal(loaded[key], value)
    assert manifest["source_kind"] == "idx" and manifest["source"] == str(source)
    assert manifest["sha256"] == sha256_file(target)
    assert manifest["source_files"]["train-images-idx3-ubyte.gz"] == sha256_file(source / "train-images-idx3-ubyte.gz")
    with zipfile.ZipFile(target) as zf:  # np.savez without compression, like Keras' file
        assert all(info.compress_type == 0 for info in zf.infolist())
    # The same IDX files again: nothing to do. A changed one: rebuilt.
    assert prefetch_fetch.prefetch(target, source=source) == manifest
    write_idx(source / "train-labels-idx1-ubyte", (arrays["y_train"] + 1) % 10)
    assert prefetch_fetch.prefetch(target, source=source)["source_files"] != manifest["source_files"]
    np.testing.assert_array_equal(read_npz(target)["y_train"], (arrays["y_train"] + 1) % 10)
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_from_idx_with_bad_magic(tmp_path: Path, cache: Path) -> None:
    source = make_idx_dir(tmp_path / "idx", make_arrays())
    raw = (source / "train-labels-idx1-ubyte").read_bytes()
    (source / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d" + raw[3:])  # float type code
    with pytest.raises(DatasetError, match="IDX type 0x0d"):
        prefetch_fetch.prefetch(cache / "mnist.npz", source=source)
    assert_clean(cache)


def test_from_idx_truncated(tmp_path: Path, cache: Path) -> None:
    source = make_idx_dir(tmp_path / "idx", make_arrays())
    raw = (source / "train-labels-idx1-ubyte").read_bytes()
    (source / "train-labels-idx1-ubyte").write_bytes(raw[:-3])
    with pytest.raises(DatasetError, match="truncated or corrupt copy"):
        prefetch_fetch.prefetch(cache / "mnist.npz", source=source)
    assert_clean(cache)


def test_from_idx_missing_file_lists_names(tmp_path: Path, cache: Path) -> None:
    source = make_idx_dir(tmp_path / "idx", make_arrays())
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", source=source)
    assert "t10k-labels-idx1-ubyte" in str(info.value) and "train-images-idx3-ubyte.gz" in str(info.value)
    assert_clean(cache)


def test_from_idx_rejects_sha256(tmp_path: Path, cache: Path) -> None:
    source = make_idx_dir(tmp_path / "idx", make_arrays())
    with pytest.raises(SourceError, match="drop --sha256"):
        prefetch_fetch.prefetch(cache / "mnist.npz", source=source, sha256="ab" * 32)


# ---------------------------------------------------------------------------- the cache directory


def test_cache_under_a_file_is_not_writable(server: LoopbackServer, good, tmp_path: Path) -> None:
    # Tests run as root, where chmod cannot make a directory read-only; a path below a regular
    # file cannot be created by anyone (ENOTDIR).
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache_dir = blocker / "cache"
    with pytest.raises(CacheNotWritableError) as info:
        prefetch_fetch.prefetch(cache_dir / "mnist.npz", url=url, sha256=digest, **FAST)
    message = str(info.value)
    assert str(cache_dir) in message and "MNIST_HPC_CACHE" in message and "data.cache_dir=" in message
    assert server.count("/mnist.npz") == 0  # checked before downloading anything
    assert blocker.read_text() == "not a directory"


def test_read_only_filesystem(server: LoopbackServer, good, tmp_path: Path, mounts: list[Path]) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    mountpoint = tmp_path / "ro"
    tmpfs(mountpoint, "ro,size=64k")
    mounts.append(mountpoint)
    with pytest.raises(CacheNotWritableError) as info:
        prefetch_fetch.prefetch(mountpoint / "cache" / "mnist.npz", url=url, sha256=digest, **FAST)
    assert "Read-only file system" in str(info.value) and str(mountpoint / "cache") in str(info.value)
    assert server.count("/mnist.npz") == 0
    assert listing(mountpoint) == []  # not even the lock file


def test_full_filesystem(server: LoopbackServer, good, tmp_path: Path, mounts: list[Path]) -> None:
    _, data, digest = good
    assert len(data) > 16 * 1024  # bigger than the filesystem
    url = server.add("/mnist.npz", Route(body=data))
    mountpoint = tmp_path / "small"
    tmpfs(mountpoint, "size=16k")
    mounts.append(mountpoint)
    with pytest.raises(CacheFullError) as info:
        prefetch_fetch.prefetch(mountpoint / "mnist.npz", url=url, sha256=digest, **FAST)
    message = str(info.value)
    assert "no space left" in message and str(mountpoint) in message and "MNIST_HPC_CACHE" in message
    assert "while downloading mnist.npz" in message
    assert f"It needs {len(data) / 1e6:.3g} MB ({len(data):,} bytes) free there" in message  # its Content-Length
    assert server.count("/mnist.npz") == 1  # ENOSPC is not retried
    assert_clean(mountpoint)


def test_full_disk_names_the_size_of_an_idx_import(tmp_path: Path, small_tmpfs) -> None:
    """An npz converted from IDX files is uncompressed (55 MB for MNIST, not Keras' 11 MB): the
    message names the size of the object this import writes, measured by the same import elsewhere."""
    source = make_idx_dir(tmp_path / "idx", make_arrays(n_train=2000, n_test=500))
    size = prefetch_fetch.prefetch(tmp_path / "roomy" / "mnist.npz", source=source)["size"]
    full = small_tmpfs("full", "1m")
    assert size > 1 << 20
    with pytest.raises(CacheFullError) as info:
        prefetch_fetch.prefetch(full / "mnist.npz", source=source)
    message = str(info.value)
    assert message.startswith(f"no space left in the cache directory {full} while writing mnist.npz")
    assert f"It needs {size / 1e6:.3g} MB ({size:,} bytes) free there" in message and "12 MB" not in message
    assert_clean(full)


def test_full_disk_while_copying(tmp_path: Path, good, cache: Path, monkeypatch) -> None:
    # The same as above without a mount: staging writes half the file, then the disk is full.
    _, data, _ = good
    source = tmp_path / "copied.npz"
    source.write_bytes(data)
    real_write_bytes = Path.write_bytes

    def write_until_full(self: Path, content: bytes) -> int:
        if ".mnist-hpc-staging-" not in str(self):
            return real_write_bytes(self, content)
        real_write_bytes(self, content[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", write_until_full)
    with pytest.raises(CacheFullError, match=f"no space left in the cache directory {cache}"):
        prefetch_fetch.prefetch(cache / "mnist.npz", source=source)
    assert_clean(cache)


def test_full_disk_while_writing_manifest_keeps_previous_cache(tmp_path: Path, good, cache: Path, monkeypatch) -> None:
    arrays, data, digest = good
    source = tmp_path / "copied.npz"
    source.write_bytes(data)
    target = cache / "mnist.npz"
    prefetch_fetch.prefetch(target, source=source)
    newer = tmp_path / "newer.npz"
    newer.write_bytes(npz_bytes(make_arrays(seed=2)))
    real_write_text = Path.write_text

    def write_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        if ".manifest.json." in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(CacheFullError):
        prefetch_fetch.prefetch(target, source=newer, force=True)
    # The manifest is staged before the npz moves, so the previous cache is untouched.
    assert check_cached(target)["sha256"] == digest
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


# ---------------------------------------------------------------------------- concurrency


def test_two_concurrent_prefetches_leave_one_valid_file(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    gate = threading.Event()
    url = server.add("/mnist.npz", Route(body=data, gate=gate))
    command = [sys.executable, "-m", "mnist_hpc.login.prefetch", "--url", url, "--sha256", digest, "--retries", "0",
               f"data.cache_dir={cache}"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        for _ in range(2)
    ]
    logs: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stderr), daemon=True)
               for p, out in zip(procs, logs)]
    for reader in readers:
        reader.start()
    try:
        # Hold the first download until the second process is seen waiting for the lock.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("waiting for another" in line for out in logs for line in out):
            time.sleep(0.05)
        gate.set()
        outs = [p.stdout.read() for p in procs]
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for reader in readers:
        reader.join(timeout=5)
    joined = ["".join(out) for out in logs]
    assert codes == [0, 0], joined
    assert [o.strip() for o in outs] == [str(cache / "mnist.npz")] * 2
    assert sum("waiting for another" in j for j in joined) == 1, joined
    assert sum("already cached and verified" in j for j in joined) == 1, joined
    assert server.count("/mnist.npz") == 1
    assert check_cached(cache / "mnist.npz")["sha256"] == digest
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_lock_without_flock_support_still_works(good, tmp_path: Path, cache: Path, monkeypatch) -> None:
    # Some shared filesystems refuse flock with ENOLCK: carry on, the rename is still atomic.
    _, data, digest = good
    source = tmp_path / "copied.npz"
    source.write_bytes(data)

    class NoFlock:
        LOCK_EX, LOCK_NB = 2, 4

        @staticmethod
        def flock(fd: int, op: int) -> None:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(store, "fcntl", NoFlock)
    assert prefetch_fetch.prefetch(cache / "mnist.npz", source=source)["sha256"] == digest
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


# ---------------------------------------------------------------------------- CLI


def test_main_composes_cache_dir_override(server: LoopbackServer, good, tmp_path: Path, capsys) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    cache_dir = tmp_path / "scratch" / "mnist"
    rc = prefetch_cli.main(["--url", url, "--sha256", digest, "--retries", "0",
                        f"data.cache_dir={cache_dir}", "data.filename=digits.npz"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == str(cache_dir / "digits.npz")
    assert check_cached(cache_dir / "digits.npz")["sha256"] == digest


def test_main_uses_mnist_hpc_cache_env(tmp_path: Path, good, monkeypatch, capsys) -> None:
    # conf/data/mnist.yaml reads MNIST_HPC_CACHE, exactly as the training jobs do.
    _, data, _ = good
    source = tmp_path / "copied.npz"
    source.write_bytes(data)
    monkeypatch.setenv("MNIST_HPC_CACHE", str(tmp_path / "env-cache"))
    assert prefetch_cli.main(["--from", str(source)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "env-cache" / "mnist.npz")


def test_main_from_idx(tmp_path: Path, capsys) -> None:
    source = make_idx_dir(tmp_path / "idx", make_arrays())
    cache_dir = tmp_path / "cache"
    assert prefetch_cli.main(["--from", str(source), f"data.cache_dir={cache_dir}"]) == 0
    assert capsys.readouterr().out.strip() == str(cache_dir / "mnist.npz")


def test_main_failure_exit_1(server: LoopbackServer, cache: Path, capsys) -> None:
    rc = prefetch_cli.main(["--url", server.url("/gone"), "--retries", "0", f"data.cache_dir={cache}"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert "mnist-hpc-prefetch: error: HTTP 404" in err
    assert_clean(cache)


def test_main_unreachable_exit_1(cache: Path, capsys) -> None:
    rc = prefetch_cli.main(["--url", f"http://127.0.0.1:{free_port()}/m.npz", "--retries", "0", f"data.cache_dir={cache}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "mnist-hpc-prefetch: error: cannot reach" in err and "--from" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["data.cache_dri=/tmp/x"], "Key 'cache_dri' not in 'DataConfig'"),
        (["data.cache_dir"], "Error parsing override 'data.cache_dir'"),
        (["train.epochs=0"], "train.epochs=0: must be >= 1"),
        (["--sha256", "xyz"], "not a sha256"),
        (["--retries", "-1"], "must be >= 0"),
        (["--url", "http://a/b", "--from", "/tmp/x"], "not allowed with argument"),
        (["--timeout-s", "0"], "must be > 0"),
        (["--backoff-s", "soon"], "expected a number >= 0, got 'soon'"),
    ],
)
def test_main_usage_errors_exit_2(argv: list[str], expected: str, cache: Path, capsys) -> None:
    rc = prefetch_cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "mnist-hpc-prefetch: error:" in err and expected in err
    assert "usage: mnist-hpc-prefetch" in err


def test_help_exits_0(capsys) -> None:
    assert prefetch_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--from PATH" in out and "data.cache_dir" in out


def test_login_node_path_never_imports_tensorflow(server: LoopbackServer, good, cache: Path) -> None:
    # Records import attempts (not just results) so an optional, swallowed import also counts.
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data))
    code = f"""
import sys
attempts = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            attempts.append(name)
        return None
sys.meta_path.insert(0, Spy())
from mnist_hpc.login.prefetch import cli as prefetch_cli, fetch as prefetch_fetch
from mnist_hpc.login.prefetch import download, fetch, sources, store
args = ["--url", {url!r}, "--sha256", {digest!r}, "--retries", "0", "data.cache_dir=" + {str(cache)!r}]
assert prefetch_cli.main(args) == 0   # downloads
assert prefetch_cli.main(args) == 0   # already cached
heavy = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")]
assert not attempts and not heavy, (attempts, heavy)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert server.count("/mnist.npz") == 1
    assert "already cached and verified" in result.stderr


def test_valid_cache_is_checked_without_decompressing_the_arrays(tmp_path: Path, good, cache: Path, monkeypatch) -> None:
    """The second prefetch of a valid cache hashes the file and reads headers only (fast)."""
    source = tmp_path / "incoming" / "mnist.npz"
    source.parent.mkdir()
    source.write_bytes(good[1])
    target = cache / "mnist.npz"
    first = prefetch_fetch.prefetch(target, source=source)

    def no_full_read(*args, **kwargs):
        raise AssertionError("read the whole npz to check a valid cache")

    for module in (fetch, sources):
        monkeypatch.setattr(module, "load_arrays", no_full_read)
    assert prefetch_fetch.prefetch(target, source=source) == first

"""The cache's readers against files another process or person wrote: bombs, forgeries, garbage.

Every reader of the manifest and of npz headers is fuzzed (fixed seeds): whatever the bytes,
the result is either a valid read or one of the cache's own errors, with a one-line message
that names the file, never a numpy traceback or numpy's "load it unsafely" advice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc.cache import (
    FORMAT,
    CacheCorruptError,
    CacheError,
    CacheInvalidError,
    CacheMissingError,
    check_cached,
    manifest_path,
    object_path,
    parse_manifest,
    prefetch_command,
    read_verified,
)
from mnist_hpc.config import DataConfig
from mnist_hpc.dataset import MAX_IMAGES, DatasetError, load_arrays, read_npz_layout
from tests.helpers import REPO, fill_cache, synthetic_mnist


def npz_bytes(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def npy_member(shape: tuple[int, ...], body: bytes, descr: str = "|u1") -> bytes:
    """A ``.npy`` stream whose header claims ``shape`` whatever the body holds."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def forged_npz(x_train: bytes) -> bytes:
    """An npz whose x_train member is ``x_train`` and whose other members are valid."""
    arrays = synthetic_mnist(n_train=10, n_test=10)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x_train.npy", x_train)
        for key in ("y_train", "x_test", "y_test"):
            out = io.BytesIO()
            np.save(out, arrays[key])
            archive.writestr(f"{key}.npy", out.getvalue())
    return buffer.getvalue()


def one_clean_line(exc: BaseException, *names: str) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message and "allow_pickle" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# ---------------------------------------------------------------------------- bounds before inflating


def test_zip_bomb_is_refused_from_its_header_before_inflating(tmp_path: Path) -> None:
    # x_train claims 10,000,000 images (7.3 GiB) of deflated zeros; only 8 MB are really there.
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(forged_npz(npy_member((10_000_000, 28, 28), bytes(8 << 20))))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DatasetError) as info:
        load_arrays(bomb.read_bytes(), str(bomb))
    one_clean_line(info.value, str(bomb), "(10000000, 28, 28)", f"at most {MAX_IMAGES}")


def test_zip_bomb_under_a_memory_limit_gives_one_message(tmp_path: Path) -> None:
    """Under a 1 GiB address-space limit numpy would die allocating 7.3 GiB; prefetch refuses first."""
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(forged_npz(npy_member((10_000_000, 28, 28), bytes(8 << 20))))
    limit = 1 << 30

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_hpc.login.prefetch", "--from", str(bomb), f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, env=env, preexec_fn=cap_memory, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert "x_train claims shape (10000000, 28, 28)" in proc.stderr and "nothing was written" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_member_size_must_match_its_header(tmp_path: Path) -> None:
    # The header says 10 images; the member holds 30 (the zip directory records its real size).
    forged = forged_npz(npy_member((10, 28, 28), bytes(30 * 784)))
    with pytest.raises(DatasetError) as info:
        read_npz_layout(forged, "forged.npz")
    one_clean_line(info.value, "forged.npz", "x_train declares shape (10, 28, 28)", "zip directory records")


# ---------------------------------------------------------------------------- what a file is


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "it is empty"),
        (b"\x93NUMPY\x01\x00v\x00{'descr': '|u1'}", "bare .npy array"),
        (pickle.dumps({"x_train": [1, 2]}), "Python pickle"),
        (b"\x1f\x8b\x08\x00rest", "gzip-compressed"),
        (b"\x00\x00\x08\x03\x00\x00", "single IDX file"),
        (b"<!DOCTYPE html><html>login</html>", "HTML page"),
        (b"root:x:0:0:root:/root:/bin/bash\n", "text file"),
        (bytes(range(256)), "not a zip archive"),
    ],
)
def test_a_file_that_is_not_an_npz_is_named_for_what_it_is(content: bytes, expected: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_arrays(content, "copied.npz")
    one_clean_line(info.value, "copied.npz", expected)


# ---------------------------------------------------------------------------- fuzzing


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reader_fuzzed_truncations_and_flips(compressed: bool) -> None:
    valid = npz_bytes(synthetic_mnist(n_train=12, n_test=6), compressed=compressed)
    cuts = sorted(set(range(0, 300)) | set(range(0, len(valid), 97)) | {len(valid) - 1})
    rng = random.Random(11)
    flips = []
    for _ in range(300):
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        flips.append(bytes(raw))
    outcomes = {"ok": 0, "refused": 0}
    for data in [valid[:cut] for cut in cuts] + flips:
        try:
            load_arrays(data, "fuzzed.npz")
            outcomes["ok"] += 1
        except DatasetError as exc:
            one_clean_line(exc, "fuzzed.npz")
            outcomes["refused"] += 1
    assert outcomes["refused"] >= len(cuts)  # no truncation reads as valid
    assert load_arrays(valid, "fuzzed.npz")[1]["x_train"] == [12, 28, 28]


def test_npz_reader_fuzzed_random_bytes() -> None:
    rng = random.Random(7)
    for _ in range(300):
        data = b"PK" * rng.randint(0, 1) + rng.randbytes(rng.randint(0, 2000))
        with pytest.raises(DatasetError) as info:
            read_npz_layout(data, "random.npz")
        one_clean_line(info.value, "random.npz")


def good_manifest() -> dict:
    return {
        "format": FORMAT, "source": "/data/mnist.npz", "source_kind": "npz", "sha256": "ab" * 32, "size": 1000,
        "shapes": {"x_train": [20, 28, 28], "y_train": [20], "x_test": [10, 28, 28], "y_test": [10]},
        "created": "2024-01-01T00:00:00+00:00", "mnist_hpc_version": "0.1.0",
    }


def test_manifest_reader_fuzzed(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "mnist.npz"
    raw = json.dumps(good_manifest()).encode()
    assert parse_manifest(raw, target) == good_manifest()
    wrong = [b"5", b"null", b"[]", b'"x"', b"true", b"{}", b"[" * 100_000, b"\xff\xfe\x00garbage", b""]
    for key, bad_value in [("format", 1), ("format", None), ("sha256", 5), ("sha256", "XYZ"), ("size", "1000"),
                           ("size", True), ("size", -1), ("source", ["a"]), ("source", "a\nb"),
                           ("source_kind", "ftp"), ("shapes", [1]), ("shapes", {"x_train": [20]}),
                           ("shapes", {**good_manifest()["shapes"], "y_test": ["10"]})]:
        wrong.append(json.dumps({**good_manifest(), key: bad_value}).encode())
    wrong += [raw[:cut] for cut in range(len(raw))]
    rng = random.Random(3)
    wrong += [rng.randbytes(rng.randint(1, 300)) for _ in range(200)]
    for data in wrong:
        with pytest.raises(CacheCorruptError) as info:
            parse_manifest(data, target)
        one_clean_line(info.value, str(manifest_path(target)), f"mnist-hpc-prefetch data.cache_dir={target.parent}")


@pytest.mark.parametrize(("content", "what"), [(b"5", "holds a number"), (b"null", "holds null"),
                                               (b"[1]", "holds a list"), (b'{"sha2', "not valid JSON")])
def test_check_and_loader_name_a_broken_manifest(tmp_path: Path, content: bytes, what: str) -> None:
    target = fill_cache(tmp_path / "cache")
    manifest_path(target).write_bytes(content)
    for read in (lambda: check_cached(target), lambda: read_verified(DataConfig(cache_dir=str(target.parent)))):
        with pytest.raises(CacheCorruptError) as info:
            read()
        one_clean_line(info.value, str(manifest_path(target)), what, "--force")


# ---------------------------------------------------------------------------- the loader's errors


def test_loader_errors_are_cache_errors_that_say_what_to_run(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache")
    source = tmp_path / "incoming" / "mnist.npz"  # where fill_cache imported it from
    cfg = DataConfig(cache_dir=str(target.parent))
    manifest = json.loads(manifest_path(target).read_text())
    obj = object_path(target, manifest["sha256"])

    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    obj.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError) as info:
        read_verified(cfg)
    # The repair command refetches the recorded source: here a hand-copied file, not a download.
    one_clean_line(info.value, str(obj), "sha256", f"--from {source} --force")

    obj.unlink()
    with pytest.raises(CacheMissingError) as info:
        read_verified(cfg)
    one_clean_line(info.value, str(obj), "missing", f"--from {source} --force")


def install_object(target: Path, data: bytes, **change: object) -> dict:
    """Make ``data`` the cache's current object, under a manifest whose sha256 and size match it (a forged one)."""
    digest = hashlib.sha256(data).hexdigest()
    object_path(target, digest).write_bytes(data)
    manifest = json.loads(manifest_path(target).read_text())
    manifest.update(sha256=digest, size=len(data), **change)
    manifest_path(target).write_text(json.dumps(manifest))
    return manifest


def test_a_manifest_that_cannot_be_read_or_parsed_says_so_and_what_to_run(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache")
    path = manifest_path(target)
    repair = f"run `{prefetch_command(target, force=True)}` (with `--from FILE` if you imported one) on a login node"
    good = path.read_text().rstrip()
    assert good.endswith("}")
    path.write_text(good[:-1])
    with pytest.raises(CacheCorruptError) as info:
        check_cached(target)
    assert str(info.value) == f"the manifest {path} is not valid JSON (truncated or overwritten?); {repair}"
    # A manifest is a few hundred bytes: no more than 64 KiB of one is read, so a huge one is refused, not parsed.
    path.write_text(good[:-1] + " " * (70 << 10) + "}")
    with pytest.raises(CacheCorruptError, match="is not valid JSON"):
        check_cached(target)
    path.write_text(good[:-1] + " " * ((64 << 10) - len(good)) + "}")
    assert path.stat().st_size == 64 << 10 and check_cached(target)["sha256"] == json.loads(good)["sha256"]
    path.unlink()
    path.mkdir()
    with pytest.raises(CacheCorruptError) as info:
        check_cached(target)
    assert str(info.value) == f"cannot read {path}: not a regular file"


def test_an_object_that_cannot_be_read_says_so_and_what_to_run(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache")
    manifest = json.loads(manifest_path(target).read_text())
    obj = object_path(target, manifest["sha256"])
    obj.unlink()
    obj.mkdir()
    with pytest.raises(CacheCorruptError) as info:
        check_cached(target)
    assert not isinstance(info.value, CacheMissingError)
    assert str(info.value) == f"cannot read {obj}: not a regular file; run `{prefetch_command(target, manifest)}` on a login node"


def test_an_object_cut_short_says_how_long_it_is_and_what_to_run(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache")
    manifest = json.loads(manifest_path(target).read_text())
    obj = object_path(target, manifest["sha256"])
    obj.write_bytes(obj.read_bytes()[:100])
    with pytest.raises(CacheCorruptError) as info:
        check_cached(target)
    assert str(info.value) == (f"{obj} is 100 bytes but its manifest records {manifest['size']} (truncated or replaced); "
                               f"run `{prefetch_command(target, manifest)}` on a login node")


def test_an_object_grown_since_prefetch_says_it_is_longer_than_recorded(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache")
    manifest = json.loads(manifest_path(target).read_text())
    obj = object_path(target, manifest["sha256"])
    obj.write_bytes(obj.read_bytes() + b"appended by someone")
    with pytest.raises(CacheCorruptError) as info:
        check_cached(target)
    assert str(info.value) == (f"{obj} is more than {manifest['size']} bytes but its manifest records {manifest['size']} "
                               f"(truncated or replaced); run `{prefetch_command(target, manifest)}` on a login node")


def test_a_reader_whose_object_vanishes_under_ever_new_manifests_tries_five_times(tmp_path: Path, monkeypatch) -> None:
    """A prefetch switching datasets under a reader makes it read the manifest again, at most READ_ATTEMPTS times."""
    from mnist_hpc import cache

    target = fill_cache(tmp_path / "cache")
    manifest = json.loads(manifest_path(target).read_text())
    object_path(target, manifest["sha256"]).unlink()
    reads: list[int] = []
    real = cache.read_manifest
    monkeypatch.setattr(cache, "read_manifest", lambda path: reads.append(1) or real(path))
    monkeypatch.setattr(cache, "_manifest_bytes", lambda path: b"another prefetch's manifest, each time")
    with pytest.raises(CacheMissingError) as info:
        check_cached(target)
    assert len(reads) == cache.READ_ATTEMPTS == 5
    assert str(info.value).startswith(f"{target}: its manifest names {object_path(target, manifest['sha256'])}, which is missing")
    reads.clear()
    monkeypatch.setattr(cache, "_manifest_bytes", lambda path: real(path)[1])  # no switch: refused at the first
    with pytest.raises(CacheMissingError):
        check_cached(target)
    assert len(reads) == 1


def test_a_forged_manifest_over_arrays_of_the_wrong_shape_names_the_cached_file(tmp_path: Path) -> None:
    """The headers are checked before anything is inflated, on the login node too; the message names the cache's file."""
    target = fill_cache(tmp_path / "cache")
    bad = synthetic_mnist(n_train=600, n_test=200)
    bad["x_train"] = bad["x_train"][:, :, :27].copy()
    manifest = install_object(target, npz_bytes(bad))
    with pytest.raises(CacheInvalidError) as info:
        check_cached(target)
    assert str(info.value) == (f"{target}: x_train has shape (600, 28, 27), expected (N, 28, 28); run "
                               f"`{prefetch_command(target, manifest)}` on a login node")
    assert "--from " in prefetch_command(target, manifest)  # the repair refetches the recorded source


def test_a_forged_manifest_over_a_damaged_archive_names_the_cached_file(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache")
    manifest = install_object(target, forged_npz(npy_member((10, 28, 28), bytes(30 * 784))))
    with pytest.raises(CacheInvalidError) as info:
        check_cached(target)
    message = one_clean_line(info.value, f"run `{prefetch_command(target, manifest)}` on a login node")
    assert message.startswith(f"{target}: x_train declares shape (10, 28, 28)")


def test_a_manifest_whose_shapes_are_not_its_objects_is_refused_with_the_repair(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache", synthetic_mnist(n_train=600, n_test=200))
    data = object_path(target, json.loads(manifest_path(target).read_text())["sha256"]).read_bytes()
    recorded = {"x_train": [599, 28, 28], "y_train": [599], "x_test": [200, 28, 28], "y_test": [200]}
    manifest = install_object(target, data, shapes=recorded)
    with pytest.raises(CacheCorruptError) as info:
        check_cached(target)
    actual = {"x_train": [600, 28, 28], "y_train": [600], "x_test": [200, 28, 28], "y_test": [200]}
    assert str(info.value) == (f"{target} holds arrays of shapes {actual} but its manifest records {recorded}; run "
                               f"`{prefetch_command(target, manifest)}` on a login node")


def test_loader_refuses_a_forged_manifest_with_a_cache_error(tmp_path: Path) -> None:
    target = fill_cache(tmp_path / "cache")
    bad = synthetic_mnist(n_train=600, n_test=200)
    bad["y_train"][0] = 12
    data = npz_bytes(bad)
    digest = hashlib.sha256(data).hexdigest()
    object_path(target, digest).write_bytes(data)
    manifest = json.loads(manifest_path(target).read_text())
    manifest.update(sha256=digest, size=len(data))
    manifest_path(target).write_text(json.dumps(manifest))
    with pytest.raises(CacheInvalidError) as info:
        read_verified(DataConfig(cache_dir=str(target.parent)))
    assert isinstance(info.value, CacheError)
    one_clean_line(info.value, str(target), "holds label 12", "--force")

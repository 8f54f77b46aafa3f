"""The offline loader: verified cache only, lesson-shaped arrays, clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc.cache import CacheCorruptError, CacheMissingError
from mnist_hpc.compute.data import load_mnist
from mnist_hpc.config import DataConfig
from tests.helpers import fill_cache, synthetic_mnist


def test_loader_prepares_data_as_the_lesson(tmp_path: Path):
    arrays = synthetic_mnist(n_train=50, n_test=20)
    fill_cache(tmp_path / "cache", arrays)
    data = load_mnist(DataConfig(cache_dir=str(tmp_path / "cache")))
    (x_train, y_train), (x_test, _) = data.lesson("train"), data.lesson("test")
    assert x_train.shape == (50, 784) and x_train.dtype == np.float32
    assert x_test.shape == (20, 784)
    np.testing.assert_array_equal(x_train[3], arrays["x_train"][3].reshape(784).astype("float32") / 255)
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert y_train.shape == (50, 10) and y_train.dtype == np.float32
    np.testing.assert_array_equal(y_train.argmax(axis=1), arrays["y_train"])
    np.testing.assert_array_equal(y_train.sum(axis=1), np.ones(50))
    assert data.x_val is None and data.y_val is None and data.lesson("val") is None


def test_validation_split_is_held_out_from_the_end_of_train(tmp_path: Path):
    arrays = synthetic_mnist(n_train=100, n_test=20)
    fill_cache(tmp_path / "cache", arrays)
    data = load_mnist(DataConfig(cache_dir=str(tmp_path / "cache"), validation_split=0.1))
    assert data.x_train.shape == (90, 784) and data.x_val.shape == (10, 784)
    np.testing.assert_array_equal(data.lesson("val")[1].argmax(axis=1), arrays["y_train"][90:])
    assert data.x_test.shape == (20, 784)


def test_missing_cache_names_path_and_prefetch_command(tmp_path: Path):
    with pytest.raises(CacheMissingError) as err:
        load_mnist(DataConfig(cache_dir=str(tmp_path / "nowhere")))
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "mnist.npz") in message
    assert f"mnist-hpc-prefetch data.cache_dir={tmp_path / 'nowhere'}" in message


def test_file_without_manifest_is_refused(tmp_path: Path):
    cache = fill_cache(tmp_path / "cache")
    (tmp_path / "cache" / "mnist.npz.manifest.json").unlink()
    with pytest.raises(CacheMissingError, match="manifest"):
        load_mnist(DataConfig(cache_dir=str(cache.parent)))


def test_truncated_cache_is_detected(tmp_path: Path):
    cache = fill_cache(tmp_path / "cache")
    cache.write_bytes(cache.read_bytes()[:-100])
    with pytest.raises(CacheCorruptError, match="truncated"):
        load_mnist(DataConfig(cache_dir=str(cache.parent)))


def test_corrupted_cache_is_detected(tmp_path: Path):
    cache = fill_cache(tmp_path / "cache")
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match="sha256"):
        load_mnist(DataConfig(cache_dir=str(cache.parent)))


def test_a_process_that_loads_the_cache_again_verifies_it_again(tmp_path: Path):
    """A packed task's trials parse the verified arrays once, but every load hashes the bytes again:
    a cache damaged between two trials fails the second; another dataset gives its own arrays."""
    arrays = synthetic_mnist(n_train=50, n_test=20)
    cache = fill_cache(tmp_path / "cache", arrays)
    cfg = DataConfig(cache_dir=str(cache.parent))
    first, second = load_mnist(cfg), load_mnist(cfg)
    np.testing.assert_array_equal(second.x_train, arrays["x_train"].reshape(50, 784))
    np.testing.assert_array_equal(second.y_test, arrays["y_test"])
    assert second.sha256 == first.sha256
    with pytest.raises(ValueError, match="read-only"):
        second.x_test[0, 0] = 1  # a later trial cannot see an earlier one's changes
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match="sha256"):
        load_mnist(cfg)
    other_arrays = synthetic_mnist(n_train=50, n_test=20, seed=1)
    other = load_mnist(DataConfig(cache_dir=str(fill_cache(tmp_path / "other", other_arrays).parent)))
    np.testing.assert_array_equal(other.x_train, other_arrays["x_train"].reshape(50, 784))
    assert other.sha256 != first.sha256


@pytest.mark.parametrize("compressed", [False, True])
def test_layout_is_read_from_the_headers(tmp_path: Path, compressed: bool):
    from mnist_hpc.dataset import read_npz_layout

    arrays = synthetic_mnist(n_train=30, n_test=12)
    arrays["extra"] = np.zeros((2, 3), dtype=np.float64)
    path = tmp_path / "m.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    layout = read_npz_layout(path)
    assert layout == {key: (a.shape, str(a.dtype)) for key, a in arrays.items()}


def test_layout_of_a_non_zip_file_is_a_dataset_error(tmp_path: Path):
    from mnist_hpc.dataset import DatasetError, read_npz_layout

    path = tmp_path / "m.npz"
    path.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(DatasetError, match="not a readable npz"):
        read_npz_layout(path)


def test_check_cached_refuses_headers_that_disagree_with_the_manifest(tmp_path: Path):
    """A manifest rewritten to match another file's hash still has to match its shapes."""
    import json

    from mnist_hpc.cache import check_cached, manifest_path

    cache = fill_cache(tmp_path / "cache", synthetic_mnist(n_train=40, n_test=10))
    assert check_cached(cache)["shapes"]["x_train"] == [40, 28, 28]
    manifest = json.loads(manifest_path(cache).read_text())
    manifest["shapes"]["x_train"] = [60000, 28, 28]
    manifest_path(cache).write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="shapes"):
        check_cached(cache)


def test_check_cached_refuses_a_float_array_behind_a_matching_hash(tmp_path: Path):
    """A manifest forged to point at another file (hash and size match) still has to hold MNIST."""
    import io
    import json

    from mnist_hpc.cache import check_cached, manifest_path, object_path
    from mnist_hpc.dataset import DatasetError

    cache = fill_cache(tmp_path / "cache", synthetic_mnist(n_train=40, n_test=10))
    bad = synthetic_mnist(n_train=40, n_test=10)
    bad["x_test"] = bad["x_test"].astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **bad)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    object_path(cache, digest).write_bytes(buffer.getvalue())
    manifest = json.loads(manifest_path(cache).read_text())
    manifest.update(sha256=digest, size=len(buffer.getvalue()))
    manifest_path(cache).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="x_test has dtype float32"):
        check_cached(cache)

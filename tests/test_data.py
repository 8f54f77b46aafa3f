"""The offline loader: verified cache only, lesson-shaped arrays, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_hpc.config import DataConfig
from mnist_hpc.data import CacheCorruptError, CacheMissingError, load_mnist
from tests.conftest import fill_cache, synthetic_mnist


def test_loader_prepares_data_as_the_lesson(tmp_path: Path):
    arrays = synthetic_mnist(n_train=50, n_test=20)
    fill_cache(tmp_path / "cache", arrays)
    data = load_mnist(DataConfig(cache_dir=str(tmp_path / "cache")))
    assert data.x_train.shape == (50, 784) and data.x_train.dtype == np.float32
    assert data.x_test.shape == (20, 784)
    np.testing.assert_array_equal(data.x_train[3], arrays["x_train"][3].reshape(784).astype("float32") / 255)
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert data.y_train.shape == (50, 10) and data.y_train.dtype == np.float32
    np.testing.assert_array_equal(data.y_train.argmax(axis=1), arrays["y_train"])
    np.testing.assert_array_equal(data.y_train.sum(axis=1), np.ones(50))
    assert data.x_val is None and data.y_val is None


def test_validation_split_is_held_out_from_the_end_of_train(tmp_path: Path):
    arrays = synthetic_mnist(n_train=100, n_test=20)
    fill_cache(tmp_path / "cache", arrays)
    data = load_mnist(DataConfig(cache_dir=str(tmp_path / "cache"), validation_split=0.1))
    assert data.x_train.shape == (90, 784) and data.x_val.shape == (10, 784)
    np.testing.assert_array_equal(data.y_val.argmax(axis=1), arrays["y_train"][90:])
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

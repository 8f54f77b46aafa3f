"""The offline loader on compute nodes: the verified cache, split, in two views of the same arrays.

One loader (:func:`load_mnist`) reads and checks the cache (:func:`mnist_hpc.cache.read_verified`
parses the arrays from the very bytes whose sha256 matched the manifest) and holds its arrays
as stored: uint8 images flattened to 784 columns and uint8 class ids.
Two views of them serve the two executions of training:

- :meth:`MnistData.lesson` gives a split as the lesson prepares it (float32 in [0, 1], one-hot
  labels), for ``model.fit``, ``evaluate`` and ``predict``;
- the compiled loop keeps the training split uint8 and does that preparation per batch inside
  its graph (see :mod:`mnist_hpc.compute.engine`).

No network, no ``keras.datasets`` (which rejects absolute paths, deletes files whose hash
differs from its pin when offline, and silently swaps a read-only cache for ``/tmp/.keras``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mnist_hpc.cache import read_verified
from mnist_hpc.config import DataConfig
from mnist_hpc.dataset import NUM_CLASSES, PIXELS, validation_cut


def prepare_images(x: np.ndarray) -> np.ndarray:
    """uint8 images, (N, 28, 28) or (N, 784) -> (N, 784) float32 in [0, 1], as in the lesson."""
    return x.reshape((x.shape[0], PIXELS)).astype("float32") / 255


def one_hot(y: np.ndarray) -> np.ndarray:
    """Integer labels -> float32 one-hot rows, the lesson's ``to_categorical``."""
    out = np.zeros((y.shape[0], NUM_CLASSES), dtype="float32")
    out[np.arange(y.shape[0]), y.astype(np.int64)] = 1.0
    return out


@dataclass
class MnistData:
    """The verified dataset, split, as stored: (N, 784) uint8 images and (N,) uint8 class ids.

    ``x_val``/``y_val`` are None without a validation split (held out from the end of the
    training set, as Keras' ``validation_split`` does).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: Optional[np.ndarray]
    y_val: Optional[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str

    def lesson(self, split: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """``(x, y)`` of ``split`` (train, val or test) as the lesson has them, or None if absent."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        return None if x is None else (prepare_images(x), one_hot(y))


def load_mnist(cfg: DataConfig) -> MnistData:
    """Load the verified cached dataset for training. Never touches the network.

    Raises:
        CacheMissingError: nothing cached at the configured path (names the prefetch command).
        CacheCorruptError: the cache no longer matches its manifest, or its content is invalid
            (CacheInvalidError); the message names the file and the command that repairs it.
        DatasetError: ``data.validation_split`` leaves an empty part.
    """
    arrays, manifest = read_verified(cfg)
    x_train = arrays["x_train"].reshape((-1, PIXELS))
    y_train = arrays["y_train"]
    x_val = y_val = None
    if cfg.validation_split > 0:
        cut = validation_cut(x_train.shape[0], cfg.validation_split)
        x_val, y_val = x_train[cut:], y_train[cut:]
        x_train, y_train = x_train[:cut], y_train[:cut]
    return MnistData(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_val=None if x_val is None else np.ascontiguousarray(x_val),
        y_val=None if y_val is None else np.ascontiguousarray(y_val),
        x_test=arrays["x_test"].reshape((-1, PIXELS)),
        y_test=arrays["y_test"],
        sha256=manifest["sha256"],
    )

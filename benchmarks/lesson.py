"""Program A of the training benchmark: the Keras MNIST lesson as it is taught, nothing added.

Deep Learning with Python, chapter 2: Dense(512, relu) -> Dense(10, softmax), rmsprop,
categorical crossentropy on one-hot labels, 5 epochs of batch 128 on float32 numpy arrays
passed to ``model.fit`` with Keras' default compile settings. The data comes from an
``mnist.npz`` read with numpy (the lesson's ``mnist.load_data()`` reads the same file).

Two departures, both measurement only: ``verbose=0`` (the progress bar is output, not
training; without it A is, if anything, faster) and a callback with epoch hooks only (no
batch hooks, so Keras' step loop is untouched) that records when each epoch starts and ends.
The last line printed is a JSON record for ``bench_training.py``.

    python benchmarks/lesson.py ../shared/data/mnist.npz
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the C++ start-up notices are noise here


def main(npz_path: str) -> None:
    import numpy as np
    from clock import epoch_clock  # benchmarks/clock.py, beside this file
    from tensorflow import keras
    from tensorflow.keras import layers

    # --- the lesson ---
    with np.load(npz_path) as f:
        train_images, train_labels = f["x_train"], f["y_train"]
        test_images, test_labels = f["x_test"], f["y_test"]

    network = keras.Sequential([
        keras.Input(shape=(28 * 28,)),
        layers.Dense(512, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])
    network.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])

    train_images = train_images.reshape((60000, 28 * 28))
    train_images = train_images.astype("float32") / 255
    test_images = test_images.reshape((10000, 28 * 28))
    test_images = test_images.astype("float32") / 255

    train_labels = keras.utils.to_categorical(train_labels)
    test_labels = keras.utils.to_categorical(test_labels)

    clock = epoch_clock()
    network.fit(train_images, train_labels, epochs=5, batch_size=128, verbose=0, callbacks=[clock])
    test_loss, test_acc = network.evaluate(test_images, test_labels, verbose=0)
    # --- end of the lesson ---

    print(json.dumps({
        "epoch_begin_unix": clock.begins,
        "epoch_end_unix": clock.ends,
        "test_accuracy": float(test_acc),
        "test_loss": float(test_loss),
        "train_samples": int(train_images.shape[0]),
        "done_unix": time.time(),
    }))


if __name__ == "__main__":
    main(sys.argv[1])

"""The epoch clock both training benchmark programs (A: the lesson, B: mnist-hpc) attach to ``fit``.

A Keras callback with epoch hooks only (no batch hooks, so neither Keras' step loop nor the
compiled loop's full-length calls are touched) that records when each epoch starts and ends.
"""

from __future__ import annotations

import time
from typing import Any


def epoch_clock() -> Any:
    """A new callback; its ``begins`` and ``ends`` lists fill with ``time.time()`` per epoch."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.begins.append(time.time())

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.ends.append(time.time())

    return EpochClock()

"""TensorBoard event files in every run directory (``<run dir>/tensorboard``), written on the compute node.

TensorBoard needs no server and no network, so it is the tracker that works on clusters whose
nodes are offline: ``tensorboard --logdir SWEEP_DIR`` on a login node shows every trial.

What a run writes, with TensorFlow's own summary writer:

- per epoch: ``epoch/loss``, ``epoch/accuracy``, ``epoch/val_loss``, ``epoch/val_accuracy`` (with a
  validation split), ``epoch/learning_rate`` and ``epoch/seconds``, at step = the epoch (1-based);
- for TensorBoard's HParams tab (sweeps and searches): the run's hyperparameters at its start, and
  its final ``final/test_accuracy``, ``final/test_loss`` (and ``final/best_val_accuracy``).

Exactly the epochs that the resume state holds are in the event files: an epoch is written only
once its checkpoint is committed, and a run that resumes rewrites its event files from the
checkpoint's history first, so a requeue never shows an epoch twice (or one the resumed run redid).

``<run dir>/tensorboard`` is the run's own directory (the run holds the directory's lease): a
restart empties it. Anything else at that name (a user's file, a symbolic link) is refused,
never replaced, and so is a directory that cannot be written: :class:`TensorBoardError`, one
line that names it and what to do, before the first epoch.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from mnist_hpc import rundir

log = logging.getLogger(__name__)

EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "seconds")
FINAL_KEYS = ("test_accuracy", "test_loss", "best_val_accuracy")


class TensorBoardError(RuntimeError):
    """The run's TensorBoard directory is not a directory the run can write (a known error: one line)."""


def hparam_value(value: Any) -> Any:
    """A value the HParams plugin takes (bool, number or string): lists and the rest as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardLog:
    """The event files of one run: restarted from the resume state, then appended epoch by epoch."""

    def __init__(self, run_dir: Path, hparams: Optional[dict[str, Any]], learning_rate: float) -> None:
        self.directory = Path(run_dir) / rundir.TENSORBOARD_DIR
        self.hparams = {k: hparam_value(v) for k, v in (hparams or {}).items()}
        self.learning_rate = float(learning_rate)
        self.written = 0
        self._writer: Any = None

    def restart(self, history: Sequence[dict[str, Any]]) -> None:
        """Start over from the committed history: earlier event files (of a run that was cut off) go."""
        import tensorflow as tf

        if self._writer is not None:
            self._writer.close()
        self._clear()
        self._writer = tf.summary.create_file_writer(str(self.directory))
        self.written = 0
        if self.hparams:
            self._write_hparams()
        self.commit(history)

    def _clear(self) -> None:
        """Make the event directory empty and writable, or raise :class:`TensorBoardError`.

        Its entries go, not the directory itself: it may be a mount point.
        """
        path = self.directory
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            kind = "a symbolic link" if path.is_symlink() else "a file"
            raise TensorBoardError(
                f"{path} is {kind}, where the run writes its TensorBoard event files (a directory); it was left as it "
                "is: move it out of the run directory and run again with the same overrides"
            )
        try:
            path.mkdir(exist_ok=True)
            for entry in path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            # TensorFlow's writer would fail with an error that names neither the cause nor the fix.
            probe = path / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TensorBoardError(
                f"cannot write the run's TensorBoard directory {path} ({exc.strerror}); make it writable (or remove "
                "it) and run again with the same overrides"
            ) from exc

    def _write_hparams(self) -> None:
        try:
            from tensorboard.plugins.hparams import api as hp
        except ImportError:  # the tensorboard package is what defines the HParams records
            log.warning("the tensorboard package is not installed here: no HParams data for this run")
            return
        with self._writer.as_default():
            hp.hparams(self.hparams, trial_id=str(self.directory.parent.name), start_time_secs=int(time.time()))

    def commit(self, history: Sequence[dict[str, Any]]) -> None:
        """Write the epochs of ``history`` not written yet (the caller has just committed their checkpoint)."""
        import tensorflow as tf

        with self._writer.as_default():
            for record in history[self.written :]:
                step = int(record["epoch"])
                for key in EPOCH_KEYS:
                    if key in record:
                        tf.summary.scalar(f"epoch/{key}", float(record[key]), step=step)
                tf.summary.scalar("epoch/learning_rate", self.learning_rate, step=step)
        self.written = len(history)
        self._writer.flush()

    def final(self, result: dict[str, float], epochs: int) -> None:
        """The run's final metrics (the HParams tab's columns), then close the files."""
        import tensorflow as tf

        with self._writer.as_default():
            for key in FINAL_KEYS:
                if result.get(key) is not None:
                    tf.summary.scalar(f"final/{key}", float(result[key]), step=epochs)
        self._writer.flush()
        self._writer.close()
        self._writer = None

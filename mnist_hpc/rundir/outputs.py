"""The outputs of a finished run: history.csv, model.keras, provenance.json, predictions.npz and,
last of all, metrics.json (its presence marks the run finished)."""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mnist_hpc.io import atomic_path, write_json_atomic, write_text_atomic
from mnist_hpc.rundir.files import (
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    PROVENANCE_FILE,
    WRONG_IMAGES_KEPT,
    RunFileError,
    _history,
    _read_json_object,
    _require,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import numpy as np


__all__ = [
    "history_csv",
    "write_history",
    "save_model",
    "write_provenance",
    "write_metrics",
    "retract_metrics",
    "read_metrics",
    "objective",
    "Predictions",
    "write_predictions",
    "load_predictions",
]

def history_csv(history: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def write_history(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    write_text_atomic(Path(run_dir) / HISTORY_FILE, history_csv(history))


def save_model(run_dir: Path, model: "keras.Model") -> Path:
    """Save in Keras' own format; the temporary name keeps the ``.keras`` suffix Keras requires."""
    target = Path(run_dir) / MODEL_FILE
    with atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)
    return target


def write_provenance(run_dir: Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / PROVENANCE_FILE, info)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """The final metrics: written last, so their presence marks a finished run."""
    write_json_atomic(Path(run_dir) / METRICS_FILE, metrics)


def retract_metrics(run_dir: Path) -> None:
    """A finished run continues (more epochs): until it finishes again it has no final metrics."""
    (Path(run_dir) / METRICS_FILE).unlink(missing_ok=True)


def read_metrics(run_dir: Path) -> Optional[dict[str, Any]]:
    """A finished run's metrics; None while it has not finished.

    Raises:
        RunFileError: the file is damaged (not a JSON object, no ``test_accuracy`` or ``history``).
    """
    path = Path(run_dir) / METRICS_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    _require(path, data, "test_accuracy", float, int)
    _history(path, data)
    for key in ("val_accuracy", "best_val_accuracy", "wall_time_s"):
        if data.get(key) is not None:
            _require(path, data, key, float, int)
    return data


def objective(metrics: dict[str, Any]) -> float:
    """What sweepers optimise: validation accuracy when data is held out (the test set never
    chooses), else test accuracy."""
    return float(metrics["val_accuracy"] if metrics.get("val_accuracy") is not None else metrics["test_accuracy"])


# --- predictions.npz -------------------------------------------------------------------------


@dataclass
class Predictions:
    """The test-set predictions a run saved for the report."""

    y_true: "np.ndarray"
    y_pred: "np.ndarray"
    y_prob: "np.ndarray"
    wrong_index: "np.ndarray"
    wrong_images: "np.ndarray"


def write_predictions(run_dir: Path, y_true: "np.ndarray", probabilities: "np.ndarray", x_test: "np.ndarray") -> None:
    """Test-set predictions: labels, probabilities, and the worst mistakes as images.

    ``y_prob`` holds every class probability (confusion matrix, calibration); the images of the
    ``WRONG_IMAGES_KEPT`` most confidently wrong digits are kept so the report needs no dataset.
    ``x_test`` may be the stored uint8 images or the lesson's float32 ones in [0, 1].
    """
    import numpy as np

    y_true = np.asarray(y_true).astype(np.uint8)
    y_prob = np.asarray(probabilities, dtype=np.float32)
    y_pred = y_prob.argmax(axis=1).astype(np.uint8)
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(-y_prob[wrong, y_pred[wrong]], kind="stable")][:WRONG_IMAGES_KEPT]
    images = np.asarray(x_test)[worst]
    if images.dtype != np.uint8:
        images = np.rint(images * 255).astype(np.uint8)
    with atomic_path(Path(run_dir) / PREDICTIONS_FILE, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                y_true=y_true,
                y_pred=y_pred,
                y_prob=y_prob,
                wrong_index=worst.astype(np.int64),
                wrong_images=images.reshape(-1, 28, 28),
            )


def load_predictions(run_dir: Path) -> Predictions:
    """A run's ``predictions.npz``.

    Raises:
        FileNotFoundError: the run has not written it (still running, failed, or older code).
        RunFileError: the file is damaged, lacks an array, or its arrays disagree.
    """
    import numpy as np

    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PREDICTIONS_FILE} in {run_dir}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise RunFileError(f"{path} is a bare .npy array, not the npz a run writes")
        with loaded as data:
            pred = Predictions(**{name: data[name] for name in Predictions.__dataclass_fields__})
    except RunFileError:
        raise
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RunFileError(f"cannot read {path}: {exc}") from exc
    n = pred.y_true.shape[0] if pred.y_true.ndim == 1 else -1
    consistent = (
        n >= 0
        and pred.y_pred.shape == (n,)
        and pred.y_prob.shape == (n, 10)
        and pred.wrong_index.ndim == 1
        and pred.wrong_images.shape == (pred.wrong_index.shape[0], 28, 28)
        and all(a.dtype.kind in "iu" for a in (pred.y_true, pred.y_pred, pred.wrong_index))
        and bool(np.all((pred.wrong_index >= 0) & (pred.wrong_index < n)))
        and bool(np.all((pred.y_true < 10) & (pred.y_pred < 10)))
    )
    if not consistent:
        raise RunFileError(f"{path} holds arrays whose shapes or values do not fit together")
    return pred

"""The outputs of a finished run: history.csv, model.keras, provenance.json, predictions.npz and,
last of all, metrics.json (its presence marks the run finished)."""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mnist_hpc.dataset import MAX_IMAGES, DatasetError, read_npz_layout
from mnist_hpc.io import UntrustedFileError, atomic_path, read_bytes_bounded, write_json_atomic, write_text_atomic
from mnist_hpc.rundir.files import (
    ACCURACY,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    NON_NEGATIVE,
    NULL,
    POSITIVE,
    PREDICTIONS_FILE,
    PROVENANCE_FILE,
    WRONG_IMAGES_KEPT,
    RunFileError,
    _history,
    _read_json_object,
    check_fields,
)

if TYPE_CHECKING:  # pragma: no cover
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


def save_model(run_dir: Path, model: Any) -> Path:
    """Save a Keras model in Keras' own format; the temporary name keeps the ``.keras`` suffix Keras requires.

    ``model`` is a ``keras.Model``; this module never imports Keras (status and report import it).
    """
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


# The numbers of metrics.json that anything reads (and status and report show).
_METRICS_FIELDS_CHECKED = {
    "test_accuracy": ACCURACY,
    "test_loss": NON_NEGATIVE | NULL,
    "val_accuracy": ACCURACY | NULL,
    "best_val_accuracy": ACCURACY | NULL,
    "wall_time_s": NON_NEGATIVE | NULL,
    "train_time_s": NON_NEGATIVE | NULL,
    "epochs_completed": POSITIVE | NULL,
}


def read_metrics(run_dir: Path) -> Optional[dict[str, Any]]:
    """A finished run's metrics; None while it has not finished.

    Raises:
        RunFileError: the file is damaged (not a JSON object, no ``test_accuracy`` or ``history``),
            a number is out of range, or the numbers disagree with the history they came from.
    """
    path = Path(run_dir) / METRICS_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    check_fields(path, data, _METRICS_FIELDS_CHECKED)
    history = _history(path, data)
    if not history:
        raise RunFileError(f"{path}: its history is empty, but a finished run trained at least one epoch")
    if data.get("epochs_completed") is not None and data["epochs_completed"] != len(history):
        raise RunFileError(
            f"{path}: epochs_completed is {data['epochs_completed']} but its history holds {len(history)} epoch(s)"
        )
    # The validation numbers are taken from the history when the run ends (compute.train): without
    # validation in the history, there are none.
    val = [row["val_accuracy"] for row in history if "val_accuracy" in row]
    for key, derived, how in (("best_val_accuracy", max, "the best"), ("val_accuracy", lambda v: v[-1], "the last")):
        if data.get(key) is None:
            continue
        if not val:
            raise RunFileError(f"{path}: {key} is {data[key]!r} but its history holds no val_accuracy")
        if data[key] != derived(val):
            raise RunFileError(
                f"{path}: {key} is {data[key]!r} but {how} val_accuracy of its history is {derived(val)!r}"
            )
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


# What write_predictions writes: each array's dtype and shape (n: test digits, k: wrong ones kept).
_PREDICTION_ARRAYS = {
    "y_true": ("uint8", ("n",)),
    "y_pred": ("uint8", ("n",)),
    "y_prob": ("float32", ("n", 10)),
    "wrong_index": ("int64", ("k",)),
    "wrong_images": ("uint8", ("k", 28, 28)),
}


def _max_predictions_bytes() -> int:
    """The most a predictions.npz may hold: the arrays for the largest test set a dataset may
    have (:data:`mnist_hpc.dataset.MAX_IMAGES`), the kept wrong digits, and room for the
    headers (about 12.7 MB; MNIST's 10,000 test digits take 472 kB)."""
    return MAX_IMAGES * (1 + 1 + 10 * 4) + WRONG_IMAGES_KEPT * (8 + 28 * 28) + (64 << 10)


def _check_prediction_layout(path: Path, layout: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Each array's dtype and shape as the writer makes them, before numpy allocates any of them
    (numpy allocates what a header declares before it reads the data)."""
    sizes: dict[str, int] = {}
    for key, (dtype, dims) in _PREDICTION_ARRAYS.items():
        if key not in layout:
            raise RunFileError(f"{path} lacks the array {key!r} (it holds {sorted(layout)})")
        shape, found = layout[key]
        fits = found == dtype and len(shape) == len(dims)
        for dim, size in zip(dims, shape):
            fits = fits and (size == dim if isinstance(dim, int) else sizes.setdefault(dim, size) == size)
        if not fits:
            want = tuple(d if isinstance(d, int) else sizes.get(d, d) for d in dims)
            raise RunFileError(f"{path}: {key} is {found} of shape {shape}, expected {dtype} of shape {want}")
    if sizes["n"] > MAX_IMAGES or sizes["k"] > WRONG_IMAGES_KEPT:
        raise RunFileError(
            f"{path} holds {sizes['n']} test digits and {sizes['k']} wrong ones; a run keeps at most "
            f"{MAX_IMAGES} and {WRONG_IMAGES_KEPT}"
        )


def load_predictions(run_dir: Path) -> Predictions:
    """A run's ``predictions.npz``, read without trusting it.

    The file's size and every array's header are checked before numpy inflates anything; then
    the values: labels 0-9, probabilities in [0, 1] that sum to 1 and whose largest is the
    predicted label, kept indices that point at digits predicted wrong.

    Raises:
        FileNotFoundError: the run has not written it (still running, failed, or older code).
        RunFileError: the file is too big, damaged, lacks an array, or its arrays disagree.
    """
    import numpy as np

    path = Path(run_dir) / PREDICTIONS_FILE
    try:
        raw = read_bytes_bounded(path, _max_predictions_bytes())
    except UntrustedFileError as exc:
        raise RunFileError(str(exc)) from exc
    if raw is None:
        raise FileNotFoundError(f"no {PREDICTIONS_FILE} in {run_dir}")
    try:
        layout = read_npz_layout(raw, str(path))
        # Exactly one member per array: numpy and the layout would not pick the same one of two
        # named alike (``y_true`` and ``y_true.npy``), and an unchecked one could be any size.
        names = sorted(zipfile.ZipFile(io.BytesIO(raw)).namelist())
    except DatasetError as exc:
        raise RunFileError(str(exc)) from exc
    if names != sorted(f"{key}.npy" for key in _PREDICTION_ARRAYS):
        raise RunFileError(f"{path} holds the members {names[:8]}, expected one .npy of each of {list(_PREDICTION_ARRAYS)}")
    _check_prediction_layout(path, layout)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            pred = Predictions(**{name: data[name] for name in Predictions.__dataclass_fields__})
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RunFileError(f"cannot read {path}: {exc}") from exc
    n = pred.y_true.shape[0]
    consistent = (
        bool(np.all(np.isfinite(pred.y_prob) & (pred.y_prob >= 0) & (pred.y_prob <= 1)))
        # A softmax's row sums to 1 (float32 rounding leaves it within 1e-6).
        and bool(np.all(np.abs(pred.y_prob.sum(axis=1, dtype=np.float64) - 1) <= 1e-3))
        and bool(np.all((pred.y_true < 10) & (pred.y_pred < 10)))
        and bool(np.array_equal(pred.y_prob.argmax(axis=1), pred.y_pred))
        and bool(np.all((pred.wrong_index >= 0) & (pred.wrong_index < n)))
        and bool(np.all(pred.y_pred[pred.wrong_index] != pred.y_true[pred.wrong_index]))
    )
    if not consistent:
        raise RunFileError(
            f"{path} holds values that cannot be a run's predictions (labels beyond 0-9, probabilities beyond "
            "[0, 1], not summing to 1 or not matching the predicted labels, or kept digits that were not "
            "predicted wrong)"
        )
    return pred

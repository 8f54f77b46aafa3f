"""What a run leaves in its run directory, each file written atomically.

Light to import (the login-node status and report read these names).

``metrics.json``, ``history.csv``, ``model.keras``, ``config.yaml`` and ``provenance.json``.
No TensorFlow here except inside :func:`save_model`.
"""

from __future__ import annotations

import csv
import io
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mnist_hpc.io import atomic_path, write_json_atomic, write_text_atomic
from mnist_hpc.runtime import RuntimeInfo

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import numpy as np

    from mnist_hpc.config import Config

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"
PREDICTIONS_FILE = "predictions.npz"
# How many of the most confidently wrong test digits a run keeps as images for the report.
WRONG_IMAGES_KEPT = 64
# Written when a submitted trial raises: the error line a report shows.
FAILURE_FILE = "failure.json"
# Written at submission: job id, array index and log paths (see mnist_hpc.launch).
JOB_FILE = "job.json"


def objective(metrics: dict[str, Any]) -> float:
    """What sweepers optimise: validation accuracy when data is held out (the test set never
    chooses), else test accuracy."""
    return float(metrics["val_accuracy"] if metrics.get("val_accuracy") is not None else metrics["test_accuracy"])


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_config(run_dir: Path, cfg: "Config") -> None:
    """The resolved, typed config as YAML: enough to rerun the same job."""
    from omegaconf import OmegaConf

    write_text_atomic(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


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
    write_text_atomic(run_dir / HISTORY_FILE, history_csv(history))


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json_atomic(run_dir / METRICS_FILE, metrics)


def save_model(run_dir: Path, model: "keras.Model") -> Path:
    """Save in Keras' own format; the temporary name keeps the ``.keras`` suffix Keras requires."""
    target = run_dir / MODEL_FILE
    with atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)
    return target


def write_predictions(run_dir: Path, y_true: "np.ndarray", probabilities: "np.ndarray", x_test: "np.ndarray") -> None:
    """Test-set predictions for the report: labels, probabilities, and the worst mistakes as images.

    ``y_prob`` holds every class probability (confusion matrix, calibration); the images of the
    ``WRONG_IMAGES_KEPT`` most confidently wrong digits are kept so the report needs no dataset.
    """
    import numpy as np

    y_true = np.asarray(y_true).astype(np.uint8)
    y_prob = np.asarray(probabilities, dtype=np.float32)
    y_pred = y_prob.argmax(axis=1).astype(np.uint8)
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(-y_prob[wrong, y_pred[wrong]], kind="stable")][:WRONG_IMAGES_KEPT]
    images = np.rint(np.asarray(x_test)[worst] * 255).astype(np.uint8).reshape(-1, 28, 28)
    with atomic_path(run_dir / PREDICTIONS_FILE, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, y_true=y_true, y_pred=y_pred, y_prob=y_prob, wrong_index=worst.astype(np.int64), wrong_images=images)


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_commit(start: Path) -> Optional[dict[str, Any]]:
    """The commit of the checkout holding ``start``, if it is one (local git only, no network)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(start), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(start), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(runtime: RuntimeInfo, data_sha256: str, started: str, ended: Optional[str]) -> dict[str, Any]:
    """Versions, host, Slurm ids, data hash, code commit and times of a run."""
    import keras
    import numpy
    import tensorflow as tf

    return {
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": numpy.__version__,
            "hydra": _dist_version("hydra-core"),
            "omegaconf": _dist_version("omegaconf"),
            "submitit": _dist_version("submitit"),
            "mnist_hpc": _dist_version("mnist-hpc"),
        },
        "python_executable": sys.executable,
        "platform": platform.platform(),
        **runtime.as_dict(),
        "data_sha256": data_sha256,
        "git": git_commit(Path(__file__).resolve().parent),
        "started": started,
        "ended": ended,
    }


def write_provenance(run_dir: Path, info: dict[str, Any]) -> None:
    write_json_atomic(run_dir / PROVENANCE_FILE, info)

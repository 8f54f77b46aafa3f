"""The run directory: every file a run leaves, named, written and read through this module.

One run (a single training, or one trial of a sweep) owns one directory::

    <run dir>/
      identity.json     once, by the first submission or run: the config this directory is bound to
      job.json          at submission (launcher): job id, array task, trial, overrides, log paths
      lease.json        while a job writes the directory: which job (or host and pid); .lease.lock guards it
      config.yaml       at start: the resolved, typed config
      .hydra/           at start: Hydra's own copy of the config and overrides.yaml
      progress.json     at start and after every epoch: epochs done and planned, history so far
      checkpoints/      resume state (its format: mnist_hpc.compute.checkpoint)
      train.log         the job log, for people: nothing parses it
      predictions.npz   at the end: test labels, probabilities, the worst mistakes as images
      history.csv       at the end: the per-epoch history
      model.keras       at the end: the trained model
      provenance.json   at the end: versions, host, Slurm ids, data hash, commit, times
      metrics.json      last: its presence marks a finished run
      failure.json      when the run raised: the error line; removed when a new attempt starts

Writers are atomic (see :mod:`mnist_hpc.io`). Readers never raise on a damaged file: they
return what can be used and a note naming the file (other people's processes write these
files, and one bad file must not stop a status or a report of a hundred trials).
:func:`read_run` gathers a run's files and :func:`run_state` is the one place where a run's
state is derived from its files and its scheduler's view.

Light to import (login-node status and report use it): numpy only inside the functions that
handle arrays, TensorFlow only inside :func:`save_model`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import traceback
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mnist_hpc.io import atomic_path, utc_now, write_json_atomic, write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import numpy as np

    from mnist_hpc.config import Config

IDENTITY_FILE = "identity.json"
JOB_FILE = "job.json"
LEASE_FILE = "lease.json"
LEASE_LOCK = ".lease.lock"
CONFIG_FILE = "config.yaml"
HYDRA_DIR = ".hydra"
# Hydra writes a job's config here (hydra.output_subdir); it becomes .hydra once the run may use the directory.
HYDRA_PENDING_DIR = ".hydra-pending"
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"
PROGRESS_FILE = "progress.json"
CHECKPOINT_DIR = "checkpoints"
# Hydra names the job log after hydra.job.name, which conf/config.yaml sets to "train".
LOG_FILE = "train.log"
PREDICTIONS_FILE = "predictions.npz"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.json"
FAILURE_FILE = "failure.json"
# How many of the most confidently wrong test digits a run keeps as images for the report.
WRONG_IMAGES_KEPT = 64
# Scheduler states after which a job's process is gone (sacct's names).
ENDED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


class RunFileError(ValueError):
    """A run file exists but cannot be used; the message names the file and what is wrong."""


# --- reading JSON written by other processes --------------------------------------------------


def _read_json_object(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``; None if the file is absent.

    Raises:
        RunFileError: the file is unreadable, not JSON, or not a JSON object.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{path} is unreadable ({exc})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RunFileError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        kind = {type(None): "null", list: "list", str: "string", bool: "boolean"}.get(type(data), "number")
        raise RunFileError(f"{path} holds a JSON {kind}, expected an object")
    return data


def _require(path: Path, data: dict[str, Any], key: str, *types: type) -> Any:
    value = data.get(key)
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        want = " or ".join(t.__name__ for t in types)
        raise RunFileError(f"{path}: field {key!r} is {value!r}, expected {want}")
    return value


def _history(path: Path, data: dict[str, Any]) -> list[dict[str, float]]:
    rows = _require(path, data, "history", list)
    if not all(isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in rows):
        raise RunFileError(f"{path}: 'history' must be a list of per-epoch records with an integer 'epoch'")
    return [dict(r) for r in rows]


# --- job.json: written at submission ----------------------------------------------------------


@dataclass
class JobRecord:
    """What the launcher knows of a submitted run (``job.json``)."""

    # "slurm" or "local" (submitit's executor).
    cluster: str
    # Slurm job id, ``<array>_<task>`` for an array task.
    job_id: str
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    # The trial's number in its sweep.
    trial: Optional[int] = None
    array_job_id: Optional[str] = None
    array_task_id: Optional[int] = None
    # Position inside a packed task (hydra.launcher.trials_per_task > 1), else None.
    packed_slot: Optional[int] = None
    # submitit's logs and folder.
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    submitit_folder: Optional[str] = None
    submitted: str = ""

    @property
    def result_file(self) -> Optional[Path]:
        """submitit's result pickle: it exists once the job's Python process has ended."""
        return Path(self.submitit_folder) / f"{self.job_id}_0_result.pkl" if self.submitit_folder else None


def write_job(run_dir: Path, record: JobRecord) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / JOB_FILE, asdict(record))


def read_job(run_dir: Path) -> Optional[JobRecord]:
    """The run's ``job.json``; None when it was not submitted.

    Raises:
        RunFileError: the file is damaged or lacks ``job_id``.
    """
    path = Path(run_dir) / JOB_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    _require(path, data, "job_id", str)
    known = {f.name for f in fields(JobRecord)}
    values = {k: v for k, v in data.items() if k in known}
    values.setdefault("cluster", "slurm")
    values.setdefault("run_dir", str(run_dir))
    if not isinstance(values.get("overrides", []), list):
        raise RunFileError(f"{path}: field 'overrides' must be a list")
    values["overrides"] = [str(o) for o in values.get("overrides", [])]
    for key in ("trial", "array_task_id", "packed_slot"):
        if values.get(key) is not None and not isinstance(values[key], int):
            raise RunFileError(f"{path}: field {key!r} is {values[key]!r}, expected an integer")
    return JobRecord(**values)


# --- identity.json and lease.json: who may write the directory (policy: mnist_hpc.claim) ----------


def write_identity(run_dir: Path, identity: dict[str, Any], fingerprint: str) -> None:
    """Bind the directory to a config: written once, when the first run or submission claims it."""
    write_json_atomic(Path(run_dir) / IDENTITY_FILE, {"fingerprint": fingerprint, "config": identity, "created": utc_now()})


def read_identity(run_dir: Path) -> Optional[dict[str, Any]]:
    """The directory's binding; None for a directory not claimed yet.

    Raises:
        RunFileError: the file is damaged.
    """
    path = Path(run_dir) / IDENTITY_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    _require(path, data, "fingerprint", str)
    _require(path, data, "config", dict)
    return data


def write_lease(run_dir: Path, holder: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / LEASE_FILE, {"holder": holder, "taken": utc_now()})


def read_lease(run_dir: Path) -> Optional[dict[str, Any]]:
    """The lease; None when no job holds the directory.

    Raises:
        RunFileError: the file is damaged.
    """
    path = Path(run_dir) / LEASE_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    _require(path, data, "holder", dict)
    return data


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete half-written files (``.<name>.*.tmp*``, see :func:`mnist_hpc.io.atomic_path`) of dead writers.

    Only for a caller that holds the lease: no live writer can be writing them.
    """
    removed = []
    for directory in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if directory.is_dir():
            for path in directory.glob(".*.tmp*"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def commit_hydra_files(run_dir: Path) -> None:
    """Make the config Hydra wrote for this attempt (``.hydra-pending``) the run's ``.hydra``."""
    pending = Path(run_dir) / HYDRA_PENDING_DIR
    if not pending.is_dir():
        return
    final = Path(run_dir) / HYDRA_DIR
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(pending, final)


def discard_hydra_files(run_dir: Path) -> None:
    """Drop what Hydra wrote for an attempt that may not use the directory."""
    shutil.rmtree(Path(run_dir) / HYDRA_PENDING_DIR, ignore_errors=True)


# --- config.yaml and Hydra's overrides ------------------------------------------------------


def write_config(run_dir: Path, cfg: "Config") -> None:
    """The resolved, typed config as YAML: enough to rerun the same job."""
    from omegaconf import OmegaConf

    write_text_atomic(Path(run_dir) / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _read_yaml(path: Path) -> Any:
    import yaml  # PyYAML comes with omegaconf

    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunFileError(f"{path} is not readable YAML ({exc})") from exc


def planned_epochs(run_dir: Path) -> Optional[int]:
    """``train.epochs`` of the config a run wrote at its start; None before it started."""
    cfg = _read_yaml(Path(run_dir) / CONFIG_FILE)
    try:
        return int(cfg["train"]["epochs"])
    except (TypeError, KeyError, ValueError):
        return None


def hydra_overrides(run_dir: Path) -> list[str]:
    """The overrides Hydra recorded for a run (``.hydra/overrides.yaml``), or [] if none."""
    data = _read_yaml(Path(run_dir) / HYDRA_OVERRIDES)
    return [str(item) for item in data] if isinstance(data, list) else []


# --- progress.json: written during training ---------------------------------------------------


@dataclass
class Progress:
    """How far a run has got: whole epochs done, of those planned, and their history."""

    epochs_done: int
    epochs_planned: int
    history: list[dict[str, float]] = field(default_factory=list)
    updated: str = ""


def write_progress(run_dir: Path, epochs_done: int, epochs_planned: int, history: Sequence[dict[str, Any]]) -> None:
    """Written at the start (or resume) and after every epoch; a resume rewrites it from the checkpoint."""
    progress = Progress(epochs_done, epochs_planned, [dict(r) for r in history], utc_now())
    write_json_atomic(Path(run_dir) / PROGRESS_FILE, asdict(progress))


def read_progress(run_dir: Path) -> Optional[Progress]:
    """The run's progress; None before it started.

    Raises:
        RunFileError: the file is damaged.
    """
    path = Path(run_dir) / PROGRESS_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    return Progress(
        epochs_done=_require(path, data, "epochs_done", int),
        epochs_planned=_require(path, data, "epochs_planned", int),
        history=_history(path, data),
        updated=str(data.get("updated", "")),
    )


# --- the outputs of a finished run ----------------------------------------------------------


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


# --- failure.json ----------------------------------------------------------------------------


def error_line(exc: BaseException) -> str:
    """``module.Type: first line of the message`` (as a traceback's last line): what a table shows."""
    module = type(exc).__module__
    name = type(exc).__name__ if module == "builtins" else f"{module}.{type(exc).__name__}"
    return f"{name}: {exc}".splitlines()[0]


def write_failure(run_dir: Path, exc: BaseException) -> None:
    """``failure.json``: the error a status or report shows for a run that raised."""
    write_json_atomic(
        Path(run_dir) / FAILURE_FILE,
        {
            "error": error_line(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "time": utc_now(),
        },
    )


def clear_failure(run_dir: Path) -> None:
    """A new attempt supersedes an earlier one's failure."""
    (Path(run_dir) / FAILURE_FILE).unlink(missing_ok=True)


def read_failure(run_dir: Path) -> Optional[str]:
    """The error line of a run that raised; None if it did not.

    Raises:
        RunFileError: the file is damaged.
    """
    path = Path(run_dir) / FAILURE_FILE
    data = _read_json_object(path)
    return None if data is None else str(_require(path, data, "error", str))


# --- a run's state ----------------------------------------------------------------------------


@dataclass
class RunFiles:
    """What a run's files say about it; ``notes`` name the files that could not be used."""

    run_dir: Path
    job: Optional[JobRecord] = None
    metrics: Optional[dict[str, Any]] = None
    progress: Optional[Progress] = None
    failure: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """The run's last attempt ended with its final metrics (and did not fail after them)."""
        return self.metrics is not None and self.failure is None

    @property
    def history(self) -> list[dict[str, float]]:
        if self.metrics is not None:
            return [dict(r) for r in self.metrics["history"]]
        return list(self.progress.history) if self.progress else []

    @property
    def epochs(self) -> tuple[Optional[int], Optional[int]]:
        """(epochs done, epochs planned); None where not known yet."""
        if self.metrics is not None:
            done = len(self.metrics["history"])
            return done, (self.progress.epochs_planned if self.progress else done)
        if self.progress is not None:
            return self.progress.epochs_done, self.progress.epochs_planned
        return None, None


def read_run(run_dir: Path) -> RunFiles:
    """Read every file that tells a run's state; a damaged one becomes a note, not an error."""
    run = RunFiles(Path(run_dir))
    readers = (
        ("job", read_job),
        ("metrics", read_metrics),
        ("progress", read_progress),
        ("failure", read_failure),
    )
    for name, reader in readers:
        try:
            setattr(run, name, reader(run.run_dir))
        except RunFileError as exc:
            run.notes.append(f"{exc}; ignored")
    try:
        run.overrides = list(run.job.overrides) if run.job else hydra_overrides(run.run_dir)
    except RunFileError as exc:
        run.notes.append(f"{exc}; ignored")
    return run


def run_state(run: RunFiles, scheduler_state: Optional[str], process_ended: bool = False) -> str:
    """A run's state, from its files and (when known) its Slurm job's state.

    For a trial packed with others into one task, the task's state says how the task as a
    whole is doing; the trial's own files say how the trial ended. A task that ended
    COMPLETED without its trial's ``metrics.json`` did not finish that trial: it is FAILED,
    never COMPLETED.

    Args:
        run: the run's files (:func:`read_run`).
        scheduler_state: the job's state from sacct or squeue; None when no scheduler knows it.
        process_ended: the job's process is known to have ended (submitit's result file).
    """
    packed = run.job is not None and run.job.packed_slot is not None
    # A new attempt removes the failure.json of the one before when it starts, so a failure.json
    # is the newest word on the run, even beside a metrics.json that an earlier attempt left.
    if run.failure is not None and (packed or scheduler_state is None or scheduler_state in ENDED_STATES):
        return "FAILED"
    if run.finished:
        return "COMPLETED" if packed or scheduler_state in (None, "COMPLETED") else scheduler_state
    if scheduler_state == "COMPLETED" or (scheduler_state is None and process_ended):
        return "FAILED"
    if scheduler_state is not None:
        return scheduler_state
    if run.job is not None and run.job.cluster == "local":
        return "RUNNING" if run.progress is not None else "PENDING"
    return "UNKNOWN"

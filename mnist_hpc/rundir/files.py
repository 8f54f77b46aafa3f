"""The run directory's file names, and reading them without trusting their writer.

Each file has a size cap (:data:`MAX_BYTES`) and every reader applies the same field checks
(:class:`Field`: accuracies in [0, 1], losses and seconds finite and >= 0, epochs whole and in
order): a file that fails is a :class:`RunFileError` naming the file, the field and the value.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mnist_hpc.io import UntrustedFileError, read_json

__all__ = [
    "IDENTITY_FILE",
    "JOB_FILE",
    "LEASE_FILE",
    "LEASE_LOCK",
    "CONFIG_FILE",
    "HYDRA_DIR",
    "HYDRA_PENDING_DIR",
    "HYDRA_OVERRIDES",
    "PROGRESS_FILE",
    "CHECKPOINT_DIR",
    "LOG_FILE",
    "PREDICTIONS_FILE",
    "HISTORY_FILE",
    "MODEL_FILE",
    "PROVENANCE_FILE",
    "METRICS_FILE",
    "FAILURE_FILE",
    "TENSORBOARD_DIR",
    "RUN_FILES",
    "RUN_DIRS",
    "RUN_MARKERS",
    "is_run_dir",
    "holds_results",
    "checkpoint_name",
    "checkpoint_position",
    "checkpoint_path",
    "list_checkpoints",
    "submitit_result_file",
    "layout_problems",
    "WRONG_IMAGES_KEPT",
    "ENDED_STATES",
    "ERROR_LINE_PREFIX",
    "RunFileError",
]

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
# TensorBoard's event files of the run (mnist_hpc.compute.tensorboard writes them).
TENSORBOARD_DIR = "tensorboard"
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
# What a job prints on its stderr before the one line of a known error (then it exits 1): status and
# report take the last such line of a job's log for its error.
ERROR_LINE_PREFIX = "mnist-hpc: error: "
# Scheduler states after which a job's process is gone (sacct's names).
ENDED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


# What a run directory holds, by kind: where the run writes a file, nothing else may stand, and
# where it makes a directory, only a directory (layout_problems).
RUN_FILES = (IDENTITY_FILE, JOB_FILE, LEASE_FILE, LEASE_LOCK, CONFIG_FILE, PROGRESS_FILE, LOG_FILE,
             PREDICTIONS_FILE, HISTORY_FILE, MODEL_FILE, PROVENANCE_FILE, METRICS_FILE, FAILURE_FILE)
RUN_DIRS = (HYDRA_DIR, HYDRA_PENDING_DIR, CHECKPOINT_DIR, TENSORBOARD_DIR)
# Files whose presence marks a directory as a run's (submitted, or a plain Hydra run).
RUN_MARKERS = (JOB_FILE, IDENTITY_FILE, METRICS_FILE, PROGRESS_FILE, CONFIG_FILE, LOG_FILE, str(HYDRA_OVERRIDES))


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run's directory: one of its marking files is there."""
    return any(os.path.isfile(Path(path) / marker) for marker in RUN_MARKERS)


# A checkpoint's name says how far it reached: epochs done, then batches of the next epoch (what it
# holds and its format: mnist_hpc.compute.checkpoint). Zero-padded, so names sort as positions do.
_CHECKPOINT_NAME = re.compile(r"^ckpt-e(\d{5})-b(\d{7})\.npz$")


def checkpoint_name(epoch: int, batch: int) -> str:
    """The name of the checkpoint taken after ``epoch`` epochs and ``batch`` batches of the next."""
    return f"ckpt-e{epoch:05d}-b{batch:07d}.npz"


def checkpoint_position(name: str) -> Optional[tuple[int, int]]:
    """(epochs, batches) a checkpoint's file name says it reached; None for any other name."""
    match = _CHECKPOINT_NAME.match(name)
    return (int(match[1]), int(match[2])) if match else None


def checkpoint_path(run_dir: Path, epoch: int, batch: int) -> Path:
    """Where ``run_dir`` keeps its checkpoint of ``epoch`` epochs and ``batch`` batches."""
    return Path(run_dir) / CHECKPOINT_DIR / checkpoint_name(epoch, batch)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints in ``run_dir``'s :data:`CHECKPOINT_DIR`, newest (furthest along) first.

    Only names :func:`checkpoint_name` makes count: a writer's temporary (``.ckpt-...tmp``) or a
    stray file is not a checkpoint.
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = [(position, p) for p in directory.iterdir() if (position := checkpoint_position(p.name)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def holds_results(run_dir: Path) -> bool:
    """Whether a run has written results into ``run_dir``: a checkpoint, its progress or its metrics."""
    return bool(list_checkpoints(run_dir)) or any((Path(run_dir) / name).exists() for name in (METRICS_FILE, PROGRESS_FILE))


def submitit_result_file(folder: Path, job_id: str) -> Path:
    """The pickle submitit writes in its ``folder`` once task 0 of job ``job_id`` has ended.

    submitit's ``JobPaths(folder, job_id).result_pickle`` names it too (a test pins the two
    equal); it is spelled here so that status and report, which never submit, need not import
    submitit (about 0.2 s) to look for it.
    """
    return Path(folder) / f"{job_id}_0_result.pkl"


def layout_problems(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that are not what a run makes there: a directory (or anything else
    that is not a file) where it writes a file, or a file where it makes a directory."""
    problems = []
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if os.path.lexists(path) and not os.path.isfile(path):
            problems.append(f"{path} is not a file, but the run writes its {name} there; move it out of {run_dir}")
    for name in RUN_DIRS:
        path = Path(run_dir) / name
        if os.path.lexists(path) and not os.path.isdir(path):
            problems.append(f"{path} is not a directory, but the run keeps its {name}/ there; move it out of {run_dir}")
    return problems


class RunFileError(UntrustedFileError):
    """A run file exists but cannot be used; the message names the file and what is wrong."""


# --- how big each file may be ------------------------------------------------------------------

# The most each run file may hold before it is refused unread: far above what its writer ever
# writes, far below what would strain a login node that reads hundreds of them.
MAX_BYTES = {
    # Ids, log paths and the trial's overrides: about 1 kB.
    JOB_FILE: 128 << 10,
    # The config's identity (flat keys and values): about 2 kB.
    IDENTITY_FILE: 64 << 10,
    # Host, pid, job ids, user: about 300 bytes.
    LEASE_FILE: 16 << 10,
    # About 224 bytes per epoch of history: room for some 18,000 epochs (1,000 epochs: 224 kB).
    PROGRESS_FILE: 4 << 20,
    # The same history and a dozen numbers.
    METRICS_FILE: 4 << 20,
    # An error line and its traceback; chained TensorFlow tracebacks run to tens of kB.
    FAILURE_FILE: 1 << 20,
    # The resolved config as YAML: about 2 kB.
    CONFIG_FILE: 64 << 10,
    # Hydra's list of the run's overrides: well under 1 kB.
    HYDRA_OVERRIDES.name: 64 << 10,
}
# predictions.npz's cap follows from the largest test set a dataset may hold (rundir.outputs).


def _read_json_object(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object in ``path`` (a run file named in :data:`MAX_BYTES`); None if the file is absent.

    Raises:
        RunFileError: the file is too big, unreadable, not JSON, or not a JSON object.
    """
    try:
        data = read_json(path, MAX_BYTES[path.name])
    except FileNotFoundError:
        return None
    except UntrustedFileError as exc:
        raise RunFileError(str(exc)) from exc
    if not isinstance(data, dict):
        kind = {type(None): "null", list: "list", str: "string", bool: "boolean"}.get(type(data), "number")
        raise RunFileError(f"{path} holds a JSON {kind}, expected an object")
    return data


# --- what each field may hold: the one set of checks every reader applies -----------------------
#
# A number a reader returns is one that could be true: an accuracy lies in [0, 1], a loss or a
# duration is finite and not negative, an epoch or a count is whole. A file with any field out
# of range is refused whole (a RunFileError naming the file, the field and the value), so that
# status and report show a note for the run instead of ranking a number that cannot be.


def _real(value: Any) -> bool:
    """A finite int or float (a bool is not a number here, though Python calls it an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float's range: nothing we show can hold it
        return False


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Field:
    """What a field may hold: ``want`` says it in a message, ``accepts`` tells a value."""

    want: str
    accepts: Callable[[Any], bool]

    def __or__(self, other: "Field") -> "Field":
        return Field(f"{self.want} or {other.want}", lambda v: self.accepts(v) or other.accepts(v))


# Linux never gives a process an id above this (PID_MAX_LIMIT); os.kill overflows on larger ones.
PID_MAX = 1 << 22

NULL = Field("null", lambda v: v is None)
ACCURACY = Field("a number in [0, 1]", lambda v: _real(v) and 0 <= v <= 1)
# Losses and durations.
NON_NEGATIVE = Field("a finite number >= 0", lambda v: _real(v) and v >= 0)
NUMBER = Field("a finite number", _real)
COUNT = Field("a whole number >= 0", lambda v: _whole(v) and v >= 0)
POSITIVE = Field("a whole number >= 1", lambda v: _whole(v) and v >= 1)
PID = Field(f"a process id in 1..{PID_MAX}", lambda v: _whole(v) and 1 <= v <= PID_MAX)
TEXT = Field("a string", lambda v: isinstance(v, str))
NAME = Field("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
# What sacct and squeue take: a job id, or an array task's <array>_<task>. Anything else in one
# file would make the one query for all trials fail.
SLURM_JOB_ID = Field(
    "a Slurm job id such as 1234 or 1234_5", lambda v: isinstance(v, str) and re.fullmatch(r"\d{1,10}(_\d{1,10})?", v) is not None
)
TEXTS = Field("a list of strings", lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v))
OBJECT = Field("an object", lambda v: isinstance(v, dict))
LIST = Field("a list", lambda v: isinstance(v, list))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def check(path: Path, where: str, value: Any, field: Field) -> Any:
    """``value`` when ``field`` accepts it.

    Raises:
        RunFileError: naming ``path``, the field (``where``) and the value.
    """
    if not field.accepts(value):
        raise RunFileError(f"{path}: {where} is {_shown(value)}, expected {field.want}")
    return value


def check_fields(path: Path, data: dict[str, Any], fields: dict[str, Field], prefix: str = "") -> None:
    """Check each named field of a JSON object (an absent one is checked as null); ``prefix``
    names the object inside the file (``holder.``)."""
    for key, field in fields.items():
        check(path, f"field {prefix + key!r}", data.get(key), field)


def history_field(key: str) -> Field:
    """What a value in an epoch's record may hold, by its name (Keras' logs, and our ``seconds``)."""
    if key == "epoch":
        return POSITIVE
    if key.endswith("accuracy"):
        return ACCURACY
    if key.endswith("loss") or key == "seconds":
        return NON_NEGATIVE
    return NUMBER


def _history(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``history`` field: one record per epoch, epochs 1..n in order, every value in range."""
    rows = check(path, "field 'history'", data.get("history"), LIST)
    for number, row in enumerate(rows, 1):
        where = f"history[{number - 1}]"
        check(path, where, row, OBJECT)
        in_order = Field(f"{number} (epochs 1..n in order)", lambda v: _whole(v) and v == number)  # noqa: B023
        check(path, f"{where}['epoch']", row.get("epoch"), in_order)
        for key, value in row.items():
            check(path, f"{where}[{key!r}]", value, history_field(key))
    return [dict(r) for r in rows]

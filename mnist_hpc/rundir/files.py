"""The run directory's file names, and reading JSON that other processes wrote (never trusted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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


class RunFileError(UntrustedFileError):
    """A run file exists but cannot be used; the message names the file and what is wrong."""


# The most a run's JSON file may hold before it is refused unread: far above what a run writes
# (a 1,000-epoch history is about 200 kB).
MAX_RUN_JSON_BYTES = 4 << 20


def _read_json_object(path: Path, max_bytes: int = MAX_RUN_JSON_BYTES) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``; None if the file is absent.

    Raises:
        RunFileError: the file is too large, unreadable, not JSON, or not a JSON object.
    """
    try:
        data = read_json(path, max_bytes)
    except FileNotFoundError:
        return None
    except UntrustedFileError as exc:
        raise RunFileError(str(exc)) from exc
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

"""The files that describe a run rather than its results: who submitted it (job.json), what it is
bound to and who writes it (identity.json, lease.json), its config, its progress, its failure."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import traceback
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from mnist_hpc.io import (
    UntrustedFileError,
    exclusive_lock,
    parse_utc,
    read_yaml,
    utc_now,
    write_bytes_atomic,
    write_files_atomic,
    write_json_atomic,
    write_json_if_absent,
    write_text_atomic,
)
from mnist_hpc.rundir.files import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    COUNT,
    FAILURE_FILE,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_PENDING_DIR,
    IDENTITY_FILE,
    JOB_FILE,
    LEASE_FILE,
    LEASE_LOCK,
    MAX_BYTES,
    NAME,
    NULL,
    OBJECT,
    PID,
    PID_MAX,
    POSITIVE,
    PROGRESS_FILE,
    SLURM_JOB_ID,
    TEXT,
    TEXTS,
    Field,
    RunFileError,
    _history,
    _read_json_object,
    check,
    check_fields,
    submitit_result_file,
)

if TYPE_CHECKING:  # pragma: no cover
    from mnist_hpc.config import Config


# --- job.json: written at submission ----------------------------------------------------------


__all__ = [
    "JobRecord",
    "write_job",
    "write_jobs",
    "read_job",
    "write_identity",
    "read_identity",
    "lease_lock",
    "write_lease",
    "read_lease",
    "release_lease",
    "remove_stale_temporaries",
    "seed_from",
    "commit_hydra_files",
    "discard_hydra_files",
    "write_config",
    "planned_epochs",
    "hydra_overrides",
    "Progress",
    "write_progress",
    "read_progress",
    "error_line",
    "write_failure",
    "clear_failure",
    "read_failure",
]

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
    # Slurm tasks training this run together (nodes x tasks_per_node; train.distribution).
    tasks: int = 1
    # submitit's logs and folder.
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    submitit_folder: Optional[str] = None
    submitted: str = ""
    # The identity fingerprint (mnist_hpc.claim.fingerprint) of the config this job was queued with:
    # a reader shows the directory's results as this job's only when the directory is bound to it.
    fingerprint: Optional[str] = None
    # Where a local launcher's job runs (its job id is its pid there) and when that process started
    # (clock ticks since boot, mnist_hpc.claim's pid_start): tells a live job from a reused pid.
    host: Optional[str] = None
    pid_start: Optional[str] = None

    @classmethod
    def of(
        cls, cluster: str, job_id: str, paths: Any, run_dir: Path, overrides: Sequence[str], trial: Optional[int],
        packed_slot: Optional[int] = None, submitted: str = "", tasks: int = 1, fingerprint: Optional[str] = None,
        host: Optional[str] = None, pid_start: Optional[str] = None,
    ) -> "JobRecord":
        """The record of a submitit job (``paths``: its ``JobPaths``; None outside submitit), made at
        submission or by the job itself."""
        array_job_id, _, array_task = job_id.partition("_")
        return cls(
            cluster=cluster,
            job_id=job_id,
            run_dir=str(run_dir),
            overrides=list(overrides),
            trial=trial,
            array_job_id=array_job_id if array_task else None,
            array_task_id=int(array_task) if array_task.isdigit() else None,
            packed_slot=packed_slot,
            tasks=tasks,
            stdout=str(paths.stdout) if paths is not None else None,
            stderr=str(paths.stderr) if paths is not None else None,
            submitit_folder=str(paths.folder) if paths is not None else None,
            submitted=submitted,
            fingerprint=fingerprint,
            host=host,
            pid_start=pid_start,
        )

    @property
    def submitted_at(self) -> Optional[datetime]:
        """``submitted`` as a time; None in a record older than the field (an empty string)."""
        return parse_utc(self.submitted) if self.submitted else None

    @property
    def result_file(self) -> Optional[Path]:
        """submitit's result pickle: it exists once the job's Python process has ended."""
        return submitit_result_file(Path(self.submitit_folder), self.job_id) if self.submitit_folder else None


def _job_json(record: JobRecord) -> bytes:
    # Its fields are plain values and one list of strings: no need for asdict's deep copy.
    data = {f.name: getattr(record, f.name) for f in _JOB_FIELDS}
    data["overrides"] = list(record.overrides)
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


_JOB_FIELDS = fields(JobRecord)


def write_job(run_dir: Path, record: JobRecord) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(run_dir) / JOB_FILE, _job_json(record))


def write_jobs(records: Sequence[JobRecord]) -> None:
    """``job.json`` of every run a launch queued (each record's ``run_dir``): written together, one
    flush of the filesystem for all of them (see :func:`mnist_hpc.io.write_files_atomic`)."""
    write_files_atomic([(Path(r.run_dir) / JOB_FILE, _job_json(r)) for r in records])


# What each field of job.json may hold (JobRecord's fields; null where the record allows None).
_JOB_FIELDS_CHECKED = {
    "job_id": NAME,
    "cluster": Field("'slurm' or 'local'", lambda v: v in ("slurm", "local")) | NULL,
    "run_dir": TEXT | NULL,
    "overrides": TEXTS | NULL,
    "trial": COUNT | NULL,
    "array_job_id": SLURM_JOB_ID | NULL,
    "array_task_id": COUNT | NULL,
    "packed_slot": COUNT | NULL,
    "tasks": POSITIVE | NULL,
    "stdout": TEXT | NULL,
    "stderr": TEXT | NULL,
    "submitit_folder": TEXT | NULL,
    "submitted": Field("an ISO 8601 time with its UTC offset, as mnist-hpc writes it (2026-12-07T08:00:00+00:00), "
                       "or \"\"", lambda v: v == "" or parse_utc(v) is not None) | NULL,
    "fingerprint": TEXT | NULL,
    "host": TEXT | NULL,
    "pid_start": TEXT | NULL,
}
# A local job's id is its process's (the preflight asks the process whether it still runs),
# or host-pid for a search worker outside submitit.
_LOCAL_JOB_ID = Field(
    f"a process id in 1..{PID_MAX} or a host-pid name",
    lambda v: not v.isdigit() or (len(v) <= 10 and v.isascii() and PID.accepts(int(v))),
)


def read_job(run_dir: Path) -> Optional[JobRecord]:
    """The run's ``job.json``; None when it was not submitted.

    Raises:
        RunFileError: the file is damaged, lacks ``job_id``, or a field is out of range.
    """
    path = Path(run_dir) / JOB_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    check_fields(path, data, _JOB_FIELDS_CHECKED)
    known = {f.name for f in fields(JobRecord)}
    values = {k: v for k, v in data.items() if k in known and v is not None}
    values.setdefault("cluster", "slurm")
    values.setdefault("run_dir", str(run_dir))
    check(path, "field 'job_id'", values["job_id"], SLURM_JOB_ID if values["cluster"] == "slurm" else _LOCAL_JOB_ID)
    values["overrides"] = list(values.get("overrides", []))
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
    check_fields(path, data, {"fingerprint": NAME, "config": OBJECT, "created": TEXT | NULL})
    return data


@contextlib.contextmanager
def lease_lock(run_dir: Path) -> Iterator[None]:
    """Hold the directory's :data:`LEASE_LOCK` (an exclusive flock): who checks the lease and takes
    it does both under this lock, so two starters cannot both find it free and both take it."""
    with exclusive_lock(Path(run_dir) / LEASE_LOCK):
        yield


def write_lease(run_dir: Path, holder: dict[str, Any]) -> None:
    """Name ``holder`` (mnist_hpc.claim.Holder's fields) as the directory's one writer; under :func:`lease_lock`."""
    write_json_atomic(Path(run_dir) / LEASE_FILE, {"holder": holder, "taken": utc_now()})


# What a lease's holder may hold (mnist_hpc.claim.Holder's fields): the pid is signalled to ask
# whether its process lives, so 0 or -1 (a process group, every process) must never get through.
_HOLDER_FIELDS_CHECKED = {
    "host": TEXT,
    "pid": PID,
    "pid_start": TEXT | NULL,
    "slurm_job_id": SLURM_JOB_ID | NULL,
    "job_label": TEXT | NULL,
    "user": TEXT | NULL,
}


def read_lease(run_dir: Path) -> Optional[dict[str, Any]]:
    """The lease; None when no job holds the directory.

    Raises:
        RunFileError: the file is damaged, or its holder's host or pid is not one.
    """
    path = Path(run_dir) / LEASE_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    check_fields(path, data, {"holder": OBJECT, "taken": TEXT | NULL})
    check_fields(path, data["holder"], _HOLDER_FIELDS_CHECKED, prefix="holder.")
    return data


def release_lease(run_dir: Path, holder: dict[str, Any]) -> None:
    """Remove the lease if it still names ``holder``: one taken over since (its holder was judged
    gone) is the new holder's. A lease that cannot be read or removed is left as it is."""
    with contextlib.suppress(RunFileError, OSError):
        current = read_lease(run_dir)
        if current is not None and current.get("holder") == holder:
            (Path(run_dir) / LEASE_FILE).unlink()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete half-written files (``.<name>.*.tmp*``, see :func:`mnist_hpc.io.atomic_path`) of dead writers.

    Only for a caller that holds the lease: no live writer can be writing them.
    """
    removed = []
    for directory in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if directory.is_dir():
            for path in directory.glob(".*.tmp*"):
                if path.is_dir() and not path.is_symlink():
                    continue  # no writer of ours leaves a folder: not ours to delete (nor a reason to fail)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def seed_from(run_dir: Path, origin_dir: Path) -> bool:
    """Start ``run_dir`` from ``origin_dir``'s checkpoints (a retry of an interrupted run); whether it did.

    The checkpoints come with the binding they were made under (``identity.json``), so that the new
    directory's claim checks them as any resume would. Nothing is copied when the origin has no
    checkpoints or ``run_dir`` has its own already. Before the run's claim: nothing else writes the
    new directory yet.
    """
    source = Path(origin_dir) / CHECKPOINT_DIR
    target = Path(run_dir) / CHECKPOINT_DIR
    if not source.is_dir() or os.path.lexists(target):
        return False
    shutil.copytree(source, target)
    identity = Path(origin_dir) / IDENTITY_FILE
    if identity.is_file():
        shutil.copy2(identity, Path(run_dir) / IDENTITY_FILE)
    return True


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


def _read_yaml(path: Path, max_bytes: int) -> Any:
    """The YAML value in ``path`` (:func:`mnist_hpc.io.read_yaml`).

    Raises:
        FileNotFoundError: the file is absent.
        RunFileError: the file cannot be used; the message says why.
    """
    try:
        return read_yaml(path, max_bytes)
    except UntrustedFileError as exc:
        raise RunFileError(str(exc)) from exc


def planned_epochs(run_dir: Path) -> Optional[int]:
    """``train.epochs`` of the config a run wrote at its start; None before it started.

    Raises:
        RunFileError: the file is damaged, or its ``train.epochs`` is not a whole number >= 1.
    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        cfg = _read_yaml(path, MAX_BYTES[CONFIG_FILE])
    except FileNotFoundError:
        return None
    train = check(path, "field 'train'", check(path, "its content", cfg, OBJECT).get("train"), OBJECT)
    return check(path, "field 'train.epochs'", train.get("epochs"), POSITIVE)


def hydra_overrides(run_dir: Path) -> list[str]:
    """The overrides Hydra recorded for a run (``.hydra/overrides.yaml``), or [] if none.

    Raises:
        RunFileError: the file is damaged or is not a list of strings.
    """
    path = Path(run_dir) / HYDRA_OVERRIDES
    try:
        data = _read_yaml(path, MAX_BYTES[HYDRA_OVERRIDES.name])
    except FileNotFoundError:
        return []
    return list(check(path, "its content", data, TEXTS))


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
        RunFileError: the file is damaged, or its numbers cannot be true: epochs done beyond
            those planned, a history of another length, a value out of range.
    """
    path = Path(run_dir) / PROGRESS_FILE
    data = _read_json_object(path)
    if data is None:
        return None
    check_fields(path, data, {"epochs_done": COUNT, "epochs_planned": POSITIVE, "updated": TEXT | NULL})
    done, planned = data["epochs_done"], data["epochs_planned"]
    if done > planned:
        raise RunFileError(f"{path}: epochs_done is {done}, more than epochs_planned ({planned})")
    history = _history(path, data)
    if len(history) != done:
        raise RunFileError(f"{path}: its history holds {len(history)} epoch(s) but epochs_done is {done}")
    return Progress(epochs_done=done, epochs_planned=planned, history=history, updated=data.get("updated") or "")


# --- failure.json ----------------------------------------------------------------------------


def error_line(exc: BaseException) -> str:
    """``module.Type: first line of the message`` (as a traceback's last line): what a table shows."""
    module = type(exc).__module__
    name = type(exc).__name__ if module == "builtins" else f"{module}.{type(exc).__name__}"
    return f"{name}: {exc}".splitlines()[0]


def write_failure(run_dir: Path, exc: BaseException, keep_existing: bool = False) -> bool:
    """``failure.json``: the error a status or report shows for a run that raised; whether it was written.

    ``keep_existing``: leave a ``failure.json`` that is already there (a worker that saw the chief
    vanish must not replace the chief's own account of why it failed).
    """
    record = {
        "error": error_line(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "time": utc_now(),
    }
    target = Path(run_dir) / FAILURE_FILE
    if keep_existing:
        return write_json_if_absent(target, record)
    write_json_atomic(target, record)
    return True


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
    if data is None:
        return None
    check_fields(path, data, {"error": TEXT, "traceback": TEXT | NULL, "time": TEXT | NULL})
    return data["error"]

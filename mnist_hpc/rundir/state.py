"""A run's state: its files read together (damage becomes a note), and the one derivation of its state."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mnist_hpc.rundir.files import (
    ENDED_STATES,
    FAILURE_FILE,
    HYDRA_DIR,
    IDENTITY_FILE,
    JOB_FILE,
    METRICS_FILE,
    PROGRESS_FILE,
    RunFileError,
)
from mnist_hpc.rundir.outputs import read_metrics
from mnist_hpc.rundir.records import (
    JobRecord,
    Progress,
    hydra_overrides,
    read_failure,
    read_identity,
    read_job,
    read_progress,
)

__all__ = [
    "RunFiles",
    "read_run",
    "run_state",
]

@dataclass
class RunFiles:
    """What a run's files say about it; ``notes`` name the files that could not be used."""

    run_dir: Path
    job: Optional[JobRecord] = None
    metrics: Optional[dict[str, Any]] = None
    progress: Optional[Progress] = None
    failure: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    # The config the shown results come from (identity.json's flat keys), when the directory is
    # bound and its results are this trial's: it tells apart trials whose overrides are the same
    # but whose data or defaults were not (MNIST_HPC_CACHE pointing elsewhere, another release).
    identity: Optional[dict[str, Any]] = None
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
    # What the directory holds, listed once: a file it does not hold is not opened (a queued
    # trial has its job.json alone; status reads 10,000 of them). None: it cannot be listed, so
    # every reader tries and says what is wrong.
    try:
        present: Optional[set[str]] = set(os.listdir(run_dir))
    except OSError:
        present = None
    readers = (
        ("job", JOB_FILE, read_job),
        ("metrics", METRICS_FILE, read_metrics),
        ("progress", PROGRESS_FILE, read_progress),
        ("failure", FAILURE_FILE, read_failure),
    )
    for name, file_name, reader in readers:
        if present is not None and file_name not in present:
            continue
        try:
            setattr(run, name, reader(run.run_dir))
        except RunFileError as exc:
            run.notes.append(f"{exc}; ignored")
    try:
        if run.job:
            run.overrides = list(run.job.overrides)
        elif present is None or HYDRA_DIR in present:
            run.overrides = hydra_overrides(run.run_dir)
    except RunFileError as exc:
        run.notes.append(f"{exc}; ignored")
    _keep_only_bound_results(run, present)
    return run


def _keep_only_bound_results(run: RunFiles, present: Optional[set[str]] = None) -> None:
    """Show a directory's results as a job's only when the directory is bound to that job's config.

    ``identity.json`` says which config the directory's results come from; ``job.json`` (written
    at submission) and ``metrics.json`` (written by the run) name the config they were made for by
    the same fingerprint. Where one of them names another config, the results are not this
    trial's: they are dropped with a note, never shown beside the wrong overrides.
    """
    try:
        identity = read_identity(run.run_dir) if present is None or IDENTITY_FILE in present else None
    except RunFileError as exc:
        if run.metrics is not None or run.progress is not None:
            run.notes.append(f"{exc}; its results are not shown, since it cannot be told which config made them")
            run.metrics = run.progress = None
        return
    if run.metrics is not None and run.progress is not None and len(run.metrics["history"]) > run.progress.epochs_planned:
        run.notes.append(
            f"{run.run_dir / METRICS_FILE} holds {len(run.metrics['history'])} epochs, more than the "
            f"{run.progress.epochs_planned} its progress.json planned; ignored"
        )
        run.metrics = None
    bound = identity.get("fingerprint") if identity else None
    if bound is None:
        return
    job_fp = run.job.fingerprint if run.job else None
    metrics_fp = run.metrics.get("fingerprint") if run.metrics else None
    if job_fp is not None and job_fp != bound:
        run.notes.append(
            f"{run.run_dir / JOB_FILE} was queued for another config (fingerprint {job_fp}) than the one whose results "
            f"this directory holds ({bound}, {IDENTITY_FILE}); its results are not shown as this trial's"
        )
        run.metrics = run.progress = None
        return
    if metrics_fp is not None and metrics_fp != bound:
        run.notes.append(
            f"{run.run_dir / METRICS_FILE} comes from another config (fingerprint {metrics_fp}) than the one this "
            f"directory is bound to ({bound}, {IDENTITY_FILE}); ignored"
        )
        run.metrics = None
    run.identity = dict(identity["config"])


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

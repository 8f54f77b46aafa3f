"""How a sweep's trials run on the compute node: the runners of the contract's trial tasks.

The launcher (login node) queues :class:`~mnist_hpc.contract.tasks.TrainTrial` and
:class:`~mnist_hpc.contract.tasks.PackedTrials` tasks; their job's
:class:`~mnist_hpc.contract.entry.JobEntry` runs them with :func:`run_trial` and :func:`run_packed`.
A job never carries a model: its state is on disk in its run directory, so a requeued job is the
same task again and resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import DictConfig, open_dict

from mnist_hpc import claim, rundir, slurm
from mnist_hpc.compute.failures import (NotRequeued, PackedTrialsFailed, RequeueLimitReached, one_line_errors, record_failure,
                                        unwrap)
from mnist_hpc.config import ConfigError
from mnist_hpc.io import utc_now
from mnist_hpc.contract.guard import UnsafeJobFile, named_paths
from mnist_hpc.contract.jobconfig import check_rebuilt, job_config
from mnist_hpc.contract.tasks import PackedTrials, TrainTrial

if TYPE_CHECKING:  # pragma: no cover
    from mnist_hpc.compute.signals import TrainingInterrupted

log = logging.getLogger(__name__)


def run_trial(task: TrainTrial) -> Any:
    """A job's one trial: known errors end the job in one line (exit 1), bugs keep their traceback."""
    with one_line_errors():
        return TrainJob(task)()


def run_packed(task: PackedTrials) -> list[Any]:
    """A job's packed trials, one after another in this process (see :class:`PackedTrainJob`)."""
    with one_line_errors():
        return PackedTrainJob([TrainJob(trial) for trial in task.trials])()


class TrainJob:
    """One trial of a sweep in its fixed run directory, run through Hydra's ``run_job``.

    On Slurm's USR2 warning before the time limit, or on preemption, training stops at a step
    boundary with its checkpoint, and submitit requeues the job (its
    :class:`~mnist_hpc.contract.entry.JobEntry` is the resubmission): the same task, which resumes
    from the newest checkpoint in its run directory. No model is ever pickled.

    Hydra's ``run_job`` records a task's exception in the returned ``JobReturn`` instead of
    raising it, so a launcher that just returns it leaves a failed job COMPLETED in Slurm.
    This re-raises (after writing ``failure.json`` into the run directory), so the job exits
    non-zero and ends FAILED (one line for a known error, the traceback for a bug).
    """

    def __init__(self, task: TrainTrial) -> None:
        self.task = task
        self.context = task.context
        self.spec = task.spec
        self.run_dir = Path(task.run_dir)
        self.packed_slot = task.packed_slot

    def config(self) -> DictConfig:
        """The job's config, rebuilt from the launch's base and checked against what the login node checked.

        Raises:
            ConfigMismatch: it resolves to other values here (see :func:`~mnist_hpc.contract.jobconfig.check_rebuilt`).
        """
        from hydra.core.singleton import Singleton
        from hydra.core.utils import setup_globals

        _, _, singleton_state = self.context.load()
        setup_globals()  # the resolvers (now, hydra) its interpolations may use
        Singleton.set_state(singleton_state)
        base = self.context.bases()[self.spec.base]
        config = job_config(base.config, self.spec.values, self.spec.overrides, self.spec.num)
        check_rebuilt(config, base, self.spec)
        return config

    def __call__(self) -> Any:
        from hydra.core.utils import JobStatus, run_job
        from submitit.core.utils import UncompletedJobError

        from mnist_hpc.compute.cluster import quiet_worker_config
        from mnist_hpc.compute.distribute import writes_failure
        from mnist_hpc.compute.runtime import RuntimeInfo
        from mnist_hpc.compute.signals import StopRequest, TrainingInterrupted, hand_over

        runtime = RuntimeInfo.from_env()
        self.ensure_recorded()
        try:
            hydra_context, task_function, _ = self.context.load()
            config = self.config()
        except (OSError, pickle.UnpicklingError, ConfigError) as exc:
            if writes_failure(exc, runtime):
                record_failure(self.run_dir, exc, keep_existing=runtime.is_worker_task)
            raise
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        with open_dict(config.hydra):
            if job_id:
                config.hydra.job.id = job_id
            # The directory the login node checked, whatever hydra.sweep.subdir would resolve to here
            # (a ${now:...} in it resolves anew).
            config.hydra.sweep.subdir = str(self.run_dir.relative_to(Path(str(config.hydra.sweep.dir)).resolve()))
        problems = rundir.layout_problems(self.run_dir)
        if problems:  # before Hydra writes its config there
            raise claim.RunConflict(f"{'; '.join(problems)}, then run again")
        if runtime.is_worker_task:
            quiet_worker_config(config)
        # submitit's USR2 handler (checkpoint, requeue, count timeouts): our request replaces it
        # for the whole job, training stops at a step boundary first; see hand_over.
        submitit_handler = StopRequest.handler_before(signal.SIGUSR2)
        with StopRequest(ignore_after=True):
            ret = run_job(
                hydra_context=hydra_context,
                task_function=task_function,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        if ret.status == JobStatus.FAILED:
            error = unwrap(ret._return_value)
            if isinstance(error, TrainingInterrupted):
                log.warning("%s", error)
                stop = error
                error = hand_over(error.signum, submitit_handler, chief=not runtime.is_worker_task)
                if isinstance(error, NotRequeued):
                    error = self.not_requeued(stop, error)
            if isinstance(error, UncompletedJobError):  # time is up and no requeue is left
                error = RequeueLimitReached(
                    f"{error} The job reached its time limit with no requeue left "
                    "(hydra.launcher.max_num_timeout); training stopped at its last checkpoint in "
                    f"{self.run_dir / rundir.CHECKPOINT_DIR}. To continue, submit the same overrides again with "
                    f"hydra.sweep.dir={self.run_dir.parent} (each trial resumes from its checkpoint), or raise "
                    "hydra.launcher.timeout_min or hydra.launcher.max_num_timeout."
                )
            if writes_failure(error, runtime):
                record_failure(self.run_dir, error, keep_existing=runtime.is_worker_task)
            raise error
        return ret

    def not_requeued(self, stop: "TrainingInterrupted", error: NotRequeued) -> NotRequeued:
        """The one line a trial ends with when its job stopped at a checkpoint and no requeue was possible."""
        kept = (f"its checkpoint {stop.checkpoint} is kept" if stop.checkpoint is not None
                else f"it had no checkpoint yet in {self.run_dir / rundir.CHECKPOINT_DIR}")
        return NotRequeued(
            f"{error}. Training stopped on Slurm's warning and {kept}. To continue, submit the same overrides again "
            f"with hydra.sweep.dir={self.run_dir.parent} (the trial resumes from its checkpoint)"
        )

    def ensure_recorded(self) -> None:
        """Write ``job.json`` if the submission could not: status and the preflight find this job then.

        The launcher writes every trial's ``job.json`` right after queueing; a launcher killed
        in between leaves a queued job that no ``job.json`` names. The job writes its own when
        the file is missing or damaged, or names an earlier Slurm job that has ended; a record
        of another job that may still run is left alone (that job's lease keeps the two apart).
        """
        import submitit

        try:
            env = submitit.JobEnvironment()
        except RuntimeError:
            return  # not run by submitit (called directly)
        if env.global_rank != 0:
            return
        try:
            record = rundir.read_job(self.run_dir)
        except rundir.RunFileError:
            record = None
        if record is not None and record.job_id == env.job_id:
            return
        if record is not None and not (record.cluster == env.cluster == "slurm" and slurm.job_alive(record.job_id) is False):
            return
        log.warning("%s: no job.json names this job (%s); writing it", self.run_dir, env.job_id)
        rundir.write_job(self.run_dir, rundir.JobRecord.of(
            env.cluster, env.job_id, named_paths(env), self.run_dir, self.spec.overrides, self.spec.num, self.packed_slot,
            submitted=utc_now(), tasks=env.num_tasks))

    def finished(self) -> bool:
        """Whether the trial is done: its directory holds this very config's final metrics for the
        epochs it asks for, as :func:`mnist_hpc.claim.judge` decides for the launcher and the training.

        A requeued packed task skips such a trial. Anything else (no metrics, fewer epochs, another
        config, a damaged file) is run, and the training's own claim continues it or refuses it.
        """
        from mnist_hpc.cache import CacheError, read_manifest
        from mnist_hpc.cache import cache_file
        from mnist_hpc.config import to_typed

        try:
            typed = to_typed(self.config())
            data_sha256 = read_manifest(cache_file(typed.data))[0]["sha256"]
            verdict = claim.judge(self.run_dir, claim.identity_of(typed, data_sha256), typed.train.epochs, "")
        except (claim.RunConflict, CacheError, rundir.RunFileError, OSError, pickle.UnpicklingError, ConfigError):
            return False  # running it records why it cannot run
        return verdict.action == "done"

class PackedTrainJob:
    """Several trials of a sweep in one Slurm task, one after the other in one process.

    Each trial pays for TensorFlow's import once per task instead of once per trial, and keeps
    its own run directory, outputs and checkpoints. A failing trial does not stop the others;
    the task ends FAILED if any trial failed. On requeue, finished trials are skipped and an
    interrupted one resumes from its checkpoint.
    """

    def __init__(self, jobs: Sequence[TrainJob]) -> None:
        self.jobs = list(jobs)

    def __call__(self) -> list[Any]:
        from mnist_hpc.compute.signals import StopRequest

        # One request for the whole task: a warning between two trials stops the next one at
        # its first step boundary (and requeues), instead of being lost or killing the task.
        with StopRequest(ignore_after=True):
            return self._run_all()

    def _run_all(self) -> list[Any]:
        results: list[Any] = []
        failed: list[str] = []
        # Every trial of the task at once: status and a resubmission see the later ones as queued
        # even when the submission died before their job.json (not only when each starts).
        for job in self.jobs:
            job.ensure_recorded()
        for job in self.jobs:
            if job.finished():
                log.info("trial %s already finished; skipping", job.run_dir.name)
                results.append(None)
                continue
            try:
                results.append(job())
            except (RequeueLimitReached, NotRequeued):
                raise  # the task's time is up: the trials after this one cannot run either
            except UnsafeJobFile:
                raise  # their launch pickle is refused: the trials after this one share it
            except Exception as exc:  # isolate: record, go on with the next trial
                log.exception("trial %s failed", job.run_dir.name)
                failed.append(f"{job.run_dir.name}: {type(exc).__name__}: {exc}")
                results.append(exc)
            finally:
                _reset_keras_state()
        if failed:
            raise PackedTrialsFailed(f"{len(failed)} of {len(self.jobs)} trials failed: " + "; ".join(failed))
        return results


def _reset_keras_state() -> None:
    """Free the previous trial's graphs and layer-name counters (only if Keras is loaded)."""
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()

"""What a submitted job is on the compute node: the callables submitit unpickles and runs.

The login-node launcher (:mod:`mnist_hpc.login.launcher`) builds these objects, pickles them
with submitit and queues them; nothing else here runs on the login node except
:meth:`LaunchContext.save`. A job never carries a model: its state is on disk in its run
directory, so a requeued job is the same object again and resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, open_dict

from mnist_hpc import claim, rundir, slurm
from mnist_hpc.compute.failures import record_failure, unwrap
from mnist_hpc.compute.guard import UnsafeJobFile, load_private, private_umask
from mnist_hpc.compute.jobconfig import BaseConfig, JobSpec, check_rebuilt, job_config
from mnist_hpc.config import ConfigError
from mnist_hpc.io import write_bytes_atomic

log = logging.getLogger(__name__)


class RequeueLimitReached(RuntimeError):
    """Slurm's time-limit warning came after the job had used all its requeues."""


class PackedTrialsFailed(RuntimeError):
    """Some trials of a packed task failed (each has its own failure.json); the others finished."""


class LaunchContext:
    """What every job of one launch shares: Hydra's context, the task function, Hydra's singletons,
    and the composed configs the jobs' values apply to (:class:`~mnist_hpc.compute.jobconfig.BaseConfig`).

    Written once per launch into the submitit folder (``launch-<id>.pkl``); each job's pickle
    carries only this file's path and its :class:`~mnist_hpc.compute.jobconfig.JobSpec`, a few
    hundred bytes. On the compute node it is read once per process, on first use.
    """

    def __init__(
        self,
        path: Path,
        hydra_context: Any = None,
        task_function: Any = None,
        singleton_state: Any = None,
        bases: Sequence[BaseConfig] = (),
    ) -> None:
        self.path = Path(path)
        self._content: Optional[tuple[Any, Any, Any, list[BaseConfig]]] = (
            (hydra_context, task_function, singleton_state, list(bases)) if hydra_context is not None else None
        )

    def save(self) -> "LaunchContext":
        """Write the context (login node, once per launch)."""
        import cloudpickle  # submitit's own pickler: the task function may be a local function

        assert self._content is not None, "nothing to save"
        with private_umask():  # 0600 in a 0700 folder whatever the umask: the jobs refuse anything else
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path, cloudpickle.dumps(self._content))
        return self

    def load(self) -> tuple[Any, Any, Any]:
        """``(hydra_context, task_function, singleton_state)``."""
        return self._loaded()[:3]

    def bases(self) -> list[BaseConfig]:
        """The launch's composed configs, which its jobs' :class:`~mnist_hpc.compute.jobconfig.JobSpec` name."""
        return self._loaded()[3]

    def _loaded(self) -> tuple[Any, Any, Any, list[BaseConfig]]:
        """Raises :class:`~mnist_hpc.compute.guard.UnsafeJobFile` (nothing unpickled) when the file
        or its folder could have been written by someone else."""
        if self._content is None:
            try:
                self._content = load_private(self.path, self.path.parent)
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"this job's launch context {self.path} is gone (was the sweep's .submitit folder "
                    "deleted?); submit the job again"
                ) from exc
        return self._content

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._content = None


class TrainJob:
    """The callable submitted to the cluster: runs one Hydra job in its fixed run directory.

    It is checkpointable in submitit's sense: on Slurm's USR2 warning before the time limit,
    or on preemption, submitit calls :meth:`checkpoint` and requeues the job with what it
    returns. The training state itself is on disk (``<run dir>/checkpoints``, written every
    epoch), so the resubmission is simply this same job: same config, same run directory,
    and training resumes from the newest checkpoint. No model is ever pickled.

    Hydra's ``run_job`` records a task's exception in the returned ``JobReturn`` instead of
    raising it, so a launcher that just returns it leaves a failed job COMPLETED in Slurm.
    This re-raises (after writing ``failure.json`` into the run directory), so the job exits
    non-zero and ends FAILED (see :mod:`mnist_hpc.compute.entry`: one line for a known error, the
    traceback for a bug).
    """

    def __init__(self, context: LaunchContext, spec: JobSpec, run_dir: Path, packed_slot: Optional[int] = None) -> None:
        self.context = context
        self.spec = spec
        self.run_dir = Path(run_dir)
        # Its place in a packed task (hydra.launcher.trials_per_task > 1), as job.json records it.
        self.packed_slot = packed_slot

    def config(self) -> DictConfig:
        """The job's config, rebuilt from the launch's base and checked against what the login node checked.

        Raises:
            ConfigMismatch: it resolves to other values here (see :func:`~mnist_hpc.compute.jobconfig.check_rebuilt`).
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
        if job_id:
            with open_dict(config.hydra.job):
                config.hydra.job.id = job_id
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
                error = hand_over(error.signum, submitit_handler, chief=not runtime.is_worker_task)
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
            env.cluster, env.job_id, env.paths, self.run_dir, self.spec.overrides, self.spec.num, self.packed_slot,
            tasks=env.num_tasks))

    def finished(self) -> bool:
        """Whether the trial is done: its directory holds this very config's final metrics for the
        epochs it asks for, as :func:`mnist_hpc.claim.judge` decides for the launcher and the training.

        A requeued packed task skips such a trial. Anything else (no metrics, fewer epochs, another
        config, a damaged file) is run, and the training's own claim continues it or refuses it.
        """
        from mnist_hpc.cache import CacheError, read_manifest
        from mnist_hpc.config import cache_file, to_typed

        try:
            typed = to_typed(self.config())
            data_sha256 = read_manifest(cache_file(typed.data))[0]["sha256"]
            verdict = claim.judge(self.run_dir, claim.identity_of(typed, data_sha256), typed.train.epochs, "")
        except (claim.RunConflict, CacheError, rundir.RunFileError, OSError, pickle.UnpicklingError, ConfigError):
            return False  # running it records why it cannot run
        return verdict.action == "done"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The resubmission after a timeout or preemption: this job again, resuming from disk."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


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
            except RequeueLimitReached:
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

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _reset_keras_state() -> None:
    """Free the previous trial's graphs and layer-name counters (only if Keras is loaded)."""
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()

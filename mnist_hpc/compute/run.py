"""The compute entry: what a training process runs, started by a job or by hand.

:func:`train_task` is the Hydra task function of ``mnist-hpc-train`` (the command line hands it
to Hydra; a launcher's job and a search worker call it through Hydra's ``run_job``): it checks
the config, trains in Hydra's output directory and returns the objective. A run started outside
the launcher (Hydra's run mode: a shell, srun, a plain sbatch script) acts on Slurm's warning
signals itself (:func:`train_in_process`, :func:`finish_in_process`); a launcher's job leaves that
to its runner (:mod:`mnist_hpc.compute.job`). TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence

from mnist_hpc.compute.signals import StopRequest, TrainingInterrupted, requeue_job, worker_exit

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

    from mnist_hpc.config import Config

log = logging.getLogger(__name__)


def train_task(cfg: "DictConfig", callbacks: Sequence[Any] = ()) -> float:
    """One Hydra job: check the config, train in Hydra's output dir, return the objective.

    ``callbacks``: extra Keras callbacks (a search worker passes its pruning callback). A known
    error (see :mod:`mnist_hpc.compute.failures`) becomes one line, no traceback.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mnist_hpc.compute.failures import RunError, known_error
    from mnist_hpc.config import to_typed
    from mnist_hpc.rundir import objective

    typed = to_typed(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if hydra_cfg.mode == RunMode.RUN:
            return objective(train_in_process(typed, run_dir, callbacks=callbacks))
        from mnist_hpc.compute.train import train_and_evaluate

        return objective(train_and_evaluate(typed, run_dir, callbacks=callbacks))
    except Exception as exc:
        message = known_error(exc)
        if message is None:
            raise
        raise RunError(message) from exc  # a submitted job records the cause (mnist_hpc.compute.job)


def worker_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides a task other than the first of a multi-task srun step adds: it writes nothing
    into the run directory (no Hydra output, its log on stdout). None for a multirun or the first task."""
    from mnist_hpc.compute.cluster import WORKER_HYDRA_OVERRIDES
    from mnist_hpc.compute.runtime import RuntimeInfo

    if RuntimeInfo.from_env().is_worker_task and not {"-m", "--multirun"} & set(argv):
        return list(WORKER_HYDRA_OVERRIDES)
    return []


def train_in_process(cfg: "Config", run_dir: Path, callbacks: Sequence[Any] = ()) -> dict[str, float]:
    """:func:`~mnist_hpc.compute.train.train_and_evaluate` for a run started outside the launcher.

    A stop at a step boundary ends as :func:`finish_in_process` says; a failure caused by
    another worker is recorded in ``failure.json`` (a launcher job records its failures itself).
    """
    from mnist_hpc.compute.distribute import WorkerFailure, writes_failure
    from mnist_hpc.compute.failures import record_failure
    from mnist_hpc.compute.runtime import RuntimeInfo
    from mnist_hpc.compute.train import train_and_evaluate

    runtime = RuntimeInfo.from_env()
    try:
        with StopRequest(ignore_after=True):
            return train_and_evaluate(cfg, run_dir, runtime, callbacks=callbacks)
    except TrainingInterrupted as stop:
        finish_in_process(stop, Path(run_dir), runtime.slurm_job_id, chief=not runtime.is_worker_task)
    except WorkerFailure as exc:
        if writes_failure(exc, runtime):
            record_failure(Path(run_dir), exc, keep_existing=runtime.is_worker_task)
        raise


def finish_in_process(stop: TrainingInterrupted, run_dir: Path, job_id: Optional[str], chief: bool) -> NoReturn:
    """End a run started outside the launcher after it stopped at a checkpoint.

    On USR2 under Slurm the chief requeues the job (Slurm then ends this attempt and starts
    the batch script again, which resumes in the same run directory); otherwise, or when
    Slurm refuses, the process exits with ``128 + signal`` and says how to resume.
    """
    not_requeued = ""
    if chief and stop.requeue and job_id:
        refused = requeue_job(job_id)
        if refused is None:
            log.warning("%s; requeued Slurm job %s, which resumes in %s", stop, job_id, run_dir)
            sys.exit(stop.exit_code)
        not_requeued = f"; Slurm job {job_id} was not requeued: {refused}"
    if not chief:
        worker_exit(stop.signum)
    log.error(
        "%s%s; not finished. To resume, run the same command again with hydra.run.dir=%s "
        "(sbatch scripts: keep #SBATCH --requeue so that Slurm can requeue it)",
        stop,
        not_requeued,
        run_dir,
    )
    sys.exit(stop.exit_code)

"""Submission from the login node: plan, check, queue one array, record, and return at once.

``mnist-hpc-train -m hydra/launcher=slurm [overrides]`` composes every job's config, checks it,
checks the data cache and the output root, and only then queues the jobs: one Slurm job array
for the whole sweep. It prints the job ids, directories and log paths and returns at once
(``hydra.launcher.wait=true`` blocks until the jobs end, for sweepers that need results).

Hydra only instantiates launchers that live in the ``hydra_plugins`` package, so the concrete
classes are thin subclasses in ``hydra_plugins/mnist_hpc_launcher``; the logic is here.
Imported during Hydra's plugin discovery: light (submitit is imported when jobs are queued).
What the jobs run on the compute node is :mod:`mnist_hpc.compute.job`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException

from mnist_hpc import rundir
from mnist_hpc.compute.job import LaunchContext, PackedTrainJob, TrainJob
from mnist_hpc.io import utc_now
from mnist_hpc.login.launcher.compose import PlannedJob, plan_jobs
from mnist_hpc.login.launcher.options import executor_init, submitit_parameters
from mnist_hpc.login.launcher.preflight import preflight

log = logging.getLogger(__name__)


class SubmissionError(CompactHydraException):
    """The scheduler refused the submission (e.g. sbatch rejected a partition); nothing was queued."""


def folder_root(submitit_folder: str) -> Path:
    """The fixed part of a submitit folder template (``<sweep>/.submitit/%j`` -> ``<sweep>/.submitit``)."""
    fixed = itertools.takewhile(lambda part: "%" not in part, Path(submitit_folder).parts)
    return Path(*fixed)


def launch_jobs(launcher: Any, cluster: str, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Plan, check, queue (one array), record and report; optionally wait."""
    import submitit
    from hydra.core.singleton import Singleton

    conf = launcher.params
    planned = plan_jobs(launcher, job_overrides, initial_job_idx)
    preflight(planned)
    sweep_dir = Path(str(planned[0].config.hydra.sweep.dir))
    folder = str(conf.submitit_folder).replace("${hydra.sweep.dir}", str(sweep_dir))
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **executor_init(conf, cluster))
    executor.update_parameters(**submitit_parameters(conf, cluster))

    context = LaunchContext(
        folder_root(folder) / f"launch-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}-{initial_job_idx}.pkl",
        launcher.hydra_context,
        launcher.task_function,
        Singleton.get_state(),
    )
    train_jobs = [TrainJob(context, j.config, j.run_dir) for j in planned]
    per_task = max(1, int(conf.get("trials_per_task", 1)))
    # Trials packed per Slurm task share one process (one TensorFlow import, one data load).
    groups = [list(range(i, min(i + per_task, len(planned)))) for i in range(0, len(planned), per_task)]
    submitted = time.time()
    composer = getattr(launcher, "composer", None)
    root = folder_root(folder)
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        # The context holds Hydra's config loader: pickle it with the loader's own methods.
        with composer.detached() if composer else contextlib.nullcontext():
            context.save()
            with executor.batch():
                futures = [
                    executor.submit(train_jobs[g[0]] if len(g) == 1 else PackedTrainJob([train_jobs[i] for i in g]))
                    for g in groups
                ]
    except BaseException as exc:
        from submitit.core.utils import FailedJobError

        # Nothing was queued: take out what this launch wrote (our context, submitit's pickles).
        for leftover in (set(root.iterdir()) if root.is_dir() else set()) - before:
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
        if isinstance(exc, FailedJobError):  # the scheduler refused the submission
            raise SubmissionError(
                f"nothing was queued: {cluster} refused the {len(groups)} task(s): {str(exc).strip()}\n"
                "Check the hydra.launcher settings it names (partition, account, qos, mem_gb, "
                "timeout_min, additional_parameters) against your site's limits (`sinfo`, `sacctmgr show assoc`)."
            ) from exc
        raise
    tasks = list(futures)
    task_of = {i: (tasks[k], slot) for k, g in enumerate(groups) for slot, i in enumerate(g)}
    for i, job in enumerate(planned):
        sjob, slot = task_of[i]
        record_submission(job, sjob, cluster, packed_slot=slot if per_task > 1 else None)
    print(summary(sweep_dir, planned, [task_of[i][0] for i in range(len(planned))], cluster), flush=True)

    if not conf.wait:
        return [
            QueuedReturn(overrides=job.overrides, status=JobStatus.UNKNOWN, _return_value=QueuedJob(str(task_of[i][0].job_id), str(job.run_dir)))
            for i, job in enumerate(planned)
        ]
    for sjob in tasks:
        try:
            sjob.result()
        except Exception:  # reported per trial below, from what each trial left on disk
            pass
    log.info("all %d tasks ended after %.0f s", len(tasks), time.time() - submitted)
    return [trial_return(job) for job in planned]


def trial_return(job: PlannedJob) -> Any:
    """A finished trial's JobReturn, from its run directory: COMPLETED with its objective, or FAILED."""
    run = rundir.read_run(job.run_dir)
    if run.metrics is not None:
        ret = JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED)
        ret._return_value = rundir.objective(run.metrics)
        return ret
    reason = run.failure or "; ".join(run.notes) or f"ended without {rundir.METRICS_FILE} (killed or timed out?)"
    ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
    ret._return_value = RuntimeError(f"trial {job.num} failed: {reason}")
    return ret


@dataclass(frozen=True)
class QueuedJob:
    """What a non-blocking launch knows of a job: where it is, not how it ends."""

    job_id: str
    run_dir: str


class QueuedReturn(JobReturn):
    """The JobReturn of a job still queued: status UNKNOWN, its value a :class:`QueuedJob`.

    Hydra's basic sweeper reads ``return_value`` of every job right after ``launch``; the stock
    property asserts on UNKNOWN. This answers with what is known instead of pretending the
    job already COMPLETED.
    """

    @property  # type: ignore[override]
    def return_value(self) -> Any:
        return self._return_value


def record_submission(job: PlannedJob, sjob: Any, cluster: str, packed_slot: Optional[int] = None) -> None:
    """Write ``job.json`` into the run directory: ids and log paths, for status and report."""
    job_id = str(sjob.job_id)
    array_job_id, _, array_task = job_id.partition("_")
    rundir.write_job(
        job.run_dir,
        rundir.JobRecord(
            cluster=cluster,
            job_id=job_id,
            run_dir=str(job.run_dir),
            overrides=list(job.overrides),
            trial=job.num,
            array_job_id=array_job_id if array_task else None,
            array_task_id=int(array_task) if array_task else None,
            packed_slot=packed_slot,
            stdout=str(sjob.paths.stdout),
            stderr=str(sjob.paths.stderr),
            submitit_folder=str(sjob.paths.folder),
            submitted=utc_now(),
        ),
    )


def summary(sweep_dir: Path, planned: Sequence[PlannedJob], jobs: Sequence[Any], cluster: str) -> str:
    ids = sorted({str(j.job_id).partition("_")[0] for j in jobs})
    lines = [f"queued {len(jobs)} job(s) on {cluster}: {', '.join(ids)}", f"sweep dir: {sweep_dir}"]
    for job, sjob in zip(planned, jobs):
        lines.append(f"  [{job.num}] job {sjob.job_id}  {' '.join(job.overrides) or '(defaults)'}")
        lines.append(f"      run dir: {job.run_dir}")
        lines.append(f"      logs:    {sjob.paths.stdout}")
        lines.append(f"               {sjob.paths.stderr}")
    lines.append(f"check on them with: mnist-hpc-status {sweep_dir}")
    return "\n".join(lines)

"""Submission from the login node: plan, check, queue one array, record, and return at once.

``mnist-hpc-train -m hydra/launcher=slurm [overrides]`` composes every job's config, checks it,
checks the data cache and the output root, and only then queues the jobs: one Slurm job array
for the whole sweep. It prints the job ids, directories and log paths and returns at once
(``hydra.launcher.wait=true`` blocks until the jobs end, for sweepers that need results).

Hydra only instantiates launchers that live in the ``hydra_plugins`` package, so the concrete
classes are thin subclasses in ``hydra_plugins/mnist_hpc_launcher``; the logic is here.
Imported during Hydra's plugin discovery: light (submitit is imported when jobs are queued).
What the jobs run is a task of :mod:`mnist_hpc.contract.tasks`, run by its compute-node runner.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException

from mnist_hpc import claim, rundir, slurm
from mnist_hpc.contract.entry import JobEntry, environment_versions
from mnist_hpc.contract.guard import UnsafeJobFile, private_folder, private_submission, private_umask
from mnist_hpc.contract.tasks import LaunchContext, PackedTrials, ReportTask, TrainTrial
from mnist_hpc.io import utc_now, write_bytes_atomic
from mnist_hpc.login.launcher.compose import SweepComposer, plan_jobs
from mnist_hpc.login.launcher.options import SlurmQueueConf, executor_init, submitit_parameters, tasks_per_job, uses_srun
from mnist_hpc.login.launcher.packing import choose, pack
from mnist_hpc.login.launcher.plan import MAX_NAMED, PlannedJob, PreflightError
from mnist_hpc.login.launcher.preflight import check_launcher, check_tasks, preflight
from mnist_hpc.login.launcher.site import check_site

log = logging.getLogger(__name__)


class SubmissionError(CompactHydraException):
    """The submission did not go through whole: the scheduler refused it (e.g. sbatch rejected a
    partition; nothing was queued), or the queued jobs' ``job.json`` could not be written (the
    message names the jobs, which record themselves when they start)."""


def folder_root(submitit_folder: str) -> Path:
    """The fixed part of a submitit folder template (``<sweep>/.submitit/%A`` -> ``<sweep>/.submitit``)."""
    fixed = itertools.takewhile(lambda part: "%" not in part, Path(submitit_folder).parts)
    return Path(*fixed)


def make_private(root: Path) -> None:
    """The submitit folder made the user's alone before anything is queued into it (its jobs
    refuse anything else); refused before any change when it is another user's or a link."""
    try:
        notice = private_folder(root)
    except UnsafeJobFile as exc:
        raise PreflightError(f"nothing was queued: {exc}") from exc
    except OSError as exc:
        raise PreflightError(
            f"nothing was queued: cannot make the submitit folder {root} ({exc.strerror or exc}); set "
            "hydra.launcher.submitit_folder to a place of yours"
        ) from exc
    if notice:
        print(notice, flush=True)


def array_chunks(groups: list[list[PlannedJob]], cluster: str) -> list[list[list[PlannedJob]]]:
    """Tasks split into arrays no larger than the cluster's MaxArraySize (one array when they fit)."""
    limit = slurm.max_array_size() if cluster == "slurm" else None
    size = limit if limit else max(1, len(groups))
    return [groups[i : i + size] for i in range(0, len(groups), size)]


def launch_jobs(launcher: Any, cluster: str, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Plan, check, queue (one array, or one per MaxArraySize tasks), record and report; optionally wait."""
    import submitit
    from hydra.core.singleton import Singleton

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).resolve()
    # hydra.launcher, typed once by the launcher's setup (options.typed).
    conf = launcher.options
    composer = getattr(launcher, "composer", None) or SweepComposer(launcher.hydra_context.config_loader, launcher.config)
    planned = plan_jobs(composer, sweep_dir, job_overrides, initial_job_idx)
    folder = conf.submitit_folder
    # One launch at a time into a sweep directory: the checks below and the job.json files written
    # after queueing see every earlier launch's jobs (two racing launches would both pass the checks).
    with claim.launch_lock(sweep_dir):
        try:
            check_launcher(conf, cluster)
            check_tasks(conf, cluster, planned)
            preflight(sweep_dir, planned)
            todo = [job for job in planned if job.verdict is None or job.verdict.action != "done"]
            # Under umask 077: submitit's local executor makes its folder as it is created, and the
            # folder must be the user's alone from the start (make_private would only take write off).
            with private_umask():
                executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **executor_init(conf, cluster))
            executor.update_parameters(**submitit_parameters(conf, cluster))
            # The trials share one request: checked against the site once, whatever their number.
            site = check_site(executor, conf) if todo and isinstance(conf, SlurmQueueConf) and cluster == "slurm" else None
            make_private(folder_root(folder))
        except PreflightError:
            record = getattr(launcher, "sweep_record", None)
            if record is not None:
                record.restore()  # Hydra's sweeper rewrote multirun.yaml before this refusal
            raise
        if not todo:
            print(summary(sweep_dir, planned, {}, cluster), flush=True)
            return [trial_return(job) for job in planned]

        context = LaunchContext(
            folder_root(folder) / f"launch-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}-{initial_job_idx}.pkl",
            launcher.hydra_context,
            launcher.task_function,
            Singleton.get_state(),
            composer.bases(sweep_dir),
        )
        # Trials packed per Slurm task share one process (one TensorFlow import, one data load).
        packing = choose(todo, conf, cluster, site.qos if site else None)
        per_task = packing.per_task
        groups = pack(todo, per_task)
        versions = environment_versions()
        submitted = time.time()
        root = folder_root(folder)
        before = set(root.iterdir()) if root.is_dir() else set()
        futures: list[Any] = []
        report = None
        reporting = False  # the trials are in: the report job is being queued
        try:
            # What the jobs unpickle is written 0600 (see mnist_hpc.contract.guard).
            with private_submission():
                context.save()
                for chunk in array_chunks(groups, cluster):
                    with executor.batch():
                        array = [executor.submit(entry(context, group, versions, per_task > 1)) for group in chunk]
                    futures += array  # queued: only now may its jobs be looked at
            if isinstance(conf, SlurmQueueConf) and conf.report_after and cluster == "slurm":
                # Part of the same all-or-nothing submission: refused, it takes the trials back too.
                reporting = True
                report = queue_report(executor, conf, sweep_dir, futures)
        except BaseException as exc:
            from submitit.core.utils import FailedJobError

            for sjob in futures:  # an earlier array went in: take it back, so that nothing half-queued stays
                sjob.cancel(check=False)
            # Nothing was queued: take out what this launch wrote (our context, submitit's pickles).
            for leftover in (set(root.iterdir()) if root.is_dir() else set()) - before:
                shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
            if isinstance(exc, FailedJobError):  # the scheduler refused the submission
                what = (f"the report job (hydra.launcher.report_after) of the {len(groups)} task(s), which were taken back"
                        if reporting else f"the {len(groups)} task(s)")
                raise SubmissionError(
                    f"nothing was queued: {cluster} refused {what}: {str(exc).strip()}\n"
                    "Check the hydra.launcher settings it names (partition, account, qos, mem_gb, "
                    "timeout_min, additional_parameters) against your site's limits (`sinfo`, `sacctmgr show assoc`)."
                ) from exc
            raise
        task_of: dict[int, tuple[Any, Optional[int]]] = {}
        for sjob, group in zip(futures, groups):
            for slot, job in enumerate(group):
                task_of[job.num] = (sjob, slot if per_task > 1 else None)
        # Only now, with the jobs queued, may a job.json name them; one flush for all of them.
        now = utc_now()
        tasks = tasks_per_job(conf)
        records = {}
        for job in todo:
            sjob, slot = task_of[job.num]
            records[job.num] = rundir.JobRecord.of(
                cluster, str(sjob.job_id), sjob.paths, job.run_dir, job.overrides, job.num, slot, now, tasks, job.fingerprint,
                **local_process(sjob, cluster))
        try:
            rundir.write_jobs(list(records.values()))
        except OSError as exc:  # queued all the same: each job writes its own job.json when it starts
            raise SubmissionError(
                f"queued {len(futures)} task(s) ({', '.join(sorted({r.array_job_id or r.job_id for r in records.values()}))}), "
                f"but their job.json files could not be written ({exc}); each job writes its own when it starts, so "
                f"mnist-hpc-status {sweep_dir} shows the trials from then on. Free space or fix permissions there."
            ) from exc
    print(summary(sweep_dir, planned, records, cluster), flush=True)
    for line in site.lines if site else []:
        print(line, flush=True)
    if packing.reason and len(todo) > 1:
        print(f"packing (hydra.launcher.trials_per_task=auto): {packing.reason}", flush=True)
    if report is not None:
        print(f"report job {report.job_id}: writes {sweep_dir / 'report'} once every task above has ended", flush=True)

    if not conf.wait:
        return [
            QueuedReturn(overrides=job.overrides, status=JobStatus.UNKNOWN, _return_value=QueuedJob(str(task_of[job.num][0].job_id), str(job.run_dir)))
            if job.num in task_of
            else trial_return(job)
            for job in planned
        ]
    for sjob in futures:
        # Waited for, never unpickled: each trial's outcome is read from what it left on disk
        # (check_all_finished), and a result pickle is a file someone else may have put there
        # (a group member who swapped the submitit folder): loading it would run their code here.
        try:
            sjob.wait()
        except Exception:  # reported per trial below, from what each trial left on disk
            pass
    log.info("all %d tasks ended after %.0f s", len(futures), time.time() - submitted)
    check_all_finished(sweep_dir, planned)
    return [trial_return(job) for job in planned]


class TrialsFailed(CompactHydraException):
    """A waiting launch ended with trials that did not finish; the message names each with its error line."""


def check_all_finished(sweep_dir: Path, planned: Sequence[PlannedJob]) -> None:
    """After a waiting launch: raise :class:`TrialsFailed` (exit 1, one line per trial) unless every trial finished.

    Each trial's state and error come from where status takes them (its files, its job's state,
    its job's log), so a trial refused on the node (its directory was another run's) is named as
    well as one that failed while training.
    """
    from mnist_hpc.login.trials import read_trials

    trials, _ = read_trials([job.run_dir for job in planned])
    failed = [(job, t) for job, t in zip(planned, trials) if not (t.finished and t.state == "COMPLETED")]
    if not failed:
        return
    # A trial is named by what sets it apart: the overrides not every trial of the launch has.
    shared = set.intersection(*(set(job.overrides) for job in planned))
    lines = [f"{len(failed)} of {len(planned)} trial(s) did not finish:"]
    for job, t in failed[:MAX_NAMED]:
        own = " ".join(o for o in job.overrides if o not in shared)
        lines.append(f"  trial {job.num}{f' [{own}]' if own else ''}: {t.state}: {t.error or 'no error recorded'}")
    if len(failed) > MAX_NAMED:
        lines.append(f"  ... and {len(failed) - MAX_NAMED} more")
    lines.append(f"see mnist-hpc-status {sweep_dir}")
    raise TrialsFailed("\n".join(lines))


def local_process(sjob: Any, cluster: str) -> dict[str, Optional[str]]:
    """Where a local launcher's job runs and when its process started (its job id is the pid), for ``job.json``."""
    if cluster != "local" or not str(sjob.job_id).isdigit():
        return {}
    return {"host": socket.gethostname(), "pid_start": claim.process_start(int(sjob.job_id))}


def queue_report(executor: Any, conf: SlurmQueueConf, sweep_dir: Path, tasks: Sequence[Any]) -> Any:
    """A one-CPU job that runs ``mnist-hpc-report`` on the sweep after every task has ended (``afterany``)."""
    arrays = sorted({str(t.job_id).partition("_")[0] for t in tasks}, key=int)
    extra = dict(conf.additional_parameters)
    extra["dependency"] = "afterany:" + ":".join(arrays)
    srun = {}
    if uses_srun(conf):
        # One task on one CPU: the trials' srun --cpus-per-task (and --wait) are not its own; the
        # user's srun_args (a container, say) are.
        srun["slurm_srun_args"] = ["--cpus-per-task=1", *[str(a) for a in conf.srun_args]]
    executor.update_parameters(
        # Never more than a trial asks for (time, memory, CPUs, nodes, no GPU): the trials' request
        # has passed the site's limits (site.check_site), so the report's fits them too.
        timeout_min=min(30, conf.timeout_min), cpus_per_task=1, mem_gb=min(2, conf.mem_gb), tasks_per_node=1, nodes=1,
        name=f"{conf.name}-report",
        slurm_additional_parameters=extra,
        # The report needs no GPU, whatever the trials asked for.
        gpus_per_node=None, slurm_gres=None, slurm_gpus_per_task=None,
        **srun,
    )
    with private_submission():
        return executor.submit(JobEntry(ReportTask(sweep_dir), [], environment_versions()))


def entry(context: LaunchContext, group: Sequence[PlannedJob], versions: dict[str, Optional[str]], packed: bool) -> JobEntry:
    """What one task runs: its trial, or its trials one after another, behind a version-checking entry."""
    trials = [TrainTrial(context, job.spec, job.run_dir, slot if packed else None) for slot, job in enumerate(group)]
    return JobEntry(trials[0] if len(trials) == 1 else PackedTrials(trials), [job.run_dir for job in group], versions)


class SweepRecord:
    """Hydra's sweeper rewrites ``<sweep dir>/multirun.yaml`` before our launcher's checks run: a
    refused launch puts back what was there, so that a refusal changes nothing."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path = Path(sweep_dir) / "multirun.yaml"
        try:
            self.before: Optional[bytes] = self.path.read_bytes()
        except OSError:
            self.before = None

    def restore(self) -> None:
        if self.before is None:
            self.path.unlink(missing_ok=True)
        else:
            write_bytes_atomic(self.path, self.before)


def trial_return(job: PlannedJob) -> Any:
    """A finished trial's JobReturn, from its run directory: COMPLETED with its objective, or FAILED."""
    run = rundir.read_run(job.run_dir)
    if run.metrics is not None and run.failure is None:
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


def summary(sweep_dir: Path, planned: Sequence[PlannedJob], records: dict[int, rundir.JobRecord], cluster: str) -> str:
    """What was queued (job ids, run directories, logs) and what was not because it is done already."""
    ids = sorted({r.array_job_id or r.job_id for r in records.values()})
    lines = [f"queued {len(records)} job(s) on {cluster}: {', '.join(ids)}" if records else "nothing to queue", f"sweep dir: {sweep_dir}"]
    for job in planned:
        record = records.get(job.num)
        if record is None:
            lines.append(f"  [{job.num}] already finished with this config: {job.run_dir} (not queued again)")
            continue
        lines.append(f"  [{job.num}] job {record.job_id}  {' '.join(job.overrides) or '(defaults)'}")
        lines.append(f"      run dir: {job.run_dir}")
        lines.append(f"      logs:    {record.stdout}")
        lines.append(f"               {record.stderr}")
    lines.append(f"check on them with: mnist-hpc-status {sweep_dir}")
    return "\n".join(lines)

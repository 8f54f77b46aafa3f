"""Submission from the login node: a Hydra launcher on submitit that returns once jobs are queued.

``mnist-hpc-train -m hydra/launcher=slurm [overrides]`` composes every job's config, checks it,
checks the data cache and the output root, and only then queues the jobs: one Slurm job array
for the whole sweep. It prints the job ids, directories and log paths and returns at once
(``hydra.launcher.wait=true`` blocks until the jobs end, for sweepers that need results).

Hydra only instantiates launchers that live in the ``hydra_plugins`` package, so the concrete
classes are thin subclasses in ``hydra_plugins/mnist_hpc_launcher``; the logic is here.
This module is imported during Hydra's plugin discovery: it must stay light (no submitit or
TensorFlow at import time).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_hpc.config import Config, ConfigError, cache_file, to_typed
from mnist_hpc.io import write_json_atomic
from mnist_hpc.outputs import JOB_FILE

log = logging.getLogger(__name__)

class PreflightError(CompactHydraException):
    """A check before queueing failed; nothing was submitted.

    A CompactHydraException, so Hydra prints the message alone, not a traceback.
    """


@dataclass
class BaseQueueConf:
    """Options shared by the Slurm and local launchers (``hydra.launcher.*``)."""

    _target_: str = "hydra_plugins.mnist_hpc_launcher.launcher.LocalLauncher"
    # Where submitit keeps pickles and logs; %j becomes the job id.
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # Block until every job ends (sweepers that read results need this); default: return when queued.
    wait: bool = False
    # Wall-clock limit of each job, in minutes.
    timeout_min: int = 60
    # CPUs per task; TensorFlow's thread pools follow it through SLURM_CPUS_PER_TASK.
    cpus_per_task: int = 2
    # Memory per node in GiB.
    mem_gb: float = 4.0
    # Tasks per node (one training process per task).
    tasks_per_node: int = 1
    # GPUs per node (install the `cuda` extra on GPU clusters).
    gpus_per_node: int = 0
    # Nodes per job.
    nodes: int = 1
    # Job name shown by squeue/sacct.
    name: str = "mnist-hpc"


@dataclass
class SlurmQueueConf(BaseQueueConf):
    _target_: str = "hydra_plugins.mnist_hpc_launcher.launcher.SlurmLauncher"
    # Slurm partition; null uses the cluster's default.
    partition: Optional[str] = None
    # Slurm account to charge; keep it in your uncommitted site config.
    account: Optional[str] = None
    # Quality of service.
    qos: Optional[str] = None
    # Node feature constraint, e.g. "avx512".
    constraint: Optional[str] = None
    # Nodes to avoid.
    exclude: Optional[str] = None
    # Seconds before the time limit at which Slurm sends USR2 so the job can checkpoint and requeue.
    signal_delay_s: int = 120
    # How many times a job that hit its time limit may requeue itself.
    max_num_timeout: int = 3
    # Trials of a sweep array running at once.
    array_parallelism: int = 256
    # Shell lines run before the job starts, e.g. ["module load python/3.11", "source ~/venv/bin/activate"].
    setup: list[str] = field(default_factory=list)
    # Any other sbatch option, e.g. {mail-type: END, reservation: myres}.
    additional_parameters: dict[str, Any] = field(default_factory=dict)


def submitit_parameters(conf: DictConfig, cluster: str) -> dict[str, Any]:
    """Translate ``hydra.launcher`` into ``AutoExecutor.update_parameters`` keywords."""
    params: dict[str, Any] = {
        "timeout_min": int(conf.timeout_min),
        "cpus_per_task": int(conf.cpus_per_task),
        "mem_gb": float(conf.mem_gb),
        "tasks_per_node": int(conf.tasks_per_node),
        "nodes": int(conf.nodes),
        "name": str(conf.name),
    }
    if int(conf.gpus_per_node) > 0:
        params["gpus_per_node"] = int(conf.gpus_per_node)
    if cluster == "slurm":
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            if conf.get(key) is not None:
                params[f"slurm_{key}"] = str(conf[key])
        params["slurm_signal_delay_s"] = int(conf.signal_delay_s)
        params["slurm_array_parallelism"] = int(conf.array_parallelism)
        if conf.setup:
            params["slurm_setup"] = [str(line) for line in conf.setup]
        if conf.additional_parameters:
            params["slurm_additional_parameters"] = OmegaConf.to_container(conf.additional_parameters)
    return params


def check_cache(cfg: Config) -> None:
    """Refuse to queue a job whose data cache is missing or invalid (numpy only, no TensorFlow)."""
    from mnist_hpc.data import CacheCorruptError, CacheMissingError, DatasetError, read_npz, validate_arrays, verify_cached

    path = cache_file(cfg.data)
    try:
        verify_cached(path)
        validate_arrays(read_npz(path), source=str(path))
    except (CacheMissingError, CacheCorruptError, DatasetError) as exc:
        raise PreflightError(f"nothing was queued: {exc}") from exc


def check_writable(directory: Path) -> None:
    """Refuse to queue when the run directories cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            f"nothing was queued: cannot write to the output directory {directory} ({exc.strerror}); "
            "set paths.output_root to a writable location (e.g. on $SCRATCH)"
        ) from exc


@dataclass
class PlannedJob:
    """One job of a multirun, composed and checked on the login node."""

    num: int
    overrides: list[str]
    config: DictConfig
    typed: Config
    run_dir: Path


class TrainJob:
    """The callable submitted to the cluster: runs one Hydra job in its fixed run directory.

    It is checkpointable in submitit's sense: on Slurm's USR2 warning before the time limit,
    or on preemption, submitit calls :meth:`checkpoint` and requeues the job with what it
    returns. The training state itself is on disk (``<run dir>/checkpoints``, written every
    epoch), so the resubmission is simply this same job: same config, same run directory,
    and training resumes from the newest checkpoint. No model is ever pickled.

    Hydra's ``run_job`` records a task's exception in the returned ``JobReturn`` instead of
    raising it, so a launcher that just returns it leaves a failed job COMPLETED in Slurm.
    This re-raises, so the job exits non-zero and ends FAILED, with the traceback in its log.
    """

    def __init__(self, hydra_context: Any, task_function: Any, config: DictConfig, singleton_state: Any) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config
        self.singleton_state = singleton_state

    def __call__(self) -> Any:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import run_job, setup_globals

        setup_globals()
        Singleton.set_state(self.singleton_state)
        config = self.config.copy()
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        if job_id:
            with open_dict(config.hydra.job):
                config.hydra.job.id = job_id
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        if ret.status == JobStatus.FAILED:
            raise ret._return_value
        return ret

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The resubmission after a timeout or preemption: this job again, resuming from disk."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def plan_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[PlannedJob]:
    """Compose and check every job's config; pin the sweep directory so requeues land in it."""
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).resolve()
    planned: list[PlannedJob] = []
    for offset, overrides in enumerate(job_overrides):
        num = initial_job_idx + offset
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(config):
            config.hydra.job.num = num
            config.hydra.job.id = f"{config.hydra.job.name}_{num}"
            config.hydra.sweep.dir = str(sweep_dir)
        try:
            typed = to_typed(config)
        except ConfigError as exc:
            raise PreflightError(f"nothing was queued: job {num} ({' '.join(overrides)}): {exc}") from exc
        run_dir = sweep_dir / str(OmegaConf.select(config, "hydra.sweep.subdir"))
        planned.append(PlannedJob(num=num, overrides=list(overrides), config=config, typed=typed, run_dir=run_dir))
    return planned


def preflight(planned: Sequence[PlannedJob]) -> None:
    """Check every distinct cache and run directory before anything is queued."""
    seen_caches: set[Path] = set()
    for job in planned:
        path = cache_file(job.typed.data)
        if path not in seen_caches:
            check_cache(job.typed)
            seen_caches.add(path)
    for parent in sorted({job.run_dir.parent for job in planned}):
        check_writable(parent)


def launch_jobs(launcher: Any, cluster: str, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Plan, check, queue (one array), record and report; optionally wait."""
    import submitit
    from hydra.core.singleton import Singleton

    conf = launcher.params
    planned = plan_jobs(launcher, job_overrides, initial_job_idx)
    preflight(planned)
    sweep_dir = Path(str(planned[0].config.hydra.sweep.dir))
    folder = str(conf.submitit_folder).replace("${hydra.sweep.dir}", str(sweep_dir))
    init: dict[str, Any] = {"slurm_max_num_timeout": int(conf.max_num_timeout)} if cluster == "slurm" else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **init)
    executor.update_parameters(**submitit_parameters(conf, cluster))

    state = Singleton.get_state()
    submitted = time.time()
    with executor.batch():
        futures = [
            executor.submit(TrainJob(launcher.hydra_context, launcher.task_function, job.config, state))
            for job in planned
        ]
    jobs = list(futures)
    for job, sjob in zip(planned, jobs):
        record_submission(job, sjob, cluster)
    print(summary(sweep_dir, planned, jobs, cluster), flush=True)

    if not conf.wait:
        return [
            QueuedReturn(overrides=job.overrides, status=JobStatus.UNKNOWN, _return_value=QueuedJob(str(sjob.job_id), str(job.run_dir)))
            for job, sjob in zip(planned, jobs)
        ]
    results = []
    for job, sjob in zip(planned, jobs):
        try:
            results.append(sjob.result())
        except Exception as exc:  # the job failed: report it as failed, do not hide it
            ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
            ret._return_value = exc
            results.append(ret)
    log.info("all %d jobs ended after %.0f s", len(jobs), time.time() - submitted)
    return results


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


def record_submission(job: PlannedJob, sjob: Any, cluster: str) -> None:
    """Write ``job.json`` into the run directory: ids and log paths, for status and report."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    job_id = str(sjob.job_id)
    array_job_id, _, array_task = job_id.partition("_")
    write_json_atomic(
        job.run_dir / JOB_FILE,
        {
            "cluster": cluster,
            "job_id": job_id,
            "array_job_id": array_job_id if array_task else None,
            "array_task_id": int(array_task) if array_task else None,
            "trial": job.num,
            "overrides": job.overrides,
            "run_dir": str(job.run_dir),
            "stdout": str(sjob.paths.stdout),
            "stderr": str(sjob.paths.stderr),
            "submitit_folder": str(sjob.paths.folder),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
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

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

import contextlib
import itertools
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_hpc.config import Config, ConfigError, cache_file, to_typed
from mnist_hpc.io import write_bytes_atomic, write_json_atomic
from mnist_hpc.outputs import JOB_FILE

log = logging.getLogger(__name__)

class PreflightError(CompactHydraException):
    """A check before queueing failed; nothing was submitted.

    A CompactHydraException, so Hydra prints the message alone, not a traceback.
    """


class SubmissionError(CompactHydraException):
    """The scheduler refused the submission (e.g. sbatch rejected a partition); nothing was queued."""


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
    # Sweep trials run one after another in each task: pays TensorFlow's import and the data
    # load once per task instead of once per trial. 1: one trial per task.
    trials_per_task: int = 1


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
    from mnist_hpc.data import CacheCorruptError, CacheMissingError, DatasetError, check_cached

    path = cache_file(cfg.data)
    try:
        check_cached(path)
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


class LaunchContext:
    """What every job of one launch shares: Hydra's context, the task function, Hydra's singletons.

    Written once per launch into the submitit folder (``launch-<id>.pkl``); each job's pickle
    carries only this file's path. Pickling the whole context into every job made a 64-trial
    sweep write 64 copies of it (90 KB and 15 ms each) before anything was queued. On the
    compute node it is read once per process, on first use.
    """

    def __init__(self, path: Path, hydra_context: Any = None, task_function: Any = None, singleton_state: Any = None) -> None:
        self.path = Path(path)
        self._content: Optional[tuple[Any, Any, Any]] = (
            (hydra_context, task_function, singleton_state) if hydra_context is not None else None
        )

    def save(self) -> "LaunchContext":
        import cloudpickle  # submitit's own pickler: the task function may be a local function

        assert self._content is not None, "nothing to save"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, cloudpickle.dumps(self._content))
        return self

    def load(self) -> tuple[Any, Any, Any]:
        """``(hydra_context, task_function, singleton_state)``."""
        if self._content is None:
            try:
                with open(self.path, "rb") as fh:
                    self._content = pickle.load(fh)
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


def folder_root(submitit_folder: str) -> Path:
    """The fixed part of a submitit folder template (``<sweep>/.submitit/%j`` -> ``<sweep>/.submitit``)."""
    fixed = itertools.takewhile(lambda part: "%" not in part, Path(submitit_folder).parts)
    return Path(*fixed)


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
    non-zero and ends FAILED, with the traceback in its log.
    """

    def __init__(self, context: LaunchContext, config: DictConfig, run_dir: Path) -> None:
        self.context = context
        self.config = config
        self.run_dir = Path(run_dir)

    def __call__(self) -> Any:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import run_job, setup_globals

        from mnist_hpc.outputs import FAILURE_FILE

        try:
            hydra_context, task_function, singleton_state = self.context.load()
        except (OSError, pickle.UnpicklingError) as exc:
            record_failure(self.run_dir, exc)
            raise
        # A resubmission into the same directory supersedes an earlier attempt's failure.
        (self.run_dir / FAILURE_FILE).unlink(missing_ok=True)
        setup_globals()
        Singleton.set_state(singleton_state)
        config = self.config.copy()
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        if job_id:
            with open_dict(config.hydra.job):
                config.hydra.job.id = job_id
        ret = run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        if ret.status == JobStatus.FAILED:
            error = ret._return_value
            if type(error).__name__ == "UncompletedJobError":  # submitit's: time is up, no requeue left
                error = RequeueLimitReached(
                    f"{error} The job reached its time limit with no requeue left "
                    "(hydra.launcher.max_num_timeout); training stopped at its last checkpoint in "
                    f"{self.run_dir / 'checkpoints'}. To continue, submit the same overrides again with "
                    f"hydra.sweep.dir={self.run_dir.parent} (each trial resumes from its checkpoint), or raise "
                    "hydra.launcher.timeout_min or hydra.launcher.max_num_timeout."
                )
            record_failure(self.run_dir, error)
            raise error
        return ret

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The resubmission after a timeout or preemption: this job again, resuming from disk."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


class RequeueLimitReached(RuntimeError):
    """Slurm's time-limit warning came after the job had used all its requeues."""


class PackedTrialsFailed(RuntimeError):
    """Some trials of a packed task failed (each has its own failure.json); the others finished."""


class PackedTrainJob:
    """Several trials of a sweep in one Slurm task, one after the other in one process.

    Each trial pays for TensorFlow's import once per task instead of once per trial, and keeps
    its own run directory, outputs and checkpoints. A failing trial does not stop the others;
    the task ends FAILED if any trial failed. On requeue, finished trials (``metrics.json``
    present) are skipped and an interrupted one resumes from its checkpoint.
    """

    def __init__(self, jobs: Sequence[TrainJob]) -> None:
        self.jobs = list(jobs)

    def __call__(self) -> list[Any]:
        from mnist_hpc.outputs import METRICS_FILE

        results: list[Any] = []
        failed: list[str] = []
        for job in self.jobs:
            if (job.run_dir / METRICS_FILE).is_file():
                log.info("trial %s already finished; skipping", job.run_dir.name)
                results.append(None)
                continue
            try:
                results.append(job())
            except RequeueLimitReached:
                raise  # the task's time is up: the trials after this one cannot run either
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
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """``failure.json`` in the run directory: the error a report shows for a failed trial."""
    import traceback

    from mnist_hpc.outputs import FAILURE_FILE

    try:
        write_json_atomic(
            Path(run_dir) / FAILURE_FILE,
            {
                "error": f"{type(exc).__module__}.{type(exc).__name__}: {exc}".splitlines()[0],
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    except OSError:
        log.exception("could not write failure.json into %s", run_dir)


class SweepComposer:
    """Compose the configs of a sweep's jobs, fast: once per combination of config groups.

    Hydra's ``load_sweep_config`` rebuilds the whole defaults tree for every job (about 0.2 s
    each here), which makes a large sweep slow to queue. Jobs that choose the same config
    groups share that tree: this composes it once per distinct group choice, then applies each
    job's value overrides the way Hydra does (``_apply_overrides_to_config``) and records them
    in ``hydra.overrides.task`` and ``hydra.job.override_dirname``. A test checks the result
    equals ``load_sweep_config``'s.
    """

    def __init__(self, config_loader: Any, master_config: DictConfig) -> None:
        self.loader = config_loader
        self.master = master_config
        self._bases: dict[tuple[str, ...], DictConfig] = {}
        self._hydra_load_sweep_config = config_loader.load_sweep_config
        self._composed: dict[tuple[str, ...], DictConfig] = {}

    @classmethod
    def install(cls, config_loader: Any, master_config: DictConfig) -> "SweepComposer":
        """Serve this process's sweep compositions from a composer (our launchers only).

        Hydra's basic sweeper composes every job once to validate it, then hands the batch to
        the launcher, which composes it again. With the loader's ``load_sweep_config`` served
        by :meth:`compose_once`, the sweeper's pass does the work and the launcher's reuses it.
        """
        composer = cls(config_loader, master_config)
        config_loader.load_sweep_config = composer.load_sweep_config
        return composer

    @contextlib.contextmanager
    def detached(self) -> Any:
        """Hand the loader back its own method while jobs are pickled (they carry the loader)."""
        patched = self.loader.__dict__.pop("load_sweep_config", None)
        try:
            yield
        finally:
            if patched is not None:
                self.loader.load_sweep_config = patched

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        if master_config is not self.master:
            return self._hydra_load_sweep_config(master_config, sweep_overrides)
        key = tuple(sweep_overrides)
        if key not in self._composed:
            self._composed[key] = self.compose(list(sweep_overrides))
        return self._composed[key]

    def compose_once(self, overrides: list[str]) -> DictConfig:
        """The job's config, composed at most once in this process (callers may modify it)."""
        key = tuple(overrides)
        return self._composed.pop(key, None) or self.compose(list(overrides))

    def _is_value_override(self, override: Any) -> bool:
        if override.is_hydra_override() or override.package is not None:
            return False
        if override.is_add() or override.is_force_add() or override.is_delete():
            return False
        return not self.loader.repository.group_exists(override.key_or_group)

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra._internal.config_loader_impl import get_overrides_dirname

        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        if any(o.is_sweep_override() for o in parsed):
            return self._hydra_load_sweep_config(self.master, overrides)
        structural = tuple(o.input_line for o in parsed if not self._is_value_override(o))
        if structural not in self._bases:
            base = self._hydra_load_sweep_config(self.master, list(structural))
            # Each job starts from a copy; unpickling one is ~4x faster than deepcopy of a DictConfig.
            self._bases[structural] = pickle.dumps(base, protocol=pickle.HIGHEST_PROTOCOL)
        config = pickle.loads(self._bases[structural])
        values = [o for o in parsed if self._is_value_override(o)]
        ConfigLoaderImpl._apply_overrides_to_config(values, config)
        app = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(config.hydra):
            config.hydra.overrides.task = [o.input_line for o in app]
            dirname = config.hydra.job.config.override_dirname
            config.hydra.job.override_dirname = get_overrides_dirname(
                overrides=app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys
            )
        OmegaConf.copy_cache(from_config=self.master, to_config=config)
        return config


def plan_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[PlannedJob]:
    """Compose and check every job's config; pin the sweep directory so requeues land in it."""
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).resolve()
    composer = getattr(launcher, "composer", None) or SweepComposer(launcher.hydra_context.config_loader, launcher.config)
    planned: list[PlannedJob] = []
    for offset, overrides in enumerate(job_overrides):
        num = initial_job_idx + offset
        config = composer.compose_once(list(overrides))
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

    context = LaunchContext(
        folder_root(folder) / f"launch-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{initial_job_idx}.pkl",
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
        # Nothing was queued: take out what this launch wrote (our context, submitit's pickles).
        for leftover in (set(root.iterdir()) if root.is_dir() else set()) - before:
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
        if type(exc).__name__ == "FailedJobError":  # submitit's: the scheduler refused the submission
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
    from mnist_hpc.outputs import FAILURE_FILE, METRICS_FILE, objective

    metrics_path = job.run_dir / METRICS_FILE
    if metrics_path.is_file():
        ret = JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED)
        ret._return_value = objective(json.loads(metrics_path.read_text()))
        return ret
    failure = job.run_dir / FAILURE_FILE
    reason = json.loads(failure.read_text())["error"] if failure.is_file() else "ended without metrics.json (killed or timed out?)"
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
            # Position inside a packed task (hydra.launcher.trials_per_task > 1), else null.
            "packed_slot": packed_slot,
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

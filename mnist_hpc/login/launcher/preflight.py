"""Checks before anything is queued: a job that cannot succeed, or must not run, is refused here.

Each check raises :class:`PreflightError`, whose message starts with "nothing was queued" and
says what to do; every planned job is checked first, so one message names every trial in the
way. Numpy at most, never TensorFlow.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mnist_hpc import claim, rundir, slurm
from mnist_hpc.cache import cache_file
from mnist_hpc.config import Config, Distribution, Execution
from mnist_hpc.dataset import split_index
from mnist_hpc.login.launcher.options import GpuRequest, LocalQueueConf, gpu_request, tasks_per_job, uses_srun
from mnist_hpc.login.launcher.packing import PackingError, requested
from mnist_hpc.login.launcher.plan import MAX_NAMED, PlannedJob, PreflightError
from mnist_hpc.search import SPEC_FILE, is_search_dir


def check_launcher(conf: LocalQueueConf, cluster: str) -> None:
    """Launcher options that contradict each other (the schema has checked each one's type)."""
    try:
        requested(conf)
    except PackingError as exc:
        raise PreflightError(f"nothing was queued: {exc}") from exc
    # Sizes below these are not "small" to Slurm: --time=0 is no limit at all, --mem=0 all of a
    # node's memory (mem_gb under 1/1024 renders as --mem=0MB), and --nodes=0 or a negative time are refused
    # or left pending; the local launcher would hand them to submitit as well.
    for option, value, least in (("timeout_min", conf.timeout_min, 1), ("cpus_per_task", conf.cpus_per_task, 1),
                                 ("tasks_per_node", conf.tasks_per_node, 1), ("nodes", conf.nodes, 1),
                                 ("mem_gb", conf.mem_gb, 0.001), ("gpus_per_node", conf.gpus_per_node, 0)):
        if not math.isfinite(value):
            raise PreflightError(f"nothing was queued: hydra.launcher.{option}={value} is not a size; ask for a "
                                 f"number, at least {least:g}")
        if value < least:
            raise PreflightError(f"nothing was queued: hydra.launcher.{option}={value:g} is less than {least:g}, the "
                                 f"least it can be; ask for at least {least:g}")
    if cluster == "slurm":
        check_slurm_options(conf)  # type: ignore[arg-type]
    gpus, tasks, spelling = conf.gpus_per_node, conf.tasks_per_node, gpu_request(conf)
    if cluster == "slurm" and gpus and spelling is GpuRequest.gpus_per_task and gpus % tasks:
        raise PreflightError(
            f"nothing was queued: hydra.launcher.gpu_request=gpus_per_task splits gpus_per_node={gpus} over "
            f"tasks_per_node={tasks}, which does not divide it; make tasks_per_node a divisor of gpus_per_node "
            "(one task per GPU is what a multi-worker run wants)"
        )
    if cluster == "slurm" and not uses_srun(conf) and (tasks > 1 or conf.nodes > 1):
        raise PreflightError(
            "nothing was queued: hydra.launcher.use_srun=false starts one process, but tasks_per_node or nodes "
            "asks for several; keep use_srun=true for multi-task jobs"
        )


# sbatch flags submitit sets for its own bookkeeping (where a job's logs go, the array of a sweep):
# an additional_parameters key that replaced one would queue other tasks than the trials, or leave
# job.json and status looking for logs elsewhere. Compared with '_' spelled '-', as submitit writes keys.
SUBMITIT_OWN_FLAGS = frozenset({"output", "error", "open-mode", "array"})


def check_slurm_options(conf: Any) -> None:
    """Slurm launcher options that cannot make a sound job: the warning signal past the time limit,
    additional_parameters that are not one-line sbatch options or that take over submitit's own flags."""
    if conf.signal_delay_s >= conf.timeout_min * 60:
        raise PreflightError(
            f"nothing was queued: hydra.launcher.signal_delay_s={conf.signal_delay_s} asks for the warning signal that "
            f"many seconds before the end, but timeout_min={conf.timeout_min:g} gives the job {conf.timeout_min * 60:g} s: "
            "it would be told to stop as it starts, and requeue again and again; use a smaller signal_delay_s "
            f"(e.g. {max(1, int(conf.timeout_min * 60) // 4)}) or a larger timeout_min"
        )
    for key, value in conf.additional_parameters.items():
        text = f"{key}{value}"
        if any(ch in text for ch in "\n\r\0"):
            raise PreflightError(f"nothing was queued: hydra.launcher.additional_parameters.{key} holds a line break or "
                                 "NUL, which no sbatch option takes; give it on one line")
        if str(key).replace("_", "-") in SUBMITIT_OWN_FLAGS:
            raise PreflightError(f"nothing was queued: hydra.launcher.additional_parameters.{key} would replace "
                                 f"--{str(key).replace('_', '-')}, which submitit sets (the sweep's array, where the "
                                 "job's logs are found); remove it")


def check_tasks(conf: LocalQueueConf, cluster: str, planned: Sequence[PlannedJob]) -> None:
    """A job of several tasks trains one run across them (``train.distribution``), or is refused here.

    Several tasks with ``train.distribution=none`` would start that many independent copies
    writing into one run directory.
    """
    nodes, per_node, tasks = conf.nodes, conf.tasks_per_node, tasks_per_job(conf)
    if tasks <= 1:
        return
    shape = f"hydra.launcher.nodes={nodes} x tasks_per_node={per_node} = {tasks} tasks"
    if cluster != "slurm":
        raise PreflightError(
            f"nothing was queued: {shape}, but the local launcher starts one process per job; use "
            "hydra/launcher=slurm for a multi-worker training, or one task (tasks_per_node=1, nodes=1)"
        )
    if requested(conf) not in (None, 1):
        raise PreflightError(
            f"nothing was queued: {shape} train one run together, so their trials cannot be packed "
            "(hydra.launcher.trials_per_task); set trials_per_task=1"
        )
    gpus = conf.gpus_per_node
    if gpus and per_node > 1 and gpu_request(conf) is not GpuRequest.gpus_per_task:
        raise PreflightError(
            f"nothing was queued: {shape} on nodes with {gpus} GPUs would each see every GPU of their node; set "
            "hydra.launcher.gpu_request=gpus_per_task (each task its own GPUs), or tasks_per_node=1 (one task "
            "per node uses all of its GPUs)"
        )
    problems: list[str] = []
    for job in planned:
        train = job.typed.train
        if Distribution(train.distribution) is Distribution.none:
            problems.append(
                f"trial {job.num}: train.distribution=none would train {tasks} independent copies into one run "
                "directory; use train.distribution=multi_worker (or auto, the default) for one training across the "
                "tasks, or ask for one task (hydra.launcher.tasks_per_node=1 and nodes=1)"
            )
        elif Execution(train.execution) is Execution.keras_fit:
            problems.append(
                f"trial {job.num}: train.execution=keras_fit (train=lesson) cannot train across {tasks} tasks (Keras 3's "
                "fit does not support MultiWorkerMirroredStrategy, keras #20585); use train.execution=compiled_loop"
            )
        elif train.batch_size < tasks:
            problems.append(f"trial {job.num}: train.batch_size={train.batch_size} is smaller than the {tasks} workers")
    if problems:
        raise PreflightError(f"nothing was queued ({shape}):\n  " + "\n  ".join(problems))


def check_cache(cfg: Config) -> dict[str, Any]:
    """Refuse to queue a job whose data cache is missing or invalid; return its manifest (no numpy)."""
    from mnist_hpc.cache import CacheCorruptError, CacheMissingError, check_cached
    from mnist_hpc.dataset import DatasetError

    try:
        return check_cached(cache_file(cfg.data))
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


def check_batch_size(job: PlannedJob, manifest: dict[str, Any]) -> Optional[str]:
    """A batch larger than the training set is a typo (and would not fit in memory); say which.

    Records the job's training samples (``train_samples``) on the way.
    """
    shapes = manifest.get("shapes") or {}
    try:
        n_train = int(shapes["x_train"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    cfg = job.typed
    n = split_index(n_train, cfg.data.validation_split) if cfg.data.validation_split else n_train
    job.train_samples = n
    if cfg.train.batch_size > n:
        return f"trial {job.num}: train.batch_size={cfg.train.batch_size} exceeds the {n} training samples; use at most {n}"
    return None


def recorded_job_alive(
    job: PlannedJob, me: claim.Holder, slurm_alive: Callable[[str], Optional[bool]], record: Optional[rundir.JobRecord]
) -> Optional[str]:
    """The live job that the run directory's ``job.json`` (``record``) or lease names, if any: it still owns the trial."""
    if record is not None:
        live = claim.alive(claim.job_holder(record), me, slurm_alive)
        if record.cluster == "local":
            # A local job whose liveness cannot be told (another host) is taken to live.
            ended = record.result_file is not None and record.result_file.is_file()
            if not ended and live is not False:
                return f"trial {job.num}: its earlier job {record.job_id} (local) has not ended"
        elif live:
            return f"trial {job.num}: its earlier job {record.job_id} is still queued or running"
    try:
        claim.check_lease(job.run_dir, me, f"trial {job.num}", slurm_alive)
    except claim.RunConflict as exc:
        return str(exc)
    return None


def recorded_owners(jobs: Sequence[PlannedJob]) -> dict[int, str]:
    """:func:`recorded_job_alive` of every job, with one squeue call for all the Slurm jobs they name."""
    me = claim.Holder.this_process()
    records: dict[int, Optional[rundir.JobRecord]] = {}
    named: list[str] = []
    for job in jobs:
        try:
            records[job.num] = rundir.read_job(job.run_dir)
        except rundir.RunFileError:
            records[job.num] = None
        record = records[job.num]
        if record is not None and record.cluster != "local":
            named.append(record.job_id)
        try:
            lease = rundir.read_lease(job.run_dir)
        except rundir.RunFileError:
            lease = None  # check_lease says so and treats it as stale
        if lease is not None and (holder := claim.lease_holder(lease)).slurm_job_id:
            named.append(holder.slurm_job_id)
    answers = slurm.jobs_alive(named) if named else {}

    def slurm_alive(job_id: str) -> Optional[bool]:
        # A lease may have changed since it was read: ask about a job not in the answers on its own.
        return answers[job_id] if job_id in answers else slurm.job_alive(job_id)

    owners = {job.num: recorded_job_alive(job, me, slurm_alive, records[job.num]) for job in jobs}
    return {num: owner for num, owner in owners.items() if owner is not None}


def check_trial_dirs(sweep_dir: Path, planned: Sequence[PlannedJob]) -> None:
    """Every trial's directory is its own and inside the sweep directory (see :func:`mnist_hpc.claim.trial_dir_problems`);
    a sweep directory that holds an asynchronous search is the search's alone."""
    if is_search_dir(sweep_dir):
        raise PreflightError(
            f"nothing was queued: {sweep_dir} holds an asynchronous search ({SPEC_FILE}), whose study knows its own "
            "trials; submit this sweep into another hydra.sweep.dir (or continue the search with hparams_search=optuna)"
        )
    problems = claim.trial_dir_problems(sweep_dir, [(job.num, job.run_dir) for job in planned])
    if problems:
        shown = problems[:MAX_NAMED] + ([f"... and {len(problems) - MAX_NAMED} more"] if len(problems) > MAX_NAMED else [])
        raise PreflightError("nothing was queued:\n  " + "\n  ".join(shown))


def preflight(sweep_dir: Path, planned: Sequence[PlannedJob]) -> None:
    """Check the trials' directories, every distinct cache and run directory, and every trial's claim on its directory.

    Sets each job's ``verdict`` (new, continue, or done: finished with this config and these
    epochs, so it is not queued again). The jobs that earlier submissions recorded are looked
    up in one squeue call. Nothing is created before the directories are known to be the trials' own.
    """
    check_trial_dirs(sweep_dir, planned)
    caches: dict[tuple[str, str], Path] = {}
    manifests: dict[Path, dict[str, Any]] = {}
    for job in planned:
        where = (job.typed.data.cache_dir, job.typed.data.filename)
        if where not in caches:
            caches[where] = cache_file(job.typed.data)
            if caches[where] not in manifests:
                manifests[caches[where]] = check_cache(job.typed)
    for parent in sorted({job.run_dir.parent for job in planned}):
        check_writable(parent)
    problems: list[tuple[int, str]] = []  # by trial, named in trial order
    to_run: list[PlannedJob] = []
    for job in planned:
        manifest = manifests[caches[(job.typed.data.cache_dir, job.typed.data.filename)]]
        if (batch := check_batch_size(job, manifest)) is not None:
            problems.append((job.num, batch))
            continue
        identity = claim.identity_from_flat(job.flat, str(manifest["sha256"]))
        job.fingerprint = claim.fingerprint(identity)
        try:
            job.verdict = claim.judge(job.run_dir, identity, job.typed.train.epochs, f"trial {job.num}")
        except claim.RunConflict as exc:
            problems.append((job.num, str(exc)))
            continue
        if job.verdict.action != "done":
            to_run.append(job)
    owners = recorded_owners(to_run)
    for job in to_run:
        if (owner := owners.get(job.num)) is not None:
            problems.append((job.num, f"{owner}; wait for it to end (or scancel it) before submitting this trial again"))
    if problems:
        messages = [message for _, message in sorted(problems, key=lambda p: p[0])]
        shown = messages[:MAX_NAMED] + ([f"... and {len(messages) - MAX_NAMED} more"] if len(messages) > MAX_NAMED else [])
        raise PreflightError("nothing was queued:\n  " + "\n  ".join(shown))

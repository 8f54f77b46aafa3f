"""Submitting an asynchronous Optuna search: check, create or continue the study, queue W workers, return.

``mnist-hpc-train -m hparams_search=optuna hydra.sweeper.workers=4 hydra.sweeper.n_trials=40``
selects the sweeper ``hydra/sweeper=async_optuna`` (thin plugin in
``hydra_plugins/mnist_hpc_launcher/sweeper.py``; the logic is here). It

1. reads the search space from ``hydra.sweeper.params`` (hydra-optuna-sweeper's syntax) and the
   command line's sweep overrides; every other override is fixed for all trials;
2. composes and checks a config for every categorical choice and range bound and for each
   queued parameter set, checks the data cache and the search directory (nothing is queued
   when one fails);
3. creates the study in ``<search dir>/study.journal``, or continues the one there when the
   search is the same: the same space, and the same identity (the data's sha256 and every
   config key that decides a trial's result; a change is refused, naming each key), and a
   journal that :func:`mnist_hpc.search.check_journal` accepts (a torn last record is cut off,
   a copy kept; damage elsewhere, or trial directories the journal does not know, are refused);
4. queues one array of W search worker tasks (:class:`~mnist_hpc.contract.tasks.SearchWorkerTask`) with the
   ``hydra.launcher`` options (Slurm or local) and returns.

Nothing waits on the login node: the workers ask, train and tell by themselves.
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from mnist_hpc import claim, rundir
from mnist_hpc import search as sd
from mnist_hpc.config import to_typed
from mnist_hpc.login.launcher.plan import PreflightError
from mnist_hpc.login.launcher.preflight import check_cache, check_writable
from mnist_hpc.login.launcher.options import tasks_per_job

PLUGIN = "hydra_plugins.mnist_hpc_launcher.sweeper.AsyncOptunaSweeper"
# Where the data is: one dataset per study (its sha256 is part of the study's identity).
DATA_LOCATION = ("data.cache_dir", "data.filename")
LAUNCHERS = {"SlurmLauncher": "slurm", "LocalLauncher": "local"}


@dataclass
class AsyncOptunaSweeperConf:
    """``hydra/sweeper=async_optuna``: the study's settings (``hydra.sweeper.*``).

    The names follow hydra-optuna-sweeper where they mean the same (``n_trials``, ``direction``,
    ``study_name``, ``sampler``, ``params``); ``workers`` replaces its ``n_jobs`` batch size.
    """

    _target_: str = PLUGIN
    # Keep sampler and pruner as configs: each worker instantiates its own (seeded per worker).
    _recursive_: bool = False
    # Trials the study should end with: complete, pruned or failed (interrupted ones are retried).
    n_trials: int = 20
    # Worker tasks queued as one Slurm array; each loops ask -> train -> tell.
    workers: int = 4
    # maximize or minimize the objective (validation accuracy).
    direction: str = "maximize"
    # Name of the study inside the journal.
    study_name: str = "mnist-hpc"
    # Optuna sampler, instantiated by each worker; its seed is made distinct per worker.
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0})
    # Optuna pruner fed the validation accuracy after every epoch; null: never prune.
    pruner: Any = field(
        default_factory=lambda: {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0}
    )
    # Search space: parameter -> hydra-optuna-sweeper expression (choice, range, interval, tag(log, ...)).
    params: dict[str, Any] = field(default_factory=dict)
    # Parameter sets tried first, e.g. [{optimizer.learning_rate: 0.001}] (Optuna's enqueue_trial).
    enqueue: list[Any] = field(default_factory=list)
    # Seconds between two heartbeats of a worker.
    heartbeat_s: float = 30.0
    # A RUNNING trial whose worker has been silent this long is failed and retried (keep it well
    # above the shared filesystem's attribute cache time, often up to 60 s on NFS).
    stale_after_s: float = 300.0


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/sweeper", name="async_optuna", node=AsyncOptunaSweeperConf, provider="mnist_hpc")


def _refuse(message: str) -> PreflightError:
    return PreflightError(f"nothing was queued: {message}")


def build_spec(conf: DictConfig, arguments: list[str]) -> sd.SearchSpec:
    """The search's spec from ``hydra.sweeper`` and the command line; refuses bad settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = OmegaConf.to_container(conf, resolve=True)
    assert isinstance(plain, dict)
    params = {str(k): str(v) for k, v in (plain.get("params") or {}).items()}
    fixed: list[str] = []
    for override in OverridesParser.create().parse_overrides(arguments):
        if override.is_sweep_override():
            params[override.get_key_element()] = override.input_line.split("=", 1)[1]
        else:
            # As in hydra-optuna-sweeper: a plain value on the command line fixes that parameter.
            params.pop(override.get_key_element(), None)
            fixed.append(override.input_line)
    try:
        space, fixed_params = sd.parse_params(params)
    except ValueError as exc:
        raise _refuse(str(exc)) from exc
    if not space:
        raise _refuse("the search has no parameters to sample: set hydra.sweeper.params (see conf/hparams_search/optuna.yaml)")
    for name in space:
        if name in DATA_LOCATION:
            raise _refuse(f"{name} is searched, but a study compares its trials on one dataset; fix it for all "
                          f"trials ({name}=...) and search the parameters of the training")
    spec = sd.SearchSpec(
        study_name=str(plain["study_name"]), direction=str(plain["direction"]), n_trials=int(plain["n_trials"]),
        params={k: v for k, v in params.items() if k in space}, fixed=fixed + fixed_params,
        enqueue=[dict(e) for e in plain.get("enqueue") or []], sampler=dict(plain.get("sampler") or {}),
        pruner=dict(plain["pruner"]) if plain.get("pruner") else None, heartbeat_s=float(plain["heartbeat_s"]),
        stale_after_s=float(plain["stale_after_s"]), workers=int(plain["workers"]),
    )
    checks = [
        (spec.n_trials >= 1, f"hydra.sweeper.n_trials={spec.n_trials}: must be >= 1"),
        (spec.workers >= 1, f"hydra.sweeper.workers={spec.workers}: must be >= 1"),
        (spec.direction in ("maximize", "minimize"), f"hydra.sweeper.direction={spec.direction}: maximize or minimize"),
        (spec.heartbeat_s > 0, "hydra.sweeper.heartbeat_s must be > 0"),
        (spec.stale_after_s >= 3 * spec.heartbeat_s, "hydra.sweeper.stale_after_s must be at least 3 heartbeats"),
        (bool(spec.sampler.get("_target_")), "hydra.sweeper.sampler needs a _target_ (e.g. optuna.samplers.TPESampler)"),
    ]
    for ok, message in checks:
        if not ok:
            raise _refuse(message)
    for entry in spec.enqueue:
        unknown = sorted(set(entry) - set(space))
        if unknown:
            raise _refuse(f"hydra.sweeper.enqueue names {unknown}, which are not search parameters ({sorted(space)})")
    from hydra.utils import instantiate

    for key in ("sampler", "pruner"):
        if getattr(spec, key):
            try:
                instantiate(getattr(spec, key))
            except Exception as exc:  # any construction error of the user's config
                raise _refuse(f"hydra.sweeper.{key} cannot be built: {exc}") from exc
    return spec


def check_trials(composer: Any, spec: sd.SearchSpec) -> None:
    """Compose and check a config per point of :func:`mnist_hpc.search.search_points`, and bind the
    study to what decides their results (``spec.identity``, ``spec.point_identities``)."""
    from mnist_hpc.config import flat_config

    checked: list[tuple[str, Any]] = []
    for point in sd.search_points(spec):
        overrides = sd.trial_overrides(spec, point)
        try:
            typed = to_typed(composer.compose(overrides))
        except Exception as exc:  # ConfigError, or Hydra's own error naming the bad override
            raise _refuse(f"a trial with {' '.join(overrides)} would fail: {exc}") from exc
        if typed.data.validation_split <= 0:
            raise _refuse(
                "a search chooses on validation accuracy, so it needs data.validation_split > 0 "
                "(hparams_search=optuna sets 0.1); the test set never chooses"
            )
        checked.append((sd.point_label(point), typed))
    shas: dict[Any, str] = {}
    spec.point_identities = {}
    for label, typed in checked:
        where = (typed.data.cache_dir, typed.data.filename)
        if where not in shas:
            shas[where] = str(check_cache(typed)["sha256"])
        spec.point_identities[label] = sd.trial_identity(flat_config(typed), shas[where], spec)
    spec.identity = spec.point_identities[checked[0][0]]


def foreign_runs_problem(search_dir: Path) -> Optional[str]:
    """Why ``search_dir`` cannot hold a study: it is, or lies in, an earlier run's directory, or it holds
    run directories other than the study's numbered trials (a plain sweep's ``run_0``, a trial of
    ``hydra.sweep.subdir``), which status and report would show beside the study's; None when clean."""
    from mnist_hpc.login.trials import trial_dirs

    if rundir.is_run_dir(search_dir):
        return f"{search_dir} is the run directory of an earlier launch; use a new hydra.sweep.dir"
    if (nested := claim.nesting_problem(search_dir, "hydra.sweep.dir", inside_too=False)) is not None:
        return nested
    others = [p for p in trial_dirs(search_dir)
              if p.parent != search_dir or not (p.name.isascii() and p.name.isdigit())]
    if others:
        shown = ", ".join(str(p.relative_to(search_dir)) for p in others[:5]) + (" ..." if len(others) > 5 else "")
        return (f"{search_dir} holds run directories that are not a study's trials ({shown}): a search directory "
                "holds only its own numbered trials; use a new hydra.sweep.dir")
    return None


def open_study(search_dir: Path, spec: sd.SearchSpec) -> tuple[Any, int, Optional[str]]:
    """Create the study, or continue the one in ``search_dir``.

    Every refusal comes before anything is written; the one write before the study is opened is
    the repair of a torn last journal record (a copy of the journal is kept).

    Returns:
        The study, its trials that count toward the budget, and a note on a repaired journal.
    """
    import optuna

    if (foreign := foreign_runs_problem(search_dir)) is not None:
        raise _refuse(foreign)
    try:
        previous = sd.read_spec(search_dir)
    except sd.SearchFileError as exc:
        raise _refuse(f"{exc}; use a new hydra.sweep.dir") from exc
    journal = sd.journal_path(search_dir)
    if previous is None:
        if journal.exists():
            raise _refuse(f"{journal} exists without {sd.SPEC_FILE}; use a new hydra.sweep.dir")
        if numbers := sd.trial_numbers(search_dir):
            raise _refuse(f"{search_dir} holds directories of trials {sd.number_ranges(numbers)} but no {sd.SPEC_FILE}, "
                          "so it is not known what they belong to; use a new hydra.sweep.dir")
    else:
        if not previous.identity:
            raise _refuse(
                f"{search_dir / sd.SPEC_FILE} was written by an older mnist-hpc and does not record the data and config "
                "its trials were trained with, so it cannot be checked that new trials would be comparable; "
                "use a new hydra.sweep.dir"
            )
        changed = spec.differences(previous)
        if changed:
            raise _refuse(
                f"{search_dir} holds a different search; continuing it would mix trials that are not comparable:\n  "
                + "\n  ".join(changed)
                + "\nsubmit the same space, data and overrides to continue it, or use a new hydra.sweep.dir"
            )
        spec.created = previous.created
    try:
        check = sd.check_journal(search_dir, spec.study_name)
    except sd.SearchFileError as exc:  # the journal, or its lock
        raise _refuse(str(exc)) from exc
    repaired = check.note()
    if previous is None:
        # search.json before the journal (opening the storage creates it): a submission killed in
        # between leaves a directory the next one continues (the KeyError below), never a journal
        # without its search.json, which every later submission would have to refuse.
        sd.write_spec(search_dir, spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = sd.open_storage(search_dir)
    try:  # loading writes nothing to the journal (create_study would append an entry)
        study = optuna.load_study(study_name=spec.study_name, storage=storage) if previous is not None else None
    except KeyError:  # a submission that stopped between search.json and the study (no trial directories)
        study = None
    if study is None:
        study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction)
        for entry in spec.enqueue:
            study.enqueue_trial(entry, skip_if_exists=True)
    counted = sum(sd.counts_toward_budget(t) for t in study.get_trials(deepcopy=False))
    if counted >= spec.n_trials:
        raise _refuse(
            f"the study in {search_dir} already has {counted} finished trials (n_trials={spec.n_trials}); "
            "pass a larger hydra.sweeper.n_trials to continue it" + (f"\n(note: {repaired})" if repaired else "")
        )
    return study, counted, repaired


def submit_search(sweeper: Any, arguments: list[str]) -> None:
    """What ``AsyncOptunaSweeper.sweep`` does: check, open the study, queue the workers, print, return."""
    import submitit
    from hydra.core.singleton import Singleton

    from mnist_hpc.contract.entry import JobEntry, environment_versions
    from mnist_hpc.contract.guard import private_submission
    from mnist_hpc.contract.tasks import LaunchContext, SearchWorkerTask
    from mnist_hpc.login.launcher.compose import SweepComposer
    from mnist_hpc.login.launcher.options import SlurmQueueConf, executor_init, submitit_parameters, typed
    from mnist_hpc.login.launcher.site import check_site
    from mnist_hpc.login.launcher.submit import SubmissionError, folder_root, make_private

    config: DictConfig = sweeper.config
    cluster = launcher_cluster(config)
    if cluster is None:
        raise _refuse("the asynchronous search runs its workers with hydra/launcher=slurm (or local); "
                      f"{config.hydra.launcher._target_} is not supported")
    search_dir = Path(str(config.hydra.sweep.dir)).resolve()
    # hydra.launcher as its dataclass, once, as the launcher's setup does for a sweep (options.typed).
    launcher = typed(config.hydra.launcher, cluster, search_dir)
    tasks = tasks_per_job(launcher)
    if tasks > 1:
        raise _refuse(f"a search worker trains its trials in one process, but hydra.launcher asks for {tasks} tasks per "
                      "job (nodes x tasks_per_node); ask for more workers instead: hydra.sweeper.workers=N")
    check_writable(search_dir)
    folder = launcher.submitit_folder
    root = folder_root(folder)
    spec = build_spec(config.hydra.sweeper, arguments)
    check_trials(SweepComposer(sweeper.hydra_context.config_loader, config), spec)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **executor_init(launcher, cluster))
    executor.update_parameters(**submitit_parameters(launcher, cluster))
    # The workers share one request: checked against the site once, before anything is written.
    expected = check_site(executor, launcher).lines if isinstance(launcher, SlurmQueueConf) and cluster == "slurm" else []
    make_private(root)
    # One submission at a time into a search directory (as for a sweep: mnist_hpc.claim.launch_lock).
    with claim.launch_lock(search_dir):
        _, counted, repaired = open_study(search_dir, spec)
        n_workers = min(spec.workers, spec.n_trials - counted)
        sd.write_spec(search_dir, spec)
        OmegaConf.save(config, search_dir / "multirun.yaml")

        context = LaunchContext(
            root / f"search-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{counted}.pkl",
            sweeper.hydra_context, sweeper.task_function, Singleton.get_state(),
        )
        before = set(root.iterdir()) if root.is_dir() else set()
        try:
            with private_submission():  # what the workers unpickle is written 0600 (mnist_hpc.contract.guard)
                context.save()
                with executor.batch():
                    versions = environment_versions()
                    task = SearchWorkerTask(context, config, search_dir, asdict(spec))
                    jobs = [executor.submit(JobEntry(task, [], versions))
                            for _ in range(n_workers)]
        except BaseException as exc:
            from submitit.core.utils import FailedJobError

            for leftover in (set(root.iterdir()) if root.is_dir() else set()) - before:
                shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
            if isinstance(exc, FailedJobError):
                raise SubmissionError(f"nothing was queued: {cluster} refused the {n_workers} worker(s): {str(exc).strip()}") from exc
            raise
        # Status lists a worker from submission on, before it starts; a local one by its process
        # (submitit's local job id is its pid on this host).
        host = socket.gethostname() if cluster == "local" else ""
        for job in jobs:
            sd.write_beat(search_dir, sd.WorkerBeat(job_id=str(job.job_id), cluster=cluster, host=host, state="queued",
                                                    log=str(job.paths.stdout)))
    print(summary(search_dir, spec, counted, jobs, cluster, repaired), flush=True)
    for line in expected:
        print(line, flush=True)


def summary(search_dir: Path, spec: sd.SearchSpec, counted: int, jobs: list[Any], cluster: str,
            repaired: Optional[str] = None) -> str:
    ids = sorted({str(j.job_id).partition("_")[0] for j in jobs})
    verb = f"continuing the study ({counted} trials done)" if counted else "new study"
    lines = [
        f"queued {len(jobs)} search worker(s) on {cluster}: {', '.join(ids)} ({' '.join(str(j.job_id) for j in jobs)})",
        f"search dir: {search_dir}",
        f"study: {spec.study_name} in {sd.journal_path(search_dir)}, {verb}, n_trials={spec.n_trials}, "
        f"{spec.direction} validation accuracy, pruner {spec.pruner['_target_'].rsplit('.', 1)[-1] if spec.pruner else 'off'}",
        f"worker logs: {Path(str(jobs[0].paths.stdout)).parent}",
        f"check on it with: mnist-hpc-status {search_dir}   (and mnist-hpc-report {search_dir})",
    ]
    if repaired:
        lines.insert(2, f"journal repaired: {repaired}")
    return "\n".join(lines)


def launcher_cluster(config: DictConfig) -> Optional[str]:
    """``slurm`` or ``local`` for our launchers; None for any other."""
    return LAUNCHERS.get(str(config.hydra.launcher._target_).rsplit(".", 1)[-1])

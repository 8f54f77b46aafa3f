"""A search worker on the compute node: loop ask -> train -> tell until the study has its trials.

``mnist-hpc-train -m hparams_search=optuna`` queues W of these as one Slurm array (see
:mod:`mnist_hpc.login.launcher.search`) and returns. Each worker, on its own:

1. takes the search's ask lock, and there: resumes a RUNNING trial that its own job left behind
   (the job was requeued after a time limit or preemption), else interrupts trials whose owner
   has stopped beating (told FAIL, marked ``interrupted``, re-queued with the same parameters),
   else asks the study for a new trial while the budget allows;
2. trains the trial in ``<search dir>/<trial number>`` through Hydra's ``run_job`` (so the trial
   has ``.hydra/``, ``train.log`` and every output of a run), reporting the validation accuracy
   after every epoch to the pruner;
3. tells the study COMPLETE (the objective), PRUNED, or FAIL (the error recorded), and goes on.

A worker ends when the study has ``n_trials`` trials that count (interrupted ones do not) and no
other worker's trial looks abandoned. The state of a worker is its heartbeat file, rewritten by a
daemon thread every ``heartbeat_s``. The search directory's files: :mod:`mnist_hpc.search`.

Before it opens the study a worker checks the journal (:func:`mnist_hpc.search.check_journal`);
before each trial, that the data it would train on is the study's (``search.json``), and after
it, that the trial trained on that data. A failed check stops the worker with one line and
tells the study nothing about the trial (a result on other data must never be ranked).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, open_dict

from mnist_hpc import rundir
from mnist_hpc import search as sd
from mnist_hpc.compute.failures import unwrap
from mnist_hpc.compute.failures import one_line_errors, record_failure
from mnist_hpc.compute.job import _reset_keras_state
from mnist_hpc.contract.guard import named_paths
from mnist_hpc.contract.tasks import LaunchContext, SearchWorkerTask
from mnist_hpc.compute.signals import StopRequest, TrainingInterrupted, hand_over
from mnist_hpc.io import utc_now

log = logging.getLogger(__name__)

# A trial whose owner's heartbeat is older than this many intervals is "quiet": a worker that has
# nothing left to ask waits to see whether it goes stale rather than leaving it behind.
QUIET_BEATS = 3


class TrialTakenOver(RuntimeError):
    """Another worker declared this worker's trial interrupted (it was silent for too long)."""


class SearchStopped(RuntimeError):
    """The worker must not go on (the journal or the data is not the study's); the message says why."""


def pruning_callback(trial: Any) -> Any:
    """A Keras callback: report ``val_accuracy`` after every epoch; prune when the pruner says so.

    The decision is taken at the epoch's end, but the trial stops at the *next* epoch's start: by
    then the epoch's checkpoint and ``progress.json`` are written, so a pruned trial keeps every
    epoch it trained. A pruning decision after the last epoch changes nothing (it completes).
    """
    import keras
    import optuna

    class OptunaPruning(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.prune_after: Optional[int] = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if self.prune_after is not None:
                raise optuna.TrialPruned(f"pruned after epoch {self.prune_after}")

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            value = (logs or {}).get("val_accuracy")
            if value is None:
                return
            try:
                trial.report(float(value), step=epoch + 1)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as exc:
                raise TrialTakenOver(f"trial {trial.number} is no longer this worker's: {exc}") from exc
            if trial.should_prune():
                self.prune_after = epoch + 1

    return OptunaPruning()


def worker_id() -> str:
    """The worker's job id (``<array>_<task>`` on Slurm), stable across requeues of the job."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # not inside a submitit job (tests call the worker directly)
        return f"{socket.gethostname()}-{os.getpid()}"


def _cluster() -> str:
    return "slurm" if "SLURM_JOB_ID" in os.environ else "local"


class Heartbeat:
    """Rewrites the worker's file every ``interval_s`` from a daemon thread (dies with the process)."""

    def __init__(self, search_dir: Path, beat: sd.WorkerBeat, interval_s: float) -> None:
        self.search_dir, self.beat, self.interval_s = search_dir, beat, interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="search-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.now()
        self._thread.start()
        return self

    def now(self, **changes: Any) -> float:
        """Beat at once (with ``changes`` to the record); the file's mtime: the file server's 'now'."""
        with self._lock:
            for key, value in changes.items():
                setattr(self.beat, key, value)
            return os.stat(sd.write_beat(self.search_dir, self.beat)).st_mtime

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.now()
            except OSError:  # a full or flaky filesystem: the next beat tries again
                log.warning("could not write the heartbeat of %s", self.beat.job_id, exc_info=True)

    def stop(self, **changes: Any) -> None:
        self._stop.set()
        self.now(**changes)


def run_worker(task: SearchWorkerTask) -> list[int]:
    """A search worker's job: the ask -> train -> tell loop; known errors end it in one line."""
    with one_line_errors():
        return SearchWorker(task.context, task.master_config, task.search_dir, sd.SearchSpec(**task.spec))()


class SearchWorker:
    """What each array task of a search runs: the ask -> train -> tell loop.

    Its job is requeued on a time limit or preemption (its :class:`~mnist_hpc.contract.entry.JobEntry`
    is the resubmission) and resumes its RUNNING trial.
    """

    def __init__(self, context: LaunchContext, master_config: DictConfig, search_dir: Path,
                 submitted: Optional[sd.SearchSpec] = None) -> None:
        self.context = context
        self.master_config = master_config
        self.search_dir = Path(search_dir)
        # The search as submitted, from the worker's own (private) task; None: read search.json whole
        # (a worker made in a test).
        self.submitted = submitted
        # The data file a trial reads, by the search's fixed overrides (see _check_data).
        self._data_files: dict[tuple[str, ...], Path] = {}

    def __call__(self) -> list[int]:
        import optuna
        from hydra.core.singleton import Singleton
        from hydra.core.utils import setup_globals

        from mnist_hpc.claim import Holder

        hydra_context, _, singleton_state = self.context.load()
        setup_globals()
        Singleton.set_state(singleton_state)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        me = worker_id()
        try:
            spec = self._spec()
        except SearchStopped as exc:
            raise SystemExit(f"search worker {me} stopped: {exc}") from None
        # A requeued worker keeps the list of trials it ran before.
        before = next((b for b, _ in sd.read_beats(self.search_dir)[0] if b.job_id == me), sd.WorkerBeat(job_id=me))
        ran = list(before.trials_run)
        process = Holder.this_process()
        beat = sd.WorkerBeat(job_id=me, cluster=_cluster(), host=process.host, pid=process.pid,
                             pid_start=process.pid_start, started=utc_now(), trials_run=list(ran), log=before.log)
        heartbeat = Heartbeat(self.search_dir, beat, spec.heartbeat_s).start()
        # One stop request for the whole worker, as a launcher job has: USR2 or SIGTERM during a
        # trial stops it at its next step boundary; between trials (or inside ask and tell) it is
        # acted on at the top of the loop, never in the middle of a study update.
        submitit_handler = StopRequest.handler_before(signal.SIGUSR2)
        stop = StopRequest(ignore_after=True)
        try:
            self._open_journal(spec)
            self._check_points(hydra_context, spec)
            storage = sd.open_storage(self.search_dir)
            with stop:
                self._loop(hydra_context, storage, me, heartbeat, ran, stop, submitit_handler)
        except SearchStopped as exc:
            heartbeat.stop(state="stopped", message=str(exc))
            log.error("%s", exc)
            # One line on stderr and a failed job, without a traceback: nothing here is a bug.
            raise SystemExit(f"search worker {me} stopped: {exc}") from None
        except BaseException as exc:
            # SystemExit after USR2 is submitit's requeue: a trial stopped at a step boundary stays
            # RUNNING under this job id and the requeued job resumes it.
            requeued = isinstance(exc, SystemExit) and stop.signum != signal.SIGTERM
            heartbeat.stop(state="requeued" if requeued else "stopped", message=rundir.error_line(exc))
            raise
        spec = self._spec()
        message = self._why_done(storage, spec)
        heartbeat.stop(state="done", trial=None, message=message)
        log.info("worker %s ends: %s; this worker ran %s", me, message, ran)
        return ran

    @staticmethod
    def _why_done(storage: Any, spec: sd.SearchSpec) -> str:
        """The worker's last word: the study is complete, or the rest of its budget is other workers' trials."""
        trials = sd.study_trials(storage, spec.study_name) or []
        counted = sum(sd.counts_toward_budget(t) for t in trials)
        if counted >= spec.n_trials:
            return f"the study has its {spec.n_trials} trials"
        running = [t.number for t in trials if t.state.name == "RUNNING"]
        return (f"nothing left to ask: {counted} of {spec.n_trials} trials done, and trials {sd.number_ranges(running)} "
                "run on other workers")

    def _open_journal(self, spec: sd.SearchSpec) -> None:
        """Check the journal (and cut a torn last record off) before the study is opened."""
        try:
            check = sd.check_journal(self.search_dir, spec.study_name)
        except sd.SearchFileError as exc:  # the journal, or its lock
            raise SearchStopped(str(exc)) from exc
        if check.scan is None or not check.scan.records:
            raise SearchStopped(f"{sd.journal_path(self.search_dir)} holds no study: submit the search again")
        if (note := check.note()) is not None:
            log.warning("journal repaired: %s", note)

    def _loop(self, hydra_context: Any, storage: Any, me: str, heartbeat: Heartbeat, ran: list[int],
              stop: StopRequest, submitit_handler: Any) -> None:
        """ask -> train -> tell until the study has its trials; a stop request ends it between trials."""
        import optuna

        while True:
            if stop.requested:
                assert stop.signum is not None
                log.warning("stopping between trials on %s", signal.Signals(stop.signum).name)
                raise hand_over(stop.signum, submitit_handler, chief=True)
            spec = self._spec()
            self._check_data(hydra_context, spec)
            study = optuna.load_study(
                study_name=spec.study_name, storage=storage,
                sampler=self._sampler(spec, me, storage), pruner=self._pruner(spec),
            )
            step = self._next(study, spec, me, heartbeat)
            if step is None:
                return
            if step == "wait":
                time.sleep(spec.heartbeat_s)
                continue
            heartbeat.now(trial=step.number)
            self._run_trial(hydra_context, study, spec, step, submitit_handler)
            ran.append(step.number)
            heartbeat.now(trial=None, trials_run=list(ran))
            _reset_keras_state()

    # --- choosing the next trial (under the ask lock) --------------------------------------------

    def _spec(self) -> sd.SearchSpec:
        """The search as submitted, with the budget of the newest submission.

        Everything but ``n_trials`` comes from the worker's own task: ``search.json`` lies in the
        search directory, which others may be able to write (a group's project space), and its
        sampler, pruner and overrides are instantiated and composed. A ``search.json`` that no
        longer describes this search stops the worker.
        """
        try:
            current = sd.read_spec(self.search_dir)
        except sd.SearchFileError as exc:
            raise SearchStopped(f"{exc}; submit the search again") from exc
        if current is None:
            raise SearchStopped(f"{self.search_dir / sd.SPEC_FILE} is gone; submit the search again")
        if self.submitted is None:
            return current
        changed = current.differences(self.submitted)
        if changed:
            raise SearchStopped(
                f"{self.search_dir / sd.SPEC_FILE} no longer describes the search this worker was queued for "
                f"({'; '.join(changed[:5])}); submit the search again"
            )
        return dataclasses.replace(self.submitted, n_trials=current.n_trials)

    def _check_points(self, hydra_context: Any, spec: sd.SearchSpec) -> None:
        """Before the first trial: the points the submission checked compose to the same identities here.

        A config that resolves otherwise on this node (an ``${oc.env:...}`` set in
        ``hydra.launcher.setup``, another cache) would train trials that are not the study's: the
        worker stops, naming what differs, before it asks for any.
        """
        from mnist_hpc.cache import CacheError, cache_file, read_manifest
        from mnist_hpc.config import ConfigError, flat_config, to_typed

        for point in sd.search_points(spec):
            label = sd.point_label(point)
            wanted = spec.point_identities.get(label)
            if wanted is None:
                continue
            try:
                config = hydra_context.config_loader.load_sweep_config(self.master_config, sd.trial_overrides(spec, point))
                typed = to_typed(config)
                sha = str(read_manifest(cache_file(typed.data))[0]["sha256"])
            except (ConfigError, CacheError) as exc:
                raise SearchStopped(f"no trial was started: with {label}: {exc}") from exc
            here = sd.trial_identity(flat_config(typed), sha, spec)
            if here != wanted:
                from mnist_hpc.claim import differences

                raise SearchStopped(
                    f"no trial was started: a trial's config resolves otherwise on this node than when the search was "
                    f"submitted (with {label}: {'; '.join(differences(wanted, here))}); an interpolation such as "
                    "${oc.env:...} or the data cache differs here: give the workers the login node's environment "
                    "(hydra.launcher.setup), then submit the search again"
                )

    def _check_data(self, hydra_context: Any, spec: sd.SearchSpec) -> None:
        """Before a trial: the data a trial would train on (its config's cache) is the study's."""
        from mnist_hpc.cache import CacheError, read_manifest
        from mnist_hpc.cache import cache_file
        from mnist_hpc.config import to_typed

        if spec.data_sha256 is None:
            return  # a search.json older than the study's identity: nothing recorded to compare
        # Where a trial's data is depends on the fixed overrides alone (the data's location is never
        # searched): composed once per set of them.
        key = tuple(spec.fixed)
        if key not in self._data_files:
            config = hydra_context.config_loader.load_sweep_config(self.master_config, sd.trial_overrides(spec, {}))
            self._data_files[key] = cache_file(to_typed(config).data)
        path = self._data_files[key]
        try:
            found = str(read_manifest(path)[0]["sha256"])
        except CacheError as exc:
            raise SearchStopped(f"no trial was started: {exc}") from exc
        if found != spec.data_sha256:
            raise SearchStopped(data_changed(path, spec.data_sha256, found, "no trial was started"))

    def _check_trained_on(self, spec: sd.SearchSpec, trial: Any, run_dir: Path) -> None:
        """After a trial: it trained on the study's data (its run directory's identity says which)."""
        try:
            identity = rundir.read_identity(run_dir)
        except rundir.RunFileError as exc:
            raise SearchStopped(f"trial {trial.number} was not told to the study: {exc}") from exc
        found = (identity or {}).get("config", {}).get("data.sha256")
        if spec.data_sha256 is not None and found is not None and found != spec.data_sha256:
            raise SearchStopped(data_changed(run_dir / rundir.IDENTITY_FILE, spec.data_sha256, str(found),
                                             f"trial {trial.number} was not told to the study"))

    @staticmethod
    def _sampler(spec: sd.SearchSpec, me: str, storage: Any) -> Any:
        """The configured sampler, its seed made distinct per worker and per study size (it is built
        for each ask): W workers with one seed would propose the same random start-up trials, and
        a requeued worker would repeat its proposals."""
        import zlib

        from hydra.utils import instantiate

        config = dict(spec.sampler)
        if config.get("seed") is not None:
            n_done = len(storage.get_all_trials(storage.get_study_id_from_name(spec.study_name), deepcopy=False))
            config["seed"] = zlib.crc32(f"{config['seed']}/{me}/{n_done}".encode()) & 0x7FFFFFFF
        return instantiate(config)

    @staticmethod
    def _pruner(spec: sd.SearchSpec) -> Any:
        import optuna
        from hydra.utils import instantiate

        return instantiate(dict(spec.pruner)) if spec.pruner else optuna.pruners.NopPruner()

    def _next(self, study: Any, spec: sd.SearchSpec, me: str, heartbeat: Heartbeat) -> Any:
        """The trial to run next, "wait", or None when the study has its trials."""
        from optuna.trial import Trial, TrialState

        space, _ = sd.parse_params(spec.params)
        with sd.ask_lock(self.search_dir):
            now = heartbeat.now()
            trials = study.get_trials(deepcopy=False)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            for t in running:
                if t.user_attrs.get(sd.WORKER_ATTR) == me:
                    log.info("resuming trial %d, left RUNNING by this job before its requeue", t.number)
                    return Trial(study, t._trial_id)
            live = []
            beats = self._owner_beats(running)
            for t in running:
                age = self._silence_s(t, now)
                gone = self._owner_gone(t, beats)
                if gone is not None:
                    self._interrupt(study, t, gone)
                elif age is not None and age > spec.stale_after_s:
                    self._interrupt(study, t, f"its worker {t.user_attrs.get(sd.WORKER_ATTR)} was silent for {age:.0f} s")
                else:
                    live.append((t, age))
            trials = study.get_trials(deepcopy=False)
            counted = sum(sd.counts_toward_budget(t) for t in trials)
            # Queued trials (retries, hydra.sweeper.enqueue) are asked first, within the budget.
            if counted + len(live) < spec.n_trials:
                trial = study.ask(space)
                trial.set_user_attr(sd.WORKER_ATTR, me)
                return trial
        if counted >= spec.n_trials:
            return None
        # The budget is taken by other workers' trials. Leave unless one of them looks abandoned.
        quiet = [t.number for t, age in live if age is None or age > QUIET_BEATS * spec.heartbeat_s]
        if quiet:
            log.info("trials %s have quiet workers; waiting to see whether they go stale", quiet)
            return "wait"
        return None

    def _silence_s(self, trial: Any, now: float) -> Optional[float]:
        """Seconds since the trial's owner last beat; None when unknown (no owner or file yet)."""
        owner = trial.user_attrs.get(sd.WORKER_ATTR)
        mtime = sd.beat_mtime(self.search_dir, owner) if isinstance(owner, str) and owner else None
        return None if mtime is None else now - mtime

    def _owner_beats(self, running: list[Any]) -> dict[str, tuple[sd.WorkerBeat, Optional[bool]]]:
        """The heartbeat of each running trial's worker, with whether its process lives (False: known
        gone; one squeue call for all Slurm workers)."""
        from mnist_hpc import claim, slurm

        beats: dict[str, sd.WorkerBeat] = {}
        for trial in running:
            owner = trial.user_attrs.get(sd.WORKER_ATTR)
            if isinstance(owner, str) and owner and owner not in beats:
                try:
                    beats[owner] = sd.read_beat(sd.beat_path(self.search_dir, owner))
                except sd.SearchFileError:
                    pass  # no file yet, or a damaged one: only its silence tells
        jobs = [b.job_id for b in beats.values() if b.cluster == "slurm" and b.state in ("running", "requeued")]
        answers = slurm.jobs_alive(jobs) if jobs else {}
        me = claim.Holder.this_process()
        out: dict[str, tuple[sd.WorkerBeat, Optional[bool]]] = {}
        for owner, beat in beats.items():
            alive: Optional[bool] = None
            if beat.cluster == "slurm":
                alive = answers.get(owner)
            elif (holder := beat.holder()) is not None:
                alive = claim.alive(holder, me)
            out[owner] = (beat, alive)
        return out

    @staticmethod
    def _owner_gone(trial: Any, beats: dict[str, tuple[sd.WorkerBeat, Optional[bool]]]) -> Optional[str]:
        """Why a RUNNING trial's worker will never finish it, when that is known without waiting for
        its silence: its heartbeat says it is done or stopped, or its process (local) or job (Slurm)
        has ended. None when it may still run it, or that cannot be told."""
        owner = trial.user_attrs.get(sd.WORKER_ATTR)
        if owner not in beats:
            return None
        beat, alive = beats[owner]
        if beat.state in ("done", "stopped"):
            return f"its worker {owner} has {'ended' if beat.state == 'done' else 'stopped'} without finishing it"
        if alive is False:
            return f"its worker {owner}'s {'Slurm job' if beat.cluster == 'slurm' else 'process'} has ended"
        return None

    @staticmethod
    def _interrupt(study: Any, trial: Any, reason: str) -> None:
        """Fail a trial whose worker is gone and queue it again with the same parameters.

        Telling FAIL is the claim: of two workers doing this at once, the second's tell is refused
        by the journal and it queues nothing.
        """
        import optuna

        try:
            optuna.trial.Trial(study, trial._trial_id).set_user_attr(sd.INTERRUPTED_ATTR, reason)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            return
        study.enqueue_trial(dict(trial.params), user_attrs={sd.RETRY_OF_ATTR: trial.number})
        log.warning("trial %d interrupted (%s); queued again", trial.number, reason)

    # --- running one trial ------------------------------------------------------------------------

    def _compose(self, hydra_context: Any, spec: sd.SearchSpec, trial: Any) -> DictConfig:
        overrides = sd.trial_overrides(spec, trial.params)
        config = hydra_context.config_loader.load_sweep_config(self.master_config, overrides)
        with open_dict(config):
            config.hydra.job.num = trial.number
            config.hydra.job.id = os.environ.get("SLURM_JOB_ID") or f"trial_{trial.number}"
            config.hydra.sweep.dir = str(self.search_dir)
            config.hydra.sweep.subdir = str(trial.number)
        return config

    def _record(self, spec: sd.SearchSpec, trial: Any, run_dir: Path) -> None:
        """``job.json`` in the trial's directory: which worker ran it, its overrides and logs."""
        import submitit

        try:
            env = submitit.JobEnvironment()
            paths, job_id = named_paths(env), str(env.job_id)
        except RuntimeError:
            paths, job_id = None, worker_id()
        rundir.write_job(run_dir, rundir.JobRecord.of(
            _cluster(), job_id, paths, run_dir, sd.trial_overrides(spec, trial.params), trial.number, submitted=utc_now()))

    def _seed_from_retry(self, study: Any, trial: Any, run_dir: Path) -> None:
        """A retry of an interrupted trial starts from that trial's newest checkpoints."""
        origin = sd.trial_number_attr(trial, sd.RETRY_OF_ATTR)
        if origin is None or origin >= trial.number:  # none, or not a trial before this one
            return
        if not rundir.seed_from(run_dir, self.search_dir / str(origin)):
            return
        trial.set_user_attr(sd.RESUMED_FROM_ATTR, int(origin))
        log.info("trial %d starts from the checkpoints of interrupted trial %s", trial.number, origin)

    def _run_trial(self, hydra_context: Any, study: Any, spec: sd.SearchSpec, trial: Any, submitit_handler: Any) -> None:
        import optuna
        from hydra.core.utils import JobStatus, run_job
        from submitit.core.utils import UncompletedJobError

        from mnist_hpc.compute.run import train_task

        run_dir = self.search_dir / str(trial.number)
        try:
            config = self._compose(hydra_context, spec, trial)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._record(spec, trial, run_dir)
            self._seed_from_retry(study, trial, run_dir)
            rundir.clear_failure(run_dir)
            ret = run_job(
                hydra_context=hydra_context,
                task_function=functools.partial(train_task, callbacks=[pruning_callback(trial)]),
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            error = unwrap(ret._return_value) if ret.status == JobStatus.FAILED else None
        except Exception as exc:  # composing or recording failed: the trial fails, the worker goes on
            error = exc
        if error is None or isinstance(error, optuna.TrialPruned):
            self._check_trained_on(spec, trial, run_dir)
        try:
            if error is None:
                study.tell(trial, float(ret.return_value))
            elif isinstance(error, optuna.TrialPruned):
                log.info("trial %d %s", trial.number, error)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif isinstance(error, TrainingInterrupted):
                # USR2 or SIGTERM: stopped at a step boundary with its checkpoint. The trial stays
                # RUNNING under this worker: submitit's handler requeues the worker (SystemExit), which
                # resumes it; with no requeue left the trial is interrupted for another worker to retry.
                handed = hand_over(error.signum, submitit_handler, chief=True)
                self._interrupt(study, trial, f"its worker ran out of time: {handed}")
                raise handed
            elif isinstance(error, UncompletedJobError):  # out of time with no requeue left
                self._interrupt(study, trial, f"its worker ran out of time: {error}")
                raise error
            elif isinstance(error, TrialTakenOver):
                log.warning("%s; going on with the next trial", error)
            else:
                log.error("trial %d failed: %s", trial.number, rundir.error_line(error))
                record_failure(run_dir, error)
                trial.set_user_attr(sd.ERROR_ATTR, rundir.error_line(error))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
            log.warning("trial %d was finished by another worker meanwhile (%s)", trial.number, exc)


def data_changed(where: Path, study_sha256: str, found: str, consequence: str) -> str:
    """The one line a worker stops with when the data is not the study's."""
    return (f"{consequence}: the data at {where} is sha256 {found[:16]}..., but this study's trials were trained on "
            f"{study_sha256[:16]}... (its {sd.SPEC_FILE}); put the study's data back (mnist-hpc-prefetch), or start a "
            "new search in a new hydra.sweep.dir")

"""Reading an asynchronous search on the login node: its study, its workers, its trials' states.

Shared by ``mnist-hpc-status SEARCH_DIR`` (:func:`format_status`, :func:`status_json`) and
``mnist-hpc-report SEARCH_DIR`` (:mod:`mnist_hpc.login.report.study`). The study is read from the
journal without writing to it (no lock is taken; :func:`mnist_hpc.search.read_journal` checks
every record); the workers from their heartbeat files, their processes (a local worker) and
Slurm; each trial's epochs and results from its own run directory (:mod:`mnist_hpc.login.trials`).
When the journal cannot be read, each trial directory still shows its own state and results.
A damaged file becomes a note, never an error that stops the command, and never a ranked number.
No TensorFlow.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mnist_hpc import rundir
from mnist_hpc import search as sd
from mnist_hpc.io import parse_utc
from mnist_hpc.login.trials import Trial, fill_states, job_trial, read_trial

# Optuna's trial states in the words status and report use for runs.
STATES = {"COMPLETE": "COMPLETED", "PRUNED": "PRUNED", "FAIL": "FAILED", "RUNNING": "RUNNING", "WAITING": "PENDING"}
# Worker states in which it still works on the study, by its own account.
WORKING = ("queued", "running", "requeued")


@dataclass
class WorkerRow:
    """One worker: its heartbeat file, its job's state, and whether its process still lives."""

    beat: sd.WorkerBeat
    silent_s: Optional[float]
    slurm_state: str = ""
    # Its Slurm job as status shows a job (reason, expected start, usage), when Slurm was asked.
    job: Optional[Trial] = None
    # False: its process is known to be gone (local: the pid has ended; Slurm: the job ended);
    # None: it cannot be told from here.
    alive: Optional[bool] = None

    @property
    def state(self) -> str:
        """What it is now: its heartbeat's state, unless its process is gone without saying so."""
        if self.beat.state in WORKING and self.alive is False:
            return "dead" if self.beat.cluster == "local" else "ended"
        return self.beat.state

    @property
    def live(self) -> bool:
        """Still working on the study (or not known to have stopped)."""
        return self.state in WORKING


def worker_alive(beat: sd.WorkerBeat, slurm_state: str) -> Optional[bool]:
    """Whether a worker's process lives: Slurm's word for a Slurm job, :func:`mnist_hpc.claim.alive` for a local one."""
    from mnist_hpc import claim

    if beat.cluster == "slurm":
        return (slurm_state not in rundir.ENDED_STATES) if slurm_state else None
    holder = beat.holder()
    return None if holder is None else claim.alive(holder, claim.Holder.this_process())


def accuracy(value: Any) -> Optional[float]:
    """A validation accuracy that may be shown and ranked (a finite number in [0, 1]), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        return None
    return float(value)


@dataclass
class StudyView:
    """What a search directory says: its spec, its study's trials, its trial directories, its workers, and notes."""

    search_dir: Path
    spec: Optional[sd.SearchSpec]
    trials: list[Any] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Each trial directory, by trial number (its epochs and results, whatever the journal says).
    runs: dict[int, Trial] = field(default_factory=dict)
    # Why the study cannot be read from its journal; None when it can.
    journal_problem: Optional[str] = None
    # The checked journal's read-only storage (the report's plots load the study from it).
    storage: Any = None

    def worker(self, job_id: Any) -> Optional[WorkerRow]:
        return next((w for w in self.workers if w.beat.job_id == job_id), None)

    def owner(self, trial: Any) -> Optional[WorkerRow]:
        return self.worker(trial.user_attrs.get(sd.WORKER_ATTR))

    def state(self, trial: Any) -> str:
        """A trial's state for people: interrupted, abandoned (its worker is gone) or stale say so."""
        name = STATES.get(trial.state.name, trial.state.name)
        if sd.is_interrupted(trial):
            return "INTERRUPTED"
        if name == "RUNNING" and self.is_abandoned(trial):
            return "ABANDONED"
        if name == "RUNNING" and self.is_stale(trial):
            return "RUNNING (stale)"
        return name

    def is_abandoned(self, trial: Any) -> bool:
        """A RUNNING trial whose worker has ended (no worker will finish it; one may retry it)."""
        row = self.owner(trial)
        return row is not None and not row.live

    def is_stale(self, trial: Any) -> bool:
        row = self.owner(trial)
        limit = self.spec.stale_after_s if self.spec else 300.0
        return row is not None and row.silent_s is not None and row.silent_s > limit

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("COMPLETED", "PRUNED", "FAILED", "RUNNING", "PENDING", "INTERRUPTED", "ABANDONED")}
        for t in self.trials:
            key = self.state(t).split()[0]
            out[key] = out.get(key, 0) + 1
        return out

    @property
    def counted(self) -> int:
        return sum(sd.counts_toward_budget(t) for t in self.trials)

    def value(self, trial: Any) -> Optional[float]:
        """A complete trial's value, if it is an accuracy; anything else is never shown or ranked."""
        return accuracy(trial.value) if trial.state.name == "COMPLETE" else None

    @property
    def best(self) -> Any:
        complete = [t for t in self.trials if self.value(t) is not None]
        if not complete:
            return None
        sign = -1.0 if self.spec and self.spec.direction == "minimize" else 1.0
        return max(complete, key=lambda t: sign * self.value(t))  # type: ignore[operator]

    def epochs(self, number: Optional[int]) -> tuple[Optional[int], Optional[int]]:
        """Epochs done and planned of a trial, from its run directory's progress (a resumed retry counts them all)."""
        run = self.runs.get(number) if number is not None else None
        return (run.epochs_done, run.epochs_planned) if run is not None else (None, None)

    def who_retries(self) -> str:
        """Who retries an abandoned trial: a live worker at its next ask (it tells a gone worker from its
        heartbeat, its pid or Slurm), else nobody until the search is submitted again."""
        live = [w.beat.job_id for w in self.workers if w.live]
        if live:
            return f"worker {', '.join(live)} retries it when it next asks for a trial"
        return "no worker is left to retry it: submit the search again (the same settings) to retry it"


# --- reading -------------------------------------------------------------------------------------


def load_trials(search_dir: Path, spec: sd.SearchSpec) -> tuple[list[Any], Any, Optional[str], list[str]]:
    """The study's trials from its checked journal (read-only).

    Returns:
        The trials, the read-only storage they came from, why the study cannot be read (None
        when it can), and notes (a torn last line, which the next writer cuts off).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = sd.journal_path(search_dir)
    try:
        scan = sd.read_journal(path)
    except sd.JournalError as exc:
        return [], None, str(exc), []
    if scan is None:
        return [], None, f"{path} does not exist (yet)", []
    notes = []
    if scan.torn is not None:
        notes.append(f"{scan.describe_torn()}; Optuna skips it, and the next worker or submission cuts it off "
                     "(keeping a copy of the journal)")
    storage = scan.storage()
    trials = sd.study_trials(storage, spec.study_name)
    if trials is None:
        return [], None, f"{path} holds no study named {spec.study_name!r}", notes
    return trials, storage, None, notes


def read_runs(search_dir: Path) -> tuple[dict[int, Trial], list[str]]:
    """Each trial directory's files (:func:`mnist_hpc.login.trials.read_trial`), by trial number.

    The directories are the search's numbered ones (:func:`mnist_hpc.search.trial_numbers`: ASCII
    digits only), whatever files they hold yet.
    """
    runs, notes = {}, []
    for number in sd.trial_numbers(search_dir):
        run = read_trial(Path(search_dir) / str(number))
        runs[number] = run
        notes += [f"trial {number}: {n}" for n in run.notes]
    return runs, notes


def read_study(search_dir: Path, with_slurm: bool = True) -> StudyView:
    """Read a search directory (spec, study, trial directories, workers); never raises on a damaged file."""
    search_dir = Path(search_dir)
    view = StudyView(search_dir, None)
    try:
        view.spec = sd.read_spec(search_dir)
    except sd.SearchFileError as exc:
        view.notes.append(f"{exc}; the study cannot be located")
        view.journal_problem = f"{sd.SPEC_FILE} cannot be read"
    if view.spec is not None:
        view.trials, view.storage, view.journal_problem, notes = load_trials(search_dir, view.spec)
        view.notes += notes
    if view.journal_problem is not None:
        view.notes.append(f"{view.journal_problem}; each trial is shown from its own directory")
    view.runs, notes = read_runs(search_dir)
    view.notes += notes
    beats, notes = sd.read_beats(search_dir)
    view.notes += notes
    now = _server_now(search_dir)
    view.workers = [WorkerRow(b, None if now is None else max(0.0, now - mtime)) for b, mtime in beats]
    jobs: dict[str, Trial] = {}
    if with_slurm and worker_job_ids(view):
        filled, notes = fill_states(worker_jobs(view))
        jobs = {t.job_id: t for t in filled}
        view.notes += notes
    set_worker_jobs(view, jobs)
    for t in view.trials:
        if t.state.name == "COMPLETE" and view.value(t) is None:
            view.notes.append(f"trial {t.number}: its value in the journal ({t.value!r:.40}) is not an accuracy in "
                              "[0, 1]; it is not shown or ranked")
    return view


def worker_job_ids(view: StudyView) -> list[str]:
    """The Slurm job ids of the search's workers."""
    return [w.beat.job_id for w in view.workers if w.beat.cluster == "slurm"]


def worker_jobs(view: StudyView) -> list[Trial]:
    """The search's workers' Slurm jobs, each known to have held its id when its heartbeat started
    (or last beat): only that job is the worker's (:func:`mnist_hpc.slurm.job_snapshot`)."""
    return [job_trial(w.beat.job_id, parse_utc(w.beat.started) or parse_utc(w.beat.beat))
            for w in view.workers if w.beat.cluster == "slurm"]


def set_worker_jobs(view: StudyView, jobs: dict[str, Trial]) -> None:
    """Each worker's job as Slurm showed it (from the command's one query), and whether it still lives."""
    for w in view.workers:
        w.job = jobs.get(w.beat.job_id)
        w.slurm_state = w.job.state if w.job is not None and w.job.state != "UNKNOWN" else ""
        if w.beat.state in WORKING:
            w.alive = worker_alive(w.beat, w.slurm_state)


def _server_now(search_dir: Path) -> Optional[float]:
    """The file server's clock, read as the mtime of a file written now (the compute nodes' beats
    are dated by the same clock); falls back to this host's clock where the directory is read-only."""
    import tempfile
    import time

    try:
        with tempfile.NamedTemporaryFile(dir=search_dir, prefix=".now-") as fh:
            return os.fstat(fh.fileno()).st_mtime
    except OSError:
        return time.time()


# --- a trial from its own directory (the journal cannot be read) ---------------------------------


def run_state(view: StudyView, run: Trial) -> str:
    """A trial's state from its run directory and its worker alone.

    Without the journal a pruned, an interrupted and an abandoned trial look alike: UNFINISHED.
    """
    if run.files.failure is not None:
        return "FAILED"
    if run.files.finished:
        return "COMPLETED"
    row = view.worker(run.job_id)
    if row is not None and row.live and row.beat.trial == run.number:
        return "RUNNING"
    return "UNFINISHED"


def run_value(run: Trial) -> Optional[float]:
    """A finished trial's objective (validation accuracy) from its ``metrics.json``, if in range."""
    return accuracy(run.val_accuracy) if run.finished else None


def run_note(view: StudyView, run: Trial) -> str:
    notes = []
    if run.files.failure is not None:
        notes.append(run.files.failure)
    elif run_state(view, run) == "UNFINISHED":
        notes.append("pruned, interrupted or abandoned (the journal would tell which)")
    if run.finished and run_value(run) is None:
        notes.append("its metrics.json holds no validation accuracy in [0, 1]; not ranked")
    return "; ".join(notes)


def sampled(view: StudyView, run: Trial) -> list[str]:
    """A trial directory's overrides of the searched parameters (all of them when the space is not known)."""
    if view.spec is None:
        return list(run.overrides)
    return [o for o in run.overrides if o.split("=", 1)[0] in view.spec.params]


def best_run(view: StudyView) -> Optional[Trial]:
    ranked = [r for r in view.runs.values() if run_value(r) is not None]
    if not ranked:
        return None
    sign = -1.0 if view.spec and view.spec.direction == "minimize" else 1.0
    return max(ranked, key=lambda r: sign * run_value(r))  # type: ignore[operator]


# --- showing it ---------------------------------------------------------------------------------


def _ago(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _epochs(done: Optional[int], planned: Optional[int]) -> str:
    return "-" if done is None else f"{done}/{planned if planned is not None else '?'}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def trial_note(view: StudyView, trial: Any) -> str:
    attrs = trial.user_attrs
    notes = []
    if (origin := sd.trial_number_attr(trial, sd.RETRY_OF_ATTR)) is not None:
        notes.append(f"retry of {origin}")
    if sd.trial_number_attr(trial, sd.RESUMED_FROM_ATTR) is not None:
        notes.append("started from its checkpoints")
    if sd.INTERRUPTED_ATTR in attrs:
        notes.append(f"interrupted: {str(attrs[sd.INTERRUPTED_ATTR])[:300]}")
    if sd.ERROR_ATTR in attrs:
        notes.append(str(attrs[sd.ERROR_ATTR])[:300])
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        notes.append(f"pruned after epoch {max(trial.intermediate_values)}")
    if trial.state.name == "COMPLETE" and view.value(trial) is None:
        notes.append("its value is not an accuracy in [0, 1]; not ranked")
    if trial.state.name == "RUNNING":
        row = view.owner(trial)
        if view.is_abandoned(trial) and row is not None:
            slurm_word = f" (Slurm: {row.slurm_state})" if row.slurm_state else ""
            notes.append(f"abandoned: its worker {row.beat.job_id} is {row.state}{slurm_word}; {view.who_retries()}")
        elif view.is_stale(trial):
            notes.append("its worker is silent: a worker, or submitting the search again, retries it")
    return "; ".join(notes)


def worker_message(view: StudyView, w: WorkerRow) -> str:
    if w.beat.message:
        return w.beat.message
    if w.state == "dead":
        return f"its process (pid {w.beat.pid or w.beat.job_id} on {w.beat.host}) is gone"
    if w.state == "ended":
        return f"its Slurm job ended ({w.slurm_state}) without a word"
    wait = w.job.wait if w.job is not None else None
    if wait is not None:
        start = f"; expected start {w.job.expected_start}" if w.job.expected_start else ""  # type: ignore[union-attr]
        return f"waits: {wait.words}{start}" + (f"; {wait.todo}" if wait.todo else "")
    return "-"


def summary_lines(view: StudyView) -> list[str]:
    spec = view.spec
    if spec is None:
        return [f"search {view.search_dir}: no readable {sd.SPEC_FILE}"] + _run_summary(view)
    pruner = spec.pruner["_target_"].rsplit(".", 1)[-1] if spec.pruner else "no pruner"
    lines = [f"search {view.search_dir}: study {spec.study_name!r}, {spec.direction} validation accuracy, {pruner}"]
    if view.journal_problem is not None:
        return lines + _run_summary(view)
    c = view.counts()
    lines.append(
        f"trials: {view.counted} of {spec.n_trials} done ({c['COMPLETED']} complete, {c['PRUNED']} pruned, "
        f"{c['FAILED']} failed); {c['RUNNING']} running, {c['PENDING']} waiting, {c['INTERRUPTED']} interrupted and "
        f"retried" + (f", {c['ABANDONED']} abandoned" if c["ABANDONED"] else "")
    )
    best = view.best
    if best is not None:
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        lines.append(f"best so far: trial {best.number}, validation accuracy {view.value(best):.4f} ({params})")
    return lines


def _run_summary(view: StudyView) -> list[str]:
    """The summary from the trial directories alone, when the journal cannot be read."""
    states = [run_state(view, r) for r in view.runs.values()]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in ("COMPLETED", "FAILED", "RUNNING", "UNFINISHED") if s in states)
    lines = [f"trials: the study's journal cannot be read ({view.journal_problem}); "
             f"{len(view.runs)} trial directories{': ' + counts if counts else ''}"]
    best = best_run(view)
    if best is not None:
        lines.append(f"best so far, from the trial directories: trial {best.number}, validation accuracy "
                     f"{run_value(best):.4f} ({' '.join(sampled(view, best))})")
    return lines


def worker_rows(view: StudyView) -> list[list[Any]]:
    return [
        [
            w.beat.job_id,
            w.slurm_state or "-",
            w.state,
            _ago(w.silent_s),
            "-" if w.beat.trial is None else w.beat.trial,
            _epochs(*view.epochs(w.beat.trial)),
            len(w.beat.trials_run),
            worker_message(view, w),
            w.beat.log or "-",
        ]
        for w in view.workers
    ]


def _value(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_status(view: StudyView) -> str:
    """The text ``mnist-hpc-status SEARCH_DIR`` prints: summary, workers, trials."""
    parts = ["\n".join(summary_lines(view))]
    parts.append(table(["WORKER", "SLURM", "WORKER STATE", "LAST BEAT", "TRIAL", "EPOCHS", "RAN", "MESSAGE", "LOG"],
                       worker_rows(view)))
    if view.journal_problem is None:
        rows = [
            [t.number, view.state(t), t.user_attrs.get(sd.WORKER_ATTR, "-"), _epochs(*view.epochs(t.number)),
             _value(view.value(t)), trial_note(view, t) or "-"]
            for t in view.trials
        ]
    else:
        rows = [
            [n, run_state(view, r), r.job_id, _epochs(r.epochs_done, r.epochs_planned), _value(run_value(r)),
             run_note(view, r) or "-"]
            for n, r in sorted(view.runs.items())
        ]
    parts.append(table(["TRIAL", "STATE", "WORKER", "EPOCHS", "VALUE", "NOTE"], rows))
    return "\n\n".join(parts)


def status_json(view: StudyView) -> dict[str, Any]:
    """What ``mnist-hpc-status --json SEARCH_DIR`` prints."""
    readable = view.journal_problem is None
    if readable:
        trials = [
            {"trial": t.number, "state": view.state(t), "worker": t.user_attrs.get(sd.WORKER_ATTR),
             "value": view.value(t), "params": t.params, "epochs": view.epochs(t.number)[0],
             "epochs_planned": view.epochs(t.number)[1], "epochs_reported": len(t.intermediate_values),
             "note": trial_note(view, t), "run_dir": str(view.search_dir / str(t.number)), "source": "journal"}
            for t in view.trials
        ]
        best = view.best
        best_row = None if best is None else {"trial": best.number, "value": view.value(best), "params": best.params}
    else:
        trials = [
            {"trial": n, "state": run_state(view, r), "worker": r.job_id, "value": run_value(r), "params": None,
             "overrides": sampled(view, r), "epochs": r.epochs_done, "epochs_planned": r.epochs_planned,
             "note": run_note(view, r), "run_dir": str(r.run_dir), "source": "run_dir"}
            for n, r in sorted(view.runs.items())
        ]
        run = best_run(view)
        best_row = None if run is None else {"trial": run.number, "value": run_value(run), "overrides": sampled(view, run)}
    return {
        "search_dir": str(view.search_dir),
        "study_name": view.spec.study_name if view.spec else None,
        "n_trials": view.spec.n_trials if view.spec else None,
        "journal": {"readable": readable, "problem": view.journal_problem},
        "counted": view.counted if readable else None,
        "counts": view.counts() if readable else None,
        "best": best_row,
        "workers": [
            {"job_id": w.beat.job_id, "slurm_state": w.slurm_state, "state": w.state, "beat_state": w.beat.state,
             "alive": w.alive, "silent_s": w.silent_s, "trial": w.beat.trial, "epochs": view.epochs(w.beat.trial)[0],
             "trials_run": w.beat.trials_run, "message": worker_message(view, w), "log": w.beat.log,
             "reason": w.job.reason or None if w.job else None,
             "expected_start": w.job.expected_start or None if w.job else None,
             "cost": w.job.cost_row() if w.job else None}
            for w in view.workers
        ],
        "trials": trials,
        "notes": view.notes,
    }

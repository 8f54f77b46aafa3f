"""Reading an asynchronous search on the login node: its study, its workers, its trials' states.

Shared by ``mnist-hpc-status SEARCH_DIR`` (:func:`format_status`, :func:`status_json`) and
``mnist-hpc-report SEARCH_DIR`` (:mod:`mnist_hpc.login.report.study`). The study is read from the
journal without writing to it (no lock is taken); the workers from their heartbeat files and
Slurm. A damaged file becomes a note, never an error that stops the command. No TensorFlow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mnist_hpc import search as sd
from mnist_hpc import slurm

# Optuna's trial states in the words status and report use for runs.
STATES = {"COMPLETE": "COMPLETED", "PRUNED": "PRUNED", "FAIL": "FAILED", "RUNNING": "RUNNING", "WAITING": "PENDING"}


@dataclass
class WorkerRow:
    """One worker: its heartbeat file and its job's state."""

    beat: sd.WorkerBeat
    silent_s: Optional[float]
    slurm_state: str = ""


@dataclass
class StudyView:
    """What a search directory says: its spec, its study's trials, its workers, and notes."""

    search_dir: Path
    spec: Optional[sd.SearchSpec]
    trials: list[Any] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def state(self, trial: Any) -> str:
        """A trial's state for people: an interrupted trial says so, a stale RUNNING one too."""
        name = STATES.get(trial.state.name, trial.state.name)
        if sd.is_interrupted(trial):
            return "INTERRUPTED"
        if name == "RUNNING" and self.is_stale(trial):
            return "RUNNING (stale)"
        return name

    def is_stale(self, trial: Any) -> bool:
        owner = trial.user_attrs.get(sd.WORKER_ATTR)
        row = next((w for w in self.workers if w.beat.job_id == owner), None)
        limit = self.spec.stale_after_s if self.spec else 300.0
        return row is not None and row.silent_s is not None and row.silent_s > limit

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("COMPLETED", "PRUNED", "FAILED", "RUNNING", "PENDING", "INTERRUPTED")}
        for t in self.trials:
            key = self.state(t).split()[0]
            out[key] = out.get(key, 0) + 1
        return out

    @property
    def counted(self) -> int:
        return sum(sd.counts_toward_budget(t) for t in self.trials)

    @property
    def best(self) -> Any:
        complete = [t for t in self.trials if t.state.name == "COMPLETE" and t.value is not None]
        if not complete:
            return None
        sign = -1.0 if self.spec and self.spec.direction == "minimize" else 1.0
        return max(complete, key=lambda t: sign * t.value)


def load_trials(search_dir: Path, spec: sd.SearchSpec) -> tuple[list[Any], list[str]]:
    """The study's trials read from its journal, or a note on why they cannot be."""
    import optuna

    path = sd.journal_path(search_dir)
    if not path.is_file():
        return [], [f"{path} does not exist yet"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = sd.open_storage(search_dir)
        study_id = storage.get_study_id_from_name(spec.study_name)
        return list(storage.get_all_trials(study_id, deepcopy=False)), []
    except KeyError:
        return [], [f"{path} holds no study named {spec.study_name!r}"]
    except Exception as exc:  # a damaged journal written by another process: say so, go on
        return [], [f"{path} cannot be read ({type(exc).__name__}: {exc}); the study's view is missing"]


def read_study(search_dir: Path, with_slurm: bool = True) -> StudyView:
    """Read a search directory (spec, study, workers); never raises on a damaged file."""
    search_dir = Path(search_dir)
    view = StudyView(search_dir, None)
    try:
        view.spec = sd.read_spec(search_dir)
    except sd.SearchFileError as exc:
        view.notes.append(f"{exc}; the study cannot be located")
    if view.spec is not None:
        view.trials, notes = load_trials(search_dir, view.spec)
        view.notes += notes
    beats, notes = sd.read_beats(search_dir)
    view.notes += notes
    now = _server_now(search_dir)
    view.workers = [WorkerRow(b, None if now is None else max(0.0, now - mtime)) for b, mtime in beats]
    if with_slurm:
        ids = [w.beat.job_id for w in view.workers if w.beat.cluster == "slurm"]
        rows, notes = slurm.job_states(ids) if ids else ({}, [])
        view.notes += notes
        for w in view.workers:
            w.slurm_state = rows.get(w.beat.job_id, {}).get("state", "")
    return view


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


# --- showing it ---------------------------------------------------------------------------------


def _ago(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def trial_note(view: StudyView, trial: Any) -> str:
    attrs = trial.user_attrs
    notes = []
    if sd.RETRY_OF_ATTR in attrs:
        notes.append(f"retry of {attrs[sd.RETRY_OF_ATTR]}")
    if sd.RESUMED_FROM_ATTR in attrs:
        notes.append("started from its checkpoints")
    if sd.INTERRUPTED_ATTR in attrs:
        notes.append(f"interrupted: {attrs[sd.INTERRUPTED_ATTR]}")
    if sd.ERROR_ATTR in attrs:
        notes.append(str(attrs[sd.ERROR_ATTR]))
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        notes.append(f"pruned after epoch {max(trial.intermediate_values)}")
    if view.is_stale(trial) and trial.state.name == "RUNNING":
        notes.append("its worker is silent: a worker, or submitting the search again, retries it")
    return "; ".join(notes)


def summary_lines(view: StudyView) -> list[str]:
    spec = view.spec
    if spec is None:
        return [f"search {view.search_dir}: no readable {sd.SPEC_FILE}"]
    c = view.counts()
    pruner = spec.pruner["_target_"].rsplit(".", 1)[-1] if spec.pruner else "no pruner"
    lines = [
        f"search {view.search_dir}: study {spec.study_name!r}, {spec.direction} validation accuracy, {pruner}",
        f"trials: {view.counted} of {spec.n_trials} done ({c['COMPLETED']} complete, {c['PRUNED']} pruned, "
        f"{c['FAILED']} failed); {c['RUNNING']} running, {c['PENDING']} waiting, {c['INTERRUPTED']} interrupted and retried",
    ]
    best = view.best
    if best is not None:
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        lines.append(f"best so far: trial {best.number}, validation accuracy {best.value:.4f} ({params})")
    return lines


def worker_rows(view: StudyView) -> list[list[Any]]:
    return [
        [
            w.beat.job_id,
            w.slurm_state or "-",
            w.beat.state,
            _ago(w.silent_s),
            "-" if w.beat.trial is None else w.beat.trial,
            len(w.beat.trials_run),
            w.beat.message or "-",
            w.beat.log or "-",
        ]
        for w in view.workers
    ]


def format_status(view: StudyView) -> str:
    """The text ``mnist-hpc-status SEARCH_DIR`` prints: summary, workers, trials."""
    parts = ["\n".join(summary_lines(view))]
    parts.append(table(["WORKER", "SLURM", "WORKER STATE", "LAST BEAT", "TRIAL", "RAN", "MESSAGE", "LOG"], worker_rows(view)))
    rows = [
        [t.number, view.state(t), t.user_attrs.get(sd.WORKER_ATTR, "-"),
         f"{len(t.intermediate_values)}", "-" if t.value is None else f"{t.value:.4f}", trial_note(view, t) or "-"]
        for t in view.trials
    ]
    parts.append(table(["TRIAL", "STATE", "WORKER", "EPOCHS", "VALUE", "NOTE"], rows))
    return "\n\n".join(parts)


def status_json(view: StudyView) -> dict[str, Any]:
    """What ``mnist-hpc-status --json SEARCH_DIR`` prints."""
    best = view.best
    return {
        "search_dir": str(view.search_dir),
        "study_name": view.spec.study_name if view.spec else None,
        "n_trials": view.spec.n_trials if view.spec else None,
        "counted": view.counted,
        "counts": view.counts(),
        "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params},
        "workers": [
            {"job_id": w.beat.job_id, "slurm_state": w.slurm_state, "state": w.beat.state, "silent_s": w.silent_s,
             "trial": w.beat.trial, "trials_run": w.beat.trials_run, "message": w.beat.message, "log": w.beat.log}
            for w in view.workers
        ],
        "trials": [
            {"trial": t.number, "state": view.state(t), "worker": t.user_attrs.get(sd.WORKER_ATTR),
             "value": t.value, "params": t.params, "epochs_reported": len(t.intermediate_values),
             "note": trial_note(view, t), "run_dir": str(view.search_dir / str(t.number))}
            for t in view.trials
        ],
        "notes": view.notes,
    }

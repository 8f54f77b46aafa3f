"""The search directory of an asynchronous Optuna search: every file in it, named, written and read here.

One search (``mnist-hpc-train -m hparams_search=optuna``) owns one directory::

    <search dir>/
      search.json       at submission (login node): the search space, budget and settings
      study.journal     Optuna's JournalStorage (file backend): the study, appended to by every worker
      study.journal.lock  held for each append (Optuna's symlink lock), absent otherwise
      ask.lock          held while a worker counts the budget and asks (same lock kind)
      workers/<job>.json  each worker's heartbeat: rewritten every ``heartbeat_s`` while it lives
      multirun.yaml     Hydra's composed config of the submission
      .submitit/        the workers' pickles and logs
      0/ 1/ 2/ ...      one run directory per trial, named by its Optuna trial number
      report/           mnist-hpc-report's output

Shared by the login node (submission, status, report) and the workers. Optuna is imported
inside functions; no TensorFlow.

Why these choices:

- Optuna's ``JournalFileBackend`` works on shared filesystems without a database server (SQLite
  on NFS is unsafe with concurrent writers, optuna #815). Its appends are serialised by
  ``JournalFileSymlinkLock``: ``symlink(2)`` is atomic on every NFS version, whereas the
  ``O_EXCL`` create of ``JournalFileOpenLock`` needs NFSv3 or later. Both release a lock left by a
  dead holder after a grace period (30 s).
- ``JournalStorage`` has no heartbeat in Optuna 4 (only ``RDBStorage`` does), so
  ``RetryFailedTrialCallback`` never fires for it. The equivalent here: each worker rewrites its
  own file under ``workers/`` every ``heartbeat_s``; a RUNNING trial whose owner has been silent
  for ``stale_after_s`` is *interrupted* (told FAIL, marked ``interrupted``) and re-queued with
  the same parameters (``retry_of``). Ages are compared between file modification times, which
  the file server sets, so the compute nodes' clocks never enter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mnist_hpc.io import utc_now, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

SPEC_FILE = "search.json"
JOURNAL_FILE = "study.journal"
WORKERS_DIR = "workers"
ASK_LOCK = "ask"

# User attributes the workers set on trials (the study is their one record).
WORKER_ATTR = "worker"  # job id of the worker that runs (ran) the trial
ERROR_ATTR = "error"  # the error line of a trial that raised
INTERRUPTED_ATTR = "interrupted"  # why a trial was cut off (its owner died or ran out of time)
RETRY_OF_ATTR = "retry_of"  # the number of the interrupted trial this one repeats
RESUMED_FROM_ATTR = "resumed_from"  # the trial whose checkpoints this one started from


class SearchFileError(ValueError):
    """A search file exists but cannot be used; the message names it and what is wrong."""


# --- search.json ------------------------------------------------------------------------------


@dataclass
class SearchSpec:
    """What a search is: its space and settings (``search.json``), written at each submission."""

    study_name: str
    direction: str
    n_trials: int
    # Parameter name -> Hydra sweep expression (hydra-optuna-sweeper's ``params`` syntax).
    params: dict[str, str]
    # Overrides every trial gets (command line and non-sweep ``params``).
    fixed: list[str] = field(default_factory=list)
    # Parameter sets tried first (Optuna's enqueue_trial), e.g. the lesson's defaults.
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    # Hydra-instantiable sampler and pruner configs (``_target_``); pruner None: no pruning.
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: Optional[dict[str, Any]] = None
    heartbeat_s: float = 30.0
    stale_after_s: float = 300.0
    workers: int = 1
    created: str = ""
    updated: str = ""

    # A continued search must keep these, or its trials would not be comparable.
    IDENTITY = ("study_name", "direction", "params", "fixed")

    def differences(self, other: "SearchSpec") -> list[str]:
        """The identity fields that differ from ``other``'s, as ``name: old -> new`` lines."""
        return [f"{k}: {getattr(other, k)!r} -> {getattr(self, k)!r}" for k in self.IDENTITY if getattr(self, k) != getattr(other, k)]


def write_spec(search_dir: Path, spec: SearchSpec) -> None:
    spec.updated = utc_now()
    spec.created = spec.created or spec.updated
    write_json_atomic(Path(search_dir) / SPEC_FILE, asdict(spec))


def read_spec(search_dir: Path) -> Optional[SearchSpec]:
    """The search's ``search.json``; None when the directory holds no search.

    Raises:
        SearchFileError: the file is unreadable, not JSON, or lacks a field.
    """
    path = Path(search_dir) / SPEC_FILE
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SearchFileError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SearchFileError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    known = {f.name: f for f in fields(SearchSpec)}
    values = {k: v for k, v in data.items() if k in known}
    checks = {"study_name": str, "direction": str, "n_trials": int, "params": dict, "fixed": list, "enqueue": list}
    for key, kind in checks.items():
        if not isinstance(values.get(key), kind) or isinstance(values.get(key), bool):
            raise SearchFileError(f"{path}: field {key!r} is {values.get(key)!r}, expected {kind.__name__}")
    for key in ("heartbeat_s", "stale_after_s"):
        if not isinstance(values.get(key, 1.0), (int, float)) or values.get(key, 1.0) <= 0:
            raise SearchFileError(f"{path}: field {key!r} must be a positive number")
    return SearchSpec(**values)


def is_search_dir(path: Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


# --- the search space -------------------------------------------------------------------------


def parse_params(params: dict[str, str]) -> tuple[dict[str, "BaseDistribution"], list[str]]:
    """Optuna distributions from hydra-optuna-sweeper's ``params`` syntax, and the fixed overrides.

    ``choice(a, b)`` and ``a,b`` are categorical; ``range(lo, hi, step)`` is an integer (or, with a
    float, a stepped float) distribution whose ``hi`` is excluded, as Hydra's range is;
    ``interval(lo, hi)`` is uniform over floats (Hydra makes its bounds floats), ``int(interval(lo,
    hi))`` over integers, ``tag(log, ...)`` log-uniform. A value without sweep syntax is fixed.

    Raises:
        ValueError: an expression is not valid Hydra override syntax or is not supported.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer
    from hydra.errors import HydraException
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    parser = OverridesParser.create()
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for name, expression in params.items():
        try:
            override = parser.parse_override(f"{name}={expression}")
        except HydraException as exc:
            raise ValueError(f"search parameter {name}: {expression!r} is not a Hydra sweep expression ({exc})") from exc
        if not override.is_sweep_override():
            fixed.append(f"{name}={override.get_value_element_as_str()}")
            continue
        value = override.value()
        if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            space[name] = CategoricalDistribution(choices)
        elif override.is_range_sweep():
            start, stop, step = value.start, value.stop, value.step
            if any(isinstance(v, float) for v in (start, stop, step)):
                # Hydra's range excludes stop; Optuna's bounds are inclusive.
                last = start + step * int(round((stop - start) / step - 1))
                space[name] = FloatDistribution(float(start), float(last), step=float(step))
            else:
                last = start + step * ((stop - start - 1) // step)
                space[name] = IntDistribution(int(start), int(last), step=int(step))
        elif override.is_interval_sweep():
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[name] = IntDistribution(value.start, value.end, log=log)
            else:
                space[name] = FloatDistribution(float(value.start), float(value.end), log=log)
        else:  # pragma: no cover - Hydra has no other sweep kinds
            raise ValueError(f"search parameter {name}: {expression!r} is not supported")
    return space, fixed


def trial_overrides(spec: SearchSpec, params: dict[str, Any]) -> list[str]:
    """A trial's Hydra overrides: the fixed ones, then its sampled parameters."""
    return list(spec.fixed) + [f"{k}={v}" for k, v in params.items()]


# --- the study --------------------------------------------------------------------------------


def journal_path(search_dir: Path) -> Path:
    return Path(search_dir) / JOURNAL_FILE


def open_storage(search_dir: Path) -> "optuna.storages.JournalStorage":
    """The study's storage: a journal file with the symlink lock (see the module docstring).

    The backend creates the journal file when it is missing; readers check it exists first.
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    path = str(journal_path(search_dir))
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileSymlinkLock(path)))


@contextlib.contextmanager
def ask_lock(search_dir: Path) -> Iterator[None]:
    """Held while a worker counts the budget, interrupts stale trials and asks for a trial.

    Counting and asking must be one step, or two workers could both take the last trial of the
    budget. The same lock kind as the journal's; a holder that died is released after 30 s.
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(Path(search_dir) / ASK_LOCK))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_interrupted(trial: "FrozenTrial") -> bool:
    return INTERRUPTED_ATTR in trial.user_attrs


def counts_toward_budget(trial: "FrozenTrial") -> bool:
    """Finished trials count toward ``n_trials``; an interrupted one does not (its retry does)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not is_interrupted(trial)


# --- worker heartbeats ------------------------------------------------------------------------


@dataclass
class WorkerBeat:
    """A worker's heartbeat file: who it is, what it runs, and how it ended."""

    job_id: str
    # "slurm" or "local" (submitit's executor): whom to ask for the job's state.
    cluster: str = ""
    host: str = ""
    pid: int = 0
    started: str = ""
    beat: str = ""
    # The trial number it runs, None between trials.
    trial: Optional[int] = None
    # queued (written at submission), running, done (the study has its trials), stopped (an
    # error ended the worker) or requeued.
    state: str = "running"
    trials_run: list[int] = field(default_factory=list)
    message: str = ""
    # The worker's own log (submitit's stdout file).
    log: str = ""


def beat_path(search_dir: Path, job_id: str) -> Path:
    return Path(search_dir) / WORKERS_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}.json"


def write_beat(search_dir: Path, beat: WorkerBeat) -> Path:
    """Rewrite the worker's file (a new inode and modification time: the heartbeat itself)."""
    beat.beat = utc_now()
    path = beat_path(search_dir, beat.job_id)
    write_json_atomic(path, asdict(beat))
    return path


def read_beats(search_dir: Path) -> tuple[list[tuple[WorkerBeat, float]], list[str]]:
    """Every worker's file with its modification time; damaged files become notes."""
    out: list[tuple[WorkerBeat, float]] = []
    notes: list[str] = []
    directory = Path(search_dir) / WORKERS_DIR
    paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
    known = {f.name for f in fields(WorkerBeat)}
    for path in paths:
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("job_id"), str):
                raise ValueError("not a worker record with a job_id")
            beat = WorkerBeat(**{k: v for k, v in data.items() if k in known})
            if beat.trial is not None and not isinstance(beat.trial, int):
                raise ValueError(f"trial is {beat.trial!r}")
            out.append((beat, path.stat().st_mtime))
        except (OSError, ValueError, TypeError) as exc:
            notes.append(f"{path} is not a usable worker heartbeat ({exc}); ignored")
    return out, notes


def beat_mtime(search_dir: Path, job_id: str) -> Optional[float]:
    try:
        return os.stat(beat_path(search_dir, job_id)).st_mtime
    except OSError:
        return None

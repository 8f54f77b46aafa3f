"""The search directory of an asynchronous Optuna search: every file in it, named, written and read here.

One search (``mnist-hpc-train -m hparams_search=optuna``) owns one directory::

    <search dir>/
      search.json       at submission (login node): the search space, budget, settings and identity
      study.journal     Optuna's JournalStorage (file backend): the study, appended to by every worker
      study.journal.lock  held for each append (a symlink naming its holder), absent otherwise
      study.journal.torn-<time>  a copy of the journal as it was before a torn last record was cut off
      ask.lock          held while a worker counts the budget and asks (same lock kind)
      workers/<job>.json  each worker's heartbeat: rewritten every ``heartbeat_s`` while it lives
      multirun.yaml     Hydra's composed config of the submission
      .submitit/        the workers' pickles and logs
      0/ 1/ 2/ ...      one run directory per trial, named by its Optuna trial number
      report/           mnist-hpc-report's output

Shared by the login node (submission, status, report) and the workers. Optuna is imported
inside functions (a login command that only asks whether a directory is a search stays fast);
no TensorFlow. Every file here that another process wrote is read bounded and range-checked: a
file that fails is a :class:`SearchFileError` naming it, which readers turn into a note.

Why these choices:

- Optuna's ``JournalFileBackend`` works on shared filesystems without a database server (SQLite
  on NFS is unsafe with concurrent writers, optuna #815). Its appends are serialised by a lock
  made with ``symlink(2)``, atomic on every NFS version (the ``O_EXCL`` create of
  ``JournalFileOpenLock`` needs NFSv3 or later). Optuna's own ``JournalFileSymlinkLock`` frees a
  lock left by a killed holder only after 30 s; :class:`HolderLock` (Optuna's lock plugin point)
  writes its holder (host, pid, process start) into the link, so a holder that is gone from
  this host is released at once, and one on another host after the same 30 s.
- A writer killed in the middle of an append leaves a torn last line; the next append would
  glue itself to it and make a line that no reader can parse, before others (Optuna then
  refuses the whole journal). So every append first cuts a torn last line off under the lock
  (:class:`JournalLock`), and :func:`check_journal` (submission, worker start) checks every
  record, refusing damage anywhere but the last line. A copy of the whole journal is kept
  before anything is cut.
- ``JournalStorage`` has no heartbeat in Optuna 4 (only ``RDBStorage`` does), so
  ``RetryFailedTrialCallback`` never fires for it. The equivalent here: each worker rewrites its
  own file under ``workers/`` every ``heartbeat_s``; a RUNNING trial whose owner has been silent
  for ``stale_after_s`` is *interrupted* (told FAIL, marked ``interrupted``) and re-queued with
  the same parameters (``retry_of``). Ages are compared between file modification times, which
  the file server sets, so the compute nodes' clocks never enter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mnist_hpc.io import UntrustedFileError, atomic_path, read_bytes_bounded, read_json, utc_now, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

    from mnist_hpc.claim import Holder

log = logging.getLogger(__name__)

SPEC_FILE = "search.json"
JOURNAL_FILE = "study.journal"
WORKERS_DIR = "workers"
ASK_LOCK = "ask.lock"
# Beside the journal: the lock of its appends (Optuna's name for it), and copies kept before a cut.
JOURNAL_LOCK_SUFFIX = ".lock"
TORN_COPY_INFIX = ".torn-"

# Size caps of the files other processes write, each far above what its writer ever writes:
# - search.json: the space, overrides and the fixed config's identity (~100 keys) are a few kB;
#   1,000 queued parameter sets of four parameters add ~150 kB.
MAX_SPEC_BYTES = 1 << 20
# - a heartbeat lists the trials its worker ran: 100,000 trials make 1.1 MB.
MAX_BEAT_BYTES = 2 << 20
# - the journal of a 10,000-trial study of the lesson's 5 epochs and 4 parameters measured
#   22.6 MB (1,000 trials of 100 epochs: 15.2 MB). Reading a journal costs far more memory than
#   its size (Optuna's trial objects; a report ~45 bytes per byte), so the cap leaves room for such
#   a study and not much more: 64 MiB.
MAX_JOURNAL_BYTES = 64 << 20
# - one journal record: Optuna's are a few hundred bytes (the longest measured: 314).
MAX_RECORD_BYTES = 1 << 20
# The fields of each record Optuna's JournalStorage writes, by its JournalOperation code (Optuna
# 4; tests/test_search_journal.py checks that every journal Optuna writes passes this check).
JOURNAL_RECORD_FIELDS: dict[int, tuple[str, ...]] = {
    0: ("study_name", "directions"),  # CREATE_STUDY
    1: ("study_id",),  # DELETE_STUDY
    2: ("study_id", "user_attr"),  # SET_STUDY_USER_ATTR
    3: ("study_id", "system_attr"),  # SET_STUDY_SYSTEM_ATTR
    4: ("study_id", "datetime_start"),  # CREATE_TRIAL
    5: ("trial_id", "param_name", "param_value_internal", "distribution"),  # SET_TRIAL_PARAM
    6: ("trial_id", "state", "values"),  # SET_TRIAL_STATE_VALUES
    7: ("trial_id", "step", "intermediate_value"),  # SET_TRIAL_INTERMEDIATE_VALUE
    8: ("trial_id", "user_attr"),  # SET_TRIAL_USER_ATTR
    9: ("trial_id", "system_attr"),  # SET_TRIAL_SYSTEM_ATTR
}
# A lock whose holder cannot be told dead from here is released after this long unchanged,
# as Optuna's own symlink lock does.
LOCK_GRACE_S = 30.0

# User attributes the workers set on trials (the study is their one record).
WORKER_ATTR = "worker"  # job id of the worker that runs (ran) the trial
ERROR_ATTR = "error"  # the error line of a trial that raised
INTERRUPTED_ATTR = "interrupted"  # why a trial was cut off (its owner died or ran out of time)
RETRY_OF_ATTR = "retry_of"  # the number of the interrupted trial this one repeats
RESUMED_FROM_ATTR = "resumed_from"  # the trial whose checkpoints this one started from


class SearchFileError(ValueError):
    """A search file exists but cannot be used; the message names it and what is wrong."""


class JournalError(SearchFileError):
    """The study's journal cannot be used as it is (damaged, missing beside trials, too large)."""


def _whole(value: Any) -> bool:
    """An integer that is not a bool (JSON's true is Python's 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def trial_numbers(search_dir: Path) -> list[int]:
    """The numbers of the trial directories in ``search_dir`` (a worker makes one per trial it starts)."""
    try:
        entries = list(os.scandir(search_dir))
    except OSError:
        return []
    return sorted(int(e.name) for e in entries if re.fullmatch(r"[0-9]{1,9}", e.name) and e.is_dir())


def number_ranges(numbers: list[int]) -> str:
    """``0-5, 8`` for [0, 1, 2, 3, 4, 5, 8]: how messages name many trials."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --- search.json ------------------------------------------------------------------------------


@dataclass
class SearchSpec:
    """What a search is: its space, settings and identity (``search.json``), written at each submission."""

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
    # What decides a trial's result besides its sampled parameters: the identity of a trial's
    # config (mnist_hpc.claim) without the searched keys, train.epochs included, and the data's
    # sha256 (``data.sha256``). Empty in files written before it existed.
    identity: dict[str, Any] = field(default_factory=dict)
    # The same for every point the submission checked (:func:`search_points`: each categorical
    # choice and range bound), by its label: a searched config group (``optimizer=sgd,adam``)
    # decides keys of its own, which ``identity`` alone (its first choice's) does not show.
    point_identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = ""
    updated: str = ""

    # A continued search must keep these, or its trials would not be comparable. (The fixed
    # overrides are not: ``identity`` holds what they decide, so a new output root or a copy of
    # the same data in another cache directory may continue the study.)
    IDENTITY = ("study_name", "direction", "params", "identity", "point_identities")

    @property
    def data_sha256(self) -> Optional[str]:
        value = self.identity.get("data.sha256")
        return value if isinstance(value, str) else None

    def differences(self, other: "SearchSpec") -> list[str]:
        """What differs from ``other``'s identity, as ``name: old -> new`` lines (config keys one by one)."""
        from mnist_hpc.claim import differences

        out = []
        for key in self.IDENTITY:
            old, new = getattr(other, key), getattr(self, key)
            if key == "identity":
                out += differences(old, new)
            elif key == "point_identities":
                first = differences(other.identity, self.identity)
                for label in sorted(set(old) | set(new)):
                    changed = differences(old.get(label, {}), new.get(label, {}))
                    out += [f"with {label}: {line}" for line in changed if line not in first]
            elif old != new:
                out.append(f"{key}: {old!r} -> {new!r}")
        return out


def write_spec(search_dir: Path, spec: SearchSpec) -> None:
    spec.updated = utc_now()
    spec.created = spec.created or spec.updated
    write_json_atomic(Path(search_dir) / SPEC_FILE, asdict(spec))


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "study_name": (str,), "direction": (str,), "n_trials": (int,), "params": (dict,), "fixed": (list,),
    "enqueue": (list,), "sampler": (dict,), "pruner": (dict, type(None)), "heartbeat_s": (int, float),
    "stale_after_s": (int, float), "workers": (int,), "identity": (dict,), "point_identities": (dict,),
    "created": (str,), "updated": (str,),
}
_REQUIRED_SPEC_FIELDS = ("study_name", "direction", "n_trials", "params", "fixed", "enqueue")


def spec_problem(values: dict[str, Any]) -> Optional[str]:
    """What is wrong with a ``search.json``'s fields (types and ranges), or None."""
    for key in _REQUIRED_SPEC_FIELDS:
        if key not in values:
            return f"field {key!r} is missing"
    for key, types in _SPEC_TYPES.items():
        if key in values and (not isinstance(values[key], types) or isinstance(values[key], bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"field {key!r} is {values[key]!r:.80}, expected {want}"
    checks = [
        (bool(values["study_name"]), "field 'study_name' is empty"),
        (values["direction"] in ("maximize", "minimize"), "field 'direction' must be maximize or minimize"),
        (values["n_trials"] >= 1, "field 'n_trials' must be at least 1"),
        (values.get("workers", 1) >= 1, "field 'workers' must be at least 1"),
        (_positive(values.get("heartbeat_s", 1.0)), "field 'heartbeat_s' must be a positive number of seconds"),
        (_positive(values.get("stale_after_s", 1.0)), "field 'stale_after_s' must be a positive number of seconds"),
        (all(isinstance(k, str) and isinstance(v, str) for k, v in values["params"].items()),
         "field 'params' must map names to sweep expressions (strings)"),
        (all(isinstance(o, str) for o in values["fixed"]), "field 'fixed' must be a list of overrides (strings)"),
        (all(isinstance(e, dict) for e in values["enqueue"]), "field 'enqueue' must be a list of parameter sets"),
        (all(isinstance(k, str) and isinstance(v, dict) for k, v in values.get("point_identities", {}).items()),
         "field 'point_identities' must map labels to identities (objects)"),
        # The worker instantiates the pruner by its _target_, and status names it by that.
        (values.get("pruner") is None or (isinstance(values["pruner"].get("_target_"), str) and values["pruner"]["_target_"] != ""),
         "field 'pruner' must be null or name its class in _target_"),
    ]
    sha = values.get("identity", {}).get("data.sha256")
    checks.append((sha is None or (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None),
                   "field 'identity' holds a data.sha256 that is not a sha256"))
    return next((message for ok, message in checks if not ok), None)


def read_spec(search_dir: Path) -> Optional[SearchSpec]:
    """The search's ``search.json``; None when the directory holds no search.

    Raises:
        SearchFileError: the file is unreadable, too large, not JSON, lacks a field or holds a
            value out of range.
    """
    path = Path(search_dir) / SPEC_FILE
    try:
        data = read_json(path, MAX_SPEC_BYTES)
    except FileNotFoundError:
        return None
    except UntrustedFileError as exc:
        raise SearchFileError(str(exc)) from exc
    if not isinstance(data, dict):
        raise SearchFileError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    known = {f.name for f in fields(SearchSpec)}
    values = {k: v for k, v in data.items() if k in known}
    problem = spec_problem(values)
    if problem is not None:
        raise SearchFileError(f"{path}: {problem}")
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
    from hydra.core.override_parser.types import Glob, Transformer
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
        if isinstance(value, Glob):  # it names config group options by pattern, which only Hydra's config loader lists
            raise ValueError(f"search parameter {name}: {expression!r} is a glob, which a search cannot sample; "
                             "list the values instead: choice(a, b)")
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


def search_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """The parameter sets a submission composes and checks before queueing: the first value of
    every parameter, each queued set, and each categorical choice and range bound alone."""
    from optuna.distributions import CategoricalDistribution

    space, _ = parse_params(spec.params)
    first = {k: (d.choices[0] if isinstance(d, CategoricalDistribution) else d.low) for k, d in space.items()}
    points = [dict(first, **entry) for entry in spec.enqueue] or [first]
    for name, dist in space.items():
        values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        points += [dict(first, **{name: v}) for v in values]
    return points


def point_label(point: dict[str, Any]) -> str:
    """How a checked point is named in ``point_identities`` and in messages."""
    return " ".join(f"{k}={v}" for k, v in sorted(point.items()))


def trial_identity(flat: dict[str, Any], data_sha256: str, spec: SearchSpec) -> dict[str, Any]:
    """What decides a trial's result besides its sampled values: its config's identity
    (:func:`mnist_hpc.claim.identity_from_flat`, the data's sha256 included) without the keys that
    are searched themselves. ``train.epochs`` is kept: a run directory may be extended to more
    epochs, but a study ranks its trials' results at the epochs they were trained for. A searched
    config group (``optimizer``) is no config key: the keys it decides stay, so that a point of
    each of its choices binds them."""
    from mnist_hpc import claim

    identity = claim.identity_from_flat(flat, data_sha256)
    identity["train.epochs"] = flat["train.epochs"]
    return {k: v for k, v in sorted(identity.items()) if k not in spec.params}


def trial_overrides(spec: SearchSpec, params: dict[str, Any]) -> list[str]:
    """A trial's Hydra overrides: the fixed ones, then its sampled parameters."""
    return list(spec.fixed) + [f"{k}={v}" for k, v in params.items()]


# --- locks ------------------------------------------------------------------------------------


_LOCK_PREFIX = "mnist-hpc-lock:"


class HolderLock:
    """An exclusive lock made by ``symlink(2)``, the link's text naming its holder.

    A lock of Optuna's journal (``JournalFileBackend(lock_obj=...)``, Optuna's plugin point for
    locks) and of the search's ask step.
    Creating a symbolic link is atomic on every NFS version, and its text is written with it, so
    a lock never exists without its holder. A waiter releases a lock at once when its holder was
    a process on this host that is gone (pid, and process start time against pid reuse, as
    :func:`mnist_hpc.claim.alive` tells); otherwise after ``grace_s`` of seeing it unchanged, as
    Optuna's own lock does (a holder on another node cannot be asked). Releasing a dead holder's
    lock is serialised by a second lock (``<lock>.break``), so two waiters that both saw it dead
    never remove a live one.
    """

    def __init__(self, path: Path, grace_s: Optional[float] = None) -> None:
        self.path = str(path)
        self.grace_s = LOCK_GRACE_S if grace_s is None else grace_s
        self._text: Optional[str] = None

    @staticmethod
    def _new_text() -> str:
        from mnist_hpc.claim import Holder

        me = Holder.this_process()
        return _LOCK_PREFIX + json.dumps({"host": me.host, "pid": me.pid, "start": me.pid_start, "token": uuid.uuid4().hex})

    def acquire(self) -> bool:
        """Block until the lock is this object's; returns True (Optuna's protocol)."""
        text = self._new_text()
        self._wait_and_link(self.path, text, may_break_dead=True)
        self._text = text
        return True

    def release(self) -> None:
        """Remove the lock if it is still this object's (a waiter may have taken it after the grace period)."""
        text, self._text = self._text, None
        try:
            current = os.readlink(self.path)
        except OSError:
            current = None
        if text is not None and current == text:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            log.warning("%s was taken over while held (this process stalled for over %.0f s?)", self.path, self.grace_s)

    def _wait_and_link(self, path: str, text: str, may_break_dead: bool) -> None:
        """Create the link ``path`` -> ``text``, releasing a dead or expired holder's lock on the way."""
        delay, seen, since = 0.001, None, time.monotonic()
        warned = since
        while True:
            try:
                os.symlink(text, path)
                return
            except FileExistsError:
                pass
            current = _lock_identity(path)
            if current is None:
                continue  # released meanwhile
            if os.path.isdir(path) and not os.path.islink(path):
                raise SearchFileError(f"{path} is a directory, not a lock file; remove it (rmdir) and try again")
            now = time.monotonic()
            if current != seen:
                seen, since = current, now
            if now - warned > 10:
                log.warning("waiting for %s, held by %s", path, current.removeprefix(_LOCK_PREFIX))
                warned = now
            if may_break_dead and _holder_is_gone(current):
                self._break(current, "its holder is gone")
                delay = 0.001
                continue
            if now - since > self.grace_s:
                if may_break_dead:
                    self._break(current, f"it has been held unchanged for over {self.grace_s:.0f} s")
                else:  # the break lock itself: held for microseconds, so a dead holder died inside it
                    _unlink_if(path, current)
                delay, seen = 0.001, None
                continue
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _break(self, stale: str, why: str) -> None:
        """Remove the lock if it still is ``stale`` (under the break lock)."""
        breaker = self.path + ".break"
        mine = self._new_text()
        self._wait_and_link(breaker, mine, may_break_dead=False)
        try:
            if _unlink_if(self.path, stale):
                log.warning("released %s: %s (%s)", self.path, why, stale.removeprefix(_LOCK_PREFIX))
        finally:
            _unlink_if(breaker, mine)


def _lock_identity(path: str) -> Optional[str]:
    """What a lock file is: its link's text, or (a lock of another kind, e.g. Optuna's ``O_EXCL``
    file) its inode and modification time; None when there is none."""
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError:  # not a symbolic link
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        return f"(a file, inode {info.st_ino}, modified {info.st_mtime_ns})"


def _unlink_if(path: str, identity: str) -> bool:
    """Remove the lock ``path`` if it still is ``identity`` (:func:`_lock_identity`); whether it did."""
    try:
        if _lock_identity(path) != identity:
            return False
        os.unlink(path)
        return True
    except OSError:
        return False


def _holder_is_gone(text: str) -> bool:
    """Whether a lock's text names a process on this host that has ended."""
    from mnist_hpc import claim

    if not text.startswith(_LOCK_PREFIX):
        return False  # Optuna's own lock, or anything else: only the grace period releases it
    try:
        data = json.loads(text[len(_LOCK_PREFIX):])
        host, pid, start = data["host"], data["pid"], data.get("start")
    except (ValueError, TypeError, KeyError, RecursionError):
        return False
    if not isinstance(host, str) or not _whole(pid) or not 0 < pid < 1 << 31 or not isinstance(start, (str, type(None))):
        return False  # not a holder this module wrote
    holder, me = claim.Holder(host=host, pid=pid, pid_start=start), claim.Holder.this_process()
    if holder.host != me.host or holder.pid == me.pid:
        return False  # another node (cannot be asked), or this process (another thread of it)
    return claim.alive(holder, me) is False


class JournalLock(HolderLock):
    """The lock of the journal's appends: once held, a torn last line is cut off before Optuna appends.

    A writer killed in the middle of an append leaves a last line without its newline (or, when
    a person appended to the file, a line that is no record). Appending after it would glue the
    two into one line that no reader can parse; under the lock no live writer can be in the
    middle of an append, so the line is a dead writer's, and :func:`cut_torn_tail` removes it.
    """

    def __init__(self, journal: Path, grace_s: Optional[float] = None) -> None:
        super().__init__(Path(str(journal) + JOURNAL_LOCK_SUFFIX), grace_s)
        self.journal = Path(journal)

    def acquire(self) -> bool:
        super().acquire()
        try:
            cut_torn_tail(self.journal)
        except BaseException:
            self.release()
            raise
        return True


@contextlib.contextmanager
def held(lock: HolderLock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def ask_lock(search_dir: Path) -> "contextlib.AbstractContextManager[None]":
    """Held while a worker counts the budget, interrupts stale trials and asks for a trial.

    Counting and asking must be one step, or two workers could both take the last trial of the
    budget.
    """
    return held(HolderLock(Path(search_dir) / ASK_LOCK))


# --- the journal ------------------------------------------------------------------------------


def journal_path(search_dir: Path) -> Path:
    return Path(search_dir) / JOURNAL_FILE


def record_problem(record: Any) -> Optional[str]:
    """Why a parsed journal line is not a record Optuna writes (its shape only), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    op = record.get("op_code")
    if not _whole(op) or op not in JOURNAL_RECORD_FIELDS:
        return f"op_code {op!r:.40} is not one of Optuna's"
    if not isinstance(record.get("worker_id"), str):
        return "it has no worker_id"
    missing = [key for key in JOURNAL_RECORD_FIELDS[op] if key not in record]
    if missing:
        return f"its operation {op} lacks {', '.join(missing)}"
    for key in ("study_id", "trial_id"):
        if key in record and not (_whole(record[key]) and record[key] >= 0):
            return f"its {key} is {record[key]!r:.40}, not a whole number >= 0"
    return None


def _parse_record(line: bytes) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """A journal line (without its newline) as a record, or why it is not one."""
    from mnist_hpc.io import MAX_JSON_DEPTH, json_depth

    if len(line) > MAX_RECORD_BYTES:
        return None, f"it is longer than {MAX_RECORD_BYTES:,} bytes"
    try:
        record = json.loads(line)  # Optuna writes NaN and Infinity as JSON's extensions: accept them
    except RecursionError:
        return None, "it nests too deeply"
    except UnicodeDecodeError as exc:
        return None, f"it is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"it is not JSON ({exc.msg} at character {exc.pos})"
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        return None, f"it is not JSON Optuna wrote ({exc})"
    if json_depth(record) > MAX_JSON_DEPTH:
        return None, "it nests too deeply"
    problem = record_problem(record)
    return (None, problem) if problem else (record, None)


@dataclass
class JournalScan:
    """A journal read and checked record by record: Optuna can replay every one of ``records``."""

    path: Path
    records: list[dict[str, Any]]
    size: int
    # Bytes of the journal that hold those records: where a torn last line starts (else ``size``).
    end: int
    # Why the last line is no record (a writer stopped mid-append, or text appended by hand).
    torn: Optional[str] = None
    # The records replayed by Optuna while they were checked.
    replayed: Any = None

    def storage(self) -> "optuna.storages.JournalStorage":
        """A read-only Optuna storage of the checked records (nothing is read from the file again)."""
        from optuna.storages import JournalStorage

        if self.replayed is None:
            self.replayed = JournalStorage(_RecordsBackend(self.records))
        return self.replayed

    def describe_torn(self) -> str:
        return f"the last line of {self.path} (line {len(self.records) + 1}, from byte {self.end}) is {self.torn}"


class _RecordsBackend:
    """Optuna's journal backend over records already read and checked: replay only, no appends.

    ``JournalStorage`` calls only ``read_logs`` and ``append_logs`` of a backend (no isinstance check).
    """

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.serving = -1  # the record Optuna applies now (which one raised, if one does)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        for number in range(log_number_from, len(self.records)):
            self.serving = number
            yield self.records[number]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        raise JournalError("a checked copy of a journal is read-only")


def read_journal(path: Path) -> Optional[JournalScan]:
    """Read and check a journal without writing to it; None when it does not exist.

    Every line must be a record that Optuna replays; the last line may instead be torn (no
    newline, or no record), which :attr:`JournalScan.torn` says and Optuna's readers skip.

    Raises:
        JournalError: the file is unreadable, over :data:`MAX_JOURNAL_BYTES`, or a line before
            the last is not a record (named by its number).
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"{path} is unreadable ({exc.strerror or exc}); the study cannot be read") from exc
    if size > MAX_JOURNAL_BYTES:  # refused by its size, before a byte of it is read
        raise JournalError(f"{path} is larger than {MAX_JOURNAL_BYTES:,} bytes, more than twice what a study of "
                           "10,000 trials of the lesson writes; the study cannot be read")
    try:
        raw = read_bytes_bounded(path, MAX_JOURNAL_BYTES)
    except UntrustedFileError as exc:
        raise JournalError(f"{exc}; the study cannot be read") from exc
    if raw is None:
        return None
    scan = JournalScan(Path(path), [], len(raw), len(raw))
    start = last_start = 0
    while start < len(raw):
        newline = raw.find(b"\n", start)
        if newline == -1:
            scan.end, scan.torn = start, "cut short: it ends without a newline (a writer stopped in the middle of an append)"
            break
        record, problem = _parse_record(raw[start:newline])
        if problem is not None:
            if newline + 1 == len(raw):
                scan.end, scan.torn = start, f"no record Optuna wrote: {problem}"
                break
            raise _damaged(path, len(scan.records) + 1, problem)
        scan.records.append(record)  # type: ignore[arg-type]
        last_start, start = start, newline + 1
    _replay_check(scan, last_start)
    return scan


def _damaged(path: Path, line: int, problem: str) -> JournalError:
    return JournalError(
        f"line {line} of {path} is damaged ({problem}), and it is not the last line, so it was not left by a "
        f"writer that stopped mid-append; the study cannot be continued from it. Restore the journal from a copy "
        f"(a {JOURNAL_FILE}{TORN_COPY_INFIX}* file beside it, or a backup), or use a new hydra.sweep.dir"
    )


def _replay_check(scan: JournalScan, last_start: int) -> None:
    """Replay the records as Optuna would: one it cannot apply is damage, or torn if it is the last line."""
    from optuna.storages import JournalStorage

    backend = _RecordsBackend(scan.records)
    try:
        scan.replayed = JournalStorage(backend)  # replays every record
    except Exception as exc:  # any error of a record's values: KeyError, TypeError, ValueError...
        problem = f"a record Optuna cannot apply ({type(exc).__name__}: {exc})"
        if backend.serving != len(scan.records) - 1 or scan.torn is not None:
            raise _damaged(scan.path, backend.serving + 1, problem) from exc
        scan.records.pop()
        scan.end, scan.torn = last_start, f"no record Optuna wrote: {problem}"


def _last_line_start(fd: int, size: int) -> int:
    """Where the last line of a file starts: after the last newline before its final byte (0 if none)."""
    pos = size - 1
    while pos > 0:
        begin = max(0, pos - 4096)
        found = os.pread(fd, pos - begin, begin).rfind(b"\n")
        if found != -1:
            return begin + found + 1
        pos = begin
    return 0


def torn_tail(path: Path) -> Optional[tuple[int, str]]:
    """Where a torn last line starts and why it is torn, from the end of the file alone; None if it ends whole.

    The cheap check each append makes (one read of a few kB): the last line must end with a
    newline and be shaped like Optuna's records. :func:`read_journal` checks every line in full.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        start = _last_line_start(fd, size)
        if os.pread(fd, 1, size - 1) != b"\n":
            return start, "cut short: it ends without a newline (a writer stopped in the middle of an append)"
        if size - 1 - start > MAX_RECORD_BYTES:
            return start, f"no record Optuna wrote: it is longer than {MAX_RECORD_BYTES:,} bytes"
        _, problem = _parse_record(os.pread(fd, size - 1 - start, start))
        return None if problem is None else (start, f"no record Optuna wrote: {problem}")
    finally:
        os.close(fd)


def _keep_copy(path: Path) -> Path:
    """A copy of the whole journal beside it (``study.journal.torn-<UTC time>-<8 hex>``), written atomically."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = path.with_name(f"{path.name}{TORN_COPY_INFIX}{stamp}-{uuid.uuid4().hex[:8]}")
    with atomic_path(copy) as tmp:
        shutil.copyfile(path, tmp)
    return copy


@dataclass
class Cut:
    """A torn last line cut off a journal: where it started, why it was torn, and the copy kept."""

    path: Path
    end: int
    why: str
    copy: Path

    def describe(self) -> str:
        return (f"the last line of {self.path} (from byte {self.end}) was {self.why}; it was cut off, and the journal "
                f"as it was is kept in {self.copy}")


def _cut(path: Path, end: int, why: str) -> Cut:
    """Keep a copy of the journal, then cut it to its first ``end`` bytes.

    Only under the journal's lock: no live writer is in the middle of an append.
    """
    copy = _keep_copy(path)
    with open(path, "r+b") as fh:
        fh.truncate(end)
        os.fsync(fh.fileno())
    cut = Cut(path, end, why, copy)
    log.warning("%s", cut.describe())
    return cut


def cut_torn_tail(path: Path) -> Optional[Cut]:
    """Under the journal's lock: cut a torn last line off (:func:`torn_tail`), if there is one."""
    torn = torn_tail(path)
    return None if torn is None else _cut(path, *torn)


@dataclass
class JournalCheck:
    """What :func:`check_journal` found: the checked records, the study's trials, and a cut if one was made."""

    scan: Optional[JournalScan]
    # The study's trials, replayed from the checked records (empty for a new study).
    trials: list["FrozenTrial"] = field(default_factory=list)
    cut: Optional[Cut] = None

    def note(self) -> Optional[str]:
        """The line the submission prints and the worker logs about a cut, if there was one."""
        return None if self.cut is None else self.cut.describe()


def study_trials(storage: Any, study_name: str) -> Optional[list["FrozenTrial"]]:
    """The trials of ``study_name`` in a storage; None when it holds no such study."""
    try:
        return list(storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False))
    except KeyError:
        return None


def check_journal(search_dir: Path, study_name: str) -> JournalCheck:
    """Check the study's journal before it is used, and repair a torn last line; the one gate.

    Called by the submission before it queues anything and by each worker before it opens the
    study:

    - every line is a record Optuna replays, else refused, naming the line;
    - trial directories with no record (a journal missing, emptied, truncated, or another
      study's) are refused: a new study would collide with them;
    - a torn last line (a writer killed mid-append, or text appended by hand) is cut off after
      a copy of the whole journal is kept beside it.

    The records are read and checked without the lock (reading a 10,000-trial journal takes
    seconds, and holding the lock that long would stall every worker's appends, or exceed the
    grace period after which others take it); the cut is decided and made under the journal's
    lock, so a live writer's append is never taken for a torn line: the line the check found
    torn is cut only if nothing was appended since, else whatever is torn at the end now.

    Raises:
        JournalError: any refusal above; the message names the file and what to do.
        SearchFileError: the journal's lock is not a lock file.
    """
    path = journal_path(search_dir)
    scan = read_journal(path)
    trials = (study_trials(scan.storage(), study_name) if scan is not None and scan.records else None) or []
    orphans = [n for n in trial_numbers(search_dir) if n >= len(trials)]
    if orphans:
        if scan is None or not scan.records:
            what = "does not exist" if scan is None else "holds no record"
        elif not trials:
            what = f"holds no trial of a study named {study_name!r}"
        else:
            what = f"knows trials 0-{len(trials) - 1} only"
        raise JournalError(
            f"{path} {what}, but {search_dir} holds directories of trials {number_ranges(orphans)}: the study's "
            "record of them is lost, and a new one would collide with them. Restore the journal (a "
            f"{JOURNAL_FILE}{TORN_COPY_INFIX}* copy beside it, or a backup), or use a new hydra.sweep.dir; "
            f"mnist-hpc-status {search_dir} still shows each trial's own results"
        )
    check = JournalCheck(scan, trials=trials)
    if scan is not None:
        with held(HolderLock(Path(str(path) + JOURNAL_LOCK_SUFFIX))):
            unchanged = scan.torn is not None and os.stat(path).st_size == scan.size
            check.cut = _cut(path, scan.end, scan.torn) if unchanged else cut_torn_tail(path)  # type: ignore[arg-type]
    return check


def open_storage(search_dir: Path) -> "optuna.storages.JournalStorage":
    """The study's storage: the journal file, its appends under :class:`JournalLock`.

    The backend creates the journal file when it is missing: a worker calls :func:`check_journal`
    first, readers use :func:`read_journal`.
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(search_dir)
    # Optuna calls only acquire() and release() of its lock (tests/test_search_journal.py pins it);
    # its base class is not public, and subclassing it would import Optuna with this module.
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalLock(path)))  # type: ignore[arg-type]


def is_interrupted(trial: "FrozenTrial") -> bool:
    return INTERRUPTED_ATTR in trial.user_attrs


def counts_toward_budget(trial: "FrozenTrial") -> bool:
    """Finished trials count toward ``n_trials``; an interrupted one does not (its retry does)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not is_interrupted(trial)


def trial_number_attr(trial: "FrozenTrial", key: str) -> Optional[int]:
    """A user attribute that names another trial (``retry_of``, ``resumed_from``), if it is a whole number >= 0."""
    value = trial.user_attrs.get(key)
    return value if _whole(value) and 0 <= value < 1 << 31 else None



# --- worker heartbeats ------------------------------------------------------------------------

BEAT_STATES = ("queued", "running", "done", "stopped", "requeued")


@dataclass
class WorkerBeat:
    """A worker's heartbeat file: who it is, what it runs, and how it ended."""

    job_id: str
    # "slurm" or "local" (submitit's executor): whom to ask for the job's state.
    cluster: str = ""
    # The worker's process (``mnist_hpc.claim.Holder``'s fields): status tells a dead one by them.
    host: str = ""
    pid: int = 0
    pid_start: Optional[str] = None
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

    def holder(self) -> Optional["Holder"]:
        """The worker's process, for :func:`mnist_hpc.claim.alive`; None when the file does not name one.

        A local worker that has not started yet is known by its job id, which is submitit's pid.
        """
        from mnist_hpc.claim import Holder

        pid = self.pid or (int(self.job_id) if self.cluster == "local" and re.fullmatch(r"[0-9]{1,9}", self.job_id) else 0)
        return Holder(host=self.host, pid=pid, pid_start=self.pid_start) if self.host and 0 < pid < 1 << 31 else None


def beat_problem(data: Any) -> Optional[str]:
    """What is wrong with a heartbeat file's content (types and ranges), or None."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, expected an object"
    strings = ("job_id", "cluster", "host", "started", "beat", "state", "message", "log")
    for key in strings:
        if key in data and not isinstance(data[key], str):
            return f"field {key!r} is {data[key]!r:.40}, expected a string"
    checks = [
        (isinstance(data.get("job_id"), str) and 0 < len(data["job_id"]) <= 200, "it has no job_id"),
        (data.get("cluster", "") in ("", "slurm", "local"), "field 'cluster' must be slurm or local"),
        (data.get("state", "running") in BEAT_STATES, f"field 'state' must be one of {', '.join(BEAT_STATES)}"),
        (_whole(data.get("pid", 0)) and 0 <= data.get("pid", 0) < 1 << 31, "field 'pid' must be a process id"),
        (data.get("pid_start") is None or (isinstance(data["pid_start"], str) and data["pid_start"].isdigit()),
         "field 'pid_start' must be a number of clock ticks"),
        (data.get("trial") is None or (_whole(data["trial"]) and 0 <= data["trial"] < 1 << 31),
         "field 'trial' must be a trial number (a whole number >= 0)"),
        (isinstance(data.get("trials_run", []), list)
         and all(_whole(n) and 0 <= n < 1 << 31 for n in data.get("trials_run", [])),
         "field 'trials_run' must list trial numbers"),
    ]
    return next((message for ok, message in checks if not ok), None)


def beat_path(search_dir: Path, job_id: str) -> Path:
    return Path(search_dir) / WORKERS_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}.json"


def write_beat(search_dir: Path, beat: WorkerBeat) -> Path:
    """Rewrite the worker's file (a new inode and modification time: the heartbeat itself)."""
    beat.beat = utc_now()
    path = beat_path(search_dir, beat.job_id)
    write_json_atomic(path, asdict(beat))
    return path


def read_beat(path: Path) -> WorkerBeat:
    """One heartbeat file.

    Raises:
        SearchFileError: unreadable, too large, not JSON, or a field out of range.
    """
    try:
        data = read_json(path, MAX_BEAT_BYTES)
    except (FileNotFoundError, UntrustedFileError) as exc:
        raise SearchFileError(str(exc)) from exc
    problem = beat_problem(data)
    if problem is not None:
        raise SearchFileError(f"{path}: {problem}")
    known = {f.name for f in fields(WorkerBeat)}
    return WorkerBeat(**{k: v for k, v in data.items() if k in known})


def read_beats(search_dir: Path) -> tuple[list[tuple[WorkerBeat, float]], list[str]]:
    """Every worker's file with its modification time; damaged files become notes."""
    out: list[tuple[WorkerBeat, float]] = []
    notes: list[str] = []
    directory = Path(search_dir) / WORKERS_DIR
    paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
    for path in paths:
        try:
            beat = read_beat(path)
            out.append((beat, path.stat().st_mtime))
        except (OSError, SearchFileError) as exc:
            notes.append(f"{exc}; this worker heartbeat is ignored")
    return out, notes


def beat_mtime(search_dir: Path, job_id: str) -> Optional[float]:
    try:
        return os.stat(beat_path(search_dir, job_id)).st_mtime
    except OSError:
        return None

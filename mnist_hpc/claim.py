"""Who may write a run directory: the config it is bound to, and the one live job that holds it.

A run directory holds the results of one config. Its ``identity.json`` (written once, by the
first run or submission that claims it) binds it to a fingerprint of everything that decides
what the run computes; its ``lease.json`` names the one job (Slurm job, or host and pid) that
writes it now. Before anything in a directory changes:

- a different config is refused, naming the keys that differ (use another directory);
- fewer ``train.epochs`` than the run has finished is refused; more continues the run;
- a second live writer is refused, naming the holder; a holder that is gone is taken over.

The same checks run twice: on the login node before a job is queued (nothing is queued if
one fails), and in the job itself before it writes (another submission, or a run started by
hand, may have come in between). File formats are :mod:`mnist_hpc.rundir`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from mnist_hpc import rundir, slurm
from mnist_hpc.config import flat_config, identity_config
from mnist_hpc.io import exclusive_lock, path_problem

log = logging.getLogger(__name__)

class RunConflict(RuntimeError):
    """This run may not write this directory (another config, fewer epochs, or a live holder)."""


def identity_of(cfg: Any, data_sha256: str) -> dict[str, Any]:
    """The keys and values that decide what a run with config ``cfg`` computes, and the data's hash."""
    return identity_from_flat(flat_config(cfg), data_sha256)


def identity_from_flat(flat: dict[str, Any], data_sha256: str) -> dict[str, Any]:
    """:func:`identity_of` from the config already flattened (``mnist_hpc.config.flat_config``)."""
    # Which keys bind is each key's ``identity`` fact (mnist_hpc.config.KEYS): not where things
    # are, how fast and how often a run works, or how many epochs it has (more continue the run).
    return dict(sorted({**identity_config(flat), "data.sha256": data_sha256}.items()))


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: recorded -> wanted`` for every key whose value differs."""
    keys = sorted(set(recorded) | set(wanted))
    return [f"{k}: {recorded.get(k, '(unset)')!r} -> {wanted.get(k, '(unset)')!r}" for k in keys if recorded.get(k) != wanted.get(k)]


@dataclass
class Verdict:
    """What a run with a given config and epoch count may do in a directory."""

    # "new" (nothing there yet), "continue" (resume or extend), or "done" (finished with these epochs).
    action: str
    epochs_done: int = 0


def judge(run_dir: Path, identity: dict[str, Any], epochs: int, label: str) -> Verdict:
    """Whether a run of ``identity`` for ``epochs`` epochs may use ``run_dir``.

    Raises:
        RunConflict: the directory holds another config, more finished epochs than asked for,
            a damaged identity file, or an entry of the wrong kind (a directory where the run
            writes a file, say: :func:`mnist_hpc.rundir.layout_problems`).
    """
    if not os.path.lexists(run_dir):  # nothing there yet (every trial of a new sweep): nothing to check
        return Verdict("new")
    problems = rundir.layout_problems(run_dir)
    if problems:
        raise RunConflict(f"{_at(label)}{'; '.join(problems)}, then run again")
    try:
        recorded = rundir.read_identity(run_dir)
    except rundir.RunFileError as exc:
        raise RunConflict(f"{_at(label)}{exc}; this directory cannot be trusted: use a new one") from exc
    if recorded is None:
        if rundir.holds_results(run_dir):
            raise RunConflict(
                f"{_at(label)}{run_dir} holds results but no {rundir.IDENTITY_FILE} (written by an older mnist-hpc?), "
                "so it is not known which config they belong to; use a new directory"
            )
        return Verdict("new")
    if recorded.get("fingerprint") != fingerprint(identity):
        changed = differences(recorded.get("config", {}), identity)
        raise RunConflict(
            f"{_at(label)}{run_dir} holds a run of another config ({'; '.join(changed) or 'fingerprint differs'}). "
            "Its results would be relabelled; use a new directory (e.g. another hydra.sweep.dir or hydra.run.dir), "
            "or submit the same overrides as before to continue it"
        )
    done = _epochs_finished(run_dir)
    if done is None:
        return Verdict("continue")
    if epochs < done:
        raise RunConflict(
            f"{_at(label)}{run_dir} has finished {done} epoch(s); train.epochs={epochs} asks for fewer, which cannot be "
            f"undone. Use train.epochs>={done} (more epochs continue the run) or a new directory"
        )
    return Verdict("done" if epochs == done else "continue", done)


def bind(run_dir: Path, identity: dict[str, Any], epochs: int, label: str) -> Verdict:
    """Under the lease: :func:`judge`, then make the directory this run's.

    A new directory gets its ``identity.json``; half-written files of dead writers go; the config
    Hydra wrote for this attempt becomes the run's ``.hydra`` (except for a run that is already
    done, which changes nothing); a finished run that is asked for more epochs loses its final
    ``metrics.json`` until it finishes again, so that nothing shows old numbers as final.

    Raises:
        RunConflict: as :func:`judge`.
    """
    verdict = judge(run_dir, identity, epochs, label)
    if verdict.action == "done":
        rundir.discard_hydra_files(run_dir)
        return verdict
    if verdict.action == "new":
        rundir.write_identity(run_dir, identity, fingerprint(identity))
    # This attempt supersedes an earlier one's failure.
    rundir.clear_failure(run_dir)
    for path in rundir.remove_stale_temporaries(run_dir):
        log.info("removed %s, left half-written by a writer that is gone", path.name)
    rundir.commit_hydra_files(run_dir)
    if verdict.epochs_done:
        rundir.retract_metrics(run_dir)
    return verdict


def settle_unclaimed(run_dir: Path) -> None:
    """A run that failed before its claim: keep Hydra's record of it in a directory nobody claimed."""
    try:
        unclaimed = rundir.read_identity(run_dir) is None and not rundir.holds_results(run_dir)
    except (rundir.RunFileError, OSError):
        unclaimed = False
    if unclaimed and run_dir.is_dir():
        rundir.commit_hydra_files(run_dir)
    else:
        rundir.discard_hydra_files(run_dir)


def _at(label: str) -> str:
    return f"{label}: " if label else ""


def _epochs_finished(run_dir: Path) -> Optional[int]:
    try:
        metrics = rundir.read_metrics(run_dir)
    except rundir.RunFileError:
        return None  # a damaged metrics.json is rewritten when the run finishes again
    return None if metrics is None else len(metrics["history"])


# --- a sweep's trial directories ----------------------------------------------------------------

# Names a sweep directory keeps for itself (the report, an asynchronous search's files); names that
# start with a dot (submitit's folder, temporaries) are kept too. No trial directory may be one.
SWEEP_OWN_NAMES = frozenset({"report", "workers", "multirun.yaml", "search.json", "study.journal"})


def trial_dir_problems(sweep_dir: Path, run_dirs: Sequence[tuple[int, Path]]) -> list[str]:
    """Why these trials' directories cannot be their own, each inside ``sweep_dir``; [] when they can.

    Each directory (``..`` and symbolic links resolved) must lie strictly inside the sweep
    directory, must not be a name the sweep keeps for itself, and must be no other trial's, nor
    inside or around another trial's: two trials in one directory would show one's results as the
    other's (``hydra.sweep.subdir`` decides the names).
    """
    sweep = Path(os.path.realpath(sweep_dir))
    problems: list[str] = []
    if rundir.is_run_dir(sweep):
        return [f"the sweep directory {sweep_dir} is the run directory of an earlier launch; choose another "
                "hydra.sweep.dir"]
    if (nested := nesting_problem(sweep, "hydra.sweep.dir", inside_too=False)) is not None:
        return [nested]
    placed: dict[Path, int] = {}
    for num, run_dir in run_dirs:
        if (too_long := path_problem(run_dir, "hydra.sweep.dir or hydra.sweep.subdir")) is not None:
            problems.append(f"trial {num}: {too_long}")
            continue
        where = Path(os.path.realpath(run_dir))
        relative = where.relative_to(sweep) if where != sweep and sweep in where.parents else None
        if where == sweep:
            problems.append(
                f"trial {num} would write the sweep directory {sweep} itself; hydra.sweep.subdir must name a "
                "directory inside it (e.g. ${hydra.job.num})"
            )
            continue
        if relative is None:
            problems.append(
                f"trial {num} would write {where}, outside the sweep directory {sweep}; hydra.sweep.subdir must "
                "name a directory inside it (no absolute path, no '..')"
            )
            continue
        first = relative.parts[0]
        if first.startswith(".") or first in SWEEP_OWN_NAMES:
            problems.append(
                f"trial {num} would write {where}, but {first!r} is the sweep directory's own; choose another "
                "hydra.sweep.subdir"
            )
            continue
        placed.setdefault(where, num)
        if placed[where] != num:
            problems.append(
                f"trials {placed[where]} and {num} would both write {where}; hydra.sweep.subdir must give every "
                "trial a directory of its own (include ${hydra.job.num}, or every swept key)"
            )
    for where, num in placed.items():
        for parent in where.parents:
            if parent == sweep:
                break
            if parent in placed:
                problems.append(
                    f"trial {num} would write {where}, inside trial {placed[parent]}'s directory {parent}; "
                    "hydra.sweep.subdir must keep trials apart"
                )
                break
            if rundir.is_run_dir(parent):  # an earlier launch's
                problems.append(
                    f"trial {num} would write {where}, inside the run directory {parent} of an earlier launch; "
                    "choose a hydra.sweep.subdir that keeps trials apart, or another hydra.sweep.dir"
                )
                break
    for where, num in placed.items():
        inner = _run_dir_inside(where)
        if inner is not None:
            problems.append(
                f"trial {num} would write {where}, which holds the run directory {inner} of an earlier launch; "
                "choose a hydra.sweep.subdir that keeps trials apart, or another hydra.sweep.dir"
            )
    return problems


def nesting_problem(directory: Path, setting: str, inside_too: bool = True) -> Optional[str]:
    """Why ``directory`` (a run's, or a sweep's) cannot be used: it lies inside an earlier launch's run
    directory, or (``inside_too``) holds one; None when neither. A run in a run would show one's
    results as the other's, and each would take the other's files for its own."""
    where = Path(os.path.realpath(directory))
    for parent in where.parents:
        if rundir.is_run_dir(parent):
            return (f"{directory} lies inside the run directory {parent} of an earlier launch; choose another "
                    f"{setting}")
    inner = _run_dir_inside(where) if inside_too else None
    if inner is not None:
        return f"{directory} holds the run directory {inner} of an earlier launch; choose another {setting}"
    return None


def _run_dir_inside(directory: Path) -> Optional[Path]:
    """A run directory strictly inside ``directory`` (not counting a run's own entries), if any."""
    if not directory.is_dir():
        return None
    for root, dirs, _ in os.walk(directory):
        if Path(root) != directory and rundir.is_run_dir(Path(root)):
            return Path(root)
        dirs[:] = [d for d in dirs if not (Path(root) == directory and d in rundir.RUN_DIRS) and not d.startswith(".")]
    return None


# --- the lease ---------------------------------------------------------------------------------


@dataclass
class Holder:
    """A process that writes a run directory: a Slurm job, or a process on a host."""

    host: str
    pid: int
    pid_start: Optional[str] = None
    slurm_job_id: Optional[str] = None
    # How people know the job: "1234_5" for an array task.
    job_label: Optional[str] = None
    user: str = ""

    @classmethod
    def this_process(cls, slurm_job_id: Optional[str] = None, job_label: Optional[str] = None) -> "Holder":
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()), slurm_job_id, job_label, user)

    def describe(self) -> str:
        who = f"Slurm job {self.job_label or self.slurm_job_id}" if self.slurm_job_id else "a process"
        return f"{who} (pid {self.pid} on {self.host}, user {self.user or '?'})"


def _proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): tells a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def alive(holder: Holder, me: Holder, slurm_alive: Optional[Callable[[str], Optional[bool]]] = None) -> Optional[bool]:
    """Whether ``holder`` may still write; None when that cannot be told from here.

    ``slurm_alive`` answers for a Slurm job id (default: :func:`mnist_hpc.slurm.job_alive`, one
    squeue call; the preflight passes answers it got for all trials at once).
    """
    if holder.slurm_job_id:
        if holder.slurm_job_id == me.slurm_job_id:
            return False  # this very job, requeued: its earlier run is gone
        return (slurm_alive or slurm.job_alive)(holder.slurm_job_id)
    if holder.host != me.host:
        return None
    if holder.pid == me.pid and holder.pid_start == me.pid_start:
        return False  # this process took it earlier (a second run in one interpreter)
    if not isinstance(holder.pid, int) or not 0 < holder.pid < 2**31:
        return None  # no process id to ask (kill(0) or kill(-1) would ask about others)
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process exists
    fields = _proc_stat(holder.pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # it has ended; only its exit status waits for its parent (a zombie)
    return holder.pid_start is None or (fields[19] if fields else None) == holder.pid_start


def job_holder(record: "rundir.JobRecord") -> Holder:
    """The process (local launcher: its job id is the pid) or Slurm job that a ``job.json`` names.

    A local record written before hosts were recorded is taken to be this host's, as the local
    launcher runs its jobs where it was started.
    """
    if record.cluster == "local":
        pid = int(record.job_id) if record.job_id.isdigit() else -1
        return Holder(host=record.host or socket.gethostname(), pid=pid, pid_start=record.pid_start)
    return Holder(host="", pid=-1, slurm_job_id=record.job_id)


def check_lease(
    run_dir: Path, me: Holder, label: str, slurm_alive: Optional[Callable[[str], Optional[bool]]] = None
) -> None:
    """Refuse when another live writer holds ``run_dir`` (or when that cannot be told; ``slurm_alive`` as in :func:`alive`)."""
    try:
        lease = rundir.read_lease(run_dir)
    except rundir.RunFileError as exc:
        log.warning("%s; treating the lease as stale", exc)
        return
    if lease is None:
        return
    holder = lease_holder(lease)
    state = alive(holder, me, slurm_alive)
    if state is False:
        return
    path = run_dir / rundir.LEASE_FILE
    if state is None:
        raise RunConflict(
            f"{_at(label)}{path} names {holder.describe()} as the writer of this run, and it cannot be told from "
            f"here whether it still runs; if it is gone, remove {path} and try again"
        )
    raise RunConflict(
        f"{_at(label)}{run_dir} is being written by {holder.describe()}, which is still alive; wait for it to end "
        "(or cancel it) before starting another run in this directory"
    )


def lease_holder(lease: dict[str, Any]) -> Holder:
    """The holder a lease (``rundir.read_lease``) names."""
    return Holder(**{k: v for k, v in lease.get("holder", {}).items() if k in _HOLDER_FIELDS})


_HOLDER_FIELDS = frozenset(f.name for f in dataclasses.fields(Holder))


@contextlib.contextmanager
def lease(run_dir: Path, me: Holder, label: str) -> Iterator[None]:
    """Hold ``run_dir``'s lease for the duration: refuse a live holder, take over a gone one.

    The check and the take happen under an exclusive lock on ``.lease.lock`` in the directory, so
    two starters cannot both take it; the lease is removed on the way out if it is still ours.
    """
    with rundir.lease_lock(run_dir):
        check_lease(run_dir, me, label)
        rundir.write_lease(run_dir, dataclasses.asdict(me))
    try:
        yield
    finally:
        rundir.release_lease(run_dir, dataclasses.asdict(me))


# Held by a launch while it checks its trials' directories, queues its jobs and records them.
LAUNCH_LOCK = ".launch.lock"


@contextlib.contextmanager
def launch_lock(sweep_dir: Path) -> Iterator[None]:
    """One launch at a time into ``sweep_dir`` (an exclusive lock on its ``.launch.lock``).

    A launch checks that its trials' directories are free, queues its jobs, then writes their
    ``job.json``: two launches racing into one sweep would both find the directories free and
    record each other's trials over one another. Under this lock the second finds the first's
    jobs recorded and is refused, naming them.
    """
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(sweep_dir) / LAUNCH_LOCK):
        yield

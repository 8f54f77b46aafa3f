"""Reading a sweep's trials (or one run) on the login node: their files and their jobs' states.

Shared by ``mnist-hpc-status`` and ``mnist-hpc-report``: each finds the run directories of
its target here (:func:`find_runs`), reads them (:func:`read_trials`) and shows the result
its own way. A run's files are read through :mod:`mnist_hpc.rundir` (which also derives its
state), its job's state comes from :mod:`mnist_hpc.slurm`. A sweep that is still
running is normal: missing files mean "not there yet", and a damaged file becomes a note on
its trial, never an error that stops the command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from mnist_hpc import claim, rundir, slurm
from mnist_hpc.io import UntrustedFileError, read_tail_bounded

TRACEBACK_START = "Traceback (most recent call last):"
# What Slurm writes into a job's stderr when it cancels or kills it (time limit, memory, scancel).
SLURM_ERROR = "slurmstepd: error:"
# Only the end of a job log is read: the traceback that ended the job is there, and logs can be long.
LOG_TAIL_BYTES = 256 * 1024
# What a failed trial's error says when neither failure.json nor its log tells why.
NO_ERROR_LINE = "no error line found"


class TargetError(RuntimeError):
    """A target is neither a sweep directory with trials nor a run directory."""


@dataclass
class Trial:
    """One run (a trial of a sweep, or a single run) and its job, as status and report show it."""

    # None for a job named by its id only (``mnist-hpc-status 1234``).
    run_dir: Optional[Path]
    files: rundir.RunFiles
    job_id: str = "-"
    # "slurm" or "local", "files" for a run that was not submitted; " (files)" is added when
    # the state had to come from the files because no scheduler knew the job.
    source: str = "files"
    state: str = "UNKNOWN"
    elapsed: str = ""
    node: str = ""
    exit_code: str = ""
    # Why a file was ignored, or how the state was obtained.
    notes: list[str] = field(default_factory=list)
    # The error line of an unfinished trial (failure.json or its own job log).
    error: Optional[str] = None
    # A pending job's reason code and expected start (squeue), "" when none.
    reason: str = ""
    expected_start: str = ""
    # What its job (or array task) used, from accounting; None before it started.
    usage: Optional[slurm.Usage] = None
    # This trial's share of its job's cost: 1 alone, its part of the wall time in a packed task.
    share: float = 1.0
    share_note: str = ""
    # When the record naming its job was written (job.json's ``submitted``; a search worker's start):
    # only the job Slurm had under that id then is this trial's. None: joined by id alone.
    recorded: Optional[datetime] = None
    # When the first run of the job its record names was queued (Slurm's Submit): trials naming one id
    # share a job only if they share this too.
    job_anchor: Optional[datetime] = None

    @property
    def number(self) -> Optional[int]:
        """The trial's number in its sweep (``job.json``, else the directory's numeric name)."""
        if self.files.job is not None and self.files.job.trial is not None:
            return self.files.job.trial
        return int(self.run_dir.name) if self.run_dir is not None and self.run_dir.name.isascii() and self.run_dir.name.isdigit() else None

    @property
    def label(self) -> str:
        if self.number is not None:
            return f"trial {self.number}"
        return f"run {self.run_dir.name}" if self.run_dir is not None else f"job {self.job_id}"

    @property
    def overrides(self) -> list[str]:
        return self.files.overrides

    @property
    def finished(self) -> bool:
        return self.files.finished

    @property
    def history(self) -> list[dict[str, float]]:
        return self.files.history

    @property
    def epochs_done(self) -> Optional[int]:
        return self.files.epochs[0]

    @property
    def epochs_planned(self) -> Optional[int]:
        return self.files.epochs[1]

    def _metric(self, key: str) -> Optional[float]:
        value = (self.files.metrics or {}).get(key)
        return float(value) if value is not None else None

    @property
    def best_val_accuracy(self) -> Optional[float]:
        return self._metric("best_val_accuracy")

    @property
    def val_accuracy(self) -> Optional[float]:
        return self._metric("val_accuracy")

    @property
    def test_accuracy(self) -> Optional[float]:
        return self._metric("test_accuracy")

    @property
    def wall_time_s(self) -> Optional[float]:
        return self._metric("wall_time_s")

    @property
    def tasks(self) -> int:
        """Slurm tasks that train this run together (one run, one row, whatever the count)."""
        return self.files.job.tasks if self.files.job else 1

    @property
    def packed_slot(self) -> Optional[int]:
        return self.files.job.packed_slot if self.files.job else None

    @property
    def stdout(self) -> Optional[str]:
        return self.files.job.stdout if self.files.job else None

    @property
    def stderr(self) -> Optional[str]:
        return self.files.job.stderr if self.files.job else None

    @property
    def wait(self) -> Optional[slurm.Reason]:
        """Why its job is pending, in words; None unless it is."""
        return slurm.explain_reason(self.reason) if self.state == "PENDING" else None

    @property
    def own_wall_s(self) -> Optional[float]:
        """Its recorded wall time: metrics.json's, else the seconds of the epochs done so far."""
        if self.wall_time_s is not None:
            return self.wall_time_s
        seconds = [r.get("seconds") for r in self.history]
        return float(sum(seconds)) if seconds and all(isinstance(x, (int, float)) for x in seconds) else None

    def cost_row(self) -> Optional[dict[str, Any]]:
        """Its cost and sizing figures (its share of a packed task's); None before its job started."""
        u = self.usage
        if u is None:
            return None
        gb = 1024**3
        return {
            "elapsed_s": u.elapsed_s,
            "alloc_cpus": u.alloc_cpus,
            "cpu_time_s": None if u.cpu_s is None else round(u.cpu_s * self.share, 3),
            "cpu_efficiency": None if u.cpu_efficiency is None else round(u.cpu_efficiency, 4),
            "core_hours": round(u.core_hours * self.share, 6),
            "gpus": u.gpus,
            "gpu_hours": round(u.gpu_hours * self.share, 6),
            "max_rss_gb": None if u.max_rss_bytes is None else round(u.max_rss_bytes / gb, 3),
            "req_mem_gb": None if u.req_mem_bytes is None else round(u.req_mem_bytes / gb, 3),
            "share": round(self.share, 4),
            "share_note": self.share_note,
        }

    def status_row(self) -> dict[str, Any]:
        """What ``mnist-hpc-status --json`` prints for this trial."""
        result_file = self.files.job.result_file if self.files.job else None
        return {
            "trial": self.number,
            "job_id": self.job_id,
            "state": self.state,
            "elapsed": self.elapsed,
            "node": self.node,
            "exit_code": self.exit_code,
            "last_epoch": self.epochs_done,
            "epochs": self.epochs_planned,
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "log": self.stdout,
            "overrides": self.overrides,
            "source": self.source,
            "result_file": None if result_file is None else str(result_file),
            "packed_slot": self.packed_slot,
            "tasks": self.tasks,
            "notes": self.notes,
            # Why an unfinished trial failed (failure.json, or its job's own log).
            "error": self.error,
            "reason": self.reason or None,
            "reason_words": self.wait.words if self.wait else None,
            "todo": self.wait.todo.replace("JOBID", self.job_id) if self.wait else None,
            "expected_start": self.expected_start or None,
            "cost": self.cost_row(),
        }


# --- finding runs -------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is one run's directory (submitted, or a plain Hydra run)."""
    return rundir.is_run_dir(path)


def trial_dirs(sweep_dir: Path, ordered: bool = True) -> list[Path]:
    """A sweep's trial directories (basic or Optuna sweeper), in trial order (``ordered``), else by path.

    Ordering reads every ``job.json``: a caller that reads the trials anyway passes
    ``ordered=False`` and sorts them with :func:`sort_trials` instead of reading each file twice.

    Each is where ``hydra.sweep.subdir`` put it (its number by default, any name or depth
    otherwise): a directory below the sweep holding a run's ``job.json`` or Hydra's overrides.
    The sweep's own entries (``.submitit``, ``report``, hidden files) are not searched, and no
    run directory is searched for others (a launch refuses trials inside trials).
    """
    found: list[Path] = []
    stack = [Path(sweep_dir)]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or (directory == Path(sweep_dir) and entry.name in claim.SWEEP_OWN_NAMES):
                continue
            try:
                # A symbolic link is never followed: to "." it would list every trial again, to
                # another sweep show its trials as this one's, to "/usr" walk a whole tree.
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            # Strings, not Paths, on this hot path (a sweep of 10,000 trials); isfile is False where
            # a file cannot be seen (another user's private folder).
            if os.path.isfile(os.path.join(entry.path, rundir.JOB_FILE)) or os.path.isfile(
                    os.path.join(entry.path, rundir.HYDRA_OVERRIDES)):
                found.append(Path(entry.path))
            else:
                stack.append(Path(entry.path))
    return sorted(found, key=_trial_order) if ordered else sorted(found)


def _trial_order(path: Path) -> tuple[int, int, str]:
    """Trials by their number (``job.json``, else an ASCII-numbered name), then by path."""
    try:
        record = rundir.read_job(path)
    except rundir.RunFileError:
        record = None
    if record is not None and record.trial is not None:
        return 0, record.trial, str(path)
    if path.name.isascii() and path.name.isdigit():
        return 0, int(path.name), str(path)
    return 1, 0, str(path)


def sort_trials(trials: Sequence[Trial]) -> list[Trial]:
    """Trials in the order of :func:`trial_dirs` (by number, then path), from what was read of them."""
    return sorted(trials, key=lambda t: (0, t.number, str(t.run_dir)) if t.number is not None else (1, 0, str(t.run_dir)))


def find_runs(target: Path, ordered: bool = True) -> tuple[bool, list[Path]]:
    """Whether ``target`` is a sweep, and its run directories (the target itself for a run).

    Raises:
        TargetError: ``target`` holds neither numbered trials nor a run.
    """
    if not target.is_dir():
        raise TargetError(f"{target} is not a directory; pass a sweep directory or a run directory")
    if is_run_dir(target):
        return False, [target]
    trials = trial_dirs(target, ordered)
    if not trials:
        raise TargetError(
            f"{target} holds no trials (numbered directories with {rundir.JOB_FILE} or {rundir.HYDRA_OVERRIDES}) "
            f"and is not a run directory (no {rundir.JOB_FILE}, {rundir.METRICS_FILE} or {rundir.HYDRA_OVERRIDES}); "
            "pass a sweep directory such as $SCRATCH/mnist-hpc/sweeps/<date>/<time> or one of its numbered "
            "trial directories"
        )
    return True, trials


# --- reading them -------------------------------------------------------------------------------


def read_trial(run_dir: Path) -> Trial:
    """A run's files, before its job's state is known."""
    files = rundir.read_run(run_dir)
    trial = Trial(run_dir=Path(run_dir), files=files, notes=list(files.notes))
    if files.job is not None:
        trial.job_id, trial.source = files.job.job_id, files.job.cluster
        trial.recorded = files.job.submitted_at
    return trial


def job_trial(job_id: str, recorded: Optional[datetime] = None) -> Trial:
    """A job named by its Slurm id only; ``recorded``: a time it was known to hold the id (see :class:`Trial`)."""
    return Trial(run_dir=None, files=rundir.RunFiles(Path()), job_id=job_id, source="slurm", recorded=recorded)


def _expand_arrays(trials: list[Trial], rows: dict[str, slurm.Row]) -> list[Trial]:
    """A bare array id (``123``) named on the command line stands for all of its tasks."""
    bare = {t.job_id for t in trials if t.run_dir is None and t.job_id not in rows}
    if not bare:  # a sweep's trials name their own tasks: nothing to expand (and no pass over rows)
        return trials
    tasks: dict[str, list[str]] = {}
    for key in rows:
        base, _, index = key.partition("_")
        if base in bare and index:
            tasks.setdefault(base, []).append(key)
    out: list[Trial] = []
    for t in trials:
        if t.run_dir is None and t.job_id in tasks:
            out += [job_trial(task) for task in sorted(tasks[t.job_id], key=lambda k: k.split("_", 1)[1].zfill(9))]
        else:
            out.append(t)
    return out


def fill_states(trials: list[Trial]) -> tuple[list[Trial], list[str]]:
    """Each trial's state, elapsed time and node: Slurm's view joined with the trial's files.

    Returns:
        The trials (a bare array id expanded into its tasks) and notes on where states came from.
    """
    slurm_ids = [t.job_id for t in trials if t.source == "slurm"]
    # A job all of whose runs wrote their result has ended: the controller is not asked about it.
    ended = {id(t): _ended(t) for t in trials if t.run_dir is not None}
    unended = {t.job_id for t in trials if t.source == "slurm" and not ended.get(id(t), False)}
    # Several trials name one id: one job (a packed task, a search worker's trials), or jobs that had
    # the id at different times (a sweep from before a reinstall beside a new one): every record's
    # time is given, and each trial is joined by its own.
    recorded: dict[str, set[datetime]] = {}
    for t in trials:
        if t.source == "slurm" and t.recorded is not None:
            recorded.setdefault(t.job_id, set()).add(t.recorded)
    snap = slurm.job_snapshot(slurm_ids, settled=[j for j in slurm_ids if j not in unended],
                              recorded={j: sorted(ts) for j, ts in recorded.items()})
    rows, notes = snap.rows, list(snap.notes)
    trials = _expand_arrays(trials, rows)
    me = claim.Holder.this_process()
    now = datetime.now()
    for t in trials:
        row = rows.get(t.job_id) if t.source == "slurm" else None
        usage, foreign = snap.usage.get(t.job_id), snap.foreign.get(t.job_id, "")
        joined = snap.at.get((t.job_id, t.recorded)) if t.source == "slurm" and t.recorded is not None else None
        if joined is not None:  # the job its own record names (several records of the id may name others)
            row, usage, foreign, t.job_anchor = joined.row, joined.usage, joined.foreign, joined.anchor
        if t.source == "slurm" and foreign:
            t.notes.append(foreign)
        if row:
            t.elapsed, t.node, t.exit_code = row["elapsed"], row["node"], row["exit_code"]
            t.reason = row.get("reason", "")
            # Only a start Slurm can foresee is one (not N/A, nor year 6109), and a held job has none.
            start = row.get("start", "")
            held = slurm.explain_reason(t.reason).code in slurm.HELD_REASONS
            t.expected_start = start if start and not held and slurm.foreseeable_start(start, now) else ""
            t.usage = usage
        if t.run_dir is None:
            t.state = row["state"] if row else "UNKNOWN"
            continue
        ended_now = ended.get(id(t), False)
        gone = False
        if t.source == "local" and t.files.job is not None and not ended_now:
            # The local launcher's job is a process: ask whether it still runs (pid and start time).
            live = claim.alive(claim.job_holder(t.files.job), me)
            gone = live is False
            if live is None:
                t.notes.append(f"its process runs on {t.files.job.host}; run mnist-hpc-status there to see whether it lives")
        t.state = rundir.run_state(t.files, row["state"] if row else None, ended_now or gone)
        if row is None and t.source != "files":
            t.source += " (files)"
        if not t.finished:
            t.error = trial_error(t)
            if gone and t.files.failure is None and (t.error is None or t.error.startswith(NO_ERROR_LINE)):
                job = t.files.job
                t.error = f"its process (pid {job.job_id} on {job.host or 'this host'}) ended without a result: killed?"
                t.error += f" See {job.stderr}" if job.stderr else ""
    split_packed_costs(trials)
    return trials, notes


def _ended(trial: Trial) -> bool:
    """Its job wrote the result file submitit leaves when the job's function returned or raised."""
    result_file = trial.files.job.result_file if trial.files.job else None
    return bool(result_file and _is_file(result_file))


def split_packed_costs(trials: Sequence[Trial]) -> None:
    """Share a job's cost among the trials that ran in it, by their recorded wall times.

    Several trials share a job when they were packed into one task (trials_per_task) or run one
    after another by a search worker. A trial without a wall time (not started, or its files
    unreadable) would make any weighting a guess: then the job's cost is split evenly and each
    trial says so. The shares of a job add up to 1, so totals are unaffected.
    """
    by_job: dict[tuple[str, Optional[datetime]], list[Trial]] = {}
    for t in trials:
        # A job named by its id alone (a search's worker beside its trials) is the whole job, no share.
        if t.usage is not None and t.run_dir is not None:
            by_job.setdefault((t.job_id, t.job_anchor), []).append(t)
    for (job_id, _), group in by_job.items():
        if len(group) < 2:
            continue
        walls = [t.own_wall_s for t in group]
        if all(w is not None for w in walls) and sum(walls) > 0:  # type: ignore[arg-type]
            for t, w in zip(group, walls):
                t.share, t.share_note = w / sum(walls), f"its wall time's share of job {job_id}"  # type: ignore[operator]
        else:
            missing = ", ".join(t.label for t, w in zip(group, walls) if w is None) or "any trial"
            for t in group:
                t.share = 1 / len(group)
                t.share_note = f"job {job_id} split evenly among its {len(group)} trials: no wall time for {missing}"


@dataclass
class CostTotals:
    """What a set of trials' jobs used together; each job counted once, however many trials it ran."""

    jobs: int
    core_hours: float
    gpu_hours: float
    # TotalCPU / CPUTimeRAW over the jobs whose CPU time is known (ended ones; running ones via sstat).
    cpu_efficiency: Optional[float]
    max_rss_bytes: Optional[int]
    req_mem_bytes: Optional[int]
    # The largest CPU count of a job that ended: what the advice on idle CPUs is about.
    alloc_cpus: int


def cost_totals(trials: Sequence[Trial]) -> Optional[CostTotals]:
    """Totals of ``trials``' jobs (None when none has started).

    Each trial counts its share of its job (:func:`split_packed_costs`): the trials of a packed
    task that ended in different states add up to the task, never to the task once per state.
    """
    shares = [(t.usage, t.share) for t in trials if t.usage is not None]
    if not shares:
        return None
    used = list({(t.job_id, t.job_anchor): t.usage for t in trials if t.usage is not None}.values())
    ended = [(u, w) for u, w in shares if u.cpu_s is not None]  # and running ones that sstat answered for
    peaks = [u.max_rss_bytes for u in used if u.max_rss_bytes is not None]
    asked = [u.req_mem_bytes for u in used if u.req_mem_bytes is not None]
    core_s = sum(u.core_s * w for u, w in ended)
    return CostTotals(
        jobs=len(used),
        core_hours=sum(u.core_hours * w for u, w in shares),
        gpu_hours=sum(u.gpu_hours * w for u, w in shares),
        cpu_efficiency=sum((u.cpu_s or 0.0) * w for u, w in ended) / core_s if core_s > 0 else None,
        max_rss_bytes=max(peaks) if peaks else None,
        req_mem_bytes=max(asked) if asked else None,
        alloc_cpus=max((u.alloc_cpus for u, _ in ended), default=0),
    )


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where it cannot be seen (another user's private submitit folder)."""
    try:
        return path.is_file()
    except OSError:
        return False


def read_trials(run_dirs: Sequence[Path]) -> tuple[list[Trial], list[str]]:
    """Read every run and fill in its state (``sacct``, else ``squeue``, else the files).

    Returns:
        The trials in the order given, and notes about how states were obtained.
    """
    return fill_states([read_trial(run_dir) for run_dir in run_dirs])


# --- why a trial did not finish ---------------------------------------------------------------


def _read_tail(path: Path, n_bytes: int = LOG_TAIL_BYTES) -> Optional[str]:
    """The end of a log; None when it is absent or is not a regular file (its path comes from
    ``job.json``: a FIFO there would block the status, ``/dev/zero`` would never end)."""
    try:
        tail = read_tail_bounded(path, n_bytes)
    except UntrustedFileError:
        return None
    return None if tail is None else tail.decode("utf-8", errors="replace")


def last_error_line(log: Path) -> Optional[str]:
    """The error that ended a job: its last known-error line, or the last line of its last traceback.

    A known error is one line after :data:`mnist_hpc.rundir.ERROR_LINE_PREFIX`; of that and a
    traceback, the later one in the log is the newer attempt's. Lines after a traceback
    (submitit's "Submitted job triggered an exception", srun's exit notice) are skipped. Without
    either, Slurm's own last ``slurmstepd: error:`` line (time limit, out of memory, cancelled) is
    the best explanation there is.
    """
    tail = _read_tail(log)
    if tail is None:
        return None
    lines = tail.splitlines()
    known = [i for i, line in enumerate(lines) if line.startswith(rundir.ERROR_LINE_PREFIX)]
    starts = [i for i, line in enumerate(lines) if line.startswith(TRACEBACK_START)]
    if known and (not starts or known[-1] > starts[-1]):
        return lines[known[-1]][len(rundir.ERROR_LINE_PREFIX) :].strip()
    if starts:
        for line in lines[starts[-1] + 1 :]:
            # Frames and source lines are indented; the exception line is the first that is not.
            if line.strip() and not line[0].isspace():
                return line.strip()
    for line in reversed(lines):
        if SLURM_ERROR in line:
            return line.strip()
    return None


def trial_error(trial: Trial) -> Optional[str]:
    """The error line of an unfinished trial: its ``failure.json``, else the end of its own job log.

    A log shared by the trials of a packed task may end with another trial's traceback, so it is
    only pointed to, not quoted.
    """
    if trial.files.failure:
        return trial.files.failure
    stderr, shared_log = trial.stderr, trial.packed_slot is not None
    if stderr and not shared_log:
        if (line := last_error_line(Path(stderr))) is not None:
            return line
    if trial.state == "FAILED" and stderr:
        return f"{NO_ERROR_LINE}; see {stderr}" + (" (shared by the trials of this task)" if shared_log else "")
    return None

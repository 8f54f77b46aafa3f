"""What Slurm says about jobs: ``sacct`` (accounting, still knows a job after it left the queue)
and ``squeue`` (the controller, knows a job before accounting does), parsed into one shape.

Parsing is kept apart from running the commands so that it can be tested on recorded output.
Used on both sides: status and report on the login node, run-directory leases on compute nodes.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Mapping, Optional, Sequence

# One row per job or array task: state, elapsed time, node list, exit code; for a pending job also
# Slurm's reason code and expected start ("reason", "start").
Row = dict[str, str]
# What accounting is asked once per status or report: states and every cost figure. Without -X, so
# that the steps (``123.batch``, ``123_4.0``) come too: only they carry MaxRSS (folded into their job).
# Submit and End tell the runs of one id apart (:func:`own_runs`); read in UTC (:data:`UTC_ENV`).
SACCT_FIELDS = ("JobID,State,Elapsed,NodeList,ExitCode,Reason,ElapsedRaw,TotalCPU,AllocCPUS,AllocTRES,ReqMem,MaxRSS,"
                "CPUTimeRAW,Submit,End")
# The controller's view of live jobs: id, state, elapsed, nodes, reason, (expected) start, the
# job's own numeric id (an array task's, which sstat needs) and its submission (this run's).
# Asked in UTC (:data:`UTC_ENV`); the expected start is shown in local time again (:func:`parse_squeue`).
SQUEUE_FORMAT = "%i|%T|%M|%N|%r|%S|%A|%V"
# Slurm's clients print times in their own local time, which names no instant in the hour a
# daylight-saving change repeats: asked with TZ=UTC, they print UTC.
UTC_ENV = {"TZ": "UTC"}
# A running job's usage so far: accounting has its steps' CPU time and MaxRSS only once they end.
SSTAT_FIELDS = "JobID,MaxRSS,TresUsageInTot"


# A user's settings for Slurm's query clients that change which jobs they list or how they print
# them: SQUEUE_STATES=RUNNING hides pending jobs (a held job would count as dead), SQUEUE_USERS,
# SQUEUE_PARTITION and the like hide others, SLURM_TIME_FORMAT=relative prints times no parser here
# reads. Every query names its jobs, fields and format itself, so these are left out of its
# environment (SLURM_CONF, SLURM_CLUSTERS and the rest stay). sbatch keeps its SBATCH_* variables:
# its --test-only must judge the request as the submission will make it.
_QUERY_SETTINGS = re.compile(r"(SQUEUE|SACCT|SINFO|SSTAT|SCONTROL)_\w*|SLURM_TIME_FORMAT")


def client_environ(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of a Slurm query client: this process's, without the user's output settings
    (see :data:`_QUERY_SETTINGS`), with ``extra`` set."""
    env = {key: value for key, value in os.environ.items() if not _QUERY_SETTINGS.fullmatch(key)}
    env.update(extra or {})
    return env


def run_client(cmd: list[str], env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Stdout of a Slurm query client (``env``: variables set for it, see :func:`client_environ`),
    or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=client_environ(env))
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def normalise_state(raw: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; ``NODE_FAIL`` and ``OUT_OF_MEMORY`` stay as they are."""
    return raw.split()[0].rstrip("+") if raw.strip() else "UNKNOWN"


def expand_array_id(job_id: str) -> list[str]:
    """sacct shows the not-yet-started tasks of an array as one row, ``123_[0-3,7%2]``."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.groups()
    tasks: list[str] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        if first:
            tasks += [f"{base}_{i}" for i in range(int(first), int(last or first) + 1)]
    return tasks


# --- cost: what a job used, from accounting ------------------------------------------------------

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def parse_bytes(text: str) -> Optional[int]:
    """``11449M``, ``123456K``, ``4Gn`` (per node), ``0``: bytes; None when empty or unreadable.

    A trailing ``n``/``c`` (ReqMem per node / per CPU, before Slurm 21.08) is dropped here and
    handled by :func:`parse_usage`.
    """
    match = re.fullmatch(r"([0-9.]+)([KMGTP]?)[nc]?", text.strip())
    if not match:
        return None
    try:
        size = float(match.group(1)) * _UNITS[match.group(2)]
    except ValueError:  # "1.2.3", "."
        return None
    return int(size) if math.isfinite(size) else None


def parse_duration(text: str) -> Optional[float]:
    """Seconds of sacct's ``[D-]HH:MM:SS``, ``MM:SS.mmm`` (TotalCPU) or ``SS``; None when unreadable."""
    text = text.strip()
    days, _, clock = text.partition("-") if "-" in text else ("0", "", text)
    if not days.isdigit():
        return None
    parts = clock.split(":")
    try:
        numbers = [float(p) for p in parts]
        if not all(math.isfinite(n) and n >= 0 for n in numbers):
            return None
        total = sum(n * 60**i for i, n in enumerate(reversed(numbers))) if 1 <= len(numbers) <= 3 else None
        return None if total is None else total + int(days) * 86400
    except ValueError:
        return None


def parse_tres(text: str) -> dict[str, str]:
    """``billing=1,cpu=2,mem=4G,node=1,gres/gpu=2`` as a mapping."""
    return dict(part.partition("=")[::2] for part in text.split(",") if "=" in part)


@dataclass(frozen=True)
class Usage:
    """What one job (or array task) used, as accounting recorded it.

    ``cpu_s`` is TotalCPU (user + system time of every step): Slurm adds a step's share when the
    step ends, so for a job that still runs it is None (unknown, never a misleading 0) unless
    sstat gave its CPU time so far (:func:`job_snapshot`). ``max_rss_bytes`` is the largest MaxRSS
    of the job's steps, sampled by JobAcctGather (every 30 s on the local cluster): accounting has
    it once a step ends (seen here: none for a step running 35 s), sstat while it runs.
    """

    elapsed_s: float
    cpu_s: Optional[float]
    alloc_cpus: int
    # Core-seconds as Slurm counts them (CPUTimeRAW = Elapsed x AllocCPUS).
    core_s: float
    gpus: int = 0
    req_mem_bytes: Optional[int] = None
    max_rss_bytes: Optional[int] = None

    @property
    def cpu_efficiency(self) -> Optional[float]:
        """TotalCPU / (Elapsed x AllocCPUS); None before anything ran."""
        return None if self.cpu_s is None or self.core_s <= 0 else self.cpu_s / self.core_s

    @property
    def core_hours(self) -> float:
        return self.core_s / 3600

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.elapsed_s / 3600


def parse_usage(fields: dict[str, str]) -> Optional[Usage]:
    """A job's :class:`Usage` from its sacct allocation row; None for a job that never started."""
    elapsed = _number(fields.get("ElapsedRaw", "")) or parse_duration(fields.get("Elapsed", ""))
    cpus = int(_number(fields.get("AllocCPUS", "")) or 0)
    tres = parse_tres(fields.get("AllocTRES", ""))
    if not tres:  # not allocated (pending, or cancelled while pending): nothing was used
        return None
    req_mem = fields.get("ReqMem", "").strip()
    req_bytes = parse_bytes(req_mem)
    nodes = int(_number(tres.get("node", "")) or 1)
    if req_bytes is not None and req_mem.endswith("c"):
        req_bytes *= cpus
    elif req_bytes is not None and req_mem.endswith("n"):
        req_bytes *= nodes
    core_s = _number(fields.get("CPUTimeRAW", ""))
    return Usage(
        elapsed_s=float(elapsed or 0.0),
        cpu_s=parse_duration(fields["TotalCPU"]) if fields.get("TotalCPU") else None,
        alloc_cpus=cpus,
        core_s=float(core_s if core_s is not None else (elapsed or 0.0) * cpus),
        gpus=int(_number(tres.get("gres/gpu", "")) or 0),
        req_mem_bytes=req_bytes if req_bytes else (parse_bytes(tres.get("mem", "")) or None),
    )


def _number(text: str) -> Optional[float]:
    """A count or duration Slurm printed; None for anything else (``nan``, ``-1``, ``Unknown``)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


# --- parsing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run of a job or array task in accounting: ``sacct -D`` lists a requeued job once per run,
    and an id that two jobs had (a reused id) once per job."""

    row: Row
    usage: Optional[Usage]
    # When Slurm queued this run (a requeue queues the next run as the previous one ends) and when
    # it ended, in UTC; None when accounting has no such time (``Unknown``, or recorded output
    # without these columns).
    submit: Optional[datetime] = None
    end: Optional[datetime] = None


@dataclass
class Accounting:
    """``sacct``'s answer: a row (state, ...) and, once it started, a :class:`Usage` per job or task.

    ``rows`` and ``usage`` count every run of an id as one job's; ``runs`` keeps them apart, for
    :func:`job_snapshot` to keep only a trial's own (:func:`own_runs`).
    """

    rows: dict[str, Row] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)
    runs: dict[str, list[Run]] = field(default_factory=dict)


def parse_sacct(text: str) -> Accounting:
    """``sacct -P -o SACCT_FIELDS`` (with its header line, run with :data:`UTC_ENV`), by job or task id.

    The header names the columns, so recorded output with fewer fields parses too. A requeued
    job appears once per run (`-D`), each with its steps after it: the last run is the current
    one, and the runs' usage adds up (:func:`fold_runs`). Steps (``123.batch``) are folded into
    their run: the largest MaxRSS of any step is its peak memory.
    """
    header: Optional[list[str]] = None
    acct = Accounting()
    for line in text.splitlines():
        parts = line.split("|")
        if header is None:
            if parts and parts[0] == "JobID":
                header = parts
            continue
        if len(parts) != len(header):
            continue
        fields = dict(zip(header, parts))
        job_id = fields["JobID"].strip()
        if not job_id:
            continue
        if "." in job_id:
            job, _, _step = job_id.partition(".")
            rss = parse_bytes(fields.get("MaxRSS", ""))
            runs = acct.runs.get(job)
            if rss is not None and runs and runs[-1].usage is not None:  # the step of the run listed last
                peak = max(rss, runs[-1].usage.max_rss_bytes or 0)
                runs[-1] = replace(runs[-1], usage=replace(runs[-1].usage, max_rss_bytes=peak))
            continue
        row = {"state": normalise_state(fields.get("State", "")), "elapsed": fields.get("Elapsed", ""),
               "node": fields.get("NodeList", ""), "exit_code": fields.get("ExitCode", ""),
               "reason": _reason(fields.get("Reason", "")), "start": ""}
        usage = parse_usage(fields) if "AllocTRES" in fields else None
        if usage is not None and row["state"] in LIVE_STATES and row["state"] != "REQUEUED":
            # TotalCPU grows only when a step ends: a running job's would read as idle CPUs. (A
            # REQUEUED line of sacct -D is a run that ended: its TotalCPU is whole.)
            usage = replace(usage, cpu_s=None)
        run = Run(row, usage, _utc_time(fields.get("Submit", "")), _utc_time(fields.get("End", "")))
        for task_id in expand_array_id(job_id):
            acct.runs.setdefault(task_id, []).append(run)
    for job, runs in acct.runs.items():
        acct.rows[job], usage = fold_runs(runs)
        if usage is not None:
            acct.usage[job] = usage
    return acct


def fold_runs(runs: Sequence[Run]) -> tuple[Row, Optional[Usage]]:
    """One job's row and usage from its runs, in the order they ran: the last run's row is the
    current one; what the runs used adds up (a time-limit requeue's earlier runs cost too)."""
    total: Optional[Usage] = None
    for run in runs:
        total = _runs_added(total, run.usage)
    return dict(runs[-1].row), total


def _utc_time(text: str) -> Optional[datetime]:
    """A time a Slurm client printed under :data:`UTC_ENV` (``2026-12-07T08:10:20``); None for
    ``Unknown``, ``None`` or empty."""
    try:
        return datetime.fromisoformat(text.strip()).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _runs_added(earlier: Optional[Usage], later: Optional[Usage]) -> Optional[Usage]:
    """What a requeued job used over its runs: times and core-seconds add up, the peak is the largest.
    A CPU time not known for one run (it still runs, sstat not asked yet) leaves the total unknown."""
    if earlier is None or later is None:
        return later or earlier
    peaks = [p for p in (earlier.max_rss_bytes, later.max_rss_bytes) if p is not None]
    return Usage(
        elapsed_s=earlier.elapsed_s + later.elapsed_s,
        cpu_s=None if earlier.cpu_s is None or later.cpu_s is None else earlier.cpu_s + later.cpu_s,
        alloc_cpus=later.alloc_cpus,
        core_s=earlier.core_s + later.core_s,
        gpus=max(earlier.gpus, later.gpus),
        req_mem_bytes=later.req_mem_bytes or earlier.req_mem_bytes,
        max_rss_bytes=max(peaks) if peaks else None,
    )


def parse_squeue(text: str) -> dict[str, Row]:
    """Rows of ``squeue -h -r -o SQUEUE_FORMAT`` (pending and running jobs), by job or task id.

    Reason and start are empty when the format had no such columns; a start of ``N/A`` (no
    expected start computed yet) is empty too. With the submit time (``%V``, the eighth column)
    the output is :data:`SQUEUE_FORMAT`'s, asked in UTC: its expected start is shown in local
    time, as squeue shows it to the user; ``submit`` keeps UTC. Shorter recorded formats are in
    local time and stay as they are.
    """
    rows: dict[str, Row] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) in (4, 6, 7, 8) and parts[0]:
            reason, start = (parts[4], parts[5]) if len(parts) >= 6 else ("", "")
            start = "" if start in ("N/A", "Unknown") else start
            rows[parts[0]] = {"state": normalise_state(parts[1]), "elapsed": parts[2], "node": parts[3], "exit_code": "",
                              "reason": _reason(reason), "start": _local(start) if len(parts) == 8 else start}
            if len(parts) >= 7:
                rows[parts[0]]["raw_id"] = parts[6]
            if len(parts) == 8:
                rows[parts[0]]["submit"] = parts[7]
    return rows


def _local(utc_text: str) -> str:
    """A time squeue printed in UTC, as it prints it in this host's local time; unchanged when it is
    none (``N/A``) or beyond what datetime holds (year 10193: no foreseeable start either)."""
    when = _utc_time(utc_text)
    try:
        return utc_text if when is None else when.astimezone().replace(tzinfo=None).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return utc_text


def parse_sstat(text: str) -> dict[str, tuple[Optional[float], Optional[int]]]:
    """``sstat -a -n -P -o SSTAT_FIELDS``: (CPU seconds so far, peak RSS bytes) by numeric job id, steps folded."""
    stats: dict[str, tuple[Optional[float], Optional[int]]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[0]:
            continue
        job = parts[0].partition(".")[0]
        cpu = parse_duration(parse_tres(parts[2]).get("cpu", ""))
        rss = parse_bytes(parts[1])
        old_cpu, old_rss = stats.get(job, (None, None))
        stats[job] = (None if cpu is None and old_cpu is None else (cpu or 0.0) + (old_cpu or 0.0),
                      max((r for r in (rss, old_rss) if r is not None), default=None))
    return stats


def query_sstat(raw_ids: Sequence[str]) -> Optional[dict[str, tuple[Optional[float], Optional[int]]]]:
    """Running jobs' usage so far (one call), by numeric job id; None when sstat cannot answer."""
    if not raw_ids:
        return {}
    out = run_client(["sstat", "-a", "-n", "-P", "-o", SSTAT_FIELDS, "-j", ",".join(sorted(set(raw_ids)))])
    return None if out is None else parse_sstat(out)


def _reason(code: str) -> str:
    """Slurm's reason code; "" for ``None`` (what a running or ended job shows)."""
    return "" if code.strip() in ("", "None") else code.strip()


def query_sacct(job_ids: Sequence[str]) -> Optional[Accounting]:
    """Accounting's rows and usage for these jobs (one call), or None when sacct cannot answer.

    Asked by base id: ``-j 123`` lists every task of array 123, where 10,000 task ids would make a
    command line sacct is slow to take.
    """
    if not job_ids:
        return Accounting()
    base_ids = sorted({j.partition("_")[0] for j in job_ids})
    # --duplicates: every run of a requeued job (a time-limit requeue's earlier runs cost too).
    out = run_client(["sacct", "-D", "-P", "-o", SACCT_FIELDS, "-j", ",".join(base_ids)], UTC_ENV)
    return None if out is None else parse_sacct(out)


def query_squeue(job_ids: Sequence[str]) -> Optional[dict[str, Row]]:
    """The controller's rows for these jobs (pending or running), or None when squeue fails."""
    if not job_ids:
        return {}
    base_ids = sorted({j.partition("_")[0] for j in job_ids})
    out = run_client(["squeue", "-h", "-r", "-j", ",".join(base_ids), "-o", SQUEUE_FORMAT], UTC_ENV)
    return None if out is None else parse_squeue(out)


# --- why a job waits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reason:
    """Slurm's reason code for a pending job, in words, with what to do about it."""

    code: str
    words: str
    todo: str
    # The user must act (release, cancel and resubmit, ask an admin): waiting will not help.
    attention: bool


# The reason codes explained (squeue's %r, sacct's Reason). Families (QOSMax*, AssocGrp*, ...) are
# matched by prefix below; any other code is shown as Slurm's own.
REASONS: dict[str, tuple[str, str, bool]] = {
    "None": ("not yet considered by the scheduler", "wait: it is looked at within a minute", False),
    "Priority": ("waiting its turn: jobs with higher priority go first", "wait", False),
    "Resources": ("waiting its turn: next in line, for nodes to free up", "wait", False),
    "JobHeldUser": ("held by its owner", "release it: scontrol release JOBID", True),
    "JobHeldAdmin": ("held by an administrator", "ask your site's admins why it is held", True),
    # squeue's description of a job requeued held (scontrol requeuehold), in place of a code.
    "job requeued in held state": ("requeued and held", "release it: scontrol release JOBID", True),
    "Dependency": ("waiting for the jobs it depends on to end", "wait; squeue -j JOBID -o %E shows them", False),
    "DependencyNeverSatisfied": ("a job it depends on ended so that it can never start",
                                 "cancel it (scancel JOBID) and resubmit without that dependency", True),
    "BeginTime": ("not before its begin time", "wait, or move it: scontrol update JobId=JOBID StartTime=now", False),
    "PartitionConfig": ("asks for more than its partition can ever give (CPUs, memory or GPUs per node)",
                        "cancel it and resubmit with a smaller hydra.launcher request or another partition", True),
    "PartitionTimeLimit": ("its time limit is over the partition's MaxTime",
                           "cancel it and resubmit with a smaller hydra.launcher.timeout_min or another partition", True),
    "PartitionNodeLimit": ("asks for more nodes than the partition allows",
                           "cancel it and resubmit with fewer hydra.launcher.nodes or another partition", True),
    "PartitionDown": ("its partition is down", "wait for the admins, or resubmit to another partition", True),
    "PartitionInactive": ("its partition is inactive", "resubmit to another partition", True),
    "ReqNodeNotAvail": ("a node it needs is unavailable (down, drained or reserved)",
                        "wait for the node, or cancel and resubmit without it", True),
    "NodeDown": ("a node it needs is down", "wait for the admins, or cancel and resubmit", True),
    "BadConstraints": ("no node has the features it asks for", "cancel it and resubmit with other constraints", True),
    "InvalidAccount": ("its account is not valid here", "cancel it and resubmit with a valid hydra.launcher account", True),
    "InvalidQOS": ("its QoS is not valid here", "cancel it and resubmit with a valid QoS", True),
    "Reservation": ("waiting for its reservation to start", "wait", False),
    "JobArrayTaskLimit": ("held back by its array's throttle (%N: at most N tasks at once)",
                          "wait, or raise it: scontrol update JobId=JOBID ArrayTaskThrottle=N", False),
}
# Held jobs start only once released: a start squeue foresees for one is no expected start.
HELD_REASONS = frozenset({"JobHeldUser", "JobHeldAdmin", "job requeued in held state"})
# Families of limit codes, the first whose pattern matches the code decides:
# - a budget of minutes (GrpTRESMins, GrpWall: what ended jobs used counts too, so their ending gives
#   nothing back; RunMinutes count running jobs only and are group allowances below);
# - limits on what an owner's (or account's) jobs hold at once (MaxJobsPU, MaxTRESPU...): it runs
#   once their other jobs end;
# - per-job limits (the job alone exceeds them: it never runs as asked);
# - group allowances (other jobs use them: it runs once they end, unless the allowance itself is
#   smaller than the job: that takes the limit's value, which status does not ask for, so the
#   advice names both cases).
REASON_FAMILIES: tuple[tuple[re.Pattern[str], str, str, bool], ...] = (
    (re.compile(r"QOSGrp(?:\w*(?<!Run)Minutes|Wall)"), "its QoS's budget of minutes is used up",
     "jobs ending do not renew a budget: ask your site, or cancel it and resubmit with another hydra.launcher.qos "
     "(sacctmgr show qos)", True),
    (re.compile(r"AssocGrp(?:\w*(?<!Run)Minutes|Wall)"), "its account's budget of minutes is used up",
     "jobs ending do not renew a budget: ask your site, or cancel it and resubmit with another hydra.launcher.account "
     "(sacctmgr show assoc)", True),
    (re.compile(r"(?:QOS|Assoc)Max\w*Per(?:User|Account)|AssocMaxJobsLimit"),
     "over a limit on what its owner's (or account's) jobs may hold at once",
     "wait for your other jobs under the same limit to end", False),
    (re.compile(r"QOSMax"), "over a per-job limit of its QoS",
     "cancel it and resubmit within the QoS's limits (sacctmgr show qos)", True),
    (re.compile(r"AssocMax"), "over a per-job limit of its account",
     "cancel it and resubmit within the account's limits (sacctmgr show assoc)", True),
    (re.compile(r"QOSGrp"), "over its QoS's group allowance, which other jobs may be using",
     "wait for jobs under the same QoS to end; if none run, the allowance is smaller than the job: cancel it and "
     "resubmit within it or with another hydra.launcher.qos (sacctmgr show qos)", False),
    (re.compile(r"AssocGrp"), "over its account's allowance, which other jobs may be using",
     "wait for your account's running jobs to end; if none run, the allowance is smaller than the job: ask your "
     "site, or resubmit with another hydra.launcher.account (sacctmgr show assoc)", False),
)


def explain_reason(code: str) -> Reason:
    """``code`` in words; an unknown code is shown as itself, with where to look it up."""
    # squeue's %r is the job's state description when Slurm set one: the code, then its details
    # ("ReqNodeNotAvail, UnavailableNodes:vm"); the code decides, the details are kept in the words.
    text = code.strip() or "None"
    code, _, details = text.partition(",")
    code, details = code.strip(), f" ({details.strip()})" if details.strip() else ""
    if code in REASONS:
        words, todo, attention = REASONS[code]
        return Reason(code, words + details, todo, attention)
    for pattern, words, todo, attention in REASON_FAMILIES:
        if pattern.match(code):
            return Reason(code, f"{words} ({code}){details}", todo, attention)
    return Reason(code, f"Slurm's reason {text}", "see man squeue, JOB REASON CODES", False)


# Slurm answers a date thousands of years away (or N/A) when it cannot place a job (behind jobs
# without a time limit, say): a start further off than this is no expected start.
FORESEEABLE = timedelta(days=366)


def foreseeable_start(text: str, now: datetime) -> Optional[datetime]:
    """Slurm's expected start (``2026-12-07T14:20:00``, controller's local time) as a time; None when
    there is none: ``N/A``, ``Unknown``, or further off than :data:`FORESEEABLE` (year 6109, 10193)."""
    try:
        start = datetime.fromisoformat(text.strip())
    except ValueError:  # not a date, or a year past what datetime holds
        return None
    return start if start - now <= FORESEEABLE else None


# squeue states of a job whose processes may still run, or that will run again.
LIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING", "COMPLETING",
     "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
)


def job_alive(job_id: str) -> Optional[bool]:
    """Whether Slurm still knows ``job_id`` as pending, running or about to run again.

    Returns None when squeue cannot answer (no client here, controller unreachable): the caller
    must then not guess.
    """
    if shutil.which("squeue") is None:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30,
                              env=client_environ())
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        # A job that has left the controller's memory is an "Invalid job id"; anything else is unknown.
        return False if "invalid job id" in proc.stderr.lower() else None
    states = {normalise_state(line) for line in proc.stdout.splitlines() if line.strip()}
    return bool(states & LIVE_STATES)


def parse_liveness(text: str, job_ids: Sequence[str]) -> dict[str, bool]:
    """Which of ``job_ids`` are live in ``squeue -h -r -o '%i|%A|%T'`` output.

    A job is named there by its ``%i`` (``123_4`` for an array task) and by its own numeric id
    ``%A`` (an array task's ``SLURM_JOB_ID`` once it runs): either form of an id counts.
    """
    states: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0]:
            state = normalise_state(parts[2])
            for name in {parts[0], parts[1]}:
                states.setdefault(name, set()).add(state)
    return {j: bool(states.get(j, set()) & LIVE_STATES) for j in job_ids}


def jobs_alive(job_ids: Sequence[str]) -> dict[str, Optional[bool]]:
    """:func:`job_alive` for many jobs, asked of squeue at once; None for each when it cannot answer."""
    ids = sorted(set(job_ids))
    if len(ids) <= 1:
        return {j: job_alive(j) for j in ids}
    if shutil.which("squeue") is None:
        return {j: None for j in ids}
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%A|%T"],
                              capture_output=True, text=True, timeout=60, env=client_environ())
    except (OSError, subprocess.SubprocessError):
        return {j: None for j in ids}
    if proc.returncode != 0:  # e.g. a list squeue will not take: ask one by one
        return {j: job_alive(j) for j in ids}
    return dict(parse_liveness(proc.stdout, ids))


def max_array_size() -> Optional[int]:
    """The controller's MaxArraySize (array task indices must stay below it); None if unknown."""
    out = run_client(["scontrol", "show", "config"])
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out or "", re.MULTILINE)
    return int(match.group(1)) if match else None


def parse_sinfo_cpus(text: str, partition: Optional[str]) -> Optional[int]:
    """Idle CPUs of ``partition`` (None: the default one, marked ``*``) from ``sinfo -h -o %P|%C``.

    ``%C`` is allocated/idle/other/total; a partition listed on several lines is summed.
    """
    idle: Optional[int] = None
    for line in text.splitlines():
        name, _, cpus = line.strip().partition("|")
        default = name.endswith("*")
        if (name.rstrip("*") != partition) if partition else not default:
            continue
        parts = cpus.split("/")
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        idle = (idle or 0) + int(parts[1])
    return idle


def idle_cpus(partition: Optional[str] = None) -> Optional[int]:
    """CPUs of ``partition`` (default: the cluster's default one) idle right now; None if unknown."""
    out = run_client(["sinfo", "-h", "-o", "%P|%C"])
    return parse_sinfo_cpus(out, partition) if out is not None else None


# Per node and partition: name, partition (``*`` marks the default one), state, GPUs configured and in
# use (sinfo's -O fields are padded to their width: the ``|`` after each is the separator).
SINFO_GPUS_FORMAT = "NodeList:200|,Partition:100|,StateCompact:30|,Gres:300|,GresUsed:300"
# Node states in which a job may start on a node now.
_USABLE_STATES = frozenset({"idle", "mix", "mixed"})


def parse_gpu_slots(text: str, partition: Optional[str], gpus_per_task: int) -> Optional[int]:
    """Tasks of ``gpus_per_task`` GPUs that ``partition``'s (None: the default one's) usable nodes can
    start now, each node counted once, from ``sinfo -h -N -O SINFO_GPUS_FORMAT``; None if none listed."""
    free: dict[str, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 5 or not parts[0]:
            continue
        node, name, state, gres, used = parts[:5]
        if (name.rstrip("*") != partition) if partition else not name.endswith("*"):
            continue
        usable = state.rstrip("*~#!%$@^-").lower() in _USABLE_STATES
        free[node] = max(gpu_count(gres) - gpu_count(used), 0) if usable else 0
    if not free:
        return None
    return sum(n // max(gpus_per_task, 1) for n in free.values())


def gpu_slots(gpus_per_task: int, partition: Optional[str] = None) -> Optional[int]:
    """Tasks of ``gpus_per_task`` GPUs that can start now in ``partition`` (see :func:`parse_gpu_slots`)."""
    out = run_client(["sinfo", "-h", "-N", "-O", SINFO_GPUS_FORMAT])
    return parse_gpu_slots(out, partition, gpus_per_task) if out is not None else None


def squeue_available() -> bool:
    return run_client(["squeue", "-h", "-o", "%i"]) is not None


# --- whose job an id names: the join of a trial's record to Slurm's rows --------------------------

# How far the clock of the node that wrote a record (job.json) and the controller's may disagree.
# (Compared as differences: a record's time may be anything a datetime holds, year 1 or 9999.)
CLOCK_SKEW = timedelta(minutes=5)
# A requeue queues a job's next run as its previous run ends: sacct -D shows the next run's Submit
# equal to the previous run's End (to the second, seen on the local cluster with scontrol
# requeue). A minute of slack; another job takes an id far later (a reinstall, MaxJobId's wrap).
REQUEUE_GAP = timedelta(seconds=60)


def _requeue_of(earlier: Run, later: Run) -> bool:
    """Whether ``later`` is the run a requeue of ``earlier`` queued."""
    return (earlier.end is not None and later.submit is not None
            and abs(later.submit - earlier.end) <= REQUEUE_GAP)


def own_runs(runs: Sequence[Run], recorded: datetime) -> Optional[list[Run]]:
    """The runs of one id that are the job a record written at ``recorded`` names; None when none is.

    ``recorded`` is when a job.json was written: after sbatch returned, or by the job itself while it
    ran; so the job was queued by then and had not ended. Its anchor is the latest run queued by
    then (``Submit <= recorded + CLOCK_SKEW``); the runs chained to the anchor by requeues (before
    and after it) are the job's, and the last of them must not have ended before ``recorded``
    (``- CLOCK_SKEW``). Every other run of the id is another job's: one that had the id before (a
    reinstalled cluster's accounting, ids wrapped at MaxJobId) or after it. Runs without a Submit
    time (recorded output without the column) cannot be told apart: then all of them count.
    """
    if any(r.submit is None for r in runs):
        return list(runs)
    ordered = sorted(runs, key=lambda r: r.submit)  # type: ignore[arg-type,return-value]  # none is None
    queued = [i for i, r in enumerate(ordered) if r.submit - recorded <= CLOCK_SKEW]  # type: ignore[operator]
    if not queued:
        return None
    first = last = queued[-1]
    while first > 0 and _requeue_of(ordered[first - 1], ordered[first]):
        first -= 1
    while last + 1 < len(ordered) and _requeue_of(ordered[last], ordered[last + 1]):
        last += 1
    end = ordered[last].end
    if end is not None and ordered[last].row["state"] not in LIVE_STATES and recorded - end > CLOCK_SKEW:
        return None  # it had ended before the record was written: not the job the record names
    return ordered[first:last + 1]


def _own_live(row: Row, recorded: datetime, runs: Optional[list[Run]]) -> bool:
    """Whether squeue's row is the job a record written at ``recorded`` names: queued by then, or
    queued again by a requeue of its own runs (``runs``, :func:`own_runs`). A row without a submit
    time (a recorded format) cannot be told apart and counts."""
    submit = _utc_time(row.get("submit", ""))
    if submit is None or submit - recorded <= CLOCK_SKEW:
        return True
    return any(t is not None and abs(submit - t) <= REQUEUE_GAP for r in runs or () for t in (r.submit, r.end))


@dataclass
class Joined:
    """What Slurm says of the job one record names (see :func:`job_snapshot`'s ``at``)."""

    row: Optional[Row] = None
    usage: Optional[Usage] = None
    # Why nothing is shown: the id now names another job.
    foreign: str = ""
    # squeue's row is this job's (pending or running now).
    live: bool = False
    # When its first run was queued: records joined to the same anchor name the same job.
    anchor: Optional[datetime] = None


@dataclass
class Snapshot:
    """What Slurm says about a command's jobs, asked once: rows by job or task id, usage, notes."""

    rows: dict[str, Row] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)
    # Where the states came from when a client could not answer.
    notes: list[str] = field(default_factory=list)
    # Ids that Slurm lists but as another job than the one recorded, and why: nothing of that job is
    # in ``rows`` or ``usage``.
    foreign: dict[str, str] = field(default_factory=dict)
    # Per record (id, when it was written), for ids that records written at several times name.
    at: dict[tuple[str, datetime], Joined] = field(default_factory=dict)


def job_snapshot(job_ids: Sequence[str], settled: Sequence[str] = (),
                 recorded: Optional[Mapping[str, "datetime | Sequence[datetime]"]] = None) -> Snapshot:
    """States, reasons, expected starts and usage of ``job_ids``: at most one squeue, sacct and sstat call.

    The controller (squeue) is asked first about every job not in ``settled`` (jobs whose runs
    all ended by their own files): it is current where accounting lags (a held job may not be
    in accounting yet, a started one may still read PENDING there), and only it knows an expected
    start. Accounting (sacct) is then asked about the jobs squeue does not list as pending: the
    states of jobs that left the queue, and what running and ended jobs used. So a held or
    queued array is one squeue call, an ended sweep one sacct call, whatever their size. Only
    when some of the jobs run is sstat asked (once, for all of them): accounting learns a step's
    CPU time and MaxRSS when it ends, sstat has them while it runs.

    An id names a job, not the job: ``recorded`` gives, for the ids a record names, when that record
    was written (aware datetimes). Only the runs and the queued job that were that id's job then are
    its (:func:`own_runs`, :func:`_own_live`); when Slurm lists the id but none of them, the id is in
    ``foreign`` with why, and nothing of the other job is shown. An id without a time is joined by
    id alone (records older than their ``submitted`` field). Several records of one id may have been
    written when it named different jobs (two sweeps, one from before a reinstall): given all their
    times, each is joined on its own in ``at``; ``rows``, ``usage`` and ``foreign`` hold the earliest's.
    """
    ids = sorted(set(job_ids))
    snap = Snapshot()
    if not ids:
        return snap
    now = datetime.now(timezone.utc)
    asked = set(ids)
    times = {j: sorted({t} if isinstance(t, datetime) else set(t)) for j, t in (recorded or {}).items() if j in asked and t}
    recorded = {j: ts[0] for j, ts in times.items()}
    for job, when in recorded.items():
        if when - now > CLOCK_SKEW:  # no run can be told to be its: the record's clock or the record is wrong
            snap.foreign[job] = (f"its record says its job was submitted at {when.isoformat()}, later than now "
                                 f"({now.isoformat(timespec='seconds')}): which job Slurm's id {job} names cannot be "
                                 "told, so none is shown; fix the node's clock or the record's 'submitted' field")
    ids = [j for j in ids if j not in snap.foreign]
    settled_ids = set(settled)
    asked_live = [j for j in ids if j not in settled_ids]
    live = query_squeue(asked_live) if asked_live else {}

    def complete(job: str) -> bool:
        """squeue's row says all there is: pending, and queued no later than its record (the launcher
        records a job after sbatch returns). One queued later is a requeue of it, whose earlier runs
        cost, or another job: accounting tells which."""
        row = (live or {}).get(job, {})
        if row.get("state") != "PENDING" or job not in recorded:
            return row.get("state") == "PENDING"
        submit = _utc_time(row.get("submit", ""))
        return submit is None or submit <= recorded[job]

    waiting = {j for j in ids if complete(j)}
    acct = query_sacct([j for j in ids if j not in waiting]) if len(waiting) < len(ids) else Accounting()
    unaccounted = acct is None  # then a job queued after its record cannot be told to be a requeue of it
    if acct is None:
        snap.notes.append("sacct is unavailable (no accounting here?); states come from squeue and the run files")
        if not live and not squeue_available():
            snap.notes.append("squeue is unavailable too; states come from the run files only")
        acct = Accounting()
    live = live or {}
    wanted = set(ids)

    def named(job: str) -> bool:  # a bare array id names all of its tasks
        return job in wanted or job.partition("_")[0] in wanted

    for source in (live, acct.rows):  # the controller's row first: it is current
        for job, row in source.items():
            if named(job) and job not in recorded:
                snap.rows.setdefault(job, row)
    snap.usage = {job: u for job, u in acct.usage.items() if named(job) and job not in recorded}
    own_live = {j: row for j, row in live.items() if j not in recorded}

    def join(job: str, when: datetime) -> Joined:
        """The job a record of ``job`` written at ``when`` names: its row, usage, and why none is shown."""
        runs = acct.runs.get(job)
        mine = own_runs(runs, when) if runs else None
        row = live.get(job)
        joined = Joined(anchor=mine[0].submit if mine else None)
        if row is not None and _own_live(row, when, mine):
            joined.row, joined.live = row, True
        if mine:
            fold_row, joined.usage = fold_runs(mine)
            joined.row = joined.row or fold_row
        elif runs is None:  # accounting without runs (built by a test): joined by id alone
            joined.row = joined.row or acct.rows.get(job)
            joined.usage = acct.usage.get(job)
        if joined.row is None and (row is not None or runs):
            other = _utc_time(row.get("submit", "")) if row is not None else None
            others = sorted(r.submit for r in runs or () if r.submit is not None)
            shown = (other or (others[-1] if others else None))
            job_then = f"Slurm's job {job}" + (f" (submitted {shown.isoformat(timespec='seconds')})" if shown else "")
            joined.foreign = (
                (f"{job_then} cannot be told to be this run's, whose record says it was submitted at {when.isoformat()}: "
                 "it was queued later, and accounting (sacct), which would show it a requeue, is unavailable"
                 if unaccounted else
                 f"{job_then} is not this run's, whose record says it was submitted at {when.isoformat()}: the id now "
                 "names another job (ids reused after a reinstall or past MaxJobId, or a directory from another "
                 "cluster)") + "; its state, reason and cost are not shown, the state comes from the run's files")
        return joined

    for job, whens in times.items():
        if job in snap.foreign:
            continue
        for when in whens:
            snap.at[(job, when)] = join(job, when)
        first = snap.at[(job, whens[0])]
        if first.live:
            own_live[job] = first.row  # type: ignore[assignment]
        if first.row is not None:
            snap.rows[job] = first.row
        if first.usage is not None:
            snap.usage[job] = first.usage
        if first.foreign:
            snap.foreign[job] = first.foreign
    # Running jobs: their CPU time and peak memory so far, asked of sstat at once.
    running = {row["raw_id"]: job for job, row in own_live.items()
               if row["state"] == "RUNNING" and row.get("raw_id") and job in snap.usage and named(job)}
    stats = query_sstat(list(running)) if running else {}
    live_records: dict[str, list[Joined]] = {}  # the records joined to a running job, by id (once, not per job)
    for (job, _), joined in snap.at.items():
        if joined.live and joined.usage is not None:
            live_records.setdefault(job, []).append(joined)
    for raw_id, (cpu_s, rss) in (stats or {}).items():
        job = running.get(raw_id)
        if job is not None:
            peak = max((r for r in (rss, snap.usage[job].max_rss_bytes) if r is not None), default=None)
            snap.usage[job] = replace(snap.usage[job], cpu_s=cpu_s, max_rss_bytes=peak)
            for joined in live_records.get(job, ()):
                peak = max((r for r in (rss, joined.usage.max_rss_bytes) if r is not None), default=None)  # type: ignore[union-attr]
                joined.usage = replace(joined.usage, cpu_s=cpu_s, max_rss_bytes=peak)  # type: ignore[arg-type]
    return snap


def job_states(job_ids: Sequence[str]) -> tuple[dict[str, Row], list[str]]:
    """Rows for ``job_ids`` (see :func:`job_snapshot`) and notes on where the states came from."""
    snap = job_snapshot(job_ids)
    return snap.rows, snap.notes


# --- The site's limits, and Slurm's own verdict on a request (the launcher's site preflight) ---
# Kept together at the end of the module: sinfo's nodes, scontrol's partitions and
# ``sbatch --test-only``, each parsed apart from running it.

# Per node: name, CPUs, memory (MB), generic resources, partition (``*`` marks the default one).
SINFO_NODES_FORMAT = "%N|%c|%m|%G|%P"


@dataclass(frozen=True)
class NodeLimits:
    """What one node could ever give one job."""

    name: str
    cpus: int
    memory_mb: int
    gpus: int
    partitions: tuple[str, ...]


@dataclass(frozen=True)
class PartitionLimits:
    """A partition's limits on one job (None: unlimited)."""

    name: str
    default: bool
    max_time_min: Optional[float]
    max_nodes: Optional[int]
    total_nodes: int
    max_cpus_per_node: Optional[int]
    max_mem_per_node_mb: Optional[int]


def slurm_minutes(text: str) -> Optional[float]:
    """A Slurm duration in minutes (None for UNLIMITED/INFINITE).

    Slurm's forms: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.

    Raises:
        ValueError: anything else.
    """
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, dash, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [int(p) for p in rest.split(":")]  # ValueError for junk
    if not days.isdigit() or not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
        raise ValueError(f"not a Slurm duration: {text!r}")
    if dash:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # M or M:S
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return int(days) * 1440 + hours * 60 + minutes + seconds / 60


def gpu_count(gres: str) -> int:
    """GPUs in a gres string: ``gpu:2``, ``gpu:a100:4(S:0-1),gpu:v100:2`` -> 6; ``(null)`` -> 0."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(\s]+)?:(\d+)", gres.strip()))


def parse_nodes(text: str) -> list[NodeLimits]:
    """Nodes of ``sinfo -N -h -o '%N|%c|%m|%G|%P'`` (one line per node and partition), merged per node."""
    nodes: dict[str, NodeLimits] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        name, cpus, memory, gres, partition = parts
        seen = nodes.get(name)
        partitions = (seen.partitions if seen else ()) + (partition.rstrip("*"),)
        nodes[name] = NodeLimits(name, int(cpus), int(memory), gpu_count(gres), partitions)
    return list(nodes.values())


def _limit(value: Optional[str]) -> Optional[int]:
    return int(value) if value is not None and value.isdigit() else None


def parse_partitions(text: str) -> dict[str, PartitionLimits]:
    """Partitions of ``scontrol show partition -o`` (one line each, ``Key=Value`` words), by name."""
    found: dict[str, PartitionLimits] = {}
    for line in text.splitlines():
        fields = dict(word.partition("=")[::2] for word in line.split() if "=" in word)
        name = fields.get("PartitionName")
        if not name:
            continue
        try:
            max_time = slurm_minutes(fields.get("MaxTime", "UNLIMITED"))
        except ValueError:
            max_time = None  # a form this parser does not know: left to sbatch --test-only
        found[name] = PartitionLimits(
            name, fields.get("Default") == "YES", max_time, _limit(fields.get("MaxNodes")),
            _limit(fields.get("TotalNodes")) or 0, _limit(fields.get("MaxCPUsPerNode")),
            _limit(fields.get("MaxMemPerNode")),
        )
    return found


@dataclass(frozen=True)
class QosLimits:
    """A QoS's limits that one job can be over on its own, as ``sacctmgr show qos`` gives them (``cpu``,
    ``mem`` in MB, ``gpu``, ``node``; absent: unlimited): per job, per node, and the group allowance
    of all its jobs together (GrpTRES)."""

    name: str
    per_job: dict[str, int]
    per_node: dict[str, int]
    max_wall_min: Optional[float]
    per_group: dict[str, int] = field(default_factory=dict)


# The QoS limits read: name, MaxTRESPerJob, MaxTRESPerNode, MaxWall, GrpTRES.
QOS_FORMAT = "name,maxtresperjob,maxtrespernode,maxwall,grptres"


def _tres_limits(text: str) -> dict[str, int]:
    """``cpu=4,mem=8G,gres/gpu=2,node=1`` as ``{"cpu": 4, "mem": 8192, "gpu": 2, "node": 1}`` (memory in MB);
    what this parser does not read is left out (sbatch --test-only has judged it)."""
    limits: dict[str, int] = {}
    for key, value in parse_tres(text).items():
        if key in ("cpu", "node") and value.isdigit():
            limits[key] = int(value)
        elif key == "mem" and (size := parse_bytes(value)) is not None:
            limits["mem"] = size // 1024**2 if value.strip()[-1:].isalpha() else size  # a bare number is MB
        elif key in ("gres/gpu", "gpu") and value.isdigit():
            limits["gpu"] = int(value)
    return limits


def parse_qos(text: str, name: str) -> Optional[QosLimits]:
    """``name``'s line of ``sacctmgr -n -P show qos NAME format=`` :data:`QOS_FORMAT`, or None when absent or unreadable."""
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or parts[0] != name:
            continue
        try:
            wall = slurm_minutes(parts[3]) if parts[3].strip() else None
        except ValueError:
            wall = None
        return QosLimits(name, _tres_limits(parts[1]), _tres_limits(parts[2]), wall, _tres_limits(parts[4]))
    return None


def qos_limits(name: str) -> Optional[QosLimits]:
    """A QoS's per-job limits (one ``sacctmgr`` call), or None when they cannot be read."""
    out = run_client(["sacctmgr", "-n", "-P", "show", "qos", name, f"format={QOS_FORMAT}"])
    return None if out is None else parse_qos(out, name)


def site_limits() -> Optional[tuple[dict[str, PartitionLimits], list[NodeLimits]]]:
    """The cluster's partitions and nodes (one scontrol and one sinfo call), or None if either cannot answer."""
    # --all: hidden partitions too (and ones this user may not use: sbatch --test-only says so),
    # so that one named is never refused as missing.
    partitions = run_client(["scontrol", "--all", "show", "partition", "-o"])
    nodes = run_client(["sinfo", "--all", "-N", "-h", "-o", SINFO_NODES_FORMAT])
    if partitions is None or nodes is None:
        return None
    return parse_partitions(partitions), parse_nodes(nodes)


@dataclass(frozen=True)
class WillRun:
    """Slurm's answer to ``sbatch --test-only``: when and where the job would start, or why it cannot."""

    ok: bool
    start: Optional[str] = None
    nodes: Optional[str] = None
    partition: Optional[str] = None
    error: Optional[str] = None


def parse_will_run(returncode: int, stderr: str) -> WillRun:
    """``sbatch --test-only``'s exit code and stderr, e.g. ``sbatch: Job 12 to start at 2026-12-07T05:24:20
    using 1 processors on nodes vm in partition short``, or ``allocation failure: Requested node
    configuration is not available`` (with sbatch's own ``sbatch: error: ...`` lines before it)."""
    match = re.search(r"Job \d+ to start at (\S+) using \d+ processors on nodes (\S+) in partition (\S+)", stderr)
    if returncode == 0 and match:
        return WillRun(True, *match.groups())
    errors: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        for prefix in ("sbatch: error: ", "allocation failure: ", "sbatch: "):
            if line.startswith(prefix):
                line = line[len(prefix):]
                break
        if line and not line.startswith("Try \"sbatch --help\"") and line not in errors:
            errors.append(line)
    return WillRun(False, error="; ".join(errors) or f"sbatch --test-only exited with {returncode} and said nothing")


def will_run(script: str) -> Optional[WillRun]:
    """Ask Slurm whether (and when) this batch script would run, queueing nothing; None if sbatch cannot be asked."""
    if shutil.which("sbatch") is None:
        return None
    try:
        proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_will_run(proc.returncode, proc.stderr)

"""What Slurm says about jobs: ``sacct`` (accounting, still knows a job after it left the queue)
and ``squeue`` (the controller, knows a job before accounting does), parsed into one shape.

Parsing is kept apart from running the commands so that it can be tested on recorded output.
Used on both sides: status and report on the login node, run-directory leases on compute nodes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Optional, Sequence

# One row per job or array task: state, elapsed time, node list, exit code.
Row = dict[str, str]
SACCT_FIELDS = "JobID,State,Elapsed,NodeList,ExitCode"
SQUEUE_FORMAT = "%i|%T|%M|%N"


def run_client(cmd: list[str]) -> Optional[str]:
    """Stdout of a Slurm client command, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
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


def parse_sacct(text: str) -> dict[str, Row]:
    """Rows of ``sacct -X -n -P -o JobID,State,Elapsed,NodeList,ExitCode``, by job or task id.

    A requeued job appears once per run; the last line is the current one.
    """
    rows: dict[str, Row] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 5:
            continue
        job_id, state, elapsed, node, exit_code = parts
        if not job_id.strip():
            continue
        for task_id in expand_array_id(job_id.strip()):
            rows[task_id] = {"state": normalise_state(state), "elapsed": elapsed, "node": node, "exit_code": exit_code}
    return rows


def parse_squeue(text: str) -> dict[str, Row]:
    """Rows of ``squeue -h -r -o '%i|%T|%M|%N'`` (pending and running jobs), by job or task id."""
    rows: dict[str, Row] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0]:
            rows[parts[0]] = {"state": normalise_state(parts[1]), "elapsed": parts[2], "node": parts[3], "exit_code": ""}
    return rows


def query_sacct(job_ids: Sequence[str]) -> Optional[dict[str, Row]]:
    """Accounting's rows for these jobs, or None when sacct cannot answer."""
    if not job_ids:
        return {}
    out = run_client(["sacct", "-X", "-n", "-P", "-o", SACCT_FIELDS, "-j", ",".join(sorted(set(job_ids)))])
    return None if out is None else parse_sacct(out)


def query_squeue(job_ids: Sequence[str]) -> Optional[dict[str, Row]]:
    """The controller's rows for these jobs (pending or running), or None when squeue fails."""
    if not job_ids:
        return {}
    base_ids = sorted({j.partition("_")[0] for j in job_ids})
    out = run_client(["squeue", "-h", "-r", "-j", ",".join(base_ids), "-o", SQUEUE_FORMAT])
    return None if out is None else parse_squeue(out)


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
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
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
                              capture_output=True, text=True, timeout=60)
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


def squeue_available() -> bool:
    return run_client(["squeue", "-h", "-o", "%i"]) is not None


def job_states(job_ids: Sequence[str]) -> tuple[dict[str, Row], list[str]]:
    """Rows for ``job_ids`` from sacct, else squeue; and notes on where the states came from.

    Accounting learns of a job some time after submission (held jobs even later): the ones
    sacct does not know yet are asked of the controller.
    """
    notes: list[str] = []
    rows = query_sacct(job_ids)
    if rows is None:
        notes.append("sacct is unavailable (no accounting here?); states come from squeue and the run files")
        rows = query_squeue(job_ids) or {}
        if not rows and job_ids and not squeue_available():
            notes.append("squeue is unavailable too; states come from the run files only")
        return rows, notes
    unknown = [j for j in job_ids if j not in rows]
    if unknown:
        rows.update(query_squeue(unknown) or {})
    return rows, notes

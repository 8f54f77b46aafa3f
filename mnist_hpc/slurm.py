"""What Slurm says about jobs: ``sacct`` (accounting, still knows a job after it left the queue)
and ``squeue`` (the controller, knows a job before accounting does), parsed into one shape.

Parsing is kept apart from running the commands so that it can be tested on recorded output.
Used on both sides: status and report on the login node, run-directory leases on compute nodes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
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

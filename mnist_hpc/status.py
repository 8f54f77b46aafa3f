"""``mnist-hpc-status``: where submitted jobs stand, from Slurm accounting and the run directories.

Takes job ids, run directories or sweep directories. States come from ``sacct`` (which still
knows a job after it left the queue); when accounting is unavailable it says so and falls
back to ``squeue`` and the files on disk. Login-node code: no TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mnist_hpc.outputs import FAILURE_FILE, JOB_FILE, METRICS_FILE

EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)")
SACCT_FIELDS = "JobID,State,Elapsed,NodeList,ExitCode"


@dataclass
class JobStatus:
    """One job (or array task) as the status table shows it."""

    job_id: str
    state: str = "UNKNOWN"
    elapsed: str = ""
    node: str = ""
    exit_code: str = ""
    last_epoch: Optional[int] = None
    epochs: Optional[int] = None
    run_dir: Optional[str] = None
    log: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    source: str = ""
    # submitit's result pickle: it exists once the job's Python process has ended.
    result_file: Optional[str] = None
    # The trial's number in its sweep, and its slot when several trials share a task.
    trial: Optional[int] = None
    packed_slot: Optional[int] = None


class StatusError(RuntimeError):
    """A target is neither a job id nor a directory holding submitted runs."""


def _run(cmd: list[str]) -> Optional[str]:
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
    return raw.split()[0].rstrip("+") if raw else "UNKNOWN"


def query_sacct(job_ids: Sequence[str]) -> Optional[dict[str, dict[str, str]]]:
    """State, elapsed time, node and exit code per job id, or None when sacct cannot answer."""
    if not job_ids:
        return {}
    out = _run(["sacct", "-X", "-n", "-P", "-o", SACCT_FIELDS, "-j", ",".join(sorted(set(job_ids)))])
    if out is None:
        return None
    rows: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) != 5:
            continue
        job_id, state, elapsed, node, exit_code = parts
        # A requeued job appears once per run; the last line is the current one.
        for task_id in expand_array_id(job_id):
            rows[task_id] = {"state": normalise_state(state), "elapsed": elapsed, "node": node, "exit_code": exit_code}
    return rows


def expand_array_id(job_id: str) -> list[str]:
    """sacct shows the not-yet-started tasks of an array as one row, ``123_[0-3,7%2]``."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.groups()
    tasks: list[str] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        tasks += [f"{base}_{i}" for i in range(int(first), int(last or first) + 1)]
    return tasks


def query_squeue(job_ids: Sequence[str]) -> Optional[dict[str, dict[str, str]]]:
    """Jobs still known to the controller (pending or running), or None when squeue fails."""
    if not job_ids:
        return {}
    base_ids = sorted({j.partition("_")[0] for j in job_ids})
    out = _run(["squeue", "-h", "-r", "-j", ",".join(base_ids), "-o", "%i|%T|%M|%N"])
    if out is None:
        return None
    rows: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            rows[parts[0]] = {"state": parts[1], "elapsed": parts[2], "node": parts[3], "exit_code": ""}
    return rows


def last_epoch(run_dir: Path) -> tuple[Optional[int], Optional[int]]:
    """The last epoch a run logged, and the planned number of epochs, from its files."""
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        try:
            data = json.loads(metrics.read_text())
            done = int(data["epochs_completed"])
            return done, done
        except (ValueError, KeyError, OSError):
            pass
    found: tuple[Optional[int], Optional[int]] = (None, None)
    log = run_dir / "train.log"
    if log.is_file():
        for match in EPOCH_LINE.finditer(log.read_text(errors="replace")):
            found = (int(match.group(1)), int(match.group(2)))
    return found


def _result_file(info: dict) -> Optional[str]:
    folder = info.get("submitit_folder")
    return str(Path(folder) / f"{info['job_id']}_0_result.pkl") if folder else None


def collect(target: str) -> list[JobStatus]:
    """Jobs named by a target: a run dir, a sweep dir (its numbered trials) or a Slurm job id."""
    path = Path(target)
    if path.is_dir():
        run_dirs = [path] if (path / JOB_FILE).is_file() else sorted(
            (p.parent for p in path.glob(f"*/{JOB_FILE}")), key=lambda p: (len(p.name), p.name)
        )
        if not run_dirs:
            raise StatusError(f"{path} holds no submitted run ({JOB_FILE} missing); pass a run or sweep directory, or a job id")
        jobs = []
        for run_dir in run_dirs:
            info = json.loads((run_dir / JOB_FILE).read_text())
            done, planned = last_epoch(run_dir)
            jobs.append(
                JobStatus(
                    job_id=str(info["job_id"]),
                    run_dir=str(run_dir),
                    log=info.get("stdout"),
                    overrides=list(info.get("overrides", [])),
                    last_epoch=done,
                    epochs=planned,
                    source=info.get("cluster", "slurm"),
                    result_file=_result_file(info),
                    trial=info.get("trial"),
                    packed_slot=info.get("packed_slot"),
                )
            )
        return jobs
    if re.fullmatch(r"\d+(_\d+)?", target):
        return [JobStatus(job_id=target, source="slurm")]
    raise StatusError(f"{target!r} is neither a directory nor a Slurm job id")


def _expand_arrays(jobs: list[JobStatus], rows: dict[str, dict[str, str]]) -> list[JobStatus]:
    """A bare array id (``123``) stands for all of its tasks (``123_0``, ``123_1``, ...)."""
    out: list[JobStatus] = []
    for job in jobs:
        tasks = sorted((k for k in rows if k.startswith(job.job_id + "_")), key=lambda k: k.split("_", 1)[1].zfill(9))
        if job.run_dir is None and job.job_id not in rows and tasks:
            out += [JobStatus(job_id=t, source=job.source) for t in tasks]
        else:
            out.append(job)
    return out


def fill_states(jobs: list[JobStatus]) -> tuple[list[JobStatus], list[str]]:
    """Fill state, elapsed and node; return notes about how the states were obtained."""
    notes: list[str] = []
    slurm_ids = [j.job_id for j in jobs if j.source == "slurm"]
    rows = query_sacct(slurm_ids) if slurm_ids else {}
    if rows is None:
        notes.append("sacct is unavailable (no accounting here?); states come from squeue and the run files")
        rows = query_squeue(slurm_ids) or {}
        if not rows and slurm_ids and _run(["squeue", "-h", "-o", "%i"]) is None:
            notes.append("squeue is unavailable too; states come from the run files only")
    else:
        # Accounting learns of a job some time after submission (held jobs even later): ask
        # the controller about the ones sacct does not know yet.
        unknown = [j for j in slurm_ids if j not in rows]
        if unknown:
            rows.update(query_squeue(unknown) or {})
    jobs = _expand_arrays(jobs, rows)
    for job in jobs:
        row = rows.get(job.job_id)
        if row:
            job.state, job.elapsed, job.node, job.exit_code = row["state"], row["elapsed"], row["node"], row["exit_code"]
            if job.packed_slot is not None and job.run_dir:
                job.state = packed_trial_state(Path(job.run_dir), job.state)
        elif job.run_dir and (Path(job.run_dir) / METRICS_FILE).is_file():
            job.state = "COMPLETED"
            job.source += " (files)"
        elif job.result_file and Path(job.result_file).is_file():
            # Ended without writing metrics.json: the task raised.
            job.state = "FAILED"
            job.source += " (files)"
        elif job.source == "local":
            job.state = "RUNNING" if job.last_epoch else "PENDING"
            job.source += " (files)"
    return jobs, notes


def packed_trial_state(run_dir: Path, task_state: str) -> str:
    """A packed trial's own state: its task's state says how the task as a whole ended."""
    if (run_dir / METRICS_FILE).is_file():
        return "COMPLETED"
    if (run_dir / FAILURE_FILE).is_file():
        return "FAILED"
    return task_state


def format_table(jobs: Sequence[JobStatus]) -> str:
    header = ["TRIAL", "JOBID", "STATE", "ELAPSED", "NODE", "EPOCH", "LOG"]
    rows = [
        [
            "-" if j.trial is None else str(j.trial),
            j.job_id,
            j.state,
            j.elapsed or "-",
            j.node or "-",
            f"{j.last_epoch}/{j.epochs}" if j.last_epoch is not None else "-",
            j.log or "-",
        ]
        for j in jobs
    ]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-hpc-status",
        description="Show the Slurm state, elapsed time, node, last epoch and log of submitted mnist-hpc jobs.",
    )
    parser.add_argument("targets", nargs="+", metavar="TARGET", help="a job id, a run directory or a sweep directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    jobs: list[JobStatus] = []
    try:
        for target in args.targets:
            jobs += collect(target)
    except StatusError as exc:
        print(f"mnist-hpc-status: error: {exc}", file=sys.stderr)
        return 1
    jobs, notes = fill_states(jobs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
    else:
        print(format_table(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Status and report of a 10,000-task array: wall time and how often each asks Slurm (issue 23, item 6).

Queues a held array of trivial jobs (``sbatch --hold --array=0-N-1``, nothing trains), writes one
trial directory per task with its ``job.json`` (as a launch leaves them), then runs
``mnist-hpc-status SWEEP``, ``mnist-hpc-status --json SWEEP`` and ``mnist-hpc-report SWEEP`` a few
times each with a PATH wrapper that logs every call of a Slurm client. A second case marks every
trial's job as ended (submitit's result file), so that accounting (sacct) is asked instead of the
controller: the path an ended sweep takes. The array is cancelled by its id at the end.

    python benchmarks/bench_scale.py --out benchmarks/results [--tasks 10000] [--repeats 3]

Needs the local cluster. Writes scale.md and scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnist_hpc import rundir
from mnist_hpc.io import utc_now

CLIENTS = ("squeue", "sacct", "scontrol", "sinfo", "sstat", "sbatch")
LIMIT_S = 3.0


def write_trials(sweep: Path, job_ids: list[str], ended: bool = False) -> None:
    """One trial directory per job, with the ``job.json`` a launch writes (and the result file when ``ended``)."""
    folder = sweep / ".submitit"
    records = []
    submitted = utc_now()  # after the array was queued, as a launch records it
    for trial, job_id in enumerate(job_ids):
        (sweep / str(trial)).mkdir(parents=True, exist_ok=True)
        record = rundir.JobRecord.of("slurm", job_id, None, sweep / str(trial), [f"train.seed={trial}"], trial,
                                     submitted=submitted)
        record.submitit_folder = str(folder)
        records.append(record)
        if ended:
            result = record.result_file
            assert result is not None
            result.parent.mkdir(parents=True, exist_ok=True)
            result.write_bytes(b"")
    rundir.write_jobs(records)


def wrappers(bin_dir: Path, log: Path) -> None:
    """A script per Slurm client that logs its call and runs the real one."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in CLIENTS:
        real = shutil.which(name)
        if real is None:
            continue
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name}" >> {log}\nexec {real} "$@"\n')
        script.chmod(0o755)


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, dict[str, int], int, float]:
    """Wall seconds, Slurm calls by client, lines printed, and CPU seconds (user + system, the
    command and the Slurm clients it ran: the part that does not depend on other users' load)."""
    log.write_text("")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    calls: dict[str, int] = {}
    for line in log.read_text().split():
        calls[line] = calls.get(line, 0) + 1
    return seconds, calls, len(proc.stdout.splitlines()), cpu_s


def measure(sweep: Path, env: dict[str, str], log: Path, repeats: int) -> dict[str, dict]:
    bin_dir = Path(sys.executable).parent
    commands = {
        "mnist-hpc-status SWEEP": [str(bin_dir / "mnist-hpc-status"), str(sweep)],
        "mnist-hpc-status --json SWEEP": [str(bin_dir / "mnist-hpc-status"), "--json", str(sweep)],
        "mnist-hpc-report SWEEP": [str(bin_dir / "mnist-hpc-report"), str(sweep)],
    }
    results = {}
    for name, cmd in commands.items():
        load = os.getloadavg()[0]
        runs = [timed(cmd, env, log) for _ in range(repeats)]
        results[name] = {
            "median_s": round(statistics.median(r[0] for r in runs), 2),
            "all_s": [round(r[0], 2) for r in runs],
            "median_cpu_s": round(statistics.median(r[3] for r in runs), 2),
            "load_1min_before": round(load, 2),
            "slurm_calls": runs[-1][1],
            "lines": runs[-1][2],
        }
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    log = work / "calls.log"
    wrappers(work / "bin", log)
    env = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}"}
    start = time.perf_counter()
    array = subprocess.run(["sbatch", "--parsable", "--hold", f"--array=0-{args.tasks - 1}", "-o", "/dev/null",
                            "--wrap", "true"], capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    queued_s = time.perf_counter() - start
    try:
        ids = [f"{array}_{i}" for i in range(args.tasks)]
        held, ended = work / "held", work / "ended"
        write_trials(held, ids)
        write_trials(ended, ids, ended=True)
        cases = {
            "held array (asks squeue)": measure(held, env, log, args.repeats),
            "every job ended by its files (asks sacct)": measure(ended, env, log, args.repeats),
        }
    finally:
        subprocess.run(["scancel", array], timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    result = {"tasks": args.tasks, "sbatch_hold_array_s": round(queued_s, 2), "limit_s": LIMIT_S, "cases": cases,
              "machine": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "command": "python benchmarks/bench_scale.py --out benchmarks/results"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Status and report of a {args.tasks:,}-task array",
        "",
        f"Reproduce: `{result['command']}` (needs the local cluster; {result['machine']}).",
        f"A held array of {args.tasks:,} trivial jobs (queued by one sbatch in {queued_s:.2f} s) and one trial "
        "directory per task with its job.json; medians of "
        f"{args.repeats} runs, Python start-up included. Required: each within {LIMIT_S:g} s, asking Slurm once.",
        "",
        "| case | command | median wall s | runs s | median CPU s | load before | Slurm calls | lines printed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, commands in cases.items():
        for name, r in commands.items():
            calls = ", ".join(f"{k} x{v}" for k, v in sorted(r["slurm_calls"].items())) or "none"
            lines.append(f"| {case} | `{name}` | {r['median_s']} | {r['all_s']} | {r['median_cpu_s']} | "
                         f"{r['load_1min_before']} | {calls} | {r['lines']} |")
    lines += [
        "",
        "Wall time depends on what else runs on the machine (the 1-minute load average before each command is "
        "shown; the machine has 2 CPUs shared with other work); CPU time (user + system of the command and the "
        "Slurm client it ran) does not. Most of it is reading 10,000 trial directories' files (job.json, "
        "metrics, progress, failure, identity) through the run directory's checked readers; Slurm's answer is "
        "one call. Status prints a summary by state and at most 10 trials per kind that needs attention "
        "(`--all` lists all, `--json` keeps every trial); the report keeps every trial in its table and CSV and "
        "draws at most 50 learning curves.",
    ]
    (args.out / "scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""``mnist-hpc-status``: where submitted jobs stand, from Slurm accounting and the run directories.

Takes job ids, run directories or sweep directories. States come from ``sacct`` (which still
knows a job after it left the queue); when accounting is unavailable it says so and falls
back to ``squeue`` and the files on disk (:mod:`mnist_hpc.login.trials`). Login-node code: no
TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from mnist_hpc import rundir
from mnist_hpc.login.trials import (
    TargetError,
    Trial,
    fill_states,
    find_runs,
    job_trial,
    read_trial,
)
from mnist_hpc.io import path_problem
from mnist_hpc.search import is_search_dir


def collect(target: str) -> list[Trial]:
    """Trials named by a target: a run dir, a sweep dir (its numbered trials) or a Slurm job id.

    Raises:
        TargetError: the target is none of these, or a directory that holds no submitted run.
    """
    path = Path(target)
    if path.is_dir():
        try:
            submitted = [d for d in find_runs(path)[1] if (d / rundir.JOB_FILE).is_file()]
        except TargetError:
            submitted = []
        if not submitted:
            raise TargetError(
                f"{path} holds no submitted run ({rundir.JOB_FILE} missing); pass a run or sweep directory, or a job id"
            )
        return [read_trial(d) for d in submitted]
    if re.fullmatch(r"\d+(_\d+)?", target):
        return [job_trial(target)]
    raise TargetError(f"{target!r} is neither a directory nor a Slurm job id")


def format_table(trials: Sequence[Trial]) -> str:
    header = ["TRIAL", "JOBID", "STATE", "TASKS", "ELAPSED", "NODE", "EPOCH", "LOG"]
    rows = [
        [
            "-" if t.number is None else str(t.number),
            t.job_id,
            t.state,
            str(t.tasks),
            t.elapsed or "-",
            t.node or "-",
            f"{t.epochs_done}/{t.epochs_planned}" if t.epochs_done is not None else "-",
            t.stdout or "-",
        ]
        for t in trials
    ]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)


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
    for target in args.targets:
        if (too_long := path_problem(Path(target), "target")) is not None:
            print(f"mnist-hpc-status: error: {too_long}", file=sys.stderr)
            return 1
    # An asynchronous search directory: its study and workers (mnist_hpc.login.study).
    searches = [t for t in args.targets if is_search_dir(Path(t))]
    if searches:
        return search_main(searches, args.json) if len(searches) == len(args.targets) else _mixed_targets()
    trials: list[Trial] = []
    try:
        for target in args.targets:
            trials += collect(target)
    except TargetError as exc:
        print(f"mnist-hpc-status: error: {exc}", file=sys.stderr)
        return 1
    trials, notes = fill_states(trials)
    for note in notes + [f"{t.label}: {n}" for t in trials for n in t.notes]:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps([t.status_row() for t in trials], indent=2))
    else:
        print(format_table(trials))
    return 0


def _mixed_targets() -> int:
    print("mnist-hpc-status: error: pass search directories alone (not with runs, sweeps or job ids)", file=sys.stderr)
    return 1


def search_main(search_dirs: list[str], as_json: bool) -> int:
    """``mnist-hpc-status SEARCH_DIR``: the study (trials by state, best so far) and its workers."""
    from mnist_hpc.login.study import format_status, read_study, status_json

    views = [read_study(Path(d)) for d in search_dirs]
    for note in [n for v in views for n in v.notes]:
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        print(json.dumps([status_json(v) for v in views], indent=2))
    else:
        print("\n\n".join(format_status(v) for v in views))
    return 0


if __name__ == "__main__":
    sys.exit(main())

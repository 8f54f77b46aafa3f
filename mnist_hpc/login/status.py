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
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from mnist_hpc import rundir, slurm
from mnist_hpc.login.trials import (
    TargetError,
    Trial,
    cost_totals,
    fill_states,
    find_runs,
    job_trial,
    read_trial,
    sort_trials,
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
            submitted = [d for d in find_runs(path, ordered=False)[1] if (d / rundir.JOB_FILE).is_file()]
        except TargetError:
            submitted = []
        if not submitted:
            raise TargetError(
                f"{path} holds no submitted run ({rundir.JOB_FILE} missing); pass a run or sweep directory, or a job id"
            )
        return sort_trials([read_trial(d) for d in submitted])
    if re.fullmatch(r"\d+(_\d+)?", target):
        return [job_trial(target)]
    raise TargetError(f"{target!r} is neither a directory nor a Slurm job id")


# Ended states that a user should look into: listed one by one even in a large sweep's summary.
ATTENTION_STATES = frozenset({"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "CANCELLED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"})
# Targets up to this many trials are listed in full; larger ones are summarised by state.
LIST_ALL_UP_TO = 20
# In a summary, trials that need attention for the same state and reason are listed up to this many.
ATTENTION_LINES_PER_KIND = 10


def needs_attention(trial: Trial) -> bool:
    """Ended badly, or pending for a reason that waiting will not cure."""
    return trial.state in ATTENTION_STATES or bool(trial.wait and trial.wait.attention)


def _gb(n_bytes: Optional[int]) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 1024**3:.2f}G"


def format_table(trials: Sequence[Trial]) -> str:
    header = ["TRIAL", "JOBID", "STATE", "TASKS", "ELAPSED", "NODE", "REASON", "CPU_EFF", "MAXRSS/ASKED", "EPOCH", "LOG"]
    rows = []
    for t in trials:
        u = t.usage
        eff = u.cpu_efficiency if u is not None else None
        rows.append([
            "-" if t.number is None else str(t.number),
            t.job_id,
            t.state,
            str(t.tasks),
            t.elapsed or "-",
            t.node or "-",
            t.wait.code if t.wait else "-",
            "-" if eff is None else f"{100 * eff:.0f}%",
            "-" if u is None else f"{_gb(u.max_rss_bytes)}/{_gb(u.req_mem_bytes)}",
            f"{t.epochs_done}/{t.epochs_planned}" if t.epochs_done is not None else "-",
            t.stdout or "-",
        ])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)


def short_time(iso: str) -> str:
    """``2026-12-07T14:20:00`` -> ``2026-12-07 14:20``; anything else as it is."""
    return iso.replace("T", " ")[:16] if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?", iso) else iso


def _jobs(trials: Sequence[Trial], limit: int = 3) -> str:
    """The jobs to act on, as the job list scontrol and squeue take (comma-separated): an array by
    its base id, which stands for all of its tasks."""
    ids = sorted({t.job_id.partition("_")[0] for t in trials})
    return ",".join(ids[:limit]) + (",..." if len(ids) > limit else "")


def wait_summary(pending: Sequence[Trial]) -> str:
    """``996 PENDING: 990 waiting its turn ... (Priority), expected start 14:20 (wait); 6 held ...``."""
    groups: dict[str, list[Trial]] = {}
    for t in pending:
        groups.setdefault(t.reason, []).append(t)
    parts = []
    for code, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        why = group[0].wait
        assert why is not None  # pending trials have a reason (possibly "None")
        # Family and unknown codes are in their words already: named once.
        text = f"{len(group)} {why.words}" + ("" if why.code in why.words else f" ({why.code})")
        # The earliest by time (a text sort would put a 5-digit year first); only foreseeable starts.
        now = datetime.now()
        starts = sorted((when, t.expected_start) for t in group
                        if t.expected_start and (when := slurm.foreseeable_start(t.expected_start, now)) is not None)
        if starts:
            text += f", expected start {short_time(starts[0][1])}"
        parts.append(f"{text}: {why.todo.replace('JOBID', _jobs(group))}")
    return f"{len(pending)} PENDING: " + "; ".join(parts)


def cost_summary(state: str, trials: Sequence[Trial]) -> Optional[str]:
    """``4 RUNNING: 0.20 core-hours, CPU efficiency 87%, peak memory 0.90G of 4.00G asked`` (accounting)."""
    totals = cost_totals(trials)
    if totals is None:
        return None
    text = f"{len(trials)} {state}: {totals.core_hours:.2f} core-hours"
    text += f", {totals.gpu_hours:.2f} GPU-hours" if totals.gpu_hours else ""
    if totals.cpu_efficiency is not None:
        text += f", CPU efficiency {100 * totals.cpu_efficiency:.0f}%"
    if totals.max_rss_bytes is not None:
        text += f", peak memory {_gb(totals.max_rss_bytes)} of {_gb(totals.req_mem_bytes)} asked"
    return text


def format_summary(trials: Sequence[Trial], listed: str) -> str:
    """Counts by state, why the pending ones wait, and what the running and ended ones used."""
    by_state: dict[str, list[Trial]] = {}
    for t in trials:
        by_state.setdefault(t.state, []).append(t)
    order = sorted(by_state, key=lambda s: -len(by_state[s]))
    lines = [f"{len(trials)} trial(s): " + ", ".join(f"{len(by_state[s])} {s}" for s in order)]
    for state in order:
        if state == "PENDING":
            lines.append(wait_summary(by_state[state]))
        elif (line := cost_summary(state, by_state[state])) is not None:
            lines.append(line)
    return "\n".join(lines + ([listed] if listed else []))


def format_status(trials: Sequence[Trial], show_all: bool) -> str:
    """The table (every trial, or in a large target only those that need attention) and the summary."""
    if show_all or len(trials) <= LIST_ALL_UP_TO:
        shown, listed = list(trials), ""
    else:
        # The first few of each kind (state and reason): the summary says what to do for all of them.
        kinds: dict[tuple[str, str], int] = {}
        attention = [t for t in trials if needs_attention(t)]
        shown = []
        for t in attention:
            kind = (t.state, t.reason)
            kinds[kind] = kinds.get(kind, 0) + 1
            if kinds[kind] <= ATTENTION_LINES_PER_KIND:
                shown.append(t)
        listed = f"(listed: {len(shown)} of the {len(attention)} trial(s) that need attention; --all lists all {len(trials)})"
    return "\n\n".join(([format_table(shown)] if shown else []) + [format_summary(trials, listed)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-hpc-status",
        description="Show the Slurm state, elapsed time, node, last epoch and log of submitted mnist-hpc jobs.",
    )
    parser.add_argument("targets", nargs="+", metavar="TARGET", help="a job id, a run directory or a sweep directory")
    parser.add_argument("--json", action="store_true", help="print JSON (every trial, with its reason, expected start "
                        "and cost) instead of a table")
    parser.add_argument("--all", action="store_true", help=f"list every trial (a target of more than {LIST_ALL_UP_TO} "
                        "trials lists only those that need attention, and a summary by state)")
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
        print(format_status(trials, args.all))
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

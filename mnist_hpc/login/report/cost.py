"""The report's cost and sizing section: what the sweep's jobs used, and requests that could be smaller.

Every figure comes from the one accounting query of :func:`mnist_hpc.login.trials.read_trials`
(``sacct``: Elapsed, TotalCPU, AllocCPUS, AllocTRES, ReqMem, the steps' MaxRSS, CPUTimeRAW), and for
jobs still running from one ``sstat`` call (their CPU time and peak memory so far).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from mnist_hpc.login.trials import CostTotals, Trial, cost_totals

GB = 1024**3
# Advice on memory once the request is at least this many times the peak (and 1 GB more than a fit).
MEM_OVERSIZED = 2.0
# Headroom kept above the peak when proposing a smaller memory request.
MEM_HEADROOM = 1.25
# Advice on CPUs when the jobs' CPU efficiency is below this.
CPU_IDLE = 0.5


def _gb(n_bytes: Optional[int]) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GB:.2f} GB"


def advice(trials: Sequence[Trial]) -> list[str]:
    """Requests the jobs did not need: memory well above the peak, CPUs that sat idle.

    Jobs are compared with their own request: a sweep over memory or CPUs gets advice per request.
    """
    groups: dict[tuple[Optional[int], int], list[Trial]] = {}
    for t in trials:
        if t.usage is not None:
            groups.setdefault((t.usage.req_mem_bytes, t.usage.alloc_cpus), []).append(t)
    lines = []
    for group in groups.values():
        totals = cost_totals(group)
        assert totals is not None  # every trial of a group has usage
        lines += _advice(totals, f" ({totals.jobs} of the jobs)" if len(groups) > 1 else "")
    return lines


def _advice(totals: CostTotals, which: str) -> list[str]:
    lines = []
    peak, asked = totals.max_rss_bytes, totals.req_mem_bytes
    if peak is not None and asked:
        fit = max(1, math.ceil(peak * MEM_HEADROOM / GB))
        if asked >= MEM_OVERSIZED * peak and asked - fit * GB >= GB:
            lines.append(f"asked {_gb(asked)}, peak {_gb(peak)}{which}: hydra.launcher.mem_gb={fit} fits")
    eff, cpus = totals.cpu_efficiency, totals.alloc_cpus
    if eff is not None and cpus and eff < CPU_IDLE:
        fit = max(1, math.ceil(eff * cpus / 0.8))
        if fit < cpus:
            lines.append(f"{cpus} CPUs per job, CPU efficiency {100 * eff:.0f}%{which}: CPUs sat idle; "
                         f"hydra.launcher.cpus_per_task={fit} fits")
        else:
            lines.append(f"CPU efficiency {100 * eff:.0f}% with {cpus} CPU(s){which}: the jobs waited (I/O, data "
                         "loading) more than they computed")
    return lines


def cost_section(trials: Sequence[Trial]) -> str:
    """Totals per state and for the sweep, and advice; each trial's own figures are in the CSV."""
    totals = cost_totals(trials)
    if totals is None:
        if not any(t.source == "slurm" for t in trials):
            why = "these trials ran under the local launcher, and cost figures come from Slurm's accounting"
        else:  # the notes say which: sacct could not answer, or a record's id names another job now
            why = "Slurm's accounting gave none for these trials' jobs (a job not started yet, sacct unavailable, or an id that names another job now: see the notes)"
        return f"## Cost and sizing\n\nNo cost figures: {why}."
    header = "| trials | jobs | core-hours | GPU-hours | CPU efficiency | peak memory | asked |\n|---|---|---|---|---|---|---|"
    by_state: dict[str, list[Trial]] = {}
    for t in trials:
        by_state.setdefault(t.state, []).append(t)
    rows = []
    for label, group in [(f"{len(g)} {s}", g) for s, g in sorted(by_state.items())] + [("all", list(trials))]:
        tot = cost_totals(group)
        if tot is None:
            continue
        eff = "-" if tot.cpu_efficiency is None else f"{100 * tot.cpu_efficiency:.0f}%"
        rows.append(f"| {label} | {tot.jobs} | {tot.core_hours:.3f} | {tot.gpu_hours:.3f} | {eff} | "
                    f"{_gb(tot.max_rss_bytes)} | {_gb(tot.req_mem_bytes)} |")
    parts = ["## Cost and sizing", header + "\n" + "\n".join(rows)]
    tips = advice(trials)
    parts.append("\n".join(f"- advice: {tip}" for tip in tips) if tips else "- advice: none; the requests fit what was used.")
    parts.append(
        "From accounting (sacct), and for running jobs sstat: core-hours are CPUTimeRAW (elapsed x allocated "
        "CPUs), CPU efficiency is TotalCPU / CPUTimeRAW (accounting adds a step's CPU time when it ends; a running "
        "job's so far comes from sstat), peak memory the largest MaxRSS of any step (sampled every "
        "JobAcctGatherFrequency seconds: a job shorter than that may show none). Trials that ran in one job "
        "(packed, or one search worker) share its cost by their recorded wall times; the CSV has each trial's share."
    )
    return "\n\n".join(parts)

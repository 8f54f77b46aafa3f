"""Hostile pass (hostile3): the cost of a requeued job, on the real local cluster (issue 23 items 3 and 7).

A job that runs, is requeued (what a time-limited training does on USR2) and runs again used the
CPUs of both runs. Accounting keeps one record per run, but ``sacct`` without ``--duplicates``
shows the last one only. The expected figure is read by the test from ``sacct -D`` itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import make_trial, sh, status_rows, until

# The first run waits to be requeued; the second ends at once.
SCRIPT = """#!/bin/bash
#SBATCH --job-name=hostile3-requeue-cost
#SBATCH --time=2
#SBATCH --requeue
#SBATCH --output={out}/slurm-%j.out
if [ "${{SLURM_RESTART_COUNT:-0}} " = "0 " ]; then sleep 90; else sleep 1; fi
"""


def elapsed_s(job: str) -> int:
    """Seconds the job has run so far (squeue %M: [D-][H:]M:S), 0 unless it runs."""
    out = sh("squeue", "-h", "-j", job, "-t", "RUNNING", "-o", "%M").strip()
    if not out:
        return 0
    parts = [int(p) for p in out.split("-")[-1].split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def core_seconds_of_every_run(job: str) -> list[tuple[str, int]]:
    """(state, CPUTimeRAW) of each run of ``job``, from accounting with --duplicates."""
    out = sh("sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "State,CPUTimeRAW")
    return [(line.split("|")[0].split()[0], int(line.split("|")[1])) for line in out.splitlines() if line]


@pytest.mark.slurm
@pytest.mark.slow  # ~30 s: the first run lasts 5 s, and Slurm holds a requeued job ~20 s before it runs again
def test_a_requeued_jobs_cost_counts_every_run(tmp_path: Path) -> None:
    (tmp_path / "job.sh").write_text(SCRIPT.format(out=tmp_path))
    job = sh("sbatch", "--parsable", str(tmp_path / "job.sh")).strip().split(";")[0]
    try:
        until(lambda: elapsed_s(job) >= 5, f"job {job} to run 5 s", timeout_s=60, every_s=0.5)
        sh("scontrol", "requeue", job)
        until(lambda: [s for s, _ in core_seconds_of_every_run(job)][-1:] == ["COMPLETED"], f"job {job}'s second run to end",
              timeout_s=120, every_s=1.0)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    runs = core_seconds_of_every_run(job)
    assert [s for s, _ in runs] == ["REQUEUED", "COMPLETED"] and runs[0][1] >= 5, runs  # precondition: two runs
    sweep = tmp_path / "sweep"
    make_trial(sweep, 0, ["train.seed=0"], cluster="slurm", job_id=job, ended=True)
    [row] = status_rows(sweep)
    assert row["job_id"] == job and row["cost"] is not None  # precondition: the job's cost is shown
    # (the trial itself reads FAILED: its directory has no results, this job trained nothing)
    assert row["cost"]["core_hours"] * 3600 == pytest.approx(sum(c for _, c in runs), abs=0.01)

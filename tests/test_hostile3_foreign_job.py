"""Hostile pass (hostile3): a reason or cost shown is the job's own (issue 23 items 2 and 3), on the real cluster.

A run directory's job.json names its job by Slurm id alone. A sweep copied from another cluster
(or kept across a cluster's reinstall, or past MaxJobId's wrap) names ids that now belong to other
jobs. Here the id is that of an unrelated job of this user (another name, submitted long after the
trial's recorded submission): its cost must not be shown as the trial's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import fake_metrics, make_trial, sh, status_rows, until

pytestmark = pytest.mark.slurm


def test_an_unrelated_job_with_the_recorded_id_is_not_shown_as_the_trials(tmp_path: Path) -> None:
    job = sh("sbatch", "--parsable", "-J", "hostile3-unrelated", "-t", "1", "-o", str(tmp_path / "slurm-%j.out"),
             "--wrap", "true").strip().split(";")[0]
    try:
        until(lambda: "COMPLETED" in sh("sacct", "-X", "-n", "-P", "-j", job, "-o", "State"), f"job {job} to end",
              timeout_s=60, every_s=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    sweep = tmp_path / "sweep"
    # The trial's own job was "mnist-hpc", submitted 2026-01-01 (make_trial's record); it ran and ended.
    run_dir = make_trial(sweep, 0, ["train.seed=0"], cluster="slurm", job_id=job, ended=True,
                         metrics=fake_metrics(0.97, 0.98, 0.98, wall=30.0))
    assert json.loads((run_dir / "job.json").read_text())["submitted"].startswith("2026-01-01")  # precondition
    [row] = status_rows(sweep)
    assert row["job_id"] == job  # precondition: the trial names the unrelated job's id
    assert row["cost"] is None, f"the cost of unrelated job {job} ({row['cost']}) is shown as trial 0's"

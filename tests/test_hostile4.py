"""Hostile pass 4 (hostile4): today's changes attacked as a hostile user would (issue 21's standard).

Each finding is a test that fails on the code it was found on (``xfail(strict=True)``: it turns
into an unexpected pass, an error, when the finding is fixed; then the marker goes). The probes
that held are in tests/HOSTILE.md's "Pass 4" table, some pinned by plain tests here.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.helpers import make_trial, sh, status_rows

UTC = timezone.utc


# --- H1: the user's SLURM_TIME_FORMAT -------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.xfail(strict=True, reason="hostile4 H1: SLURM_TIME_FORMAT in the user's environment changes how "
                   "squeue/sacct print Submit (TZ=UTC alone does not fix it); the times then parse as unknown, "
                   "and a job queued after the record is joined by id alone, its reason shown as the trial's")
@pytest.mark.parametrize("time_format", ["relative", "%s"])
def test_a_users_slurm_time_format_does_not_let_another_job_pass_as_the_trials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, time_format: str) -> None:
    job = sh("sbatch", "--parsable", "--hold", "-J", "hostile4-format", "-o", "/dev/null", "--wrap", "true").strip().split(";")[0]
    try:
        hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds")
        make_trial(tmp_path / "old", 0, ["train.seed=0"], cluster="slurm", job_id=job, submitted=hour_ago)
        [plain] = status_rows(tmp_path / "old")
        # A user's shell profile: Slurm's documented variable for how its clients print times.
        monkeypatch.setenv("SLURM_TIME_FORMAT", time_format)
        [old] = status_rows(tmp_path / "old")
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert plain["reason"] is None and any("not this run's" in n for n in plain["notes"]), plain  # precondition
    assert old["reason"] is None and old["state"] != "PENDING", (
        f"with SLURM_TIME_FORMAT={time_format}, job {job} (queued an hour after the record) is shown as the trial's: {old}")

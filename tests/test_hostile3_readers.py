"""Hostile pass (hostile3) over what status and report now parse and show (issue 23 items 2, 3, 6).

Each test here reproduces a finding (each now fixed). Preconditions are checked in fixtures or
before the asserting line, so that a broken precondition is an error of the test, not the finding.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mnist_hpc import rundir, slurm
from mnist_hpc.login import status
from mnist_hpc.login.report import cost
from mnist_hpc.login.trials import Trial

GB = 1024**3


# --- accounting's sizes: "None when empty or unreadable", yet a traceback ----------------------------


@pytest.mark.parametrize("odd", ["1.2.3M", ".", "9" * 400])
def test_an_unreadable_size_in_sacct_or_sstat_is_unknown_not_a_traceback(odd: str) -> None:
    # The step's MaxRSS (sacct) and the running job's MaxRSS (sstat) both go through parse_bytes;
    # status and report call them through fill_states with no guard, so an exception is a traceback.
    sacct = ("JobID|State|Elapsed|NodeList|ExitCode|AllocCPUS|AllocTRES|ReqMem|MaxRSS|CPUTimeRAW|TotalCPU\n"
             "7|COMPLETED|00:01:40|vm|0:0|1|billing=1,cpu=1,mem=1G,node=1|1G||100|00:50\n"
             f"7.batch|COMPLETED|00:01:40|vm|0:0|1|cpu=1,mem=1G,node=1||{odd}||00:50\n")
    acct = slurm.parse_sacct(sacct)
    assert acct.rows["7"]["state"] == "COMPLETED"
    assert acct.usage["7"].max_rss_bytes is None  # unreadable peak: unknown, the job's other figures kept
    assert acct.usage["7"].core_s == 100.0
    assert slurm.parse_sstat(f"8.batch|{odd}|cpu=00:00:05\n") == {"8": (5.0, None)}


# --- expected starts: the launch hides a start years away, status shows it (and picks it first) ----------


def pending(job_id: str, start: str) -> Trial:
    return Trial(run_dir=None, files=rundir.RunFiles(Path()), job_id=job_id, state="PENDING", reason="Resources",
                 expected_start=start)


def test_a_start_slurm_cannot_foresee_is_not_shown_as_the_expected_start() -> None:
    near, far = pending("5_0", "2026-12-07T14:20:00"), pending("5_1", "10193-01-01T00:00:00")
    line = status.wait_summary([near, far])
    assert line.startswith("2 PENDING: 2 waiting its turn")  # precondition: one group, both tasks
    assert "expected start 2026-12-07 14:20" in line
    assert "10193" not in line
    # Alone, a start years away (Slurm 22.05 answers year 6109 for a job it cannot place) is no expectation.
    assert "6109" not in status.wait_summary([pending("6_0", "6109-03-01T00:00:00")])


# --- the report's cost by state: one packed job counted whole in each state's row ------------------------


def packed_trial(label_dir: Path, state: str) -> Trial:
    usage = slurm.Usage(elapsed_s=3600.0, cpu_s=3600.0, alloc_cpus=1, core_s=3600.0, req_mem_bytes=GB, max_rss_bytes=GB // 2)
    t = Trial(run_dir=label_dir, files=rundir.RunFiles(label_dir), job_id="9_0", source="slurm", state=state, usage=usage)
    t.share = 0.5
    return t


def test_the_cost_rows_by_state_add_up_to_the_whole(tmp_path: Path) -> None:
    # One packed task (1 core-hour), two trials sharing it half and half: one COMPLETED, one FAILED
    # (a packed task's later trial can fail while the earlier one completed).
    trials = [packed_trial(tmp_path / "0", "COMPLETED"), packed_trial(tmp_path / "1", "FAILED")]
    assert [t.cost_row()["core_hours"] for t in trials] == [0.5, 0.5]  # precondition: each trial's share
    section = cost.cost_section(trials)
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| ([^|]+?) \| \d+ \| ([0-9.]+) \|", section, re.M)}
    assert rows["all"] == 1.0  # precondition: the job counted once overall
    assert rows["1 COMPLETED"] + rows["1 FAILED"] == rows["all"]


# --- reasons as squeue prints them: %r is the job's state_desc when Slurm set one ------------------------


def test_a_reason_with_slurms_details_is_explained_as_its_code() -> None:
    rows = slurm.parse_squeue("12|PENDING|0:00||ReqNodeNotAvail, UnavailableNodes:vm|N/A|12\n")
    assert rows["12"]["reason"] == "ReqNodeNotAvail, UnavailableNodes:vm"  # precondition: the text as squeue gave it
    why = slurm.explain_reason(rows["12"]["reason"])
    assert why.attention is True
    assert why.words.startswith(slurm.REASONS["ReqNodeNotAvail"][0])


# --- the report's settings that tell trials apart, cut past 16 characters ---------------------------------


def test_trials_whose_identities_differ_are_shown_apart() -> None:
    from mnist_hpc.login.report import ranking

    trials = []
    for num, units in enumerate(([1024, 1024, 512], [1024, 1024, 256])):
        files = rundir.RunFiles(Path(f"/sweep/{num}"))
        files.overrides = ["train.seed=0"]
        files.identity = {"model.hidden_units": units, "data.sha256": "ab" * 32}
        trials.append(Trial(run_dir=Path(f"/sweep/{num}"), files=files))
    swept = ranking.swept_params(trials)
    assert list(swept) == ["model.hidden_units"]  # precondition: the report knows they differ
    first, second = (ranking.shown_settings(t, swept) for t in trials)
    assert first != second, first

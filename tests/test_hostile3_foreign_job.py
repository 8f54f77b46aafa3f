"""Hostile pass (hostile3): a reason or cost shown is the job's own (issue 23 items 2 and 3).

A run directory's job.json names its job by Slurm id alone. A sweep copied from another cluster
(or kept across a cluster's reinstall, or past MaxJobId's wrap) names ids that now belong to other
jobs. Only the job that held the id when job.json was written (its ``submitted``) is the trial's
(:func:`mnist_hpc.slurm.job_snapshot`): the unit tests below feed the joiner accounting text with
two jobs under one id and requeue chains; the Slurm tests ask the real cluster.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mnist_hpc import rundir, slurm
from mnist_hpc.login import trials as trials_mod
from tests.helpers import fake_metrics, make_trial, sh, status_rows, until

UTC = timezone.utc
HEADER = "JobID|State|Elapsed|NodeList|ExitCode|ElapsedRaw|AllocCPUS|AllocTRES|ReqMem|MaxRSS|CPUTimeRAW|TotalCPU|Submit|End"


def run_line(job: str, state: str, submit: str, end: str, seconds: int) -> str:
    """One run of ``job`` in ``sacct -D -P`` output (TZ=UTC): one CPU for ``seconds``, half of it busy."""
    alloc = "billing=1,cpu=1,mem=1G,node=1" if state != "PENDING" else ""
    return f"{job}|{state}|00:00:{seconds:02d}|vm|0:0|{seconds}|1|{alloc}|1G||{seconds}|00:{seconds // 2:02d}|{submit}|{end}"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# Job 500 of a cluster reinstalled with its accounting kept: an old job of 2025, then the trial's
# job (queued 10:00:00), requeued twice (a requeue queues the next run as the previous one ends).
REUSED = "\n".join([
    HEADER,
    run_line("500", "COMPLETED", "2025-03-01T09:00:00", "2025-03-01T09:00:50", 50),
    run_line("500", "REQUEUED", "2026-06-01T10:00:00", "2026-06-01T10:00:10", 10),
    "500.batch|CANCELLED|00:00:10|vm|0:15|10|1|cpu=1,mem=1G,node=1||300M|10|00:05|2026-06-01T10:00:00|2026-06-01T10:00:10",
    run_line("500", "REQUEUED", "2026-06-01T10:00:10", "2026-06-01T10:00:30", 20),
    run_line("500", "RUNNING", "2026-06-01T10:00:30", "Unknown", 4),
    # Array 900's task 3 was the trial's; a later array 900 (after the reinstall) has its tasks pending.
    run_line("900_3", "COMPLETED", "2026-06-01T10:00:00", "2026-06-01T10:00:40", 40),
    run_line("900_[0-5]", "PENDING", "2026-09-01T08:00:00", "Unknown", 0),
]) + "\n"


def states(runs: list[slurm.Run] | None) -> list[str] | None:
    return None if runs is None else [r.row["state"] for r in runs]


def test_two_jobs_under_one_id_are_told_apart_and_a_requeue_chain_of_three_runs_stays_whole():
    acct = slurm.parse_sacct(REUSED)
    runs = acct.runs["500"]
    assert len(runs) == 4 and acct.usage["500"].core_s == 84.0  # joined by id alone: both jobs add up
    chain = slurm.own_runs(runs, at("2026-06-01T10:00:02"))  # the launcher's record, just after sbatch
    assert states(chain) == ["REQUEUED", "REQUEUED", "RUNNING"]
    row, usage = slurm.fold_runs(chain)
    assert row["state"] == "RUNNING" and usage is not None
    assert (usage.core_s, usage.elapsed_s, usage.max_rss_bytes) == (34.0, 34.0, 300 * 1024**2)
    # A record written during the second run (a job writing its own job.json): the same chain.
    assert states(slurm.own_runs(runs, at("2026-06-01T10:00:20"))) == ["REQUEUED", "REQUEUED", "RUNNING"]
    # The old job's own record (a directory from before the reinstall): only the old job.
    assert states(slurm.own_runs(runs, at("2025-03-01T09:00:01"))) == ["COMPLETED"]
    # A record of a time when no job had the id here (another cluster's): the old job had ended.
    assert slurm.own_runs(runs, at("2025-12-01T00:00:00")) is None
    # Before any of them: none.
    assert slurm.own_runs(runs, at("2024-01-01T00:00:00")) is None


def test_clock_skew_within_five_minutes_is_allowed_and_beyond_it_is_not():
    runs = slurm.parse_sacct("\n".join([HEADER, run_line("7", "COMPLETED", "2026-06-01T10:00:00", "2026-06-01T10:20:00", 9)])).runs["7"]
    # The record's clock 4 min behind the controller's: still its job.
    assert states(slurm.own_runs(runs, at("2026-06-01T09:56:00"))) == ["COMPLETED"]
    # Queued 6 min after the record was written: another job.
    assert slurm.own_runs(runs, at("2026-06-01T09:54:00")) is None
    # Written 4 min after the job ended (skew again): still its; 6 min after: the job had ended.
    assert states(slurm.own_runs(runs, at("2026-06-01T10:24:00"))) == ["COMPLETED"]
    assert slurm.own_runs(runs, at("2026-06-01T10:26:00")) is None


class FakeSlurm:
    """squeue, sacct and sstat answering from given text, recording what each was asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, squeue: str = "", sacct: str = "") -> None:
        self.asked: dict[str, list[list[str]]] = {"squeue": [], "sacct": [], "sstat": []}
        monkeypatch.setattr(slurm, "query_squeue", lambda ids: self._ask("squeue", ids, slurm.parse_squeue(squeue)))
        monkeypatch.setattr(slurm, "query_sacct", lambda ids: self._ask("sacct", ids, slurm.parse_sacct(sacct)))
        monkeypatch.setattr(slurm, "query_sstat", lambda ids: self._ask("sstat", ids, {}))

    def _ask(self, client: str, ids, answer):
        self.asked[client].append(sorted(ids))
        return answer


def test_the_joiner_keeps_only_the_recorded_jobs_runs_and_names_the_other(monkeypatch: pytest.MonkeyPatch):
    FakeSlurm(monkeypatch, sacct=REUSED)
    snap = slurm.job_snapshot(["500", "900_3"], recorded={"500": at("2026-06-01T10:00:02"), "900_3": at("2026-06-01T10:00:01")})
    assert snap.rows["500"]["state"] == "RUNNING" and snap.usage["500"].core_s == 34.0
    assert snap.rows["900_3"]["state"] == "COMPLETED" and snap.usage["900_3"].core_s == 40.0
    assert snap.foreign == {}
    # The same ids recorded by a cluster where they named other jobs (June 2026 there, after the old
    # job 500 here had ended; array task 900_3 here is a later array's).
    snap = slurm.job_snapshot(["500", "900_3"], recorded={"500": at("2025-12-01T00:00:00"), "900_3": at("2026-08-01T00:00:00")})
    assert "500" not in snap.rows and "500" not in snap.usage and "900_3" not in snap.rows
    assert set(snap.foreign) == {"500", "900_3"} and "not this run's" in snap.foreign["900_3"]
    # Without a record time (an older job.json): joined by id as before.
    snap = slurm.job_snapshot(["500"])
    assert snap.usage["500"].core_s == 84.0 and snap.foreign == {}


def test_record_times_at_the_ends_of_the_calendar(monkeypatch: pytest.MonkeyPatch):
    """A job.json may say year 9999 (no job can be told to be its) or year 1 (no job had the id then)."""
    fake = FakeSlurm(monkeypatch, sacct=REUSED)
    snap = slurm.job_snapshot(["500"], recorded={"500": datetime.max.replace(tzinfo=UTC)})
    assert snap.rows == {} and snap.usage == {} and "later than now" in snap.foreign["500"]
    assert fake.asked["sacct"] == [] and fake.asked["squeue"] == []  # nothing to ask about
    snap = slurm.job_snapshot(["500"], recorded={"500": datetime.min.replace(tzinfo=UTC)})
    assert snap.rows == {} and "not this run's" in snap.foreign["500"]


def squeue_line(job: str, state: str, reason: str, submit: str) -> str:
    return f"{job}|{state}|0:00||{reason}|N/A|{job}|{submit}"


def test_a_live_job_queued_after_the_record_is_not_the_trials_unless_a_requeue_of_it(monkeypatch: pytest.MonkeyPatch):
    recorded = at("2026-06-01T10:00:02")
    # Another job, held, queued months after the record; accounting has only it.
    fake = FakeSlurm(monkeypatch, squeue=squeue_line("61", "PENDING", "JobHeldUser", "2026-09-01T08:00:00"),
                     sacct="\n".join([HEADER, run_line("61", "PENDING", "2026-09-01T08:00:00", "Unknown", 0)]))
    snap = slurm.job_snapshot(["61"], recorded={"61": recorded})
    assert snap.rows == {} and "61" in snap.foreign
    assert fake.asked["sacct"] == [["61"]]  # pending, but maybe not the trial's: accounting decides
    # The trial's own job, requeued at 10:30 (its first run ended then, the second queued then).
    fake = FakeSlurm(monkeypatch, squeue=squeue_line("62", "PENDING", "BeginTime", "2026-06-01T10:30:00"),
                     sacct="\n".join([HEADER, run_line("62", "REQUEUED", "2026-06-01T10:00:00", "2026-06-01T10:30:00", 30)]))
    snap = slurm.job_snapshot(["62"], recorded={"62": recorded})
    assert snap.rows["62"]["reason"] == "BeginTime" and snap.usage["62"].core_s == 30.0 and snap.foreign == {}
    # Another job running now: neither its row nor its usage so far (sstat is not even asked).
    fake = FakeSlurm(monkeypatch, squeue="64|RUNNING|0:09|vm|None|2026-09-01T08:00:00|64|2026-09-01T08:00:00",
                     sacct="\n".join([HEADER, run_line("64", "RUNNING", "2026-09-01T08:00:00", "Unknown", 9)]))
    snap = slurm.job_snapshot(["64"], recorded={"64": recorded})
    assert snap.rows == {} and snap.usage == {} and "64" in snap.foreign and fake.asked["sstat"] == []
    # Without accounting, a job queued after the record may be its requeue: not shown, and the note says so.
    fake = FakeSlurm(monkeypatch, squeue=squeue_line("62", "PENDING", "BeginTime", "2026-06-01T10:30:00"))
    monkeypatch.setattr(slurm, "query_sacct", lambda ids: None)
    snap = slurm.job_snapshot(["62"], recorded={"62": recorded})
    assert snap.rows == {} and "accounting (sacct), which would show it a requeue, is unavailable" in snap.foreign["62"]
    # Pending since before the record: the trial's, and squeue's row is all there is (no sacct call).
    fake = FakeSlurm(monkeypatch, squeue=squeue_line("63", "PENDING", "Priority", "2026-06-01T10:00:00"))
    snap = slurm.job_snapshot(["63"], recorded={"63": recorded})
    assert snap.rows["63"]["reason"] == "Priority" and fake.asked["sacct"] == []


def test_squeue_times_asked_in_utc_are_shown_in_local_time(monkeypatch: pytest.MonkeyPatch):
    """squeue runs with TZ=UTC (its submit time is then unambiguous); the expected start a user sees
    stays in local time, as squeue itself shows it."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        rows = slurm.parse_squeue("5|PENDING|0:00||Priority|2026-12-07T14:20:00|5|2026-12-07T08:00:00\n"
                                  "6|PENDING|0:00||Priority|N/A|6|2026-12-07T08:00:00\n"
                                  "7|PENDING|0:00||Priority|2026-12-07T14:20:00|7\n")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert (rows["5"]["start"], rows["5"]["submit"]) == ("2026-12-07T09:20:00", "2026-12-07T08:00:00")
    assert rows["6"]["start"] == ""
    assert rows["7"]["start"] == "2026-12-07T14:20:00"  # a recorded 7-column line: local already


@pytest.mark.parametrize("submitted", ["yesterday", "2026-06-01T10:00:00", 1765094400, "2026-13-01T00:00:00+00:00"])
def test_a_submitted_time_that_names_no_instant_is_refused(tmp_path: Path, submitted):
    run_dir = make_trial(tmp_path / "sweep", 0, ["train.seed=0"], cluster="slurm", job_id="41")
    data = json.loads((run_dir / "job.json").read_text())
    (run_dir / "job.json").write_text(json.dumps({**data, "submitted": submitted}))
    with pytest.raises(rundir.RunFileError, match="submitted.*ISO 8601 time with its UTC offset"):
        rundir.read_job(run_dir)
    trial = trials_mod.read_trial(run_dir)  # status: the record is ignored, with the reason
    assert trial.job_id == "-" and any("submitted" in n and "ignored" in n for n in trial.notes)


# --- on the real cluster ---------------------------------------------------------------------------


@pytest.mark.slurm
def test_an_unrelated_job_with_the_recorded_id_is_not_shown_as_the_trials(tmp_path: Path) -> None:
    job = sh("sbatch", "--parsable", "-J", "hostile3-unrelated", "-t", "1", "-o", str(tmp_path / "slurm-%j.out"),
             "--wrap", "true").strip().split(";")[0]
    try:
        until(lambda: "COMPLETED" in sh("sacct", "-X", "-n", "-P", "-j", job, "-o", "State"), f"job {job} to end",
              timeout_s=60, every_s=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    sweep = tmp_path / "sweep"
    # The trial's own job was "mnist-hpc", submitted 2026-01-01; it ran and ended.
    run_dir = make_trial(sweep, 0, ["train.seed=0"], cluster="slurm", job_id=job, ended=True,
                         metrics=fake_metrics(0.97, 0.98, 0.98, wall=30.0), submitted="2026-01-01T10:00:00+00:00")
    assert json.loads((run_dir / "job.json").read_text())["submitted"].startswith("2026-01-01")  # precondition
    [row] = status_rows(sweep)
    assert row["job_id"] == job  # precondition: the trial names the unrelated job's id
    assert row["cost"] is None, f"the cost of unrelated job {job} ({row['cost']}) is shown as trial 0's"
    assert row["state"] == "COMPLETED" and row["source"] == "slurm (files)"  # from its own files
    assert any(f"Slurm's job {job}" in n and "not this run's" in n for n in row["notes"]), row["notes"]


@pytest.mark.slurm
def test_a_held_job_queued_after_the_record_is_not_the_trials_reason(tmp_path: Path) -> None:
    job = sh("sbatch", "--parsable", "--hold", "-J", "hostile3-other", "-o", "/dev/null", "--wrap", "true").strip().split(";")[0]
    try:
        hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds")
        make_trial(tmp_path / "old", 0, ["train.seed=0"], cluster="slurm", job_id=job, submitted=hour_ago)
        make_trial(tmp_path / "new", 0, ["train.seed=0"], cluster="slurm", job_id=job)  # recorded now: its own
        [old] = status_rows(tmp_path / "old")
        [new] = status_rows(tmp_path / "new")
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert (new["state"], new["reason"]) == ("PENDING", "JobHeldUser")  # precondition: Slurm shows it held
    assert old["reason"] is None and old["todo"] is None and old["expected_start"] is None and old["cost"] is None
    assert old["state"] != "PENDING" and any("not this run's" in n for n in old["notes"]), old


@pytest.mark.slurm
def test_a_requeued_job_stays_the_trials_on_the_real_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no clock skew allowed, the run a requeue queued (after the record) is joined only by the
    requeue chain: this pins what Slurm records (the next run's Submit is the previous run's End)."""
    job = sh("sbatch", "--parsable", "--requeue", "-J", "hostile3-requeue", "-o", "/dev/null", "--wrap", "sleep 120").strip()
    try:
        recorded = datetime.now(UTC).replace(microsecond=0)  # the launcher's record, after sbatch
        until(lambda: sh("squeue", "-h", "-j", job, "-o", "%T").strip() == "RUNNING", f"job {job} to run", timeout_s=30)
        until(lambda: datetime.now(UTC) >= recorded + timedelta(seconds=2), "the clock to pass the record", timeout_s=5)
        sh("scontrol", "requeue", job)
        monkeypatch.setattr(slurm, "CLOCK_SKEW", timedelta(0))
        snap = until(lambda: (s := slurm.job_snapshot([job], recorded={job: recorded})).rows.get(job, {}).get("state")
                     == "PENDING" and s, f"job {job} to be pending again, as the trial's", timeout_s=30, every_s=0.5)
        acct = until(lambda: (a := slurm.query_sacct([job])) is not None and len(a.runs.get(job, [])) == 2 and a,
                     f"accounting to list job {job}'s two runs", timeout_s=30, every_s=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert snap.foreign == {} and snap.rows[job]["reason"], snap  # squeue's row (why it waits) is the trial's
    first, second = acct.runs[job]
    assert first.submit <= recorded < second.submit and second.submit == first.end, acct.runs[job]
    assert states(slurm.own_runs(acct.runs[job], recorded)) == ["REQUEUED", "PENDING"]

"""Hostile pass 4 (hostile4): today's changes attacked as a hostile user would (issue 21's standard).

Each finding is a test that failed on the code it was found on (b7a9558); all eight are fixed and
pass now. The probes that held are listed in tests/HOSTILE.md ("Hostile pass 4"), with the earlier
tests that pin them.
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


# --- H2: two records of one id, written when it named two different jobs -------------------------

SACCT_HEADER = "JobID|State|Elapsed|NodeList|ExitCode|ElapsedRaw|AllocCPUS|AllocTRES|ReqMem|MaxRSS|CPUTimeRAW|TotalCPU|Submit|End"


def sacct_run(job: str, state: str, submit: str, end: str, seconds: int) -> str:
    """One run in ``sacct -D -P`` output (TZ=UTC): one CPU for ``seconds``."""
    return (f"{job}|{state}|00:00:{seconds:02d}|vm|0:0|{seconds}|1|billing=1,cpu=1,mem=1G,node=1|1G||{seconds}|"
            f"00:00:{seconds // 2:02d}|{submit}|{end}")


def fake_slurm(monkeypatch: pytest.MonkeyPatch, sacct: str, squeue: str = "") -> None:
    from mnist_hpc import slurm

    monkeypatch.setattr(slurm, "query_squeue", lambda ids: slurm.parse_squeue(squeue))
    monkeypatch.setattr(slurm, "query_sacct", lambda ids: slurm.parse_sacct(sacct))
    monkeypatch.setattr(slurm, "query_sstat", lambda ids: {})


def test_two_records_of_one_id_from_different_jobs_each_get_their_own_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mnist_hpc.login import trials as trials_mod

    # Job 500 ran in 2025 (50 s, then the cluster was reinstalled with its accounting kept); today's
    # job 500 runs now. A project directory holds a sweep of each.
    fake_slurm(monkeypatch, "\n".join([
        SACCT_HEADER,
        sacct_run("500", "COMPLETED", "2025-03-01T09:00:00", "2025-03-01T09:00:50", 50),
        sacct_run("500", "RUNNING", "2026-06-01T10:00:00", "Unknown", 4),
    ]) + "\n")
    old = make_trial(tmp_path / "project" / "old", 0, ["train.seed=0"], cluster="slurm", job_id="500",
                     submitted="2025-03-01T09:00:01+00:00")
    new = make_trial(tmp_path / "project" / "new", 0, ["train.seed=1"], cluster="slurm", job_id="500",
                     submitted="2026-06-01T10:00:01+00:00")
    filled, _ = trials_mod.fill_states([trials_mod.read_trial(old), trials_mod.read_trial(new)])
    by_dir = {t.run_dir: t for t in filled}
    assert by_dir[old].usage is not None and by_dir[old].usage.core_s == 50.0  # precondition: the old job's own
    shown = by_dir[new]
    assert shown.usage is None or shown.usage.core_s == 4.0, (
        f"today's trial is shown the 2025 job's cost ({shown.usage.core_s} core-seconds) and state")


# --- H3: a user's HYDRA_FULL_ERROR other than "1" ------------------------------------------------


@pytest.mark.parametrize("users", ["0", ""])
def test_a_users_own_hydra_full_error_is_passed_on_whatever_its_value(monkeypatch: pytest.MonkeyPatch, users: str) -> None:
    import os

    from mnist_hpc import hydra_adapter
    from mnist_hpc.contract import guard

    seen: list[object] = []

    def app() -> None:
        with guard.private_submission():  # where the launchers queue jobs
            seen.append(os.environ.get("HYDRA_FULL_ERROR"))

    monkeypatch.setenv("HYDRA_FULL_ERROR", users)
    hydra_adapter.run_app(app)
    assert (seen, os.environ.get("HYDRA_FULL_ERROR")) == ([users], users)


# --- H4: the report's cost text when there are no figures ----------------------------------------


@pytest.mark.parametrize("case", ["local launcher", "sacct unavailable"])
def test_the_cost_text_without_figures_says_why_truly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from mnist_hpc import slurm
    from mnist_hpc.login import trials as trials_mod
    from mnist_hpc.login.report.cost import cost_section
    from tests.helpers import fake_metrics

    if case == "sacct unavailable":
        monkeypatch.setattr(slurm, "query_sacct", lambda ids: None)
        monkeypatch.setattr(slurm, "query_squeue", lambda ids: None)
        monkeypatch.setattr(slurm, "squeue_available", lambda: False)
    cluster = "local" if case == "local launcher" else "slurm"
    run_dir = make_trial(tmp_path / "sweep", 0, ["train.seed=0"], cluster=cluster, job_id="4242", ended=True,
                         metrics=fake_metrics(0.97, 0.98, 0.98, wall=30.0))
    filled, _ = trials_mod.fill_states([trials_mod.read_trial(run_dir)])
    assert filled[0].state == "COMPLETED" and filled[0].usage is None  # precondition: it ran, no figures
    text = cost_section(filled)
    assert "accounting has no run" not in text and "none started" not in text, text


# --- H5: packing auto counts idle CPUs only, not the GPUs a task asks for -------------------------


def partition_gpus(partition: str) -> int:
    """GPUs of ``partition``'s nodes, as sinfo lists them (read by the test, not by the code under test)."""
    total = 0
    for line in sh("sinfo", "-N", "-h", "-p", partition, "-o", "%N|%G").split():
        gres = line.split("|")[1]
        total += sum(int(part.rsplit(":", 1)[1]) for part in gres.split(",") if part.startswith("gpu:"))
    return total


@pytest.mark.slurm
def test_packing_counts_only_the_tasks_the_gpus_let_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from mnist_hpc import slurm
    from mnist_hpc.login.launcher import packing
    from mnist_hpc.login.launcher.options import SlurmQueueConf

    gpus = partition_gpus("debug")
    assert gpus == 2, f"precondition: the local cluster's debug partition has one pretend GPU per node ({gpus})"
    # What sinfo says of the idle partition (2 nodes x 2 CPUs), whatever other helpers run now.
    monkeypatch.setattr(slurm, "idle_cpus", lambda partition=None: 4)
    conf = SlurmQueueConf(gpus_per_node=1, cpus_per_task=1, partition="debug")
    assert packing.free_slots(conf, "slurm") <= gpus


# --- H6: a job requeued in held state ------------------------------------------------------------


def trial_of_running_job(tmp_path: Path, job: str) -> None:
    """A trial in ``tmp_path / "sweep"`` recorded as ``job``'s (as the launcher records it), once the job runs."""
    from tests.helpers import until

    make_trial(tmp_path / "sweep", 0, ["train.seed=0"], cluster="slurm", job_id=job)
    until(lambda: sh("squeue", "-h", "-j", job, "-o", "%T").strip() == "RUNNING", f"job {job} to run", timeout_s=30)


@pytest.mark.slurm
def test_a_job_requeued_in_held_state_is_shown_held(tmp_path: Path) -> None:
    from tests.helpers import until

    job = sh("sbatch", "--parsable", "--requeue", "-J", "hostile4-requeuehold", "-o", "/dev/null", "--wrap", "sleep 60").strip()
    try:
        trial_of_running_job(tmp_path, job)
        sh("scontrol", "requeuehold", job)
        row = until(lambda: (r := status_rows(tmp_path / "sweep")[0])["state"] == "PENDING" and r,
                    f"job {job} to be pending again", timeout_s=30, every_s=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert row["job_id"] == job and not any("not this run's" in n for n in row["notes"]), row
    assert "scontrol release" in (row["todo"] or "") and row["expected_start"] is None, row


# --- H7: a requeued job waiting to start again: its earlier run's cost ---------------------------


@pytest.mark.slurm
def test_a_requeued_job_waiting_again_shows_what_its_first_run_used(tmp_path: Path) -> None:
    from tests.helpers import until

    job = sh("sbatch", "--parsable", "--requeue", "-J", "hostile4-requeue-cost", "-o", "/dev/null", "--wrap", "sleep 60").strip()
    try:
        trial_of_running_job(tmp_path, job)
        until(lambda: sh("squeue", "-h", "-j", job, "-o", "%M").strip() not in ("0:00", "0:01"), f"job {job} to run 2 s",
              timeout_s=30, every_s=0.2)
        sh("scontrol", "requeue", job)
        until(lambda: "REQUEUED" in sh("sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job),
              f"accounting to list job {job}'s first run", timeout_s=30, every_s=0.5)
        row = until(lambda: (r := status_rows(tmp_path / "sweep")[0])["state"] == "PENDING" and r,
                    f"job {job} to be pending again", timeout_s=30, every_s=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert row["job_id"] == job and row["notes"] == [], row  # precondition: the trial's own job
    assert row["cost"] is not None, f"job {job}'s first run is in accounting, but status shows no cost: {row}"


# --- H8: the user's SQUEUE_STATES -----------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["one job", "many jobs"])
def test_a_users_squeue_states_does_not_make_a_pending_job_dead(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    from mnist_hpc import slurm

    jobs = [sh("sbatch", "--parsable", "--hold", "-J", "hostile4-states", "-o", "/dev/null", "--wrap", "true").strip()
            for _ in range(1 if how == "one job" else 2)]
    try:
        assert all(slurm.jobs_alive(jobs).values())  # precondition: held jobs live
        monkeypatch.setenv("SQUEUE_STATES", "RUNNING")  # a user's profile: "my squeue shows running jobs"
        alive = slurm.jobs_alive(jobs)
        live_rows = slurm.query_squeue(jobs) or {}
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
    assert alive == {j: True for j in jobs}, f"held jobs called dead under SQUEUE_STATES=RUNNING: {alive}"
    assert sorted(live_rows) == sorted(jobs), live_rows


@pytest.mark.slurm
def test_a_users_squeue_states_does_not_let_a_trial_be_queued_twice(synthetic_cache, tmp_path: Path) -> None:
    from tests.helpers import job_records, squeue_ids, submit, subprocess_env, tiny_overrides

    args = ["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.trials_per_task=1",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "+hydra.launcher.additional_parameters.hold=true",
            *tiny_overrides(synthetic_cache, tmp_path / "out")]
    try:
        first = submit(args, tmp_path)
        assert first.returncode == 0, first.stderr[-2000:]
        [held] = [r["job_id"] for r in job_records(tmp_path / "sweep")]
        again = submit(args, tmp_path, env={**subprocess_env(), "SQUEUE_STATES": "RUNNING"})
        queued = squeue_ids(tmp_path)
        records = [r["job_id"] for r in job_records(tmp_path / "sweep")]
    finally:
        subprocess.run(["scancel", *squeue_ids(tmp_path)], capture_output=True, timeout=30)
    assert (again.returncode, queued, records) == (1, {held}, [held]), (again.stderr[-1500:], queued, records)

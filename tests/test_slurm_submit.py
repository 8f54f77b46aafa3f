"""Queueing a sweep on the real cluster (issue 15): one squeue call for the liveness of every
recorded job, and a submission killed between sbatch and its job.json files still leaves every
queued trial findable (the jobs record themselves)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_hpc import rundir
from tests.helpers import (
    job_records,
    slurm_launcher_args,
    squeue_ids,
    status_rows,
    submit,
    tiny_overrides,
    wait_for_states,
)

pytestmark = pytest.mark.slurm


def held_array(tmp_path: Path, tasks: int) -> str:
    out = subprocess.run(["sbatch", "--parsable", "--hold", f"--array=0-{tasks - 1}", "-J", "mnist-hpc-test-held",
                          "-o", "/dev/null", "--wrap", "true"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def ended_job(tmp_path: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", "-J", "mnist-hpc-test-ended", "-o", "/dev/null", "--wrap", "true"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    job_id = out.stdout.strip().split(";")[0]
    wait_for_states([job_id])
    return job_id


def test_the_preflight_asks_squeue_once_for_every_recorded_job(tmp_path, monkeypatch):
    """Six trials whose job.json or lease name held array tasks, an ended job, an unknown job: the
    live ones are named, the others not, from one squeue call."""
    from mnist_hpc import slurm
    from mnist_hpc.login.launcher.preflight import recorded_owners

    array, gone = held_array(tmp_path, 3), ended_job(tmp_path)
    try:
        named = {0: f"{array}_0", 1: f"{array}_2", 2: gone, 3: "999999", 4: None, 5: None}
        jobs = []
        for num, job_id in named.items():
            run_dir = tmp_path / "sweep" / str(num)
            if job_id is not None:
                rundir.write_job(run_dir, rundir.JobRecord(cluster="slurm", job_id=job_id, run_dir=str(run_dir), trial=num))
            jobs.append(type("Planned", (), {"num": num, "run_dir": run_dir})())
        # Trial 4's lease names the array's pending tasks by the array's own id; trial 5's an ended job.
        rundir.write_lease(tmp_path / "sweep" / "4", {"host": "elsewhere", "pid": 1, "slurm_job_id": array})
        rundir.write_lease(tmp_path / "sweep" / "5", {"host": "elsewhere", "pid": 1, "slurm_job_id": gone})
        calls: list[list[str]] = []
        real_run = subprocess.run

        def counting_run(cmd, *args, **kwargs):
            calls.append(list(cmd))
            return real_run(cmd, *args, **kwargs)

        monkeypatch.setattr(slurm.subprocess, "run", counting_run)
        owners = recorded_owners(jobs)
        assert [c[0] for c in calls] == ["squeue"]
        assert sorted(owners) == [0, 1, 4]
        assert f"its earlier job {array}_0 is still queued or running" in owners[0]
        assert f"Slurm job {array}" in owners[4] and "still alive" in owners[4]
    finally:
        subprocess.run(["scancel", array], timeout=30)


KILL_BEFORE_JOB_JSON = """
import os, sys
from mnist_hpc import rundir
rundir.write_jobs = lambda records: os._exit(9)  # the launcher dies after sbatch, before any job.json
from mnist_hpc.cli import train_main
train_main()
"""

NO_SPACE_FOR_JOB_JSON = """
import errno, os
from mnist_hpc import rundir
def full(records):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), records[0].run_dir)
rundir.write_jobs = full
from mnist_hpc.cli import train_main
train_main()
"""

KILL_BEFORE_SBATCH = """
import os
from submitit.slurm.slurm import SlurmExecutor
SlurmExecutor._submit_command = lambda self, command: os._exit(9)  # the launcher dies before sbatch
from mnist_hpc.cli import train_main
train_main()
"""


def test_a_launcher_killed_after_queueing_leaves_jobs_that_record_themselves(synthetic_cache, tmp_path):
    """Killed between sbatch and writing job.json: the held jobs are queued and no job.json names
    them (trial 0 still has the record of its earlier, ended job). Released, each job writes its own
    job.json before it trains, and status shows both trials COMPLETED under their real job ids."""
    sweep = tmp_path / "sweep"
    earlier = ended_job(tmp_path)
    rundir.write_job(sweep / "0", rundir.JobRecord(cluster="slurm", job_id=earlier, run_dir=str(sweep / "0"), trial=0))
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "train.seed=1,2", "hydra.launcher.trials_per_task=1",
                               "+hydra.launcher.additional_parameters.hold=true")
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_JOB_JSON, *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 9, proc.stderr[-3000:]
    queued = squeue_ids(workdir=tmp_path)
    assert len(queued) == 2
    array = next(iter(queued)).partition("_")[0]
    try:
        assert [r["job_id"] for r in job_records(sweep)] == [earlier]
        assert not (sweep / "1" / rundir.JOB_FILE).exists()
        subprocess.run(["scontrol", "release", array], check=True, timeout=30)
        states = wait_for_states(sorted(queued))
    finally:
        subprocess.run(["scancel", array], timeout=30)
    assert set(states.values()) == {"COMPLETED"}, states
    records = job_records(sweep)
    assert [(r["trial"], r["job_id"], r["array_job_id"]) for r in records] == [(0, f"{array}_0", array), (1, f"{array}_1", array)]
    assert all(Path(r["stdout"]).is_file() and r["overrides"][-1].startswith("train.seed=") for r in records)
    rows = status_rows(sweep)
    assert [(r["trial"], r["job_id"], r["state"]) for r in rows] == [(0, f"{array}_0", "COMPLETED"), (1, f"{array}_1", "COMPLETED")]


def test_a_launcher_killed_before_sbatch_queues_nothing_and_records_nothing(synthetic_cache, tmp_path):
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "train.seed=1,2", "hydra.launcher.trials_per_task=1",
                               "+hydra.launcher.additional_parameters.hold=true")
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_SBATCH, *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert squeue_ids(workdir=tmp_path) == set() and not job_records(sweep)
    # What it left in .submitit (its launch file, unsent pickles) does not stand in the way.
    again = submit(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    records = job_records(sweep)
    try:
        assert len(records) == 2 and squeue_ids(workdir=tmp_path) == {r["job_id"] for r in records}
    finally:
        subprocess.run(["scancel", records[0]["array_job_id"]], timeout=30)


def test_a_job_replaces_only_a_record_of_an_ended_job(synthetic_cache, tmp_path, monkeypatch):
    """In a Slurm job's environment: a job.json naming a live job is left alone; one naming an ended
    job, or a damaged one, is replaced by this job's record."""
    from mnist_hpc.contract.jobconfig import JobSpec
    from mnist_hpc.compute.job import TrainJob
    from mnist_hpc.contract.tasks import LaunchContext, TrainTrial

    live = held_array(tmp_path, 1)
    gone = ended_job(tmp_path)
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70",
                        "SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0", "SUBMITIT_FOLDER": str(tmp_path / "sub" / "%j")}.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "3"
    job = TrainJob(TrainTrial(LaunchContext(tmp_path / "launch.pkl"), JobSpec(0, ["train.seed=3"], ["train.seed=3"], 3), run_dir, 1))
    try:
        rundir.write_job(run_dir, rundir.JobRecord(cluster="slurm", job_id=f"{live}_0", run_dir=str(run_dir), trial=3))
        job.ensure_recorded()
        assert rundir.read_job(run_dir).job_id == f"{live}_0"
    finally:
        subprocess.run(["scancel", live], timeout=30)
    for before in (json.dumps({"job_id": gone, "cluster": "slurm"}), "{damaged"):
        (run_dir / rundir.JOB_FILE).write_text(before)
        job.ensure_recorded()
        record = rundir.read_job(run_dir)
        assert (record.job_id, record.array_job_id, record.array_task_id, record.trial, record.packed_slot) == ("70_3", "70", 3, 3, 1)
        assert record.stdout == str(tmp_path / "sub" / "70_3" / "70_3_0_log.out") and record.overrides == ["train.seed=3"]


def test_job_json_that_cannot_be_written_is_one_message_naming_the_queued_jobs(synthetic_cache, tmp_path):
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "train.seed=1,2", "hydra.launcher.trials_per_task=1",
                               "+hydra.launcher.additional_parameters.hold=true")
    proc = subprocess.run([sys.executable, "-c", NO_SPACE_FOR_JOB_JSON, *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    queued = squeue_ids(workdir=tmp_path)
    try:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        [array] = {j.partition("_")[0] for j in queued}
        assert len(queued) == 2 and f"queued 2 task(s) ({array})" in proc.stderr
        assert "No space left on device" in proc.stderr and "each job writes its own when it starts" in proc.stderr
        assert not job_records(sweep)
    finally:
        for array in {j.partition("_")[0] for j in queued}:
            subprocess.run(["scancel", array], timeout=30)

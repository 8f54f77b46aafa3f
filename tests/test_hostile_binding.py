"""Hostile tester's reproductions (issue 21): sweeps, their directories and what the launcher and status say.

Each test states an invariant of issue 21 and reproduces a way a hostile tester broke it (each failed
before its fix). Local launcher, small synthetic data; nothing here needs Slurm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from mnist_hpc import rundir
from tests.helpers import (
    REPORT,
    STATUS,
    TRAIN,
    finished_metrics,
    precondition,
    run_json,
    run_to_files,
    tiny_overrides,
    until,
)

LOCAL = ["-m", "hydra/launcher=local", "train.deterministic=true"]


def sweep(cache: Path, tmp_path: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return [*TRAIN, *LOCAL, *tiny_overrides(cache, tmp_path / "out"), f"hydra.sweep.dir={sweep_dir}", *extra]


@pytest.mark.slow
def test_a_later_launch_cannot_put_a_trial_inside_an_earlier_trials_directory(synthetic_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    wait = ["hydra.launcher.wait=true"]
    first = run_to_files(sweep(synthetic_cache, tmp_path, sweep_dir, *wait, "train.seed=0"), tmp_path)
    precondition(first.returncode == 0, first.stderr[-2000:])
    # Another launch into the same sweep, its one trial placed at <sweep>/0/.hydra.
    nested = run_to_files(sweep(synthetic_cache, tmp_path, sweep_dir, *wait, "hydra.sweep.subdir=0/.hydra", "train.seed=7"), tmp_path)
    inside = sweep_dir / "0" / ".hydra"
    if nested.returncode == 0:  # it was accepted: the earlier trial, continued, must not destroy it
        precondition((inside / "metrics.json").is_file(), f"the nested trial did not finish: {nested.stderr[-2000:]}")
        again = run_to_files(sweep(synthetic_cache, tmp_path, sweep_dir, *wait, "train.seed=0", "train.epochs=2"), tmp_path)
        precondition(again.returncode == 0, again.stderr[-2000:])
        assert (inside / "metrics.json").is_file(), f"trial 0's run deleted the trial in {inside}: {sorted(os.listdir(inside))}"
    else:
        assert "nothing was queued" in nested.stderr and f"inside the run directory {sweep_dir / '0'}" in nested.stderr, \
            nested.stderr[-2000:]


@pytest.mark.slow
def test_status_and_report_show_a_sweep_whose_subdir_is_not_the_trial_number(synthetic_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    launch = run_to_files(sweep(synthetic_cache, tmp_path, sweep_dir, "hydra.launcher.wait=true",
                       "hydra.sweep.subdir=seed${train.seed}", "train.seed=0,1"), tmp_path)
    precondition(launch.returncode == 0, launch.stderr[-2000:])
    assert f"check on them with: mnist-hpc-status {sweep_dir}" in launch.stdout
    precondition(sorted(p.name for p in sweep_dir.iterdir() if (p / "job.json").is_file()) == ["seed0", "seed1"], "no trials")
    status = run_to_files([*STATUS, "--json", str(sweep_dir)], tmp_path)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert sorted((r["trial"], r["state"]) for r in rows) == [(0, "COMPLETED"), (1, "COMPLETED")]
    report = run_to_files([*REPORT, str(sweep_dir)], tmp_path)
    assert report.returncode == 0, report.stderr


@pytest.mark.slow
def test_a_trial_trains_in_the_directory_the_preflight_checked(synthetic_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    launch = run_to_files(sweep(synthetic_cache, tmp_path, sweep_dir, "hydra.launcher.wait=true", "hydra.launcher.trials_per_task=1",
                       "hydra.sweep.subdir=t${now:%H%M%S%f}_${hydra.job.num}"), tmp_path)
    planned = [p for p in sweep_dir.iterdir() if (p / "job.json").is_file()]
    trained = [p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file()]
    assert len(planned) == 1 and trained == planned, (planned, trained)
    assert launch.returncode == 0, launch.stderr[-2000:]


def waiting_for_a_lock(pid: int) -> bool:
    """Whether the process sleeps in the kernel waiting for a file lock (its wchan names one)."""
    try:
        return "lock" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_two_launches_racing_into_one_sweep_take_turns_and_report_the_truth(synthetic_cache, tmp_path):
    """Two launches into one sweep at once: the second waits for the first's checks, queueing and
    records (the sweep's launch lock), then sees its job and is refused, naming it; the trial that
    ran is shown COMPLETED with its own record."""
    sweep_dir = tmp_path / "sweep"
    # Launch B (seed 1) is stopped inside the launch lock (it makes the private .submitit folder there).
    out_b, err_b = tmp_path / "b.out", tmp_path / "b.err"
    with open(out_b, "w") as fo, open(err_b, "w") as fe:
        b = subprocess.Popen(sweep(synthetic_cache, tmp_path, sweep_dir, "hydra.launcher.wait=true", "train.seed=1",
                                   "hydra.launcher.trials_per_task=1"), stdout=fo, stderr=fe)
    a = None
    try:
        until(lambda: (sweep_dir / ".submitit").exists(), "launch B inside the launch lock", every_s=0.001)
        os.kill(b.pid, signal.SIGSTOP)
        precondition(not any(p.name.isdigit() for p in (sweep_dir / ".submitit").iterdir()), "launch B queued before it was stopped")
        # Launch A (seed 0) waits for the lock, and writes nothing meanwhile.
        out_a, err_a = tmp_path / "a.out", tmp_path / "a.err"
        with open(out_a, "w") as fo, open(err_a, "w") as fe:
            a = subprocess.Popen(sweep(synthetic_cache, tmp_path, sweep_dir, "hydra.launcher.wait=true", "train.seed=0",
                                       "train.epochs=3", "hydra.launcher.trials_per_task=1"), stdout=fo, stderr=fe)
        until(lambda: waiting_for_a_lock(a.pid), "launch A to wait for the launch lock")
        assert not (sweep_dir / "0" / rundir.JOB_FILE).exists()
    finally:
        os.kill(b.pid, signal.SIGCONT)
    b_code = b.wait(timeout=600)
    a_code = a.wait(timeout=600) if a is not None else None
    # B went first: its trial trained and completed; A was refused before queueing, naming B's job.
    assert b_code == 0, err_b.read_text()[-2000:]
    record = run_json(sweep_dir / "0", rundir.JOB_FILE)
    assert a_code == 1 and "nothing was queued" in err_a.read_text()
    assert f"its earlier job {record['job_id']}" in err_a.read_text() or "holds a run of another config" in err_a.read_text()
    identity = rundir.read_identity(sweep_dir / "0")
    metrics = finished_metrics(sweep_dir / "0")
    assert identity["config"]["train.seed"] == 1 and "train.seed=1" in record["overrides"]
    assert record["fingerprint"] == identity["fingerprint"] == metrics["fingerprint"]
    status = run_to_files([*STATUS, "--json", str(sweep_dir)], tmp_path)
    [row] = json.loads(status.stdout)
    assert row["state"] == "COMPLETED" and row["job_id"] == record["job_id"], row


@pytest.mark.parametrize("entry, kind", [(rundir.CHECKPOINT_DIR, "file"), (rundir.MODEL_FILE, "dir"), (rundir.LOG_FILE, "dir")])
def test_a_run_directory_entry_of_the_wrong_type_is_one_line(synthetic_cache, tmp_path, entry, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if kind == "dir":
        (run_dir / entry).mkdir()
    else:
        (run_dir / entry).write_text("x")
    proc = run_to_files([*TRAIN, *tiny_overrides(synthetic_cache, tmp_path / "out"), "train.deterministic=true",
                f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(run_dir / entry) in proc.stderr


def test_a_plain_sweep_into_a_search_directory_is_refused(synthetic_cache, tmp_path):
    from mnist_hpc import search as sd

    search_dir = tmp_path / "search"
    search_dir.mkdir()
    sd.write_spec(search_dir, sd.SearchSpec(study_name="mnist-hpc", direction="maximize", n_trials=2,
                                            params={"train.seed": "choice(0,1)"}, identity={"train.epochs": 1}))
    precondition(sd.is_search_dir(search_dir), "no search directory")
    launch = run_to_files(sweep(synthetic_cache, tmp_path, search_dir, "hydra.launcher.wait=true",
                       "hydra.sweep.subdir=9${hydra.job.num}", "train.seed=5"), tmp_path)
    assert launch.returncode != 0 and "nothing was queued" in launch.stderr, launch.stdout[-2000:]
    assert sd.trial_numbers(search_dir) == []

"""mnist-hpc-status without accounting: it says so and falls back to squeue and the run files.

The Slurm clients are stand-ins on PATH here (a narrow test of our fallback logic); the real
cluster is exercised in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mnist_hpc import rundir


def make_run(sweep: Path, trial: int, job_id: str, finished: bool) -> Path:
    """A trial directory as the launcher and training leave it, written by their own writers."""
    run_dir = sweep / str(trial)
    rundir.write_job(run_dir, rundir.JobRecord(
        cluster="slurm", job_id=job_id, run_dir=str(run_dir), trial=trial, overrides=[f"train.seed={trial}"],
        stdout=f"/logs/{job_id}.out", stderr=f"/logs/{job_id}.err", submitit_folder=str(sweep / ".submitit"),
    ))
    history = [{"epoch": e, "accuracy": 0.9, "loss": 0.3, "seconds": 1.0} for e in range(1, 6 if finished else 3)]
    rundir.write_progress(run_dir, len(history), 5, history)
    if finished:
        rundir.write_metrics(run_dir, {"test_accuracy": 0.97, "test_loss": 0.1, "epochs_completed": 5, "history": history})
    return run_dir


def run_status(target: Path, path_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(path_dir)}
    return subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", "--json", str(target)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_without_sacct_falls_back_to_squeue_and_files(tmp_path: Path):
    sweep = tmp_path / "sweep"
    make_run(sweep, 0, "77_0", finished=True)
    make_run(sweep, 1, "77_1", finished=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho '77_1|RUNNING|1:02|node7'\n")
    squeue.chmod(0o755)

    proc = run_status(sweep, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "sacct is unavailable" in proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "COMPLETED"), (1, "RUNNING")]
    assert rows[1]["node"] == "node7" and rows[1]["last_epoch"] == 2 and rows[1]["epochs"] == 5
    assert rows[1]["log"] == "/logs/77_1.out"


def test_without_any_slurm_client_states_come_from_files(tmp_path: Path):
    sweep = tmp_path / "sweep"
    make_run(sweep, 0, "78_0", finished=True)
    make_run(sweep, 1, "78_1", finished=False)
    proc = run_status(sweep, tmp_path / "empty-bin")
    assert proc.returncode == 0
    assert "squeue is unavailable too" in proc.stderr
    assert [r["state"] for r in json.loads(proc.stdout)] == ["COMPLETED", "UNKNOWN"]


def test_a_directory_without_runs_is_an_error(tmp_path: Path):
    proc = run_status(tmp_path, tmp_path)
    assert proc.returncode == 1 and "holds no submitted run" in proc.stderr

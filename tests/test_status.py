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


def make_run(sweep: Path, trial: int, job_id: str, finished: bool) -> Path:
    run_dir = sweep / str(trial)
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text(json.dumps({
        "cluster": "slurm", "job_id": job_id, "trial": trial, "overrides": [f"train.seed={trial}"],
        "stdout": f"/logs/{job_id}.out", "stderr": f"/logs/{job_id}.err", "submitit_folder": str(sweep / ".submitit"),
    }))
    if finished:
        (run_dir / "metrics.json").write_text(json.dumps({"epochs_completed": 5}))
    else:
        (run_dir / "train.log").write_text("x epoch 1/5 loss=1\nx epoch 2/5 loss=0.5\n")
    return run_dir


def run_status(target: Path, path_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(path_dir)}
    return subprocess.run([sys.executable, "-m", "mnist_hpc.status", "--json", str(target)],
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

"""Submission to the real local Slurm cluster: completed, failed and refused jobs, and plain sbatch."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mnist_hpc import rundir
from tests.helpers import (
    finished_metrics,
    run_json,
    REPO,
    job_records,
    slurm_launcher_args,
    squeue_ids,
    status_rows,
    submit,
    subprocess_env,
    tiny_overrides,
    wait_for_states,
)

pytestmark = pytest.mark.slurm


def test_job_completes_with_outputs_and_status_agrees(synthetic_cache: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = submit(slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    assert record["cluster"] == "slurm" and f"job {record['job_id']}" in proc.stdout
    states = wait_for_states([record["job_id"]])
    assert states[record["job_id"]] == "COMPLETED"

    run_dir = sweep / "0"
    metrics = finished_metrics(run_dir)
    assert metrics["epochs_completed"] == 1 and metrics["test_accuracy"] > 0.5
    # The job's threads follow the allocation (cpus_per_task=1).
    assert metrics["threads"] == {"intra_op_threads": 1, "inter_op_threads": 1}
    prov = run_json(run_dir, rundir.PROVENANCE_FILE)
    assert prov["slurm_job_id"] == record["job_id"]
    for name in (rundir.HISTORY_FILE, rundir.MODEL_FILE, rundir.CONFIG_FILE, rundir.LOG_FILE):
        assert (run_dir / name).is_file()
    assert "epoch 1/1" in Path(record["stdout"]).read_text()

    [row] = status_rows(sweep)
    assert row["state"] == "COMPLETED" and row["last_epoch"] == 1 and row["node"]
    assert row["log"] == record["stdout"]
    [by_id] = status_rows(record["job_id"])
    assert by_id["state"] == "COMPLETED"


def test_job_whose_cache_vanishes_ends_failed(synthetic_cache: Path, tmp_path: Path):
    """Held at submission, cache removed, released: the job must end FAILED, never COMPLETED."""
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "+hydra.launcher.additional_parameters.hold=true")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    # The queue lookup that test_submission_without_cache_queues_nothing relies on sees this job.
    assert squeue_ids(workdir=tmp_path) == {record["job_id"]}
    (synthetic_cache / "mnist.npz").unlink()
    subprocess.run(["scontrol", "release", record["job_id"]], check=True, timeout=30)

    states = wait_for_states([record["job_id"]])
    assert states[record["job_id"]] == "FAILED"
    [row] = status_rows(sweep)
    assert row["state"] == "FAILED"
    log = Path(record["stderr"]).read_text()
    assert f"no cached MNIST at {synthetic_cache / 'mnist.npz'}" in log
    assert f"mnist-hpc-prefetch data.cache_dir={synthetic_cache}" in log
    assert not (sweep / "0" / rundir.METRICS_FILE).exists()


def test_job_whose_launch_context_is_gone_ends_failed(synthetic_cache: Path, tmp_path: Path):
    """The shared launch file deleted while the job waits: FAILED, with failure.json saying so."""
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "+hydra.launcher.additional_parameters.hold=true")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    [context] = (sweep / ".submitit").glob("launch-*.pkl")
    context.unlink()
    subprocess.run(["scontrol", "release", record["job_id"]], check=True, timeout=30)

    assert wait_for_states([record["job_id"]])[record["job_id"]] == "FAILED"
    assert f"launch context {context} is gone" in rundir.read_failure(sweep / "0")
    assert [row["state"] for row in status_rows(sweep)] == ["FAILED"]


def test_refused_submission_leaves_nothing_behind(synthetic_cache: Path, tmp_path: Path):
    """sbatch rejects the submission after the site preflight let it through (here: an sbatch that
    names a partition of its own, as a site's wrapper might): a clear error, no job records, no
    pickles left in .submitit. (A partition that does not exist is refused before, by the site
    preflight: tests/test_slurm_site.py.)"""
    sweep = tmp_path / "sweep"
    shims = tmp_path / "shims"
    shims.mkdir()
    real = shutil.which("sbatch")
    (shims / "sbatch").write_text(f'#!/bin/bash\nif [ "$1" = --test-only ]; then exec {real} "$@"; fi\n'
                                  f'exec {real} --partition=nosuch "$@"\n')
    (shims / "sbatch").chmod(0o700)
    env = {**subprocess_env(), "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "train.seed=1,2",
                               "hydra.launcher.trials_per_task=1")
    proc = submit(args, tmp_path, env=env)
    assert proc.returncode != 0
    assert "nothing was queued: slurm refused the 2 task(s)" in proc.stderr
    assert "invalid partition" in proc.stderr.lower() and "hydra.launcher" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not job_records(sweep)
    assert list((sweep / ".submitit").rglob("*")) == []
    assert squeue_ids(workdir=tmp_path) == set()


def test_submission_without_cache_queues_nothing(tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = submit(slurm_launcher_args(sweep, *tiny_overrides(tmp_path / "nocache", tmp_path)), tmp_path)
    assert proc.returncode != 0
    assert "nothing was queued" in proc.stderr and "mnist-hpc-prefetch" in proc.stderr
    # Jobs submitted from this test's directory (others may share the cluster): none.
    assert squeue_ids(workdir=tmp_path) == set()
    assert not (sweep / ".submitit").exists()
    assert not job_records(sweep)


def test_sbatch_templates_complete(synthetic_cache: Path, tmp_path: Path):
    """Both plain sbatch templates run the same entry point to COMPLETED."""
    common = [f"data.cache_dir={synthetic_cache}", "train.epochs=1", "train.batch_size=32"]
    single = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G", f"--output={tmp_path}/single-%j.out",
         str(REPO / "slurm" / "train.sbatch"), *common],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**_env(), "RUN_DIR": str(tmp_path / "single")},
    )
    assert single.returncode == 0, single.stderr
    array = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--mem=2G", f"--output={tmp_path}/sweep-%A_%a.out",
         str(REPO / "slurm" / "sweep.sbatch"), *common],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**_env(), "SWEEP_DIR": str(tmp_path / "sweep")},
    )
    assert array.returncode == 0, array.stderr
    single_id, array_id = single.stdout.strip().split(";")[0], array.stdout.strip().split(";")[0]
    states = wait_for_states([single_id, f"{array_id}_0", f"{array_id}_1"])
    assert set(states.values()) == {"COMPLETED"}, states
    assert finished_metrics(tmp_path / "single")["epochs_completed"] == 1
    for task, lr in ((0, 1e-3), (1, 3e-4)):
        run_dir = tmp_path / "sweep" / str(task)
        metrics = finished_metrics(run_dir)
        assert "val_accuracy" in metrics["history"][0]
        assert f"learning_rate: {lr}" in (run_dir / rundir.CONFIG_FILE).read_text()


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_a_job_runs_through_a_python_wrapper(synthetic_cache: Path, tmp_path: Path):
    """hydra.launcher.python (a container's python, say): the job runs through it and completes."""
    import sys

    marker = tmp_path / "wrapper-ran"
    wrapper = tmp_path / "python-in-container"
    wrapper.write_text(f"#!/bin/sh\necho \"$SLURM_JOB_ID $*\" >> {marker}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    sweep = tmp_path / "sweep"
    proc = submit(slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), f"hydra.launcher.python={wrapper}"),
                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    assert wait_for_states([record["job_id"]])[record["job_id"]] == "COMPLETED"
    assert finished_metrics(sweep / "0")["epochs_completed"] == 1
    [line] = marker.read_text().splitlines()
    assert line.startswith(record["job_id"]) and "-m submitit.core._submit" in line


def test_report_job_starts_after_the_last_trial_ends_even_when_one_failed(synthetic_cache: Path, tmp_path: Path):
    """hydra.launcher.report_after=true: a report job with --dependency=afterany on the sweep's array.

    The trials ask for 2 CPUs each; the one-CPU report job must not pass their srun --cpus-per-task on.
    """
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "hydra.launcher.report_after=true", "hydra.launcher.trials_per_task=1",
                               "data.validation_split=0.1,1e-9")
    args = ["hydra.launcher.cpus_per_task=2" if a == "hydra.launcher.cpus_per_task=1" else a for a in args]
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [report_id] = [line.split()[2].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("report job ")]
    records = job_records(sweep)
    states = wait_for_states([r["job_id"] for r in records] + [report_id], timeout_s=600)
    assert [states[r["job_id"]] for r in records] == ["COMPLETED", "FAILED"]
    assert states[report_id] == "COMPLETED"
    times = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j",
                            ",".join([records[0]["array_job_id"], report_id])], capture_output=True, text=True).stdout
    rows = {line.split("|")[0]: line.split("|")[1:] for line in times.splitlines()}
    last_trial_end = max(rows[r["job_id"]][1] for r in records)
    assert rows[report_id][0] >= last_trial_end  # ISO times compare as strings
    rows_csv = (sweep / "report" / "report.csv").read_text()
    assert "FAILED" in rows_csv and "COMPLETED" in rows_csv

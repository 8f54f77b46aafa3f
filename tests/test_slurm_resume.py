"""Timeouts, preemption and kills on the real cluster: requeue, resume in place, identical results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from tests.helpers import (
    checkpoint_positions,
    finished_metrics,
    resume_line,
    resumed_from,
    run_log,
    weights,
    job_records,
    restarts,
    sacct_history,
    slurm_launcher_args,
    submit,
    wait_for_file,
    wait_for_states,
)

pytestmark = pytest.mark.slurm

EPOCHS = 6


def overrides(cache: Path, tmp_path: Path) -> list[str]:
    return [
        f"data.cache_dir={cache}",
        f"paths.output_root={tmp_path / 'out'}",
        f"train.epochs={EPOCHS}",
        "train.batch_size=32",
        "train.deterministic=true",
        "model.dropout=0.2",
    ]


def reference_run(cache: Path, tmp_path: Path) -> subprocess.Popen:
    """The same config trained uninterrupted, on one thread like the Slurm jobs."""
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", "from mnist_hpc.cli import train_main; train_main()",
         *overrides(cache, tmp_path), f"hydra.run.dir={tmp_path / 'reference'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def final_state(run_dir: Path) -> tuple[dict, list[np.ndarray]]:
    return finished_metrics(run_dir), weights(run_dir)


def assert_matches_reference(run_dir: Path, reference_dir: Path) -> None:
    metrics, weights = final_state(run_dir)
    ref_metrics, ref_weights = final_state(reference_dir)
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert metrics["test_accuracy"] == ref_metrics["test_accuracy"]
    assert metrics["test_loss"] == ref_metrics["test_loss"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(metrics["history"]) == strip(ref_metrics["history"])
    for got, want in zip(weights, ref_weights):
        np.testing.assert_array_equal(got, want)


def test_usr2_requeues_and_resumes_identically_for_a_run_and_an_array_trial(slow_cache: Path, tmp_path: Path):
    reference = reference_run(slow_cache, tmp_path)
    single = submit(slurm_launcher_args(tmp_path / "single", *overrides(slow_cache, tmp_path)), tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    sweep = submit(slurm_launcher_args(tmp_path / "sweep", *overrides(slow_cache, tmp_path), "model.activation=relu,tanh",
                                      "hydra.launcher.trials_per_task=1"), tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    [single_rec] = job_records(tmp_path / "single")
    trial_rec, other_rec = job_records(tmp_path / "sweep")
    assert "_" in trial_rec["job_id"]  # an array task

    targets = [(single_rec, tmp_path / "single" / "0"), (trial_rec, tmp_path / "sweep" / "0")]
    for record, run_dir in targets:
        wait_for_file(rundir.checkpoint_path(run_dir, 2, 0))
        subprocess.run(["scancel", "--signal=USR2", record["job_id"]], check=True, timeout=30)

    ids = [single_rec["job_id"], trial_rec["job_id"], other_rec["job_id"]]
    for record, _ in targets:
        deadline = time.time() + 120
        while restarts(record["job_id"]) < 1:
            assert time.time() < deadline, "job was not requeued"
            time.sleep(1)
    states = wait_for_states(ids, timeout_s=600)
    assert set(states.values()) == {"COMPLETED"}, states
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    for record, run_dir in targets:
        assert "REQUEUED" in sacct_history(record["job_id"])
        log = run_log(run_dir)
        resumed_at = log.index("resuming from ")
        resumed_epoch = resumed_from(log)[0][0]
        assert resumed_epoch >= 2
        # After the resume, training continues with the next epoch, not from scratch.
        assert f"epoch {resumed_epoch + 1}/{EPOCHS}" in log[resumed_at:]
        assert "epoch 1/" not in log[resumed_at:]
        assert_matches_reference(run_dir, tmp_path / "reference")


def test_sigkilled_job_requeued_resumes_from_last_completed_epoch(slow_cache: Path, tmp_path: Path):
    reference = reference_run(slow_cache, tmp_path)
    proc = submit(slurm_launcher_args(tmp_path / "sweep", *overrides(slow_cache, tmp_path)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(tmp_path / "sweep")
    run_dir = tmp_path / "sweep" / "0"
    wait_for_file(rundir.checkpoint_path(run_dir, 2, 0))
    # submitit's command line names the folder template (".../.submitit/%A").
    pids = subprocess.run(["pgrep", "-f", f"submitit.core._submit {tmp_path / 'sweep' / '.submitit'}"],
                          capture_output=True, text=True, timeout=30).stdout.split()
    pids = [p for p in pids if int(p) != os.getpid()]
    assert pids, "job process not found"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    first = wait_for_states([record["job_id"]])
    assert first[record["job_id"]] in {"FAILED", "CANCELLED", "NODE_FAIL"}, first
    assert not (run_dir / rundir.METRICS_FILE).exists()
    # The job is dead: the checkpoints it left can no longer change.
    done_before_kill = max(epoch for epoch, _ in checkpoint_positions(run_dir))
    assert done_before_kill >= 2

    subprocess.run(["scontrol", "requeue", record["job_id"]], check=True, timeout=30)
    deadline = time.time() + 180
    while "resuming from" not in run_log(run_dir):
        assert time.time() < deadline, "requeued job did not resume"
        time.sleep(1)
    states = wait_for_states([record["job_id"]], timeout_s=600)
    assert states[record["job_id"]] == "COMPLETED"
    assert reference.wait(timeout=600) == 0

    log = run_log(run_dir)
    resumed = log[log.index("resuming from"):]
    assert resumed.startswith(f"{resume_line(done_before_kill, 0)}: {done_before_kill} epoch(s)")
    assert f"epoch {done_before_kill + 1}/{EPOCHS}" in resumed
    assert_matches_reference(run_dir, tmp_path / "reference")


def test_requeue_cap_ends_failed_with_guidance_and_resubmission_resumes(slow_cache: Path, tmp_path: Path):
    """max_num_timeout=1: the first time-limit warning requeues, the second ends the job FAILED
    with a failure.json that says how to continue; submitting again into the same sweep resumes."""
    epochs = 12
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *overrides(slow_cache, tmp_path), f"train.epochs={epochs}", "hydra.launcher.max_num_timeout=1")
    first = submit(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    [record] = job_records(sweep)
    run_dir = sweep / "0"

    # timeout_min <= 10, so submitit counts every USR2 as a time-limit warning.
    wait_for_file(rundir.checkpoint_path(run_dir, 2, 0))
    subprocess.run(["scancel", "--signal=USR2", record["job_id"]], check=True, timeout=30)
    deadline = time.time() + 120
    while restarts(record["job_id"]) < 1:
        assert time.time() < deadline, "job was not requeued"
        time.sleep(1)
    wait_for_file(rundir.checkpoint_path(run_dir, 4, 0))
    subprocess.run(["scancel", "--signal=USR2", record["job_id"]], check=True, timeout=30)

    assert wait_for_states([record["job_id"]], timeout_s=300)[record["job_id"]] == "FAILED"
    assert restarts(record["job_id"]) == 1
    assert not (run_dir / rundir.METRICS_FILE).exists()
    error = rundir.read_failure(run_dir)
    assert error.startswith("mnist_hpc.compute.failures.RequeueLimitReached: Job not requeued because: timed-out too many times.")
    assert f"hydra.sweep.dir={sweep}" in error and "max_num_timeout" in error

    second = submit(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    [again] = job_records(sweep)
    assert again["job_id"] != record["job_id"]
    assert wait_for_states([again["job_id"]], timeout_s=600)[again["job_id"]] == "COMPLETED"
    assert rundir.read_failure(run_dir) is None
    metrics = finished_metrics(run_dir)
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, epochs + 1))
    assert resumed_from(run_log(run_dir))[-1][0] >= 4


def test_packed_task_requeued_skips_its_finished_trial_and_resumes_the_other(slow_cache: Path, tmp_path: Path):
    """Two trials in one task (trials_per_task=2): a requeue after the first finished does not rerun it."""
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *overrides(slow_cache, tmp_path), "hydra.launcher.trials_per_task=2", "train.epochs=1,6")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = job_records(sweep)
    assert first["job_id"] == second["job_id"] and (first["packed_slot"], second["packed_slot"]) == (0, 1)
    wait_for_file(rundir.checkpoint_path(sweep / "1", 2, 0))
    finished = {name: (sweep / "0" / name).read_bytes() for name in (rundir.METRICS_FILE, rundir.PROVENANCE_FILE, rundir.MODEL_FILE)}

    subprocess.run(["scancel", "--signal=USR2", first["job_id"]], check=True, timeout=30)
    assert wait_for_states([first["job_id"]], timeout_s=600)[first["job_id"]] == "COMPLETED"
    assert "REQUEUED" in sacct_history(first["job_id"])

    # Trial 0 was not run again: its outputs are the very bytes it wrote before the requeue.
    assert {name: (sweep / "0" / name).read_bytes() for name in finished} == finished
    assert run_log(sweep / "0").count("training on") == 1
    # Trial 1 resumed from its checkpoint and ended with each of its epochs once.
    assert resumed_from(run_log(sweep / "1"))
    metrics = finished_metrics(sweep / "1")
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, 7))

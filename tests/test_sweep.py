"""Sweeps on the real cluster: one job array per sweep, and reports that show every trial honestly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_hpc import rundir
from tests.helpers import (
    job_records,
    report_csv,
    sacct_states,
    slurm_launcher_args,
    submit,
    tiny_overrides,
    wait_for_states,
)

pytestmark = pytest.mark.slurm


def test_four_trial_sweep_is_one_array_and_reported(synthetic_cache: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(
        sweep, *tiny_overrides(synthetic_cache, tmp_path), "experiment=sweep",
        "model.hidden_units=[32],[64]", "optimizer.learning_rate=0.001,0.0003", "hydra.launcher.array_parallelism=2",
        "hydra.launcher.trials_per_task=1",
    )
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = job_records(sweep)
    array_ids = {r["array_job_id"] for r in records}
    assert len(array_ids) == 1 and None not in array_ids  # ONE array for the whole sweep
    [array_id] = array_ids
    assert [r["job_id"] for r in records] == [f"{array_id}_{i}" for i in range(4)]
    scontrol = subprocess.run(["scontrol", "show", "job", array_id], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=2" in scontrol

    states = wait_for_states([r["job_id"] for r in records])
    assert set(states.values()) == {"COMPLETED"}, states
    assert set(sacct_states([array_id])) >= {f"{array_id}_{i}" for i in range(4)}

    out, rows = report_csv(sweep)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    expected = [("[32]", "0.001"), ("[32]", "0.0003"), ("[64]", "0.001"), ("[64]", "0.0003")]
    for row, (units, lr) in zip(rows, expected):
        assert f"model.hidden_units={units}" in row["overrides"] and f"optimizer.learning_rate={lr}" in row["overrides"]
        assert row["state"] == "COMPLETED"
        metrics = rundir.read_metrics(sweep / row["trial"])
        assert float(row["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
        assert float(row["best_val_accuracy"]) == pytest.approx(metrics["best_val_accuracy"])
    best = max(rows, key=lambda r: float(r["best_val_accuracy"]))
    assert [r["best"] for r in rows].count("yes") == 1 and best["best"] == "yes"
    assert f"trial {best['trial']}" in out.stdout.lower()
    for png in ("learning_curves.png", "confusion_matrix.png", "wrong_digits.png"):
        assert (sweep / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trial_failing_at_run_time_is_reported_failed_with_its_error(synthetic_cache: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    # 1e-9 passes the schema but leaves no validation samples: it fails only once data is loaded.
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "data.validation_split=0.1,1e-9")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = job_records(sweep)
    states = wait_for_states([r["job_id"] for r in records])
    assert [states[r["job_id"]] for r in records] == ["COMPLETED", "FAILED"]

    out, rows = report_csv(sweep)
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "COMPLETED"), ("1", "FAILED")]
    assert "DatasetError" in rows[1]["error"] and "validation_split=1e-09" in rows[1]["error"]
    assert rows[0]["best"] == "yes"
    assert "FAILED" in out.stdout


def test_report_on_pending_sweep_shows_pending(synthetic_cache: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "train.seed=1,2",
                               "+hydra.launcher.additional_parameters.hold=true")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = job_records(sweep)
    try:
        _, rows = report_csv(sweep)
        assert [r["state"] for r in rows] == ["PENDING", "PENDING"]
        assert [r["test_accuracy"] for r in rows] == ["", ""]
    finally:
        subprocess.run(["scancel", records[0]["array_job_id"]], timeout=30)


def test_packed_trials_keep_their_own_dirs_failures_and_states(synthetic_cache: Path, tmp_path: Path):
    """Three trials, two per task: two tasks; the failing trial fails alone."""
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "hydra.launcher.trials_per_task=2",
                               "data.validation_split=0.1,1e-9,0.2")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = job_records(sweep)
    assert [r["job_id"] == records[0]["job_id"] for r in records] == [True, True, False]
    assert [r["packed_slot"] for r in records] == [0, 1, 0]
    states = wait_for_states(sorted({r["job_id"] for r in records}))
    # The task holding the failing trial ends FAILED in Slurm: nothing is hidden.
    assert [states[records[0]["job_id"]], states[records[2]["job_id"]]] == ["FAILED", "COMPLETED"]
    for trial in (0, 2):
        metrics = rundir.read_metrics(sweep / str(trial))
        assert metrics["epochs_completed"] == 1 and "val_accuracy" in metrics
        assert json.loads((sweep / str(trial) / rundir.PROVENANCE_FILE).read_text())["slurm_job_id"]
    assert "validation_split=1e-09" in rundir.read_failure(sweep / "1")
    assert not (sweep / "1" / rundir.METRICS_FILE).exists()

    rows = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", "--json", str(sweep)],
                          capture_output=True, text=True, timeout=60)
    assert [r["state"] for r in json.loads(rows.stdout)] == ["COMPLETED", "FAILED", "COMPLETED"]
    _, report_rows = report_csv(sweep)
    assert [r["state"] for r in report_rows] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert "DatasetError" in report_rows[1]["error"]


def test_packed_trials_equal_the_same_trials_each_alone(synthetic_cache: Path, tmp_path: Path):
    """Three trials of the same shapes in one task (the later two train through the first one's
    compiled programs) give the metrics, predictions and weights those trials give each in its own
    job, bit for bit; the task's log says where programs were reused."""
    import keras
    import numpy as np

    from mnist_hpc import rundir

    trials = ("train.seed=1,2,3", "optimizer.learning_rate=0.002", "train.epochs=2", "model.dropout=0.3",
              "data.validation_split=0.2", "train.steps_per_execution=4")
    packed, alone = tmp_path / "packed", tmp_path / "alone"
    for sweep, per_task in ((packed, 3), (alone, 1)):
        proc = submit(slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), *trials,
                                          f"hydra.launcher.trials_per_task={per_task}"), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    packed_records, alone_records = job_records(packed), job_records(alone)
    assert len({r["job_id"] for r in packed_records}) == 1 and len({r["job_id"] for r in alone_records}) == 3
    states = wait_for_states(sorted({r["job_id"] for r in packed_records + alone_records}))
    assert set(states.values()) == {"COMPLETED"}, states
    log_text = Path(packed_records[0]["stderr"]).read_text() + Path(packed_records[0]["stdout"]).read_text()
    assert log_text.count("same shapes as this process's previous trial") == 2, log_text[-3000:]

    def outcome(run_dir: Path):
        metrics = rundir.read_metrics(run_dir)
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]
        scores = {k: metrics[k] for k in ("test_loss", "test_accuracy", "val_accuracy", "best_val_accuracy")}
        weights = keras.saving.load_model(run_dir / rundir.MODEL_FILE).get_weights()
        return history, scores, rundir.load_predictions(run_dir).y_prob, weights

    results = []
    for trial in ("0", "1", "2"):
        mine, theirs = outcome(packed / trial), outcome(alone / trial)
        assert mine[:2] == theirs[:2]
        np.testing.assert_array_equal(mine[2], theirs[2])
        for a, b in zip(mine[3], theirs[3], strict=True):
            np.testing.assert_array_equal(a, b)
        results.append(mine[1])
    assert results[0] != results[1] != results[2], "the trials differ, so their equality above means something"


def test_short_trials_are_packed_by_default_as_far_as_the_idle_cpus_allow(synthetic_cache: Path, tmp_path: Path):
    """trials_per_task=auto (the default): eight one-epoch trials of a 600-image dataset are
    short, so they are packed into as many tasks as the idle CPUs (sinfo) can run at once."""
    import re

    sweep = tmp_path / "sweep"
    proc = submit(slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "train.seed=range(8)"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("packing (hydra.launcher.trials_per_task=auto)"))
    match = re.search(r": (\d+) trial\(s\) per task: .* (\d+) task\(s\) of 1 CPU\(s\) can start now", line)
    assert match, line
    per_task, slots = int(match.group(1)), int(match.group(2))
    assert slots >= 1 and per_task == -(-8 // slots)
    records = job_records(sweep)
    tasks = sorted({r["job_id"] for r in records})
    assert len(tasks) == -(-8 // per_task)
    if per_task > 1:
        assert [r["packed_slot"] for r in records] == [i % per_task for i in range(8)]
    states = wait_for_states(tasks)
    assert set(states.values()) == {"COMPLETED"}, states
    assert all(rundir.read_metrics(sweep / str(i))["epochs_completed"] == 1 for i in range(8))

"""Never a wrong result on a shared cluster (issue 11): resubmissions, live owners, known errors,
version mismatches, packing and array limits, on the real local cluster (and the local executor)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_hpc import rundir
from tests.helpers import (
    TRAIN,
    job_records,
    slurm_launcher_args,
    snapshot,
    squeue_ids,
    status_rows,
    submit,
    tiny_overrides,
    wait_for_states,
)

pytestmark = pytest.mark.slurm


def report_rows(sweep: Path) -> list[dict[str, str]]:
    import csv

    proc = subprocess.run([sys.executable, "-c", "from mnist_hpc.cli import report_main; report_main()", str(sweep)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "report" / "report.csv") as fh:
        return list(csv.DictReader(fh))


def sweep_state(sweep: Path) -> dict[str, bytes]:
    """The sweep's files, the submitit folder included: a refused resubmission must change none."""
    return snapshot(sweep)


@pytest.mark.parametrize("per_task", [1, 2])
def test_resubmitting_a_sweep_with_its_values_reordered_is_refused(synthetic_cache: Path, tmp_path: Path, per_task: int):
    """Case 1: the README's "same command continues" advice must never relabel finished trials."""
    sweep = tmp_path / "s"
    common = ["-m", "hydra/launcher=local", "hydra.launcher.wait=true", f"hydra.launcher.trials_per_task={per_task}",
              *tiny_overrides(synthetic_cache, tmp_path), "train.deterministic=true", "data.validation_split=0.1",
              f"hydra.sweep.dir={sweep}"]
    first = submit(common + ["optimizer.learning_rate=1e-3,3e-4"], tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = sweep_state(sweep)

    reordered = submit(common + ["optimizer.learning_rate=3e-4,1e-3"], tmp_path, timeout=600)
    assert reordered.returncode != 0
    err = reordered.stderr
    assert "nothing was queued" in err and "Traceback" not in err
    assert "trial 0:" in err and "optimizer.learning_rate: 0.001 -> 0.0003" in err
    assert "trial 1:" in err and "optimizer.learning_rate: 0.0003 -> 0.001" in err
    assert sweep_state(sweep) == before  # nothing changed: job.json, config.yaml, multirun.yaml, .submitit

    # The same overrides again: both trials are finished with them; nothing is queued or rewritten.
    again = submit(common + ["optimizer.learning_rate=1e-3,3e-4"], tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to queue" in again.stdout and again.stdout.count("already finished with this config") == 2
    after = sweep_state(sweep)
    assert {k: v for k, v in after.items() if k != "multirun.yaml"} == {k: v for k, v in before.items() if k != "multirun.yaml"}

    rows = report_rows(sweep)
    by_lr = {float(r["optimizer.learning_rate"]): r for r in rows}
    for lr, trial in ((1e-3, "0"), (3e-4, "1")):
        assert by_lr[lr]["trial"] == trial
        metrics = rundir.read_metrics(sweep / trial)
        assert float(by_lr[lr]["best_val_accuracy"]) == pytest.approx(metrics["best_val_accuracy"])
        assert f"learning_rate: {lr}" in (sweep / trial / rundir.CONFIG_FILE).read_text()


@pytest.mark.parametrize("per_task", [1, 2])
def test_a_trial_that_raises_is_never_completed(synthetic_cache: Path, tmp_path: Path, per_task: int):
    """A finished sweep continued to 2 epochs; one trial's checkpoints are damaged, so it raises: that
    trial is FAILED in status, report and the launcher's exit, even though it once had metrics."""
    sweep = tmp_path / "s"
    common = ["-m", "hydra/launcher=local", "hydra.launcher.wait=true", f"hydra.launcher.trials_per_task={per_task}",
              *tiny_overrides(synthetic_cache, tmp_path), f"hydra.sweep.dir={sweep}", "train.seed=1,2"]
    first = submit(common, tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for path in rundir.list_checkpoints(sweep / "1"):
        path.write_bytes(path.read_bytes()[:400])
    longer = submit(common[:-1] + ["train.epochs=2", "train.seed=1,2"], tmp_path, timeout=600)
    assert longer.returncode == 1 and "Traceback" not in longer.stderr
    assert "trial 1 [train.seed=2]: FAILED: " in longer.stderr and "no readable checkpoint" in longer.stderr
    assert rundir.read_metrics(sweep / "0")["epochs_completed"] == 2
    assert not (sweep / "1" / rundir.METRICS_FILE).exists()  # the extended run's old final metrics were retracted
    assert "no readable checkpoint" in rundir.read_failure(sweep / "1")
    assert [r["state"] for r in status_rows(sweep)] == ["COMPLETED", "FAILED"]
    rows = report_rows(sweep)
    assert [r["state"] for r in rows] == ["COMPLETED", "FAILED"] and "no readable checkpoint" in rows[1]["error"]


def test_a_trial_still_owned_by_a_queued_job_is_not_submitted_again(synthetic_cache: Path, tmp_path: Path):
    """Case 4: a resubmission while the earlier job waits in the queue is refused, naming that job."""
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "+hydra.launcher.additional_parameters.hold=true")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    try:
        before = snapshot(sweep)
        again = submit(args, tmp_path)
        assert again.returncode != 0 and "Traceback" not in again.stderr
        assert f"trial 0: its earlier job {record['job_id']} is still queued or running" in again.stderr
        assert snapshot(sweep) == before
        assert squeue_ids(workdir=tmp_path) == {record["job_id"]}
    finally:
        subprocess.run(["scancel", record["job_id"]], timeout=30)
    wait_for_states([record["job_id"]])
    # Its owner gone, the same submission is accepted and the trial completes.
    third = submit(slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path)), tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    [record] = job_records(sweep)
    assert wait_for_states([record["job_id"]])[record["job_id"]] == "COMPLETED"


def test_a_run_started_by_hand_in_a_directory_a_slurm_job_writes_is_refused(synthetic_cache: Path, tmp_path: Path):
    """Case 4: the lease names the Slurm job; a second writer (here an in-process run) is refused."""
    from tests.helpers import fill_cache, synthetic_mnist

    cache = tmp_path / "big"
    fill_cache(cache, synthetic_mnist(n_train=6000, n_test=200))
    sweep = tmp_path / "sweep"
    overrides = [*tiny_overrides(cache, tmp_path), "train.epochs=40"]
    proc = submit(slurm_launcher_args(sweep, *overrides), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    run_dir = sweep / "0"
    try:
        deadline = time.time() + 300
        while rundir.read_progress(run_dir) is None or rundir.read_progress(run_dir).epochs_done < 1:
            assert time.time() < deadline, "the job did not start training"
            time.sleep(0.5)
        assert rundir.read_lease(run_dir)["holder"]["slurm_job_id"] == record["job_id"]
        by_hand = subprocess.run(TRAIN + [*overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                                 timeout=300, cwd=tmp_path)
        assert by_hand.returncode == 1 and "Traceback" not in by_hand.stderr
        assert f"is being written by Slurm job {record['job_id']}" in by_hand.stderr and "still alive" in by_hand.stderr
    finally:
        subprocess.run(["scancel", record["job_id"]], timeout=30)
    wait_for_states([record["job_id"]])


def test_a_known_error_in_a_job_is_one_line_in_its_log_and_its_failure_json(synthetic_cache: Path, tmp_path: Path):
    """Case 11: the cache damaged after submission: FAILED, one line with the fix, no traceback."""
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "+hydra.launcher.additional_parameters.hold=true")
    proc = submit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    npz = synthetic_cache / "mnist.npz"
    npz.write_bytes(npz.read_bytes()[:-64])
    subprocess.run(["scontrol", "release", record["job_id"]], check=True, timeout=30)
    assert wait_for_states([record["job_id"]])[record["job_id"]] == "FAILED"
    log = Path(record["stderr"]).read_text()
    assert "Traceback" not in log, log[-3000:]
    [line] = [ln for ln in log.splitlines() if ln.startswith("mnist-hpc: error:")]
    assert "mnist-hpc-prefetch" in line and "--force" in line
    error = rundir.read_failure(sweep / "0")
    assert error.startswith("mnist_hpc.cache.CacheCorruptError:") and "--force" in error
    assert [r["state"] for r in status_rows(sweep)] == ["FAILED"]


def test_a_job_that_cannot_be_unpickled_on_the_node_fails_with_failure_json(tmp_path: Path):
    """Case 14: the compute node's environment lacks what the login node pickled: FAILED, and it says so."""
    module = tmp_path / "loginonly"
    module.mkdir()
    (module / "login_only_thing.py").write_text("class Thing:\n    def __call__(self):\n        return 1\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = f"""
import sys, json, submitit
sys.path.insert(0, {str(module)!r})
from login_only_thing import Thing
from mnist_hpc.contract.entry import JobEntry, environment_versions
versions = environment_versions()
versions["mnist-hpc"] = "0.0.1"
executor = submitit.AutoExecutor(folder={str(tmp_path / 'jobs')!r}, cluster="slurm")
executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1)
job = executor.submit(JobEntry(Thing(), [{str(run_dir)!r}], versions))
print(job.job_id)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.split()[-1]
    assert wait_for_states([job_id])[job_id] == "FAILED"
    error = rundir.read_failure(run_dir)
    assert "prepared on the login node with another environment" in error
    assert "mnist-hpc 0.0.1 (login node)" in error and "No module named 'login_only_thing'" in error
    log = (tmp_path / "jobs" / f"{job_id}_0_log.err").read_text()
    assert "Traceback" not in log and "mnist-hpc: error: this job was prepared" in log


def test_packed_trials_are_grouped_by_process_wide_tensorflow_settings(synthetic_cache: Path, tmp_path: Path):
    """Case 15: op determinism and thread pools hold for a whole process: trials that differ share no task."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=local", "hydra.launcher.trials_per_task=2", *tiny_overrides(synthetic_cache, tmp_path),
            f"hydra.sweep.dir={sweep}", "train.deterministic=false,true", "train.seed=1,2"]
    proc = submit(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = job_records(sweep)
    configs = [json.loads(json.dumps(r)) for r in records]
    det = {r["trial"]: ("deterministic=true" in " ".join(r["overrides"])) for r in configs}
    tasks: dict[str, set[bool]] = {}
    for r in configs:
        tasks.setdefault(r["job_id"], set()).add(det[r["trial"]])
    assert len(tasks) == 2 and all(len(kinds) == 1 for kinds in tasks.values())
    deadline = time.time() + 600
    while not all((sweep / str(r["trial"]) / rundir.METRICS_FILE).exists() for r in configs):
        assert time.time() < deadline, "packed trials did not finish"
        time.sleep(1)


def test_a_sweep_larger_than_max_array_size_is_split_into_arrays(synthetic_cache: Path, tmp_path: Path):
    """Case 17: with MaxArraySize lowered to 3, a 7-task sweep goes in as arrays of 3, 3 and 1."""
    conf = Path(subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout.split("SLURM_CONF")[1]
                .split("=", 1)[1].split()[0])
    original = conf.read_text()
    lowered = "\n".join(line for line in original.splitlines() if not line.startswith("MaxArraySize")) + "\nMaxArraySize=3\n"
    sweep = tmp_path / "sweep"
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "train.seed=range(7)",
                               "+hydra.launcher.additional_parameters.hold=true", "hydra.launcher.trials_per_task=1")
    conf.write_text(lowered)
    try:
        subprocess.run(["scontrol", "reconfigure"], check=True, timeout=60)
        proc = submit(args, tmp_path)
    finally:
        conf.write_text(original)
        subprocess.run(["scontrol", "reconfigure"], check=True, timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = job_records(sweep)
        arrays: dict[str, list[int]] = {}
        for r in records:
            arrays.setdefault(r["array_job_id"] or r["job_id"], []).append(r["array_task_id"] or 0)
        assert sorted(len(tasks) for tasks in arrays.values()) == [1, 3, 3]
        assert all(max(tasks) < 3 for tasks in arrays.values())
        assert sorted(r["trial"] for r in records) == list(range(7))
        assert len(squeue_ids(workdir=tmp_path)) == 7
    finally:
        for array in {r["array_job_id"] or r["job_id"] for r in job_records(sweep)}:
            subprocess.run(["scancel", array], timeout=30)

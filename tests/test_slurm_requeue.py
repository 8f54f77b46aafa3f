"""Requeue on the real cluster from a job whose Python cannot run scontrol (issue 23, item 7).

The job's ``hydra.launcher.python`` is a wrapper that gives Python a PATH without Slurm's
client, as a container image without it does. Its batch script (on the host) requeues it; a
batch script without the helper leaves the job FAILED with one line that names the checkpoint
and how to resume, which status shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from tests.helpers import (
    finished_metrics,
    job_records,
    restarts,
    resumed_from,
    run_log,
    sacct_history,
    slurm_launcher_args,
    status_rows,
    submit,
    wait_for_file,
    wait_for_states,
    weights,
)

pytestmark = pytest.mark.slurm

EPOCHS = 4

# A container without Slurm's client: Python (given by its absolute path) finds no scontrol.
NO_SCONTROL = """#!/bin/sh
PATH=/nonexistent; export PATH
exec "$@"
"""
# The same, run by a batch script that has no requeue helper (an older launcher's, or one's own):
# the FIFOs the batch script made are removed before Python starts. The last argument is the
# submitit folder (<sweep>/.submitit/%A), whose parent holds them.
NO_HELPER = """#!/bin/sh
for last; do :; done
rm -f "${last%/*}/.requeue-$SLURM_JOB_ID.ask" "${last%/*}/.requeue-$SLURM_JOB_ID.answer"
PATH=/nonexistent; export PATH
exec "$@"
"""


def wrapper(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return f"hydra.launcher.python='{path} {sys.executable}'"


def overrides(cache: Path, tmp_path: Path) -> list[str]:
    return [f"data.cache_dir={cache}", f"paths.output_root={tmp_path / 'out'}", f"train.epochs={EPOCHS}",
            "train.batch_size=32", "train.deterministic=true"]


@pytest.mark.slow  # ~45-65 s here: two TensorFlow starts, and Slurm holds a requeued job ~20 s before it runs again
def warned_after_one_epoch(sweep: Path, cache: Path, tmp_path: Path, *extra: str) -> dict:
    """Queue one trial into ``sweep``; once its first epoch is checkpointed, send it the time-limit
    warning (USR2) as Slurm would. Its job.json record."""
    proc = submit(slurm_launcher_args(sweep, *overrides(cache, tmp_path), *extra), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(sweep)
    wait_for_file(rundir.checkpoint_path(sweep / "0", 1, 0), timeout_s=120)
    subprocess.run(["scancel", "--signal=USR2", record["job_id"]], check=True, timeout=30)
    return record


def test_a_job_without_scontrol_is_requeued_by_its_batch_script_and_ends_as_if_uninterrupted(slow_cache, tmp_path):
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "1"}
    reference = subprocess.Popen(
        [sys.executable, "-c", "from mnist_hpc.cli import train_main; train_main()", *overrides(slow_cache, tmp_path),
         f"hydra.run.dir={tmp_path / 'reference'}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "sweep"
    record = warned_after_one_epoch(sweep, slow_cache, tmp_path, wrapper(tmp_path, "no-scontrol", NO_SCONTROL))
    run_dir = sweep / "0"

    assert wait_for_states([record["job_id"]], timeout_s=180)[record["job_id"]] == "COMPLETED"
    assert restarts(record["job_id"]) == 1 and "REQUEUED" in sacct_history(record["job_id"])
    log = run_log(run_dir)
    assert resumed_from(log) and resumed_from(log)[0][0] >= 1
    # The job's own scontrol could not run; the batch script's did.
    assert "submitit could not requeue the job itself ([Errno 2] No such file or directory: 'scontrol')" in log
    assert f"requeued Slurm job {record['job_id']}" in log
    assert not list((sweep / ".submitit").glob(".requeue-*"))  # the last attempt's teardown removed the FIFOs

    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    metrics, ref = finished_metrics(run_dir), finished_metrics(tmp_path / "reference")
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert (metrics["test_accuracy"], metrics["test_loss"]) == (ref["test_accuracy"], ref["test_loss"])
    for got, want in zip(weights(run_dir), weights(tmp_path / "reference")):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", ["no helper", "Slurm refuses"])
def test_without_any_way_to_requeue_the_job_ends_failed_with_one_line_naming_its_checkpoint(slow_cache, tmp_path, case):
    sweep = tmp_path / "sweep"
    how = ([wrapper(tmp_path, "no-helper", NO_HELPER)] if case == "no helper" else
           [wrapper(tmp_path, "no-scontrol", NO_SCONTROL), "+hydra.launcher.additional_parameters={no-requeue: true}"])
    record = warned_after_one_epoch(sweep, slow_cache, tmp_path, *how)
    run_dir = sweep / "0"

    assert wait_for_states([record["job_id"]], timeout_s=180)[record["job_id"]] == "FAILED"
    assert restarts(record["job_id"]) == 0
    kept = rundir.list_checkpoints(run_dir)[0]  # the newest
    error = rundir.read_failure(run_dir)
    assert error.startswith(f"mnist_hpc.compute.failures.NotRequeued: Slurm job {record['job_id']} was not requeued: "
                            "scontrol cannot run here (")
    if case == "no helper":
        assert f"the batch script has no requeue helper ({sweep / '.submitit'}/.requeue-{record['job_id']}.answer is missing" in error
    else:  # the helper asked, and Slurm's own words came back
        assert f"; the batch script asked Slurm, which refused: Requested operation is presently disabled for job {record['job_id']}. Training" in error
    assert f"its checkpoint {kept} is kept" in error and f"hydra.sweep.dir={sweep} " in error
    assert not list((sweep / ".submitit").glob(".requeue-*"))  # the teardown removed the FIFOs
    job_err = Path(record["stderr"]).read_text()
    assert "Traceback" not in job_err
    [line] = [ln for ln in job_err.splitlines() if ln.startswith(rundir.ERROR_LINE_PREFIX)]
    assert line == rundir.ERROR_LINE_PREFIX + error.split(": ", 1)[1]

    [trial] = status_rows(sweep)
    assert (trial["state"], trial["error"]) == ("FAILED", error)

"""Hostile pass (hostile3) over the site preflight and additional_parameters (issue 23 items 1 and 4).

On the real local cluster: each launch is refused before sbatch is asked (nothing queued), or is
a held sweep whose jobs are cancelled by id in a ``finally``. Each test reproduces a finding (now
fixed); the checks before the asserting lines are preconditions.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import job_records, squeue_ids, submit, tiny_overrides

pytestmark = pytest.mark.slurm


def args(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.trials_per_task=1",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", *tiny_overrides(cache, tmp_path / "out"), *extra]


def refused(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    """Launch with ``extra``; it must be refused with nothing queued and no traceback. Its stderr lines."""
    try:
        proc = submit(args(cache, tmp_path, *extra), tmp_path)
        queued = squeue_ids(tmp_path)
    finally:
        cancel_all_from(tmp_path)
    assert queued == set() and job_records(tmp_path / "sweep") == [], f"queued {sorted(queued)}"
    assert "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert proc.returncode == 1, proc.stderr[-600:]
    return proc.stderr.splitlines()


def cancel_all_from(workdir: Path) -> None:
    """Cancel, by id, every job queued from ``workdir`` (the test's own)."""
    ids = sorted({j.partition("_")[0] for j in squeue_ids(workdir)})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=30)


def test_a_newline_in_an_additional_parameter_is_refused_in_one_line(synthetic_cache, tmp_path):
    lines = refused(synthetic_cache, tmp_path, "hydra.launcher.additional_parameters={hold: true, comment: 'a\nb'}")
    assert len([ln for ln in lines if ln.startswith("nothing was queued")]) == 1, lines[-6:]


def test_an_array_given_in_additional_parameters_is_refused_before_anything_is_queued(synthetic_cache, tmp_path):
    lines = refused(synthetic_cache, tmp_path, "train.seed=range(2)",
                    "hydra.launcher.additional_parameters={hold: true, array: '0-5'}")
    assert [ln for ln in lines if "additional_parameters.array" in ln], lines[-6:]


@pytest.mark.parametrize("mem_gb", ["nan", "inf"])
def test_a_memory_size_that_is_no_number_is_refused_in_one_line(synthetic_cache, tmp_path, mem_gb):
    lines = refused(synthetic_cache, tmp_path, "hydra.launcher.additional_parameters={hold: true}",
                    f"hydra.launcher.mem_gb={mem_gb}")
    assert [ln for ln in lines if ln.startswith("nothing was queued") and "mem_gb" in ln], lines[-6:]


def test_a_warning_signal_before_the_job_can_start_is_refused(synthetic_cache, tmp_path):
    lines = refused(synthetic_cache, tmp_path, "hydra.launcher.additional_parameters={hold: true}",
                    "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=600")
    assert [ln for ln in lines if ln.startswith("nothing was queued") and "signal_delay_s" in ln], lines[-6:]

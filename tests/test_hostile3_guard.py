"""Hostile pass (hostile3) over the job guard's PYTHONPATH filter (issue 21, guard.JOB_COMMAND).

The filter takes the working directory off ``sys.path`` "unless PYTHONPATH names it". Each test
runs the guard's own command text in a fresh Python, with its last statement (the guard's main)
replaced by an import of a module that only the working directory holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_hpc.contract.guard import JOB_COMMAND

TAIL = "from mnist_hpc.contract.guard import main; main()"


def run_filter(cwd: Path, pythonpath: str) -> subprocess.CompletedProcess:
    """The guard's filter, then ``import h3_named`` (a module in ``cwd``), as a job's Python would run them."""
    assert JOB_COMMAND.endswith(TAIL)  # precondition: the filter is what comes before the guard's main
    code = JOB_COMMAND[: -len(TAIL)] + "import h3_named; print(h3_named.WHERE)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=pythonpath, PYTHONSAFEPATH="1")
    return subprocess.run([sys.executable, "-u", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    here = tmp_path / "project"
    here.mkdir()
    (here / "h3_named.py").write_text("WHERE = 'project'\n")
    # Precondition: named as it is spelled by os.getcwd(), the directory stays importable.
    proc = run_filter(here, str(here))
    assert proc.returncode == 0 and proc.stdout.strip() == "project", proc.stderr[-500:]
    return here


@pytest.mark.parametrize("spelling", ["{here}/", "{here}/.", "{parent}/./project"])
def test_a_working_directory_pythonpath_names_is_kept_however_spelled(project: Path, spelling: str) -> None:
    named = spelling.format(here=project, parent=project.parent)
    proc = run_filter(project, named)
    assert proc.returncode == 0 and proc.stdout.strip() == "project", proc.stderr[-300:]


# --- on the cluster: a setup line that puts an empty element back --------------------------------------

PLANTED = """import os
if os.environ.get("SLURM_JOB_ID"):  # only in the job: the test's own Pythons start here too
    open(os.path.join(os.getcwd(), "planted-ran"), "w").write(os.environ["SLURM_JOB_ID"])
    os._exit(3)
"""


@pytest.mark.slurm
@pytest.mark.slow  # ~5 s as it fails (the planted module ends the job); a fixed guard trains one tiny epoch
def test_a_setup_line_cannot_bring_back_the_working_directory_before_the_guard(synthetic_cache, tmp_path: Path) -> None:
    from tests.helpers import job_records, sacct_states, slurm_launcher_args, submit, tiny_overrides, until

    (tmp_path / "sitecustomize.py").write_text(PLANTED)  # what a group member could leave in a shared project directory
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MNIST_HPC_CACHE")}
    # PYTHONPATH unset, as for most users (the package is installed): the setup line's expansion starts with ':'.
    sweep = tmp_path / "sweep"
    proc = submit(slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path / "out"),
                                      "hydra.launcher.setup=['export PYTHONPATH=$PYTHONPATH:/opt/hostile3-lib']"),
                  tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]  # precondition: queued
    [record] = job_records(sweep)
    job = record["job_id"]
    try:
        state = until(lambda: {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"} & {sacct_states([job]).get(job)},
                      f"job {job} to end", timeout_s=180, every_s=1.0)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert not (tmp_path / "planted-ran").exists(), "the planted sitecustomize.py ran in the job"
    assert state == {"COMPLETED"}  # the job itself ran (a job that failed otherwise proves nothing)

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


@pytest.mark.xfail(strict=True, reason="hostile3 G1: a working directory named in PYTHONPATH with a trailing slash "
                   "(PYTHONPATH=$PWD/) is taken off sys.path by the guard's filter, which compares the spelling, not "
                   "the directory: the job cannot import the code its user named (or imports another copy)")
@pytest.mark.parametrize("spelling", ["{here}/", "{here}/.", "{parent}/./project"])
def test_a_working_directory_pythonpath_names_is_kept_however_spelled(project: Path, spelling: str) -> None:
    named = spelling.format(here=project, parent=project.parent)
    proc = run_filter(project, named)
    assert proc.returncode == 0 and proc.stdout.strip() == "project", proc.stderr[-300:]

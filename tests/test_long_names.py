"""Hostile tester's second pass (issue 21, I8): a known error is one line on every path.

A directory name longer than the filesystem allows (255 bytes a component) is a bad setting,
like a read-only output root: the in-process callback and the launcher's preflight should name it
in one line. Each ended in a traceback before mnist_hpc.io.path_problem. Nothing trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import STATUS, TRAIN, run_to_files, tiny_overrides

LONG = "x" * 300


def test_an_in_process_run_dir_name_too_long_is_one_line(synthetic_cache: Path, tmp_path: Path) -> None:
    proc = run_to_files([*TRAIN, *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.run.dir={tmp_path / LONG}"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "raised OSError" not in proc.stderr, proc.stderr[-3000:]


def test_a_sweep_subdir_name_too_long_is_refused_in_one_line(synthetic_cache: Path, tmp_path: Path) -> None:
    proc = run_to_files([*TRAIN, "-m", "hydra/launcher=local", "hydra.launcher.wait=true",
                *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={tmp_path / 'sweep'}",
                f"hydra.sweep.subdir={LONG}"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "nothing was queued" in proc.stderr, proc.stderr[-3000:]


PREFETCH = [sys.executable, "-c", "from mnist_hpc.cli import prefetch_main; prefetch_main()"]


@pytest.mark.parametrize("command", ["status", "prefetch"])
def test_a_target_name_too_long_is_one_line_for_status_and_prefetch(tmp_path: Path, command: str) -> None:
    target = tmp_path / LONG
    argv = [*STATUS, str(target)] if command == "status" else [*PREFETCH, f"data.cache_dir={target}"]
    proc = run_to_files(argv, tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]

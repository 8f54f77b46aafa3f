"""Helpers for tests against the local Slurm cluster started by ``slurm/cluster.sh start``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import pytest

from tests.conftest import IN_CI, REPO

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
TRAIN = [sys.executable, "-c", "from mnist_hpc.cli import train_main; train_main()"]


# Slurm daemons this test run found dead and started again: (when, what status showed), for the summary.
HEALED: list[tuple[str, str]] = []


def cluster_status() -> "subprocess.CompletedProcess[str] | None":
    """``slurm/cluster.sh status`` (exit 0: the cluster accepts jobs), or None without Slurm's commands."""
    if shutil.which("sinfo") is None:
        return None
    return subprocess.run([str(REPO / "slurm" / "cluster.sh"), "status"], capture_output=True, text=True, timeout=60)


def heal_crashed_daemons(when: str) -> bool:
    """Start again a Slurm daemon that died under the tests (slurmd has segfaulted here, once in many runs).

    Only a daemon that status shows *stopped* is a crash to heal; any other trouble (a drained or
    planned node, a refused test submission) is left for the test to report. Needs root. Every
    restart is listed in the test session's summary.
    """
    status = cluster_status()
    if status is None or status.returncode == 0 or os.geteuid() != 0:
        return False
    if not any(line.strip().endswith("stopped") or "stopped (" in line for line in status.stdout.splitlines()):
        return False
    HEALED.append((when, status.stdout.strip()))
    started = subprocess.run([str(REPO / "slurm" / "cluster.sh"), "start"], capture_output=True, text=True, timeout=300)
    return started.returncode == 0


def require_cluster() -> None:
    """Skip locally without a cluster; in CI a missing cluster is a failure that says what was seen."""
    status = cluster_status()
    if status is not None and status.returncode != 0 and heal_crashed_daemons("before a test"):
        status = cluster_status()
    if status is None or status.returncode != 0:
        message = "no local Slurm cluster: run `slurm/cluster.sh start` (as root)"
        if status is not None:
            queue = subprocess.run(["squeue", "-o", "%i %T %r %D %j"], capture_output=True, text=True, timeout=30)
            message += f"\ncluster.sh status:\n{status.stdout}{status.stderr}squeue:\n{queue.stdout}{queue.stderr}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def slurm_launcher_args(sweep_dir: Path, *extra: str) -> list[str]:
    """Submission arguments sized for this 2-core test node."""
    return [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]


def submit(args: list[str], tmp_path: Path, timeout: float = 120, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Submit from ``tmp_path``; ``env`` is the submitting shell's environment (the jobs inherit it)."""
    return subprocess.run(TRAIN + args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


def job_records(sweep_dir: Path) -> list[dict]:
    files = sorted(sweep_dir.glob("*/job.json"), key=lambda p: int(p.parent.name))
    return [json.loads(p.read_text()) for p in files]


def sacct_states(job_ids: Iterable[str]) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=30,
    ).stdout
    states: dict[str, str] = {}
    for line in out.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id] = state.split()[0] if state else ""
    return states


def wait_for_states(job_ids: list[str], timeout_s: float = 300) -> dict[str, str]:
    """Poll sacct until every job is in a terminal state."""
    deadline = time.time() + timeout_s
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = sacct_states(job_ids)
        if all(states.get(j) in TERMINAL for j in job_ids):
            return states
        time.sleep(2)
    raise AssertionError(f"jobs did not end within {timeout_s}s: {states}")


def squeue_ids(workdir: Path | None = None) -> set[str]:
    """Job ids in the queue; with ``workdir``, only jobs submitted from that directory."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%Z"], capture_output=True, text=True, timeout=30).stdout
    rows = [line.strip().split("|", 1) for line in out.splitlines() if "|" in line]
    return {job for job, wd in rows if workdir is None or Path(wd) == Path(workdir)}


def status_rows(target: Path | str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", "--json", str(target)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)

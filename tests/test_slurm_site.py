"""The site preflight on the real local cluster (issue 23 items 1, 4 and 5): what no node or
partition limit can ever run is refused in one line naming the setting, the limit and a value
that fits, with nothing queued; a request that fits (new sbatch keys without '+') is queued after
one ``sbatch --test-only`` for the whole launch; a request over its QoS's per-job limits (which Slurm
would queue, and which would never start) is refused like one over a partition's; Slurm's own
refusal (an unknown account: the local cluster enforces associations) stops the launch as well.

The limits expected below are read from the cluster by the test itself (sinfo, scontrol), not
from the code under test.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import job_records, squeue_ids, submit, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slurm


def largest(column: str, partition: str) -> int:
    """The largest value of an ``sinfo -N`` column (%c CPUs, %m memory MB) among ``partition``'s nodes."""
    out = subprocess.run(["sinfo", "-N", "-h", "-p", partition, "-o", column], capture_output=True, text=True, timeout=30)
    return max(int(v) for v in out.stdout.split())


def max_time_min(partition: str) -> int:
    out = subprocess.run(["scontrol", "show", "partition", partition, "-o"], capture_output=True, text=True, timeout=30).stdout
    hours, minutes, seconds = out.split("MaxTime=")[1].split()[0].split(":")
    return int(hours) * 60 + int(minutes)


def default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    return next(p.rstrip("*") for p in out.split() if p.endswith("*"))


def args(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.trials_per_task=1",
            *tiny_overrides(cache, tmp_path / "out"), *extra]


def refusal_line(proc: subprocess.CompletedProcess) -> str:
    """The one line of a refusal: exit 1, no traceback, and the message the only "nothing was queued" line."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("nothing was queued")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def assert_nothing_queued(tmp_path: Path) -> None:
    assert squeue_ids(tmp_path) == set()
    assert job_records(tmp_path / "sweep") == []
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_impossible_cpus_memory_and_time_are_refused_in_one_line(synthetic_cache, tmp_path):
    debug = default_partition()
    cpus, memory_mb, limit = largest("%c", debug), largest("%m", debug), max_time_min("short")
    cases = [
        (["hydra.launcher.cpus_per_task=64"],
         f"nothing was queued: hydra.launcher.cpus_per_task=64 asks for 64 CPUs per node, but partition {debug}'s largest "
         f"node has {cpus}; hydra.launcher.cpus_per_task={cpus} fits"),
        (["hydra.launcher.mem_gb=4000"],
         f"nothing was queued: hydra.launcher.mem_gb=4000 asks for 4000 GB per node, but partition {debug}'s largest node "
         f"has {memory_mb / 1024:.1f} GB ({memory_mb} MB); hydra.launcher.mem_gb={memory_mb // 1024} fits"),
        (["hydra.launcher.partition=short", f"hydra.launcher.timeout_min={limit + 1}"],
         f"nothing was queued: hydra.launcher.timeout_min={limit + 1} asks for {limit + 1} minutes, but partition short's "
         f"MaxTime is 00:{limit:02d}:00; hydra.launcher.timeout_min={limit} fits"),
    ]
    for extra, expected in cases:
        proc = submit(args(synthetic_cache, tmp_path, "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", *extra),
                      tmp_path)
        assert refusal_line(proc) == expected
        assert_nothing_queued(tmp_path)


def sbatch_recorder(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose ``sbatch`` logs each call and runs the real one."""
    real = shutil.which("sbatch")
    assert real is not None
    shims, log = tmp_path / "shims", tmp_path / "sbatch-calls"
    shims.mkdir()
    (shims / "sbatch").write_text(f'#!/bin/bash\necho "$*" >> {log}\nexec {real} "$@"\n')
    (shims / "sbatch").chmod(stat.S_IRWXU)
    env = subprocess_env()
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    return env, log


def test_a_fitting_request_is_queued_after_one_test_only_for_the_whole_launch(synthetic_cache, tmp_path):
    """Five held trials at exactly the short partition's MaxTime, `hold` given without '+'."""
    env, log = sbatch_recorder(tmp_path)
    limit = max_time_min("short")
    proc = submit(args(synthetic_cache, tmp_path, "train.seed=range(5)", "hydra.launcher.partition=short",
                       f"hydra.launcher.timeout_min={limit}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                       "hydra.launcher.additional_parameters={hold: true}"), tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert [c.startswith("--test-only") for c in calls] == [True, False]  # one check, then one array
    # Slurm's expected start, or (when it cannot place the job behind others: it then answers a date
    # thousands of years away) that it foresees none.
    [start] = [ln for ln in proc.stdout.splitlines() if ln.startswith(("Slurm expects", "Slurm accepts"))]
    assert "partition short" in start
    records = job_records(tmp_path / "sweep")
    assert len(records) == 5
    queued = subprocess.run(["squeue", "-h", "-r", "-j", records[0]["array_job_id"], "-o", "%i|%P|%l|%r"],
                            capture_output=True, text=True, timeout=30).stdout.split()
    assert sorted(queued) == sorted(f"{r['job_id']}|short|{limit}:00|JobHeldUser" for r in records)


def qos_limits(name: str) -> str:
    out = subprocess.run(["sacctmgr", "-n", "-P", "show", "qos", name, "format=maxtresperjob,maxwall"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return out


def test_a_request_over_its_qos_limits_is_refused_and_slurms_own_refusal_stops_the_launch(synthetic_cache, tmp_path):
    """The local cluster enforces associations and QoS (slurm/cluster.sh). QoS small allows 1 CPU, 1 GB and
    5 minutes per job, without DenyOnLimit (Slurm's default): Slurm itself would queue a job over them, and it
    would never start. The launch refuses it, naming the setting, the QoS's limit and a value that fits,
    before Slurm is asked. An unknown account is refused as Slurm says. Nothing is queued."""
    assert qos_limits("small") == "cpu=1,mem=1G|00:05:00"  # precondition: the cluster's QoS, as the test reads it
    accepted = subprocess.run(["sbatch", "--test-only", "--qos=small", "-c", "2", "--wrap", "true"],
                              capture_output=True, text=True, timeout=30)
    assert accepted.returncode == 0, accepted.stderr  # precondition: Slurm alone would queue it
    cases = [
        (["hydra.launcher.cpus_per_task=2"],
         "hydra.launcher.cpus_per_task=2 asks for 2 CPUs per job, but QoS small allows 1 (MaxTRESPerJob cpu=1); "
         "hydra.launcher.cpus_per_task=1 fits"),
        (["hydra.launcher.mem_gb=2"],
         "hydra.launcher.mem_gb=2 asks for 2 GB per job, but QoS small allows 1 GB (MaxTRESPerJob mem=1024M); "
         "hydra.launcher.mem_gb=1 fits"),
        (["hydra.launcher.timeout_min=6"],
         "hydra.launcher.timeout_min=6 asks for 6 minutes, but QoS small allows 00:05:00 (MaxWall); "
         "hydra.launcher.timeout_min=5 fits"),
    ]
    for extra, expected in cases:
        env, log = sbatch_recorder(tmp_path)
        proc = submit(args(synthetic_cache, tmp_path, "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                           "hydra.launcher.timeout_min=5", "hydra.launcher.qos=small", *extra), tmp_path, env=env)
        assert refusal_line(proc) == "nothing was queued: " + expected
        assert not log.exists()  # refused before any sbatch, --test-only included
        assert_nothing_queued(tmp_path)
        shutil.rmtree(tmp_path / "shims")
    proc = submit(args(synthetic_cache, tmp_path, "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                       "hydra.launcher.account=no-such-account"), tmp_path)
    assert refusal_line(proc) == (
        "nothing was queued: Slurm refuses this job (sbatch --test-only): Invalid account or account/partition "
        "combination specified; check hydra.launcher.account (sacctmgr show assoc user=$USER)")
    assert_nothing_queued(tmp_path)


def test_a_request_within_the_qos_is_queued_under_it(synthetic_cache, tmp_path):
    proc = submit(args(synthetic_cache, tmp_path, "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                       "hydra.launcher.timeout_min=5", "hydra.launcher.qos=small",
                       "hydra.launcher.additional_parameters={hold: true}"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = job_records(tmp_path / "sweep")
    try:
        queued = subprocess.run(["squeue", "-h", "-j", record["job_id"], "-o", "%q|%r"], capture_output=True, text=True,
                                timeout=30).stdout.split()
        assert queued == ["small|JobHeldUser"]
    finally:
        subprocess.run(["scancel", record["job_id"]], timeout=30)


def test_a_search_whose_workers_cannot_run_is_refused_before_its_study_is_written(synthetic_cache, tmp_path):
    """The asynchronous search's workers go through the same check, once, before the study is opened."""
    debug = default_partition()
    cpus = largest("%c", debug)
    proc = submit(["-m", "hparams_search=optuna", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   *tiny_overrides(synthetic_cache, tmp_path / "out"), "hydra.launcher.mem_gb=1",
                   f"hydra.launcher.cpus_per_task={cpus + 1}"], tmp_path)
    assert refusal_line(proc) == (
        f"nothing was queued: hydra.launcher.cpus_per_task={cpus + 1} asks for {cpus + 1} CPUs per node, but partition "
        f"{debug}'s largest node has {cpus}; hydra.launcher.cpus_per_task={cpus} fits")
    assert_nothing_queued(tmp_path)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == []  # no study, no spec, no multirun.yaml
    # Over its QoS's limit (which Slurm alone would queue): the same.
    proc = submit(["-m", "hparams_search=optuna", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   *tiny_overrides(synthetic_cache, tmp_path / "out"), "hydra.launcher.mem_gb=1",
                   "hydra.launcher.timeout_min=5", "hydra.launcher.qos=small", "hydra.launcher.cpus_per_task=2"], tmp_path)
    assert refusal_line(proc) == (
        "nothing was queued: hydra.launcher.cpus_per_task=2 asks for 2 CPUs per job, but QoS small allows 1 "
        "(MaxTRESPerJob cpu=1); hydra.launcher.cpus_per_task=1 fits")
    assert_nothing_queued(tmp_path)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == []

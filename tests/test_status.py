"""mnist-hpc-status without accounting: it says so and falls back to squeue and the run files.

The Slurm clients are stand-ins on PATH here (a narrow test of our fallback logic); the real
cluster is exercised in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_hpc import rundir, slurm


def make_run(sweep: Path, trial: int, job_id: str, finished: bool) -> Path:
    """A trial directory as the launcher and training leave it, written by their own writers."""
    run_dir = sweep / str(trial)
    rundir.write_job(run_dir, rundir.JobRecord(
        cluster="slurm", job_id=job_id, run_dir=str(run_dir), trial=trial, overrides=[f"train.seed={trial}"],
        stdout=f"/logs/{job_id}.out", stderr=f"/logs/{job_id}.err", submitit_folder=str(sweep / ".submitit"),
    ))
    history = [{"epoch": e, "accuracy": 0.9, "loss": 0.3, "seconds": 1.0} for e in range(1, 6 if finished else 3)]
    rundir.write_progress(run_dir, len(history), 5, history)
    if finished:
        rundir.write_metrics(run_dir, {"test_accuracy": 0.97, "test_loss": 0.1, "epochs_completed": 5, "history": history})
    return run_dir


def run_status(target: Path, path_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(path_dir)}
    return subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", "--json", str(target)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_without_sacct_falls_back_to_squeue_and_files(tmp_path: Path):
    sweep = tmp_path / "sweep"
    make_run(sweep, 0, "77_0", finished=True)
    make_run(sweep, 1, "77_1", finished=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho '77_1|RUNNING|1:02|node7'\n")
    squeue.chmod(0o755)

    proc = run_status(sweep, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "sacct is unavailable" in proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "COMPLETED"), (1, "RUNNING")]
    assert rows[1]["node"] == "node7" and rows[1]["last_epoch"] == 2 and rows[1]["epochs"] == 5
    assert rows[1]["log"] == "/logs/77_1.out"


def test_without_any_slurm_client_states_come_from_files(tmp_path: Path):
    sweep = tmp_path / "sweep"
    make_run(sweep, 0, "78_0", finished=True)
    make_run(sweep, 1, "78_1", finished=False)
    proc = run_status(sweep, tmp_path / "empty-bin")
    assert proc.returncode == 0
    assert "squeue is unavailable too" in proc.stderr
    assert [r["state"] for r in json.loads(proc.stdout)] == ["COMPLETED", "UNKNOWN"]


def test_a_directory_without_runs_is_an_error(tmp_path: Path):
    proc = run_status(tmp_path, tmp_path)
    assert proc.returncode == 1 and "holds no submitted run" in proc.stderr


def recorded(name: str) -> str:
    """Client output recorded on the local cluster (tests/data), without its comment lines."""
    text = (Path(__file__).parent / "data" / name).read_text()
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


NO_WAIT = {"reason": "", "start": ""}


def test_sacct_output_recorded_on_the_cluster_is_parsed():
    rows = slurm.parse_sacct(recorded("sacct.txt")).rows
    assert rows["78"] == {"state": "FAILED", "elapsed": "00:00:00", "node": "vm", "exit_code": "3:0", **NO_WAIT}
    assert rows["80"]["state"] == "CANCELLED"  # "CANCELLED by 0"
    assert rows["79"]["state"] == "PENDING"  # requeued: its current run
    # 77 was listed RUNNING, then CANCELLED by a later query: the later line is the current one.
    assert rows["77"] == {"state": "CANCELLED", "elapsed": "00:00:16", "node": "vm", "exit_code": "0:0", **NO_WAIT}
    # The held array was one row "76_[0-3%2]"; once released, two tasks run and "76_[2-3%2]" waits.
    assert [rows[f"76_{i}"]["state"] for i in range(4)] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]
    assert rows["76_2"]["node"] == "None assigned"
    assert "76_[2-3%2]" not in rows and "76" not in rows


def test_squeue_output_recorded_on_the_cluster_is_parsed():
    rows = slurm.parse_squeue(recorded("squeue.txt"))
    assert rows["77"] == {"state": "RUNNING", "elapsed": "0:14", "node": "vm", "exit_code": "", **NO_WAIT}
    assert rows["79"] == {"state": "PENDING", "elapsed": "0:00", "node": "", "exit_code": "", **NO_WAIT}
    assert [rows[f"76_{i}"]["state"] for i in range(4)] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]
    assert rows["76_0"]["node"] == "vm"


def test_squeue_reasons_and_expected_start_recorded_on_the_cluster():
    rows = slurm.parse_squeue(recorded("squeue_reasons.txt"))
    reasons = {job: row["reason"] for job, row in rows.items()}
    assert reasons == {"1581": "JobHeldUser", "1582": "", "1583": "Dependency", "1584": "PartitionConfig",
                       "1585_0": "", "1585_1": "JobArrayTaskLimit", "1585_2": "JobArrayTaskLimit",
                       "1585_3": "JobArrayTaskLimit", "1586": "BeginTime"}
    assert rows["1586"]["start"] == "2026-12-07T06:25:45"  # --begin=now+1hour
    assert rows["1581"]["start"] == ""  # N/A: no expected start
    assert rows["1582"]["state"] == "RUNNING" and rows["1582"]["start"] == "2026-12-07T05:25:45"


def test_sacct_usage_recorded_on_the_cluster_folds_steps_into_their_job():
    acct = slurm.parse_sacct(recorded("sacct_usage.txt"))
    done = acct.usage["1568"]
    # MaxRSS is on the batch step only; TotalCPU, CPUTimeRAW and the request are the job's.
    assert done.max_rss_bytes == 323756 * 1024 and done.req_mem_bytes == 1024**3
    assert (done.elapsed_s, done.cpu_s, done.alloc_cpus, done.core_s) == (41, 23.198, 2, 82)
    assert done.cpu_efficiency == pytest.approx(23.198 / 82) and done.core_hours == pytest.approx(82 / 3600)
    # Running: its figures so far (no step has ended: CPU time unknown, not 0); pending: nothing used.
    running = acct.usage["1582"]
    assert (running.elapsed_s, running.core_s, running.cpu_s, running.max_rss_bytes) == (8, 16, None, None)
    assert "1581" not in acct.usage and "1585_2" not in acct.usage
    assert acct.rows["1581"]["reason"] == "JobHeldUser" and acct.rows["1585_3"]["reason"] == "JobArrayTaskLimit"
    assert acct.rows["1568"]["reason"] == "" and "1568.batch" not in acct.rows


def test_sstat_recorded_on_the_cluster_gives_a_running_job_s_usage_so_far():
    stats = slurm.parse_sstat(recorded("sstat.txt") + "2067.extern|100K|cpu=00:00:01,mem=100K\n")
    # Steps folded into their job: CPU time added, the largest RSS kept.
    assert stats == {"2067": (12.0, 323740 * 1024)}


@pytest.mark.parametrize("text, seconds", [
    ("00:23.198", 23.198), ("01:02:03", 3723), ("2-00:00:01", 172801), ("45", 45), ("", None), ("x:y", None),
    ("nan", None), ("-5", None), ("inf:00", None),
])
def test_durations(text: str, seconds):
    assert slurm.parse_duration(text) == seconds


@pytest.mark.parametrize("text, n_bytes", [
    ("323756K", 323756 * 1024), ("1G", 1024**3), ("11449M", 11449 * 1024**2), ("4Gn", 4 * 1024**3), ("0", 0),
    ("", None), ("lots", None),
])
def test_sizes(text: str, n_bytes):
    assert slurm.parse_bytes(text) == n_bytes


def test_memory_asked_per_cpu_is_multiplied_by_the_cpus():
    fields = {"ElapsedRaw": "10", "AllocCPUS": "4", "AllocTRES": "cpu=4,mem=8G,node=1,gres/gpu=2", "ReqMem": "2Gc",
              "TotalCPU": "00:20.000", "CPUTimeRAW": "40"}
    usage = slurm.parse_usage(fields)
    assert usage is not None and usage.req_mem_bytes == 8 * 1024**3
    assert usage.gpus == 2 and usage.gpu_hours == pytest.approx(20 / 3600) and usage.cpu_efficiency == 0.5


@pytest.mark.parametrize("code, attention, words", [
    ("Priority", False, "waiting its turn"), ("Resources", False, "waiting its turn"),
    ("JobHeldUser", True, "held by its owner"), ("JobHeldAdmin", True, "administrator"),
    ("Dependency", False, "depends on"), ("DependencyNeverSatisfied", True, "can never start"),
    ("BeginTime", False, "begin time"), ("PartitionConfig", True, "partition"),
    ("PartitionTimeLimit", True, "MaxTime"), ("PartitionNodeLimit", True, "nodes"), ("ReqNodeNotAvail", True, "node"),
    ("QOSMaxCpuPerJobLimit", True, "per-job limit of its QoS"), ("AssocMaxWallDurationPerJobLimit", True, "account"),
    ("QOSGrpCpuLimit", False, "QoS's group allowance"), ("AssocGrpCPUMinutesLimit", True, "account's budget of minutes"),
    ("AssocGrpCPURunMinutesLimit", False, "account's allowance"), ("QOSMaxJobsPerUserLimit", False, "at once"),
    ("", False, "not yet considered"), ("SomethingNew", False, "Slurm's reason SomethingNew"),
])
def test_reasons_in_words(code: str, attention: bool, words: str):
    reason = slurm.explain_reason(code)
    assert reason.attention is attention and words in reason.words and reason.todo


@pytest.mark.parametrize("line", ["", "|", "garbage", "1|2|3", "77|RUNNING|0:01|vm|0:0", "77|RUNNING|0:01|vm|r|s|7|v|extra",
                                  "|RUNNING|1|n|0"])
def test_malformed_client_lines_are_skipped(line: str):
    assert slurm.parse_squeue(line + "\n") == {}
    acct = slurm.parse_sacct(f"{slurm.SACCT_FIELDS.replace(',', '|')}\n{line}\n")
    assert acct.rows == {} and acct.usage == {}


def test_a_reader_that_closes_the_pipe_ends_status_quietly(tmp_path: Path):
    """``mnist-hpc-status --json SWEEP | head -1``: exit 141 (as a shell reports SIGPIPE), no traceback."""
    sweep = tmp_path / "sweep"
    for i in range(300):
        make_run(sweep, i, f"99999_{i}", finished=False)
    (sweep / "²").mkdir()  # a directory whose name is a digit but not an ASCII number: not a trial
    proc = subprocess.run(
        f"{shlex.quote(sys.executable)} -c 'from mnist_hpc.cli import status_main; status_main()' --json "
        f"{shlex.quote(str(sweep))} | head -c 10; exit ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": str(tmp_path / "no-slurm-here") + ":/usr/bin:/bin"})
    assert proc.returncode == 141, proc.stderr
    assert proc.stdout.startswith("[") and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_the_runs_of_a_requeued_job_add_up_in_its_usage():
    """sacct -D lists each run of a requeued job; the last is its state, their usage adds up."""
    text = ("JobID|State|Elapsed|NodeList|ExitCode|AllocCPUS|AllocTRES|ReqMem|MaxRSS|CPUTimeRAW|TotalCPU\n"
            "7|REQUEUED|00:00:05|vm|0:0|2|billing=2,cpu=2,mem=1G,node=1|1G||10|00:04\n"
            "7.batch|COMPLETED|00:00:05|vm|0:0|2|cpu=2,mem=1G,node=1||300M||00:04\n"
            "7|COMPLETED|00:00:02|vm|0:0|2|billing=2,cpu=2,mem=1G,node=1|1G||4|00:03\n"
            "7.batch|COMPLETED|00:00:02|vm|0:0|2|cpu=2,mem=1G,node=1||200M||00:03\n"
            "8|REQUEUED|00:00:05|vm|0:0|2|billing=2,cpu=2,mem=1G,node=1|1G||10|00:04\n"
            "8|PENDING|00:00:00||0:0|2||1G||0|00:00\n")
    acct = slurm.parse_sacct(text)
    assert acct.rows["7"]["state"] == "COMPLETED" and acct.rows["8"]["state"] == "PENDING"
    seven = acct.usage["7"]
    assert (seven.elapsed_s, seven.core_s, seven.cpu_s, seven.max_rss_bytes) == (7.0, 14.0, 7.0, 300 * 1024**2)
    assert acct.usage["8"].core_s == 10.0  # pending again: what its first run used

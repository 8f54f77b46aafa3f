"""The batch script's requeue helper (mnist_hpc/contract/requeue.py) and the job's side of it, without Slurm.

The helper's lines are run by a real bash exactly as the launcher renders them, with a stand-in
``scontrol`` on the batch script's PATH that records what it was asked and answers as told. The
real cluster's case (a job whose Python has no scontrol) is in tests/test_slurm_requeue.py.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_hpc.compute.failures import NotRequeued
from mnist_hpc.compute.signals import hand_over, requeue_job
from mnist_hpc.contract import requeue

JOB_ID = "4242"


def fake_scontrol(bin_dir: Path, code: int, says: str = "") -> Path:
    """A ``scontrol`` that records its arguments in ``calls`` next to it and exits ``code``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {bin_dir / 'calls'}\necho '{says}' >&2\nexit {code}\n")
    script.chmod(0o755)
    return bin_dir / "calls"


def submitit_folder(tmp_path: Path) -> str:
    anchor = tmp_path / "my sweep's $HOME" / ".submitit"  # quoted into the batch script as it is
    anchor.mkdir(parents=True, mode=0o700)
    return str(anchor / "%A")


ASK_CODE = ("import sys; from mnist_hpc.contract.requeue import ask_batch_script; "
            "print('ANSWER', ask_batch_script(sys.argv[1], sys.argv[2], wait_s=20)); sys.exit(3)")


def run_batch_script(tmp_path: Path, folder: str, bin_dir: Path, command: str) -> subprocess.CompletedProcess:
    """The helper's setup lines, ``command``, then its teardown lines, in bash as a batch script runs them."""
    script = tmp_path / "batch.sh"
    script.write_text("\n".join(["#!/bin/bash", *requeue.setup_lines(folder), command, *requeue.teardown_lines()]) + "\n")
    env = {**os.environ, "SLURM_JOB_ID": JOB_ID, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=env)


def job_command(folder: str) -> str:
    return f"{sys.executable} -c \"{ASK_CODE}\" {shlex.quote(folder)} $SLURM_JOB_ID"


def test_the_helper_requeues_the_job_that_asks_and_the_script_keeps_the_commands_exit_status(tmp_path):
    folder = submitit_folder(tmp_path)
    calls = fake_scontrol(tmp_path / "bin", 0)
    done = run_batch_script(tmp_path, folder, tmp_path / "bin", job_command(folder))
    assert "ANSWER None" in done.stdout, done.stdout + done.stderr
    assert calls.read_text() == f"requeue {JOB_ID}\n"
    assert done.returncode == 3  # the job's own status, not the teardown's
    assert os.listdir(Path(folder).parent) == []  # the FIFOs are gone


def test_slurms_refusal_comes_back_to_the_job_in_slurms_words(tmp_path):
    folder = submitit_folder(tmp_path)
    fake_scontrol(tmp_path / "bin", 1, "scontrol: error: Requested operation is presently disabled for job 4242")
    done = run_batch_script(tmp_path, folder, tmp_path / "bin", job_command(folder))
    assert "ANSWER the batch script asked Slurm, which refused: scontrol: error: Requested operation is presently disabled for job 4242" in done.stdout


def test_a_job_that_does_not_ask_is_not_requeued_and_the_helper_ends_with_the_script(tmp_path):
    folder = submitit_folder(tmp_path)
    calls = fake_scontrol(tmp_path / "bin", 0)
    # The command ends while the helper waits; a helper left behind would keep the pipe open and hang the run.
    done = run_batch_script(tmp_path, folder, tmp_path / "bin", "true")
    assert done.returncode == 0 and not calls.exists()
    assert os.listdir(Path(folder).parent) == []


def test_without_a_helper_the_job_is_told_at_once(tmp_path):
    folder = submitit_folder(tmp_path)
    assert "the batch script has no requeue helper" in requeue.ask_batch_script(folder, JOB_ID)
    base = requeue.fifo_base(folder, JOB_ID)
    for suffix in (requeue.ASK_SUFFIX, requeue.ANSWER_SUFFIX):
        os.mkfifo(f"{base}{suffix}", 0o600)
    # FIFOs left by a batch script whose helper is gone: nothing reads the request.
    assert "requeue helper is not running" in requeue.ask_batch_script(folder, JOB_ID)


def test_a_fifo_others_may_write_is_refused(tmp_path):
    folder = submitit_folder(tmp_path)
    base = requeue.fifo_base(folder, JOB_ID)
    os.mkfifo(f"{base}{requeue.ANSWER_SUFFIX}")
    os.chmod(f"{base}{requeue.ANSWER_SUFFIX}", 0o622)
    assert "not this user's alone" in requeue.ask_batch_script(folder, JOB_ID)


@pytest.mark.parametrize("scontrol", ["missing", "exit127"])
def test_requeue_job_asks_the_batch_script_only_when_scontrol_cannot_run_here(tmp_path, monkeypatch, scontrol):
    folder = submitit_folder(tmp_path)
    job_bin = tmp_path / "job-bin"
    job_bin.mkdir()
    if scontrol == "exit127":  # as in the issue: a scontrol in the image that cannot run
        fake_scontrol(job_bin, 127, "scontrol: error while loading shared libraries")
    monkeypatch.setenv("PATH", str(job_bin))
    assert "no batch script of the launcher's" in requeue_job(JOB_ID, None)
    said = requeue_job(JOB_ID, folder)
    assert said.startswith("scontrol cannot run here") and "the batch script has no requeue helper" in said


def test_requeue_job_takes_slurms_refusal_as_final(tmp_path, monkeypatch):
    folder = submitit_folder(tmp_path)
    fake_scontrol(tmp_path / "bin", 1, "scontrol: error: Job has already finished")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert requeue_job(JOB_ID, folder) == "Slurm refused: scontrol: error: Job has already finished"


def test_hand_over_returns_the_one_line_when_submitits_requeue_fails_and_no_helper_answers(tmp_path, monkeypatch):
    folder = submitit_folder(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("SLURM_JOB_ID", JOB_ID)
    monkeypatch.setenv("SUBMITIT_FOLDER", folder)

    def submitit_handler(signum, frame):  # as submitit's, after it wrote the resubmission
        subprocess.check_call(["scontrol", "requeue", JOB_ID])

    error = hand_over(signal.SIGUSR2, submitit_handler, chief=True)
    assert isinstance(error, NotRequeued)
    assert str(error).startswith(f"Slurm job {JOB_ID} was not requeued: scontrol cannot run here (")
    assert "the batch script has no requeue helper" in str(error) and "\n" not in str(error)


def test_hand_over_leaves_other_failures_of_submitits_handler_alone(tmp_path, monkeypatch):
    """Only its scontrol failing is retried: a resubmission that could not be written is not requeued."""
    calls = fake_scontrol(tmp_path / "bin", 0)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("SLURM_JOB_ID", JOB_ID)

    def submitit_handler(signum, frame):
        raise OSError(28, "No space left on device", str(tmp_path / "x_submitted.pkl"))

    with pytest.raises(OSError, match="No space left"):
        hand_over(signal.SIGUSR2, submitit_handler, chief=True)
    assert not calls.exists()


def test_submitit_writes_the_resubmission_before_its_requeue_fails(tmp_path, monkeypatch):
    """Pins what hand_over relies on: submitit's USR2 handler checkpoints first, then its
    ``scontrol requeue`` raises (here: not on PATH), so a second requeue resumes the job."""
    import submitit
    from submitit.core import job_environment
    from submitit.core.utils import JobPaths
    from submitit.slurm.slurm import SlurmJobEnvironment

    class Resumable:
        def __call__(self):
            return 1

        def checkpoint(self):
            return submitit.helpers.DelayedSubmission(Resumable())

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("SLURM_JOB_ID", JOB_ID)
    paths = JobPaths(tmp_path / "folder", job_id=JOB_ID)
    paths.folder.mkdir()
    delayed = submitit.helpers.DelayedSubmission(Resumable())
    delayed.set_timeout(10, 3)
    handler = job_environment.SignalHandler(SlurmJobEnvironment(), paths, delayed)
    with pytest.raises(FileNotFoundError):
        handler.checkpoint_and_try_requeue(signal.SIGUSR2)
    resubmission = submitit.helpers.DelayedSubmission.load(paths.submitted_pickle)
    assert isinstance(resubmission.function, Resumable)


def test_a_run_started_by_hand_without_scontrol_ends_with_one_line_saying_how_to_resume(tmp_path, monkeypatch, caplog):
    from mnist_hpc import rundir
    from mnist_hpc.compute.run import finish_in_process
    from mnist_hpc.compute.signals import TrainingInterrupted

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    stop = TrainingInterrupted(signal.SIGUSR2, 2, 17, rundir.checkpoint_path(tmp_path, 2, 17))
    with pytest.raises(SystemExit) as ended:
        finish_in_process(stop, tmp_path, job_id=JOB_ID, chief=True)
    assert ended.value.code == 128 + signal.SIGUSR2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"Slurm job {JOB_ID} was not requeued: scontrol cannot run here (" in line
    assert line.endswith(f"To resume, run the same command again with hydra.run.dir={tmp_path} "
                         "(sbatch scripts: keep #SBATCH --requeue so that Slurm can requeue it)")

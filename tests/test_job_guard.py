"""No one else can make your job run their code (mnist_hpc.contract.guard).

Unit tests of the check at its boundaries (each mode bit, the owner, links, file types, the
folders above the anchor), of private creation on the login node, of the guarded job command
(refusal before unpickling, the requeue pickle, the user's umask) and of the other paths that
unpickle (LaunchContext.load, JobEntry); then two real Unix users in a group project directory
(root:group 2775, umask 002), on the real Slurm cluster and with the local launcher: the second
user cannot touch the first one's job files, and when they have been made group-writable by hand
and the second user replaces a job's pickle (or the launch pickle, or the whole folder) with one
that would run code, the job refuses before unpickling, ends FAILED and says why, and an
untouched job of the same submission trains to the end.
"""

from __future__ import annotations

import grp
import json
import os
import pickle
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from mnist_hpc import rundir
from mnist_hpc.contract import guard
from mnist_hpc.contract.guard import UnsafeJobFile
from tests.helpers import (
    GROUP,
    REPO,
    SYSTEM_PYTHON,
    TRAIN,
    USERS,
    ensure_job_venv,
    ensure_users,
    fill_cache,
    need,
    precondition,
    slurm_associate,
    tiny_overrides,
)

# --- a private job folder, as the launcher leaves it -----------------------------------------------


class Marker:
    """What an attacker's pickle does when unpickled: create ``path`` (a directory)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


def job_tree(tmp_path: Path, content: Any = "the job") -> tuple[Path, Path]:
    """``<tmp>/sweep/.submitit/12/12_submitted.pkl`` created 0700/0600; returns (anchor, pickle)."""
    anchor = tmp_path / "sweep" / ".submitit"
    with guard.private_umask():
        (anchor / "12").mkdir(parents=True)
        target = anchor / "12" / "12_submitted.pkl"
        target.write_bytes(pickle.dumps(content))
    return anchor, target


def other_uid() -> int:
    return pwd.getpwnam("nobody").pw_uid


def test_a_private_file_is_read_from_the_descriptor_that_was_checked(tmp_path: Path) -> None:
    anchor, target = job_tree(tmp_path)
    assert guard.load_private(target, anchor) == "the job"
    fd = guard.open_private(target, anchor)
    try:
        # Swapped after the check (a folder moved away, another put in its place): what is read
        # is still what was checked.
        (anchor / "12").rename(anchor / "12-moved")
        (anchor / "12").mkdir(mode=0o700)
        (anchor / "12" / "12_submitted.pkl").write_bytes(pickle.dumps("swapped in"))
        with os.fdopen(fd, "rb") as fh:
            assert pickle.load(fh) == "the job"
    except BaseException:
        os.close(fd)
        raise


BITS = [0o400, 0o200, 0o100, 0o040, 0o020, 0o010, 0o004, 0o002, 0o001, 0o4000, 0o2000, 0o1000]


@pytest.mark.parametrize("bit", BITS, ids=[f"{b:04o}" for b in BITS])
@pytest.mark.parametrize("where", ["pickle", "job folder", "anchor"])
def test_each_mode_bit(tmp_path: Path, where: str, bit: int) -> None:
    """Only group and other write are refused, on the file and on every folder from the anchor down."""
    anchor, target = job_tree(tmp_path)
    path = {"pickle": target, "job folder": target.parent, "anchor": anchor}[where]
    base = 0o600 if where == "pickle" else 0o700
    os.chmod(path, base | bit)
    if bit & 0o022:
        with pytest.raises(UnsafeJobFile) as refused:
            guard.load_private(target, anchor)
        message = str(refused.value)
        assert message.startswith(f"{path} is writable by ") and f"(mode {base | bit:04o})" in message
        assert ("its group" in message) == bool(bit & 0o020) and ("all users" in message) == bool(bit & 0o002)
        fix = f"chmod go-w {path}" if where != "pickle" else "Submit the job again"
        assert fix in message
    else:
        assert guard.load_private(target, anchor) == "the job"


@pytest.mark.parametrize("where", ["pickle", "job folder", "anchor"])
def test_another_owner_is_refused_and_named(tmp_path: Path, where: str) -> None:
    anchor, target = job_tree(tmp_path, Marker(tmp_path / "marker"))
    path = {"pickle": target, "job folder": target.parent, "anchor": anchor}[where]
    os.chown(path, other_uid(), -1)
    with pytest.raises(UnsafeJobFile, match=f"^{path} belongs to nobody, not to root who runs this job"):
        guard.load_private(target, anchor)
    os.chown(path, 4242, -1)  # a uid without a name
    with pytest.raises(UnsafeJobFile, match=f"^{path} belongs to uid 4242"):
        guard.load_private(target, anchor)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("where", ["pickle", "job folder", "anchor"])
def test_a_symbolic_link_is_refused_even_to_a_private_file(tmp_path: Path, where: str) -> None:
    anchor, target = job_tree(tmp_path)
    path = {"pickle": target, "job folder": target.parent, "anchor": anchor}[where]
    moved = path.with_name(path.name + "-real")
    path.rename(moved)
    path.symlink_to(moved)
    with pytest.raises(UnsafeJobFile, match=f"^{path} is a symbolic link \\(to {moved}\\)"):
        guard.load_private(target, anchor)


def test_what_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path) -> None:
    anchor, target = job_tree(tmp_path)
    target.unlink()
    os.mkfifo(target, 0o600)  # opening it for reading would block if it were not refused first
    with pytest.raises(UnsafeJobFile, match="is not a regular file"):
        guard.load_private(target, anchor)
    target.unlink()
    target.mkdir(mode=0o700)
    with pytest.raises(UnsafeJobFile, match="is not a regular file"):
        guard.load_private(target, anchor)
    shutil.rmtree(anchor / "12")
    (anchor / "12").write_bytes(b"")
    os.chmod(anchor / "12", 0o600)
    with pytest.raises(UnsafeJobFile, match=f"^{anchor / '12'} is not a folder"):
        guard.load_private(target, anchor)


def test_a_missing_file_is_not_a_refusal(tmp_path: Path) -> None:
    anchor, target = job_tree(tmp_path)
    target.unlink()
    with pytest.raises(FileNotFoundError):
        guard.open_private(target, anchor)
    shutil.rmtree(anchor)
    with pytest.raises(FileNotFoundError):
        guard.open_private(target, anchor)


def test_folders_above_the_anchor_are_not_checked(tmp_path: Path) -> None:
    """The sweep and project directories are group-writable by design (see the module's docstring)."""
    anchor, target = job_tree(tmp_path)
    os.chmod(anchor.parent, 0o777)
    os.chown(anchor.parent, other_uid(), -1)
    assert guard.load_private(target, anchor) == "the job"


# --- created private on the login node --------------------------------------------------------------


def test_private_submission_creates_private_files_and_hands_the_users_umask_to_the_jobs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_UMASK", raising=False)
    old = os.umask(0o002)
    try:
        with guard.private_submission():
            (tmp_path / "d").mkdir()
            (tmp_path / "f").write_text("x")
            assert os.environ["SLURM_UMASK"] == "0002"
        assert "SLURM_UMASK" not in os.environ and os.umask(0o002) == 0o002
        monkeypatch.setenv("SLURM_UMASK", "0027")  # set by an enclosing job: sbatch would use it, so do we
        with guard.private_submission():
            assert os.environ["SLURM_UMASK"] == "0027"
        assert os.environ["SLURM_UMASK"] == "0027"
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600


def group_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    os.chmod(project, 0o2775)
    return project


def test_private_folder_creates_takes_over_or_refuses(tmp_path: Path) -> None:
    project = group_project(tmp_path)
    old = os.umask(0o002)
    try:
        root = project / "sweep" / ".submitit"
        assert guard.private_folder(root) is None
        assert stat.S_IMODE(root.stat().st_mode) & 0o777 == 0o700
        assert stat.S_IMODE(root.parent.stat().st_mode) & 0o777 == 0o775  # the sweep dir as usual
        os.chmod(root, 0o2775)  # made group-writable by hand (or by an older version)
        notice = guard.private_folder(root)
        assert notice is not None and str(root) in notice and "2775" in notice
        assert stat.S_IMODE(root.stat().st_mode) == 0o2755
        os.chown(root, other_uid(), -1)
        with pytest.raises(UnsafeJobFile, match="belongs to nobody"):
            guard.private_folder(root)
        os.chown(root, 0, -1)
        link = project / "elsewhere" / ".submitit"
        link.parent.mkdir()
        link.symlink_to(root)
        with pytest.raises(UnsafeJobFile, match="symbolic link"):
            guard.private_folder(link)
    finally:
        os.umask(old)


def test_the_launcher_refuses_before_queueing_a_submitit_folder_it_cannot_make_private(tmp_path: Path, capsys) -> None:
    from mnist_hpc.login.launcher.plan import PreflightError
    from mnist_hpc.login.launcher.submit import make_private

    theirs = tmp_path / "theirs" / ".submitit"
    theirs.mkdir(parents=True, mode=0o777)
    os.chown(theirs, other_uid(), -1)
    with pytest.raises(PreflightError, match=f"^nothing was queued: {theirs} belongs to nobody"):
        make_private(theirs)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PreflightError, match="^nothing was queued: cannot make the submitit folder .*a-file/.submitit"):
        make_private(tmp_path / "a-file" / ".submitit")
    mine = tmp_path / "mine" / ".submitit"
    mine.mkdir(parents=True)
    os.chmod(mine, 0o777)
    make_private(mine)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755 and f"made {mine} writable by you alone" in capsys.readouterr().out


def test_the_launch_pickle_is_written_private_and_refused_when_it_is_not(tmp_path: Path) -> None:
    from mnist_hpc.contract.tasks import LaunchContext

    project = group_project(tmp_path)
    path = project / "sweep" / ".submitit" / "launch-1.pkl"
    old = os.umask(0o002)
    try:
        LaunchContext(path, hydra_context="ctx", task_function="fn", singleton_state="st").save()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o777 == 0o700
    assert LaunchContext(path).load() == ("ctx", "fn", "st")

    marker = tmp_path / "marker"
    path.write_bytes(pickle.dumps(Marker(marker)))
    os.chmod(path, 0o620)
    with pytest.raises(UnsafeJobFile, match=f"^{path} is writable by its group"):
        LaunchContext(path).load()
    assert not marker.exists()


# --- the job's command ------------------------------------------------------------------------------


def job_env(job_id: str, **extra: str) -> dict[str, str]:
    """A local submitit task's environment (what submitit's local controller gives it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT_", "SLURM_"))}
    env.update(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID=job_id, SUBMITIT_LOCAL_NTASKS="1", SUBMITIT_LOCAL_LOCALID="0",
               SUBMITIT_LOCAL_GLOBALID="0", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
               PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def submitted(tmp_path: Path, fn: Any, *args: Any) -> tuple[Path, Path]:
    """A job folder as the launcher leaves it, its pickle a submitit DelayedSubmission of ``fn(*args)``."""
    from submitit.core.utils import DelayedSubmission

    anchor, target = job_tree(tmp_path)
    delayed = DelayedSubmission(fn, *args)
    delayed.set_timeout(5, 3)
    with guard.private_umask():
        delayed.dump(target)
    return anchor, target


def run_guard(anchor: Path, job_id: str = "12", umask: int = 0o077, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """The job's command as submitit's executors run it (from ``cwd``, started with ``umask``: the local controller's 077)."""
    command = shlex.split(guard.guarded_python(shlex.quote(sys.executable))) + ["-u", "-m", guard.SUBMIT_MODULE, str(anchor / "%j")]
    return subprocess.run(command, env=job_env(job_id, **env), capture_output=True, text=True, timeout=120,
                          cwd=cwd, umask=umask)


def result_of(anchor: Path, job_id: str = "12", mode: int = 0o600) -> tuple[str, Any]:
    """The job's result (``mode``: at most these bits; a job's own writes follow the user's umask)."""
    path = rundir.submitit_result_file(anchor / job_id, job_id)
    assert stat.S_IMODE(path.stat().st_mode) & ~mode == 0
    return pickle.loads(path.read_bytes())


def test_the_guarded_command_runs_a_private_job_with_the_users_umask(tmp_path: Path) -> None:
    """submitit sets the job up under umask 077; the job itself (JobEntry) runs with the user's."""
    import functools

    from mnist_hpc.contract.entry import JobEntry

    # os.umask returns the umask it replaces: the one the job ran with.
    anchor, _ = submitted(tmp_path, JobEntry(functools.partial(os.umask, 0o022), [tmp_path / "run"]))
    proc = run_guard(anchor, SLURM_UMASK="0002")
    assert proc.returncode == 0, proc.stderr
    assert result_of(anchor, mode=0o644) == ("success", 0o002)  # written after the probe set 022


def imported_tensorflow() -> bool:
    return "tensorflow" in sys.modules


def test_the_guarded_command_imports_no_tensorflow(tmp_path: Path) -> None:
    anchor, _ = submitted(tmp_path, imported_tensorflow)
    proc = run_guard(anchor)
    assert proc.returncode == 0, proc.stderr
    assert result_of(anchor) == ("success", False)


@pytest.mark.parametrize("attack", ["folder made group-writable", "pickle replaced by another user", "pickle is a link"])
def test_the_guarded_command_refuses_before_unpickling(tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "marker"
    anchor, target = job_tree(tmp_path, Marker(marker))
    if attack == "folder made group-writable":
        os.chmod(target.parent, 0o770)
        reason = f"{target.parent} is writable by its group"
    elif attack == "pickle replaced by another user":
        os.chown(target, other_uid(), -1)
        reason = f"{target} belongs to nobody"
    else:
        elsewhere = tmp_path / "evil.pkl"
        target.rename(elsewhere)
        target.symlink_to(elsewhere)
        reason = f"{target} is a symbolic link"
    proc = run_guard(anchor)
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"mnist-hpc: error: {reason}")
    assert not marker.exists()
    assert not rundir.submitit_result_file(anchor / "12", "12").exists()  # nothing of submitit's ran either


def test_a_refusal_inside_the_job_is_one_line_too(tmp_path: Path) -> None:
    """The launch pickle, refused once the job runs (LaunchContext.load): the same line, no traceback."""
    from mnist_hpc.contract.entry import JobEntry
    from mnist_hpc.contract.jobconfig import JobSpec
    from mnist_hpc.contract.tasks import LaunchContext, TrainTrial

    marker = tmp_path / "marker"
    launch = tmp_path / "sweep" / ".submitit" / "launch-1.pkl"
    trial = TrainTrial(LaunchContext(launch), JobSpec(0, [], [], 0), tmp_path / "sweep" / "0")
    anchor, _ = submitted(tmp_path, JobEntry(trial, [trial.run_dir]))
    launch.write_bytes(pickle.dumps(Marker(marker)))
    os.chmod(launch, 0o660)
    proc = run_guard(anchor)
    assert proc.returncode == 1 and not marker.exists() and "Traceback" not in proc.stderr
    # submitit and the job log their own lines; the error is one line of ours.
    assert [line for line in proc.stderr.splitlines() if line.startswith("mnist-hpc: error:")] == [f"mnist-hpc: error: {launch} is writable by its group root (mode 0660): someone "
                                        "may have changed it, and it would run as you. Submit the job again (the "
                                        "launcher writes job files 0600)"]


def test_the_guarded_command_checks_the_submission_script_too(tmp_path: Path) -> None:
    anchor, target = submitted(tmp_path, os.getpid)
    script = target.parent / "12_submission.sh"
    script.write_text("#!/bin/bash\n")
    os.chmod(script, 0o664)
    proc = run_guard(anchor)
    assert proc.returncode == 1 and proc.stderr.startswith(f"mnist-hpc: error: {script} is writable by its group")
    os.chmod(script, 0o600)
    assert run_guard(anchor).returncode == 0


def test_the_guarded_command_refuses_bad_usage() -> None:
    proc = subprocess.run([sys.executable, "-c", guard.JOB_COMMAND, "/some/folder"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -u -c ")
    assert proc.stderr.rstrip().endswith(" -u -m submitit.core._submit <submitit folder>")


@pytest.mark.parametrize("pythonpath", ["{repo}", "{repo}:", ":{repo}", "{repo}::"])
def test_modules_planted_in_the_jobs_working_directory_are_not_imported(tmp_path: Path, pythonpath: str) -> None:
    """A job works where it was submitted from (often the group project): its modules there do not run,
    also when an empty element of PYTHONPATH (``$PYTHONPATH:/lib`` while unset) names that directory."""
    anchor, _ = submitted(tmp_path, os.getpid)
    planted = tmp_path / "project"
    for name in ("mnist_hpc", "submitit", "numpy"):
        (planted / name).mkdir(parents=True)
        (planted / name / "__init__.py").write_text(f"import os\nos.mkdir({str(tmp_path / ('ran-' + name))!r})\n")
    proc = run_guard(anchor, cwd=planted, PYTHONPATH=pythonpath.format(repo=REPO))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == []


@pytest.mark.parametrize("value, queued", [(None, None), ("", None), (":", None), ("/a:", "/a"), (":/a", "/a"),
                                           ("/a::/b", "/a:/b"), ("/a:/b", "/a:/b")])
def test_jobs_are_queued_without_empty_pythonpath_elements(value: Optional[str], queued: Optional[str]) -> None:
    environ = {} if value is None else {"PYTHONPATH": value}
    assert guard.job_python_environ(environ) == {"PYTHONPATH": queued, "PYTHONSAFEPATH": "1"}


def test_private_submission_queues_with_a_safe_python_path_and_restores_the_users(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/lib:")
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    with guard.private_submission():
        assert (os.environ["PYTHONPATH"], os.environ["PYTHONSAFEPATH"]) == ("/lib", "1")
    assert os.environ["PYTHONPATH"] == "/lib:" and "PYTHONSAFEPATH" not in os.environ
    monkeypatch.setenv("PYTHONPATH", ":")
    with guard.private_submission():
        assert "PYTHONPATH" not in os.environ
    assert os.environ["PYTHONPATH"] == ":"


@pytest.mark.parametrize("value, cleaned", [(None, None), ("", None), (":", None), ("::/a:", "/a"), ("/a::/b:", "/a:/b"),
                                             ("/a", "/a"), ("-x:/a", "-x:/a")])
def test_a_batch_script_drops_the_empty_pythonpath_elements_its_setup_lines_made(value: Optional[str],
                                                                                 cleaned: Optional[str]) -> None:
    script = "\n".join([*guard.PYTHON_PATH_SETUP, 'echo "${PYTHONPATH-<unset>}|$PYTHONSAFEPATH"'])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if value is not None:
        env["PYTHONPATH"] = value
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30).stdout
    assert out == f"{cleaned if cleaned is not None else '<unset>'}|1\n"


@pytest.mark.slow  # a real local launch
def test_a_local_job_runs_no_sitecustomize_planted_where_it_was_submitted(synthetic_cache: Path, tmp_path: Path) -> None:
    """An empty PYTHONPATH element puts the working directory on sys.path while Python starts, before
    the guard runs: a ``sitecustomize.py`` there would run in submitit's controller and in the job.
    (The launcher itself is the user's own shell's business: the planted file records job processes only.)"""
    planted = tmp_path / "project"
    planted.mkdir()
    marker = tmp_path / "ran-sitecustomize"
    (planted / "sitecustomize.py").write_text(
        f"import os\nif 'SUBMITIT_EXECUTOR' in os.environ: open({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')\n")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [*TRAIN, "-m", "hydra/launcher=local", "hydra.launcher.wait=true", *tiny_overrides(synthetic_cache, tmp_path / "out"),
         f"hydra.sweep.dir={sweep}", "train.seed=0"],
        env={**os.environ, "PYTHONPATH": f"{REPO}:"}, cwd=planted, capture_output=True, text=True, timeout=600)
    precondition(proc.returncode == 0 and (sweep / "0" / rundir.METRICS_FILE).is_file(), proc.stderr[-2000:])
    assert not marker.exists(), f"sitecustomize ran in job processes {marker.read_text().split()}"


class RequeuedByHandOver:
    """A job stopped by the requeue signal, handed over to submitit as a training job is (signals.hand_over)."""

    def __call__(self) -> None:
        from mnist_hpc.compute.signals import StopRequest, hand_over

        raise hand_over(signal.SIGUSR2, StopRequest.handler_before(signal.SIGUSR2), chief=True)


def test_the_pickle_written_for_a_requeue_is_private_under_the_users_umask(tmp_path: Path) -> None:
    """submitit rewrites the job's pickle for its requeue while the job runs with the user's umask
    (002 here): hand_over makes that write private, so the requeued job accepts it."""
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    from mnist_hpc.contract.entry import JobEntry

    anchor, target = submitted(tmp_path, JobEntry(RequeuedByHandOver(), [tmp_path / "run"]))
    before = target.stat().st_ino
    proc = run_guard(anchor, SLURM_UMASK="0002")
    assert proc.returncode == LOCAL_REQUEUE_RETURN_CODE, proc.stderr
    assert target.stat().st_ino != before  # rewritten by submitit's checkpoint
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert run_guard(anchor, SLURM_UMASK="0002").returncode == LOCAL_REQUEUE_RETURN_CODE  # the requeued job accepts it


def test_a_job_started_without_the_guard_is_refused_before_its_payload(tmp_path: Path) -> None:
    """An older script run by hand starts plain submitit: JobEntry checks before unpickling its payload."""
    from submitit.core.utils import DelayedSubmission

    from mnist_hpc.contract.entry import JobEntry

    marker = tmp_path / "marker"
    anchor, target = job_tree(tmp_path)
    entry = JobEntry(Marker(marker), [tmp_path / "run"], versions={})
    with guard.private_umask():
        DelayedSubmission(entry).dump(target)
    os.chmod(anchor, 0o775)
    proc = subprocess.run([sys.executable, "-u", "-m", guard.SUBMIT_MODULE, str(anchor / "%j")], env=job_env("12"),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert f"mnist_hpc.contract.guard.UnsafeJobFile: {anchor} is writable by its group" in proc.stderr
    assert not marker.exists()


def test_status_takes_the_jobs_own_error_line(tmp_path: Path) -> None:
    from mnist_hpc.login import trials

    log = tmp_path / "x.err"
    refusal = "mnist-hpc: error: /s/.submitit is writable by its group g (mode 2775): ..."
    log.write_text(f"Traceback (most recent call last):\n  File \"a.py\"\nKeyError: 'an earlier attempt'\n{refusal}\n"
                   "srun: error: vm: task 0: Exited with exit code 1\n")
    assert trials.last_error_line(log) == refusal.removeprefix("mnist-hpc: error: ")
    log.write_text(f"{refusal}\nTraceback (most recent call last):\n  File \"b.py\"\nRuntimeError: later\n")
    assert trials.last_error_line(log) == "RuntimeError: later"


# --- two real users ----------------------------------------------------------------------------------
#
# User A submits from a group project directory (root:group 2775, umask 002); user B, in the same
# group, attacks. A's jobs run A's own venv (under /var/tmp: /root is private) with TensorFlow,
# so that an untouched job trains to the end. Jobs are held until the test has acted: Slurm's
# --hold, and for the local launcher a gate in the job's Python command (bin/gated-python below).


# What user B runs: try to touch A's job files, or replace them with a pickle that creates a marker.
ATTACK = r'''
import errno, json, os, pickle, sys


class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def evil(marker):
    return pickle.dumps(Marker(marker))


def attempt(fn):
    try:
        fn()
        return "done"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


action, args = sys.argv[1], sys.argv[2:]
if action == "try":  # A's job pickle, A's launch pickle, A's submitit folder, B's own file
    job, launch, anchor, own = args
    print(json.dumps({
        "write the job pickle": attempt(lambda: open(job, "r+b").close()),
        "add a file beside it": attempt(lambda: open(os.path.join(os.path.dirname(job), "b.pkl"), "xb").close()),
        "replace the launch pickle": attempt(lambda: os.replace(own, launch)),
        "list the submitit folder": attempt(lambda: os.listdir(anchor)),
    }))
elif action == "evil":  # a file of B's own
    with open(args[0], "wb") as fh:
        fh.write(evil(args[1]))
elif action == "replace":  # B's new file in place of A's
    with open(args[0] + ".b", "wb") as fh:
        fh.write(evil(args[1]))
    os.replace(args[0] + ".b", args[0])
elif action == "overwrite":  # A's file, rewritten in place (it stays A's)
    with open(args[0], "r+b") as fh:
        fh.truncate(0)
        fh.write(evil(args[1]))
elif action == "link":  # a symbolic link to B's file in place of A's
    os.symlink(args[1], args[0] + ".b")
    os.replace(args[0] + ".b", args[0])
elif action == "swap":  # A's whole submitit folder moved away (its parent is group-writable), B's put in its place
    anchor, job, marker = args
    os.rename(anchor, anchor + "-moved")
    os.makedirs(os.path.dirname(job))
    for folder in (anchor, os.path.dirname(job)):
        os.chmod(folder, 0o777)  # A's job must be able to write its logs there for the trap to work
    with open(job, "wb") as fh:
        fh.write(evil(marker))
'''

CHMOD = "import os, sys; [os.chmod(p, eval(sys.argv[1])(os.stat(p).st_mode)) for p in sys.argv[2:]]"
A, B = USERS


class JobFiles:
    """One queued trial's job as its job.json names it."""

    def __init__(self, record: dict) -> None:
        self.id = record["job_id"]
        self.folder = Path(record["submitit_folder"])
        self.pickle = self.folder / f"{self.id}_submitted.pkl"
        self.stderr = Path(record["stderr"])
        self.result = rundir.submitit_result_file(self.folder, self.id)
        self.run_dir = Path(record["run_dir"])

    def error_lines(self) -> list[str]:
        text = self.stderr.read_text()
        assert "Traceback" not in text, text[-3000:]
        return [line for line in text.splitlines() if line.startswith("mnist-hpc: error:")]


class People:
    """Users A and B, a readable copy of this checkout, A's venv, and the jobs A queues."""

    def __init__(self, base: Path, python: Path) -> None:
        self.base, self.python = base, python
        self.src = base / "src"
        for part in ("mnist_hpc", "conf", "hydra_plugins"):
            shutil.copytree(REPO / part, self.src / part, ignore=shutil.ignore_patterns("__pycache__"))
        self.gates = base / "gates"
        self.gates.mkdir(mode=0o755)
        (base / "attack.py").write_text(ATTACK)
        for user in USERS:
            home = base / f"home-{user}"
            home.mkdir()
            os.chown(home, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        self.queued: list[tuple[str, str]] = []

    def home(self, user: str) -> Path:
        return self.base / f"home-{user}"

    def run(self, user: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home(user)), "PYTHONPATH": str(self.src),
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", "MNIST_HPC_TEST_GATE": str(self.gates)}
        # Files, not pipes: local jobs inherit the launcher's descriptors and would hold a pipe open.
        out, err = self.home(user) / "out.txt", self.home(user) / "err.txt"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.run([str(self.python), *args], user=user, group=user, extra_groups=[GROUP], umask=0o002,
                                  env=env, cwd=self.home(user), stdout=fo, stderr=fe, timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())

    def attack(self, *args: str) -> subprocess.CompletedProcess:
        proc = self.run(B, str(self.base / "attack.py"), *args)
        assert proc.returncode == 0, proc.stderr
        return proc

    def chmod(self, user: str, change: str, *paths: Path) -> None:
        proc = self.run(user, "-c", CHMOD, change, *map(str, paths))
        assert proc.returncode == 0, proc.stderr

    def submit(self, launcher: str, sweep: Path, cache: Path, *overrides: str) -> list[JobFiles]:
        """A queues a sweep, held (Slurm) or gated (local) until the test releases each job."""
        args = ["-c", "from mnist_hpc.cli import train_main; train_main()", "-m", f"hydra/launcher={launcher}",
                f"hydra.sweep.dir={sweep}", *tiny_overrides(cache, sweep.parent / "out"), "hydra.launcher.trials_per_task=1",
                *overrides]
        if launcher == "slurm":
            slurm_associate(A)  # a user made since the cluster started has no association yet
            args += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10",
                     "+hydra.launcher.additional_parameters.hold=true"]
        proc = self.run(A, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = sorted(sweep.glob(f"*/{rundir.JOB_FILE}"), key=lambda p: int(p.parent.name))
        jobs = [JobFiles(json.loads(p.read_text())) for p in files]
        self.queued += [(launcher, job.id) for job in jobs]
        return jobs

    def release(self, launcher: str, *jobs: JobFiles) -> None:
        for job in jobs:
            if launcher == "slurm":
                subprocess.run(["scontrol", "release", job.id], check=True, capture_output=True, timeout=30)
            else:
                (self.gates / job.id).touch()

    def wait(self, launcher: str, *jobs: JobFiles, timeout_s: float = 600) -> None:
        """Until each job has ended: Slurm's accounting, or the result file a local job's process leaves."""
        if launcher == "slurm":
            from tests.helpers import wait_for_states

            wait_for_states([job.id for job in jobs], timeout_s=timeout_s)
            return
        from mnist_hpc import claim, rundir

        me = claim.Holder.this_process()
        holders = [claim.job_holder(rundir.read_job(job.run_dir)) for job in jobs]
        deadline = time.monotonic() + timeout_s
        while not all(claim.alive(holder, me) is False for holder in holders):
            assert time.monotonic() < deadline, f"local jobs {[j.id for j in jobs]} did not end in {timeout_s} s"
            time.sleep(0.5)

    def status(self, user: str, sweep: Path) -> list[dict]:
        proc = self.run(user, "-m", "mnist_hpc.login.status", "--json", str(sweep))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def stop_all(self) -> None:
        """Cancel what is left of the test's jobs (Slurm), or end their processes by id (local)."""
        slurm_ids = [job_id for launcher, job_id in self.queued if launcher == "slurm"]
        if slurm_ids:
            subprocess.run(["scancel", *slurm_ids], capture_output=True, timeout=60)
        for launcher, job_id in self.queued:
            if launcher == "local":
                try:
                    os.kill(int(job_id), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def people() -> Iterator[People]:
    need(os.geteuid() == 0, "creating users needs root")
    need(SYSTEM_PYTHON.exists() and shutil.which("useradd") is not None, "needs /usr/bin/python3 and useradd")
    ensure_users()
    python = ensure_job_venv()
    base = Path(tempfile.mkdtemp(prefix="mnist-hpc-guard-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    crew = People(base, python)
    try:
        yield crew
    finally:
        crew.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def owner_and_mode(path: Path) -> tuple[str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode) & 0o777


@pytest.mark.parametrize("launcher", [pytest.param("slurm", marks=pytest.mark.slurm), "local"])
@pytest.mark.slow
def test_another_user_cannot_make_your_jobs_run_their_code(people: People, launcher: str) -> None:
    project = people.base / "project"
    project.mkdir()
    os.chown(project, 0, grp.getgrnam(GROUP).gr_gid)
    os.chmod(project, 0o2775)
    cache = project / "cache"
    fill_cache(cache)
    subprocess.run(["chmod", "-R", "a+rX", str(cache)], check=True)
    markers = [project / f"ran-code-of-{B}-{n}" for n in range(5)]

    # Sweep 1: five trials (four attacked, one left alone); sweep 2: its launch pickle attacked;
    # sweep 3: its whole submitit folder swapped for B's.
    jobs = people.submit(launcher, project / "sweep1", cache, "train.seed=0,1,2,3,4")
    [launched] = people.submit(launcher, project / "sweep2", cache)
    [swapped] = people.submit(launcher, project / "sweep3", cache)
    anchor, anchor2, anchor3 = (project / f"sweep{n}" / ".submitit" for n in (1, 2, 3))
    [launch] = anchor.glob("launch-*.pkl")
    [launch2] = anchor2.glob("launch-*.pkl")
    folders = sorted({job.folder for job in jobs})

    # Created private whatever A's umask (002), in a setgid group directory.
    for folder in [anchor, *folders]:
        assert owner_and_mode(folder) == (A, 0o700)
    scripts = sorted(anchor.rglob("*_submission.sh")) if launcher == "slurm" else []
    assert len(scripts) == (1 if launcher == "slurm" else 0)
    for path in [launch, *(job.pickle for job in jobs), *scripts]:
        assert owner_and_mode(path) == (A, 0o600)
    assert owner_and_mode(anchor.parent) == (A, 0o775)  # the sweep directory itself as before

    # B can neither change nor replace nor even see them.
    own = people.base / f"home-{B}" / "evil.pkl"
    people.attack("evil", str(own), str(markers[0]))
    tried = json.loads(people.attack("try", str(jobs[0].pickle), str(launch), str(anchor), str(own)).stdout)
    assert tried == dict.fromkeys(tried, "EACCES") and len(tried) == 4

    # A makes the folders group-writable by hand (and one pickle); B replaces what A's jobs unpickle.
    people.chmod(A, "lambda m: m | 0o070", anchor, *folders)
    people.chmod(A, "lambda m: m | 0o060", jobs[2].pickle)
    people.attack("replace", str(jobs[1].pickle), str(markers[1]))
    people.attack("overwrite", str(jobs[2].pickle), str(markers[2]))
    people.attack("link", str(jobs[3].pickle), str(own))
    people.chmod(A, "lambda m: m | 0o070", anchor2)
    people.attack("replace", str(launch2), str(markers[3]))
    people.attack("swap", str(anchor3), str(swapped.pickle), str(markers[4]))

    # A job released while its folder is group-writable refuses it.
    people.release(launcher, jobs[0])
    people.wait(launcher, jobs[0])
    assert jobs[0].error_lines() == [
        f"mnist-hpc: error: {anchor} is writable by its group {GROUP} (mode {stat.S_IMODE(anchor.stat().st_mode):04o}): "
        "they could replace what this job "
        f"runs. Make it yours alone (`chmod go-w {anchor}`) and submit the job again"
    ]

    # A follows that advice for the folders; the files B touched are refused one by one, the
    # untouched trial trains.
    people.chmod(A, "lambda m: m & ~0o022", anchor, *folders, anchor2)
    people.release(launcher, *jobs[1:], launched, swapped)
    people.wait(launcher, *jobs[1:], launched, swapped)
    expected = {
        jobs[1]: f"{jobs[1].pickle} belongs to {B}, not to {A} who runs this job",
        jobs[2]: f"{jobs[2].pickle} is writable by its group {GROUP} (mode 0660)",
        jobs[3]: f"{jobs[3].pickle} is a symbolic link (to {own})",
        launched: f"{launch2} belongs to {B}, not to {A} who runs this job",
        swapped: f"{anchor3} belongs to {B}, not to {A} who runs this job",
    }
    for job, reason in expected.items():
        [line] = job.error_lines()
        assert line.startswith(f"mnist-hpc: error: {reason}"), line
    assert not [m for m in markers if m.exists()], "a job unpickled B's code"

    # Status (as A) shows each refused job FAILED with its line; the untouched one COMPLETED,
    # its run directory still shared with the group (the job ran with A's umask, not 077).
    rows = people.status(A, project / "sweep1")
    shown = [line.removeprefix("mnist-hpc: error: ") for job in jobs[:4] for line in job.error_lines()]
    assert [(r["state"], r["error"]) for r in rows] == [*(("FAILED", line) for line in shown), ("COMPLETED", None)]
    assert rows[4]["last_epoch"] == 1
    for sweep, job in ((project / "sweep2", launched), (project / "sweep3", swapped)):
        [row] = people.status(A, sweep)
        assert (row["state"], row["error"]) == ("FAILED", job.error_lines()[0].removeprefix("mnist-hpc: error: "))
    assert owner_and_mode(jobs[4].run_dir / rundir.METRICS_FILE) == (A, 0o664)
    if launcher == "slurm":
        from tests.helpers import sacct_states

        states = sacct_states([job.id for job in [*jobs, launched, swapped]])
        assert [states[job.id] for job in [*jobs, launched, swapped]] == ["FAILED"] * 4 + ["COMPLETED", "FAILED", "FAILED"]
    # B's status of A's sweep works (A's job folders are closed to B, not an error).
    assert len(people.status(B, project / "sweep1")) == 5


# --- second hostile pass (I12): a folder swapped in between the check and submitit's open ------------
# The job's pickle was checked by name, then submitit opened it again by name: a group member who
# swapped the whole .submitit (renameat2 RENAME_EXCHANGE, in a loop) won about one start in six.
# guard.pin_folder hands submitit the checked folder through its descriptor. And a waiting launcher
# read each job's result pickle by name, unchecked, on the login node: it now only waits.

RACE_A, RACE_B = USERS
ATTEMPTS = 40  # before pin_folder one attempt in five to seven won; 0.86**40 < 0.003

# Run by A: a private job folder as the launcher leaves it (0700/0600), its pickle a harmless job.
RACE_MAKE_JOB = r'''
import os, sys
from pathlib import Path
from submitit.core.utils import DelayedSubmission
from mnist_hpc.contract import guard
anchor = Path(sys.argv[1])
anchor.parent.mkdir(parents=True)  # the sweep directory, under the user's umask (the launch lock makes it so)
with guard.private_umask():
    (anchor / "12").mkdir(parents=True)
    delayed = DelayedSubmission(os.getpid)
    delayed.set_timeout(5, 3)
    delayed.dump(anchor / "12" / "12_submitted.pkl")
'''

# Run by B: a folder of B's own holding a pickle that makes a directory when unpickled, then the
# swap loop (its own folder and A's exchanged in one atomic step, again and again).
RACE_ATTACK = r'''
import ctypes, os, pickle, sys


class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


anchor, evil, marker, ready = sys.argv[1:5]
os.makedirs(os.path.join(evil, "12"))
for folder in (evil, os.path.join(evil, "12")):
    os.chmod(folder, 0o777)
with open(os.path.join(evil, "12", "12_submitted.pkl"), "wb") as fh:
    fh.write(pickle.dumps(Marker(marker)))
open(ready, "w").close()
libc = ctypes.CDLL(None, use_errno=True)
while True:
    if libc.renameat2(-100, anchor.encode(), -100, evil.encode(), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), "renameat2")
'''


def as_user(user: str, base: Path) -> dict:
    info = pwd.getpwnam(user)
    return dict(user=info.pw_uid, group=info.pw_gid, extra_groups=[GROUP], umask=0o002, cwd=str(base))


def test_a_group_member_swapping_the_submitit_folder_never_gets_their_pickle_unpickled() -> None:
    need(os.geteuid() == 0, "needs root to act as two real users")
    ensure_users()
    python = ensure_job_venv().parent / "python3"
    base = Path(tempfile.mkdtemp(prefix="mnist-hpc-hostile2-race-"))
    attacker = None
    try:
        os.chmod(base, 0o755)
        src = base / "src"
        shutil.copytree(REPO / "mnist_hpc", src / "mnist_hpc", ignore=shutil.ignore_patterns("__pycache__"))
        project = base / "project"
        project.mkdir()
        shutil.chown(project, group=GROUP)
        os.chmod(project, 0o2775)  # a group project directory
        markers = base / "markers"
        markers.mkdir()
        os.chmod(markers, 0o777)
        sweep, marker, ready = project / "sweep", markers / "ran-as-victim", markers / "ready"
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(base)}
        anchor = sweep / ".submitit"
        made = subprocess.run([str(python), "-c", RACE_MAKE_JOB, str(anchor)], env=env, capture_output=True, text=True,
                              **as_user(RACE_A, base))
        assert made.returncode == 0, made.stderr
        attacker = subprocess.Popen([str(python), "-c", RACE_ATTACK, str(anchor), str(sweep / ".submitit-b"), str(marker),
                                     str(ready)], env=env, stderr=subprocess.PIPE, text=True, **as_user(RACE_B, base))
        for _ in range(600):
            if ready.exists() or attacker.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        assert ready.exists(), attacker.stderr.read() if attacker.poll() is not None else "the attacker did not start"
        command = shlex.split(guard.guarded_python(shlex.quote(str(python)))) + ["-u", "-m", guard.SUBMIT_MODULE,
                                                                                 str(anchor / "%j")]
        job = {**job_env("12"), **env}
        outcomes = []
        for _ in range(ATTEMPTS):
            proc = subprocess.run(command, env=job, capture_output=True, text=True, timeout=120, **as_user(RACE_A, base))
            outcomes.append(proc.returncode)
            if marker.exists():
                break
            assert attacker.poll() is None, attacker.stderr.read()
        ran_as = pwd.getpwuid(marker.stat().st_uid).pw_name if marker.exists() else None
        assert ran_as is None, (f"after {len(outcomes)} job start(s) (exit codes {outcomes}), {RACE_B}'s pickle was unpickled "
                                f"by {RACE_A}'s job: it made {marker} as {ran_as}")
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        shutil.rmtree(base, ignore_errors=True)


# --- the waiting launcher reads the job's result from the same folder ---------------------------------


def test_a_group_member_cannot_make_a_waiting_launcher_unpickle_their_result(people) -> None:
    """``hydra.launcher.wait=true``: the launcher stays on the login node and, once a job has ended,
    unpickles its result (submitit's ``job.result()``, ``<anchor>/<id>/<id>_0_result.pkl``) by path. B swaps
    A's ``.submitit`` (in A's group-writable sweep directory) for a folder of B's own holding a result
    pickle. A's job refuses B's folder, as it should, and ends; then A's launcher reads the result."""
    import grp
    import json as json_
    import time

    from tests.helpers import fill_cache, tiny_overrides

    project = people.base / "project"
    project.mkdir()
    os.chown(project, 0, grp.getgrnam(GROUP).gr_gid)
    os.chmod(project, 0o2775)
    cache = project / "cache"
    fill_cache(cache)
    subprocess.run(["chmod", "-R", "a+rX", str(cache)], check=True)
    marker = project / f"ran-code-of-{B}"
    sweep = project / "sweep"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(people.home(A)), "PYTHONPATH": str(people.src),
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", "MNIST_HPC_TEST_GATE": str(people.gates)}
    out, err = people.home(A) / "wait-out.txt", people.home(A) / "wait-err.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        launcher = subprocess.Popen(
            [str(people.python), "-c", "from mnist_hpc.cli import train_main; train_main()", "-m", "hydra/launcher=local",
             "hydra.launcher.wait=true", f"hydra.sweep.dir={sweep}", *tiny_overrides(cache, project / "out"),
             "hydra.launcher.trials_per_task=1"],
            user=A, group=A, extra_groups=[GROUP], umask=0o002, env=env, cwd=people.home(A), stdout=fo, stderr=fe)
    try:
        deadline = time.monotonic() + 300
        while not (sweep / "0" / "job.json").is_file():
            assert launcher.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "A's launch queued nothing"
            time.sleep(0.2)
        job = JobFiles(json_.loads((sweep / "0" / "job.json").read_text()))
        people.queued.append(("local", job.id))
        people.attack("swap", str(sweep / ".submitit"), str(job.result), str(marker))
        people.release("local", job)
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    ran_as = pwd.getpwuid(marker.stat().st_uid).pw_name if marker.exists() else None
    assert ran_as is None, (f"A's waiting launcher unpickled {RACE_B}'s result pickle {job.result}: it made {marker} as "
                            f"{ran_as} (launcher exit {launcher.returncode}; its stderr ends: {err.read_text()[-800:]})")

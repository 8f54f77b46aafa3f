"""Known errors end a run in one line with the fix; bugs keep their traceback (issue 11, case 11)."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from mnist_hpc import claim, rundir
from mnist_hpc.cache import CacheCorruptError
from mnist_hpc.compute.failures import exit_on, known_error
from tests.helpers import TRAIN, TRAIN_CODE, run_login_command, sweep_args, tiny_overrides


@pytest.mark.parametrize(
    "exc, needle",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/scratch/run/model.keras"), "free space there"),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/scratch/run/x"), "raise your quota"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/run/x"), "set paths.output_root"),
        (OSError(errno.EACCES, "Permission denied", "/other/run/x"), "set paths.output_root"),
        (MemoryError(), "lower train.batch_size"),
        (CacheCorruptError("the cache changed; run `mnist-hpc-prefetch --force`"), "--force"),
        (claim.RunConflict("/r holds a run of another config"), "another config"),
    ],
)
def test_known_errors_become_one_line_with_the_fix(exc, needle, capsys):
    message = known_error(exc)
    assert message is not None and needle in message and "\n" not in message
    with pytest.raises(SystemExit) as ended:
        exit_on(exc)
    assert ended.value.code == 1
    err = capsys.readouterr().err
    assert err == f"mnist-hpc: error: {message}\n"


def test_a_bug_keeps_its_traceback():
    bug = KeyError("a bug")
    assert known_error(bug) is None
    with pytest.raises(KeyError):
        exit_on(bug)
    assert known_error(OSError(errno.EIO, "I/O error")) is None  # not one we know what to say about


def test_a_batch_larger_than_the_training_set_is_refused_before_queueing(synthetic_cache: Path, tmp_path: Path):
    proc, _ = run_login_command(
        TRAIN_CODE, sweep_args(synthetic_cache, tmp_path, "hydra/launcher=local", "train.batch_size=64,100000"), tmp_path
    )
    assert proc.returncode != 0 and "nothing was queued" in proc.stderr
    assert "trial 1: train.batch_size=100000 exceeds the 600 training samples; use at most 600" in proc.stderr
    assert not list((tmp_path / "sweep").rglob(rundir.JOB_FILE))


@pytest.mark.parametrize("procid, writes", [("0", True), ("1", False), (None, True)])
def test_an_unloadable_job_is_recorded_once_by_the_first_task(tmp_path, monkeypatch, procid, writes):
    """A job whose pickle cannot be loaded fails in every task; only the first writes failure.json."""
    from mnist_hpc.contract.entry import JobEntry

    entry = JobEntry(len, [tmp_path / "a", tmp_path / "b"])
    entry.payload = entry.payload.replace(b"len", b"nel")  # a name this environment lacks
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    if procid is None:
        monkeypatch.delenv("SLURM_PROCID", raising=False)
    else:
        monkeypatch.setenv("SLURM_PROCID", procid)
    with pytest.raises(SystemExit) as stop:
        entry()
    assert stop.value.code == 1
    for d in ("a", "b"):
        assert (tmp_path / d / rundir.FAILURE_FILE).exists() is writes
        if writes:
            assert "cannot be loaded" in rundir.read_failure(tmp_path / d)


# --- a run directory that cannot be written: one line before Hydra touches it (issue I8) --------


def read_only_mount(small_tmpfs, name: str, *entries: str) -> Path:
    """A tmpfs holding ``entries`` (empty directories), remounted read-only: root cannot write it either."""
    import subprocess

    point = small_tmpfs(name, "1m")
    for entry in entries:
        (point / entry).mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True)
    return point


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "override, target, setting, reason",
    [
        ("paths.output_root", "file", "paths.output_root", "{file} is not a directory"),
        ("paths.output_root", "ro", "paths.output_root", "Read-only file system"),
        ("paths.output_root", "ro/below", "paths.output_root", "Read-only file system"),
        ("hydra.run.dir", "file", "hydra.run.dir", "{file} is not a directory"),
        ("hydra.run.dir", "file/run", "hydra.run.dir", "{file} is not a directory"),
        ("hydra.run.dir", "ro", "hydra.run.dir", "Read-only file system"),
        ("hydra.run.dir", "ro/existing", "hydra.run.dir", "Read-only file system"),
    ],
)
def test_an_in_process_run_whose_directory_cannot_be_written_is_one_line(
    synthetic_cache, tmp_path, small_tmpfs, override, target, setting, reason
):
    ro = read_only_mount(small_tmpfs, "ro", "existing")
    file = tmp_path / "file"
    file.write_text("a user's file")
    work = tmp_path / "cwd"
    work.mkdir()
    before = listing(tmp_path)
    where = tmp_path / target
    args = [*tiny_overrides(synthetic_cache, tmp_path / "out"), f"{override}={where}"]
    proc, tf = run_login_command(TRAIN_CODE, args, work)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    run_dir = re.escape(str(where)) + (r"/runs/\d{4}-\d\d-\d\d/[\d-]+" if override == "paths.output_root" else "")
    expected = (
        rf"cannot write to the run directory {run_dir} \({re.escape(reason.format(file=file))}\); "
        rf"set {re.escape(setting)} to a writable location \(e\.g\. on \$SCRATCH\)"
    )
    assert len(lines) == 1 and re.fullmatch(expected, lines[0]), proc.stderr[-3000:]
    assert not tf  # refused before the task: TensorFlow never started
    # Nothing written: not into the mount, the file or the working directory (the probe's marker files aside).
    assert file.read_text() == "a user's file" and listing(ro) == ["existing"]
    assert [p for p in listing(tmp_path) if not p.startswith("cwd/tf-imported-")] == before


def test_a_multirun_whose_sweep_directory_cannot_be_written_is_one_line(synthetic_cache, tmp_path, small_tmpfs):
    """The launcher says so before queueing; Hydra's own (basic) launcher, which runs trials here, too."""
    ro = read_only_mount(small_tmpfs, "ro")
    file = tmp_path / "file"
    file.write_text("a user's file")
    args = ["-m", "hydra/launcher=local", *tiny_overrides(synthetic_cache, ro), f"hydra.sweep.dir={ro}/sweep", "train.seed=1,2"]
    proc, _ = run_login_command(TRAIN_CODE, args, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"nothing was queued: cannot write to the output directory {ro}/sweep (Read-only file system); "
            "set paths.output_root to a writable location") in proc.stderr
    proc, tf = run_login_command(TRAIN_CODE, ["-m", *tiny_overrides(synthetic_cache, file), "train.seed=1,2"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert re.fullmatch(rf"cannot write to the sweep directory {re.escape(str(file))}/sweeps/\S+ \({re.escape(str(file))} is "
                        r"not a directory\); set paths.output_root to a writable location \(e\.g\. on \$SCRATCH\)", line), line
    assert not tf and file.read_text() == "a user's file" and listing(ro) == []


def test_a_worker_task_is_refused_only_where_its_directory_cannot_be_created(tmp_path, small_tmpfs):
    """A task other than the first of an srun step writes nothing into the run directory: it is not
    probed there (no probe file of its own), but a directory it cannot create is one line too."""
    import subprocess

    from tests.local_workers import task_env

    ro = read_only_mount(small_tmpfs, "ro", "existing")
    env = task_env(1, 2, "4242")
    common = [f"data.cache_dir={tmp_path / 'no-cache'}", "train.epochs=1"]
    cannot = subprocess.run(TRAIN + common + [f"hydra.run.dir={ro}/below"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert cannot.returncode == 1, cannot.stderr[-3000:]
    assert cannot.stderr.strip().splitlines() == [
        f"cannot write to the run directory {ro}/below (Read-only file system); set hydra.run.dir to a writable location "
        "(e.g. on $SCRATCH)"]
    exists = subprocess.run(TRAIN + common + [f"hydra.run.dir={ro}/existing"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert exists.returncode == 1 and "Traceback" not in exists.stderr, exists.stderr[-3000:]
    assert "cannot write" not in exists.stderr and f"no cached MNIST at {tmp_path / 'no-cache'}" in exists.stderr
    assert listing(ro) == ["existing"]

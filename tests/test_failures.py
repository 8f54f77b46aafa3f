"""Known errors end a run in one line with the fix; bugs keep their traceback (issue 11, case 11)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from mnist_hpc import claim
from mnist_hpc.cache import CacheCorruptError
from mnist_hpc.compute.failures import exit_on, known_error
from tests.test_launch import TRAIN, run_login_command, sweep_args


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
        TRAIN, sweep_args(synthetic_cache, tmp_path, "hydra/launcher=local", "train.batch_size=64,100000"), tmp_path
    )
    assert proc.returncode != 0 and "nothing was queued" in proc.stderr
    assert "trial 1: train.batch_size=100000 exceeds the 600 training samples; use at most 600" in proc.stderr
    assert not list((tmp_path / "sweep").rglob("job.json"))


@pytest.mark.parametrize("procid, writes", [("0", True), ("1", False), (None, True)])
def test_an_unloadable_job_is_recorded_once_by_the_first_task(tmp_path, monkeypatch, procid, writes):
    """A job whose pickle cannot be loaded fails in every task; only the first writes failure.json."""
    from mnist_hpc.compute.entry import JobEntry

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
        assert (tmp_path / d / "failure.json").exists() is writes
        if writes:
            assert "cannot be loaded" in json.loads((tmp_path / d / "failure.json").read_text())["error"]

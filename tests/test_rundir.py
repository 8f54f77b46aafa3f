"""Readers of files that other processes and people write: damaged files give notes, never tracebacks.

Issue 11, case 12: a 0-byte predictions.npz, a metrics.json holding null, [1,2] or garbage, a
job.json that is not JSON or lacks job_id... Status and report show the trial with a note naming
the file and go on with the rest. Fuzzed here with truncations, wrong JSON types and random bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.login import trials as trials_mod
from tests.helpers import epoch_record, fake_metrics, fake_predictions, make_trial

READERS = {
    rundir.JOB_FILE: rundir.read_job,
    rundir.METRICS_FILE: rundir.read_metrics,
    rundir.PROGRESS_FILE: rundir.read_progress,
    rundir.FAILURE_FILE: rundir.read_failure,
    rundir.IDENTITY_FILE: rundir.read_identity,
    rundir.LEASE_FILE: rundir.read_lease,
}
WRONG_JSON = ["null", "[1, 2]", "5", '"text"', "true", "{}", '{"job_id": 7}', '{"history": "x"}',
              '{"test_accuracy": "high", "history": []}', '{"history": [{"epoch": "one"}]}']


def valid_files(run_dir: Path) -> dict[str, bytes]:
    """Each JSON run file as the real writers produce it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_job(run_dir, rundir.JobRecord(cluster="slurm", job_id="9_1", run_dir=str(run_dir), trial=1))
    rundir.write_metrics(run_dir, fake_metrics(0.97, 0.98, 0.975))
    rundir.write_progress(run_dir, 2, 3, [epoch_record(1, 0.9, 0.91), epoch_record(2, 0.92, 0.93)])
    rundir.write_failure(run_dir, ValueError("boom"))
    rundir.write_identity(run_dir, {"train.seed": 0}, "abc")
    rundir.write_lease(run_dir, {"host": "h", "pid": 1})
    return {name: (run_dir / name).read_bytes() for name in READERS}


def fuzz_cases(original: bytes, rng: np.random.Generator) -> list[bytes]:
    cases = [b"", b"\x00", original[: len(original) // 2], original[:-1], original + b"garbage", b"\xff\xfe\x00bad"]
    cases += [original[:cut] for cut in sorted(set(rng.integers(1, len(original), size=8).tolist()))]
    cases += [rng.bytes(int(n)) for n in rng.integers(1, 300, size=6)]
    flipped = bytearray(original)
    for i in rng.integers(0, len(original), size=4):
        flipped[i] ^= 0xFF
    cases.append(bytes(flipped))
    return cases + [text.encode() for text in WRONG_JSON]


@pytest.mark.parametrize("name", sorted(READERS))
def test_each_reader_accepts_the_writer_and_refuses_damage_cleanly(tmp_path: Path, name: str) -> None:
    original = valid_files(tmp_path / "run")[name]
    assert READERS[name](tmp_path / "run") is not None  # the writer's own output reads back
    rng = np.random.default_rng(sum(name.encode()))
    for case in fuzz_cases(original, rng):
        (tmp_path / "run" / name).write_bytes(case)
        try:
            READERS[name](tmp_path / "run")
        except rundir.RunFileError as exc:
            assert str(tmp_path / "run" / name) in str(exc)  # the message names the file


def test_a_directory_where_a_file_should_be_is_a_clean_error(tmp_path: Path) -> None:
    for name, reader in READERS.items():
        (tmp_path / name).mkdir(parents=True)
        with pytest.raises(rundir.RunFileError, match=name):
            reader(tmp_path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "bare-npy", "random", "mismatched", "text"])
def test_damaged_predictions_are_a_clean_error(tmp_path: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake_predictions(run_dir, {3: (5, 0.9)})
    path = run_dir / rundir.PREDICTIONS_FILE
    assert rundir.load_predictions(run_dir).y_true.shape == (100,)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "bare-npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros(3))
    elif damage == "random":
        path.write_bytes(np.random.default_rng(1).bytes(2000))
    elif damage == "text":
        path.write_text("not an archive")
    else:
        with open(path, "wb") as fh:
            np.savez(fh, y_true=np.zeros(5), y_pred=np.zeros(3), y_prob=np.zeros((5, 10)),
                     wrong_index=np.array([99]), wrong_images=np.zeros((1, 28, 28)))
    with pytest.raises(rundir.RunFileError, match=str(path)):
        rundir.load_predictions(run_dir)


def damaged_sweep(sweep: Path) -> Path:
    """Six trials; five carry one damaged file each, one is sound."""
    sweep.mkdir(parents=True)
    for num in range(6):
        make_trial(sweep, num, [f"train.seed={num}", "data.validation_split=0.1"], started_epochs=3,
                   metrics=fake_metrics(0.97, 0.98 - num / 100, 0.9), mistakes={1: (2, 0.8)}, ended=True)
    (sweep / "0" / rundir.METRICS_FILE).write_text("null")
    (sweep / "1" / rundir.METRICS_FILE).write_text("[1, 2]")
    (sweep / "2" / rundir.JOB_FILE).write_text("{not json")
    (sweep / "3" / rundir.JOB_FILE).write_text(json.dumps({"cluster": "local", "trial": 3}))  # lacks job_id
    (sweep / "2" / rundir.PREDICTIONS_FILE).write_bytes(b"")  # 0 bytes, and trial 2 is the best readable one
    (sweep / "4" / rundir.PROGRESS_FILE).write_bytes(b"\x00\x01garbage")
    return sweep


def test_status_and_report_go_on_past_damaged_files_with_notes(tmp_path: Path) -> None:
    sweep = damaged_sweep(tmp_path / "sweep")
    env = {**os.environ, "PATH": str(tmp_path / "no-slurm-here")}  # states from the files
    status = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", "--json", str(sweep)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr
    rows = json.loads(status.stdout)
    # Every trial is shown; a damaged file is a note naming it, and is not believed.
    assert [r["trial"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert f"trial 0: {sweep / '0' / rundir.METRICS_FILE} holds a JSON null, expected an object; ignored" in status.stderr
    assert f"trial 1: {sweep / '1' / rundir.METRICS_FILE} holds a JSON list" in status.stderr
    assert f"trial 2: {sweep / '2' / rundir.JOB_FILE} is not valid JSON" in status.stderr
    # 0 and 1 ended without usable final metrics: never COMPLETED; 2 and 3 (no job record) finished per their files.
    assert [r["state"] for r in rows] == ["FAILED", "FAILED", "COMPLETED", "COMPLETED", "COMPLETED", "COMPLETED"]
    assert [r["job_id"] for r in rows] == ["1000", "1001", "-", "-", "1004", "1005"]

    report = subprocess.run([sys.executable, "-c", "from mnist_hpc.cli import report_main; report_main()", str(sweep)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert report.returncode == 0, report.stderr
    assert "Traceback" not in report.stdout + report.stderr
    out = report.stdout
    for needle in (f"{sweep / '0' / rundir.METRICS_FILE} holds a JSON null",
                   f"{sweep / '2' / rundir.JOB_FILE} is not valid JSON",
                   f"{sweep / '3' / rundir.JOB_FILE}: field 'job_id' is None",
                   f"{sweep / '4' / rundir.PROGRESS_FILE} is",
                   f"{sweep / '2' / rundir.PREDICTIONS_FILE} is not a readable npz archive: it is empty"):
        assert needle in out, needle
    trials, _ = trials_mod.read_trials(trials_mod.find_runs(sweep)[1])
    assert [t.number for t in trials] == [0, 1, 2, 3, 4, 5]
    assert [t.finished for t in trials] == [False, False, True, True, True, True]
    assert "**Best trial: 2**" in out  # best_val 0.96 among the readable ones (3, 4 and 5 are lower)
    assert not (sweep / "report" / "confusion_matrix.png").exists()  # nothing drawn from a damaged file


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_workers_failure_never_replaces_one_already_written(tmp_path, monkeypatch, hard_links):
    """keep_existing (a worker that is not the chief): written whole when absent, else left as it is."""
    if not hard_links:  # a filesystem without hard links: checked, then renamed
        def no_link(*args, **kwargs):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    assert rundir.write_failure(tmp_path, RuntimeError("the worker's view"), keep_existing=True)
    assert rundir.read_failure(tmp_path) == "RuntimeError: the worker's view"
    rundir.write_failure(tmp_path, OSError("the chief's own error"))  # the chief always writes
    assert not rundir.write_failure(tmp_path, RuntimeError("worker 0 died"), keep_existing=True)
    assert rundir.read_failure(tmp_path) == "OSError: the chief's own error"
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.FAILURE_FILE]  # no temporary left


def test_final_metrics_with_more_epochs_than_planned_are_not_shown(tmp_path: Path):
    run_dir = tmp_path / "run"
    history = [{"epoch": e, "accuracy": 0.9, "loss": 0.3, "seconds": 1.0} for e in (1, 2, 3)]
    rundir.write_progress(run_dir, 2, 2, history[:2])
    rundir.write_metrics(run_dir, {"test_accuracy": 0.97, "test_loss": 0.1, "epochs_completed": 3, "history": history})
    run = rundir.read_run(run_dir)
    assert run.metrics is None and any("holds 3 epochs, more than the 2" in n for n in run.notes)
    rundir.write_progress(run_dir, 3, 3, history)
    assert rundir.read_run(run_dir).metrics["epochs_completed"] == 3


@pytest.mark.parametrize("where", [".", "checkpoints"])
def test_a_folder_named_like_a_half_written_file_is_left_alone(tmp_path: Path, where: str) -> None:
    """Second hostile pass (I8): remove_stale_temporaries unlinked every '.*.tmp*' entry, so a folder
    of that name ended claim.bind in IsADirectoryError; the half-written files beside it still go."""
    from mnist_hpc import rundir

    run_dir = tmp_path / "run"
    (run_dir / where / ".metrics.json.x.tmp1").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    stale = run_dir / where / ".progress.json.y.tmp2"
    stale.write_text("{")
    assert rundir.remove_stale_temporaries(run_dir) == [stale]
    assert (run_dir / where / ".metrics.json.x.tmp1").is_dir() and not stale.exists()


# --- what rundir owns beyond its JSON files: checkpoint names, the lease's mechanics, submitit's
# result pickle, a retry's seed ---------------------------------------------------------------


def test_checkpoint_names_sort_as_positions_and_only_they_are_listed(tmp_path: Path) -> None:
    assert rundir.list_checkpoints(tmp_path) == [] and not rundir.holds_results(tmp_path)
    for epoch, batch in [(1, 0), (0, 40), (10, 0), (1, 30)]:
        path = rundir.checkpoint_path(tmp_path, epoch, batch)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    assert rundir.checkpoint_path(tmp_path, 3, 12) == tmp_path / rundir.CHECKPOINT_DIR / "ckpt-e00003-b0000012.npz"
    assert rundir.checkpoint_position("ckpt-e00003-b0000012.npz") == (3, 12)
    assert rundir.checkpoint_position(rundir.checkpoint_name(12345, 1234567)) == (12345, 1234567)
    for other in ("ckpt-e1-b1.npz", ".ckpt-e00003-b0000012.npz.x1.tmp.npz", "ckpt-e00003-b0000012.npz.tmp"):
        assert rundir.checkpoint_position(other) is None, other
    listed = [p.name for p in rundir.list_checkpoints(tmp_path)]
    assert listed == [rundir.checkpoint_name(10, 0), rundir.checkpoint_name(1, 30), rundir.checkpoint_name(1, 0),
                      rundir.checkpoint_name(0, 40)]
    # A writer's temporary, a stray file: neither is a checkpoint, nor a result.
    other = tmp_path / "other"
    (other / rundir.CHECKPOINT_DIR).mkdir(parents=True)
    for stray in (".ckpt-e00001-b0000000.npz.x1.tmp.npz", "ckpt-e1-b1.npz", "notes.txt"):
        (other / rundir.CHECKPOINT_DIR / stray).write_bytes(b"")
    assert rundir.list_checkpoints(other) == [] and not rundir.holds_results(other)
    assert rundir.holds_results(tmp_path)


@pytest.mark.parametrize("name", ["metrics", "progress"])
def test_metrics_or_progress_are_results(tmp_path: Path, name: str) -> None:
    history = [{"epoch": 1, "accuracy": 0.9, "loss": 0.3, "seconds": 1.0}]
    if name == "metrics":
        rundir.write_metrics(tmp_path, {"test_accuracy": 0.9, "test_loss": 0.3, "epochs_completed": 1, "history": history})
    else:
        rundir.write_progress(tmp_path, 1, 2, history)
    assert rundir.holds_results(tmp_path)


@pytest.mark.parametrize("job_id", ["1234", "1234_7"])
def test_the_result_pickle_is_where_submitit_writes_it(tmp_path: Path, job_id: str) -> None:
    from submitit.core.utils import JobPaths

    folder = tmp_path / ".submitit" / job_id
    assert rundir.submitit_result_file(folder, job_id) == JobPaths(folder, job_id).result_pickle
    record = rundir.JobRecord(cluster="slurm", job_id=job_id, run_dir=str(tmp_path), submitit_folder=str(folder))
    assert record.result_file == JobPaths(folder, job_id).result_pickle
    assert rundir.JobRecord(cluster="slurm", job_id=job_id, run_dir=str(tmp_path)).result_file is None


def test_the_lease_lock_is_exclusive_and_a_lease_is_released_only_by_its_holder(tmp_path: Path) -> None:
    import fcntl

    me, other = {"host": "h", "pid": 11}, {"host": "h", "pid": 12}
    with rundir.lease_lock(tmp_path):
        fd = os.open(tmp_path / rundir.LEASE_LOCK, os.O_RDWR)
        try:  # another open file (as another process would have) cannot take it meanwhile
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        rundir.write_lease(tmp_path, me)
    fd = os.open(tmp_path / rundir.LEASE_LOCK, os.O_RDWR)
    try:  # and it is free once left
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    rundir.release_lease(tmp_path, other)  # taken over since: not ours to remove
    assert rundir.read_lease(tmp_path)["holder"] == me
    rundir.release_lease(tmp_path, me)
    assert rundir.read_lease(tmp_path) is None
    rundir.release_lease(tmp_path, me)  # nothing to release
    (tmp_path / rundir.LEASE_FILE).write_text("{not json")
    rundir.release_lease(tmp_path, me)  # a damaged lease is left for check_lease to judge
    assert (tmp_path / rundir.LEASE_FILE).read_text() == "{not json"


def test_a_retry_is_seeded_with_the_checkpoints_and_binding_of_its_origin(tmp_path: Path) -> None:
    origin, retry = tmp_path / "0", tmp_path / "1"
    assert not rundir.seed_from(retry, origin)  # an origin without checkpoints gives nothing
    rundir.write_identity(origin, {"train.seed": 3}, "fp-of-origin")
    path = rundir.checkpoint_path(origin, 2, 0)
    path.parent.mkdir()
    path.write_bytes(b"state")
    retry.mkdir()
    assert rundir.seed_from(retry, origin)
    assert [p.name for p in rundir.list_checkpoints(retry)] == [path.name]
    assert rundir.list_checkpoints(retry)[0].read_bytes() == b"state"
    assert rundir.read_identity(retry)["fingerprint"] == "fp-of-origin"
    # A directory with checkpoints of its own keeps them.
    path.write_bytes(b"newer")
    assert not rundir.seed_from(retry, origin)
    assert rundir.list_checkpoints(retry)[0].read_bytes() == b"state"

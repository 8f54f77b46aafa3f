"""A run directory belongs to one config and one live writer (issue 11, cases 2, 3, 4, 11, 13).

Runs through the real entry point (``mnist-hpc-train`` in a subprocess) and through
``train_and_evaluate``; every refusal must leave the directory exactly as it was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import claim, rundir
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import to_typed
from tests.helpers import (
    checkpoint_positions,
    finished_metrics,
    resume_line,
    resumed_from,
    run_log,
    TRAIN,
    assert_one_line_refusal,
    fill_cache,
    snapshot,
    strip_seconds,
    synthetic_mnist,
    tiny_overrides,
    train_cli,
    weights,
)


@pytest.fixture
def finished(synthetic_cache: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """A finished 2-epoch run through the CLI, deterministic, and its overrides."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=2", "train.deterministic=true", f"hydra.run.dir={run_dir}"]
    proc = train_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert finished_metrics(run_dir)["epochs_completed"] == 2
    return args, run_dir


@pytest.mark.slow
def test_rerun_with_another_config_is_refused_before_anything_changes(finished, tmp_path):
    """Case 2: config.yaml and .hydra/ keep the finished run's config; the refusal names the key."""
    args, run_dir = finished
    before = snapshot(run_dir)
    assert "hidden_units:\n  - 512" in before[rundir.CONFIG_FILE].decode()
    proc = train_cli(args + ["model.hidden_units=[256]"], tmp_path)
    assert_one_line_refusal(proc, "model.hidden_units: [512] -> [256]", "use a new directory")
    assert snapshot(run_dir) == before
    assert not (run_dir / rundir.HYDRA_PENDING_DIR).exists()


@pytest.mark.slow
def test_fewer_epochs_are_refused_more_continue_and_equal_is_done(finished, compose, synthetic_cache, tmp_path):
    """Case 3: epochs only grow. A longer run continues from the checkpoint and ends as a fresh run would."""
    args, run_dir = finished
    before = snapshot(run_dir)
    proc = train_cli(args + ["train.epochs=1"], tmp_path)
    assert_one_line_refusal(proc, "has finished 2 epoch(s); train.epochs=1 asks for fewer")
    assert snapshot(run_dir) == before

    # The same config and epochs again: nothing to do, nothing rewritten.
    proc = train_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != rundir.LOG_FILE} == {k: v for k, v in before.items() if k != rundir.LOG_FILE}

    # More epochs: the run continues and its files describe a 3-epoch run, equal to a fresh one.
    proc = train_cli(args[:-2] + ["train.epochs=3", "train.deterministic=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resume_line(2, 0) in run_log(run_dir)
    metrics = finished_metrics(run_dir)
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert "epochs: 3" in (run_dir / rundir.CONFIG_FILE).read_text()
    assert rundir.read_progress(run_dir).epochs_planned == 3
    fresh_cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=3", "train.deterministic=true"]))
    fresh = train_and_evaluate(fresh_cfg, tmp_path / "fresh")
    fresh_metrics = finished_metrics(tmp_path / "fresh")
    assert metrics["test_accuracy"] == fresh["test_accuracy"]
    assert strip_seconds(metrics["history"]) == strip_seconds(fresh_metrics["history"])
    for got, want in zip(weights(run_dir), weights(tmp_path / "fresh")):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_a_second_live_writer_is_refused_and_a_dead_one_taken_over(tmp_path):
    """Case 4, local runs: the lease names host and pid; a killed holder's lease is taken over."""
    cache = tmp_path / "cache"
    fill_cache(cache, synthetic_mnist(n_train=6000, n_test=200))
    run_dir = tmp_path / "run"
    args = tiny_overrides(cache, tmp_path) + ["train.epochs=30", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(TRAIN + args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "SLURM_CPUS_PER_TASK": "1"})
    try:
        deadline = time.time() + 120
        while rundir.read_progress(run_dir) is None or rundir.read_progress(run_dir).epochs_done < 1:
            assert time.time() < deadline and first.poll() is None, "first run did not start training"
            time.sleep(0.2)
        holder = rundir.read_lease(run_dir)["holder"]
        # What a live writer goes on changing while the second is refused.
        changing = (rundir.CHECKPOINT_DIR, rundir.PROGRESS_FILE, rundir.LOG_FILE, rundir.TENSORBOARD_DIR, f".{rundir.PROGRESS_FILE}.")
        assert holder["pid"] == first.pid and holder["slurm_job_id"] is None
        before = {k: v for k, v in snapshot(run_dir).items() if not k.startswith(changing)}

        second = train_cli(args, tmp_path)
        assert_one_line_refusal(second, f"is being written by a process (pid {first.pid} on", "still alive")
        after = {k: v for k, v in snapshot(run_dir).items() if not k.startswith(changing)}
        assert after == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert rundir.read_lease(run_dir)["holder"]["pid"] == first.pid  # left behind by the kill

    done = max(epoch for epoch, _ in checkpoint_positions(run_dir))
    third = train_cli(tiny_overrides(cache, tmp_path) + [f"train.epochs={done + 1}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert done in [epoch for epoch, _ in resumed_from(run_log(run_dir))]
    assert rundir.read_lease(run_dir) is None  # released at the end


@pytest.mark.slow
def test_stale_temporaries_of_a_dead_writer_are_removed(compose, synthetic_cache, tmp_path):
    """Case 13: a writer killed mid-write leaves ``.<name>.*.tmp*`` files; the next holder removes them."""
    from tests.helpers import Interrupt, interrupter

    cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=2"]))
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=1)])
    stale = [run_dir / f".{rundir.METRICS_FILE}.k3j2.tmp", run_dir / rundir.CHECKPOINT_DIR / f".{rundir.checkpoint_name(1, 0)}.x1.tmp.npz"]
    for path in stale:
        path.write_bytes(b"half")
    train_and_evaluate(cfg, run_dir)
    assert not any(path.exists() for path in stale)
    assert not list(run_dir.rglob(".*.tmp*"))


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("truncate", "no readable checkpoint"),
        ("json-list", "its header is a JSON list"),
        ("bare-npy", "bare .npy array"),
    ],
)
@pytest.mark.slow
def test_damaged_checkpoints_end_in_one_line(compose, synthetic_cache, tmp_path, damage, needle):
    """Case 11: every checkpoint damaged, or a header that is a JSON list: one line, no traceback."""
    args = tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=2", f"hydra.run.dir={tmp_path / 'run'}"]
    cfg = to_typed(compose(args[:-1]))
    run_dir = tmp_path / "run"
    train_and_evaluate(cfg, run_dir)
    (run_dir / rundir.METRICS_FILE).unlink()  # an unfinished run: it will want its checkpoints
    for path in rundir.list_checkpoints(run_dir):
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[:500])
        elif damage == "json-list":
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
            arrays["header"] = np.frombuffer(b"[1, 2]", dtype=np.uint8)
            with open(path, "wb") as fh:
                np.savez(fh, **arrays)
        else:
            with open(path, "wb") as fh:
                np.save(fh, np.zeros(3))
    proc = train_cli(args, tmp_path)
    assert_one_line_refusal(proc, needle)


def test_a_corrupt_cache_ends_in_one_line(synthetic_cache, tmp_path):
    """Case 11: a cache changed after prefetch, on the node that trains: one line naming the fix."""
    npz = synthetic_cache / "mnist.npz"
    npz.write_bytes(npz.read_bytes()[:-100])
    proc = train_cli(tiny_overrides(synthetic_cache, tmp_path) + [f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line_refusal(proc, "mnist-hpc-prefetch", "--force")
    assert not (tmp_path / "run" / rundir.METRICS_FILE).exists()


def test_identity_ignores_where_and_how_fast_but_not_what(compose, tmp_path):
    base = to_typed(compose(["data.cache_dir=/a"]))
    moved = to_typed(compose(["data.cache_dir=/b", "paths.output_root=/x", "train.intra_op_threads=3",
                              "train.checkpoint_every_batches=5", "train.epochs=9", "train.steps_per_execution=8"]))
    assert claim.fingerprint(claim.identity_of(base, "d")) == claim.fingerprint(claim.identity_of(moved, "d"))
    for change in (["train.seed=1"], ["model.dropout=0.1"], ["train.deterministic=true"], ["train=lesson"],
                   ["data.validation_split=0.1"], ["optimizer=adam"]):
        other = to_typed(compose(["data.cache_dir=/a", *change]))
        assert claim.fingerprint(claim.identity_of(other, "d")) != claim.fingerprint(claim.identity_of(base, "d")), change
    assert claim.fingerprint(claim.identity_of(base, "other data")) != claim.fingerprint(claim.identity_of(base, "d"))


@pytest.mark.slow
def test_a_run_stopped_by_a_full_disk_says_so_and_resumes_once_space_is_freed(compose, synthetic_cache, tmp_path, small_tmpfs):
    """Case 13: ENOSPC at the second epoch's checkpoint: one line; space freed, the run resumes and finishes."""
    disk = small_tmpfs("disk", "12m")
    run_dir = disk / "run"
    args = tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=3", "train.deterministic=true", f"hydra.run.dir={run_dir}"]
    # About 5 MB left: the first checkpoint (3.3 MB) fits, the second does not.
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (7 * 2**20))
    proc = train_cli(args, tmp_path)
    assert_one_line_refusal(proc, "no space left on the device", "resumes from its last checkpoint")
    assert checkpoint_positions(run_dir) == [(1, 0)]
    assert not list(run_dir.rglob(".*.tmp*"))  # the failed write took its temporary file with it

    filler.unlink()
    proc = train_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resume_line(1, 0) in run_log(run_dir)
    fresh_cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=3", "train.deterministic=true"]))
    train_and_evaluate(fresh_cfg, tmp_path / "fresh")
    for got, want in zip(weights(run_dir), weights(tmp_path / "fresh")):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pid", [0, -1, 2**31, 2**40, "12", None])
def test_a_holder_without_a_usable_process_id_cannot_be_told_alive_or_dead(pid):
    """kill(0) and kill(-1) would ask about other processes, and huge or non-integer pids raise:
    a lease or job.json naming such a pid is neither alive nor dead, and never a traceback."""
    me = claim.Holder.this_process()
    assert claim.alive(claim.Holder(host=me.host, pid=pid), me) is None  # type: ignore[arg-type]

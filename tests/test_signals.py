"""Slurm's warning signals in one process: recorded, acted on at the next step boundary with a
checkpoint, and the run resumes exactly; a warning after the work is done is ignored."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.compute.run import finish_in_process
from mnist_hpc.compute.signals import StopRequest, TrainingInterrupted, hand_over
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import to_typed
from tests.helpers import tiny_overrides, weights


@pytest.fixture(autouse=True)
def _restore_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_signal_is_recorded_not_acted_on_and_sigterm_overrides_usr2():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.signum == signal.SIGUSR2  # the process is still here
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_a_job_wide_request_is_shared_and_remembers_the_handler_it_replaced():
    def submitit_like(signum, frame):
        raise AssertionError("must not run while the request is active")

    signal.signal(signal.SIGUSR2, submitit_like)
    with StopRequest(ignore_after=True) as outer:
        with StopRequest() as inner:
            assert inner is outer
            assert StopRequest.handler_before(signal.SIGUSR2) is submitit_like
        # The training's request ended; the job's still holds the signal.
        os.kill(os.getpid(), signal.SIGUSR2)
        assert outer.requested
    # Work done without an error: a late warning is ignored rather than requeueing a finished job.
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN

    with pytest.raises(RuntimeError):
        with StopRequest(ignore_after=True):
            raise RuntimeError("failed")
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN  # (what was there before this block)


def usr2_when_epoch_begins(at_epoch: int):
    """A callback (epoch hooks only: the compiled loop keeps its full calls) that raises USR2 in this
    process as epoch ``at_epoch`` begins, as Slurm's warning would arrive during its first call."""
    import keras

    class RaiseUsr2(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == at_epoch:
                os.kill(os.getpid(), signal.SIGUSR2)

    return RaiseUsr2()


@pytest.mark.parametrize("extra, stop_at", [(["train.steps_per_execution=4"], 4), (["train=lesson"], 1)],
                         ids=["compiled_loop", "keras_fit"])
@pytest.mark.slow
def test_usr2_stops_at_the_next_step_boundary_with_a_checkpoint_and_the_run_resumes_identically(
    compose, synthetic_cache, tmp_path, extra, stop_at
):
    """The signal comes as epoch 2 starts: the compiled loop finishes its call of 4 batches and stops
    there, model.fit after its batch; the checkpoint is that step's, and the resumed run ends exactly
    as an uninterrupted one."""
    cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path) + [
        "train.epochs=3", "train.deterministic=true", "model.dropout=0.2", "data.validation_split=0.1", *extra,
    ]))
    train_and_evaluate(cfg, tmp_path / "reference")
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train_and_evaluate(cfg, run, callbacks=[usr2_when_epoch_begins(1)])
    stop = stopped.value
    assert (stop.signum, stop.epoch, stop.batch) == (signal.SIGUSR2, 1, stop_at)
    assert stop.requeue and stop.exit_code == 128 + signal.SIGUSR2
    assert rundir.list_checkpoints(run)[0].name == rundir.checkpoint_name(1, stop_at) == stop.checkpoint.name
    assert not (run / rundir.METRICS_FILE).exists()

    train_and_evaluate(cfg, run)
    metrics = rundir.read_metrics(run)
    reference = rundir.read_metrics(tmp_path / "reference")
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(metrics["history"]) == strip(reference["history"])
    for got, want in zip(weights(run), weights(tmp_path / "reference")):
        np.testing.assert_array_equal(got, want)


def test_outside_slurm_a_stopped_run_exits_with_the_signal_code_and_says_how_to_resume(tmp_path, caplog):
    stop = TrainingInterrupted(signal.SIGUSR2, 2, 17, rundir.checkpoint_path(tmp_path, 2, 17))
    with pytest.raises(SystemExit) as ended:
        finish_in_process(stop, tmp_path, job_id=None, chief=True)
    assert ended.value.code == 128 + signal.SIGUSR2
    assert f"run the same command again with hydra.run.dir={tmp_path}" in caplog.text


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_worker_that_is_not_the_chief_leaves_the_ending_to_the_chief(tmp_path, caplog, signum):
    """Exit 0, and never submitit's requeue: a non-zero exit would let KillOnBadExit=1 kill the chief first."""
    calls = []
    with pytest.raises(SystemExit) as ended:
        hand_over(signum, lambda *a: calls.append(a), chief=False)
    assert ended.value.code == 0 and calls == []
    stop = TrainingInterrupted(signum, 2, 17, None)
    with pytest.raises(SystemExit) as ended:
        finish_in_process(stop, tmp_path, job_id="123", chief=False)
    assert ended.value.code == 0
    assert "the chief (task 0) checkpoints and ends or requeues the job" in caplog.text
    assert "run the same command again" not in caplog.text


def test_the_chief_hands_usr2_to_submitit_and_exits_with_the_signal_code_on_sigterm():
    calls = []
    with pytest.raises(SystemExit) as ended:
        hand_over(signal.SIGTERM, lambda *a: calls.append(a), chief=True)
    assert ended.value.code == 128 + signal.SIGTERM and calls == []
    with pytest.raises(SystemExit) as ended:
        hand_over(signal.SIGUSR2, lambda *a: calls.append(a), chief=True)
    assert calls == [(signal.SIGUSR2, None)] and ended.value.code == 128 + signal.SIGUSR2

"""A saved model.keras is whole (issue I9): it carries its optimizer's variables (iteration count,
slots) whichever engine trained it, so training continues from it as from the run itself."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.compute import checkpoint
from mnist_hpc.compute.data import load_mnist
from mnist_hpc.compute.engine import epoch_order
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import to_typed
from tests import local_workers
from tests.helpers import fill_cache, synthetic_mnist, tiny_overrides

EPOCHS = 2


def load_saved(run_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> object:
    """``keras.saving.load_model`` of the run's model.keras; fails on a variable Keras skipped."""
    import keras

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        model = keras.saving.load_model(run_dir / rundir.MODEL_FILE)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] + list(capfd.readouterr())
    assert not [text for text in said if "Skipping variable loading" in text], said
    return model


@pytest.mark.parametrize("engine", ["keras_fit", "compiled_loop", "multi_worker"])
@pytest.mark.slow
def test_model_keras_carries_the_optimizer_and_training_continues_from_it(engine, compose, tmp_path, caplog, capfd):
    cache = tmp_path / "cache"
    fill_cache(cache, synthetic_mnist(n_train=1200, n_test=200))
    execution = "keras_fit" if engine == "keras_fit" else "compiled_loop"
    args = tiny_overrides(cache, tmp_path / "out") + [
        f"train.execution={execution}", "train.deterministic=true", "data.validation_split=0.1",
    ]
    run_dir = tmp_path / "run"
    if engine == "multi_worker":
        logs = tmp_path / "logs"
        procs = local_workers.start(local_workers.DRIVER + [str(run_dir), *args, f"train.epochs={EPOCHS}"], 2, tmp_path, logs)
        assert local_workers.wait_all(procs) == [0, 0], (logs / "task0.log").read_text()[-3000:]
        assert "2 workers (multi_worker, this is the chief)" in (logs / "task0.log").read_text()
    else:
        train_and_evaluate(to_typed(compose(args + [f"train.epochs={EPOCHS}"])), run_dir)

    # The optimizer's variables are the last checkpoint's (the state training resumes from).
    last = checkpoint.read(rundir.list_checkpoints(run_dir)[0])
    assert (last.epoch, last.batch) == (EPOCHS, 0)
    model = load_saved(run_dir, caplog, capfd)
    saved = [np.asarray(v.numpy()) for v in model.optimizer.variables]
    assert len(saved) == len(last.optimizer_values) == 6  # iterations, learning rate, one RMSprop slot per weight
    for got, want in zip(saved, last.optimizer_values):
        np.testing.assert_array_equal(got, want)
    cfg = to_typed(compose(args + [f"train.epochs={EPOCHS + 1}"]))
    data = load_mnist(cfg.data)
    x, y = data.lesson("train")
    steps = -(-x.shape[0] // cfg.train.batch_size)
    assert int(saved[0]) == EPOCHS * steps  # the iteration count
    assert all(np.abs(slot).max() > 0 for slot in saved[2:])  # slots that training filled
    before = model.get_weights()
    for got, want in zip(before, last.model_values, strict=True):
        np.testing.assert_array_equal(got, want)

    # One more epoch from model.keras (the epoch's own order, as the run trains it) ...
    order = epoch_order(cfg.train.seed, EPOCHS, x.shape[0])
    model.fit(x[order], y[order], batch_size=cfg.train.batch_size, epochs=1, shuffle=False, verbose=0)
    # ... changes the weights as the run itself does when it trains that epoch (it resumes from its checkpoint).
    train_and_evaluate(cfg, run_dir)
    further = checkpoint.read(rundir.list_checkpoints(run_dir)[0])
    assert (further.epoch, further.batch) == (EPOCHS + 1, 0)
    after = model.get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(after, before)) > 1e-3  # the epoch did change them
    for got, want in zip(after, further.model_values, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(model.optimizer.variables, further.optimizer_values):
        np.testing.assert_allclose(np.asarray(got.numpy()), want, rtol=1e-5, atol=1e-6)

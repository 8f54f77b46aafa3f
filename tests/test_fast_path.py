"""The default execution (``compiled_loop``): the lesson's numbers, exact resume under XLA, lesson config kept."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.compute import engine
from mnist_hpc.compute.data import load_mnist, one_hot, prepare_images
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import DataConfig, Execution, TrainConfig, to_typed
from tests.helpers import Interrupt, interrupter, strip_seconds, tiny_overrides, weights

EXECUTION_KEYS = {"execution", "jit_compile", "steps_per_execution"}


def run(cfg, run_dir: Path, callbacks=()) -> tuple[dict, list[dict], list[np.ndarray]]:
    result = train_and_evaluate(cfg, run_dir, callbacks=callbacks)
    history = rundir.read_metrics(run_dir)["history"]
    return result, strip_seconds(history), weights(run_dir)


def assert_same_run(a, b) -> None:
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert len(a[2]) == len(b[2])
    for got, want in zip(a[2], b[2]):
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def overrides(synthetic_cache, tmp_path) -> list[str]:
    # 540 training samples / 32 = 16 full batches and a last one of 28, per epoch.
    return tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=3", "model.dropout=0.2", "data.validation_split=0.1"]


def test_default_is_the_compiled_loop_and_train_lesson_the_plain_fit(compose):
    default, lesson = to_typed(compose()), to_typed(compose(["train=lesson"]))
    assert default.train.execution is Execution.compiled_loop
    assert default.train.jit_compile and default.train.steps_per_execution > 1
    assert lesson.train.execution is Execution.keras_fit
    assert not lesson.train.jit_compile and lesson.train.steps_per_execution == 1
    # Only how training executes differs; every hyperparameter is the same.
    for f in dataclasses.fields(TrainConfig):
        if f.name not in EXECUTION_KEYS:
            assert getattr(default.train, f.name) == getattr(lesson.train, f.name), f.name
    assert (default.model, default.optimizer, default.data) == (lesson.model, lesson.optimizer, lesson.data)


def test_compact_loader_keeps_training_images_uint8_with_the_lessons_values(synthetic_cache):
    """One loader, two views: the stored uint8 arrays, and the lesson's float32 / one-hot ones."""
    cfg = DataConfig(cache_dir=str(synthetic_cache), validation_split=0.1)
    compact = load_mnist(cfg)
    assert compact.x_train.dtype == np.uint8 and compact.x_train.shape == (540, 784)
    assert compact.y_train.dtype == np.uint8 and compact.y_train.shape == (540,)
    x_train, y_train = compact.lesson("train")
    np.testing.assert_array_equal(prepare_images(compact.x_train), x_train)
    np.testing.assert_array_equal(one_hot(compact.y_train), y_train)
    assert x_train.dtype == np.float32 and y_train.shape == (540, 10)
    for split in ("val", "test"):
        x, y = compact.lesson(split)
        np.testing.assert_array_equal(x, prepare_images(getattr(compact, f"x_{split}")), err_msg=split)
        np.testing.assert_array_equal(y.argmax(axis=1), getattr(compact, f"y_{split}"), err_msg=split)
    assert compact.sha256 == load_mnist(cfg).sha256


@pytest.mark.parametrize("jit", [True, False])
def test_in_graph_batches_are_exactly_the_lessons(synthetic_cache, jit):
    """The graph's batch equals numpy's ``x / 255`` bit for bit, XLA included (its ``x / 255`` would not)."""
    import tensorflow as tf

    from mnist_hpc.compute.engine import lesson_batch, scale_table

    data = load_mnist(DataConfig(cache_dir=str(synthetic_cache)))
    rows = np.random.default_rng(1).permutation(data.x_train.shape[0])[:128].astype(np.int32)
    batch = tf.function(lambda *a: lesson_batch(*a, 10), jit_compile=jit)
    x, y = batch(tf.constant(scale_table()), tf.constant(data.x_train), tf.constant(data.y_train), tf.constant(rows))
    assert x.dtype == tf.float32 and y.dtype == tf.float32
    np.testing.assert_array_equal(x.numpy(), prepare_images(data.x_train[rows]))
    np.testing.assert_array_equal(y.numpy(), one_hot(data.y_train[rows]))


@pytest.mark.slow
def test_compiled_loop_without_xla_equals_keras_fit_bit_for_bit(compose, overrides, tmp_path):
    """Same batches in the same (seed, epoch) order, same train step: the same run as the lesson's fit."""
    deterministic = overrides + ["train.deterministic=true"]
    fit = run(to_typed(compose(deterministic + ["train=lesson"])), tmp_path / "fit")
    loop = run(to_typed(compose(deterministic)), tmp_path / "loop")
    assert_same_run(loop, fit)
    assert [row["epoch"] for row in loop[1]] == [1, 2, 3] and "val_accuracy" in loop[1][0]
    # The same files in the same format: history.csv has fit's columns in fit's order.
    header = (tmp_path / "fit" / rundir.HISTORY_FILE).read_text().splitlines()[0]
    assert header == "epoch,accuracy,loss,val_accuracy,val_loss,seconds"
    assert (tmp_path / "loop" / rundir.HISTORY_FILE).read_text().splitlines()[0] == header
    assert sorted(p.name for p in (tmp_path / "loop").iterdir()) == sorted(p.name for p in (tmp_path / "fit").iterdir())


@pytest.mark.slow
def test_xla_loop_is_reproducible_and_independent_of_the_chunk_length(compose, overrides, tmp_path):
    cfg = to_typed(compose(overrides))
    assert cfg.train.jit_compile and not cfg.train.deterministic
    first = run(cfg, tmp_path / "first")
    engine.forget_warm()  # a second fresh build, trace and compilation
    assert_same_run(run(cfg, tmp_path / "again"), first)
    cfg.train.checkpoint_every_batches = 5  # calls end after batches 5, 10, 15 of each epoch
    assert_same_run(run(cfg, tmp_path / "split"), first)
    # Against the lesson's fit the XLA run differs by float rounding only.
    fit = run(to_typed(compose(overrides + ["train=lesson"])), tmp_path / "fit")
    assert first[1][-1]["accuracy"] == pytest.approx(fit[1][-1]["accuracy"], abs=0.01)
    assert first[0]["test_accuracy"] == pytest.approx(fit[0]["test_accuracy"], abs=0.01)


@pytest.mark.slow
def test_xla_loop_interrupted_mid_epoch_resumes_bit_identically(compose, overrides, tmp_path, caplog):
    cfg = to_typed(compose(overrides))
    reference = run(cfg, tmp_path / "reference")
    # The interrupted and the resumed run train through the reference's kept programs (as the
    # trials of a packed task do); the resume restores its checkpoint into that model.
    cfg.train.checkpoint_every_batches = 5
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=1, at_batch=11)])
    assert rundir.list_checkpoints(run_dir)[0] == rundir.checkpoint_path(run_dir, 1, 10)
    with caplog.at_level("INFO", logger="mnist_hpc.compute"):
        resumed = run(cfg, run_dir)
    assert "1 epoch(s) and 10 batch(es) done" in caplog.text
    assert "same shapes as this process's previous trial" in caplog.text
    assert_same_run(resumed, reference)


@pytest.mark.slow
def test_xla_loop_interrupted_between_epochs_resumes_bit_identically(compose, overrides, tmp_path):
    cfg = to_typed(compose(overrides))
    reference = run(cfg, tmp_path / "reference")
    run_dir = tmp_path / "run"
    # An epoch hook only: calls keep their full length while it watches.
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=2)])
    assert rundir.list_checkpoints(run_dir)[0] == rundir.checkpoint_path(run_dir, 2, 0)
    assert_same_run(run(cfg, run_dir), reference)


def test_one_xla_program_serves_every_chunk_length(synthetic_cache):
    """No Range op in the loop's graph: XLA would take its bound as a compile-time constant and
    compile (and possibly round) differently for every chunk length."""
    import keras
    import tensorflow as tf

    from mnist_hpc.compute.engine import CompiledLoop
    from mnist_hpc.compute.model import build_model, compile_model
    from mnist_hpc.config import ModelConfig, OptimizerConfig

    model = compile_model(build_model(ModelConfig()), OptimizerConfig())
    data = load_mnist(DataConfig(cache_dir=str(synthetic_cache)))
    loop = CompiledLoop(model, data.x_train, data.y_train, 32, 8, jit_compile=True)
    graph = loop._run.get_concrete_function(
        loop._images, loop._labels, tf.TensorSpec((8, 32), tf.int32), tf.TensorSpec((), tf.int32)
    ).graph
    types = {op.type for op in graph.get_operations()}
    assert "While" in types or "StatelessWhile" in types
    assert "Range" not in types
    assert loop._run.experimental_get_tracing_count() == 1
    keras.backend.clear_session()


def test_only_callbacks_with_batch_hooks_shorten_the_calls():
    import keras

    from mnist_hpc.compute.engine import has_batch_hooks

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pass

    assert not has_batch_hooks([EpochClock()])
    assert has_batch_hooks([EpochClock(), interrupter(at_epoch=0, at_batch=3)])


def test_training_modules_import_without_tensorflow():
    code = (
        "import sys, mnist_hpc.compute.train, mnist_hpc.compute.model, mnist_hpc.compute.job, mnist_hpc.config; "
        "print('tensorflow' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.slow
def test_a_job_imports_tensorflow_without_notebook_and_plotting_packages():
    """Keras imports IPython and matplotlib when installed (matplotlib always is: the report needs it).

    A job hides them while TensorFlow imports, so they stay unimported, yet importable; and the
    modules' objects are frozen out of the garbage collector's reach.
    """
    code = (
        "import gc, json, sys\n"
        "from mnist_hpc.compute.runtime import NOT_FOR_JOBS, import_tensorflow\n"
        "tf = import_tensorflow()\n"
        "seen = {name: name in sys.modules for name in NOT_FOR_JOBS}\n"
        "frozen = gc.get_freeze_count()\n"
        "import matplotlib.pyplot\n"
        "print(json.dumps({'seen': seen, 'frozen': frozen, 'tf': hasattr(tf, 'function'), "
        "'pyplot': 'matplotlib.pyplot' in sys.modules, 'again': import_tensorflow() is tf}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["seen"] == {"IPython": False, "matplotlib": False}
    assert got["frozen"] > 100_000  # TensorFlow's modules: ~370,000 objects on this machine
    assert got["tf"] and got["pyplot"] and got["again"]

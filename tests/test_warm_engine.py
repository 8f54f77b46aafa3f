"""Several trials in one process (a packed task, a search worker) trace and compile once per shape.

A later trial of the same shapes trains the earlier trial's model through its compiled programs,
with every variable set as a fresh build sets it: its metrics and weights must equal, bit for bit,
those of the same trial trained with nothing kept from before.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.compute import engine
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import to_typed
from tests.helpers import tiny_overrides


def trial(compose, cache: Path, run_dir: Path, *overrides: str):
    cfg = to_typed(compose(tiny_overrides(cache, run_dir.parent) + [
        "train.epochs=2", "model.dropout=0.3", "data.validation_split=0.2", "train.steps_per_execution=4",
        *overrides]))
    result = train_and_evaluate(cfg, run_dir)
    metrics = rundir.read_metrics(run_dir)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]
    probabilities = rundir.load_predictions(run_dir).y_prob
    weights = keras.saving.load_model(run_dir / rundir.MODEL_FILE).get_weights()
    return result, history, probabilities, weights


@pytest.mark.parametrize("jit, optimizer", [("true", "rmsprop"), ("false", "rmsprop"), ("true", "adam"),
                                           ("true", "sgd"), ("false", "sgd")])
@pytest.mark.slow
def test_a_trial_after_another_of_the_same_shapes_equals_the_trial_alone(compose, synthetic_cache: Path, tmp_path: Path,
                                                                        jit: str, optimizer: str):
    shared = (f"train.jit_compile={jit}", f"optimizer={optimizer}") + (("optimizer.momentum=0.9",) if optimizer == "sgd" else ())
    a = ("train.seed=1", "optimizer.learning_rate=0.002", *shared)
    b = ("train.seed=2", "optimizer.learning_rate=0.0005", *shared)
    engine.forget_warm()
    alone_a = trial(compose, synthetic_cache, tmp_path / "a-alone", *a)
    engine.forget_warm()
    alone_b = trial(compose, synthetic_cache, tmp_path / "b-alone", *b)
    kept = engine._warm
    assert kept is not None
    after_b = trial(compose, synthetic_cache, tmp_path / "a-after-b", *a)
    assert engine._warm is kept, "the second trial of the same shapes reused the first one's engine"
    after_a = trial(compose, synthetic_cache, tmp_path / "b-after-a", *b)
    assert engine._warm is kept
    for alone, reused in ((alone_a, after_b), (alone_b, after_a)):
        assert reused[0] == alone[0]
        assert reused[1] == alone[1]
        np.testing.assert_array_equal(reused[2], alone[2])
        assert len(reused[3]) == len(alone[3])
        for mine, theirs in zip(reused[3], alone[3]):
            np.testing.assert_array_equal(mine, theirs)
    assert alone_a[0] != alone_b[0], "the two trials differ, so equality above means something"


def test_the_shapes_key_holds_every_key_that_reaches_a_program(compose):
    """Trials may share programs only when they differ in keys that never reach one; a key not
    whose facts say it is traced (a new one included) keeps them apart."""
    from types import SimpleNamespace

    from mnist_hpc.config import KEYS, flat_config

    def key(*overrides: str, sha: str = "a" * 64, jit: bool = True) -> str:
        return engine.shapes_key(to_typed(compose(list(overrides))), SimpleNamespace(sha256=sha), jit)

    base = key()
    same = ["train.seed=5", "optimizer.learning_rate=0.1", "train.epochs=9", "paths.output_root=/elsewhere",
            "data.cache_dir=/other", "train.checkpoint_every_batches=10", "train.checkpoint_every_epochs=2",
            "train.intra_op_threads=1", "train.inter_op_threads=1", "train.distribution=none",
            "train.collective_timeout_s=50"]
    for override in same:
        assert key(override) == base, override
    differ = ["model.hidden_units=[256]", "model.dropout=0.2", "model.activation=tanh", "optimizer.name=adam",
              "optimizer.momentum=0.5", "train.batch_size=64", "train.steps_per_execution=8", "train.deterministic=true",
              "train.execution=keras_fit", "train.jit_compile=false", "data.validation_split=0.1"]
    for override in differ:
        assert key(override) != base, override
    assert key(sha="b" * 64) != base and key(jit=False) != base
    # Every key of the config is either declared as never traced or part of the key.
    flat = flat_config(to_typed(compose([])))
    traced = set(json.loads(base)) - {"data.sha256", "xla"}
    assert traced == {k for k in flat if KEYS[k].traced}
    assert {o.split("=")[0] for o in differ} <= traced

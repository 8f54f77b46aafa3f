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
from tests.conftest import tiny_overrides


def trial(compose, cache: Path, run_dir: Path, *overrides: str):
    cfg = to_typed(compose(tiny_overrides(cache, run_dir.parent) + [
        "train.epochs=2", "model.dropout=0.3", "data.validation_split=0.2", "train.steps_per_execution=4",
        *overrides]))
    result = train_and_evaluate(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]
    probabilities = rundir.load_predictions(run_dir).y_prob
    weights = keras.saving.load_model(run_dir / rundir.MODEL_FILE).get_weights()
    return result, history, probabilities, weights


@pytest.mark.parametrize("jit", ["true", "false"])
def test_a_trial_after_another_of_the_same_shapes_equals_the_trial_alone(compose, synthetic_cache: Path, tmp_path: Path, jit: str):
    a = ("train.seed=1", "optimizer.learning_rate=0.002", f"train.jit_compile={jit}")
    b = ("train.seed=2", "optimizer.learning_rate=0.0005", f"train.jit_compile={jit}")
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

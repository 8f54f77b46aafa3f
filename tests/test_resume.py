"""Interrupt-then-resume without Slurm: the resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.compute import checkpoint
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import to_typed
from tests.helpers import (
    Interrupt,
    checkpoint_positions,
    finished_metrics,
    interrupter,
    resume_line,
    snapshot,
    strip_seconds,
    tiny_overrides,
    weights,
)


@pytest.fixture
def cfg(compose, synthetic_cache, tmp_path):
    overrides = tiny_overrides(synthetic_cache, tmp_path) + [
        "train.epochs=4",
        "train.deterministic=true",
        "model.dropout=0.2",
        "data.validation_split=0.1",
    ]
    return to_typed(compose(overrides))


@pytest.fixture
def reference(cfg, tmp_path):
    result = train_and_evaluate(cfg, tmp_path / "reference")
    return result, finished_metrics(tmp_path / "reference"), weights(tmp_path / "reference")


def assert_same_as_reference(run_dir: Path, result: dict, reference) -> None:
    ref_result, ref_metrics, ref_weights = reference
    metrics = finished_metrics(run_dir)
    assert result == ref_result
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]  # each epoch exactly once
    assert strip_seconds(metrics["history"]) == strip_seconds(ref_metrics["history"])
    for got, want in zip(weights(run_dir), ref_weights):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_interrupted_between_epochs_resumes_identically(cfg, reference, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=2)])
    assert checkpoint_positions(run_dir) == [(2, 0), (1, 0)]
    assert not (run_dir / rundir.METRICS_FILE).exists()
    with caplog.at_level(logging.INFO, logger="mnist_hpc.compute.train"):
        result = train_and_evaluate(cfg, run_dir)
    assert f"{resume_line(2, 0)}: 2 epoch(s)" in caplog.text
    assert_same_as_reference(run_dir, result, reference)


@pytest.mark.slow
def test_interrupted_mid_epoch_resumes_from_the_batch_checkpoint(compose, synthetic_cache, cfg, reference, tmp_path, caplog):
    cfg.train.checkpoint_every_batches = 5
    run_dir = tmp_path / "run"
    # 540 training samples / 32 = 17 batches per epoch; stop after batch 12 of epoch 3.
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=2, at_batch=11)])
    assert checkpoint_positions(run_dir)[0] == (2, 10)
    with caplog.at_level(logging.INFO, logger="mnist_hpc.compute.train"):
        result = train_and_evaluate(cfg, run_dir)
    assert "2 epoch(s) and 10 batch(es) done" in caplog.text
    assert_same_as_reference(run_dir, result, reference)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(cfg, reference, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=3)])
    newest, previous = rundir.list_checkpoints(run_dir)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    newest.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO):
        result = train_and_evaluate(cfg, run_dir)
    assert f"checkpoint {newest.name} is unreadable" in caplog.text
    assert f"resuming from {previous.name}" in caplog.text
    assert_same_as_reference(run_dir, result, reference)


def test_truncated_only_checkpoint_fails_loudly(cfg, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=1)])
    [only] = rundir.list_checkpoints(run_dir)
    only.write_bytes(only.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        train_and_evaluate(cfg, run_dir)


def test_checkpoint_of_another_config_is_refused(cfg, tmp_path):
    from mnist_hpc.claim import RunConflict

    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=1)])
    before = snapshot(run_dir)
    cfg.optimizer.learning_rate = 0.01
    with pytest.raises(RunConflict, match=r"another config \(optimizer.learning_rate: 0.001 -> 0.01\)"):
        train_and_evaluate(cfg, run_dir)
    assert snapshot(run_dir) == before  # refused before anything in the directory changed


@pytest.mark.parametrize("at_batch", [None, 11], ids=["between-epochs", "mid-epoch"])
@pytest.mark.slow
def test_lesson_execution_resumes_identically(compose, synthetic_cache, tmp_path, caplog, at_batch):
    """``train=lesson`` (Keras' own ``fit``): interrupted and resumed, it ends bit-identical too."""
    from mnist_hpc.config import Execution

    overrides = tiny_overrides(synthetic_cache, tmp_path) + [
        "train=lesson",
        "train.epochs=4",
        "train.deterministic=true",
        "model.dropout=0.2",
        "data.validation_split=0.1",
        "train.checkpoint_every_batches=5",
    ]
    cfg = to_typed(compose(overrides))
    assert cfg.train.execution is Execution.keras_fit
    reference_result = train_and_evaluate(cfg, tmp_path / "reference")
    reference = (
        reference_result,
        finished_metrics(tmp_path / "reference"),
        weights(tmp_path / "reference"),
    )
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=2, at_batch=at_batch)])
    expected = (2, 0) if at_batch is None else (2, 10)
    assert checkpoint_positions(run_dir)[0] == expected
    with caplog.at_level(logging.INFO, logger="mnist_hpc.compute.train"):
        result = train_and_evaluate(cfg, run_dir)
    assert resume_line(*expected) in caplog.text
    assert_same_as_reference(run_dir, result, reference)

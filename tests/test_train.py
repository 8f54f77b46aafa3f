"""Training end to end: the Hydra entry point, the outputs, determinism, and no network."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_hpc import rundir
from mnist_hpc.compute.engine import epoch_order
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import to_typed
from tests.helpers import IN_CI, SHARED_MNIST, TRAIN, finished_metrics, run_json, run_log, tiny_overrides


def run_train_cli(args: list[str], *, netns: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (["unshare", "--net"] if netns else []) + TRAIN + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_default_model_has_the_lessons_parameter_count():
    from mnist_hpc.compute.model import build_model
    from mnist_hpc.config import ModelConfig

    model = build_model(ModelConfig())
    assert model.count_params() == 407_050
    assert [layer.units for layer in model.layers] == [512, 10]


def test_epoch_order_is_fresh_each_epoch_and_reproducible():
    a0, a1 = epoch_order(7, 0, 1000), epoch_order(7, 1, 1000)
    assert not np.array_equal(a0, a1)
    np.testing.assert_array_equal(a0, epoch_order(7, 0, 1000))
    np.testing.assert_array_equal(np.sort(a1), np.arange(1000))


@pytest.mark.slow
def test_one_epoch_through_the_hydra_entry_point(synthetic_cache: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_ID": "4242"}
    proc = run_train_cli(tiny_overrides(synthetic_cache, tmp_path / "out") + [f"hydra.run.dir={run_dir}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(run_dir) in proc.stdout + proc.stderr

    for name in (rundir.METRICS_FILE, rundir.HISTORY_FILE, rundir.MODEL_FILE, rundir.CONFIG_FILE, rundir.PROVENANCE_FILE,
                 rundir.LOG_FILE, rundir.PREDICTIONS_FILE):
        assert (run_dir / name).is_file(), name
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name not in (rundir.HYDRA_DIR, rundir.LEASE_LOCK)]

    metrics = finished_metrics(run_dir)
    assert metrics["epochs_completed"] == 1 and len(metrics["history"]) == 1
    assert 0.5 < metrics["test_accuracy"] <= 1.0  # 10 separable templates: far above chance (0.1)
    assert 0.0 < metrics["test_loss"] < 2.3
    assert metrics["trainable_params"] == 407_050
    assert metrics["history"][0]["seconds"] > 0 and metrics["wall_time_s"] >= metrics["train_time_s"] > 0
    assert metrics["threads"] == {"intra_op_threads": 1, "inter_op_threads": 1}
    # Where the wall time went: laps that follow each other, so they add up to (almost) all of it.
    phases = metrics["phases"]
    assert set(phases) == {"load_s", "claim_s", "setup_s", "epochs_s", "evaluate_s", "write_s"}
    assert all(v >= 0 for v in phases.values())
    assert phases["epochs_s"] >= metrics["history"][0]["seconds"]
    assert sum(phases.values()) <= metrics["wall_time_s"] <= sum(phases.values()) + 1.0

    with open(run_dir / rundir.HISTORY_FILE) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert float(rows[0]["accuracy"]) == pytest.approx(metrics["history"][0]["accuracy"])

    config = yaml.safe_load((run_dir / rundir.CONFIG_FILE).read_text())
    assert config["train"]["epochs"] == 1 and config["data"]["cache_dir"] == str(synthetic_cache)
    assert config["optimizer"]["name"] == "rmsprop"

    prov = run_json(run_dir, rundir.PROVENANCE_FILE)
    manifest = json.loads((synthetic_cache / "mnist.npz.manifest.json").read_text())
    assert prov["data_sha256"] == manifest["sha256"]
    assert prov["slurm_job_id"] == "4242"
    assert set(prov["versions"]) >= {"python", "tensorflow", "keras", "numpy", "hydra", "submitit"}
    assert all(prov["versions"][k] for k in ("python", "tensorflow", "keras", "numpy", "hydra", "submitit"))
    assert prov["started"] <= prov["ended"]

    log = run_log(run_dir)
    assert "epoch 1/1" in log and "407,050" in log
    assert "\r" not in log and "\x1b[" not in log

    # The saved model scores what metrics.json reports.
    import keras

    from mnist_hpc.compute.data import load_mnist
    from mnist_hpc.config import DataConfig

    x_test, y_test = load_mnist(DataConfig(cache_dir=str(synthetic_cache))).lesson("test")
    model = keras.models.load_model(run_dir / rundir.MODEL_FILE)
    _, acc = model.evaluate(x_test, y_test, verbose=0, batch_size=1024)
    assert acc == pytest.approx(metrics["test_accuracy"], abs=1e-6)

    # Saved predictions agree with the reported accuracy; kept images are the wrong ones.
    with np.load(run_dir / rundir.PREDICTIONS_FILE) as pred:
        assert pred["y_prob"].shape == (200, 10)
        np.testing.assert_array_equal(pred["y_true"], y_test.argmax(axis=1))
        assert (pred["y_pred"] == pred["y_true"]).mean() == pytest.approx(metrics["test_accuracy"], abs=1e-6)
        assert all(pred["y_pred"][i] != pred["y_true"][i] for i in pred["wrong_index"])
        assert pred["wrong_images"].shape == (len(pred["wrong_index"]), 28, 28)


@pytest.mark.slow
def test_training_runs_with_no_network_at_all(synthetic_cache: Path, tmp_path: Path):
    """``unshare --net``: the process has only a down loopback, so any network use would fail."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is required for the offline test")
    run_dir = tmp_path / "run"
    proc = run_train_cli(tiny_overrides(synthetic_cache, tmp_path) + [f"hydra.run.dir={run_dir}"], netns=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert finished_metrics(run_dir)["test_accuracy"] > 0.5


def test_missing_cache_fails_with_the_prefetch_command(tmp_path: Path):
    proc = run_train_cli(tiny_overrides(tmp_path / "empty", tmp_path) + [f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode != 0
    assert f"mnist-hpc-prefetch data.cache_dir={tmp_path / 'empty'}" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / rundir.METRICS_FILE).exists()


@pytest.mark.slow
def test_deterministic_runs_give_identical_metrics(compose, synthetic_cache: Path, tmp_path: Path):
    overrides = tiny_overrides(synthetic_cache, tmp_path) + ["train.deterministic=true", "train.epochs=2",
                                                             "model.dropout=0.2", "data.validation_split=0.1"]
    cfg = to_typed(compose(overrides))
    first = train_and_evaluate(cfg, tmp_path / "a")
    second = train_and_evaluate(cfg, tmp_path / "b")
    assert first == second
    h1 = finished_metrics(tmp_path / "a")["history"]
    h2 = finished_metrics(tmp_path / "b")["history"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in h1] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in h2
    ]
    assert "val_accuracy" in h1[0] and first["best_val_accuracy"] >= first["val_accuracy"]


@pytest.mark.parametrize("execution", ["keras_fit", "compiled_loop"])
@pytest.mark.slow
def test_a_deterministic_run_with_validation_logs_no_tensorflow_error_line(synthetic_cache: Path, tmp_path: Path, execution: str):
    """Arrays handed to evaluate under op determinism made TensorFlow log an E0000 line into every job log."""
    overrides = tiny_overrides(synthetic_cache, tmp_path) + [
        "train.deterministic=true", "data.validation_split=0.2", f"train.execution={execution}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_train_cli(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / rundir.METRICS_FILE).is_file()
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("E0000") or "use_unbounded_threadpool" in line]
    assert errors == []


@pytest.mark.slow
def test_real_mnist_reaches_the_lessons_accuracy(tmp_path: Path):
    """Import the real mnist.npz with --from, train the default config, reach >= 0.975."""
    if not SHARED_MNIST.is_file():
        if IN_CI:
            pytest.fail(f"CI must have the real dataset at {SHARED_MNIST}")
        pytest.skip(f"real MNIST not at {SHARED_MNIST}")
    cache = tmp_path / "cache"
    pre = subprocess.run(
        [sys.executable, "-c", "from mnist_hpc.cli import prefetch_main; prefetch_main()",
         "--from", str(SHARED_MNIST), f"data.cache_dir={cache}"],
        capture_output=True, text=True, timeout=300,
    )
    assert pre.returncode == 0, pre.stderr
    run_dir = tmp_path / "run"
    proc = run_train_cli([f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", f"paths.output_root={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = finished_metrics(run_dir)
    assert metrics["epochs_completed"] == 5
    assert metrics["test_accuracy"] >= 0.975


def test_test_scores_from_predictions_equal_kerass_loss_and_accuracy():
    """One pass over the test set: the scores computed from the predictions are Keras's own."""
    import keras

    from mnist_hpc.compute.train import test_scores

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1000, 10)).astype(np.float32) * 4
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probabilities[:5] = 0.0  # rows that clip: a zero probability for the true class
    probabilities[:5, 0] = 1.0
    labels = rng.integers(0, 10, size=1000)
    labels[:5] = 3
    y = np.eye(10, dtype=np.float32)[labels]
    scores = test_scores(probabilities, y)
    expected_loss = float(np.mean(keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(y, probabilities))))
    expected_accuracy = float(np.mean(keras.ops.convert_to_numpy(keras.metrics.categorical_accuracy(y, probabilities))))
    assert scores["test_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert scores["test_accuracy"] == pytest.approx(expected_accuracy, abs=1e-7) and scores["test_accuracy"] * 1000 == int(round(expected_accuracy * 1000))
    assert scores["test_loss"] > 16 * 5 / 1000  # the five clipped rows add -log(1e-7) = 16.1 each

"""The typed schema: defaults are the lesson's, and bad values fail at composition naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from mnist_hpc import rundir
from mnist_hpc.config import ConfigError, OptimizerName, to_typed


def test_defaults_are_the_lesson(compose, monkeypatch):
    monkeypatch.setenv("MNIST_HPC_CACHE", "/shared/cache")
    cfg = to_typed(compose())
    assert cfg.model.hidden_units == [512]
    assert cfg.model.activation == "relu"
    assert cfg.model.dropout == 0.0
    assert cfg.optimizer.name is OptimizerName.rmsprop
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
    assert (cfg.train.epochs, cfg.train.batch_size) == (5, 128)
    assert cfg.data.validation_split == 0.0
    assert cfg.data.cache_dir == "/shared/cache"


def test_cache_dir_falls_back_to_home(compose, monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_HPC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert to_typed(compose()).data.cache_dir == f"{tmp_path}/.cache/mnist-hpc"


def test_output_root_follows_scratch(compose, monkeypatch):
    monkeypatch.setenv("SCRATCH", "/scratch/u1")
    assert to_typed(compose()).paths.output_root == "/scratch/u1/mnist-hpc"
    monkeypatch.delenv("SCRATCH")
    assert to_typed(compose()).paths.output_root == "outputs/mnist-hpc"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-4", "train.batch_size"),
        ("optimizer.learning_rate=-0.1", "optimizer.learning_rate"),
        ("model.dropout=1.5", "model.dropout"),
        ("model.hidden_units=[]", "model.hidden_units"),
        ("model.hidden_units=[512,0]", "model.hidden_units[1]"),
        ("model.activation=relux", "model.activation"),
        ("data.validation_split=1.0", "data.validation_split"),
    ],
)
def test_invalid_values_name_the_key(compose, override, key):
    with pytest.raises(ConfigError) as err:
        to_typed(compose([override]))
    assert f"{key}=" in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epochz=3", "epochz"),
        ("optimizer.name=adagrad", "optimizer.name"),
        ("train.epochs=five", "train.epochs"),
        ("+model.width=3", "width"),
    ],
)
def test_unknown_keys_and_types_rejected(compose, override, needle):
    # Hydra rejects most at composition; a forced `+key` passes Hydra and fails in to_typed.
    with pytest.raises((ConfigCompositionException, ConfigError)) as err:
        to_typed(compose([override]))
    text = str(err.value) + str(err.value.__cause__)
    assert needle in text


def test_cli_rejects_bad_config_before_training(tmp_path: Path):
    """The Hydra app exits non-zero naming the key, and creates no run outputs."""
    for override, key in [("train.epochs=0", "train.epochs"), ("optimizer.name=adagrad", "optimizer.name")]:
        proc = subprocess.run(
            [sys.executable, "-c", "from mnist_hpc.cli import train_main; train_main()",
             override, f"paths.output_root={tmp_path}", f"data.cache_dir={tmp_path}/nocache"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode != 0
        assert key in proc.stderr + proc.stdout
        assert not list(tmp_path.rglob(rundir.METRICS_FILE))

"""GPU nodes: memory growth on every visible GPU before TensorFlow takes them.

The unit tests drive :func:`gpu_memory_growth` with a stand-in for ``tf.config``. The training
test needs a GPU: where none is visible it is reported as skipped ("not run: no GPU"), never as
passed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from mnist_hpc import rundir
from mnist_hpc.compute.runtime import gpu_memory_growth
from tests.helpers import tiny_overrides


class FakeConfig:
    """``tf.config`` as far as gpu_memory_growth uses it: GPUs, some already initialised."""

    def __init__(self, names: list[str], initialised: dict[str, bool]) -> None:
        self.gpus = [SimpleNamespace(name=n, device_type="GPU") for n in names]
        self.initialised = initialised  # name -> the growth it was initialised with
        self.growth: dict[str, bool] = {}
        self.experimental = SimpleNamespace(set_memory_growth=self._set, get_memory_growth=self._get)

    def list_physical_devices(self, kind: str) -> list[SimpleNamespace]:
        return self.gpus if kind == "GPU" else []

    def _set(self, gpu: SimpleNamespace, on: bool) -> None:
        if gpu.name in self.initialised:
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        self.growth[gpu.name] = on

    def _get(self, gpu: SimpleNamespace) -> bool:
        return self.initialised.get(gpu.name, self.growth.get(gpu.name, False))


def test_memory_growth_is_set_on_every_gpu():
    config = FakeConfig(["/physical_device:GPU:0", "/physical_device:GPU:1"], {})
    assert gpu_memory_growth(SimpleNamespace(config=config)) == ["/physical_device:GPU:0", "/physical_device:GPU:1"]
    assert config.growth == {"/physical_device:GPU:0": True, "/physical_device:GPU:1": True}


def test_a_cpu_node_sets_nothing():
    config = FakeConfig([], {})
    assert gpu_memory_growth(SimpleNamespace(config=config)) == [] and config.growth == {}


def test_a_gpu_initialised_earlier_keeps_what_it_has_and_one_without_growth_is_named(caplog):
    config = FakeConfig(["/physical_device:GPU:0", "/physical_device:GPU:1"],
                        {"/physical_device:GPU:0": True, "/physical_device:GPU:1": False})
    with caplog.at_level(logging.WARNING, logger="mnist_hpc.compute.runtime"):
        assert gpu_memory_growth(SimpleNamespace(config=config)) == ["/physical_device:GPU:0"]
    assert "GPU:1 was initialised without memory growth" in caplog.text


@pytest.mark.slow
def test_training_on_a_gpu_runs_with_memory_growth(synthetic_cache: Path, tmp_path: Path, compose):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        pytest.skip("not run: no GPU on this machine (needs a CUDA TensorFlow and a visible GPU)")
    from mnist_hpc.compute.train import train_and_evaluate
    from mnist_hpc.config import to_typed

    cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path)))
    metrics = train_and_evaluate(cfg, tmp_path / "run")
    assert all(tf.config.experimental.get_memory_growth(gpu) for gpu in gpus)
    assert metrics["epochs_completed"] == 1 and 0.5 < metrics["test_accuracy"] <= 1.0
    assert rundir.read_metrics(tmp_path / "run")["test_accuracy"] == metrics["test_accuracy"]

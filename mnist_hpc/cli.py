"""Console entry points. Each stays thin and calls a plain function; none imports TensorFlow."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig


def _train_task(cfg: DictConfig) -> float:
    """One Hydra job: check the config, train in Hydra's output dir, return the objective."""
    from hydra.core.hydra_config import HydraConfig

    from mnist_hpc.config import to_typed
    from mnist_hpc.train import train_and_evaluate

    typed = to_typed(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from mnist_hpc.outputs import objective

    return objective(train_and_evaluate(typed, run_dir))


def train_main() -> None:
    """``mnist-hpc-train``: the Hydra app (``-m`` for multirun, overrides as arguments)."""
    import hydra

    from mnist_hpc.config import conf_dir, register_configs

    register_configs()
    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins

    register_plugins()

    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_train_task)()


def prefetch_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-prefetch``: verify MNIST into the cache on a login node."""
    from mnist_hpc.prefetch import main

    sys.exit(main(argv))


def status_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-status``: state of submitted jobs from sacct and the run directories."""
    from mnist_hpc.status import main

    sys.exit(main(argv))


def report_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-report``: tables and plots of a sweep or run directory."""
    from mnist_hpc.report import main

    sys.exit(main(argv))

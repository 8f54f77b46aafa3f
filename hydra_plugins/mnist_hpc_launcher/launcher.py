"""Hydra launcher plugins ``hydra/launcher=slurm`` and ``hydra/launcher=local``.

Hydra instantiates launchers only from the ``hydra_plugins`` package; these classes are thin,
the logic lives in :mod:`mnist_hpc.login.launcher`. Imported at every Hydra start-up: keep it
light. Hydra's plugin scan may execute this module a second time through its own loader, so
it defines no dataclasses (they need their module in ``sys.modules``); the options live in
:mod:`mnist_hpc.login.launcher.options`, registered in ConfigStore here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig

from mnist_hpc.login.launcher import options
from mnist_hpc.login.launcher.compose import SweepComposer
from mnist_hpc.login.launcher.preflight import check_writable
from mnist_hpc.login.launcher.submit import SweepRecord, launch_jobs

options.register()


class _SubmititLauncher(Launcher):
    cluster = "local"
    # launch() composes and checks every job before it queues any: the grid sweeper leaves it to us
    # (mnist_hpc.login.launcher.grid.CHECKS_EVERY_JOB).
    checks_every_job = True

    def __init__(self, **params: Any) -> None:
        self.params = DictConfig(params)
        self.config: Optional[DictConfig] = None
        self.task_function: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        # Before Hydra's sweeper creates the sweep directory: fail with a clear message.
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        check_writable(sweep_dir)
        # hydra.launcher as its dataclass, once: everything below reads typed options.
        self.options = options.typed(config.hydra.launcher, self.cluster, sweep_dir)
        # Hydra's sweeper rewrites multirun.yaml next; a refused launch puts it back.
        self.sweep_record = SweepRecord(sweep_dir)
        self.composer = SweepComposer(hydra_context.config_loader, config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        return launch_jobs(self, self.cluster, job_overrides, initial_job_idx)


class SlurmLauncher(_SubmititLauncher):
    cluster = "slurm"


class LocalLauncher(_SubmititLauncher):
    cluster = "local"


def register_plugins() -> None:
    """Register our launchers and sweepers with Hydra explicitly.

    Hydra's plugin scan walks ``hydra_plugins.__path__``, which an editable install fills with
    a path hook rather than a directory, so the scan misses this package there.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.mnist_hpc_launcher.sweeper import AsyncOptunaSweeper, GridSweeper

    for clazz in (SlurmLauncher, LocalLauncher, GridSweeper, AsyncOptunaSweeper):
        Plugins.instance().register(clazz)

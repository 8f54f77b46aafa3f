"""Hydra launcher plugins ``hydra/launcher=slurm`` and ``hydra/launcher=local``.

Hydra instantiates launchers only from the ``hydra_plugins`` package; these classes are thin,
the logic lives in :mod:`mnist_hpc.launch`. Imported at every Hydra start-up: keep it light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from mnist_hpc.launch import BaseQueueConf, SlurmQueueConf, check_writable, launch_jobs

ConfigStore.instance().store(group="hydra/launcher", name="slurm_schema", node=SlurmQueueConf, provider="mnist_hpc")
ConfigStore.instance().store(group="hydra/launcher", name="local_schema", node=BaseQueueConf, provider="mnist_hpc")


class ValidatingLauncherSweeper(Sweeper):
    """Hydra's basic sweeper, minus its second composition of every job with our launchers.

    The basic sweeper composes each job's config once to validate it, then the launcher
    composes it again; ours composes, validates and checks every job before queueing anything,
    so the first pass only doubles the time to queue a large sweep. With any other launcher
    the check runs as usual. It wraps rather than subclasses BasicSweeper: Hydra's plugin scan
    re-imports that module, which breaks subclasses created before the scan.
    """

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None) -> None:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        self.inner = BasicSweeper(max_batch_size=max_batch_size, params=params)

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if isinstance(self.inner.launcher, _SubmititLauncher):
            self.inner.validate_batch_is_legal = lambda batch: None  # type: ignore[method-assign]

    def sweep(self, arguments: list[str]) -> Any:
        return self.inner.sweep(arguments)


@dataclass
class ValidatingLauncherSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.mnist_hpc_launcher.launcher.ValidatingLauncherSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="mnist_hpc", node=ValidatingLauncherSweeperConf, provider="mnist_hpc"
)


class _SubmititLauncher(Launcher):
    cluster = "local"

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
        check_writable(Path(str(config.hydra.sweep.dir)).resolve())

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        return launch_jobs(self, self.cluster, job_overrides, initial_job_idx)


class SlurmLauncher(_SubmititLauncher):
    cluster = "slurm"


class LocalLauncher(_SubmititLauncher):
    cluster = "local"


def register_plugins() -> None:
    """Register both launchers with Hydra explicitly.

    Hydra's plugin scan walks ``hydra_plugins.__path__``, which an editable install fills with
    a path hook rather than a directory, so the scan misses this package there.
    """
    from hydra.core.plugins import Plugins

    for clazz in (SlurmLauncher, LocalLauncher, ValidatingLauncherSweeper):
        Plugins.instance().register(clazz)

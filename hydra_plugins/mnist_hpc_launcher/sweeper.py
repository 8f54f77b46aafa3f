"""Hydra sweeper plugins: ``hydra/sweeper=grid`` (``-m``'s default, see ``conf/default_sweeper.yaml``)
expands a,b,c values into jobs for our launchers; ``hydra/sweeper=async_optuna`` queues an
asynchronous Optuna search and returns.

Thin, like the launchers beside them: the logic is :mod:`mnist_hpc.login.launcher.grid` and
:mod:`mnist_hpc.login.launcher.search`, the options' dataclass lives there too (Hydra's plugin scan
may execute this module twice). The grid sweeper's options are the basic sweeper's
(``conf/hydra/sweeper/grid.yaml`` extends its config).
"""

from __future__ import annotations

from typing import Any, Optional

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from mnist_hpc.login.launcher import grid, search

search.register()


class GridSweeper(Sweeper):
    """Hydra's basic sweeper's jobs and options; a launcher that checks every job is not preceded by
    Hydra's composition of each job (see :mod:`mnist_hpc.login.launcher.grid`)."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict[str, str]] = None) -> None:
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Any = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        return grid.run_sweep(self, arguments)


class AsyncOptunaSweeper(Sweeper):
    """Checks the search, creates or continues its study and queues its workers; waits for nothing."""

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.config: Optional[DictConfig] = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def sweep(self, arguments: list[str]) -> None:
        search.submit_search(self, arguments)

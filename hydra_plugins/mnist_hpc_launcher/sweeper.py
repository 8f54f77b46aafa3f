"""Hydra sweeper plugin ``hydra/sweeper=async_optuna``: queue an asynchronous Optuna search and return.

Thin, like the launchers beside it: the logic is :mod:`mnist_hpc.login.launcher.search`, the
options' dataclass lives there too (Hydra's plugin scan may execute this module twice).
"""

from __future__ import annotations

from typing import Any, Optional

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from mnist_hpc.login.launcher import search

search.register()


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

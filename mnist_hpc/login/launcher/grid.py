"""The grid sweep (``hydra/sweeper=grid``, ``-m``'s default through ``conf/default_sweeper.yaml``):
Hydra's basic sweeper's jobs, each composed once.

Hydra's basic sweeper composes every job with ``load_sweep_config`` only to see that it composes
(``Sweeper.validate_batch_is_legal``), drops the result and hands the batch to the launcher. Our
launchers compose and check every job themselves before anything is queued
(:mod:`mnist_hpc.login.launcher.compose`: once per choice of config groups, which is what makes
1,000 trials quick), so for them that pass is the same work done a second time, slowly. This
sweeper expands the same jobs in the same order (the basic sweeper's own expansion, through
:func:`mnist_hpc.hydra_adapter.sweep_batches`), writes ``multirun.yaml`` as it does, and leaves the
checking to a launcher that says it checks every job (:data:`CHECKS_EVERY_JOB`). Any other
launcher (Hydra's basic one, a user's) gets Hydra's pass, as with the basic sweeper.

``hydra/sweeper=basic`` still works with our launchers, only slower: Hydra composes each job in
full first, and refuses a job it cannot compose with its own message before ours would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mnist_hpc.hydra_adapter import sweep_batches
from mnist_hpc.login.launcher.plan import PreflightError

# A launcher class attribute: True when its launch() composes and checks every job of a batch
# before it queues any (Hydra's own check before launch() would only repeat that work).
CHECKS_EVERY_JOB = "checks_every_job"


def check_options(max_batch_size: Any) -> Optional[int]:
    """``hydra.sweeper.max_batch_size``: null (one batch) or a positive number of jobs per batch."""
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        raise PreflightError(
            f"nothing was queued: hydra.sweeper.max_batch_size={max_batch_size} is not a number of jobs per "
            "batch; give a positive number, or null for one batch"
        )
    return max_batch_size


def run_sweep(sweeper: Any, arguments: Sequence[str]) -> list[Sequence[Any]]:
    """Expand the sweep, and launch it batch by batch; what Hydra's basic sweeper returns.

    Args:
        sweeper: the set-up sweeper plugin (``config``, ``hydra_context``, ``launcher``,
            ``max_batch_size``, ``params``).
        arguments: the command line's overrides (``hydra.sweeper.params`` come first).

    Returns:
        The launcher's job returns, one list per batch; a failed job's error is raised.
    """
    max_batch_size = check_options(sweeper.max_batch_size)
    lines = [f"{key}={value}" for key, value in (sweeper.params or {}).items()] + list(arguments)
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    overrides = parser.parse_overrides(lines)
    try:
        batches = sweep_batches(overrides, max_batch_size)
    except HydraException as exc:  # a sweep the basic sweeper cannot expand: interval(...)
        raise PreflightError(
            f"nothing was queued: {exc}; a grid takes a,b,c values, range(...) and choice(...): "
            "search an interval with hparams_search=optuna"
        ) from exc

    sweep_dir = Path(str(sweeper.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")

    checked_by_launcher = getattr(sweeper.launcher, CHECKS_EVERY_JOB, False) is True
    returns: list[Sequence[Any]] = []
    initial_job_idx = 0
    for batch in batches:
        if not checked_by_launcher:
            sweeper.validate_batch_is_legal(batch)
        results = sweeper.launcher.launch(batch, initial_job_idx=initial_job_idx)
        for result in results:
            _ = result.return_value  # raises a failed job's error, as the basic sweeper does
        initial_job_idx += len(batch)
        returns.append(results)
    return returns

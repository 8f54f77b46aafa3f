"""Every use of Hydra's private API (``hydra._internal``), in one place.

Hydra's public API has no equivalent for these four; the rest of the package calls them here, never
``hydra._internal`` itself. ``tests/test_hydra_adapter.py`` pins each behaviour relied on (input ->
output) with a test named after the function, so that a Hydra release that changes one fails a test
that names it rather than a sweep. Written against hydra-core 1.3.8 (``pyproject.toml`` keeps 1.3).

Light: Hydra only, imported inside each function (both the login and the compute side call it).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from omegaconf import DictConfig


def apply_overrides(config: DictConfig, overrides: Sequence[Any]) -> None:
    """Apply parsed overrides to a composed config in place, as Hydra's composition applies a job's
    value overrides: each converted and checked by its node, ``+``/``++``/``~`` honoured, and the
    failures raised as Hydra's ``ConfigCompositionException`` with Hydra's own message.

    Args:
        config: a composed config (changed in place).
        overrides: ``Override`` objects from Hydra's ``OverridesParser``, applied in order.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(list(overrides), config)


def overrides_dirname(overrides: Sequence[Any], *, kv_sep: str, item_sep: str, exclude_keys: Sequence[str]) -> str:
    """``hydra.job.override_dirname`` of a job with these parsed overrides, as Hydra computes it:
    their input lines, those of ``exclude_keys`` left out, sorted, joined by ``item_sep``, with each
    ``=`` replaced by ``kv_sep``."""
    from hydra._internal.config_loader_impl import get_overrides_dirname

    return get_overrides_dirname(overrides=list(overrides), exclude_keys=list(exclude_keys), item_sep=item_sep, kv_sep=kv_sep)


def is_config_group(config_loader: Any, name: str) -> bool:
    """Whether ``name`` (an override's ``key_or_group``, such as ``optimizer`` or ``train.seed``) is a
    config group on the loader's search path: ``optimizer=adam`` chooses a config, ``train.seed=1``
    sets a value."""
    return bool(config_loader.repository.group_exists(name))


def sweep_batches(overrides: Sequence[Any], max_batch_size: Optional[int]) -> list[list[list[str]]]:
    """The jobs of a sweep as Hydra's basic sweeper expands them, split into batches.

    Every combination of the swept values (``a=1,2 b=x,y``: the cartesian product, in the order the
    keys first appear, the last key varying fastest), each job a list of ``key=value`` strings; a
    key given twice keeps its last value in its first place. ``max_batch_size`` None: one batch.

    Raises:
        hydra.errors.HydraException: a sweep the basic sweeper cannot expand (``interval(...)``).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(list(overrides), max_batch_size)


# Variables run_app sets in this process for Hydra's sake, each with the user's own value (None:
# unset): jobs queued meanwhile (which inherit the environment: sbatch's --export=ALL, submitit's
# local controller) get the user's value back (mnist_hpc.contract.guard.private_submission).
_SET_FOR_HYDRA: dict[str, Optional[str]] = {}


def set_for_hydra() -> dict[str, Optional[str]]:
    """The environment variables this process holds for Hydra's sake, with the user's own values
    (None: unset) (see :func:`run_app`)."""
    return dict(_SET_FOR_HYDRA)


def run_app(app: Any) -> None:
    """Run a ``@hydra.main`` app; an error Hydra reports compactly is one line and exit status 1.

    Hydra prints a compact error (our refusals: ``nothing was queued: ...``; its own: a bad
    override) and then "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack
    trace", which promises a traceback a known error does not have. With that variable set, Hydra
    raises instead of printing (``hydra._internal.utils.run_and_report``), and the error is printed
    here without the hint. Any other exception -- a bug -- keeps its whole traceback. A user who
    sets ``HYDRA_FULL_ERROR=1`` gets Hydra's behaviour, tracebacks included.
    """
    import os
    import sys

    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    users = os.environ.get("HYDRA_FULL_ERROR")
    if users == "1":
        app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _SET_FOR_HYDRA["HYDRA_FULL_ERROR"] = users
    try:
        app()
    except CompactHydraException as exc:
        cause = f"\n{exc.__cause__}" if isinstance(exc.__cause__, OmegaConfBaseException) else ""
        sys.stderr.write(f"{exc}{cause}\n")
        sys.exit(1)
    finally:
        del _SET_FOR_HYDRA["HYDRA_FULL_ERROR"]
        if users is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = users

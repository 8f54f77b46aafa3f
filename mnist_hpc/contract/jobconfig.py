"""A queued job's config: one Hydra composition per launch, plus the job's own values.

A sweep's jobs differ in a few values; their composed configs differ nowhere else. The login
node (:mod:`mnist_hpc.login.launcher.compose`) composes each distinct choice of config groups
once with Hydra (a :class:`BaseConfig`, written once per launch into the launch file), checks
every job, and queues each one as a :class:`JobSpec`: which base, the value overrides to apply
to it, its number, and what its checked config was. On the compute node, :func:`job_config`
rebuilds the job's config the way Hydra's ``load_sweep_config`` composes it (Hydra's own
override application, through :mod:`mnist_hpc.hydra_adapter`, then the ``hydra.*`` fields Hydra
sets per job), and :func:`check_rebuilt` refuses to run a config other than the one the login node checked.

Light: Hydra and OmegaConf only (the login node imports it too).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, open_dict

from mnist_hpc.config import ConfigError, flat_config, to_typed
from mnist_hpc.hydra_adapter import apply_overrides, overrides_dirname


@dataclass
class BaseConfig:
    """A config composed by Hydra once per launch, for every job that chooses the same config groups."""

    # The composition (``hydra`` node included, sweep directory pinned, Hydra's resolver cache copied).
    config: DictConfig
    # Its typed config, flat (``mnist_hpc.config.flat_config``): what the login node checked.
    checked: dict[str, Any]


@dataclass
class JobSpec:
    """One queued job: a base, the values it changes, and what the login node checked."""

    # Index of the job's BaseConfig in the launch file.
    base: int
    # The job's overrides as the sweeper gave them (they become hydra.overrides.task).
    overrides: list[str]
    # Those applied to the base, in order (the others chose the base's config groups).
    values: list[str]
    # The job's number in its sweep (hydra.job.num).
    num: int
    # The flat typed keys whose checked value differs from the base's.
    checked: dict[str, Any] = field(default_factory=dict)


class ConfigMismatch(ConfigError):
    """The config rebuilt on the compute node is not the one the login node checked."""


def parse(lines: Sequence[str]) -> list[Any]:
    """Override strings parsed by Hydra's own grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides=list(lines))


def copy_config(config: DictConfig) -> DictConfig:
    """An independent copy.

    ``deepcopy``, not a pickle round trip: a config unpickled from the launch file may refer
    to classes of modules Hydra's plugin scan imported a second time, which pickle refuses.
    """
    return copy.deepcopy(config)


def apply_values(config: DictConfig, values: Sequence[Any]) -> None:
    """Apply parsed value overrides as Hydra does when it composes a job (errors included)."""
    apply_overrides(config, values)


def set_job_fields(config: DictConfig, overrides: Sequence[Any], num: Optional[int] = None) -> None:
    """The ``hydra.*`` fields Hydra sets per sweep job: its task overrides, override_dirname, num and id."""
    app = [o for o in overrides if not o.is_hydra_override()]
    with open_dict(config.hydra):
        config.hydra.overrides.task = [o.input_line for o in app]
        dirname = config.hydra.job.config.override_dirname
        config.hydra.job.override_dirname = overrides_dirname(
            app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys
        )
        if num is not None:
            config.hydra.job.num = num
            config.hydra.job.id = f"{config.hydra.job.name}_{num}"


def job_config(base: DictConfig, values: Sequence[str], overrides: Sequence[str], num: Optional[int]) -> DictConfig:
    """A job's full config, rebuilt from its base (which stays untouched).

    Args:
        base: the composition the job's config groups give.
        values: the job's value overrides, applied to the base in order.
        overrides: all of the job's overrides (``hydra.overrides.task``, ``override_dirname``).
        num: the job's number in its sweep; None leaves ``hydra.job.num`` and ``id`` as composed.
    """
    config = copy_config(base)
    apply_values(config, parse(values))
    set_job_fields(config, parse(overrides), num)
    return config


def check_rebuilt(config: DictConfig, base: BaseConfig, spec: JobSpec) -> None:
    """Refuse a rebuilt config whose typed values differ from those checked on the login node.

    The values come out the same unless an interpolation resolves differently here (an
    ``${oc.env:...}`` whose variable this node sets otherwise).

    Raises:
        ConfigMismatch: naming each key, the value checked and the value here.
    """
    here = flat_config(to_typed(config))
    checked = {**base.checked, **spec.checked}
    changed = [f"{k}: {checked.get(k, '(unset)')!r} checked, {here.get(k, '(unset)')!r} here"
               for k in sorted(set(checked) | set(here)) if checked.get(k) != here.get(k)]
    if changed:
        raise ConfigMismatch(
            f"this job's config is not the one checked on the login node ({'; '.join(changed)}); an interpolation "
            "such as ${oc.env:...} resolves differently on this node: give the job the login node's environment "
            "(hydra.launcher.setup) or set these keys explicitly, then submit again"
        )

"""Composing and checking a sweep's jobs on the login node: once per choice of config groups.

Hydra's own ``load_sweep_config`` rebuilds the whole defaults tree for every job. Jobs that
choose the same config groups share that tree: :class:`SweepComposer` composes it once per
distinct choice (a base) and describes each job by its value overrides on that base (a
:class:`~mnist_hpc.contract.jobconfig.JobSpec`), from which the compute node rebuilds the
job's config exactly as Hydra would (:mod:`mnist_hpc.contract.jobconfig`).

Every job is still checked before anything is queued, by :func:`plan_jobs` (the grid sweeper,
:mod:`mnist_hpc.login.launcher.grid`, leaves that to the launcher rather than have Hydra compose
each job in full first). Its typed config is the base's, converted and checked once, with each
overridden value converted by the base's own OmegaConf node for that key (its type, optionality,
enum), then :func:`~mnist_hpc.config.validate`.
A value that needs more than that (a list, an interpolation, a new key) takes the long way:
a copy of the base's application part, Hydra's own override application and
:func:`~mnist_hpc.config.to_typed`. Tests compare both with Hydra's composition.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.override_parser.types import OverrideType, ValueType
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_hpc.claim import Verdict
from mnist_hpc.contract.jobconfig import BaseConfig, JobSpec, apply_values, copy_config, job_config
from mnist_hpc.config import Config, ConfigError, flat_config, to_typed, validate
from mnist_hpc.hydra_adapter import is_config_group
from mnist_hpc.login.launcher.overrides import OverrideCache
from mnist_hpc.login.launcher.plan import PlannedJob, PreflightError

# The sweep subdirectory of conf/config.yaml: each trial's directory is its number.
SUBDIR_IS_NUM = "${hydra.job.num}"


@dataclass
class _Base:
    """A composition shared by the jobs that choose the same config groups, and what checks them."""

    index: int
    # Hydra's composition, untouched (each job works on a copy).
    config: DictConfig
    # The application part (no ``hydra`` node), pickled: the long way starts from a copy of it.
    app: bytes
    # Its typed config (or why it has none), and that flattened.
    typed: Optional[Config] = None
    error: Optional[ConfigError] = None
    flat: dict[str, Any] = field(default_factory=dict)
    # Per ``section.field`` key: a copy of the base's node, which converts and checks a value as Hydra's update would.
    converters: dict[str, Any] = field(default_factory=dict)
    # hydra.sweep.subdir as composed (unresolved).
    subdir: str = ""
    # The interpolations among its application values (``${train.batch_size}`` in a user's YAML, say):
    # a job that changes a key one of them refers to takes the long way, which resolves them again.
    interpolations: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """A job's composition: its base, its value overrides, and its typed config (or why it has none)."""

    base: _Base
    overrides: list[str]
    values: list[str]
    typed: Optional[Config]
    error: Optional[ConfigError]


class SweepComposer:
    """Compose and check the jobs of a sweep, fast: Hydra composes once per combination of config groups.

    A test checks that the config each job gets equals ``load_sweep_config``'s.
    """

    def __init__(self, config_loader: Any, master_config: DictConfig) -> None:
        self.loader = config_loader
        self.master = master_config
        self._bases: dict[tuple[str, ...], _Base] = {}
        self._overrides = OverrideCache()
        self._is_group: dict[str, bool] = {}

    def plan(self, overrides: Sequence[str]) -> _Plan:
        """The job's base, value overrides and typed config; Hydra's composition errors are raised here.

        A config the schema or :func:`~mnist_hpc.config.validate` refuses is kept in the plan's
        ``error``: :func:`plan_jobs` names the job in its refusal.
        """
        parsed = self._overrides.parse(overrides)
        if any(o.is_sweep_override() for o in parsed):
            self.loader.load_sweep_config(self.master, list(overrides))  # raises Hydra's own error
        values = [o for o in parsed if self._value_override(o)]
        structural = [o for o in parsed if not self._value_override(o)]
        if _overlapping(values, structural):  # their order matters: let Hydra apply them all
            values, structural = [], parsed
        base = self._base(tuple(o.input_line for o in structural))
        typed, error = base.typed, base.error
        if error is None and values:
            try:
                typed = self._typed_by_node(base, values)
                if typed is None:
                    typed = self._typed_the_long_way(base, values)
            except ConfigError as exc:
                typed, error = None, exc
        return _Plan(base, list(overrides), [o.input_line for o in values], typed, error)

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The job's full config, as ``load_sweep_config`` gives it (without ``hydra.job.num``)."""
        plan = self.plan(overrides)
        return job_config(plan.base.config, plan.values, plan.overrides, num=None)

    def bases(self, sweep_dir: Path) -> list[BaseConfig]:
        """The bases for the launch file, each with the sweep directory pinned (so that requeues land in it)."""
        out = []
        for base in sorted(self._bases.values(), key=lambda b: b.index):
            config = copy_config(base.config)
            with open_dict(config):
                config.hydra.sweep.dir = str(sweep_dir)
            out.append(BaseConfig(config, base.flat))
        return out

    # --- inside ----------------------------------------------------------------------------

    def _value_override(self, override: Any) -> bool:
        """A plain value on a config key: applied per job (config group choices and the rest make the base)."""
        if override.is_hydra_override() or override.package is not None or override.type is not OverrideType.CHANGE:
            return False
        key = override.key_or_group
        if key not in self._is_group:
            self._is_group[key] = is_config_group(self.loader, key)
        return not self._is_group[key]

    def _base(self, structural: tuple[str, ...]) -> _Base:
        base = self._bases.get(structural)
        if base is None:
            config = self.loader.load_sweep_config(self.master, list(structural))
            app = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
            base = _Base(len(self._bases), config, pickle.dumps(app, protocol=pickle.HIGHEST_PROTOCOL))
            base.subdir = str(config.hydra.sweep._get_node("subdir")._value())
            base.interpolations = _interpolations(OmegaConf.to_container(app, resolve=False))
            try:
                base.typed = to_typed(app)
                base.flat = flat_config(base.typed)
            except ConfigError as exc:
                base.error = exc
            self._bases[structural] = base
        return base

    def _typed_by_node(self, base: _Base, values: Sequence[Any]) -> Optional[Config]:
        """The typed config with each value converted by the base's node for its key; None if one needs the long way."""
        from omegaconf import ValueNode
        from omegaconf._utils import ValueKind, get_value_kind

        assert base.typed is not None
        changes: dict[str, dict[str, Any]] = {}
        for override in values:
            if _referred_to(override.key_or_group, base.interpolations):
                return None
            value = override.value()
            if override.value_type is not ValueType.ELEMENT or not (
                value is None or isinstance(value, (bool, int, float)) or isinstance(value, str) and get_value_kind(value) is ValueKind.VALUE
            ):
                return None
            key = override.key_or_group
            converter = base.converters.get(key)
            if converter is None:
                section, _, name = key.partition(".")
                parent = base.config._get_node(section, validate_access=False) if section in _SECTIONS else None
                node = parent._get_node(name, validate_access=False) if isinstance(parent, DictConfig) and "." not in name else None
                if not isinstance(node, ValueNode) or not node._has_ref_type():
                    return None
                # Hydra's update of a typed leaf is this node's _set_value (the None check included);
                # a copy keeps the base's node as it is.
                converter = base.converters[key] = copy.deepcopy(node)
            try:
                converter._set_value(value)
            except Exception:  # the long way raises Hydra's own error for it
                return None
            section, _, name = key.partition(".")
            changes.setdefault(section, {})[name] = converter._value()
        typed = dataclasses.replace(
            base.typed, **{s: dataclasses.replace(getattr(base.typed, s), **fields) for s, fields in changes.items()}
        )
        return validate(typed)

    def _typed_the_long_way(self, base: _Base, values: Sequence[Any]) -> Config:
        app = pickle.loads(base.app)
        apply_values(app, values)
        return to_typed(app)


_SECTIONS = frozenset(f.name for f in dataclasses.fields(Config))


def _interpolations(container: Any) -> list[str]:
    """Every string in a config container that holds an interpolation (``${...}``)."""
    if isinstance(container, dict):
        return [s for v in container.values() for s in _interpolations(v)]
    if isinstance(container, list):
        return [s for v in container for s in _interpolations(v)]
    return [container] if isinstance(container, str) and "${" in container else []


_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _referred_to(key: str, interpolations: Sequence[str]) -> bool:
    """Whether an interpolation may refer to ``key``: a name in it that is the key, its section
    (``${train}``, ``${oc.dict.values:train}``) or its last part (a relative ``${.seed}``)."""
    wanted = {key, key.partition(".")[0], key.rpartition(".")[2]}
    return any(not wanted.isdisjoint(_NAME.findall(text)) for text in interpolations)


def _overlapping(values: Sequence[Any], structural: Sequence[Any]) -> bool:
    """A value override on a key that a structural one (``+``, ``~``, a package) also touches."""
    keys = [o.key_or_group for o in structural if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None]
    return any(v.key_or_group == k or v.key_or_group.startswith(k + ".") or k.startswith(v.key_or_group + ".")
               for v in values for k in keys)


def plan_jobs(
    composer: SweepComposer, sweep_dir: Path, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[PlannedJob]:
    """Compose and check every job's config; nothing is queued if one fails.

    Raises:
        PreflightError: a job's config fails the schema or its checks (the message names the job).
    """
    planned: list[PlannedJob] = []
    for offset, overrides in enumerate(job_overrides):
        num = initial_job_idx + offset
        plan = composer.plan(list(overrides))
        if plan.error is not None or plan.typed is None:
            raise PreflightError(f"nothing was queued: job {num} ({' '.join(overrides)}): {plan.error}") from plan.error
        base = plan.base
        flat = flat_config(plan.typed)
        spec = JobSpec(base.index, plan.overrides, plan.values, num, {k: v for k, v in flat.items() if base.flat.get(k) != v})
        planned.append(PlannedJob(num, list(overrides), plan.typed, sweep_dir / _subdir(base, spec), spec, flat))
    return planned


def _subdir(base: _Base, spec: JobSpec) -> str:
    """``hydra.sweep.subdir`` of the job (resolved on the job's full config unless it is just the number)."""
    if base.subdir == SUBDIR_IS_NUM:
        return str(spec.num)
    return str(OmegaConf.select(job_config(base.config, spec.values, spec.overrides, spec.num), "hydra.sweep.subdir"))

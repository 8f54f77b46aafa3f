"""Composing a sweep's jobs on the login node: every job's config, once, checked, with its run directory.

Hydra's own ``load_sweep_config`` rebuilds the whole defaults tree for every job; a large
sweep then takes longer to compose than to queue. :class:`SweepComposer` composes once per
distinct choice of config groups and copies the result per job; :func:`plan_jobs` turns each
job into a :class:`PlannedJob` whose typed config has passed the schema's checks.
"""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_hpc.claim import Verdict
from mnist_hpc.config import Config, ConfigError, to_typed
from mnist_hpc.login.launcher.preflight import PreflightError


@dataclass
class PlannedJob:
    """One job of a multirun, composed and checked on the login node."""

    num: int
    overrides: list[str]
    config: DictConfig
    typed: Config
    run_dir: Path
    # What the run may do in its directory (set by the preflight): new, continue, or done.
    verdict: Optional[Verdict] = None


class SweepComposer:
    """Compose the configs of a sweep's jobs, fast: once per combination of config groups.

    Hydra's ``load_sweep_config`` rebuilds the whole defaults tree for every job (about 0.2 s
    each here), which makes a large sweep slow to queue. Jobs that choose the same config
    groups share that tree: this composes it once per distinct group choice, then applies each
    job's value overrides the way Hydra does (``_apply_overrides_to_config``) and records them
    in ``hydra.overrides.task`` and ``hydra.job.override_dirname``. A test checks the result
    equals ``load_sweep_config``'s.
    """

    def __init__(self, config_loader: Any, master_config: DictConfig) -> None:
        self.loader = config_loader
        self.master = master_config
        self._bases: dict[tuple[str, ...], DictConfig] = {}
        self._hydra_load_sweep_config = config_loader.load_sweep_config
        self._composed: dict[tuple[str, ...], DictConfig] = {}

    @classmethod
    def install(cls, config_loader: Any, master_config: DictConfig) -> "SweepComposer":
        """Serve this process's sweep compositions from a composer (our launchers only).

        Hydra's basic sweeper composes every job once to validate it, then hands the batch to
        the launcher, which composes it again. With the loader's ``load_sweep_config`` served
        by :meth:`compose_once`, the sweeper's pass does the work and the launcher's reuses it.
        """
        composer = cls(config_loader, master_config)
        config_loader.load_sweep_config = composer.load_sweep_config
        return composer

    @contextlib.contextmanager
    def detached(self) -> Any:
        """Hand the loader back its own method while jobs are pickled (they carry the loader)."""
        patched = self.loader.__dict__.pop("load_sweep_config", None)
        try:
            yield
        finally:
            if patched is not None:
                self.loader.load_sweep_config = patched

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        if master_config is not self.master:
            return self._hydra_load_sweep_config(master_config, sweep_overrides)
        key = tuple(sweep_overrides)
        if key not in self._composed:
            self._composed[key] = self.compose(list(sweep_overrides))
        return self._composed[key]

    def compose_once(self, overrides: list[str]) -> DictConfig:
        """The job's config, composed at most once in this process (callers may modify it)."""
        key = tuple(overrides)
        return self._composed.pop(key, None) or self.compose(list(overrides))

    def _is_value_override(self, override: Any) -> bool:
        if override.is_hydra_override() or override.package is not None:
            return False
        if override.is_add() or override.is_force_add() or override.is_delete():
            return False
        return not self.loader.repository.group_exists(override.key_or_group)

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import (
            ConfigLoaderImpl,
            get_overrides_dirname,
        )
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        if any(o.is_sweep_override() for o in parsed):
            return self._hydra_load_sweep_config(self.master, overrides)
        structural = tuple(o.input_line for o in parsed if not self._is_value_override(o))
        if structural not in self._bases:
            base = self._hydra_load_sweep_config(self.master, list(structural))
            # Each job starts from a copy; unpickling one is ~4x faster than deepcopy of a DictConfig.
            self._bases[structural] = pickle.dumps(base, protocol=pickle.HIGHEST_PROTOCOL)
        config = pickle.loads(self._bases[structural])
        values = [o for o in parsed if self._is_value_override(o)]
        ConfigLoaderImpl._apply_overrides_to_config(values, config)
        app = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(config.hydra):
            config.hydra.overrides.task = [o.input_line for o in app]
            dirname = config.hydra.job.config.override_dirname
            config.hydra.job.override_dirname = get_overrides_dirname(
                overrides=app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys
            )
        OmegaConf.copy_cache(from_config=self.master, to_config=config)
        return config


def plan_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[PlannedJob]:
    """Compose and check every job's config; pin the sweep directory so requeues land in it."""
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).resolve()
    composer = getattr(launcher, "composer", None) or SweepComposer(launcher.hydra_context.config_loader, launcher.config)
    planned: list[PlannedJob] = []
    for offset, overrides in enumerate(job_overrides):
        num = initial_job_idx + offset
        config = composer.compose_once(list(overrides))
        with open_dict(config):
            config.hydra.job.num = num
            config.hydra.job.id = f"{config.hydra.job.name}_{num}"
            config.hydra.sweep.dir = str(sweep_dir)
        try:
            typed = to_typed(config)
        except ConfigError as exc:
            raise PreflightError(f"nothing was queued: job {num} ({' '.join(overrides)}): {exc}") from exc
        run_dir = sweep_dir / str(OmegaConf.select(config, "hydra.sweep.subdir"))
        planned.append(PlannedJob(num=num, overrides=list(overrides), config=config, typed=typed, run_dir=run_dir))
    return planned

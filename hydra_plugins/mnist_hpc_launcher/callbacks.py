"""Hydra callbacks of mnist-hpc (``hydra.callbacks`` in ``conf/config.yaml``): checks before Hydra acts.

A run in this process (Hydra's RUN mode, or a multirun on Hydra's own basic launcher) has no
launcher to check its directory before Hydra creates it and writes its config there:
:class:`CheckRunDir` does, with the probe of the launchers' preflight
(:func:`~mnist_hpc.login.launcher.preflight.check_writable`), which checks every multirun of
``hydra/launcher=slurm`` or ``local`` itself. Imported by Hydra's plugin scan: nothing heavy
at module level.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# The launchers of this package check the sweep directory in their setup ("nothing was queued").
_OUR_LAUNCHERS = "hydra_plugins.mnist_hpc_launcher."


def run_dir_problem(directory: Path, setting: str, what: str = "run directory", write: bool = True) -> Optional[str]:
    """Why the ``what`` ``directory`` cannot be created (or written), naming the fix (``setting``); None if it can.

    Creates ``directory`` as Hydra would next; with ``write``, proves a file can be written
    there (the preflight's probe). A path that fails at its first missing directory leaves
    nothing behind.
    """
    from mnist_hpc.login.launcher.plan import PreflightError
    from mnist_hpc.login.launcher.preflight import check_writable

    try:
        if write:
            check_writable(directory)
        else:
            directory.mkdir(parents=True, exist_ok=True)
    except (PreflightError, OSError) as refused:
        cause = refused.__cause__ if isinstance(refused, PreflightError) else refused
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        blocker = _not_a_directory(directory)
        where = f"{blocker} is not a directory" if blocker is not None else reason
        return (
            f"cannot write to the {what} {directory} ({where}); set {setting} to a writable location (e.g. on $SCRATCH)"
        )
    return None


def _not_a_directory(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) when it is not a directory."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def _refuse_unwritable(config: DictConfig, key: str, write: bool = True) -> None:
    """Print why the directory at ``hydra.<key>.dir`` cannot be written and exit 1; return if it can.

    ``write``: see :func:`run_dir_problem`.
    """
    node = config.hydra[key]
    try:
        directory = Path(os.path.abspath(str(node.dir)))  # as Hydra's run_job and sweeper make it
    except Exception:  # noqa: BLE001 - an interpolation that Hydra reports next, in its own words
        return
    raw = str(OmegaConf.to_container(node, resolve=False).get("dir", ""))
    setting = "paths.output_root" if "paths.output_root" in raw else f"hydra.{key}.dir"
    from mnist_hpc.io import path_problem

    from mnist_hpc import claim

    # A run (or a basic-launcher sweep) never inside an earlier launch's run directory, nor a run
    # around one: each would show the other's results as its own. Checked before anything is made.
    problem = (path_problem(directory, setting) or claim.nesting_problem(directory, setting, inside_too=key == "run")
               or run_dir_problem(directory, setting, f"{key} directory", write))
    if problem is None and key == "run":
        from mnist_hpc import rundir

        # Hydra writes .hydra-pending there next: an entry of the wrong kind must be one line too.
        problem = "; ".join(rundir.layout_problems(directory)) or None
    if problem is not None:
        sys.stderr.write(problem + "\n")
        sys.stderr.flush()
        raise SystemExit(1)


class CheckRunDir(Callback):
    """Refuse a run in this process whose directory cannot be written, before Hydra touches it.

    Hydra creates the directory and writes its config there before the task runs, and a failure
    there ends in a traceback. Hydra 1.3 turns a callback's exception into a warning and
    carries on, so a refusal here prints its one line and exits 1 itself (SystemExit is not an
    ``Exception``: Hydra lets it through).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mnist_hpc.compute.runtime import RuntimeInfo

        # A task other than the first of an srun step writes nothing there (cli._quiet_worker_task),
        # but Hydra creates the directory in it too. No probe file: two tasks on two nodes may
        # have the same process id, hence the same probe name.
        _refuse_unwritable(config, "run", write=not RuntimeInfo.from_env().is_worker_task)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.hydra.launcher.get("_target_", "")).startswith(_OUR_LAUNCHERS):
            return
        _refuse_unwritable(config, "sweep")  # Hydra's basic launcher: the trials run in this process

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A trial of Hydra's basic launcher (in this process): its directory inside its sweep, its own.

        Our launchers check every trial before queueing (claim.trial_dir_problems); Hydra's own
        launcher composes one trial at a time, so each is checked here, before it writes anything.
        """
        if config.hydra.get("mode") is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        if str(config.hydra.launcher.get("_target_", "")).startswith(_OUR_LAUNCHERS):
            return
        from mnist_hpc import claim

        try:
            sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))
            run_dir = Path(os.path.abspath(str(config.hydra.runtime.output_dir)))
            num = int(config.hydra.job.num)
        except Exception:  # noqa: BLE001 - Hydra reports a bad interpolation next, in its own words
            return
        problems = claim.trial_dir_problems(sweep_dir, [(num, run_dir)])
        if problems:
            from mnist_hpc import rundir

            # Hydra made the directory and wrote this attempt's config (hydra.output_subdir, our
            # pending folder) just before calling us: take back what it wrote, and the directory
            # if that leaves it empty.
            shutil.rmtree(run_dir / rundir.HYDRA_PENDING_DIR, ignore_errors=True)
            log_file = run_dir / rundir.LOG_FILE  # opened by Hydra's job logging: gone if nothing is in it
            with contextlib.suppress(OSError):
                if log_file.stat().st_size == 0:
                    log_file.unlink()
            with contextlib.suppress(OSError):
                run_dir.rmdir()
            sys.stderr.write("; ".join(problems) + "\n")
            sys.stderr.flush()
            raise SystemExit(1)

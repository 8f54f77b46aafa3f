"""Console entry points. Each stays thin and calls a plain function; none imports TensorFlow."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig


def _train_task(cfg: DictConfig, callbacks: Sequence[Any] = ()) -> float:
    """One Hydra job: check the config, train in Hydra's output dir, return the objective.

    ``callbacks``: extra Keras callbacks (a search worker passes its pruning callback). A known
    error (see :mod:`mnist_hpc.compute.failures`) becomes one line, no traceback. Run in this
    process (Hydra's run mode: a shell, srun, a plain sbatch script), the training acts on Slurm's
    warning signals itself; a job of the launcher leaves that to its job object.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mnist_hpc.compute.failures import RunError, known_error
    from mnist_hpc.config import to_typed
    from mnist_hpc.rundir import objective

    typed = to_typed(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if hydra_cfg.mode == RunMode.RUN:
            from mnist_hpc.compute.signals import train_in_process

            return objective(train_in_process(typed, run_dir, callbacks=callbacks))
        from mnist_hpc.compute.train import train_and_evaluate

        return objective(train_and_evaluate(typed, run_dir, callbacks=callbacks))
    except Exception as exc:
        message = known_error(exc)
        if message is None:
            raise
        raise RunError(message) from exc  # a submitted job records the cause (mnist_hpc.compute.job)


TRAIN_USAGE = """\
mnist-hpc-train: the Keras MNIST lesson as a Hydra app, trained offline from the verified cache.

Usage:
  mnist-hpc-train [KEY=VALUE ...]                          train in this process
  mnist-hpc-train -m hydra/launcher=slurm [KEY=VALUE ...]  queue on Slurm and return; a,b,c values
                                                           make a sweep: one job array
  mnist-hpc-train -m hydra/launcher=local [KEY=VALUE ...]  the same jobs as local background processes
  mnist-hpc-train -m hparams_search=optuna                 Optuna search on Slurm
  mnist-hpc-train --cfg job [KEY=VALUE ...]                print the composed config and exit
  mnist-hpc-train --hydra-help                             Hydra's own flags

First, on a login node: mnist-hpc-prefetch (compute nodes have no internet).
"""


def train_help(conf: Path) -> str:
    """Usage, config groups and the default config, read from ``conf/`` without composing.

    Hydra's own ``--help`` walks every registered config group (about a second and a half here);
    a login-node ``--help`` should answer at once.
    """
    import yaml

    top = yaml.safe_load((conf / "config.yaml").read_text())
    chosen: dict[str, object] = {}
    for entry in top.get("defaults", []):
        if isinstance(entry, dict):
            chosen.update({k: v for k, v in entry.items() if not k.startswith("override ")})
    lines = [TRAIN_USAGE, "Config groups (group=option; * marks the default):"]
    groups = {
        group.relative_to(conf).as_posix(): sorted(p.stem for p in group.glob("*.yaml"))
        for group in conf.rglob("*")
        if group.is_dir() and any(group.glob("*.yaml"))
    }
    # The launchers' options are dataclasses in ConfigStore, not YAML (mnist_hpc.login.launcher.options).
    groups["hydra/launcher"] = sorted({"local", "slurm", *groups.get("hydra/launcher", [])})
    for name, options in sorted(groups.items()):
        marked = [f"{o}*" if chosen.get(name) == o else o for o in options]
        lines.append(f"  {name}: {', '.join(marked)}")
    lines += ["", "Defaults (override any key as KEY=VALUE):"]
    for name, option in chosen.items():
        path = conf / name / f"{option}.yaml"
        if option is None or not path.is_file() or "/" in name:
            continue
        lines.append(f"{name}:")
        lines += [f"  {line}" for line in path.read_text().splitlines() if line.strip()]
    lines += ["", "Launcher options: mnist-hpc-train -m hydra/launcher=slurm --cfg hydra --package hydra.launcher"]
    return "\n".join(lines) + "\n"


def train_main() -> None:
    """``mnist-hpc-train``: the Hydra app (``-m`` for multirun, overrides as arguments)."""
    from mnist_hpc.config import conf_dir

    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        sys.stdout.write(train_help(conf_dir()))
        return

    import hydra

    from mnist_hpc.config import register_configs

    register_configs()
    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins

    register_plugins()
    _quiet_worker_task()

    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_train_task)()


def _quiet_worker_task() -> None:
    """A task other than the first of a multi-task srun step writes nothing into the run directory."""
    from mnist_hpc.compute.cluster import WORKER_HYDRA_OVERRIDES
    from mnist_hpc.compute.runtime import RuntimeInfo

    if RuntimeInfo.from_env().is_worker_task and not {"-m", "--multirun"} & set(sys.argv[1:]):
        sys.argv += list(WORKER_HYDRA_OVERRIDES)


def prefetch_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-prefetch``: verify MNIST into the cache on a login node."""
    from mnist_hpc.login.prefetch import main

    sys.exit(main(argv))


def status_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-status``: state of submitted jobs from sacct and the run directories."""
    from mnist_hpc.login.status import main

    _exit_quietly_on_closed_pipe(main, argv)


def report_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-report``: tables and plots of a sweep or run directory."""
    from mnist_hpc.login.report.cli import main

    _exit_quietly_on_closed_pipe(main, argv)


def _exit_quietly_on_closed_pipe(main: Any, argv: Optional[list[str]]) -> None:
    """Run a command's ``main``; a reader that closed the pipe (``| head``) ends it quietly, as for ``ls``."""
    import os

    try:
        code = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the flush at exit failing too: point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for such a command
    sys.exit(code)

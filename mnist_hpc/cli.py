"""Console entry points: each parses nothing of its own and hands over to a plain function.

Login-node commands never import TensorFlow: what trains (``mnist_hpc.compute.run``) imports it
inside its functions.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional


def train_main() -> None:
    """``mnist-hpc-train``: the Hydra app (``-m`` for multirun, overrides as arguments)."""
    from mnist_hpc.config import conf_dir

    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from mnist_hpc.login.help import train_help

        sys.stdout.write(train_help(conf_dir()))
        return
    import hydra

    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins
    from mnist_hpc.compute.run import train_task, worker_overrides
    from mnist_hpc.config import register_configs
    from mnist_hpc.hydra_adapter import run_app

    register_configs()
    register_plugins()  # an editable install hides our plugins from Hydra's scan
    sys.argv += worker_overrides(sys.argv[1:])
    run_app(hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(train_task))


def prefetch_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-prefetch``: verify MNIST into the cache on a login node."""
    from mnist_hpc.login.prefetch.cli import main

    sys.exit(main(argv))


def status_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-status``: state of submitted jobs from sacct and the run directories."""
    from mnist_hpc.login.status import main

    _exit_quietly_on_closed_pipe(main, argv)


def report_main(argv: Optional[list[str]] = None) -> None:
    """``mnist-hpc-report``: tables and plots of a sweep or run directory."""
    from mnist_hpc.login.report.cli import main

    _exit_quietly_on_closed_pipe(main, argv)


def _exit_quietly_on_closed_pipe(main: Callable[[Optional[list[str]]], int], argv: Optional[list[str]]) -> None:
    """Run a command; a reader that closed the pipe (``| head``) ends it quietly, as for ``ls``."""
    import os

    try:
        code = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the flush at exit failing too: point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for such a command
    sys.exit(code)

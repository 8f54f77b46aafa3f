"""Several training processes on this machine, each told by Slurm-style variables that it is one
task of a multi-task job step: the multi-worker path without the cluster (faster, and able to
interrupt at an exact batch). The cluster tests run the same code under real srun steps.

As a module (``python -m tests.local_workers RUN_DIR [--stop-at EPOCH BATCH] OVERRIDE...``) it is
the process each task runs: it composes the config as ``mnist-hpc-train`` does and calls
``train_and_evaluate``; with ``--stop-at``, the chief raises USR2 in itself after that batch, as
Slurm's warning would, and the process exits with the stop's exit code.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from tests.helpers import REPO

# Fake job ids far above what the local cluster hands out (its ports follow the id), distinct
# per call so that tests running side by side get different ports.
_ids = itertools.count((os.getpid() % 4096) * 512 + 60_000_000)
DRIVER = [sys.executable, "-m", "tests.local_workers"]


def task_env(rank: int, ntasks: int, job_id: str, nodes: Sequence[str] = ("localhost",)) -> dict[str, str]:
    """The variables srun gives task ``rank`` of a block-distributed step (tasks spread evenly)."""
    per_node = ntasks // len(nodes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(
        PYTHONPATH=str(REPO),
        SLURM_JOB_ID=job_id,
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank % per_node),
        SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_STEP_NODELIST=",".join(nodes),
        SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{len(nodes)})" if len(nodes) > 1 else str(per_node),
        SLURMD_NODENAME=nodes[rank // per_node],
        SLURM_CPUS_PER_TASK="1",
    )
    return env


def start(command: Sequence[str], ntasks: int, cwd: Path, log_dir: Path, ranks: Optional[Sequence[int]] = None) -> list[subprocess.Popen]:
    """Start ``command`` as tasks ``ranks`` (all by default) of one ``ntasks``-task step; logs in ``log_dir``."""
    job_id = str(next(_ids))
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in ranks if ranks is not None else range(ntasks):
        out = open(log_dir / f"task{rank}.log", "w")
        procs.append(
            subprocess.Popen(list(command), cwd=cwd, env=task_env(rank, ntasks, job_id), stdout=out, stderr=subprocess.STDOUT)
        )
    return procs


def wait_all(procs: Sequence[subprocess.Popen], timeout: float = 600) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def main(argv: Optional[list[str]] = None) -> None:
    import keras
    from hydra import compose, initialize_config_dir

    from mnist_hpc.compute.signals import TrainingInterrupted
    from mnist_hpc.compute.train import train_and_evaluate
    from mnist_hpc.config import conf_dir, register_configs, to_typed

    args = list(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.pop(0))
    callbacks = []
    if args and args[0] == "--stop-at":
        at_epoch, at_batch = int(args[1]), int(args[2])
        del args[:3]

        class RaiseUsr2(keras.callbacks.Callback):
            epoch = -1

            def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
                self.epoch = epoch

            def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
                if (self.epoch, batch) == (at_epoch, at_batch):
                    signal.raise_signal(signal.SIGUSR2)

        callbacks.append(RaiseUsr2())
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=args))
    try:
        train_and_evaluate(cfg, run_dir, callbacks=callbacks)
    except TrainingInterrupted as stop:
        # Every worker leaves only once the chief's checkpoint is on disk.
        print(f"STOPPED {stop.epoch} {stop.batch} checkpoint-written={stop.checkpoint.is_file()}", flush=True)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()

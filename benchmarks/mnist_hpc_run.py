"""Program B of the training benchmark: mnist-hpc's training path, configured as users get it.

Composes ``conf/`` with Hydra exactly as ``mnist-hpc-train`` does (default config unless
overrides are given), then calls :func:`mnist_hpc.compute.train.train_and_evaluate`, which writes every
output into the run directory. A callback with epoch hooks only (so the compiled loop keeps its
full-length calls) records when each epoch starts and ends. The last line printed is a JSON
record for ``bench_training.py``.

    python benchmarks/mnist_hpc_run.py CACHE_DIR RUN_DIR [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


def main(cache_dir: str, run_dir: str, overrides: list[str]) -> None:
    from clock import epoch_clock
    from hydra import compose, initialize_config_dir

    from mnist_hpc.config import conf_dir, register_configs, to_typed
    from mnist_hpc.compute.train import train_and_evaluate

    logging.basicConfig(level=logging.WARNING)
    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=[f"data.cache_dir={cache_dir}", *overrides]))
    clock = epoch_clock()
    result = train_and_evaluate(cfg, Path(run_dir), callbacks=[clock])
    done = time.time()
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    print(json.dumps({
        "epoch_begin_unix": clock.begins,
        "epoch_end_unix": clock.ends,
        "epoch_seconds_reported": [row["seconds"] for row in metrics["history"]],
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "threads": metrics["threads"],
        "done_unix": done,
        "config": {"execution": cfg.train.execution.value, "jit_compile": cfg.train.jit_compile,
                   "steps_per_execution": cfg.train.steps_per_execution, "seed": cfg.train.seed},
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

"""Plain helpers that more than one test file uses: the one place to import them from."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mnist_hpc import rundir

# --- run files ---
#
# What a test reads from (or plants in) a run directory goes through mnist_hpc.rundir: its readers
# where it has one (rundir.read_metrics, rundir.read_job, ...), its names (rundir.METRICS_FILE,
# rundir.checkpoint_path, ...), and these helpers for what only tests read. No test spells a run
# file's name, so a renamed file is one change in rundir.


def run_log(run_dir: Path) -> str:
    """The run's job log (people's, which no code parses); '' while there is none."""
    path = Path(run_dir) / rundir.LOG_FILE
    return path.read_text() if path.is_file() else ""


def finished_metrics(run_dir: Path) -> dict[str, Any]:
    """The finished run's metrics (:func:`mnist_hpc.rundir.read_metrics`: every field checked)."""
    metrics = rundir.read_metrics(run_dir)
    assert metrics is not None, f"{Path(run_dir) / rundir.METRICS_FILE} is absent: the run has not finished"
    return metrics


def run_json(run_dir: Path, name: str) -> Any:
    """A run file's JSON as it is on disk (``name``: one of rundir's names), for what no reader returns
    whole: provenance, a failure's traceback, a lease's time."""
    return json.loads((Path(run_dir) / name).read_text())


def saved_weights(run_dir: Path) -> list[Any]:
    """The weights of the model the run saved."""
    import keras

    return keras.models.load_model(Path(run_dir) / rundir.MODEL_FILE).get_weights()


def checkpoint_positions(run_dir: Path) -> list[tuple[int, int]]:
    """(epochs, batches) of each checkpoint in the run directory, furthest along first."""
    return [rundir.checkpoint_position(p.name) for p in rundir.list_checkpoints(run_dir)]


def resume_line(epoch: int, batch: int) -> str:
    """The start of the log line of a run that resumed from its checkpoint at (epoch, batch)."""
    return f"resuming from {rundir.checkpoint_name(epoch, batch)}"


def resumed_from(log: str) -> list[tuple[int, int]]:
    """(epochs, batches) of each checkpoint a log says its run resumed from, in the log's order."""
    names = re.findall(r"resuming from (\S+?): ", log)
    return [position for name in names if (position := rundir.checkpoint_position(name)) is not None]

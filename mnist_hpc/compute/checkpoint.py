"""Training state on disk, in the run's own directory, so a requeued or rerun job continues exactly.

A checkpoint is one ``.npz`` under ``<run_dir>/checkpoints/`` (named and listed by
:mod:`mnist_hpc.rundir`: ``checkpoint_path``, ``list_checkpoints``) holding every model variable
(weights and the dropout seed-generator state), every optimizer variable (iteration count and
slots), the metric accumulators of a part-done epoch, and a JSON header: epoch and batch
reached, the history so far, and a fingerprint of the config that defines the trajectory. The
data order needs no state: it is a pure function of (seed, epoch) (see ``engine.epoch_order``).

Files are written atomically (temp + fsync + rename) and the previous checkpoint is kept
until a newer one is complete; a newest file that cannot be read (truncated, corrupted: the
zip CRCs catch it) is skipped with a warning in favour of the one before. Keras'
``BackupAndRestore`` is not used: it keeps no RNG or data-order state, restarts a part-done
epoch from batch 0 on mid-epoch weights, and deletes its directory when training ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from mnist_hpc import rundir
from mnist_hpc.config import KEYS, flat_config, trajectory_config
from mnist_hpc.io import atomic_path, open_regular_file

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from mnist_hpc.config import Config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEEP = 2


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist, or one belongs to a different config."""


@dataclass
class TrainState:
    """Where training stands: ``epoch`` epochs complete, plus ``batch`` batches of the next one."""

    epoch: int = 0
    batch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    model_values: list[np.ndarray] = field(default_factory=list)
    optimizer_values: list[np.ndarray] = field(default_factory=list)
    metric_values: list[np.ndarray] = field(default_factory=list)
    fingerprint: str = ""
    path: Optional[Path] = None


def fingerprint(cfg: "Config", data_sha256: str) -> str:
    """Hash of the keys that fix the training trajectory (each key's ``trajectory`` fact in
    :data:`mnist_hpc.config.KEYS`: not the epoch count, paths or speed settings) and of the data.

    A checkpoint from another config (or another dataset) in the same directory is refused,
    instead of being loaded silently.
    """
    # The hashed document keeps the layout of the first checkpoints, so that they still load: a
    # section whose every key fixes the trajectory (model, optimizer) is nested whole, any other
    # key stands by its own name (batch_size, seed, validation_split).
    whole = {k.split(".", 1)[0] for k in KEYS} - {k.split(".", 1)[0] for k, facts in KEYS.items() if not facts.trajectory}
    document: dict[str, Any] = {"data_sha256": data_sha256}
    for key, value in trajectory_config(flat_config(cfg)).items():
        section, name = key.split(".", 1)
        if section in whole:
            document.setdefault(section, {})[name] = value
        else:
            assert name not in document, f"two trajectory keys named {name}: the fingerprint would mix them up"
            document[name] = value
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _values(variables: Sequence[Any]) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def snapshot(model: "keras.Model", *, with_metrics: bool) -> dict[str, list[np.ndarray]]:
    """The values a checkpoint holds: model, optimizer and (mid-epoch) metric variables.

    Under a multi-worker strategy, reading the metric accumulators sums them across workers (a
    collective): every worker takes the snapshot, only the chief writes it (:func:`write`).
    """
    return {
        "model": _values(model.variables),
        "optimizer": _values(model.optimizer.variables),
        "metrics": _values(model.metrics_variables) if with_metrics else [],
    }


def write(run_dir: Path, state: TrainState, groups: dict[str, list[np.ndarray]], fp: str) -> Path:
    """Write a checkpoint atomically, then drop all but the newest ``KEEP``."""
    target = rundir.checkpoint_path(run_dir, state.epoch, state.batch)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT_VERSION,
        "epoch": state.epoch,
        "batch": state.batch,
        "history": state.history,
        "fingerprint": fp,
    }
    arrays: dict[str, np.ndarray] = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for group, values in groups.items():
        for i, value in enumerate(values):
            arrays[f"{group}/{i:04d}"] = value
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    for old in rundir.list_checkpoints(run_dir)[KEEP:]:
        old.unlink(missing_ok=True)
    return target


def save(run_dir: Path, state: TrainState, model: "keras.Model", fp: str, *, with_metrics: bool) -> Path:
    """:func:`snapshot` then :func:`write`: a checkpoint of a single-process run."""
    return write(run_dir, state, snapshot(model, with_metrics=with_metrics), fp)


def read(path: Path) -> TrainState:
    """Read one checkpoint fully (every member's CRC is checked). Raises on any damage."""
    with open_regular_file(path) as fh:  # a FIFO in a checkpoint's place is refused, never waited on
        loaded = np.load(fh, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as npz:
                arrays = {key: npz[key] for key in npz.files}
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("it is a bare .npy array, not a checkpoint archive")
    if "header" not in arrays:
        raise ValueError("no header")
    header = json.loads(arrays.pop("header").tobytes().decode())
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"unknown checkpoint format {header.get('format')!r}")
    fields = {"epoch": int, "batch": int, "history": list, "fingerprint": str}
    for key, kind in fields.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise ValueError(f"its header's {key!r} is {header.get(key)!r}, expected {kind.__name__}")

    def group(name: str) -> list[np.ndarray]:
        keys = sorted(k for k in arrays if k.startswith(name + "/"))
        return [arrays[k] for k in keys]

    state = TrainState(
        epoch=int(header["epoch"]),
        batch=int(header["batch"]),
        history=list(header["history"]),
        model_values=group("model"),
        optimizer_values=group("optimizer"),
        metric_values=group("metrics"),
        fingerprint=str(header["fingerprint"]),
        path=path,
    )
    return state


def load_latest(run_dir: Path, fp: str) -> Optional[TrainState]:
    """The newest readable checkpoint of this config, or None when the run has none.

    Raises:
        CheckpointError: checkpoints exist but none can be read, or they come from another config.
    """
    candidates = rundir.list_checkpoints(run_dir)
    failures: list[str] = []
    for path in candidates:
        try:
            state = read(path)
        except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path.name, exc)
            failures.append(f"{path.name}: {exc}")
            continue
        if state.fingerprint != fp:
            raise CheckpointError(
                f"{path} was written by a run with a different config (one of {', '.join(k for k, f in KEYS.items() if f.trajectory)}"
                f", or the data); refusing to resume it. Use a new run directory, or delete "
                f"{path.parent} to start this one over."
            )
        return state
    if failures:
        raise CheckpointError(
            f"no readable checkpoint in {Path(run_dir) / rundir.CHECKPOINT_DIR} ({'; '.join(failures)}); delete that "
            "directory to start the run over"
        )
    return None


def _assign(variables: Sequence[Any], values: Sequence[np.ndarray], what: str, path: Optional[Path]) -> None:
    if len(values) != len(variables):
        raise CheckpointError(f"{path} holds {len(values)} {what} variables, this run has {len(variables)}")
    for variable, value in zip(variables, values):
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(
                f"{path} holds a {what} variable of shape {tuple(value.shape)} where this run has "
                f"{tuple(variable.shape)} ({variable.path}); delete {path.parent if path else 'the checkpoints'} "
                "to start the run over"
            )
        variable.assign(value)


def restore(model: "keras.Model", state: TrainState) -> None:
    """Put a checkpoint's values into a freshly built and compiled model."""
    _assign(model.variables, state.model_values, "model", state.path)
    model.optimizer.build(model.trainable_variables)
    _assign(model.optimizer.variables, state.optimizer_values, "optimizer", state.path)


def restore_metrics(model: "keras.Model", state: TrainState) -> None:
    """Refill the metric accumulators of a part-done epoch (after fit has reset them)."""
    for variable, value in zip(model.metrics_variables, state.metric_values):
        variable.assign(value)

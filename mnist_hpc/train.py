"""Training on a compute node: load the verified cache, fit, evaluate, write the run's outputs.

:func:`train_and_evaluate` is the plain function behind every entry point (Hydra app, submitit
job, tests). TensorFlow is imported inside functions so that importing this module stays cheap
on login nodes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mnist_hpc import checkpoint, outputs
from mnist_hpc.config import Config, TrainConfig
from mnist_hpc.data import load_mnist
from mnist_hpc.runtime import RuntimeInfo

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024


def configure_tensorflow(train: TrainConfig, runtime: RuntimeInfo) -> dict[str, Optional[int]]:
    """Quiet TensorFlow's start-up logging, size its thread pools and set determinism.

    Threads follow the Slurm allocation (``SLURM_CPUS_PER_TASK``) unless the config sets them:
    TensorFlow otherwise sizes its pools by the node's cores and oversubscribes a shared node.
    """
    # C++ INFO/WARNING lines (oneDNN notices, CPU feature hints) are noise in a job log.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    intra = train.intra_op_threads or runtime.slurm_cpus_per_task
    inter = train.inter_op_threads or runtime.slurm_cpus_per_task
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        # The runtime was already initialised in this process (a second run in one interpreter).
        log.warning("TensorFlow already initialised; keeping its thread pools as they are")
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    return {
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or None,
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or None,
    }


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of one epoch, a pure function of (seed, epoch).

    Keras' numpy-input path reuses one permutation for every epoch under a fixed seed
    (TF #44195), and a seeded tf.data shuffle restarts in a new process; keying the order by
    epoch gives a fresh order per epoch that a resumed process reproduces exactly.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{k}={v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds")]
    parts.append(f"seconds={record['seconds']:.2f}")
    return " ".join(parts)


def _metric_restorer(state: "checkpoint.TrainState") -> Any:
    """A callback that refills the metric accumulators of a part-done epoch after fit resets them."""
    import keras

    class RestoreMetrics(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
            checkpoint.restore_metrics(self.model, state)

    return RestoreMetrics()


def _batch_checkpointer(
    run_dir: Path,
    fp: str,
    epoch: int,
    done_batches: int,
    steps_per_epoch: int,
    history: list[dict[str, Any]],
    every: int,
) -> Any:
    """A callback that checkpoints every ``every`` batches inside an epoch (for long epochs)."""
    import keras

    class BatchCheckpointer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.last = done_batches

        def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
            # ``batch`` counts from the start of this fit call: the part of the epoch left.
            done = done_batches + batch + 1
            if done - self.last >= every and done < steps_per_epoch:
                state = checkpoint.TrainState(epoch, done, list(history))
                checkpoint.save(run_dir, state, self.model, fp, with_metrics=True)
                self.last = done

    return BatchCheckpointer()


def train_and_evaluate(
    cfg: Config,
    run_dir: Path,
    runtime: Optional[RuntimeInfo] = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, float]:
    """Train the configured model on the cached MNIST and write every output into ``run_dir``.

    Args:
        cfg: the checked config (see :func:`mnist_hpc.config.to_typed`).
        run_dir: the run's own directory; created if missing.
        runtime: Slurm/host facts of this process; read from the environment when omitted.
        callbacks: extra Keras callbacks for every epoch's ``fit`` (tests use one to interrupt).

    A run directory that holds a checkpoint resumes from it: same weights, optimizer state,
    dropout RNG, history and data order, so the result equals an uninterrupted run's.

    Returns:
        Final metrics: ``test_accuracy``, ``test_loss`` and, with a validation split,
        ``val_accuracy`` (last epoch) and ``best_val_accuracy``.
    """
    wall_start = time.perf_counter()
    started = outputs.utc_now()
    runtime = runtime or RuntimeInfo.from_env()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_config(run_dir, cfg)

    # Before TensorFlow starts: a missing or corrupt cache fails in well under a second.
    data = load_mnist(cfg.data)
    threads = configure_tensorflow(cfg.train, runtime)
    import keras

    from mnist_hpc.model import build_model, compile_model

    keras.utils.set_random_seed(cfg.train.seed)
    model = compile_model(
        build_model(cfg.model),
        cfg.optimizer,
        jit_compile=cfg.train.jit_compile,
        steps_per_execution=cfg.train.steps_per_execution,
    )
    model.summary(print_fn=lambda line, *args, **kwargs: log.info(line))
    log.info(
        "training on %d samples (validation %d, test %d), threads %s, run dir %s",
        data.x_train.shape[0],
        0 if data.x_val is None else data.x_val.shape[0],
        data.x_test.shape[0],
        threads,
        run_dir,
    )

    validation = None if data.x_val is None else (data.x_val, data.y_val)
    fp = checkpoint.fingerprint(cfg, data.sha256)
    state = checkpoint.load_latest(run_dir, fp) or checkpoint.TrainState()
    if state.path is not None:
        checkpoint.restore(model, state)
        log.info("resuming from %s: %d epoch(s) and %d batch(es) done", state.path.name, state.epoch, state.batch)
    history: list[dict[str, Any]] = list(state.history)
    n_train = data.x_train.shape[0]
    steps_per_epoch = -(-n_train // cfg.train.batch_size)
    train_start = time.perf_counter()
    for epoch in range(state.epoch, cfg.train.epochs):
        done_batches = state.batch if epoch == state.epoch else 0
        # The rest of this epoch's fixed order: a part-done epoch continues at its next batch.
        order = epoch_order(cfg.train.seed, epoch, n_train)[done_batches * cfg.train.batch_size :]
        epoch_callbacks = list(callbacks)
        if done_batches:
            epoch_callbacks.append(_metric_restorer(state))
        if cfg.train.checkpoint_every_batches:
            epoch_callbacks.append(
                _batch_checkpointer(run_dir, fp, epoch, done_batches, steps_per_epoch, history, cfg.train.checkpoint_every_batches)
            )
        epoch_start = time.perf_counter()
        fitted = model.fit(
            data.x_train[order],
            data.y_train[order],
            batch_size=cfg.train.batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=False,
            validation_data=validation,
            callbacks=epoch_callbacks,
            verbose=0,
        )
        record: dict[str, Any] = {"epoch": epoch + 1}
        record.update({k: float(v[-1]) for k, v in fitted.history.items()})
        record["seconds"] = time.perf_counter() - epoch_start
        history.append(record)
        log.info(_epoch_line(record, cfg.train.epochs))
        if (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch + 1 == cfg.train.epochs:
            saved = checkpoint.save(run_dir, checkpoint.TrainState(epoch + 1, 0, history), model, fp, with_metrics=False)
            log.info("checkpoint %s", saved.name)
    train_time = time.perf_counter() - train_start

    test_loss, test_accuracy = model.evaluate(
        data.x_test, data.y_test, batch_size=EVAL_BATCH_SIZE, verbose=0
    )
    result: dict[str, float] = {"test_loss": float(test_loss), "test_accuracy": float(test_accuracy)}
    val_accs = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    if val_accs:
        result["val_accuracy"] = val_accs[-1]
        result["best_val_accuracy"] = max(val_accs)
    log.info("test_loss=%.4f test_accuracy=%.4f", result["test_loss"], result["test_accuracy"])

    probabilities = model.predict(data.x_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
    outputs.write_predictions(run_dir, data.y_test.argmax(axis=1), probabilities, data.x_test)
    outputs.write_history(run_dir, history)
    outputs.save_model(run_dir, model)
    outputs.write_provenance(run_dir, outputs.provenance(runtime, data.sha256, started, outputs.utc_now()))
    # metrics.json goes last: its presence marks a finished run.
    outputs.write_metrics(
        run_dir,
        {
            **result,
            "epochs_completed": len(history),
            "history": history,
            "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - wall_start,
            "threads": threads,
        },
    )
    log.info("run directory: %s", run_dir)
    return result

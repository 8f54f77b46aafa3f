"""Training on a compute node: load the verified cache, build, train epoch by epoch, evaluate, write.

:func:`train_and_evaluate` is the plain function behind every entry point (Hydra app, submitit
job, tests) and reads as the orchestration only: how an epoch executes is the engine's
(:mod:`mnist_hpc.compute.engine`), what the resume state holds is the checkpoint's
(:mod:`mnist_hpc.compute.checkpoint`) and what the run leaves on disk is the run directory's
(:mod:`mnist_hpc.rundir`). TensorFlow is imported inside functions so that importing this
module stays cheap on login nodes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mnist_hpc import claim, rundir
from mnist_hpc.compute import checkpoint
from mnist_hpc.compute.data import MnistData, load_mnist
from mnist_hpc.compute.engine import build_engine
from mnist_hpc.compute.runtime import RuntimeInfo, configure_tensorflow, provenance
from mnist_hpc.compute.tensorboard import TensorBoardLog
from mnist_hpc.config import Config, Execution
from mnist_hpc.io import utc_now

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The job log's line for one epoch (for people; programs read ``progress.json``)."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{k}={v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds")]
    parts.append(f"seconds={record['seconds']:.2f}")
    return " ".join(parts)


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
        callbacks: extra Keras callbacks for every epoch (tests use one to interrupt). Under
            ``compiled_loop``, a callback with batch hooks makes each call run one batch.

    A run directory that holds a checkpoint resumes from it: same weights, optimizer state,
    dropout RNG, history and data order, so the result equals an uninterrupted run's.

    Returns:
        Final metrics: ``test_accuracy``, ``test_loss`` and, with a validation split,
        ``val_accuracy`` (last epoch) and ``best_val_accuracy``.
    """
    wall_start = time.perf_counter()
    started = utc_now()
    runtime = runtime or RuntimeInfo.from_env()
    run_dir = Path(run_dir).resolve()
    # Before anything is written, and before TensorFlow starts: a missing or corrupt cache fails
    # in well under a second.
    try:
        data = load_mnist(cfg.data)
    except Exception:
        # A directory no run has claimed yet still records what was asked of it (Hydra's
        # overrides); one that belongs to a run is left exactly as it was.
        claim.settle_unclaimed(run_dir)
        raise
    label = ""  # messages name the directory itself
    run_dir.mkdir(parents=True, exist_ok=True)
    me = claim.Holder.this_process(runtime.slurm_job_id, runtime.job_label)
    try:
        with claim.lease(run_dir, me, label):
            verdict = claim.bind(run_dir, claim.identity_of(cfg, data.sha256), cfg.train.epochs, label)
            if verdict.action == "done":
                log.info("%s has finished its %d epoch(s) with this config already; nothing to do", run_dir, verdict.epochs_done)
                return final_result(rundir.read_metrics(run_dir) or {})
            return _train(cfg, run_dir, data, runtime, callbacks, wall_start, started)
    except claim.RunConflict:
        rundir.discard_hydra_files(run_dir)
        raise


def final_result(metrics: dict[str, Any]) -> dict[str, float]:
    """What :func:`train_and_evaluate` returns, from a run's final metrics."""
    keys = ("test_loss", "test_accuracy", "val_accuracy", "best_val_accuracy")
    return {k: float(metrics[k]) for k in keys if metrics.get(k) is not None}


def _train(
    cfg: Config, run_dir: Path, data: MnistData, runtime: RuntimeInfo, callbacks: Sequence[Any], wall_start: float, started: str
) -> dict[str, float]:
    """The training itself, in a directory this process holds and may write."""
    rundir.write_config(run_dir, cfg)
    threads = configure_tensorflow(cfg.train, runtime)
    import keras

    from mnist_hpc.compute.model import build_model, compile_model

    # Keras turns XLA off under op determinism (not every op has a deterministic XLA kernel).
    jit = cfg.train.jit_compile and not cfg.train.deterministic
    compiled = Execution(cfg.train.execution) is Execution.compiled_loop
    keras.utils.set_random_seed(cfg.train.seed)
    model = compile_model(
        build_model(cfg.model),
        cfg.optimizer,
        # The compiled loop has its own program; evaluate and predict run as a loaded model.keras does.
        jit_compile=False if compiled else jit,
        steps_per_execution=1 if compiled else cfg.train.steps_per_execution,
    )
    model.summary(print_fn=lambda line, *args, **kwargs: log.info(line))
    engine = build_engine(model, data, cfg.train, jit)
    log.info(
        "training on %d samples (validation %d, test %d), execution %s (XLA %s, up to %d batches per call), "
        "threads %s, run dir %s",
        data.x_train.shape[0],
        0 if data.x_val is None else data.x_val.shape[0],
        data.x_test.shape[0],
        Execution(cfg.train.execution).value,
        "on" if jit else "off",
        cfg.train.steps_per_execution,
        threads,
        run_dir,
    )

    fp = checkpoint.fingerprint(cfg, data.sha256)
    state = checkpoint.load_latest(run_dir, fp) or checkpoint.TrainState()
    if state.path is not None:
        checkpoint.restore(model, state)
        log.info("resuming from %s: %d epoch(s) and %d batch(es) done", state.path.name, state.epoch, state.batch)
    history: list[dict[str, Any]] = list(state.history)
    rundir.write_progress(run_dir, state.epoch, cfg.train.epochs, history)
    board = TensorBoardLog(run_dir, hyperparameters(cfg), cfg.optimizer.learning_rate)
    board.restart(history)  # exactly the epochs the resume state holds

    def batch_saver(epoch: int) -> Optional[Callable[[int], None]]:
        if not cfg.train.checkpoint_every_batches:
            return None

        def save(done: int) -> None:
            checkpoint.save(run_dir, checkpoint.TrainState(epoch, done, list(history)), model, fp, with_metrics=True)

        return save

    train_start = time.perf_counter()
    for epoch in range(state.epoch, cfg.train.epochs):
        done_batches = state.batch if epoch == state.epoch else 0
        epoch_start = time.perf_counter()
        logs = engine.run_epoch(
            epoch,
            done_batches,
            callbacks,
            restore_metrics=(lambda: checkpoint.restore_metrics(model, state)) if done_batches else None,
            save_batch=batch_saver(epoch),
        )
        record: dict[str, Any] = {"epoch": epoch + 1, **logs, "seconds": time.perf_counter() - epoch_start}
        history.append(record)
        log.info(epoch_line(record, cfg.train.epochs))
        if (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch + 1 == cfg.train.epochs:
            saved = checkpoint.save(run_dir, checkpoint.TrainState(epoch + 1, 0, history), model, fp, with_metrics=False)
            log.info("checkpoint %s", saved.name)
            board.commit(history)
        rundir.write_progress(run_dir, epoch + 1, cfg.train.epochs, history)
    train_time = time.perf_counter() - train_start

    test = data.lesson("test")
    assert test is not None
    x_test, y_test = test
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
    result: dict[str, float] = {"test_loss": float(test_loss), "test_accuracy": float(test_accuracy)}
    val_accs = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    if val_accs:
        result["val_accuracy"] = val_accs[-1]
        result["best_val_accuracy"] = max(val_accs)
    log.info("test_loss=%.4f test_accuracy=%.4f", result["test_loss"], result["test_accuracy"])

    probabilities = model.predict(x_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
    rundir.write_predictions(run_dir, data.y_test, probabilities, data.x_test)
    rundir.write_history(run_dir, history)
    rundir.save_model(run_dir, model)
    rundir.write_provenance(run_dir, provenance(runtime, data.sha256, started, utc_now()))
    rundir.write_metrics(
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
    board.final(result, len(history))
    log.info("run directory: %s", run_dir)
    return result


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """What TensorBoard's HParams tab compares: the keys that decide the result, and the epochs."""
    keys = {k: v for k, v in claim.identity_of(cfg, "").items() if k != "data.sha256"}
    return {**keys, "train.epochs": cfg.train.epochs}

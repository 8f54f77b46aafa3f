"""Training on a compute node: load the verified cache, build, train epoch by epoch, evaluate, write.

:func:`train_and_evaluate` is the plain function behind every entry point (Hydra app, submitit
job, tests) and reads as the orchestration only: how an epoch executes is the engine's
(:mod:`mnist_hpc.compute.engine`), what the resume state holds is the checkpoint's
(:mod:`mnist_hpc.compute.checkpoint`), how several Slurm tasks train as one is the workers'
(:mod:`mnist_hpc.compute.distribute`) and what the run leaves on disk is the run directory's
(:mod:`mnist_hpc.rundir`). TensorFlow is imported inside functions so that importing this
module stays cheap on login nodes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mnist_hpc import claim, rundir
from mnist_hpc.compute import checkpoint, distribute
from mnist_hpc.compute.cluster import LayoutError, TaskLayout, resolve_distribution, task_layout
from mnist_hpc.compute.data import MnistData, load_mnist
from mnist_hpc.compute.engine import batches, engine_for
from mnist_hpc.compute.runtime import RuntimeInfo, configure_tensorflow, provenance
from mnist_hpc.compute.signals import StopRequest, TrainingInterrupted
from mnist_hpc.compute.tensorboard import TensorBoardLog
from mnist_hpc.config import Config, Distribution, Execution
from mnist_hpc.io import utc_now

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024
# What train_and_evaluate returns (the last two with a validation split only).
RESULT_KEYS = ("test_loss", "test_accuracy", "val_accuracy", "best_val_accuracy")


class Phases:
    """Where a run's wall time went, lap by lap (``metrics.json``'s ``phases``; see the breakdown benchmark)."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """The time since the previous lap (or the start) was spent on ``name``."""
        now = time.perf_counter()
        self.seconds[f"{name}_s"] = self.seconds.get(f"{name}_s", 0.0) + (now - self._last)
        self._last = now

    def wall(self) -> float:
        return time.perf_counter() - self.start


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
            Under several workers they run on the chief only.

    A run directory that holds a checkpoint resumes from it: same weights, optimizer state,
    dropout RNG, history and data order, so the result equals an uninterrupted run's. In a
    Slurm job step of several tasks every task calls this; with ``train.distribution`` auto or
    multi_worker they train one model together and only the first task (the chief) writes.

    Returns:
        Final metrics: ``test_accuracy``, ``test_loss`` and, with a validation split,
        ``val_accuracy`` (last epoch) and ``best_val_accuracy``; every worker returns the chief's.

    Raises:
        TrainingInterrupted: USR2 or SIGTERM arrived; training stopped at a step boundary after
            writing a checkpoint (see :mod:`mnist_hpc.compute.signals`).
        LayoutError: the job step's tasks cannot train as one run (before anything is written).
        WorkerFailure: another worker died or hung.
    """
    phases = Phases()
    started = utc_now()
    runtime = runtime or RuntimeInfo.from_env()
    run_dir = Path(run_dir).resolve()
    # Before anything is written: the tasks of a step train as one run, or are refused.
    layout = task_layout(runtime)
    distribution = resolve_distribution(cfg.train.distribution, layout)
    if distribution is Distribution.multi_worker and Execution(cfg.train.execution) is Execution.keras_fit:
        raise LayoutError(
            f"{layout.num_workers if layout else 1} tasks would train with train.execution=keras_fit, which Keras 3 "
            "cannot distribute (keras #20585); use train.execution=compiled_loop (drop train=lesson)"
        )
    # Before anything is written, and before TensorFlow starts: a missing or corrupt cache fails
    # in well under a second.
    try:
        data = load_mnist(cfg.data)
    except Exception:
        # A directory no run has claimed yet still records what was asked of it (Hydra's
        # overrides); one that belongs to a run is left exactly as it was. The chief's to do.
        if layout is None or layout.is_chief:
            claim.settle_unclaimed(run_dir)
        raise
    phases.lap("load")
    label = ""  # messages name the directory itself
    identity = claim.identity_of(cfg, data.sha256)
    me = claim.Holder.this_process(runtime.slurm_job_id, runtime.job_label)
    if layout is not None and not layout.is_chief:
        # The chief holds the lease and binds the directory; another task of the step makes
        # the same checks without writing, so that a refusal or a finished run ends it too.
        claim.check_lease(run_dir, me, label)
        verdict = claim.judge(run_dir, identity, cfg.train.epochs, label)
        if verdict.action == "done":
            return final_result(rundir.read_metrics(run_dir) or {})
        return _train(cfg, run_dir, data, runtime, callbacks, phases, started, layout, distribution)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with claim.lease(run_dir, me, label):
            verdict = claim.bind(run_dir, identity, cfg.train.epochs, label)
            if verdict.action == "done":
                log.info("%s has finished its %d epoch(s) with this config already; nothing to do", run_dir, verdict.epochs_done)
                return final_result(rundir.read_metrics(run_dir) or {})
            return _train(cfg, run_dir, data, runtime, callbacks, phases, started, layout, distribution)
    except claim.RunConflict:
        rundir.discard_hydra_files(run_dir)
        raise


def final_result(metrics: dict[str, Any]) -> dict[str, float]:
    """What :func:`train_and_evaluate` returns, from a run's final metrics."""
    return {k: float(metrics[k]) for k in RESULT_KEYS if metrics.get(k) is not None}


def _train(
    cfg: Config,
    run_dir: Path,
    data: MnistData,
    runtime: RuntimeInfo,
    callbacks: Sequence[Any],
    phases: Phases,
    started: str,
    layout: Optional[TaskLayout],
    distribution: Distribution,
) -> dict[str, float]:
    """The training itself, in a directory this process (or, for another worker, its chief) holds."""
    chief = layout is None or layout.is_chief
    if chief:
        rundir.write_config(run_dir, cfg)
    phases.lap("claim")
    with StopRequest() as stop:
        threads = configure_tensorflow(cfg.train, runtime)
        import keras

        from mnist_hpc.compute.model import build_model, compile_model

        # Keras turns XLA off under op determinism (not every op has a deterministic XLA kernel).
        jit = cfg.train.jit_compile and not cfg.train.deterministic
        compiled = Execution(cfg.train.execution) is Execution.compiled_loop

        def build() -> Any:
            return compile_model(
                build_model(cfg.model),
                cfg.optimizer,
                # The compiled loop has its own program; evaluate and predict run as a loaded model.keras does.
                jit_compile=False if compiled else jit,
                steps_per_execution=1 if compiled else cfg.train.steps_per_execution,
            )

        workers = distribute.start(cfg.train, layout, distribution, build, run_dir, runtime)
        with workers.failures():
            keras.utils.set_random_seed(cfg.train.seed)
            with workers.scope():
                model = build()
            if chief:
                model.summary(print_fn=lambda line, *args, **kwargs: log.info(line))
            model, engine = engine_for(model, data, cfg, jit, workers)
            log.info(
                "training on %d samples (validation %d, test %d), execution %s (XLA %s, up to %d batches per call), "
                "threads %s, %s, run dir %s",
                data.x_train.shape[0],
                0 if data.x_val is None else data.x_val.shape[0],
                data.x_test.shape[0],
                Execution(cfg.train.execution).value,
                "on" if jit else "off",
                cfg.train.steps_per_execution,
                threads,
                _describe(workers),
                run_dir,
            )
            board = TensorBoardLog(run_dir, hyperparameters(cfg), cfg.optimizer.learning_rate) if chief else None
            phases.lap("setup")
            history, train_time = _train_epochs(cfg, run_dir, data.sha256, model, engine, workers, stop, callbacks, board)
            phases.lap("epochs")
            # Synchronous training keeps every worker's weights equal; a worker that drifted
            # (a bug, a bad node) fails the job here instead of leaving a wrong result unnoticed.
            digest = weights_digest(model)
            log.info("trained weights: sha256 %s", digest)
            workers.check_same("the trained weights", [int(digest[i : i + 4], 16) for i in range(0, 16, 4)])
            result = _write_outputs(run_dir, data, workers.plain_model(model), history, phases) if chief else {}
            if chief:
                rundir.write_provenance(
                    run_dir, {**provenance(runtime, data.sha256, started, utc_now()), "distribution": workers.describe()}
                )
                phases.lap("write")
                rundir.write_metrics(
                    run_dir,
                    {
                        **result,
                        "epochs_completed": len(history),
                        "history": history,
                        "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
                        "train_time_s": train_time,
                        "wall_time_s": phases.wall(),
                        "phases": dict(phases.seconds),
                        "threads": threads,
                        "workers": workers.num_workers,
                        # The config these numbers come from, as the directory's identity.json binds it.
                        "fingerprint": claim.fingerprint(claim.identity_of(cfg, data.sha256)),
                    },
                )
                assert board is not None
                board.final(result, len(history))
                log.info("run directory: %s", run_dir)
            # The other workers wait here until the chief has written everything, then return its result.
            shared = workers.share([v for k in RESULT_KEYS for v in (float(k in result), result.get(k, 0.0))])
            return {k: shared[2 * i + 1] for i, k in enumerate(RESULT_KEYS) if shared[2 * i]}


def weights_digest(model: Any) -> str:
    """sha256 of a model's weights, in order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def _describe(workers: distribute.Workers) -> str:
    if workers.num_workers == 1:
        return "1 worker"
    return f"{workers.num_workers} workers (multi_worker, this is {'the chief' if workers.is_chief else 'not the chief'})"


def _train_epochs(
    cfg: Config,
    run_dir: Path,
    data_sha256: str,
    model: Any,
    engine: Any,
    workers: distribute.Workers,
    stop: StopRequest,
    callbacks: Sequence[Any],
    board: Optional[TensorBoardLog],
) -> tuple[list[dict[str, Any]], float]:
    """Resume, train the remaining epochs, checkpoint; stop at a step boundary on a signal."""
    chief = workers.is_chief
    fp = checkpoint.fingerprint(cfg, data_sha256)
    state = checkpoint.load_latest(run_dir, fp) or checkpoint.TrainState()
    # Every worker read the run directory: they must have found the same checkpoint.
    workers.check_same("the checkpoint to resume from (epoch, batch)", [state.epoch, state.batch])
    if state.path is not None:
        checkpoint.restore(model, state)
        log.info("resuming from %s: %d epoch(s) and %d batch(es) done", state.path.name, state.epoch, state.batch)
    history: list[dict[str, Any]] = list(state.history)
    if board is not None:
        rundir.write_progress(run_dir, state.epoch, cfg.train.epochs, history)
        board.restart(history)  # exactly the epochs the resume state holds

    def save(epoch: int, batch: int, with_metrics: bool) -> Path:
        # Every worker snapshots (summed metrics are a collective); the chief writes.
        groups = checkpoint.snapshot(model, with_metrics=with_metrics)
        if not chief:
            return rundir.checkpoint_path(run_dir, epoch, batch)
        return checkpoint.write(run_dir, checkpoint.TrainState(epoch, batch, list(history)), groups, fp)

    def batch_saver(epoch: int) -> Optional[Callable[[int], None]]:
        if not cfg.train.checkpoint_every_batches:
            return None

        def save_batch(done: int) -> None:
            save(epoch, done, with_metrics=True)

        return save_batch

    def stopped(signum: int, epoch: int, batch: int, saved: Path) -> TrainingInterrupted:
        # The other workers leave only once the chief's checkpoint is written: a worker that
        # ended first would start srun's --wait clock (or KillOnBadExit) on the chief.
        workers.share([0.0])
        return TrainingInterrupted(signum, epoch, batch, saved)

    def stopper(epoch: int) -> Callable[[int], None]:
        def after_call(done: int) -> None:
            signum = workers.agreed_signal(stop.signum)
            if signum is not None:
                raise stopped(signum, epoch, done, save(epoch, done, with_metrics=True))

        return after_call

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
            after_call=stopper(epoch),
        )
        record: dict[str, Any] = {"epoch": epoch + 1, **logs, "seconds": time.perf_counter() - epoch_start}
        history.append(record)
        if chief:
            log.info(epoch_line(record, cfg.train.epochs))
        saved: Optional[Path] = None
        if (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch + 1 == cfg.train.epochs:
            saved = save(epoch + 1, 0, with_metrics=False)
            if board is not None:
                log.info("checkpoint %s", saved.name)
                board.commit(history)
        if chief:
            rundir.write_progress(run_dir, epoch + 1, cfg.train.epochs, history)
        if epoch + 1 < cfg.train.epochs:
            signum = workers.agreed_signal(stop.signum)
            if signum is not None:
                raise stopped(signum, epoch + 1, 0, saved or save(epoch + 1, 0, with_metrics=False))
    return history, time.perf_counter() - train_start


def _write_outputs(run_dir: Path, data: MnistData, model: Any, history: list[dict[str, Any]], phases: Phases) -> dict[str, float]:
    """The chief's final evaluation and outputs (a model without collectives: see ``plain_model``)."""
    test = data.lesson("test")
    assert test is not None
    # One pass over the test set: the predictions give the test metrics too (see test_scores).
    probabilities = model.predict(batches(test[0], EVAL_BATCH_SIZE), verbose=0)
    result = test_scores(probabilities, test[1])
    phases.lap("evaluate")
    val_accs = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    if val_accs:
        result["val_accuracy"] = val_accs[-1]
        result["best_val_accuracy"] = max(val_accs)
    log.info("test_loss=%.4f test_accuracy=%.4f", result["test_loss"], result["test_accuracy"])
    rundir.write_predictions(run_dir, data.y_test, probabilities, data.x_test)
    rundir.write_history(run_dir, history)
    rundir.save_model(run_dir, model)
    return result


def test_scores(probabilities: np.ndarray, y_onehot: np.ndarray) -> dict[str, float]:
    """The compiled loss and metric of the lesson (categorical cross-entropy, accuracy) from predictions.

    What ``model.evaluate`` computes, from the probabilities ``model.predict`` gave, as Keras
    does it (each row normalised, clipped to [1e-7, 1 - 1e-7]; a row's class is its first
    maximum), averaged over all rows in float64 where Keras sums float32 batch means: equal to
    evaluate's up to float32 rounding, and without a second pass over the test set.
    """
    p = probabilities.astype(np.float32, copy=False)
    p = p / p.sum(axis=1, keepdims=True)
    eps = np.float32(1e-7)
    p = np.clip(p, eps, np.float32(1) - eps)
    losses = -(y_onehot * np.log(p)).sum(axis=1)
    correct = np.argmax(probabilities, axis=1) == np.argmax(y_onehot, axis=1)
    return {"test_loss": float(losses.astype(np.float64).mean()), "test_accuracy": float(correct.mean())}


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """What TensorBoard's HParams tab compares: the keys that decide the result, and the epochs."""
    keys = {k: v for k, v in claim.identity_of(cfg, "").items() if k != "data.sha256"}
    return {**keys, "train.epochs": cfg.train.epochs}

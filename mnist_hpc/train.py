"""Training on a compute node: load the verified cache, fit, evaluate, write the run's outputs.

:func:`train_and_evaluate` is the plain function behind every entry point (Hydra app, submitit
job, tests). TensorFlow is imported inside functions so that importing this module stays cheap
on login nodes.

Two executions of the same training (``train.execution``):

- ``keras_fit``, the lesson's: float32 arrays, one shuffled copy per epoch, Keras ``model.fit``.
- ``compiled_loop``, the default: the training images stay uint8 inside TensorFlow and each
  batch is gathered by index and scaled inside one (XLA-)compiled loop that runs
  ``steps_per_execution`` batches per call. Same network, loss, optimizer, batches and
  order; about 3x faster per epoch on a 2-core CPU and lighter on memory
  (``benchmarks/results/training.md``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from mnist_hpc import checkpoint, outputs
from mnist_hpc.config import Config, DataConfig, Execution, TrainConfig
from mnist_hpc.data import IMAGE_SHAPE, MnistData, load_mnist, one_hot, prepare_images, read_verified, validation_cut
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


@dataclass
class CompactData:
    """The dataset for the compiled loop: the training split as stored, the rest as the lesson has it.

    Training images stay uint8 (a quarter of the float32 size) and labels stay class ids; the
    compiled loop turns each batch into the lesson's values (x / 255 in float32, one-hot rows).
    Validation and test arrays are the lesson's float32 / one-hot ones, for Keras' evaluate.
    """

    x_train: np.ndarray  # (N, 784) uint8
    y_train: np.ndarray  # (N,) uint8 class ids
    x_val: Optional[np.ndarray]
    y_val: Optional[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str


def load_compact(cfg: DataConfig) -> CompactData:
    """Load the verified cache like :func:`mnist_hpc.data.load_mnist`, keeping the training split uint8.

    The same checks, split rule and errors as ``load_mnist``; only the training arrays' form differs.
    """
    arrays, manifest = read_verified(cfg)
    x_train = arrays["x_train"].reshape((-1, IMAGE_SHAPE[0] * IMAGE_SHAPE[1]))
    y_train = arrays["y_train"]
    x_val = y_val = None
    if cfg.validation_split > 0:
        cut = validation_cut(x_train.shape[0], cfg.validation_split)
        x_val, y_val = prepare_images(x_train[cut:]), one_hot(y_train[cut:])
        x_train, y_train = x_train[:cut], y_train[:cut]
    return CompactData(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_val=x_val,
        y_val=y_val,
        x_test=prepare_images(arrays["x_test"]),
        y_test=one_hot(arrays["y_test"]),
        sha256=manifest["sha256"],
    )


def _has_batch_hooks(callbacks: Sequence[Any]) -> bool:
    """Whether any callback overrides a per-batch training hook (so wants to see every batch)."""
    import keras

    base = keras.callbacks.Callback
    hooks = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")
    return any(getattr(type(cb), hook) is not getattr(base, hook) for cb in callbacks for hook in hooks)


def scale_table() -> np.ndarray:
    """``float32(v) / 255`` for every uint8 value v: exactly the lesson's (numpy's) scaling."""
    return np.arange(256, dtype=np.float32) / 255


def lesson_batch(scale: Any, images: Any, labels: Any, rows: Any, num_classes: int) -> tuple[Any, Any]:
    """Inside a TensorFlow graph: the lesson's float32 images and one-hot labels of ``rows``.

    The scaling looks values up in :func:`scale_table` rather than dividing, because XLA
    rewrites ``x / 255`` as ``x * (1 / 255)``, which differs from numpy in the last bit.
    """
    import tensorflow as tf

    x = tf.gather(scale, tf.cast(tf.gather(images, rows), tf.int32))
    y = tf.one_hot(tf.cast(tf.gather(labels, rows), tf.int32), num_classes, dtype=tf.float32)
    return x, y


class CompiledLoop:
    """Runs training batches inside one compiled TensorFlow loop, ``steps_per_call`` per call.

    The training set lives in TensorFlow as uint8; every batch is gathered by index (the epoch's
    order, no per-epoch copy of the data), turned into the lesson's exact values by
    :func:`lesson_batch` and passed to Keras' own ``train_step``, so loss, optimizer update,
    dropout RNG and metrics are the ones ``model.fit`` uses. Without XLA (``deterministic``)
    the result is bit-identical to ``keras_fit``'s; with XLA it differs by float rounding only.

    Every call has the same shape (a padded ``(steps_per_call, batch)`` index block and a count
    of rows to run), so one compiled program serves every chunk length: a run split at other
    batches (resume, batch checkpoints, batch-hook callbacks) follows the same arithmetic. The
    last, smaller batch of an epoch runs through the same step as a plain (non-XLA) graph.
    """

    def __init__(self, model: Any, data: CompactData, batch_size: int, steps_per_call: int, jit_compile: bool) -> None:
        import tensorflow as tf

        self.model = model
        self.batch_size = batch_size
        self.steps_per_call = steps_per_call
        self.n = data.x_train.shape[0]
        self.full_batches = self.n // batch_size
        self.steps_per_epoch = -(-self.n // batch_size)
        self._images = tf.constant(data.x_train)
        self._labels = tf.constant(data.y_train)
        self._scale = tf.constant(scale_table())
        self._rows = np.zeros((steps_per_call, batch_size), dtype=np.int32)
        num_classes = int(model.outputs[0].shape[-1])

        def run(images: Any, labels: Any, rows: Any, count: Any) -> None:
            def step(i: Any) -> Any:
                model.train_step(lesson_batch(self._scale, images, labels, rows[i], num_classes))
                return (i + 1,)

            # A plain while loop: `for i in tf.range(count)` would put a Range op in the graph,
            # which makes XLA treat `count` as a compile-time constant and compile a new
            # program for every chunk length.
            tf.while_loop(lambda i: i < count, step, (tf.constant(0),))

        self._run = tf.function(run, jit_compile=jit_compile)
        # The epoch's last, smaller batch (a shape of its own) runs once per epoch: as a plain
        # graph it costs ~0.3 s of tracing per process instead of ~1.3 s for a second XLA program.
        self._run_last = tf.function(run) if jit_compile else self._run
        # Build the optimizer, loss and metric state now, as fit does before its first step: a
        # part-done epoch's checkpoint restores into it, and the loop's trace then creates no
        # variables (tf.function traces a function that creates variables twice).
        model.optimizer.build(model.trainable_variables)
        x0 = np.zeros((1, data.x_train.shape[1]), dtype=np.float32)
        y0 = np.zeros((1, num_classes), dtype=np.float32)
        y_pred = model(x0, training=False)
        model.compute_loss(x=x0, y=y0, y_pred=y_pred)
        model.compute_metrics(x0, y0, y_pred, sample_weight=None)
        model.reset_metrics()

    def run_epoch(
        self,
        order: np.ndarray,
        done_batches: int,
        callbacks: Any,
        chunk: int,
        boundary: Callable[[int], bool],
        at_boundary: Callable[[int], None],
    ) -> None:
        """Train on ``order`` from batch ``done_batches`` to the end of the epoch.

        Args:
            order: this epoch's sample order (``epoch_order``).
            done_batches: batches of this epoch already trained (a resumed, part-done epoch).
            callbacks: a Keras ``CallbackList``; batch hooks get Keras' batch index (counted from
                the start of this call, as ``model.fit`` on the rest of the epoch would).
            chunk: at most this many batches per compiled call.
            boundary: whether a call must end after this many batches of the epoch.
            at_boundary: called with the batches done after each call that ends at a boundary.
        """
        import tensorflow as tf

        rows = order[: self.full_batches * self.batch_size].astype(np.int32).reshape(self.full_batches, self.batch_size)
        step = done_batches
        while step < self.full_batches:
            stop = step + 1
            while stop < min(step + chunk, self.full_batches) and not boundary(stop):
                stop += 1
            self._rows[: stop - step] = rows[step:stop]
            callbacks.on_train_batch_begin(step - done_batches)
            self._run(self._images, self._labels, tf.constant(self._rows), tf.constant(stop - step, tf.int32))
            callbacks.on_train_batch_end(stop - 1 - done_batches, self.model.get_metrics_result())
            step = stop
            if boundary(step) and step < self.steps_per_epoch:
                at_boundary(step)
        if self.full_batches < self.steps_per_epoch:
            tail = order[self.full_batches * self.batch_size :].astype(np.int32)[None, :]
            callbacks.on_train_batch_begin(self.full_batches - done_batches)
            self._run_last(self._images, self._labels, tf.constant(tail), tf.constant(1, tf.int32))
            callbacks.on_train_batch_end(self.full_batches - done_batches, self.model.get_metrics_result())


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


def _batch_checkpointer(save: Callable[[int], None], done_batches: int, steps_per_epoch: int, every: int) -> Any:
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
                save(done)
                self.last = done

    return BatchCheckpointer()


def _fit_epoch(
    model: Any,
    data: MnistData,
    cfg: Config,
    epoch: int,
    done_batches: int,
    state: "checkpoint.TrainState",
    callbacks: Sequence[Any],
    save_batch_checkpoint: Optional[Callable[[int], None]],
) -> dict[str, float]:
    """One epoch (or its rest) the lesson's way: the shuffled float32 arrays into ``model.fit``."""
    steps_per_epoch = -(-data.x_train.shape[0] // cfg.train.batch_size)
    # The rest of this epoch's fixed order: a part-done epoch continues at its next batch.
    order = epoch_order(cfg.train.seed, epoch, data.x_train.shape[0])[done_batches * cfg.train.batch_size :]
    epoch_callbacks = list(callbacks)
    if done_batches:
        epoch_callbacks.append(_metric_restorer(state))
    if save_batch_checkpoint is not None:
        epoch_callbacks.append(
            _batch_checkpointer(save_batch_checkpoint, done_batches, steps_per_epoch, cfg.train.checkpoint_every_batches)
        )
    fitted = model.fit(
        data.x_train[order],
        data.y_train[order],
        batch_size=cfg.train.batch_size,
        epochs=epoch + 1,
        initial_epoch=epoch,
        shuffle=False,
        validation_data=None if data.x_val is None else (data.x_val, data.y_val),
        callbacks=epoch_callbacks,
        verbose=0,
    )
    return {k: float(v[-1]) for k, v in fitted.history.items()}


def _compiled_epoch(
    model: Any,
    loop: CompiledLoop,
    data: CompactData,
    cfg: Config,
    epoch: int,
    done_batches: int,
    state: "checkpoint.TrainState",
    callbacks: Sequence[Any],
    save_batch_checkpoint: Optional[Callable[[int], None]],
) -> dict[str, float]:
    """One epoch (or its rest) through the compiled loop, with ``model.fit``'s callbacks and logs."""
    import keras

    every = cfg.train.checkpoint_every_batches if save_batch_checkpoint is not None else None
    # A callback that watches batches sees every one; otherwise calls run steps_per_execution batches.
    chunk = 1 if _has_batch_hooks(callbacks) else cfg.train.steps_per_execution
    hooks = keras.callbacks.CallbackList(list(callbacks), model=model)
    hooks.on_train_begin()
    model.reset_metrics()
    if done_batches:
        checkpoint.restore_metrics(model, state)
    hooks.on_epoch_begin(epoch)
    loop.run_epoch(
        epoch_order(cfg.train.seed, epoch, loop.n),
        done_batches,
        hooks,
        chunk,
        boundary=lambda done: every is not None and done % every == 0,
        at_boundary=save_batch_checkpoint or (lambda done: None),
    )
    # Key order as fit's logs have it (its compiled functions return sorted dicts): the
    # history.csv columns and log lines stay the same under either execution.
    logs = dict(sorted(model.get_metrics_result().items()))
    if data.x_val is not None:
        val = model.evaluate(
            data.x_val, data.y_val, batch_size=cfg.train.batch_size, callbacks=list(callbacks), verbose=0, return_dict=True
        )
        logs.update({f"val_{k}": v for k, v in sorted(val.items())})
    logs = {k: float(v) for k, v in logs.items()}
    hooks.on_epoch_end(epoch, logs)
    hooks.on_train_end(logs)
    return logs


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
    started = outputs.utc_now()
    runtime = runtime or RuntimeInfo.from_env()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_config(run_dir, cfg)
    compiled = Execution(cfg.train.execution) is Execution.compiled_loop

    # Before TensorFlow starts: a missing or corrupt cache fails in well under a second.
    data: Union[MnistData, CompactData] = load_compact(cfg.data) if compiled else load_mnist(cfg.data)
    threads = configure_tensorflow(cfg.train, runtime)
    import keras

    from mnist_hpc.model import build_model, compile_model

    # Keras turns XLA off under op determinism (not every op has a deterministic XLA kernel).
    jit = cfg.train.jit_compile and not cfg.train.deterministic
    keras.utils.set_random_seed(cfg.train.seed)
    model = compile_model(
        build_model(cfg.model),
        cfg.optimizer,
        # The compiled loop has its own program; evaluate and predict run as a loaded model.keras does.
        jit_compile=False if compiled else jit,
        steps_per_execution=1 if compiled else cfg.train.steps_per_execution,
    )
    model.summary(print_fn=lambda line, *args, **kwargs: log.info(line))
    n_train = data.x_train.shape[0]
    loop = CompiledLoop(model, data, cfg.train.batch_size, cfg.train.steps_per_execution, jit) if compiled else None
    log.info(
        "training on %d samples (validation %d, test %d), execution %s (XLA %s, up to %d batches per call), "
        "threads %s, run dir %s",
        n_train,
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

    def batch_saver(epoch: int) -> Callable[[int], None]:
        def save(done: int) -> None:
            checkpoint.save(run_dir, checkpoint.TrainState(epoch, done, list(history)), model, fp, with_metrics=True)

        return save

    train_start = time.perf_counter()
    for epoch in range(state.epoch, cfg.train.epochs):
        done_batches = state.batch if epoch == state.epoch else 0
        save_batch_checkpoint = batch_saver(epoch) if cfg.train.checkpoint_every_batches else None
        epoch_start = time.perf_counter()
        if loop is not None:
            assert isinstance(data, CompactData)
            logs = _compiled_epoch(model, loop, data, cfg, epoch, done_batches, state, callbacks, save_batch_checkpoint)
        else:
            assert isinstance(data, MnistData)
            logs = _fit_epoch(model, data, cfg, epoch, done_batches, state, callbacks, save_batch_checkpoint)
        record: dict[str, Any] = {"epoch": epoch + 1, **logs, "seconds": time.perf_counter() - epoch_start}
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

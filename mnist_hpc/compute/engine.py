"""How one epoch of training executes: two engines for the same training (``train.execution``).

- :class:`FitEngine` (``keras_fit``), the lesson's: float32 arrays, one shuffled copy per
  epoch, Keras ``model.fit``.
- :class:`CompiledEngine` (``compiled_loop``, the default): the training images stay uint8
  inside TensorFlow and each batch is gathered by index and scaled inside one (XLA-)compiled
  loop (:class:`CompiledLoop`) that runs ``steps_per_execution`` batches per call. Same
  network, loss, optimizer, batches and order; about 3x faster per epoch on a 2-core CPU and
  lighter on memory (``benchmarks/results/training.md``).

Both take the same arguments and return ``model.fit``'s epoch logs, so the orchestration in
:mod:`mnist_hpc.compute.train` does not care which one runs. Both continue a part-done epoch
at its next batch, in the epoch's own order (:func:`epoch_order`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from mnist_hpc.compute.data import MnistData
from mnist_hpc.config import Config, Distribution, Execution, TrainConfig, flat_config, traced_config

log = logging.getLogger(__name__)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of one epoch, a pure function of (seed, epoch).

    Keras' numpy-input path reuses one permutation for every epoch under a fixed seed
    (TF #44195), and a seeded tf.data shuffle restarts in a new process; keying the order by
    epoch gives a fresh order per epoch that a resumed process reproduces exactly.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(xy: Any, batch_size: int) -> Any:
    """``(x, y)`` (or ``x``) as a ``tf.data`` pipeline of fixed batches, in order, for evaluate and predict.

    The same batches Keras cuts from arrays. Given arrays, Keras builds its own pipeline with a
    parallel map that op determinism rewrites, and TensorFlow then logs an ``E0000 ...
    use_unbounded_threadpool`` line into every deterministic job's log.
    """
    if xy is None:
        return None
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(xy).batch(batch_size)


def has_batch_hooks(callbacks: Sequence[Any]) -> bool:
    """Whether any callback overrides a per-batch training hook (so wants to see every batch)."""
    import keras

    base = keras.callbacks.Callback
    hooks = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")
    return any(getattr(type(cb), hook) is not getattr(base, hook) for cb in callbacks for hook in hooks)


class Engine(Protocol):
    steps_per_epoch: int

    def run_epoch(
        self,
        epoch: int,
        done_batches: int,
        callbacks: Sequence[Any],
        restore_metrics: Optional[Callable[[], None]],
        save_batch: Optional[Callable[[int], None]],
        after_call: Optional[Callable[[int], None]] = None,
    ) -> dict[str, float]:
        """Train epoch ``epoch`` from batch ``done_batches`` to its end; return the epoch's logs.

        Args:
            epoch: the epoch, counted from 0.
            done_batches: batches of this epoch already trained (a resumed, part-done epoch).
            callbacks: Keras callbacks for this epoch.
            restore_metrics: refills the metric accumulators of a part-done epoch (after the
                engine reset them at the epoch's start); None for a whole epoch.
            save_batch: called with the batches done every ``train.checkpoint_every_batches``
                batches inside the epoch; None: no batch checkpoints.
            after_call: called with the batches done at every step boundary inside the epoch
                (after each compiled call, after each batch under ``model.fit``); it may raise
                to stop training there (Slurm's warning signals).
        """


def build_engine(model: Any, data: MnistData, train: TrainConfig, jit_compile: bool, workers: Any = None) -> Engine:
    """The engine ``train.execution`` asks for, ready to run epochs of ``model`` on ``data``.

    ``workers`` (:mod:`mnist_hpc.compute.distribute`) supplies the compiled loop and the model
    that validates; None: a single process.
    """
    if Execution(train.execution) is Execution.compiled_loop:
        return CompiledEngine(model, data, train, jit_compile, workers)
    assert workers is None or workers.num_workers == 1, "model.fit runs in a single process only"
    return FitEngine(model, data, train)


# --- the lesson's execution: model.fit ----------------------------------------------------------


class FitEngine:
    """One epoch (or its rest) the lesson's way: the shuffled float32 arrays into ``model.fit``."""

    def __init__(self, model: Any, data: MnistData, train: TrainConfig) -> None:
        self.model = model
        self.train = train
        lesson_train = data.lesson("train")
        assert lesson_train is not None
        self.x, self.y = lesson_train
        self.validation = batches(data.lesson("val"), train.batch_size)
        self.steps_per_epoch = -(-self.x.shape[0] // train.batch_size)

    def run_epoch(
        self,
        epoch: int,
        done_batches: int,
        callbacks: Sequence[Any],
        restore_metrics: Optional[Callable[[], None]],
        save_batch: Optional[Callable[[int], None]],
        after_call: Optional[Callable[[int], None]] = None,
    ) -> dict[str, float]:
        train = self.train
        # The rest of this epoch's fixed order: a part-done epoch continues at its next batch.
        order = epoch_order(train.seed, epoch, self.x.shape[0])[done_batches * train.batch_size :]
        epoch_callbacks = list(callbacks)
        if restore_metrics is not None:
            epoch_callbacks.append(_at_epoch_begin(restore_metrics))
        if save_batch is not None and train.checkpoint_every_batches:
            epoch_callbacks.append(
                _batch_checkpointer(save_batch, done_batches, self.steps_per_epoch, train.checkpoint_every_batches)
            )
        if after_call is not None:
            epoch_callbacks.append(_after_batch(after_call, done_batches, self.steps_per_epoch))
        fitted = self.model.fit(
            self.x[order],
            self.y[order],
            batch_size=train.batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=False,
            validation_data=self.validation,
            callbacks=epoch_callbacks,
            verbose=0,
        )
        return {k: float(v[-1]) for k, v in fitted.history.items()}


def _at_epoch_begin(action: Callable[[], None]) -> Any:
    """A callback that runs ``action`` when fit starts the epoch (after fit reset the metrics)."""
    import keras

    class AtEpochBegin(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
            action()

    return AtEpochBegin()


def _after_batch(action: Callable[[int], None], done_batches: int, steps_per_epoch: int) -> Any:
    """A callback that calls ``action`` with the batches done after every batch but the epoch's last."""
    import keras

    class AfterBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
            done = done_batches + batch + 1
            if done < steps_per_epoch:
                action(done)

    return AfterBatch()


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


# --- the fast execution: a compiled loop over uint8 data ----------------------------------------


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


def build_training_state(model: Any, features: int, num_classes: int) -> None:
    """Build the optimizer, loss and metric state now, as fit does before its first step.

    A part-done epoch's checkpoint restores into it, and a compiled loop's trace then creates no
    variables (tf.function traces a function that creates variables twice).
    """
    model.optimizer.build(model.trainable_variables)
    x0 = np.zeros((1, features), dtype=np.float32)
    y0 = np.zeros((1, num_classes), dtype=np.float32)
    y_pred = model(x0, training=False)
    model.compute_loss(x=x0, y=y0, y_pred=y_pred)
    model.compute_metrics(x0, y0, y_pred, sample_weight=None)
    model.reset_metrics()


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

    def __init__(
        self, model: Any, x_train: np.ndarray, y_train: np.ndarray, batch_size: int, steps_per_call: int, jit_compile: bool
    ) -> None:
        import tensorflow as tf

        self.model = model
        self.batch_size = batch_size
        self.steps_per_call = steps_per_call
        self.n = x_train.shape[0]
        self.full_batches = self.n // batch_size
        self.steps_per_epoch = -(-self.n // batch_size)
        self._images = tf.constant(x_train)
        self._labels = tf.constant(y_train)
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
        build_training_state(model, x_train.shape[1], num_classes)

    def run_epoch(
        self,
        order: np.ndarray,
        done_batches: int,
        callbacks: Any,
        chunk: int,
        boundary: Callable[[int], bool],
        at_boundary: Callable[[int], None],
        after_call: Optional[Callable[[int], None]] = None,
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
            after_call: called with the batches done after every call that does not end the epoch.
        """
        rows = order[: self.full_batches * self.batch_size].astype(np.int32).reshape(self.full_batches, self.batch_size)
        step = done_batches
        while step < self.full_batches:
            stop = step + 1
            while stop < min(step + chunk, self.full_batches) and not boundary(stop):
                stop += 1
            callbacks.on_train_batch_begin(step - done_batches)
            self._call(rows[step:stop])
            callbacks.on_train_batch_end(stop - 1 - done_batches, self._batch_logs(chunk))
            step = stop
            if boundary(step) and step < self.steps_per_epoch:
                at_boundary(step)
            if after_call is not None and step < self.steps_per_epoch:
                after_call(step)
        if self.full_batches < self.steps_per_epoch:
            callbacks.on_train_batch_begin(self.full_batches - done_batches)
            self._call_last(order[self.full_batches * self.batch_size :].astype(np.int32))
            callbacks.on_train_batch_end(self.full_batches - done_batches, self._batch_logs(chunk))

    def _call(self, block: np.ndarray) -> None:
        """One compiled call over the full batches in ``block`` (one row of indices per batch)."""
        import tensorflow as tf

        self._rows[: block.shape[0]] = block
        self._run(self._images, self._labels, tf.constant(self._rows), tf.constant(block.shape[0], tf.int32))

    def _call_last(self, tail: np.ndarray) -> None:
        """The epoch's last, smaller batch."""
        import tensorflow as tf

        self._run_last(self._images, self._labels, tf.constant(tail[None, :]), tf.constant(1, tf.int32))

    def _batch_logs(self, chunk: int) -> dict[str, Any]:
        """The logs batch hooks get after a call."""
        return self.model.get_metrics_result()


class CompiledEngine:
    """One epoch (or its rest) through the compiled loop, with ``model.fit``'s callbacks and logs.

    Under several workers, callbacks and validation run on the chief only (on a plain copy of
    the model); the other workers train and take part in every collective.
    """

    def __init__(self, model: Any, data: MnistData, train: TrainConfig, jit_compile: bool, workers: Any = None) -> None:
        self.model = model
        self.train = train
        self.workers = workers
        args = (model, data.x_train, data.y_train, train.batch_size, train.steps_per_execution, jit_compile)
        self.loop = workers.make_loop(*args) if workers is not None else CompiledLoop(*args)
        self.is_chief = workers is None or workers.is_chief
        self.validation = batches(data.lesson("val"), train.batch_size) if self.is_chief else None
        self.steps_per_epoch = self.loop.steps_per_epoch

    def run_epoch(
        self,
        epoch: int,
        done_batches: int,
        callbacks: Sequence[Any],
        restore_metrics: Optional[Callable[[], None]],
        save_batch: Optional[Callable[[int], None]],
        after_call: Optional[Callable[[int], None]] = None,
    ) -> dict[str, float]:
        import keras

        model, train = self.model, self.train
        every = train.checkpoint_every_batches if save_batch is not None else None
        # A callback that watches batches sees every one; otherwise calls run steps_per_execution
        # batches. Every worker decides alike, so their calls (and collectives) stay in step.
        chunk = 1 if has_batch_hooks(callbacks) else train.steps_per_execution
        hooks = keras.callbacks.CallbackList(list(callbacks) if self.is_chief else [], model=model)
        hooks.on_train_begin()
        model.reset_metrics()
        if restore_metrics is not None:
            restore_metrics()
        hooks.on_epoch_begin(epoch)
        self.loop.run_epoch(
            epoch_order(train.seed, epoch, self.loop.n),
            done_batches,
            hooks,
            chunk,
            boundary=lambda done: every is not None and done % every == 0,
            at_boundary=save_batch or (lambda done: None),
            after_call=after_call,
        )
        # Key order as fit's logs have it (its compiled functions return sorted dicts): the
        # history.csv columns and log lines stay the same under either execution.
        logs = dict(sorted(model.get_metrics_result().items()))
        if self.validation is not None:
            evaluator = self.workers.plain_model(model) if self.workers is not None else model
            val = evaluator.evaluate(self.validation, callbacks=list(callbacks), verbose=0, return_dict=True)
            logs.update({f"val_{k}": v for k, v in sorted(val.items())})
        logs = {k: float(v) for k, v in logs.items()}
        hooks.on_epoch_end(epoch, logs)
        hooks.on_train_end(logs)
        return logs


# --- several trials in one process: each shape traced and compiled once ------------------------


class _Warm:
    """The compiled engine of this process's last trial, kept for its next trial of the same shapes."""

    def __init__(self, key: str, model: Any, engine: "CompiledEngine") -> None:
        self.key = key
        self.model = model
        self.engine = engine


_warm: Optional[_Warm] = None


def shapes_key(cfg: Config, data: MnistData, jit_compile: bool) -> str:
    """Everything the compiled programs (train loop, evaluate, predict) are traced from.

    Every config key that reaches a program (its ``traced`` fact in :data:`mnist_hpc.config.KEYS`: not
    paths, seed, epochs, checkpoint intervals, threads, learning rate, ...), the XLA setting in
    effect and the data itself. Two trials with equal keys differ only in variable values.
    """
    traced = traced_config(flat_config(cfg))
    return json.dumps({**traced, "data.sha256": data.sha256, "xla": jit_compile}, sort_keys=True, default=str)


def engine_for(fresh: Any, data: MnistData, cfg: Config, jit_compile: bool, workers: Any) -> tuple[Any, Engine]:
    """The model a trial trains and its engine, given the trial's freshly built and compiled model.

    A process that trains several trials (a packed task, a search worker) traces and compiles
    once per shape (:func:`shapes_key`): a later trial of the same shapes trains the earlier
    trial's model object through its compiled programs, with every variable (weights, dropout
    RNG state, optimizer slots, iteration count, learning rate) set from ``fresh``, which was
    built exactly as the trial alone builds it. It starts where the trial alone starts and runs
    the same programs, so its metrics and weights are the same, bit for bit (tests compare
    them). Several workers, and ``model.fit``, build their own engine every time.
    """
    global _warm
    reusable = (
        Execution(cfg.train.execution) is Execution.compiled_loop
        and Distribution(workers.distribution) is Distribution.none
    )
    key = shapes_key(cfg, data, jit_compile) if reusable else None
    if key is not None and _warm is not None and _warm.key == key:
        try:
            start_from(_warm.model, fresh)
        except WarmMismatch as exc:  # a bug if it happens: build this trial's own programs instead
            log.warning("not reusing the previous trial's programs: %s", exc)
        else:
            log.info("same shapes as this process's previous trial: training through its compiled programs, "
                     "every variable set as this trial's fresh build sets it")
            _warm.engine.train = cfg.train  # this trial's seed (data order) and checkpoint interval
            return _warm.model, _warm.engine
    _warm = None  # another shape: let the previous programs and data go first
    engine = build_engine(fresh, data, cfg.train, jit_compile, workers)
    if key is not None:
        assert isinstance(engine, CompiledEngine)
        _warm = _Warm(key, fresh, engine)
    return fresh, engine


class WarmMismatch(RuntimeError):
    """A fresh model's variables do not match the kept model's one for one (count, shape, dtype)."""


def start_from(model: Any, fresh: Any) -> None:
    """Set every variable of ``model`` (and its optimizer) to ``fresh``'s; reset its metrics.

    Raises:
        WarmMismatch: before anything is assigned, if the variables do not pair up.
    """
    fresh.optimizer.build(fresh.trainable_variables)
    pairs = []
    for what, mine, theirs in (("model", model.variables, fresh.variables),
                               ("optimizer", model.optimizer.variables, fresh.optimizer.variables)):
        if len(mine) != len(theirs):
            raise WarmMismatch(f"{len(theirs)} {what} variables where the kept model has {len(mine)}")
        for variable, value in zip(mine, theirs):
            if tuple(variable.shape) != tuple(value.shape) or variable.dtype != value.dtype:
                raise WarmMismatch(f"{what} variable {value.path} is {value.dtype}{tuple(value.shape)} where the kept "
                                   f"model's {variable.path} is {variable.dtype}{tuple(variable.shape)}")
            pairs.append((variable, value))
    for variable, value in pairs:
        variable.assign(value.value)
    model.reset_metrics()


def forget_warm() -> None:
    """Drop the kept engine (its model, programs and training data)."""
    global _warm
    _warm = None

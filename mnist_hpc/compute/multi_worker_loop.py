"""The compiled training loop under a multi-worker strategy (see :mod:`mnist_hpc.compute.distribute`).

Keras 3's ``model.fit`` cannot run under ``MultiWorkerMirroredStrategy`` (keras #20585): this
loop runs Keras' own loss, metrics and optimizer inside ``strategy.run``, with the chunking,
callbacks and resume arithmetic of :class:`~mnist_hpc.compute.engine.CompiledLoop`. XLA cannot
compile collectives on CPU, so each step is split in two: the worker's forward and backward
pass (XLA-compiled), then the all-reduce and the optimizer update (a plain graph).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_hpc.compute.engine import CompiledLoop, build_training_state, lesson_batch, scale_table


class DistributedLoop(CompiledLoop):
    """:class:`~mnist_hpc.compute.engine.CompiledLoop` under a multi-worker strategy (its ``run_epoch``).

    Each call runs up to ``steps_per_call`` global batches. Worker ``k`` gathers rows
    ``[k * local, (k + 1) * local)`` of each global batch (``local = ceil(batch / workers)``),
    computes its loss and gradients (XLA-compiled when ``jit``) and hands them to the
    optimizer, whose ``apply_gradients`` sums them across workers before the update: every
    worker applies the same update and the weights stay identical. Keras divides each
    worker's mean loss by the number of workers, so the sum is the global batch's mean. A batch
    that does not split evenly (the epoch's last one, or a batch size the workers do not
    divide) pads each share to ``local`` rows with zero weight and scales the others' weights
    so that the gradient and the metrics still average over exactly the global batch's rows.
    """

    def __init__(  # noqa: D107 - CompiledLoop's state, built under the strategy
        self, strategy: Any, model: Any, x_train: np.ndarray, y_train: np.ndarray, batch_size: int, steps_per_call: int,
        jit_compile: bool,
    ) -> None:
        import tensorflow as tf
        from keras.src.losses.loss import unscale_loss_for_distribution

        self.strategy = strategy
        self.model = model
        self.batch_size = batch_size
        self.steps_per_call = steps_per_call
        self.n = x_train.shape[0]
        self.full_batches = self.n // batch_size
        self.steps_per_epoch = -(-self.n // batch_size)
        self.workers = strategy.num_replicas_in_sync
        if batch_size < self.workers:
            raise ValueError(f"train.batch_size={batch_size} is smaller than the {self.workers} workers")
        self._images = tf.constant(x_train)
        self._labels = tf.constant(y_train)
        self._scale = tf.constant(scale_table())
        num_classes = int(model.outputs[0].shape[-1])
        workers = self.workers

        def real_rows(rows: Any, real: Any) -> Any:
            """Which of this worker's rows belong to the global batch (the rest is padding)."""
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            local = tf.shape(rows)[0]
            return rid * local + tf.range(local) < real

        def local_step(rows: Any, real: Any, even: bool) -> Any:
            x, y = lesson_batch(self._scale, self._images, self._labels, rows, num_classes)
            if even:
                loss_weight = None
                tracker_weight = tf.shape(x)[0]
            else:
                # Padding rows weigh 0; the others are scaled so that each worker's mean (which
                # Keras divides by the number of workers) sums to the global batch's mean.
                share = tf.cast(real, tf.float32) / float(workers)
                loss_weight = tf.cast(real_rows(rows, real), tf.float32) * tf.cast(tf.shape(x)[0], tf.float32) / share
                tracker_weight = share
            # Keras' own train_step, split at the optimizer (see the class docstring).
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=loss_weight, training=True)
                model._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=tracker_weight)
                loss = model.optimizer.scale_loss(loss)
            gradients = tape.gradient(loss, model.trainable_weights)
            if even:
                model.compute_metrics(x, y, y_pred, sample_weight=None)
                return gradients, ()
            return gradients, (y, y_pred)

        def make_run(local: int, even: bool, jit: bool) -> Any:
            compiled_step = tf.function(lambda rows, real: local_step(rows, real, even), jit_compile=jit)

            def replica(rows: Any, real: Any) -> None:
                rid = tf.distribute.get_replica_context().replica_id_in_sync_group
                mine = tf.slice(rows, [rid * local], [local])
                gradients, outputs = compiled_step(mine, real)
                if not even:
                    # compile()'s metrics ignore sample weights: keep the padding out of them
                    # (a shape that varies by worker, so outside the XLA program).
                    keep = real_rows(mine, real)
                    y, y_pred = outputs
                    model.compute_metrics(None, tf.boolean_mask(y, keep), tf.boolean_mask(y_pred, keep), sample_weight=None)
                model.optimizer.apply_gradients(zip(gradients, model.trainable_weights))

            def run(block: Any, real: Any, count: Any) -> None:
                def step(i: Any) -> Any:
                    strategy.run(replica, args=(block[i], real))
                    return (i + 1,)

                tf.while_loop(lambda i: i < count, step, (tf.constant(0),))

            return tf.function(run)

        self._local = -(-batch_size // workers)
        self._run = make_run(self._local, batch_size % workers == 0, jit_compile)
        tail = self.n - self.full_batches * batch_size
        self._tail_local = -(-tail // workers) if tail else 0
        # The last, smaller batch runs once per epoch: a plain graph, as in CompiledLoop.
        self._run_last = make_run(self._tail_local, tail % workers == 0, False) if tail else None
        self._rows = np.zeros((steps_per_call, self._local * workers), dtype=np.int32)
        with strategy.scope():
            build_training_state(model, x_train.shape[1], num_classes)

    def _call(self, block: np.ndarray) -> None:
        import tensorflow as tf

        self._rows[: block.shape[0], : self.batch_size] = block
        self._run(tf.constant(self._rows), tf.constant(self.batch_size, tf.int32), tf.constant(block.shape[0], tf.int32))

    def _call_last(self, tail: np.ndarray) -> None:
        import tensorflow as tf

        block = np.zeros((1, self._tail_local * self.workers), dtype=np.int32)
        block[0, : tail.shape[0]] = tail
        assert self._run_last is not None
        self._run_last(tf.constant(block), tf.constant(tail.shape[0], tf.int32), tf.constant(1, tf.int32))

    def _batch_logs(self, chunk: int) -> dict[str, Any]:
        # Reading the metrics sums them across workers: every worker does it, at the same calls,
        # and only where a callback watches batches (chunk 1).
        return self.model.get_metrics_result() if chunk == 1 else {}

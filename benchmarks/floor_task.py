"""A Slurm task that trains the lesson's trials as cheaply as TensorFlow can: the sweep's floor.

``bench_sweep.py`` submits two of these (an array, 1 CPU each, as the ``auto`` layout's two
tasks), each training ``--trials`` trials of ``--epochs`` epochs. Nothing of mnist-hpc runs:
plain ``import tensorflow`` (no Keras), the npz read with numpy, the lesson's step written by hand
(Dense 512 relu, Dense 10 softmax, mean categorical cross-entropy, rmsprop with Keras' defaults:
rho 0.9, epsilon 1e-7, learning rate 1e-3) in one XLA-compiled loop over batches gathered by
index, no metrics, no evaluation, no outputs but one timing line. What is left is what any sweep
of these trials pays here: Slurm's start of the task, Python, TensorFlow's import, one XLA
compilation and the epochs. Each epoch runs the 468 full batches of 128 (the lesson also runs a
last batch of 96, 0.2% of the work, left out here).

    srun python benchmarks/floor_task.py --data mnist.npz --out timings.json
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

BATCH, HIDDEN, CLASSES, PER_CALL = 128, 512, 10, 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the timings (json)")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    imported = time.time()
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    with np.load(args.data) as npz:
        x_np, y_np = npz["x_train"].reshape(-1, 784), npz["y_train"]
    x, y = tf.constant(x_np), tf.constant(y_np)
    scale = tf.constant(np.arange(256, dtype=np.float32) / 255)  # the lesson's float32(v) / 255
    n = x_np.shape[0]
    full = n // BATCH
    shapes = [(784, HIDDEN), (HIDDEN,), (HIDDEN, CLASSES), (CLASSES,)]
    params = [tf.Variable(tf.zeros(s)) for s in shapes]
    slots = [tf.Variable(tf.zeros(s)) for s in shapes]
    lr, rho, eps = 1e-3, 0.9, 1e-7

    @tf.function(jit_compile=True)
    def run(rows: tf.Tensor, count: tf.Tensor) -> None:
        w1, b1, w2, b2 = params

        def step(i: tf.Tensor) -> tuple:
            xb = tf.gather(scale, tf.cast(tf.gather(x, rows[i]), tf.int32))
            yb = tf.one_hot(tf.cast(tf.gather(y, rows[i]), tf.int32), CLASSES)
            h = tf.nn.relu(tf.matmul(xb, w1) + b1)
            p = tf.nn.softmax(tf.matmul(h, w2) + b2)
            g = (p - yb) / BATCH  # d(mean cross-entropy)/d(logits)
            dh = tf.matmul(g, w2, transpose_b=True) * tf.cast(h > 0, tf.float32)
            grads = [tf.matmul(xb, dh, transpose_a=True), tf.reduce_sum(dh, 0),
                     tf.matmul(h, g, transpose_a=True), tf.reduce_sum(g, 0)]
            for var, slot, grad in zip(params, slots, grads):
                slot.assign(rho * slot + (1 - rho) * tf.square(grad))
                var.assign_sub(lr * grad / (tf.sqrt(slot) + eps))
            return (i + 1,)

        tf.while_loop(lambda i: i < count, step, (tf.constant(0),))

    block = np.zeros((PER_CALL, BATCH), dtype=np.int32)
    ready = time.time()
    run(tf.constant(block), tf.constant(0, tf.int32))  # traces and compiles; runs no step
    compiled = time.time()
    epoch_s = []
    for trial in range(args.trials):
        rng = np.random.default_rng(trial)
        limit = np.sqrt(6 / (784 + HIDDEN)), np.sqrt(6 / (HIDDEN + CLASSES))  # Glorot uniform, as Keras
        params[0].assign(rng.uniform(-limit[0], limit[0], shapes[0]).astype(np.float32))
        params[2].assign(rng.uniform(-limit[1], limit[1], shapes[2]).astype(np.float32))
        for var in (params[1], params[3], *slots):
            var.assign(tf.zeros_like(var))
        for _ in range(args.epochs):
            began = time.time()
            rows = rng.permutation(n)[: full * BATCH].astype(np.int32).reshape(full, BATCH)
            for start in range(0, full, PER_CALL):
                count = min(PER_CALL, full - start)
                block[:count] = rows[start:start + count]
                run(tf.constant(block), tf.constant(count, tf.int32))
            float(params[3][0])  # wait for the last call
            epoch_s.append(time.time() - began)
    ended = time.time()
    args.out.write_text(json.dumps({
        "started": STARTED, "imported": imported, "compiled": compiled, "ended": ended,
        "import_s": imported - STARTED, "data_s": ready - imported, "compile_s": compiled - ready,
        "epoch_s": epoch_s, "threads": threads,
        "task": os.environ.get("SLURM_ARRAY_TASK_ID"), "node": os.environ.get("SLURMD_NODENAME"),
    }) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

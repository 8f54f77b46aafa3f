"""Per-step cost of the execution levers that are not config switches, measured side by side.

``bench_training.py --levers`` compares whole runs under the config's execution settings (XLA,
batches per call, threads, oneDNN). The levers here live inside the compiled loop's design, so
this script builds each variant in one process, with the same initial weights, and times
them in turns on the same batches: chunks of ``--chunk`` training steps, variant after variant,
for ``--rounds`` rounds. Taking turns spreads a noisy machine's load over all variants alike;
the minimum over rounds estimates the quiet-machine cost, the median the typical one.

Variants (batch 128, the lesson's network, rmsprop):

- ``host batches, no XLA``: float32 batches sliced on the host from the epoch's shuffled copy,
  one call per batch (Keras ``fit``'s execution without its data adapter and callbacks);
- ``tf.data + XLA step, 64/call``: a tf.data pipeline (uint8 in memory, scaled in ``map``)
  feeding an XLA-compiled step from a graph loop (Keras ``fit`` with ``jit_compile`` and
  ``steps_per_execution``);
- ``loop ...``: mnist-hpc's compiled loop (gather by index inside the graph) with float32 or
  uint8 resident images, one-hot or sparse labels, with or without XLA. The default is
  ``loop uint8, one-hot, XLA``.

    python benchmarks/bench_step_levers.py --data ../shared/data/mnist.npz [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's mnist_hpc


def build_variants(npz: Path, chunk: int) -> dict[str, Callable[[Any], None]]:
    import keras
    import numpy as np
    import tensorflow as tf

    from mnist_hpc.config import ModelConfig, OptimizerConfig
    from mnist_hpc.compute.data import one_hot, prepare_images
    from mnist_hpc.compute.engine import lesson_batch, scale_table
    from mnist_hpc.compute.model import build_model, build_optimizer

    with np.load(npz) as f:
        x_u8, y_u8 = f["x_train"].reshape(-1, 784), f["y_train"]
    x_f32, y_oh = prepare_images(x_u8), one_hot(y_u8)
    images_u8, images_f32 = tf.constant(x_u8), tf.constant(x_f32)
    labels_u8, labels_oh, labels_i32 = tf.constant(y_u8), tf.constant(y_oh), tf.constant(y_u8.astype(np.int32))
    scale = tf.constant(scale_table())

    def model(sparse: bool) -> Any:
        keras.utils.set_random_seed(0)
        m = build_model(ModelConfig())
        m.compile(optimizer=build_optimizer(OptimizerConfig()), metrics=["accuracy"],
                  loss="sparse_categorical_crossentropy" if sparse else "categorical_crossentropy")
        m.optimizer.build(m.trainable_variables)
        return m

    def host_batches() -> Callable[[Any], None]:
        m = model(False)
        step = tf.function(lambda x, y: m.train_step((x, y)))

        def run(rows: Any) -> None:
            x, y = x_f32[rows.reshape(-1)], y_oh[rows.reshape(-1)]  # the epoch's shuffled copy (this chunk of it)
            for i in range(rows.shape[0]):
                step(x[i * rows.shape[1] : (i + 1) * rows.shape[1]], y[i * rows.shape[1] : (i + 1) * rows.shape[1]])

        return run

    def tf_data_xla() -> Callable[[Any], None]:
        m = model(False)
        step = tf.function(lambda x, y: m.train_step((x, y)), jit_compile=True)

        @tf.function
        def multi(iterator: Any) -> None:
            for _ in tf.range(chunk):
                x, y = next(iterator)
                step(x, y)

        def run(rows: Any) -> None:
            ds = tf.data.Dataset.from_tensor_slices(rows).map(
                lambda r: lesson_batch(scale, images_u8, labels_u8, r, 10), num_parallel_calls=tf.data.AUTOTUNE
            ).prefetch(tf.data.AUTOTUNE)
            multi(iter(ds))

        return run

    def loop(images: Any, float_images: bool, sparse: bool, jit: bool) -> Callable[[Any], None]:
        m = model(sparse)
        labels = labels_i32 if sparse else labels_u8

        @tf.function(jit_compile=jit)
        def multi(rows: Any) -> None:
            for i in tf.range(tf.shape(rows)[0]):
                if float_images:
                    x, y = tf.gather(images, rows[i]), tf.gather(labels_oh, rows[i])
                elif sparse:
                    x, y = lesson_batch(scale, images, labels, rows[i], 10)[0], tf.gather(labels, rows[i])
                else:
                    x, y = lesson_batch(scale, images, labels, rows[i], 10)
                m.train_step((x, y))

        return lambda rows: multi(tf.constant(rows))

    return {
        "host batches, no XLA": host_batches(),
        "tf.data + XLA step, 64/call": tf_data_xla(),
        "loop float32, one-hot, XLA": loop(images_f32, True, False, True),
        "loop uint8, one-hot, no XLA": loop(images_u8, False, False, False),
        "loop uint8, sparse, XLA": loop(images_u8, False, True, True),
        "loop uint8, one-hot, XLA (default)": loop(images_u8, False, False, True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the lesson's mnist.npz")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=64, help="training steps per timed call")
    parser.add_argument("--out", type=Path, default=None, help="write step_levers.json here too")
    args = parser.parse_args(argv)
    import numpy as np

    variants = build_variants(args.data, args.chunk)
    order = np.random.default_rng(0).permutation(60_000).astype(np.int32)[: 468 * 128].reshape(468, 128)
    starts = list(range(0, 468 - args.chunk, args.chunk))
    for run in variants.values():  # trace and compile outside the timing
        run(order[: args.chunk])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        rows = order[starts[r % len(starts)] :][: args.chunk]
        for name, run in variants.items():
            t = time.perf_counter()
            run(rows)
            times[name].append((time.perf_counter() - t) / args.chunk)
    ref = "host batches, no XLA"
    result = {
        name: {
            "min_ms": 1e3 * min(v),
            "median_ms": 1e3 * statistics.median(v),
            "speedup_min_vs_host": min(times[ref]) / min(v),
            "epoch_s_at_min": min(v) * 60_000 / 128,
        }
        for name, v in times.items()
    }
    print(f"{'variant':40s} {'min ms/step':>12s} {'median':>8s} {'vs host':>8s} {'epoch s':>8s}")
    for name, r in result.items():
        print(f"{name:40s} {r['min_ms']:12.2f} {r['median_ms']:8.2f} {r['speedup_min_vs_host']:7.2f}x {r['epoch_s_at_min']:8.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_levers.json").write_text(json.dumps({"chunk": args.chunk, "rounds": args.rounds, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The network and its optimizer, built from config. Runs on compute nodes: imports Keras lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mnist_hpc.config import ModelConfig, OptimizerConfig, OptimizerName

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

INPUT_DIM = 28 * 28
NUM_CLASSES = 10


def build_model(cfg: ModelConfig) -> "keras.Model":
    """Dense hidden layers then Dense(10, softmax); the defaults are the lesson's network."""
    import keras

    layers: list[keras.layers.Layer] = [keras.Input(shape=(INPUT_DIM,), name="pixels")]
    for i, units in enumerate(cfg.hidden_units):
        layers.append(keras.layers.Dense(units, activation=cfg.activation, name=f"hidden_{i}"))
        if cfg.dropout > 0:
            layers.append(keras.layers.Dropout(cfg.dropout, name=f"dropout_{i}"))
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax", name="digits"))
    return keras.Sequential(layers, name="mnist_mlp")


def build_optimizer(cfg: OptimizerConfig) -> "keras.optimizers.Optimizer":
    """The configured optimizer; rmsprop at 1e-3 equals the lesson's ``optimizer='rmsprop'``."""
    import keras

    name = OptimizerName(cfg.name)
    if name is OptimizerName.rmsprop:
        return keras.optimizers.RMSprop(learning_rate=cfg.learning_rate)
    if name is OptimizerName.adam:
        return keras.optimizers.Adam(learning_rate=cfg.learning_rate)
    return keras.optimizers.SGD(learning_rate=cfg.learning_rate, momentum=cfg.momentum)


def compile_model(
    model: "keras.Model",
    optimizer: OptimizerConfig,
    *,
    jit_compile: bool = False,
    steps_per_execution: int = 1,
) -> "keras.Model":
    """Compile with the lesson's loss and metric."""
    model.compile(
        optimizer=build_optimizer(optimizer),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model

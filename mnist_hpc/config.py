"""The typed configuration: dataclass schemas registered in Hydra's ConfigStore.

YAML under ``conf/`` supplies the values; these schemas reject unknown keys and wrong types
when Hydra composes the config, and :func:`validate` rejects out-of-range values, so that a
typo fails on the login node before any job is queued. Entry points convert the composed
config once with :func:`to_typed` and pass the resulting :class:`Config` down.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from mnist_hpc.cache import DEFAULT_FILENAME, filename_problem

ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "elu", "selu", "swish")


class ConfigError(CompactHydraException, ValueError):
    """A configuration value is invalid; the message names the key and the fix.

    A CompactHydraException, so the Hydra app prints the message alone, not a traceback.
    """


class Execution(str, enum.Enum):
    """How training runs; both give the lesson's training, only the speed differs."""

    # Keras model.fit on float32 numpy arrays, one copy of the shuffled set per epoch: the lesson.
    keras_fit = "keras_fit"
    # uint8 data resident in TensorFlow, each batch gathered and scaled inside one compiled loop.
    compiled_loop = "compiled_loop"


class Distribution(str, enum.Enum):
    """How one training uses the tasks of its Slurm job."""

    # One process trains alone; a job with several tasks is refused (they would be copies).
    none = "none"
    # One training across every task (MultiWorkerMirroredStrategy): train.batch_size is global.
    multi_worker = "multi_worker"
    # multi_worker when the job step has more than one task, else none.
    auto = "auto"


class OptimizerName(str, enum.Enum):
    rmsprop = "rmsprop"
    adam = "adam"
    sgd = "sgd"


@dataclass(frozen=True)
class KeyFacts:
    """What one config key means and decides; every leaf field of the schema declares it (:func:`setting`).

    The three flags are the one source for which keys bind a run directory, which reach a compiled
    program and which fix a checkpoint; :func:`identity_config`, :func:`traced_config` and
    :func:`trajectory_config` apply them, and docs/configuration.md shows them.
    """

    # What the key means, for people (docs/configuration.md is generated from it).
    doc: str
    # Binds the run directory (mnist_hpc.claim.identity_of): a rerun with another value is refused.
    # False for where things are, how fast and how often a run works, and how long it runs.
    identity: bool
    # Reaches a traced TensorFlow program (mnist_hpc.compute.engine.shapes_key, and packing's order):
    # trials of one process that differ only in untraced keys share compiled programs.
    traced: bool
    # Fixes the training trajectory (mnist_hpc.compute.checkpoint.fingerprint): a checkpoint written
    # with another value is refused. Implies identity.
    trajectory: bool


_FACTS = "mnist_hpc"


def setting(default: Any = dataclasses.MISSING, *, doc: str, identity: bool, traced: bool, trajectory: bool,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A schema field with its :class:`KeyFacts`: ``dataclasses.field`` that also says what the key decides."""
    facts = KeyFacts(doc=doc, identity=identity, traced=traced, trajectory=trajectory)
    return field(default=default, default_factory=default_factory, metadata={_FACTS: facts})


def _section(f: dataclasses.Field) -> Optional[type]:
    """The schema of a nested section (a field whose default is a dataclass), else None."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def key_facts(schema: type, prefix: str = "") -> dict[str, KeyFacts]:
    """``{"train.seed": KeyFacts(...), ...}`` for every leaf key of ``schema``, in schema order.

    Raises:
        TypeError: a field that does not say what it decides (declare it with :func:`setting`), or
            one that fixes the trajectory without binding the run directory. A bug, found at import.
    """
    out: dict[str, KeyFacts] = {}
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        section = _section(f)
        if section is not None:
            out.update(key_facts(section, f"{name}."))
            continue
        facts = f.metadata.get(_FACTS)
        if not isinstance(facts, KeyFacts):
            raise TypeError(
                f"config key {name} does not say what it decides: declare it with mnist_hpc.config.setting(default, "
                "doc=..., identity=..., traced=..., trajectory=...)"
            )
        if facts.trajectory and not facts.identity:
            raise TypeError(f"config key {name} fixes the training trajectory, so it must bind the run directory too")
        out[name] = facts
    return out


# Shorthands for the flags of the common kinds of key (see KeyFacts).
_WHERE = dict(identity=False, traced=False, trajectory=False)  # where things are, how fast or how often a run works


@dataclass
class DataConfig:
    cache_dir: str = setting(
        "${oc.env:MNIST_HPC_CACHE,${oc.env:HOME}/.cache/mnist-hpc}",
        doc="Directory holding the verified mnist.npz and its manifest; prefetch writes it, jobs read it. One "
        "setting moves prefetch and training together: MNIST_HPC_CACHE sets it (put it on a shared "
        "filesystem), else a folder under $HOME.",
        **_WHERE,
    )
    filename: str = setting(DEFAULT_FILENAME, doc="File name of the cached dataset inside cache_dir.", **_WHERE)
    validation_split: float = setting(
        0.0,
        doc="Fraction of the training set held out (from its end) for validation; 0 as in the lesson. Sweeps "
        "(experiment=sweep) set 0.1, so that the test set is never used to choose.",
        identity=True, traced=True, trajectory=True,
    )


@dataclass
class ModelConfig:
    hidden_units: list[int] = setting(
        default_factory=lambda: [512],
        doc="Sizes of the hidden Dense layers, in order; the lesson has one layer of 512 (407,050 parameters).",
        identity=True, traced=True, trajectory=True,
    )
    activation: str = setting(
        "relu", doc=f"Keras activation of the hidden layers: one of {', '.join(ACTIVATIONS)}.",
        identity=True, traced=True, trajectory=True,
    )
    dropout: float = setting(
        0.0, doc="Dropout rate after each hidden layer; 0 disables it (the lesson has none).",
        identity=True, traced=True, trajectory=True,
    )


@dataclass
class OptimizerConfig:
    name: OptimizerName = setting(
        OptimizerName.rmsprop, doc="One of rmsprop, adam, sgd (optimizer=sgd also sets learning_rate 0.01, momentum 0.9).",
        identity=True, traced=True, trajectory=True,
    )
    learning_rate: float = setting(
        1e-3,
        doc="Learning rate; 1e-3 is Keras' default for rmsprop and adam. A variable the compiled programs read, "
        "so trials that differ only in it share them.",
        identity=True, traced=False, trajectory=True,
    )
    momentum: float = setting(0.0, doc="Momentum, used by sgd only.", identity=True, traced=True, trajectory=True)


@dataclass
class TrainConfig:
    epochs: int = setting(
        5, doc="Number of passes over the training set. A rerun with more epochs continues the run; fewer is refused.",
        **_WHERE,
    )
    batch_size: int = setting(
        128, doc="Samples per gradient step (global across the tasks of a multi_worker job).",
        identity=True, traced=True, trajectory=True,
    )
    seed: int = setting(
        0,
        doc="Seed for weights, dropout and the per-epoch shuffle order. Not traced: the data order is computed "
        "outside the compiled programs and the initial values are variables.",
        identity=True, traced=False, trajectory=True,
    )
    deterministic: bool = setting(
        False,
        doc="Ask TensorFlow for deterministic ops: identical metrics across runs on CPU, a bit slower (turns XLA off).",
        identity=True, traced=True, trajectory=False,
    )
    intra_op_threads: Optional[int] = setting(
        None, doc="TensorFlow intra-op threads; null follows SLURM_CPUS_PER_TASK, else TensorFlow's default.", **_WHERE
    )
    inter_op_threads: Optional[int] = setting(
        None, doc="TensorFlow inter-op threads; null follows SLURM_CPUS_PER_TASK, else TensorFlow's default.", **_WHERE
    )
    execution: Execution = setting(
        Execution.compiled_loop,
        doc="compiled_loop: uint8 data resident in TensorFlow, batches gathered and scaled inside one XLA-compiled "
        "loop (~3x faster per epoch, same accuracy); keras_fit: the lesson's plain model.fit (train=lesson).",
        identity=True, traced=True, trajectory=False,
    )
    jit_compile: bool = setting(
        True, doc="Compile the train step with XLA (ignored when deterministic: Keras turns XLA off then too).",
        identity=True, traced=True, trajectory=False,
    )
    steps_per_execution: int = setting(
        64,
        doc="Batches per call into the compiled train step (Keras steps_per_execution); a callback with batch hooks "
        "or a batch checkpoint interval makes calls end earlier.",
        identity=False, traced=True, trajectory=False,
    )
    checkpoint_every_epochs: int = setting(
        1,
        doc="Checkpoint into <run dir>/checkpoints every this many epochs (and always after the last); a run "
        "started in a directory holding one resumes.",
        **_WHERE,
    )
    checkpoint_every_batches: Optional[int] = setting(
        None, doc="Also checkpoint every this many batches inside an epoch (for long epochs); null: off.", **_WHERE
    )
    distribution: Distribution = setting(
        Distribution.auto,
        doc="none, multi_worker (one training across the Slurm tasks of a job, TensorFlow's "
        "MultiWorkerMirroredStrategy) or auto (multi_worker when the job step has several tasks). May change "
        "between the attempts of one run: the same training, to float rounding.",
        **_WHERE,
    )
    collective_timeout_s: int = setting(
        120,
        doc="multi_worker: seconds a worker waits for the others (to join, at any collective) before the job "
        "fails; bounds how long a dead or stuck worker can hold the job.",
        **_WHERE,
    )


@dataclass
class PathsConfig:
    output_root: str = setting(
        "${oc.env:SCRATCH,outputs}/mnist-hpc",
        doc="Root under which each run or sweep gets its own directory: $SCRATCH/mnist-hpc on a cluster, else "
        "./outputs/mnist-hpc.",
        **_WHERE,
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# Every leaf key of the schema and what it decides (a field without its facts fails here, at import).
KEYS: dict[str, KeyFacts] = key_facts(Config)


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (``conf/config.yaml`` lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="mnist_hpc_schema", node=Config)


def conf_dir() -> Path:
    """Directory of the YAML configs: ``conf/`` in a checkout, else the copy in the wheel."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    from importlib.resources import files

    return Path(str(files("mnist_hpc.conf")))


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value {key}={value!r}: {what}")


def validate(cfg: Config) -> Config:
    """Check value ranges that types alone cannot express; raise ConfigError naming the key."""
    d, m, o, t = cfg.data, cfg.model, cfg.optimizer, cfg.train
    _require(bool(d.cache_dir) and "\0" not in d.cache_dir, "data.cache_dir", d.cache_dir, "set a cache directory")
    problem = filename_problem(d.filename)
    _require(problem is None, "data.filename", d.filename, problem or "")
    _require(
        0.0 <= d.validation_split < 1.0,
        "data.validation_split",
        d.validation_split,
        "must be in [0, 1)",
    )
    _require(len(m.hidden_units) >= 1, "model.hidden_units", m.hidden_units, "give at least one layer size, e.g. [512]")
    for i, units in enumerate(m.hidden_units):
        _require(units >= 1, f"model.hidden_units[{i}]", units, "layer sizes must be >= 1")
    _require(
        m.activation in ACTIVATIONS,
        "model.activation",
        m.activation,
        f"choose one of {', '.join(ACTIVATIONS)}",
    )
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _require(
        math.isfinite(o.learning_rate) and o.learning_rate > 0,
        "optimizer.learning_rate",
        o.learning_rate,
        "must be a positive number",
    )
    _require(0.0 <= o.momentum < 1.0, "optimizer.momentum", o.momentum, "must be in [0, 1)")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    for key in ("intra_op_threads", "inter_op_threads"):
        value = getattr(t, key)
        _require(value is None or value >= 1, f"train.{key}", value, "must be >= 1 or null")
    _require(t.steps_per_execution >= 1, "train.steps_per_execution", t.steps_per_execution, "must be >= 1")
    _require(t.checkpoint_every_epochs >= 1, "train.checkpoint_every_epochs", t.checkpoint_every_epochs, "must be >= 1")
    _require(
        t.checkpoint_every_batches is None or t.checkpoint_every_batches >= 1,
        "train.checkpoint_every_batches",
        t.checkpoint_every_batches,
        "must be >= 1 or null",
    )
    _require(t.collective_timeout_s >= 10, "train.collective_timeout_s", t.collective_timeout_s, "must be >= 10 seconds")
    _require(
        not (Distribution(t.distribution) is Distribution.multi_worker and Execution(t.execution) is Execution.keras_fit),
        "train.distribution",
        Distribution(t.distribution).value,
        "multi_worker runs on train.execution=compiled_loop only (Keras 3's model.fit does not support "
        "MultiWorkerMirroredStrategy, keras #20585); drop train=lesson / train.execution=keras_fit",
    )
    return cfg


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Hydra lets a forced ``+key=value`` through; the schema must still refuse it by name."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {name}; valid keys here: {', '.join(sorted(known))}")
        sub_schema = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(sub_schema):
            _reject_unknown_keys(child, sub_schema, prefix=f"{name}.")


def to_typed(cfg: DictConfig) -> Config:
    """Convert a composed Hydra config (with or without its ``hydra`` node) into a checked Config."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    _reject_unknown_keys(plain, Config)
    # Composed against the registered schema, each group node is typed and checked already;
    # merging into a fresh schema (which re-checks every value, ~20 ms) is needed only for
    # configs built otherwise. That adds up when a large sweep is checked before queueing.
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    if all(k in plain and OmegaConf.get_type(plain[k]) is schema for k, schema in sections.items()):
        obj = Config(**{k: OmegaConf.to_object(plain[k]) for k in sections})
    else:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), plain))
    assert isinstance(obj, Config)
    return validate(obj)


def flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A typed config (or part of one) as ``{"train.seed": 0, ...}``: enums by value, lists as lists."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flat_config(item, f"{prefix}{key}."))
        return out
    if isinstance(value, enum.Enum):
        value = value.value
    return {prefix[:-1]: list(value) if isinstance(value, (list, tuple)) else value}


def _keep(flat: dict[str, Any], flag: str) -> dict[str, Any]:
    """The items of a flattened config whose key has ``flag`` set, sorted; a key the schema does not
    describe is kept (it may matter), though :func:`to_typed` lets none through."""
    return {k: v for k, v in sorted(flat.items()) if k not in KEYS or getattr(KEYS[k], flag)}


def identity_config(flat: dict[str, Any]) -> dict[str, Any]:
    """The keys of a flattened config (:func:`flat_config`) that bind its run directory."""
    return _keep(flat, "identity")


def traced_config(flat: dict[str, Any]) -> dict[str, Any]:
    """The keys of a flattened config (:func:`flat_config`) that its compiled programs are traced from."""
    return _keep(flat, "traced")


def trajectory_config(flat: dict[str, Any]) -> dict[str, Any]:
    """The keys of a flattened config (:func:`flat_config`) that fix its training trajectory."""
    return _keep(flat, "trajectory")

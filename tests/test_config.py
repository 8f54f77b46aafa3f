"""The typed schema: defaults are the lesson's, and bad values fail at composition naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from mnist_hpc import rundir
from mnist_hpc.config import ConfigError, OptimizerName, to_typed


def test_defaults_are_the_lesson(compose, monkeypatch):
    monkeypatch.setenv("MNIST_HPC_CACHE", "/shared/cache")
    cfg = to_typed(compose())
    assert cfg.model.hidden_units == [512]
    assert cfg.model.activation == "relu"
    assert cfg.model.dropout == 0.0
    assert cfg.optimizer.name is OptimizerName.rmsprop
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
    assert (cfg.train.epochs, cfg.train.batch_size) == (5, 128)
    assert cfg.data.validation_split == 0.0
    assert cfg.data.cache_dir == "/shared/cache"


def test_cache_dir_falls_back_to_home(compose, monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_HPC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert to_typed(compose()).data.cache_dir == f"{tmp_path}/.cache/mnist-hpc"


def test_output_root_follows_scratch(compose, monkeypatch):
    monkeypatch.setenv("SCRATCH", "/scratch/u1")
    assert to_typed(compose()).paths.output_root == "/scratch/u1/mnist-hpc"
    monkeypatch.delenv("SCRATCH")
    assert to_typed(compose()).paths.output_root == "outputs/mnist-hpc"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-4", "train.batch_size"),
        ("optimizer.learning_rate=-0.1", "optimizer.learning_rate"),
        ("model.dropout=1.5", "model.dropout"),
        ("model.hidden_units=[]", "model.hidden_units"),
        ("model.hidden_units=[512,0]", "model.hidden_units[1]"),
        ("model.activation=relux", "model.activation"),
        ("data.validation_split=1.0", "data.validation_split"),
    ],
)
def test_invalid_values_name_the_key(compose, override, key):
    with pytest.raises(ConfigError) as err:
        to_typed(compose([override]))
    assert f"{key}=" in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epochz=3", "epochz"),
        ("optimizer.name=adagrad", "optimizer.name"),
        ("train.epochs=five", "train.epochs"),
        ("+model.width=3", "width"),
    ],
)
def test_unknown_keys_and_types_rejected(compose, override, needle):
    # Hydra rejects most at composition; a forced `+key` passes Hydra and fails in to_typed.
    with pytest.raises((ConfigCompositionException, ConfigError)) as err:
        to_typed(compose([override]))
    text = str(err.value) + str(err.value.__cause__)
    assert needle in text


def test_cli_rejects_bad_config_before_training(tmp_path: Path):
    """The Hydra app exits non-zero naming the key, and creates no run outputs."""
    for override, key in [("train.epochs=0", "train.epochs"), ("optimizer.name=adagrad", "optimizer.name")]:
        proc = subprocess.run(
            [sys.executable, "-c", "from mnist_hpc.cli import train_main; train_main()",
             override, f"paths.output_root={tmp_path}", f"data.cache_dir={tmp_path}/nocache"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode != 0
        assert key in proc.stderr + proc.stdout
        assert not list(tmp_path.rglob(rundir.METRICS_FILE))


# --- what each key decides: one source (KeyFacts on the schema) --------------------------------------

# Today's three sets, written out rather than derived from mnist_hpc.config.KEYS, so that a key whose
# facts change, or a new key, fails here and is classified on purpose.
BINDS_RUN_DIR = {
    "data.validation_split", "model.hidden_units", "model.activation", "model.dropout", "optimizer.name",
    "optimizer.learning_rate", "optimizer.momentum", "train.batch_size", "train.seed", "train.deterministic",
    "train.execution", "train.jit_compile",
}
TRACED = {
    "data.validation_split", "model.hidden_units", "model.activation", "model.dropout", "optimizer.name",
    "optimizer.momentum", "train.batch_size", "train.deterministic", "train.execution", "train.jit_compile",
    "train.steps_per_execution",
}
FIXES_TRAJECTORY = {
    "data.validation_split", "model.hidden_units", "model.activation", "model.dropout", "optimizer.name",
    "optimizer.learning_rate", "optimizer.momentum", "train.batch_size", "train.seed",
}
NEITHER = {
    "data.cache_dir", "data.filename", "train.epochs", "train.intra_op_threads", "train.inter_op_threads",
    "train.checkpoint_every_epochs", "train.checkpoint_every_batches", "train.distribution",
    "train.collective_timeout_s", "paths.output_root",
}


def test_each_key_says_what_it_decides_and_the_sets_are_todays(compose):
    from mnist_hpc import claim
    from mnist_hpc.config import KEYS, flat_config, identity_config, traced_config, trajectory_config

    flat = flat_config(to_typed(compose()))
    assert set(KEYS) == set(flat) == BINDS_RUN_DIR | TRACED | NEITHER
    assert {k for k, f in KEYS.items() if f.identity} == BINDS_RUN_DIR
    assert {k for k, f in KEYS.items() if f.traced} == TRACED
    assert {k for k, f in KEYS.items() if f.trajectory} == FIXES_TRAJECTORY
    assert all(f.doc.strip() for f in KEYS.values())
    # The functions every path uses apply exactly these facts.
    assert set(identity_config(flat)) == BINDS_RUN_DIR
    assert set(claim.identity_of(to_typed(compose()), "d")) == BINDS_RUN_DIR | {"data.sha256"}
    assert set(traced_config(flat)) == TRACED
    assert set(trajectory_config(flat)) == FIXES_TRAJECTORY


def test_a_field_that_does_not_say_what_it_decides_is_refused():
    from dataclasses import dataclass, field

    from mnist_hpc.config import key_facts, setting

    @dataclass
    class Section:
        known: int = setting(1, doc="d", identity=True, traced=True, trajectory=True)
        fresh: int = 2

    @dataclass
    class Schema:
        part: Section = field(default_factory=Section)

    with pytest.raises(TypeError, match=r"config key part\.fresh does not say what it decides"):
        key_facts(Schema)

    @dataclass
    class Unbound:
        steers: int = setting(1, doc="d", identity=False, traced=False, trajectory=True)

    with pytest.raises(TypeError, match="steers fixes the training trajectory, so it must bind the run directory"):
        key_facts(Unbound)


def test_checkpoint_fingerprints_are_unchanged():
    """Checkpoints written before the keys' facts moved onto the schema must still load: the
    fingerprint of each config is the value the former allow-list gave (pinned)."""
    from mnist_hpc.compute import checkpoint
    from mnist_hpc.config import Config, Execution

    cfg = Config()
    assert checkpoint.fingerprint(cfg, "a" * 64) == "9bb78d38b6103f0b"
    cfg.model.hidden_units, cfg.model.dropout, cfg.model.activation = [256, 128], 0.2, "tanh"
    cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.momentum = OptimizerName.sgd, 0.01, 0.9
    cfg.train.batch_size, cfg.train.seed, cfg.data.validation_split = 64, 3, 0.1
    assert checkpoint.fingerprint(cfg, "b" * 64) == "75f61d64250560b0"
    # Keys that do not fix the trajectory leave it alone; each one that does changes it.
    cfg.train.epochs, cfg.train.execution, cfg.train.jit_compile, cfg.train.deterministic = 9, Execution.keras_fit, False, True
    cfg.train.steps_per_execution, cfg.paths.output_root, cfg.data.cache_dir = 1, "/x", "/y"
    assert checkpoint.fingerprint(cfg, "b" * 64) == "75f61d64250560b0"
    cfg.train.seed = 4
    assert checkpoint.fingerprint(cfg, "b" * 64) != "75f61d64250560b0"


def test_a_checkpoint_written_before_still_loads(tmp_path):
    """tests/data/checkpoint-v1 was written by the code before KeyFacts (commit 757c4cc), for the config below."""
    import shutil

    from mnist_hpc.compute import checkpoint
    from mnist_hpc.config import Config

    shutil.copytree(Path(__file__).parent / "data" / "checkpoint-v1", tmp_path / "checkpoints")
    cfg = Config()
    cfg.model.hidden_units, cfg.train.batch_size, cfg.train.seed, cfg.data.validation_split = [4], 32, 3, 0.1
    cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.momentum = OptimizerName.sgd, 0.01, 0.9
    state = checkpoint.load_latest(tmp_path, checkpoint.fingerprint(cfg, "c" * 64))
    assert state is not None and (state.epoch, state.batch, state.history) == (1, 0, [{"loss": 1.0}])
    cfg.train.seed = 4
    with pytest.raises(checkpoint.CheckpointError, match="different config"):
        checkpoint.load_latest(tmp_path, checkpoint.fingerprint(cfg, "c" * 64))


# --- one default per key: the schema's ---------------------------------------------------------------


def test_config_is_the_composed_default(compose, monkeypatch, tmp_path):
    """``Config()`` (tests and benchmarks use it) is what ``mnist-hpc-train`` composes without overrides:
    the same values and interpolations before resolution, and the same typed config after."""
    from omegaconf import OmegaConf

    from mnist_hpc.config import Config

    for scratch in ("/scratch/u1", None):
        if scratch:
            monkeypatch.setenv("SCRATCH", scratch)
        else:
            monkeypatch.delenv("SCRATCH", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("MNIST_HPC_CACHE", raising=False)
        composed = compose()
        assert OmegaConf.to_container(OmegaConf.structured(Config())) == OmegaConf.to_container(composed)
        typed = to_typed(OmegaConf.structured(Config()))
        assert typed == to_typed(composed)
        assert typed.paths.output_root == f"{scratch or 'outputs'}/mnist-hpc"
        assert typed.data.cache_dir == f"{tmp_path}/.cache/mnist-hpc"


def _schema_defaults() -> dict[str, object]:
    from omegaconf import OmegaConf

    from mnist_hpc.config import Config, flat_config

    return flat_config(OmegaConf.to_container(OmegaConf.structured(Config())))


def _set_keys(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_set_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_conf_does_not_restate_schema_defaults():
    """A group file sets only what differs from the schema, so a default lives in one place and a
    YAML copy cannot drift from it (three did: paths.output_root, paths.compile_cache, data.cache_dir)."""
    import yaml

    from mnist_hpc.config import conf_dir

    defaults = _schema_defaults()
    checked = 0
    for path in sorted(conf_dir().glob("*/*.yaml")):
        text = path.read_text()
        node = yaml.safe_load(text) or {}
        package = "" if "@package _global_" in text else f"{path.parent.name}."
        for key, value in _set_keys({k: v for k, v in node.items() if k not in ("defaults", "hydra")}, package).items():
            assert key in defaults, f"{path} sets {key}, which the schema does not have"
            assert value != defaults[key], f"{path} restates the schema's default {key}={value!r}: delete the line"
            checked += 1
    assert checked >= 4  # optimizer=sgd, train=lesson, experiment=sweep, hparams_search=optuna set values


# --- the configuration reference is generated ---------------------------------------------------------


def test_the_configuration_reference_is_not_stale():
    """docs/configuration.md is scripts/gen_config_docs.py's output for today's schema, conf/ and launcher."""
    import importlib.util

    from mnist_hpc.config import KEYS
    from mnist_hpc.login.launcher.options import SlurmQueueConf

    script = Path(__file__).resolve().parent.parent / "scripts" / "gen_config_docs.py"
    spec = importlib.util.spec_from_file_location("gen_config_docs", script)
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rendered = gen.render()
    # Every key and every launcher option is there, each with its meaning.
    for key, facts in KEYS.items():
        assert f"| `{key}` |" in rendered and " ".join(facts.doc.split()) in rendered, key
    for option in SlurmQueueConf.__dataclass_fields__:
        assert option == "_target_" or f"| `{option}` |" in rendered, option
    assert gen.TARGET.read_text() == rendered, "docs/configuration.md is stale: run python scripts/gen_config_docs.py"

"""Hydra's private behaviours the package relies on, pinned: each function of ``mnist_hpc.hydra_adapter``
has tests named after it (input -> output, and the errors), so that a Hydra release that changes one
fails here by name. And no other module reaches ``hydra._internal``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import DictConfig, OmegaConf

from mnist_hpc import hydra_adapter
from tests.helpers import REPO


def parse(*lines: str) -> list[Any]:
    return OverridesParser.create().parse_overrides(overrides=list(lines))


@dataclass
class _Train:
    seed: int = 0
    rate: float = 0.1
    name: str = "a"
    units: list[int] = field(default_factory=lambda: [4])
    limit: Optional[int] = None


def typed_config() -> DictConfig:
    return OmegaConf.create({"train": OmegaConf.structured(_Train), "free": {"x": 1}})


# --- apply_overrides ----------------------------------------------------------------------------


def test_apply_overrides_converts_each_value_by_its_node_in_order():
    cfg = typed_config()
    hydra_adapter.apply_overrides(cfg, parse("train.seed=3", "train.rate=1", "train.name=7", "train.units=[1,2]",
                                             "train.limit=null", "train.seed=5"))
    assert OmegaConf.to_container(cfg.train) == {"seed": 5, "rate": 1.0, "name": "7", "units": [1, 2], "limit": None}
    assert type(cfg.train.rate) is float and type(cfg.train.name) is str


def test_apply_overrides_adds_force_adds_and_deletes():
    cfg = typed_config()
    hydra_adapter.apply_overrides(cfg, parse("+free.y=2", "~free.x", "++free.z=[1,2]", "++free.y=3"))
    assert OmegaConf.to_container(cfg.free) == {"y": 3, "z": [1, 2]}


@pytest.mark.parametrize(("line", "message"), [
    ("train.seed=abc", "Error merging override train.seed=abc"),
    ("train.limit=1.5", "Error merging override train.limit=1.5"),
    ("train.nokey=1", "Could not override 'train.nokey'.\nTo append to your config use +train.nokey=1"),
    ("+train.seed=1", "Could not append to config. An item is already at 'train.seed'."),
    ("~free.nope", "Could not delete from config. 'free.nope' does not exist."),
    ("~free.x=2", "Could not delete from config. The value of 'free.x' is 1 and not 2."),
    ("free@pkg=1", "Override free@pkg=1 looks like a config group override, but config group 'free' does not exist."),
])
def test_apply_overrides_raises_hydras_composition_errors(line, message):
    cfg = typed_config()
    with pytest.raises(ConfigCompositionException) as caught:
        hydra_adapter.apply_overrides(cfg, parse(line))
    assert str(caught.value).startswith(message)


# --- overrides_dirname --------------------------------------------------------------------------


def test_overrides_dirname_sorts_input_lines_leaves_out_excluded_keys_and_replaces_separators():
    overrides = parse("b=2", "seed=3", "a.x=1", "+c='x=y'")
    assert hydra_adapter.overrides_dirname(overrides, kv_sep="=", item_sep=",", exclude_keys=["seed"]) == "+c='x=y',a.x=1,b=2"
    assert hydra_adapter.overrides_dirname(overrides, kv_sep=":", item_sep="/", exclude_keys=[]) == "+c:'x:y'/a.x:1/b:2/seed:3"
    assert hydra_adapter.overrides_dirname([], kv_sep="=", item_sep=",", exclude_keys=[]) == ""


# --- is_config_group ----------------------------------------------------------------------------


def test_is_config_group_tells_groups_from_keys():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mnist_hpc.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        found = {name: hydra_adapter.is_config_group(loader, name)
                 for name in ("optimizer", "train", "experiment", "hydra/launcher", "hydra/sweeper",
                              "optimizer.learning_rate", "train.seed", "nosuch", "mnist_hpc_schema")}
    assert found == {"optimizer": True, "train": True, "experiment": True, "hydra/launcher": True, "hydra/sweeper": True,
                     "optimizer.learning_rate": False, "train.seed": False, "nosuch": False, "mnist_hpc_schema": False}


# --- sweep_batches ------------------------------------------------------------------------------


def test_sweep_batches_is_the_cartesian_product_in_key_order_last_key_fastest():
    assert hydra_adapter.sweep_batches(parse("a=1,2", "b=x", "c=range(2)"), None) == [[
        ["a=1", "b=x", "c=0"], ["a=1", "b=x", "c=1"], ["a=2", "b=x", "c=0"], ["a=2", "b=x", "c=1"],
    ]]


def test_sweep_batches_splits_by_max_batch_size():
    assert hydra_adapter.sweep_batches(parse("a=1,2,3"), 2) == [[["a=1"], ["a=2"]], [["a=3"]]]
    for size in (0, -1):  # our sweeper refuses these before (Hydra's check is a bare assert)
        with pytest.raises(AssertionError):
            hydra_adapter.sweep_batches(parse("a=1,2,3"), size)


def test_sweep_batches_keeps_a_repeated_keys_last_value_in_its_first_place_and_prefixes():
    assert hydra_adapter.sweep_batches(parse("a=1", "b=2", "a=3,4", "+x=5", "~y"), None) == [[
        ["a=3", "b=2", "+x=5", "~y=null"], ["a=4", "b=2", "+x=5", "~y=null"],
    ]]


def test_sweep_batches_of_no_override_is_one_empty_job():
    assert hydra_adapter.sweep_batches([], None) == [[[]]]


def test_sweep_batches_refuses_a_sweep_the_basic_sweeper_cannot_expand():
    with pytest.raises(HydraException, match="does not support sweep type : INTERVAL_SWEEP"):
        hydra_adapter.sweep_batches(parse("a=interval(0,1)"), None)


# --- the adapter is the only way in -------------------------------------------------------------


def test_no_module_but_the_adapter_reaches_hydras_internals():
    # The private module, and the private names the adapter calls (the loader's ``repository`` among them).
    needle = re.compile(r"\bhydra\._internal\b|_apply_overrides_to_config|get_overrides_dirname|split_arguments|\.repository\b")
    here = Path(__file__).resolve()
    adapter = REPO / "mnist_hpc" / "hydra_adapter.py"
    offenders = [str(p.relative_to(REPO)) for root in ("mnist_hpc", "hydra_plugins", "benchmarks", "tests", "scripts")
                 for p in sorted((REPO / root).rglob("*.py")) if p not in (here, adapter) and needle.search(p.read_text())]
    assert offenders == []
    assert needle.search(adapter.read_text())  # the scan would see one


# --- run_app: Hydra's run_and_report prints a hint after a compact error; with HYDRA_FULL_ERROR it raises ---


def test_run_app_a_known_error_is_its_own_lines_and_exit_1(tmp_path: Path) -> None:
    import subprocess

    from tests.helpers import TRAIN

    refused = subprocess.run([*TRAIN, "-m", "hydra/launcher=local", f"data.cache_dir={tmp_path / 'none'}",
                              f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"nothing was queued: no cached MNIST at {tmp_path / 'none' / 'mnist.npz'}; run "
        f"`mnist-hpc-prefetch data.cache_dir={tmp_path / 'none'}` on a login node first"], refused.stderr
    hydras = subprocess.run([*TRAIN, "train.nokey=1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert hydras.returncode == 1 and hydras.stderr.startswith("Could not override 'train.nokey'.\n")
    assert "Key 'nokey' not in 'TrainConfig'" in hydras.stderr  # the OmegaConf cause, as Hydra prints it
    for proc in (refused, hydras):
        assert "HYDRA_FULL_ERROR" not in proc.stderr and "Traceback" not in proc.stderr


def test_run_app_leaves_hydras_behaviour_to_a_user_who_sets_hydra_full_error(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.helpers import TRAIN

    proc = subprocess.run([*TRAIN, "train.nokey=1"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr


def test_run_app_hydra_raises_a_compact_error_when_hydra_full_error_is_set(monkeypatch) -> None:
    """What run_app relies on: without the variable Hydra prints and exits; with it, it raises."""
    from hydra._internal.utils import run_and_report
    from hydra.errors import ConfigCompositionException

    def fail() -> None:
        raise ConfigCompositionException("refused")

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException, match="^refused$"):
        run_and_report(fail)
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(SystemExit):
        run_and_report(fail)


def test_jobs_are_queued_without_the_hydra_full_error_run_app_set_for_itself(monkeypatch) -> None:
    """Queued jobs inherit the environment: run_app's own HYDRA_FULL_ERROR is not passed on, a user's is."""
    import os

    from mnist_hpc.contract import guard

    seen: list[tuple[Optional[str], Optional[str]]] = []

    def app() -> None:
        with guard.private_submission():  # where the launchers queue jobs
            inside = os.environ.get("HYDRA_FULL_ERROR")
        seen.append((inside, os.environ.get("HYDRA_FULL_ERROR")))

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    hydra_adapter.run_app(app)
    assert seen == [(None, "1")] and "HYDRA_FULL_ERROR" not in os.environ
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the user's own: Hydra's behaviour, and the jobs keep it
    hydra_adapter.run_app(app)
    assert seen[1] == ("1", "1") and hydra_adapter.set_for_hydra() == {}

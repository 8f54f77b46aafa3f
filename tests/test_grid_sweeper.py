"""The grid sweeper (``hydra/sweeper=grid``, ``-m``'s default through conf/default_sweeper.yaml): Hydra's basic
sweeper's jobs, batches and job numbers, without Hydra's composition of each job before a launcher
that checks every job itself; and that whatever else chooses a sweeper wins over that default."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException

GRID = "hydra_plugins.mnist_hpc_launcher.sweeper.GridSweeper"


@contextlib.contextmanager
def multirun(tmp_path: Path, *cli: str) -> Iterator[tuple[Any, Any]]:
    """Hydra's config loader and the master config of ``mnist-hpc-train -m CLI``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins
    from mnist_hpc.config import conf_dir, register_configs

    register_configs()
    register_plugins()
    setup_globals()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        yield loader, loader.load_configuration(
            "config", overrides=[f"paths.output_root={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *cli],
            run_mode=RunMode.MULTIRUN,
        )


class Recorder:
    """A launcher that records each batch it is handed (and checks none: Hydra's pass runs before it)."""

    def __init__(self) -> None:
        self.launches: list[tuple[list[list[str]], int]] = []

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        self.launches.append(([list(job) for job in job_overrides], initial_job_idx))
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=None) for _ in job_overrides]


class CheckingRecorder(Recorder):
    """Like our launchers, it says that it checks every job itself."""

    checks_every_job = True


def swept(tmp_path: Path, cli: Sequence[str], args: Sequence[str], launcher: Recorder) -> tuple[Any, Recorder]:
    """Run the sweeper the config chooses on ``args``, with ``launcher`` in place of the configured one."""
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    with multirun(tmp_path, *cli, *args) as (loader, config):
        sweeper = Plugins.instance().instantiate_sweeper(
            hydra_context=HydraContext(config_loader=loader, callbacks=None), task_function=None, config=config
        )
        sweeper.launcher = launcher
        sweeper.sweep(arguments=list(args))
    return sweeper, launcher


def test_grid_is_the_default_and_whatever_else_chooses_a_sweeper_wins(compose, tmp_path):
    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins

    register_plugins()  # async_optuna's options live in ConfigStore
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: basic\ndata:\n  validation_split: 0.2\n")
    basic = "BasicSweeper"  # Hydra's, in a module of its own internals

    def chosen(*overrides: str) -> tuple[str, Any]:
        sweeper = compose(list(overrides), return_hydra_config=True).hydra.sweeper
        return sweeper._target_.rpartition(".")[2], sweeper.get("max_batch_size", "-")

    assert compose([], return_hydra_config=True).hydra.sweeper._target_ == GRID
    assert chosen() == ("GridSweeper", None)
    assert chosen("experiment=sweep", "hydra/launcher=slurm") == ("GridSweeper", None)
    assert chosen("hydra.sweeper.max_batch_size=7") == ("GridSweeper", 7)
    assert chosen("hparams_search=optuna") == ("AsyncOptunaSweeper", "-")
    # A user's experiment that chooses a sweeper gets it (and its values, after the defaults').
    assert chosen(f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine") == (basic, None)
    assert compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine"]).data.validation_split == 0.2
    # Hydra's own, for whoever asks for it: it works with our launchers, only slower.
    assert chosen("hydra/sweeper=basic") == (basic, None)
    with pytest.raises(ConfigCompositionException, match="hydra.sweeper.max_batch_size=abc"):
        chosen("hydra.sweeper.max_batch_size=abc")


@pytest.mark.parametrize("batch", [None, 4, 5])
def test_grid_gives_the_launcher_what_hydras_basic_sweeper_gives_it(tmp_path, batch):
    """Same jobs, same batches, same job numbers, same multirun.yaml, for the same command line."""
    cli = [f"hydra.sweeper.max_batch_size={'null' if batch is None else batch}"]
    args = ["optimizer=adam,sgd", "train.seed=range(3)", "train.epochs=1,2"]
    got, kinds = {}, {}
    for name in ("grid", "basic"):
        sweeper, launcher = swept(tmp_path / name, [*cli, f"hydra/sweeper={name}"], args, Recorder())
        got[name], kinds[name] = launcher.launches, type(sweeper).__name__
        assert (tmp_path / name / "sweep" / "multirun.yaml").is_file()
    assert kinds == {"grid": "GridSweeper", "basic": "BasicSweeper"}
    assert got["grid"] == got["basic"]
    jobs = [job for batch_jobs, _ in got["grid"] for job in batch_jobs]
    assert len(jobs) == 12 and jobs[0] == ["optimizer=adam", "train.seed=0", "train.epochs=1"]
    assert [first for _, first in got["grid"]] == ([0] if batch is None else list(range(0, 12, batch)))


def test_grid_puts_its_params_before_the_command_line_as_the_basic_sweeper_does(tmp_path):
    from hydra_plugins.mnist_hpc_launcher.sweeper import GridSweeper

    with multirun(tmp_path) as (loader, config):
        from hydra.types import HydraContext

        sweeper = GridSweeper(max_batch_size=None, params={"train.seed": "1,2", "train.epochs": "3"})
        sweeper.config, sweeper.hydra_context = config, HydraContext(config_loader=loader, callbacks=None)
        sweeper.launcher = Recorder()
        sweeper.sweep(["train.epochs=4,5"])
    assert sweeper.launcher.launches == [([["train.seed=1", "train.epochs=4"], ["train.seed=1", "train.epochs=5"],
                                           ["train.seed=2", "train.epochs=4"], ["train.seed=2", "train.epochs=5"]], 0)]


def test_a_launcher_that_checks_every_job_gets_the_batch_without_hydras_composition(tmp_path):
    """A job Hydra cannot compose (no such optimizer) stops the sweep in Hydra's pass, before the
    launcher, unless the launcher checks every job itself (ours raise Hydra's error in launch)."""
    args = ["optimizer=adam,nosuch"]
    _, checking = swept(tmp_path / "ours", [], args, CheckingRecorder())
    assert checking.launches == [([["optimizer=adam"], ["optimizer=nosuch"]], 0)]
    for name in ("grid", "basic"):
        plain = Recorder()
        with pytest.raises(ConfigCompositionException, match="nosuch"):
            swept(tmp_path / name, [f"hydra/sweeper={name}"], args, plain)
        assert plain.launches == []


def test_our_launchers_check_every_job():
    from hydra_plugins.mnist_hpc_launcher.launcher import LocalLauncher, SlurmLauncher
    from mnist_hpc.login.launcher.grid import CHECKS_EVERY_JOB

    assert getattr(SlurmLauncher, CHECKS_EVERY_JOB) is True and getattr(LocalLauncher, CHECKS_EVERY_JOB) is True


def test_a_failed_job_fails_the_sweep(tmp_path):
    class Failing(CheckingRecorder):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
            super().launch(job_overrides, initial_job_idx)
            return [JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("trial 1 broke"))]

    with pytest.raises(RuntimeError, match="trial 1 broke"):
        swept(tmp_path, ["hydra.sweeper.max_batch_size=1"], ["train.seed=1,2"], Failing())


@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_batch_size_that_is_no_number_of_jobs_is_refused_in_one_line(tmp_path, size):
    from mnist_hpc.login.launcher.plan import PreflightError

    launcher = CheckingRecorder()
    with pytest.raises(PreflightError) as caught:
        swept(tmp_path, [f"hydra.sweeper.max_batch_size={size}"], ["train.seed=1,2"], launcher)
    assert str(caught.value) == (f"nothing was queued: hydra.sweeper.max_batch_size={size} is not a number of jobs per "
                                 "batch; give a positive number, or null for one batch")
    assert launcher.launches == [] and not (tmp_path / "sweep").exists()


def test_an_interval_is_refused_in_one_line_that_names_the_search(tmp_path):
    from mnist_hpc.login.launcher.plan import PreflightError

    launcher = CheckingRecorder()
    with pytest.raises(PreflightError) as caught:
        swept(tmp_path, [], ["train.seed=1,2", "optimizer.learning_rate=interval(0.1,0.2)"], launcher)
    assert str(caught.value) == (
        "nothing was queued: BasicSweeper does not support sweep type : INTERVAL_SWEEP; a grid takes a,b,c values, "
        "range(...) and choice(...): search an interval with hparams_search=optuna")
    assert launcher.launches == []

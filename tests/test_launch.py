"""Submission without a cluster: checks before queueing, the local launcher, and no TensorFlow on the login path."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_hpc import rundir
from tests.helpers import TRAIN_CODE, run_login_command, sweep_args, tiny_overrides


@pytest.mark.parametrize(
    "code, args",
    [
        (TRAIN_CODE, ["--help"]),
        ("from mnist_hpc.cli import prefetch_main; prefetch_main()", ["--help"]),
        ("from mnist_hpc.cli import status_main; status_main()", ["--help"]),
    ],
)
def test_help_imports_no_tensorflow(code, args, tmp_path):
    proc, tf = run_login_command(code, args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower() or "powered by hydra" in proc.stdout.lower()
    assert not tf


@pytest.mark.slow
def test_local_submission_returns_at_once_without_tensorflow(synthetic_cache, tmp_path):
    proc, tf = run_login_command(TRAIN_CODE, sweep_args(synthetic_cache, tmp_path, "hydra/launcher=local", "train.seed=1,2",
                                                        "hydra.launcher.trials_per_task=1"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not tf, "the submission path imported TensorFlow"
    out = proc.stdout
    assert "queued 2 job(s) on local" in out and str(tmp_path / "sweep") in out and "_log.out" in out
    jobs = [rundir.read_job(tmp_path / "sweep" / str(i)) for i in (0, 1)]
    assert [j.trial for j in jobs] == [0, 1]
    assert jobs[1].overrides[-1] == "train.seed=2"
    # Non-blocking: the command is back before the jobs have trained.
    assert not (tmp_path / "sweep" / "0" / rundir.METRICS_FILE).exists()
    deadline = time.time() + 300
    while time.time() < deadline and not all((tmp_path / "sweep" / str(i) / rundir.METRICS_FILE).exists() for i in (0, 1)):
        time.sleep(1)
    for i in (0, 1):
        assert rundir.read_metrics(tmp_path / "sweep" / str(i))["epochs_completed"] == 1
    # Hydra's context travels once per launch, in its own file; each job's pickle names it.
    [context_file] = (tmp_path / "sweep" / ".submitit").glob("launch-*.pkl")
    pickles = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_submitted.pkl"))
    assert len(pickles) == 2
    for path in pickles:
        with open(path, "rb") as fh:
            job = pickle.load(fh).function.load()  # behind the JobEntry, the trial's task
        assert job.context.path == context_file and job.context._content is None
        assert path.stat().st_size < context_file.stat().st_size
    status = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", str(tmp_path / "sweep")],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    # The table, then (after a blank line) the summary by state.
    table, summary = status.stdout.split("\n\n")
    assert summary.startswith("2 trial(s): 2 COMPLETED")
    rows = [line.split() for line in table.splitlines()[1:]]
    assert [r[2] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert [r[0] for r in rows] == ["0", "1"]
    assert [r[-2] for r in rows] == ["1/1", "1/1"]


def _nothing_queued(tmp_path: Path) -> bool:
    return not list((tmp_path / "sweep").rglob(rundir.JOB_FILE)) and not (tmp_path / "sweep" / ".submitit").exists()


def test_missing_cache_refuses_submission(tmp_path):
    proc, _ = run_login_command(TRAIN_CODE, sweep_args(tmp_path / "nocache", tmp_path, "hydra/launcher=local"), tmp_path)
    assert proc.returncode != 0
    assert "nothing was queued" in proc.stderr
    assert f"mnist-hpc-prefetch data.cache_dir={tmp_path / 'nocache'}" in proc.stderr
    assert _nothing_queued(tmp_path)


def test_corrupt_cache_refuses_submission(synthetic_cache, tmp_path):
    npz = synthetic_cache / "mnist.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    proc, _ = run_login_command(TRAIN_CODE, sweep_args(synthetic_cache, tmp_path, "hydra/launcher=local"), tmp_path)
    assert proc.returncode != 0 and "nothing was queued" in proc.stderr and "truncated" in proc.stderr
    assert _nothing_queued(tmp_path)


def test_one_bad_job_in_a_sweep_refuses_the_whole_sweep(synthetic_cache, tmp_path):
    proc, _ = run_login_command(
        TRAIN_CODE, sweep_args(synthetic_cache, tmp_path, "hydra/launcher=local", "model.dropout=0.1,1.5"), tmp_path
    )
    assert proc.returncode != 0
    assert "model.dropout=1.5" in proc.stderr and "nothing was queued" in proc.stderr
    assert _nothing_queued(tmp_path)


def test_unwritable_output_root_refuses_submission(synthetic_cache, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    args = ["-m", *tiny_overrides(synthetic_cache, tmp_path), f"hydra.sweep.dir={blocker / 'sweep'}", "hydra/launcher=local"]
    proc, _ = run_login_command(TRAIN_CODE, args, tmp_path)
    assert proc.returncode != 0
    assert "nothing was queued" in proc.stderr and "paths.output_root" in proc.stderr


def test_sweep_composer_matches_hydra_composition(tmp_path):
    """The fast per-job composition equals Hydra's load_sweep_config, group changes included."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins
    from mnist_hpc.config import conf_dir, register_configs
    from mnist_hpc.login.launcher.compose import SweepComposer

    register_configs()
    register_plugins()
    setup_globals()
    common = [f"data.cache_dir={tmp_path}", "hydra/launcher=local"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "config", overrides=common + ["train.seed=1,2", "optimizer=adam,sgd"], run_mode=RunMode.MULTIRUN
        )
        composer = SweepComposer(loader, master)
        jobs = [
            ["data.cache_dir=" + str(tmp_path), "train.seed=1", "optimizer=adam"],
            ["data.cache_dir=" + str(tmp_path), "train.seed=2", "optimizer=sgd", "model.hidden_units=[8,8]"],
            ["data.cache_dir=" + str(tmp_path), "train.seed=2", "optimizer=adam", "+hydra.launcher.additional_parameters.hold=true"],
        ]
        for overrides in jobs:
            fast = composer.compose(list(overrides))
            slow = loader.load_sweep_config(master, list(overrides))
            assert OmegaConf.to_container(fast) == OmegaConf.to_container(slow)
            assert OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(slow)
            assert OmegaConf.is_struct(fast) and OmegaConf.get_type(fast) is OmegaConf.get_type(slow)
            assert OmegaConf.get_type(fast, "train") is OmegaConf.get_type(slow, "train")
            with pytest.raises(ValidationError):  # the schema's types still guard the copy
                fast.train.seed = "not a number"
        # Each job gets its own copy: changing one leaves the next composition untouched.
        first = composer.compose(list(jobs[0]))
        first.train.seed = 99
        assert composer.compose(list(jobs[0])).train.seed == 1
        assert len(composer._bases) == 3  # adam, sgd, adam+hydra override: composed once each


class _FakeTrial:
    """Stands in for a TrainJob inside PackedTrainJob: records its call, then returns or raises."""

    def __init__(self, run_dir, calls, error=None):
        self.run_dir, self.calls, self.error = run_dir, calls, error

    def finished(self):
        return False

    def ensure_recorded(self):
        self.calls.append(f"record {self.run_dir.name}")

    def __call__(self):
        self.calls.append(self.run_dir.name)
        if self.error is not None:
            raise self.error
        return self.run_dir.name


@pytest.mark.parametrize("error, runs_third", [(ValueError("bad trial"), True), ("limit", False), ("not requeued", False)])
def test_packed_task_isolates_failures_but_stops_when_time_is_up(tmp_path, error, runs_third):
    from mnist_hpc.compute.failures import NotRequeued, PackedTrialsFailed, RequeueLimitReached
    from mnist_hpc.compute.job import PackedTrainJob

    if error == "limit":
        error = RequeueLimitReached("no requeue left")
    elif error == "not requeued":  # a container without scontrol, and no batch script to ask
        error = NotRequeued("Slurm job 1 was not requeued")
    calls: list[str] = []
    trials = [_FakeTrial(tmp_path / str(i), calls, error if i == 1 else None) for i in range(3)]
    expected = PackedTrialsFailed if runs_third else type(error)
    with pytest.raises(expected):
        PackedTrainJob(trials)()
    # Every trial records itself before the first runs (a submission that died before job.json).
    assert calls[:3] == ["record 0", "record 1", "record 2"]
    assert calls[3:] == (["0", "1", "2"] if runs_third else ["0", "1"])


@pytest.mark.slow
def test_local_launcher_with_wait_blocks_until_trials_end_and_fails_with_a_failed_trial(synthetic_cache, tmp_path):
    """``hydra.launcher.wait=true`` (what sweepers that read results need), through the local executor."""
    sweep = tmp_path / "sweep"
    proc, _ = run_login_command(
        TRAIN_CODE, sweep_args(synthetic_cache, tmp_path, "hydra/launcher=local", "hydra.launcher.wait=true", "train.seed=1,2"),
        tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Blocking: both trials had finished when the command returned.
    assert [rundir.read_metrics(sweep / str(i))["epochs_completed"] for i in (0, 1)] == [1, 1]

    # A trial that fails at run time makes the waiting command fail, naming the trial and its error.
    failing = tmp_path / "failing"
    args = ["-m", *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={failing}", "hydra/launcher=local",
            "hydra.launcher.wait=true", "data.validation_split=0.1,1e-9"]
    proc, _ = run_login_command(TRAIN_CODE, args, tmp_path, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "1 of 2 trial(s) did not finish" in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.strip().startswith("trial ")]
    assert line.strip().startswith("trial 1 [data.validation_split=1e-09]: FAILED: ") and "validation_split=1e-09" in line
    assert (failing / "0" / rundir.METRICS_FILE).is_file() and (failing / "1" / rundir.FAILURE_FILE).is_file()

"""Hostile tester's reproductions (issue 21): the asynchronous search's binding (I2) and its files' sharing.

Each failed, before its fix, at the assertion that states
the invariant; a failure to set the case up raises :class:`Precondition` and is a real error.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from mnist_hpc import rundir
from mnist_hpc import search as sd
from tests.helpers import TRAIN_CODE, precondition, run_login_command, search_args, wait_for_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.slow
def test_continuing_a_group_search_with_another_value_inside_the_group_is_refused(synthetic_cache, tmp_path):
    search_dir = tmp_path / "search"
    first, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1",
                                                    "hydra.sweeper.workers=1", "optimizer=sgd,adam"), tmp_path)
    precondition(first.returncode == 0, first.stderr[-2000:])
    wait_for_study(search_dir, 1)
    again, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=2",
                                                    "hydra.sweeper.workers=1", "optimizer=sgd,adam",
                                                    "optimizer.momentum=0.5"), tmp_path)
    if again.returncode == 0:
        wait_for_study(search_dir, 2)  # nothing left running after the test
    assert again.returncode != 0 and "holds a different search" in again.stderr and "optimizer.momentum" in again.stderr, (
        again.stdout[-2000:])


@pytest.mark.slow
def test_a_search_shares_its_trials_as_a_sweep_does_under_the_users_umask(synthetic_cache, tmp_path):
    search_dir = tmp_path / "search"
    out, err = tmp_path / "submit.out", tmp_path / "submit.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run([sys.executable, "-c", TRAIN_CODE, *search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1",
                                                    "hydra.sweeper.workers=1")],
                              stdout=fo, stderr=fe, umask=0o002, timeout=300)
    precondition(proc.returncode == 0, err.read_text()[-2000:])
    wait_for_study(search_dir, 1)
    # Wait for the worker's last beat ("done"): it rewrites its file then.
    deadline = time.monotonic() + 120
    while not any(b.state == "done" for b, _ in sd.read_beats(search_dir)[0]):
        precondition(time.monotonic() < deadline, "the worker did not end")
        time.sleep(0.5)
    modes = {p.relative_to(search_dir).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [search_dir / "0", search_dir / "0" / rundir.METRICS_FILE, *(search_dir / "workers").glob("*.json")]}
    readable = {name: mode & 0o040 != 0 for name, mode in modes.items()}
    assert all(readable.values()), {name: f"{mode:04o}" for name, mode in modes.items()}


@pytest.mark.slurm
def test_a_search_trial_whose_config_resolves_otherwise_on_the_node_is_not_told(synthetic_cache, tmp_path):
    from tests.helpers import slurm_launcher_args, submit, wait_for_states

    search_dir = tmp_path / "search"
    env = {k: v for k, v in os.environ.items() if k != "HOSTILE_SEED"}
    args = slurm_launcher_args(search_dir, *search_args(synthetic_cache, tmp_path)[4:], "hparams_search=optuna",
                               "hydra.sweeper.workers=1", "hydra.sweeper.n_trials=1",
                               'hydra.launcher.setup=["export HOSTILE_SEED=5"]', "train.seed=${oc.env:HOSTILE_SEED,0}")
    proc = submit(args, tmp_path, env=env)
    precondition(proc.returncode == 0, proc.stderr[-2000:])
    line = next(line for line in proc.stdout.splitlines() if line.startswith("queued"))
    jobs = line.rsplit("(", 1)[1].rstrip(")").split()
    wait_for_states(jobs, timeout_s=600)
    spec = sd.read_spec(search_dir)
    precondition(spec is not None and spec.identity.get("train.seed") == 0, f"the study's identity: {spec}")
    study = optuna.load_study(study_name=spec.study_name, storage=sd.open_storage(search_dir))
    for trial in study.get_trials():
        if trial.state == TrialState.COMPLETE:
            identity = rundir.read_identity(search_dir / str(trial.number))["config"]
            assert identity["train.seed"] == spec.identity["train.seed"], (
                f"trial {trial.number} trained with train.seed={identity['train.seed']} and was told to a study of "
                f"train.seed={spec.identity['train.seed']}")

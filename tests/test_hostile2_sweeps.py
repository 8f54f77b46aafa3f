"""Hostile tester's second pass (issue 21): other cases of I1, I2, I4 and I5 on sweeps.

Each test is a reproduction; the two still open are xfail(strict); a failure to set a case up is an
error of the test (``Precondition``), never the expected failure. Local launcher or Hydra's own
in-process launcher, tiny synthetic data; nothing here needs Slurm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mnist_hpc import rundir
from mnist_hpc.login import trials as trials_mod
from tests.helpers import (
    REPORT,
    TRAIN,
    fill_cache,
    hydra_trial_dir,
    precondition,
    run_to_files,
    synthetic_mnist,
    tiny_overrides,
    until,
)

LOCAL = ["-m", "hydra/launcher=local", "hydra.launcher.wait=true", "train.deterministic=true"]


# --- I2 for a plain sweep: the data a trial was trained on --------------------------------------


@pytest.mark.slow  # trains trials through the local launcher
def test_trials_trained_on_other_data_are_never_ranked_as_the_same_config(tmp_path: Path) -> None:
    """``data.cache_dir`` comes from ``${oc.env:MNIST_HPC_CACHE}``: not an override, so not shown."""
    caches = {"a": tmp_path / "cache-a", "b": tmp_path / "cache-b"}
    fill_cache(caches["a"], synthetic_mnist(n_train=600, seed=0))
    fill_cache(caches["b"], synthetic_mnist(n_train=300, seed=1))
    sweep_dir = tmp_path / "sweep"
    common = [*tiny_overrides(caches["a"], tmp_path / "out")[1:], f"hydra.sweep.dir={sweep_dir}", "train.seed=0"]
    launches = {}
    for name, cache in caches.items():
        os.environ["MNIST_HPC_CACHE"] = str(cache)
        try:
            launches[name] = run_to_files([*TRAIN, *LOCAL, *common, f"hydra.sweep.subdir={name}" + "${hydra.job.num}"], tmp_path)
        finally:
            del os.environ["MNIST_HPC_CACHE"]
    precondition(launches["a"].returncode == 0, launches["a"].stderr[-2000:])
    shas = {name: json.loads((sweep_dir / f"{name}0" / "identity.json").read_text())["config"]["data.sha256"]
            for name in caches if (sweep_dir / f"{name}0" / "identity.json").is_file()}
    if launches["b"].returncode != 0:  # refused: it must be before queueing, naming the data
        assert "nothing was queued" in launches["b"].stderr and "data" in launches["b"].stderr, launches["b"].stderr[-2000:]
        return
    precondition(len(set(shas.values())) == 2, f"both trials should have trained, on different data: {shas}")
    report = run_to_files([*REPORT, str(sweep_dir)], tmp_path)
    precondition(report.returncode == 0, report.stderr[-2000:])
    text = (sweep_dir / "report" / "report.md").read_text()
    # Accepted: the report must tell the two trials' data apart (by hash or by cache), not show one config.
    told = all(sha[:12] in text for sha in shas.values()) or all(str(c) in text for c in caches.values())
    assert told, f"the report shows trials trained on {shas} as the same config:\n{text[:1500]}"


# --- I4: what status shows is true ------------------------------------------------------------


@pytest.mark.parametrize("link", ["itself", "another sweep"])
def test_a_symbolic_link_in_a_sweep_never_adds_trials(tmp_path: Path, link: str) -> None:
    sweep_dir = tmp_path / "sweep"
    for num in (0, 1):
        hydra_trial_dir(sweep_dir / str(num), [f"train.seed={num}"])
    if link == "itself":
        (sweep_dir / "latest").symlink_to(".")
    else:
        hydra_trial_dir(tmp_path / "other" / "0", ["train.seed=7"])
        (sweep_dir / "other").symlink_to(tmp_path / "other")
    found = trials_mod.trial_dirs(sweep_dir)
    assert sorted(os.path.realpath(p) for p in found) == [str(sweep_dir / "0"), str(sweep_dir / "1")], found[:6]


# --- I5: every number shown can be true (the trial's number) ------------------------------------


@pytest.mark.parametrize("name", ["٣0", "²0"])
def test_a_trial_directory_named_with_other_digits_is_not_given_their_number(tmp_path: Path, name: str) -> None:
    sweep_dir = tmp_path / "sweep"
    hydra_trial_dir(sweep_dir / name, ["train.seed=0"])
    [found] = trials_mod.trial_dirs(sweep_dir)
    precondition(found.name == name, f"found {found}")
    trial = trials_mod.read_trial(found)
    assert trial.number in (None, 0), f"{name!r} is shown as trial {trial.number}"
    report = run_to_files([*REPORT, str(sweep_dir)], tmp_path)
    assert "Traceback" not in report.stderr, report.stderr[-2000:]


# --- I1 on the in-process path (Hydra's own launcher: `-m` without hydra/launcher) ------------------


def test_an_in_process_multirun_never_writes_outside_its_sweep(synthetic_cache: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "area" / "sweep"
    launch = run_to_files([*TRAIN, "-m", *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={sweep_dir}",
                  "hydra.sweep.subdir=../escaped_${hydra.job.num}", "train.seed=0"], tmp_path)
    outside = sorted(p.name for p in (tmp_path / "area").iterdir() if p.name != "sweep")
    assert outside == [], f"exit {launch.returncode}; written beside the sweep: {outside}"
    assert launch.returncode != 0 and "Traceback" not in launch.stderr, launch.stderr[-2000:]


# --- I1/I3: a search directory holds only the study's trials --------------------------------------


@pytest.mark.slow  # trains trials through the local launcher
def test_a_search_is_refused_into_a_directory_that_holds_another_launchs_trials(synthetic_cache: Path,
                                                                                tmp_path: Path) -> None:
    from mnist_hpc import search as sd

    search_dir = tmp_path / "search"
    common = [*tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={search_dir}",
              "train.deterministic=true"]
    plain = run_to_files([*TRAIN, *LOCAL, *common, "hydra.sweep.subdir=run_${hydra.job.num}", "data.validation_split=0.1"],
                tmp_path)
    precondition(plain.returncode == 0 and (search_dir / "run_0" / "metrics.json").is_file(), plain.stderr[-2000:])
    search = run_to_files([*TRAIN, "-m", "hparams_search=optuna", "hydra/launcher=local", "hydra.sweeper.n_trials=1",
                  "hydra.sweeper.workers=1", *common], tmp_path)
    if search.returncode == 0:  # accepted: let its worker end before the test does


        beats = lambda: [b for b, _ in sd.read_beats(search_dir)[0]]  # noqa: E731
        until(lambda: beats() and all(b.state in ("done", "stopped") for b in beats()), "the search worker to end")
    assert search.returncode != 0 and "nothing was queued" in search.stderr and "run_0" in search.stderr, \
        f"exit {search.returncode}: {search.stdout[-1500:]} {search.stderr[-1500:]}"


def test_an_in_process_run_is_refused_around_earlier_trials(synthetic_cache: Path, tmp_path: Path) -> None:
    """Seen with a real sweep of two COMPLETED trials: afterwards `mnist-hpc-status SWEEP` says it 'holds no
    submitted run (job.json missing)' and the report shows one run."""
    sweep_dir = tmp_path / "sweep"
    for num in (0, 1):
        hydra_trial_dir(sweep_dir / str(num), [f"train.seed={num}"])
        (sweep_dir / str(num) / "identity.json").write_text("{}")
    precondition(rundir.is_run_dir(sweep_dir / "0") and not rundir.is_run_dir(sweep_dir), "the sweep is not set up")
    proc = run_to_files([*TRAIN, *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.run.dir={sweep_dir}"], tmp_path)
    written = sorted(p.name for p in sweep_dir.iterdir() if p.name not in ("0", "1"))
    assert written == [] and proc.returncode != 0, f"exit {proc.returncode}; written into the sweep's root: {written}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_sweep_into_an_earlier_runs_directory_is_refused(synthetic_cache: Path, tmp_path: Path) -> None:
    """Seen with a finished in-process run R: `-m hydra/launcher=local hydra.sweep.dir=R` queued trial 0 into R/0,
    exit 0, and `mnist-hpc-status R` (the command the launch prints) then says R 'holds no submitted run'."""
    run_dir = tmp_path / "run"
    hydra_trial_dir(run_dir, ["train.seed=0"])
    (run_dir / "identity.json").write_text("{}")
    precondition(rundir.is_run_dir(run_dir), "the run is not set up")
    proc = run_to_files([*TRAIN, *LOCAL, *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={run_dir}",
                "train.seed=5"], tmp_path)
    assert proc.returncode != 0 and "nothing was queued" in proc.stderr, \
        f"exit {proc.returncode}; {sorted(p.name for p in run_dir.iterdir())}"
    assert not (run_dir / "0").exists()


def test_an_in_process_run_is_refused_inside_an_earlier_trial(synthetic_cache: Path, tmp_path: Path) -> None:
    """Seen with a real sweep: `hydra.run.dir=SWEEP/0/nested` trained (exit 0); extending trial 0 afterwards
    (train.epochs=3, same overrides) was refused: 'trial 0 would write SWEEP/0, which holds the run directory
    SWEEP/0/nested of an earlier launch'."""
    trial = hydra_trial_dir(tmp_path / "sweep" / "0", ["train.seed=0"])
    (trial / "identity.json").write_text("{}")
    proc = run_to_files([*TRAIN, *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.run.dir={trial / 'nested'}"], tmp_path)
    assert proc.returncode != 0 and not (trial / "nested").exists(), f"exit {proc.returncode}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]

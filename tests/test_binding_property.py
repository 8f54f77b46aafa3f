"""Property: any sequence of sweeps into one directory is refused before anything changes, or every
number that status and report show comes from its own trial's config.

Hypothesis draws sequences of launches into one sweep directory: swept values and their order,
``hydra.sweep.subdir`` patterns (colliding, nested, escaping, reserved, distinct), epochs, and
resubmissions. Each launch goes through the launcher's own planning and checks (``plan_jobs`` and
``preflight``, the code both launchers run) and, when accepted, through what a job does on the
node: the lease, ``claim.bind``, and the run directory's writers. Only the training itself is
replaced, by a deterministic stand-in whose numbers are a function of the config's identity (a
real trained number is such a function too: the tests of deterministic training show it). Then
status's and the report's readers (``read_trials``, ``best_trial``) must show, for every trial,
numbers that are the stand-in's for the config its own overrides name.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_hpc import claim, rundir
from mnist_hpc.config import flat_config
from tests.helpers import fill_cache

SUBDIRS = [
    "${hydra.job.num}",
    "s${train.seed}",
    "lr${optimizer.learning_rate}",
    "s${train.seed}_lr${optimizer.learning_rate}",
    "same",
    "nest/${hydra.job.num}",
    "nest",
    "../out_${hydra.job.num}",
    "report",
    "${hydra.job.override_dirname}",
]

launch_st = st.fixed_dictionaries({
    "seeds": st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3, unique=True),
    "lrs": st.lists(st.sampled_from(["0.001", "0.0003"]), min_size=1, max_size=2, unique=True),
    "subdir": st.sampled_from(SUBDIRS),
    "epochs": st.sampled_from([1, 2, 3]),
    "seed_first": st.booleans(),
})


def standin_metrics(identity: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The numbers a run of this identity reports after ``epochs`` epochs: a function of both only."""
    def value(*parts: object) -> float:
        digest = hashlib.sha256(repr((sorted(identity.items()), *parts)).encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32

    history = [{"epoch": e, "loss": value("loss", e) + 0.01, "accuracy": value("acc", e),
                "val_loss": value("vloss", e) + 0.01, "val_accuracy": value("vacc", e), "seconds": 0.1}
               for e in range(1, epochs + 1)]
    vals = [r["val_accuracy"] for r in history]
    return {"test_accuracy": value("test", epochs), "test_loss": value("tloss", epochs) + 0.01,
            "val_accuracy": vals[-1], "best_val_accuracy": max(vals), "epochs_completed": epochs,
            "history": history, "fingerprint": claim.fingerprint(identity)}


def run_on_node(job: Any, data_sha256: str) -> None:
    """What a queued trial does in its directory, the training replaced by the stand-in."""
    identity = claim.identity_from_flat(job.flat, data_sha256)
    me = claim.Holder.this_process()
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with claim.lease(job.run_dir, me, ""):
        verdict = claim.bind(job.run_dir, identity, job.typed.train.epochs, "")
        if verdict.action == "done":
            return
        rundir.write_progress(job.run_dir, job.typed.train.epochs, job.typed.train.epochs, [])
        rundir.write_metrics(job.run_dir, standin_metrics(identity, job.typed.train.epochs))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))} if root.exists() else {}


@contextmanager
def composing_in(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    from tests.helpers import composing

    with composing(tmp_path, "experiment=sweep") as pair:
        yield pair


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(launches=st.lists(launch_st, min_size=1, max_size=4))
@pytest.mark.slow
def test_every_reported_number_comes_from_its_own_trials_config(tmp_path_factory, launches):
    from hydra.core.singleton import Singleton

    from mnist_hpc.login.launcher.compose import SweepComposer, plan_jobs
    from mnist_hpc.login.launcher.plan import PreflightError
    from mnist_hpc.login.launcher.preflight import preflight
    from mnist_hpc.login.report.ranking import best_trial
    from mnist_hpc.login.trials import read_trials, trial_dirs

    tmp_path = tmp_path_factory.mktemp("binding")
    cache = fill_cache(tmp_path / "cache")
    from mnist_hpc.cache import read_manifest

    data_sha256 = read_manifest(cache)[0]["sha256"]
    root = tmp_path / "root"
    sweep = root / "sweep"
    expected: dict[tuple[str, ...], dict[str, Any]] = {}  # a trial's overrides -> its stand-in metrics
    state = Singleton.get_state()
    try:
        with composing_in(tmp_path) as (loader, master):
            for launch in launches:
                seeds = ",".join(map(str, launch["seeds"]))
                lrs = ",".join(launch["lrs"])
                swept = [f"train.seed={seeds}", f"optimizer.learning_rate={lrs}"]
                if not launch["seed_first"]:
                    swept.reverse()
                from hydra.core.override_parser.overrides_parser import OverridesParser

                from mnist_hpc.hydra_adapter import sweep_batches

                fixed = [f"train.epochs={launch['epochs']}", f"data.cache_dir={cache.parent}",
                         f"hydra.sweep.subdir={launch['subdir']}"]
                parsed = OverridesParser.create().parse_overrides(fixed + swept)
                [jobs] = sweep_batches(parsed, None)
                composer = SweepComposer(loader, master)
                before = snapshot(root)
                try:
                    planned = plan_jobs(composer, sweep, jobs, 0)
                    preflight(sweep, planned)
                except PreflightError:
                    assert snapshot(root) == before, "a refused launch changed something"
                    continue
                # Accepted: every directory is its own, inside the sweep, and the jobs run.
                assert len({j.run_dir for j in planned}) == len(planned)
                assert all(sweep in j.run_dir.parents for j in planned)
                todo = [j for j in planned if j.verdict.action != "done"]
                rundir.write_jobs([rundir.JobRecord.of("slurm", f"{1000 + j.num}", None, j.run_dir, j.overrides, j.num,
                                                       fingerprint=j.fingerprint) for j in todo])
                for job in todo:
                    run_on_node(job, data_sha256)
                    identity = claim.identity_from_flat(flat_config(job.typed), data_sha256)
                    expected[tuple(job.overrides)] = standin_metrics(identity, job.typed.train.epochs)
    finally:
        Singleton.set_state(state)

    if not sweep.exists():
        return
    run_dirs = trial_dirs(sweep) + [p.parent for p in sweep.rglob(rundir.JOB_FILE) if not p.parent.name.isdigit()]
    trials, _ = read_trials(sorted(set(run_dirs)))
    for t in trials:
        if t.files.metrics is None:
            continue
        want = expected[tuple(t.overrides)]
        assert t.test_accuracy == want["test_accuracy"], (t.run_dir, t.overrides)
        assert t.best_val_accuracy == want["best_val_accuracy"]
        assert t.history == want["history"]
    best = best_trial([t for t in trials if t.finished]).trial
    if best is not None:
        assert best.best_val_accuracy == expected[tuple(best.overrides)]["best_val_accuracy"]

"""The asynchronous Optuna search on the real local Slurm cluster with the real journal file:
two workers, a trial that raises, a worker killed with SIGKILL mid-trial, and a continued study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mnist_hpc import rundir
from mnist_hpc import search as sd
from tests.helpers import (
    finished_metrics,
    resumed_from,
    run_json,
    run_log,
    fill_cache,
    report_csv,
    slurm_launcher_args,
    submit,
    synthetic_mnist,
    tiny_overrides,
    until,
    wait_for_states,
)

pytestmark = pytest.mark.slurm
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def larger_cache(tmp_path: Path) -> Path:
    """Synthetic data big enough that an epoch takes a moment (trials overlap, a kill lands mid-trial)."""
    fill_cache(tmp_path / "cache", synthetic_mnist(n_train=3000, n_test=300))
    return tmp_path / "cache"


def search_args(search_dir: Path, cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return slurm_launcher_args(
        search_dir, *tiny_overrides(cache, tmp_path / "out"), "hparams_search=optuna", "hydra.sweeper.workers=2",
        "optimizer.learning_rate=tag(log,interval(1e-4,1e-2))", "model.hidden_units=choice('[16]','[32]')",
        "hydra.sweeper.heartbeat_s=1", "hydra.sweeper.stale_after_s=8", *extra,
    )


def load(search_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="mnist-hpc", storage=sd.open_storage(search_dir)).get_trials()


def worker_ids(search_dir: Path, out: str) -> list[str]:
    """The worker job ids the submission printed (``queued 2 search worker(s) on slurm: A (A_0 A_1)``)."""
    line = next(line for line in out.splitlines() if line.startswith("queued"))
    return line.rsplit("(", 1)[1].rstrip(")").split()


def finish(search_dir: Path, jobs: list[str], counted: int) -> tuple[list[optuna.trial.FrozenTrial], dict[str, str]]:
    """Wait for the study to hold ``counted`` trials and for every worker job to end."""
    try:
        states = wait_for_states(jobs, timeout_s=1200)
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)  # ours only; a no-op once ended
    trials = load(search_dir)
    assert sum(sd.counts_toward_budget(t) for t in trials) == counted, [(t.number, t.state) for t in trials]
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials, states


def status(search_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", "--json", str(search_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


def test_two_workers_run_eight_trials_one_fails_and_the_study_continues(larger_cache, tmp_path):
    search_dir = tmp_path / "search"
    proc = submit(search_args(
        search_dir, larger_cache, tmp_path, "train.epochs=2", "hydra.sweeper.n_trials=8",
        "hydra.sweeper.pruner.n_startup_trials=3",
        # One trial raises at run time: its validation split leaves no validation sample.
        "data.validation_split=interval(0.1,0.2)", "hydra.sweeper.enqueue=[{data.validation_split:1e-9}]",
    ), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = worker_ids(search_dir, proc.stdout)
    assert len(jobs) == 2 and len({j.partition("_")[0] for j in jobs}) == 1  # one array of 2 workers
    # The command returned before any trial finished: nothing waited for the search.
    assert not any(t.state.is_finished() for t in load(search_dir))

    trials, states = finish(search_dir, jobs, 8)
    assert [states[j] for j in jobs] == ["COMPLETED", "COMPLETED"]
    assert [t.number for t in trials] == list(range(8))  # no number twice, no gap
    assert {t.user_attrs[sd.WORKER_ATTR] for t in trials} == set(jobs)  # both workers ran trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.params["data.validation_split"] for t in failed] == [1e-9]
    assert "DatasetError" in failed[0].user_attrs[sd.ERROR_ATTR]
    assert "DatasetError" in rundir.read_failure(search_dir / str(failed[0].number))
    for t in trials:
        run = search_dir / str(t.number)
        assert rundir.read_job(run).job_id == t.user_attrs[sd.WORKER_ATTR]
        overrides = (run / rundir.HYDRA_OVERRIDES).read_text()
        assert f"optimizer.learning_rate={t.params['optimizer.learning_rate']}" in overrides
        if t.state == TrialState.COMPLETE:
            metrics = finished_metrics(run)
            assert metrics["val_accuracy"] == pytest.approx(t.value) and (run / rundir.MODEL_FILE).is_file()
            assert run_json(run, rundir.PROVENANCE_FILE)["slurm_job_id"]

    view = status(search_dir)
    by_state = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    assert (view["counts"]["COMPLETED"], view["counts"]["PRUNED"], view["counts"]["FAILED"]) == tuple(by_state.values())
    assert view["counted"] == 8 and sorted(w["job_id"] for w in view["workers"]) == sorted(jobs)
    assert {w["state"] for w in view["workers"]} == {"done"} and {w["slurm_state"] for w in view["workers"]} == {"COMPLETED"}
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert view["best"]["trial"] == best.number and view["best"]["value"] == pytest.approx(best.value)

    report, rows = report_csv(search_dir)
    out = report.stdout
    expected = {TrialState.COMPLETE: "COMPLETED", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAILED"}
    assert [(int(r["trial"]), r["state"]) for r in rows] == [(t.number, expected[t.state]) for t in trials]
    assert f"best so far: trial {best.number}, validation accuracy {best.value:.4f}" in out
    assert f"| {failed[0].number} | FAILED |" in out and "DatasetError" in out
    for png in ("optimization_history.png", "param_importances.png"):
        assert (search_dir / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Continue: the same search with n_trials=10 runs exactly two more trials.
    before = {t.number: (t.state, t.values, t.datetime_complete) for t in trials}
    again = submit(search_args(
        search_dir, larger_cache, tmp_path, "train.epochs=2", "hydra.sweeper.n_trials=10",
        "hydra.sweeper.pruner.n_startup_trials=3",
        "data.validation_split=interval(0.1,0.2)", "hydra.sweeper.enqueue=[{data.validation_split:1e-9}]",
    ), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the study (8 trials done)" in again.stdout
    more = worker_ids(search_dir, again.stdout)
    trials, _ = finish(search_dir, more, 10)
    assert [t.number for t in trials] == list(range(10))
    assert {t.number: (t.state, t.values, t.datetime_complete) for t in trials[:8]} == before  # never rerun
    assert {t.user_attrs[sd.WORKER_ATTR] for t in trials[8:]} <= set(more)


def test_a_worker_killed_mid_trial_leaves_no_trial_behind(larger_cache, tmp_path):
    search_dir = tmp_path / "search"
    proc = submit(search_args(search_dir, larger_cache, tmp_path, "train.epochs=8", "hydra.sweeper.n_trials=8",
                              "hydra.sweeper.pruner=null"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = worker_ids(search_dir, proc.stdout)

    def mid_trial():
        """A worker whose trial has checkpointed at least one epoch and has not finished."""
        for beat, _ in sd.read_beats(search_dir)[0]:
            if beat.state != "running" or beat.trial is None:
                continue
            if 1 <= epochs_done(search_dir / str(beat.trial)) <= 6:
                return beat
        return None

    try:
        victim = until(mid_trial, "a worker in the middle of a trial", 900, every_s=0.1)
        os.kill(victim.pid, signal.SIGKILL)
    except BaseException:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
        raise
    trials, states = finish(search_dir, jobs, 8)
    assert states[victim.job_id] != "COMPLETED"
    [killed] = [t for t in trials if t.number == victim.trial]
    # Interrupted by the other worker: when it next asked, squeue said the job had ended (or, had
    # squeue still listed it, once its heartbeat was older than stale_after_s).
    reason = killed.user_attrs[sd.INTERRUPTED_ATTR]
    assert killed.state == TrialState.FAIL and (reason == f"its worker {victim.job_id}'s Slurm job has ended"
                                                or "silent for" in reason), reason
    [retry] = [t for t in trials if t.user_attrs.get(sd.RETRY_OF_ATTR) == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    # The retry started from the killed trial's checkpoint, not from scratch.
    assert retry.user_attrs[sd.RESUMED_FROM_ATTR] == killed.number
    assert resumed_from(run_log(search_dir / str(retry.number)))
    assert len(trials) == 9 and [t.number for t in trials] == list(range(9))

    view = status(search_dir)
    assert view["counted"] == 8 and view["counts"]["INTERRUPTED"] == 1 and view["counts"]["RUNNING"] == 0
    [dead] = [w for w in view["workers"] if w["job_id"] == victim.job_id]
    # Killed without a word: its file still says running; Slurm says the job ended, and so does status.
    assert dead["slurm_state"] == states[victim.job_id] and dead["beat_state"] == "running"
    assert dead["state"] == "ended" and dead["alive"] is False and dead["trial"] == killed.number
    # The retry resumed from the killed trial's checkpoint: its directory holds all 8 epochs,
    # though it reported only those it trained itself.
    [retry_row] = [t for t in view["trials"] if t["trial"] == retry.number]
    assert (retry_row["epochs"], retry_row["epochs_planned"]) == (8, 8)
    assert retry_row["epochs_reported"] == len(retry.intermediate_values) < 8
    report, rows = report_csv(search_dir)
    out = report.stdout
    assert [r["state"] for r in rows if int(r["trial"]) == killed.number] == ["INTERRUPTED"]
    assert f"retry of {killed.number}" in out


def epochs_done(run_dir: Path) -> int:
    """Epochs a running trial has checkpointed (its progress.json), 0 before it has any."""
    from mnist_hpc import rundir

    try:
        progress = rundir.read_progress(run_dir)
    except rundir.RunFileError:
        return 0
    return 0 if progress is None else progress.epochs_done


def test_a_preempted_worker_is_requeued_and_resumes_its_trial_in_place(larger_cache, tmp_path):
    from tests.helpers import restarts, sacct_history

    search_dir = tmp_path / "search"
    # 60 epochs: on an idle node an epoch of this data takes 0.07 s, and the warning must land
    # while trial 0 still trains (a USR2 after it ended requeues the worker between trials).
    proc = submit(search_args(search_dir, larger_cache, tmp_path, "train.epochs=60", "hydra.sweeper.n_trials=2",
                              "hydra.sweeper.workers=1", "hydra.sweeper.pruner=null"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [job] = worker_ids(search_dir, proc.stdout)
    try:
        until(lambda: epochs_done(search_dir / "0") >= 2, "trial 0's second epoch", 900, every_s=0.1)
        # What Slurm sends before a time limit or a preemption: submitit checkpoints and requeues.
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        until(lambda: restarts(job) >= 1, "the worker's requeue", 300)
    except BaseException:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
        raise
    trials, states = finish(search_dir, [job], 2)
    assert states[job] == "COMPLETED" and "REQUEUED" in sacct_history(job)
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert {t.user_attrs[sd.WORKER_ATTR] for t in trials} == {job}
    # The same trial number, in the same directory, resumed from its checkpoint (not retried).
    log = run_log(search_dir / "0")
    resumed = log.index("resuming from ")
    assert resumed_from(log)[0][0] >= 2 and "epoch 1/" not in log[resumed:]
    assert not any(sd.is_interrupted(t) for t in trials)
    [beat] = [b for b, _ in sd.read_beats(search_dir)[0] if b.job_id == job]
    assert beat.state == "done" and beat.trials_run == [0, 1]

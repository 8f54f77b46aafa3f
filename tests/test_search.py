"""Asynchronous Optuna search without a cluster: the space syntax, the worker's choices on a real
journal (resume its own trial, retry an abandoned one, respect the budget), pruning through the
local launcher, refusals before anything is queued, and readers fuzzed with damaged files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mnist_hpc import rundir
from mnist_hpc import search as sd
from mnist_hpc.compute.search import Heartbeat, SearchStopped, SearchWorker
from tests.helpers import (
    REPORT_CODE,
    STATUS_CODE,
    TRAIN_CODE,
    fill_cache,
    run_login_command,
    search_args,
    synthetic_mnist,
    until,
    wait_for_study,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_params_use_hydra_optuna_sweeper_syntax():
    space, fixed = sd.parse_params({
        "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))",
        "model.dropout": "interval(0.0, 0.5)",
        "model.hidden_units": "choice('[256]', '[512,512]')",
        "train.batch_size": "64,128",
        "train.epochs": "range(1, 6)",
        "train.seed": "int(interval(0, 9))",
        "model.hidden_units.0": "tag(log, int(interval(16, 1024)))",
        "optimizer.momentum": "range(0.1, 0.5, 0.1)",
        "model.activation": "relu",
    })
    assert space["optimizer.learning_rate"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.dropout"] == FloatDistribution(0.0, 0.5)
    assert space["model.hidden_units"] == CategoricalDistribution(["[256]", "[512,512]"])
    assert space["train.batch_size"] == CategoricalDistribution([64, 128])
    # Hydra's range excludes its stop; Optuna's bounds include theirs.
    assert space["train.epochs"] == IntDistribution(1, 5)
    assert space["train.seed"] == IntDistribution(0, 9)
    assert space["model.hidden_units.0"] == IntDistribution(16, 1024, log=True)
    assert space["optimizer.momentum"] == FloatDistribution(0.1, 0.4, step=0.1)
    assert fixed == ["model.activation=relu"]
    with pytest.raises(ValueError, match="not a Hydra sweep expression"):
        sd.parse_params({"model.dropout": "interval(0.0,"})
    # glob() names config group options by pattern, which only Hydra's config loader lists: refused, not a traceback.
    with pytest.raises(ValueError, match=r"^search parameter optimizer: 'glob\(\*\)' is a glob, which a search cannot sample; "
                                         r"list the values instead: choice\(a, b\)$"):
        sd.parse_params({"optimizer": "glob(*)"})


# --- the worker's choices, on a real journal -----------------------------------------------------


def make_search(tmp_path: Path, n_trials: int = 4, **settings) -> tuple[Path, optuna.Study, sd.SearchSpec]:
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    spec = sd.SearchSpec(study_name="s", direction="maximize", n_trials=n_trials,
                         params={"optimizer.learning_rate": "interval(0.001, 0.01)"},
                         sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0}, heartbeat_s=1.0,
                         stale_after_s=30.0, **settings)
    sd.write_spec(search_dir, spec)
    study = optuna.create_study(storage=sd.open_storage(search_dir), study_name="s", direction="maximize")
    return search_dir, study, spec


def started_by(study: optuna.Study, search_dir: Path, owner: str, silent_s: float) -> optuna.trial.Trial:
    """A RUNNING trial owned by ``owner``, whose heartbeat file was last written ``silent_s`` ago."""
    trial = study.ask({"optimizer.learning_rate": FloatDistribution(0.001, 0.01)})
    trial.set_user_attr(sd.WORKER_ATTR, owner)
    path = sd.write_beat(search_dir, sd.WorkerBeat(job_id=owner))
    os.utime(path, (time.time() - silent_s, time.time() - silent_s))
    return trial


def next_for(search_dir: Path, study: optuna.Study, spec: sd.SearchSpec, me: str):
    worker = SearchWorker(context=None, master_config=None, search_dir=search_dir)  # type: ignore[arg-type]
    return worker._next(study, spec, me, Heartbeat(search_dir, sd.WorkerBeat(job_id=me), spec.heartbeat_s))


def test_a_requeued_worker_resumes_its_own_running_trial(tmp_path):
    search_dir, study, spec = make_search(tmp_path)
    started_by(study, search_dir, "other", silent_s=0)
    mine = started_by(study, search_dir, "123_1", silent_s=600)
    trial = next_for(search_dir, study, spec, "123_1")
    assert trial.number == mine.number and trial.params == mine.params
    assert len(study.trials) == 2  # nothing new asked


def test_an_abandoned_trial_is_interrupted_and_retried_once(tmp_path):
    search_dir, study, spec = make_search(tmp_path)
    alive = started_by(study, search_dir, "alive", silent_s=5)
    dead = started_by(study, search_dir, "dead", silent_s=120)
    trial = next_for(search_dir, study, spec, "me")
    states = {t.number: t for t in study.get_trials()}
    assert states[alive.number].state == TrialState.RUNNING
    assert states[dead.number].state == TrialState.FAIL
    assert "silent for 1" in states[dead.number].user_attrs[sd.INTERRUPTED_ATTR]
    assert not sd.counts_toward_budget(states[dead.number])
    # The retry: the dead trial's parameters, a new number, owned by this worker.
    assert trial.params == dead.params and trial.number == 2
    assert trial.user_attrs[sd.RETRY_OF_ATTR] == dead.number and trial.user_attrs[sd.WORKER_ATTR] == "me"
    # A second worker that saw the same stale trial is refused by the journal and queues nothing.
    SearchWorker._interrupt(study, states[dead.number], "seen again")
    assert [t.state for t in study.get_trials()].count(TrialState.WAITING) == 0
    assert len(study.trials) == 3


def holder_of_a_process_that_ended() -> dict:
    """host, pid and process start of a process that has ended (its pid not reused since)."""
    import subprocess
    import sys

    code = "import dataclasses, json; from mnist_hpc.claim import Holder; print(json.dumps(dataclasses.asdict(Holder.this_process())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    holder = json.loads(out)
    return {"host": holder["host"], "pid": holder["pid"], "pid_start": holder["pid_start"]}


@pytest.mark.parametrize("owner", ["done", "stopped", "local_process_gone"])
def test_a_trial_whose_worker_is_known_gone_is_retried_at_once(tmp_path, owner):
    """No waiting for stale_after_s when the owner said it ended, or its process is gone."""
    search_dir, study, spec = make_search(tmp_path)
    gone = started_by(study, search_dir, "gone", silent_s=0)
    beat = sd.WorkerBeat(job_id="gone", cluster="local", trial=gone.number)
    if owner == "local_process_gone":
        beat = sd.WorkerBeat(job_id="gone", cluster="local", trial=gone.number, **holder_of_a_process_that_ended())
    else:
        beat.state = owner
    sd.write_beat(search_dir, beat)
    alive = started_by(study, search_dir, "alive", silent_s=0)
    sd.write_beat(search_dir, sd.WorkerBeat(job_id="alive", cluster="local", **{
        "host": beat.host or os.uname().nodename, "pid": os.getppid(), "pid_start": None}))
    trial = next_for(search_dir, study, spec, "me")
    states = {t.number: t for t in study.get_trials()}
    assert states[gone.number].state == TrialState.FAIL and states[alive.number].state == TrialState.RUNNING
    reason = states[gone.number].user_attrs[sd.INTERRUPTED_ATTR]
    assert reason == ("its worker gone's process has ended" if owner == "local_process_gone"
                      else f"its worker gone has {'ended' if owner == 'done' else 'stopped'} without finishing it")
    assert trial.user_attrs[sd.RETRY_OF_ATTR] == gone.number and trial.params == gone.params


def test_the_budget_counts_finished_trials_and_waits_only_for_quiet_workers(tmp_path):
    search_dir, study, spec = make_search(tmp_path, n_trials=2)
    done = study.ask({"optimizer.learning_rate": FloatDistribution(0.001, 0.01)})
    study.tell(done, 0.5)
    busy = started_by(study, search_dir, "busy", silent_s=0)
    assert next_for(search_dir, study, spec, "me") is None  # the last trial is a live worker's
    os.utime(sd.beat_path(search_dir, "busy"), (time.time() - 10, time.time() - 10))
    assert next_for(search_dir, study, spec, "me") == "wait"  # quiet: it may be going stale
    study.tell(busy, 0.6)
    assert next_for(search_dir, study, spec, "me") is None
    assert len(study.trials) == 2


# --- a whole search through the local launcher: pruning -------------------------------------------


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_and_keeps_its_outputs(synthetic_cache, tmp_path):
    search_dir = tmp_path / "search"
    proc, tf = run_login_command(TRAIN_CODE, search_args(
        synthetic_cache, tmp_path, "train.epochs=3", "hydra.sweeper.n_trials=3", "hydra.sweeper.workers=1",
        "optimizer.learning_rate=tag(log,interval(1e-9,1e-2))",
        "hydra.sweeper.pruner.n_startup_trials=2",
        # Two good trials first, then one whose learning rate cannot learn anything in 3 epochs.
        "hydra.sweeper.enqueue=[{optimizer.learning_rate:0.003},{optimizer.learning_rate:0.002},{optimizer.learning_rate:1e-9}]",
    ), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not tf and "queued 1 search worker(s) on local" in proc.stdout
    trials = wait_for_study(search_dir, 3)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = trials[2]
    assert pruned.params["optimizer.learning_rate"] == 1e-9 and list(pruned.intermediate_values) == [1]
    # Pruned at the start of epoch 2: epoch 1's checkpoint and progress are kept, no metrics.json.
    progress = rundir.read_progress(search_dir / "2")
    assert progress.epochs_done == 1 and progress.epochs_planned == 3
    assert rundir.list_checkpoints(search_dir / "2")
    assert not (search_dir / "2" / rundir.METRICS_FILE).exists() and not (search_dir / "2" / rundir.FAILURE_FILE).exists()
    assert "optimizer.learning_rate=1e-09" in (search_dir / "2" / rundir.HYDRA_OVERRIDES).read_text()
    for n in (0, 1):
        assert rundir.read_metrics(search_dir / str(n))["val_accuracy"] == pytest.approx(trials[n].value)

    # The worker writes its last beat after it has found the study complete.
    until(lambda: [b.state for b, _ in sd.read_beats(search_dir)[0]] == ["done"], "the worker's end")
    status, tf = run_login_command(STATUS_CODE, ["--json", str(search_dir)], tmp_path)
    assert status.returncode == 0 and not tf, status.stderr
    [view] = json.loads(status.stdout)
    assert [t["state"] for t in view["trials"]] == ["COMPLETED", "COMPLETED", "PRUNED"]
    assert view["trials"][2]["note"] == "pruned after epoch 1"
    assert [(t["epochs"], t["epochs_planned"]) for t in view["trials"]] == [(3, 3), (3, 3), (1, 3)]
    assert view["best"]["value"] == pytest.approx(max(trials[0].value, trials[1].value))
    assert view["workers"][0]["state"] == "done" and view["workers"][0]["trials_run"] == [0, 1, 2]

    report, tf = run_login_command(REPORT_CODE, [str(search_dir)], tmp_path, timeout=300)
    assert report.returncode == 0 and not tf, report.stderr
    assert "| 2 | PRUNED |" in report.stdout
    rows = (search_dir / "report" / "report.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in rows[1:]] == ["COMPLETED", "COMPLETED", "PRUNED"]
    for png in ("optimization_history.png", "param_importances.png"):
        assert (search_dir / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- refusals before anything is queued -------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.validation_split=0"], "needs data.validation_split > 0"),
        (["hydra.sweeper.enqueue=[{model.dropout:0.1,train.seed:3}]"], "not search parameters"),
        (["hydra.sweeper.sampler._target_=optuna.samplers.NoSuchSampler"], "hydra.sweeper.sampler cannot be built"),
        (["model.dropout=choice(0.1,1.5)"], "model.dropout=1.5 would fail"),
        (["hydra.sweeper.workers=0"], "hydra.sweeper.workers=0"),
        (["hydra.launcher.tasks_per_node=2"], "ask for more workers instead: hydra.sweeper.workers=N"),
    ],
)
def test_a_search_that_cannot_run_is_refused_before_queueing(synthetic_cache, tmp_path, extra, message):
    proc, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, *extra), tmp_path)
    assert proc.returncode != 0 and "nothing was queued" in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "search" / ".submitit").exists() and not (tmp_path / "search" / "study.journal").exists()


@pytest.mark.slow
def test_continuing_with_another_space_is_refused_and_changes_nothing(synthetic_cache, tmp_path):
    search_dir = tmp_path / "search"
    first, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1",
                                                    "hydra.sweeper.workers=1"), tmp_path)
    assert first.returncode == 0, first.stderr
    wait_for_study(search_dir, 1)
    journal = sd.journal_path(search_dir).read_bytes()
    spec = (search_dir / sd.SPEC_FILE).read_text()
    again, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=2",
                                                    "model.dropout=interval(0.0,0.2)"), tmp_path)
    assert again.returncode != 0 and "holds a different search" in again.stderr and "model.dropout" in again.stderr
    same, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1"), tmp_path)
    assert same.returncode != 0 and "already has 1 finished trials (n_trials=1)" in same.stderr
    assert sd.journal_path(search_dir).read_bytes() == journal and (search_dir / sd.SPEC_FILE).read_text() == spec


@pytest.mark.slow
def test_continuing_with_other_data_or_another_setting_is_refused_naming_each_change(synthetic_cache, tmp_path):
    """I2: the study is bound to its data's sha256 and every key that decides a trial's result."""
    search_dir = tmp_path / "search"
    first, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1",
                                                    "hydra.sweeper.workers=1"), tmp_path)
    assert first.returncode == 0, first.stderr
    wait_for_study(search_dir, 1)
    recorded = sd.read_spec(search_dir)
    assert recorded is not None and recorded.data_sha256 == json.loads(
        (synthetic_cache / "mnist.npz.manifest.json").read_text())["sha256"]
    assert recorded.identity["train.batch_size"] == 32 and recorded.identity["train.epochs"] == 1
    assert "optimizer.learning_rate" not in recorded.identity  # searched: each trial has its own
    journal, spec_text = sd.journal_path(search_dir).read_bytes(), (search_dir / sd.SPEC_FILE).read_text()
    submitted = sorted(p.name for p in (search_dir / ".submitit").iterdir())

    # The case: MNIST_HPC_CACHE pointed at another npz (here: 300 images instead of 600).
    other = tmp_path / "other-cache"
    fill_cache(other, synthetic_mnist(n_train=300, seed=1))
    other_sha = json.loads((other / "mnist.npz.manifest.json").read_text())["sha256"]
    refusals = {
        "data": (search_args(other, tmp_path, "hydra.sweeper.n_trials=2"),
                 f"data.sha256: {recorded.data_sha256!r} -> {other_sha!r}"),
        "fixed": (search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=2", "train.batch_size=64"),
                  "train.batch_size: 32 -> 64"),
        "epochs": (search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=2", "train.epochs=2"),
                   "train.epochs: 1 -> 2"),
    }
    for what, (args, change) in refusals.items():
        again, _ = run_login_command(TRAIN_CODE, args, tmp_path)
        assert again.returncode != 0 and "nothing was queued" in again.stderr, (what, again.stderr)
        assert "holds a different search" in again.stderr and change in again.stderr, (what, again.stderr)
    assert sd.journal_path(search_dir).read_bytes() == journal and (search_dir / sd.SPEC_FILE).read_text() == spec_text
    assert sorted(p.name for p in (search_dir / ".submitit").iterdir()) == submitted

    # The same data from another cache directory, with another output root: the same study, continued.
    from mnist_hpc.login.prefetch.fetch import prefetch

    prefetch(tmp_path / "copy" / "mnist.npz", source=synthetic_cache / "mnist.npz")
    args = [a if not a.startswith("paths.output_root=") else f"paths.output_root={tmp_path / 'out2'}"
            for a in search_args(tmp_path / "copy", tmp_path, "hydra.sweeper.n_trials=2")]
    ok, _ = run_login_command(TRAIN_CODE, args, tmp_path)
    assert ok.returncode == 0 and "continuing the study (1 trials done)" in ok.stdout, ok.stderr
    wait_for_study(search_dir, 2)


def test_an_older_search_json_without_the_identity_is_refused(synthetic_cache, tmp_path):
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    sd.write_spec(search_dir, sd.SearchSpec(study_name="mnist-hpc", direction="maximize", n_trials=1,
                                            params={"optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))"}))
    proc, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=2"), tmp_path)
    assert proc.returncode != 0 and "written by an older mnist-hpc" in proc.stderr, proc.stderr
    assert not sd.journal_path(search_dir).exists()


@pytest.mark.parametrize("damage", ["garbage_line", "emptied"])
@pytest.mark.slow
def test_a_submission_repairs_a_torn_record_and_refuses_a_lost_journal(synthetic_cache, tmp_path, damage):
    """I3 at the submission: the issue's ``echo 'not json {{{' >>`` continues, with the copy named;
    an emptied journal beside trial directories is refused, not restarted."""
    search_dir = tmp_path / "search"
    first, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1",
                                                    "hydra.sweeper.workers=1"), tmp_path)
    assert first.returncode == 0, first.stderr
    wait_for_study(search_dir, 1)
    journal = sd.journal_path(search_dir)
    intact = journal.read_bytes()
    journal.write_bytes(intact + b"not json {{{\n" if damage == "garbage_line" else b"")
    again, _ = run_login_command(TRAIN_CODE, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=2"), tmp_path)
    if damage == "emptied":
        assert again.returncode != 0 and "nothing was queued" in again.stderr
        assert "holds no record, but" in again.stderr and "directories of trials 0" in again.stderr, again.stderr
        assert journal.read_bytes() == b""
        return
    assert again.returncode == 0, again.stderr
    [copy] = search_dir.glob("study.journal.torn-*")
    assert copy.read_bytes() == intact + b"not json {{{\n"
    assert f"journal repaired: the last line of {journal}" in again.stdout and str(copy) in again.stdout
    trials = wait_for_study(search_dir, 2)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]


@pytest.mark.slow
def test_a_worker_stops_before_its_next_trial_when_the_data_is_replaced(tmp_path):
    """A ``prefetch --force`` of other data while a worker runs: it finishes the trial it trained on the
    study's data, then stops with one line and asks the study for nothing more."""
    cache = tmp_path / "cache"
    fill_cache(cache, synthetic_mnist(n_train=3000, n_test=300))
    search_dir = tmp_path / "search"
    proc, _ = run_login_command(TRAIN_CODE, search_args(cache, tmp_path, "train.epochs=40", "hydra.sweeper.n_trials=4",
                                                   "hydra.sweeper.workers=1", "hydra.sweeper.pruner=null"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    study_sha = sd.read_spec(search_dir).data_sha256  # type: ignore[union-attr]
    until(lambda: (search_dir / "0" / "progress.json").is_file(), "trial 0's first epoch")
    from mnist_hpc.login.prefetch.fetch import prefetch

    replacement = fill_cache(tmp_path / "elsewhere", synthetic_mnist(n_train=3000, n_test=300, seed=7))
    prefetch(cache / "mnist.npz", source=replacement, force=True)
    beat = until(lambda: next((b for b, _ in sd.read_beats(search_dir)[0] if b.state == "stopped"), None),
                      "the worker's stop")
    # Stopped before asking for a trial (or, had the data changed between that check and a trial's
    # start, after the trial without telling it); either way its line names both hashes.
    assert "the data at" in beat.message and study_sha[:16] in beat.message, beat.message
    trials = optuna.load_study(study_name="mnist-hpc", storage=sd.open_storage(search_dir)).get_trials()
    told = [t for t in trials if t.state == TrialState.COMPLETE]
    assert told and len(trials) < 4 and len(trials) - len(told) == ("was not told" in beat.message)
    for t in told:  # every result in the study was trained on the study's data
        assert rundir.read_identity(search_dir / str(t.number))["config"]["data.sha256"] == study_sha  # type: ignore[index]
    log = Path(beat.log).with_suffix(".err").read_text()
    assert f"search worker {beat.job_id} stopped: " in log and "Traceback" not in log, log[-2000:]


def test_a_trial_trained_on_other_data_is_not_told(tmp_path):
    """The check after a trial (the data replaced between the check before it and its start)."""
    search_dir, study, spec = make_search(tmp_path, identity={"data.sha256": "a" * 64})
    trial = study.ask({"optimizer.learning_rate": FloatDistribution(0.001, 0.01)})
    run_dir = search_dir / str(trial.number)
    rundir.write_identity(run_dir, {"data.sha256": "b" * 64}, "f")
    worker = SearchWorker(context=None, master_config=None, search_dir=search_dir)  # type: ignore[arg-type]
    with pytest.raises(SearchStopped, match=f"trial 0 was not told to the study: the data at .* is sha256 {'b' * 16}"):
        worker._check_trained_on(spec, trial, run_dir)
    rundir.write_identity(run_dir, {"data.sha256": "a" * 64}, "f")
    worker._check_trained_on(spec, trial, run_dir)  # the study's data: told as usual


@pytest.mark.slow
def test_a_killed_local_worker_is_dead_its_trial_abandoned_and_a_resumed_retry_counts_every_epoch(tmp_path):
    """I4 with the local launcher: a worker killed with kill -9 is shown dead with its trial and last
    epoch, never running; its trial is abandoned; resubmitting retries it from its checkpoint, and
    the retry's EPOCHS come from its run directory (all of them, not only those it reported)."""
    cache = tmp_path / "cache"
    fill_cache(cache, synthetic_mnist(n_train=3000, n_test=300))
    search_dir = tmp_path / "search"
    args = search_args(cache, tmp_path, "train.epochs=5", "hydra.sweeper.n_trials=1", "hydra.sweeper.workers=1",
                       "hydra.sweeper.pruner=null", "hydra.sweeper.heartbeat_s=1", "hydra.sweeper.stale_after_s=3")
    proc, _ = run_login_command(TRAIN_CODE, args, tmp_path)
    assert proc.returncode == 0, proc.stderr

    def epochs_done(n: int) -> int:
        try:
            progress = rundir.read_progress(search_dir / str(n))
        except rundir.RunFileError:
            return 0
        return 0 if progress is None else progress.epochs_done

    until(lambda: 1 <= epochs_done(0) < 5, "trial 0 in the middle of its epochs", every_s=0.02)
    [(beat, _)] = sd.read_beats(search_dir)[0]
    os.kill(beat.pid, 9)
    until(lambda: not Path(f"/proc/{beat.pid}").exists(), "the worker's end")
    done_at_kill = epochs_done(0)
    assert 1 <= done_at_kill < 5

    status, _ = run_login_command(STATUS_CODE, ["--json", str(search_dir)], tmp_path)
    [view] = json.loads(status.stdout)
    [worker] = view["workers"]
    assert worker["state"] == "dead" and worker["beat_state"] == "running" and worker["alive"] is False
    assert worker["trial"] == 0 and worker["epochs"] == done_at_kill
    [trial] = view["trials"]
    assert trial["state"] == "ABANDONED" and trial["epochs"] == done_at_kill
    assert f"its worker {beat.job_id} is dead" in trial["note"] and "submit the search again" in trial["note"]
    text, _ = run_login_command(STATUS_CODE, [str(search_dir)], tmp_path)
    row = next(line for line in text.stdout.splitlines() if line.startswith(beat.job_id))
    assert row.split()[1:3] == ["-", "dead"] and "running" not in row, text.stdout

    again, _ = run_login_command(TRAIN_CODE, args, tmp_path)
    assert again.returncode == 0, again.stderr
    trials = wait_for_study(search_dir, 1)
    killed, retry = trials
    assert killed.user_attrs[sd.INTERRUPTED_ATTR] and retry.user_attrs[sd.RESUMED_FROM_ATTR] == 0
    # The retry reported only the epochs it trained after resuming; its directory has all five.
    assert retry.state == TrialState.COMPLETE and len(retry.intermediate_values) < 5
    status, _ = run_login_command(STATUS_CODE, ["--json", str(search_dir)], tmp_path)
    [view] = json.loads(status.stdout)
    assert [(t["state"], t["epochs"], t["epochs_planned"]) for t in view["trials"]] == [
        ("INTERRUPTED", done_at_kill, 5), ("COMPLETED", 5, 5)]
    assert view["trials"][1]["epochs_reported"] == len(retry.intermediate_values)
    assert {w["job_id"]: w["state"] for w in view["workers"]}[beat.job_id] == "dead"


def fake_trial(search_dir: Path, n: int, job_id: str, epochs_done: int, val_accuracy=None, failure=None) -> None:
    """A trial directory as a worker leaves it (job.json, progress, metrics or failure)."""
    run_dir = search_dir / str(n)
    rundir.write_job(run_dir, rundir.JobRecord.of("local", job_id, None, run_dir, [f"optimizer.learning_rate=0.00{n + 1}"], n))
    rundir.write_progress(run_dir, epochs_done, 3, [{"epoch": e + 1, "val_accuracy": 0.5} for e in range(epochs_done)])
    if val_accuracy is not None:
        history = [{"epoch": e + 1, "val_accuracy": val_accuracy} for e in range(3)]
        rundir.write_metrics(run_dir, {"test_accuracy": 0.9, "val_accuracy": val_accuracy, "history": history})
    if failure is not None:
        rundir.write_failure(run_dir, RuntimeError(failure))


@pytest.mark.parametrize("damage", ["damaged_middle", "emptied", "missing"])
def test_status_and_report_show_each_trials_own_results_when_the_journal_cannot_be_read(tmp_path, damage):
    search_dir, study, _ = make_search(tmp_path)
    fake_trial(search_dir, 0, "111", 3, val_accuracy=0.91)
    fake_trial(search_dir, 1, "111", 3, val_accuracy=0.95)
    fake_trial(search_dir, 2, "111", 1, failure="boom")
    fake_trial(search_dir, 3, "111", 2)
    fake_trial(search_dir, 4, "111", 3, val_accuracy=7.5)  # a number that is not an accuracy
    journal = sd.journal_path(search_dir)
    lines = journal.read_bytes().splitlines(keepends=True)
    if damage == "damaged_middle":
        journal.write_bytes(b"".join(lines) + b"not json {{{\n" + lines[-1])
    elif damage == "emptied":
        journal.write_bytes(b"")
    else:
        journal.unlink()
    proc, tf = run_login_command(STATUS_CODE, ["--json", str(search_dir)], tmp_path)
    assert proc.returncode == 0 and not tf and "Traceback" not in proc.stderr, proc.stderr
    [view] = json.loads(proc.stdout)
    assert view["journal"]["readable"] is False and "each trial is shown from its own directory" in proc.stderr
    rows = [(t["trial"], t["state"], t["value"], t["epochs"], t["source"]) for t in view["trials"]]
    assert rows == [(0, "COMPLETED", 0.91, 3, "run_dir"), (1, "COMPLETED", 0.95, 3, "run_dir"),
                    (2, "FAILED", None, 1, "run_dir"), (3, "UNFINISHED", None, 2, "run_dir"),
                    (4, "UNFINISHED", None, 3, "run_dir")]  # its metrics.json is refused: not an accuracy
    assert view["best"] == {"trial": 1, "value": 0.95, "overrides": ["optimizer.learning_rate=0.002"]}
    assert "boom" in view["trials"][2]["note"]
    assert "metrics.json" in proc.stderr and "7.5" in proc.stderr
    text, _ = run_login_command(STATUS_CODE, [str(search_dir)], tmp_path)
    assert "the study's journal cannot be read" in text.stdout and "best so far, from the trial directories: trial 1" in text.stdout
    report, tf = run_login_command(REPORT_CODE, [str(search_dir)], tmp_path, timeout=300)
    assert report.returncode == 0 and not tf, report.stderr
    assert "| 1 | COMPLETED | 0.9500 |" in report.stdout and "| 3 | UNFINISHED |" in report.stdout
    assert "no optimisation plots: the study's journal cannot be read" in report.stdout


# --- readers of files other processes wrote ---------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"study_name": 3}', b"\xff\xfe", b'{"study_name": "s", "direction": "maximize"}'])
def test_a_damaged_search_json_is_a_clear_error(tmp_path, content):
    (tmp_path / sd.SPEC_FILE).write_bytes(content)
    with pytest.raises(sd.SearchFileError, match=sd.SPEC_FILE):
        sd.read_spec(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_json_spec", "bad_beat"])
def test_status_of_a_damaged_search_notes_it_and_shows_the_rest(tmp_path, damage):
    search_dir, study, _ = make_search(tmp_path)
    study.tell(study.ask({"x": FloatDistribution(0, 1)}), 0.7)
    started_by(study, search_dir, "w1", silent_s=0)
    journal = sd.journal_path(search_dir)
    if damage == "truncate":
        journal.write_bytes(journal.read_bytes()[:-7])
    elif damage == "garbage":
        journal.write_bytes(journal.read_bytes() + b"{not json\n" + b'{"op_code": 99}\n')
    elif damage == "not_json_spec":
        (search_dir / sd.SPEC_FILE).write_text("{")
    else:
        (search_dir / sd.WORKERS_DIR / "w2.json").write_text('{"job_id": 7}')
    proc, tf = run_login_command(STATUS_CODE, [str(search_dir)], tmp_path)
    assert proc.returncode == 0 and not tf, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "w1" in proc.stdout  # the workers are still shown
    if damage == "truncate":
        # A last line without its newline is an append in progress: Optuna's reader leaves it out
        # (here: trial 1's owner), and the rest of the study is shown.
        assert "0.7000" in proc.stdout and "\n1      RUNNING    -" in proc.stdout
        return
    assert "note:" in proc.stderr
    if damage == "bad_beat":
        assert "w2.json: field 'job_id' is 7, expected a string; this worker heartbeat is ignored" in proc.stderr
        assert "0.7000" in proc.stdout


@pytest.mark.parametrize("signum, exit_code, handler_calls", [(15, 143, 0), (12, None, 1)])
def test_a_signal_between_trials_ends_the_worker_before_it_asks_for_another(tmp_path, signum, exit_code, handler_calls):
    """USR2 or SIGTERM that came after a trial's last step boundary (or during ask and tell) is acted on
    before the next ask: USR2 goes to submitit's requeue, SIGTERM exits; no trial is asked for."""
    from mnist_hpc.compute.signals import StopRequest

    calls: list[int] = []

    def submitit_handler(sig, frame):  # stands in for submitit's: requeue, then exit
        calls.append(sig)
        raise SystemExit(0)

    worker = SearchWorker.__new__(SearchWorker)
    worker._spec = lambda: pytest.fail("the worker asked for another trial")  # type: ignore[method-assign]
    stop = StopRequest()
    stop.signum = signum
    with pytest.raises(SystemExit) as ended:
        worker._loop(None, None, "7", None, [], stop, submitit_handler)
    assert len(calls) == handler_calls and (exit_code is None or ended.value.code == exit_code)

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

from mnist_hpc import search as sd
from mnist_hpc.compute.search import Heartbeat, SearchWorker
from tests.conftest import tiny_overrides
from tests.test_launch import TRAIN, run_login_command

STATUS = "from mnist_hpc.cli import status_main; status_main()"
REPORT = "from mnist_hpc.cli import report_main; report_main()"
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


def search_args(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["-m", "hparams_search=optuna", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'search'}",
            *tiny_overrides(cache, tmp_path / "out"), *extra]


def wait_for_study(search_dir: Path, counted: int, timeout_s: float = 600) -> list[optuna.trial.FrozenTrial]:
    deadline = time.time() + timeout_s
    trials: list = []
    while time.time() < deadline:
        if sd.journal_path(search_dir).is_file():
            study = optuna.load_study(study_name="mnist-hpc", storage=sd.open_storage(search_dir))
            trials = study.get_trials()
            if sum(sd.counts_toward_budget(t) for t in trials) >= counted and not any(
                t.state == TrialState.RUNNING for t in trials
            ):
                return trials
        time.sleep(1)
    raise AssertionError(f"the study did not reach {counted} trials in {timeout_s}s: {[(t.number, t.state) for t in trials]}")


def test_a_hopeless_trial_is_pruned_and_keeps_its_outputs(synthetic_cache, tmp_path):
    search_dir = tmp_path / "search"
    proc, tf = run_login_command(TRAIN, search_args(
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
    progress = json.loads((search_dir / "2" / "progress.json").read_text())
    assert progress["epochs_done"] == 1 and progress["epochs_planned"] == 3
    assert any((search_dir / "2" / "checkpoints").iterdir())
    assert not (search_dir / "2" / "metrics.json").exists() and not (search_dir / "2" / "failure.json").exists()
    assert "optimizer.learning_rate=1e-09" in (search_dir / "2" / ".hydra" / "overrides.yaml").read_text()
    for n in (0, 1):
        assert json.loads((search_dir / str(n) / "metrics.json").read_text())["val_accuracy"] == pytest.approx(trials[n].value)

    status, tf = run_login_command(STATUS, ["--json", str(search_dir)], tmp_path)
    assert status.returncode == 0 and not tf, status.stderr
    [view] = json.loads(status.stdout)
    assert [t["state"] for t in view["trials"]] == ["COMPLETED", "COMPLETED", "PRUNED"]
    assert view["trials"][2]["note"] == "pruned after epoch 1"
    assert view["best"]["value"] == pytest.approx(max(trials[0].value, trials[1].value))
    assert view["workers"][0]["state"] == "done" and view["workers"][0]["trials_run"] == [0, 1, 2]

    report, tf = run_login_command(REPORT, [str(search_dir)], tmp_path, timeout=300)
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
    proc, _ = run_login_command(TRAIN, search_args(synthetic_cache, tmp_path, *extra), tmp_path)
    assert proc.returncode != 0 and "nothing was queued" in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "search" / ".submitit").exists() and not (tmp_path / "search" / "study.journal").exists()


def test_continuing_with_another_space_is_refused_and_changes_nothing(synthetic_cache, tmp_path):
    search_dir = tmp_path / "search"
    first, _ = run_login_command(TRAIN, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1",
                                                    "hydra.sweeper.workers=1"), tmp_path)
    assert first.returncode == 0, first.stderr
    wait_for_study(search_dir, 1)
    journal = sd.journal_path(search_dir).read_bytes()
    spec = (search_dir / sd.SPEC_FILE).read_text()
    again, _ = run_login_command(TRAIN, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=2",
                                                    "model.dropout=interval(0.0,0.2)"), tmp_path)
    assert again.returncode != 0 and "holds a different search" in again.stderr and "model.dropout" in again.stderr
    same, _ = run_login_command(TRAIN, search_args(synthetic_cache, tmp_path, "hydra.sweeper.n_trials=1"), tmp_path)
    assert same.returncode != 0 and "already has 1 finished trials (n_trials=1)" in same.stderr
    assert sd.journal_path(search_dir).read_bytes() == journal and (search_dir / sd.SPEC_FILE).read_text() == spec


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
    proc, tf = run_login_command(STATUS, [str(search_dir)], tmp_path)
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

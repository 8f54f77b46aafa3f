"""The promises at their boundaries (issue 21, I11): narrow unit tests of the code that enforces them.

Each test sits on an edge a small mutation would move: a key just inside or outside the config's
identity, label 9 against 10, fewer, equal or more epochs than a run finished, every scheduler
state a finished or unfinished run can meet, a run's best epoch against its last, a writer that
lives, has ended or cannot be asked. No Slurm (where a Slurm answer matters it is passed in, as
the preflight passes the answers of its one squeue call), no training, no subprocess running our
code: the fast tier, and the tests ``scripts/mutation.sh`` runs against each mutant.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from mnist_hpc import claim, rundir
from mnist_hpc.compute import checkpoint
from mnist_hpc.config import KEYS, flat_config, to_typed
from mnist_hpc.dataset import NUM_CLASSES, DatasetError, load_arrays, split_index, validate_arrays, validation_cut
from mnist_hpc.login.report.ranking import (
    best_trial,
    metric_value,
    parse_override,
    shared_overrides,
    shown_settings,
    swept_params,
    trial_params,
)
from mnist_hpc.login.trials import Trial
from tests.helpers import fill_cache, synthetic_mnist, until

SHA = "d" * 64


@pytest.fixture(scope="module")
def default_flat() -> dict[str, Any]:
    """The flat config of ``mnist-hpc-train`` without overrides, composed as users get it."""
    from hydra import compose, initialize_config_dir

    from mnist_hpc.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return flat_config(to_typed(compose("config")))


@pytest.fixture
def sleeper():
    """A live process of this host that is not this one (a stand-in for a job still running)."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        # Its /proc entry is there as soon as Popen returns: a short deadline, so that a process_start
        # that never answers fails here within seconds instead of hanging the test (a mutant's, say).
        until(lambda: claim.process_start(proc.pid), "the sleeper to start", timeout_s=20)
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def ended_pid() -> tuple[int, Optional[str]]:
    """The pid and process start of a process that has ended and been reaped."""
    proc = subprocess.Popen(["sleep", "0"])
    start = claim.process_start(proc.pid)
    proc.wait()
    return proc.pid, start


def test_a_process_that_is_gone_has_no_start(ended_pid: tuple[int, Optional[str]]):
    pid, start = ended_pid
    assert start is not None  # precondition: it had one while it lived
    assert claim.process_start(pid) is None  # (a pid reused since would have another start: not None)


def holder_of(proc: subprocess.Popen) -> claim.Holder:
    return claim.Holder(host=socket.gethostname(), pid=proc.pid, pid_start=claim.process_start(proc.pid))


# --- claim: what binds a directory ---------------------------------------------------------------

# Keys that may differ between the attempts of one run (where things are, how fast, how often, how
# many epochs: more continue the run), and keys that decide what it computes. Written out rather
# than derived from the schema's KeyFacts (mnist_hpc.config.KEYS), so a key that moves from one to the other fails here.
FREE_KEYS = {
    "data.cache_dir", "data.filename", "paths.output_root", "train.epochs",
    "train.intra_op_threads", "train.inter_op_threads", "train.checkpoint_every_epochs",
    "train.checkpoint_every_batches", "train.steps_per_execution", "train.distribution",
    "train.collective_timeout_s",
}
BOUND_KEYS = {
    "data.validation_split", "model.hidden_units", "model.activation", "model.dropout", "optimizer.name",
    "optimizer.learning_rate", "optimizer.momentum", "train.batch_size", "train.seed", "train.deterministic",
    "train.execution", "train.jit_compile",
}


def test_every_config_key_is_either_free_or_binding(default_flat):
    """A new key must be classified here: the identity decides which results a directory may show."""
    assert set(default_flat) == FREE_KEYS | BOUND_KEYS
    assert set(claim.identity_from_flat(default_flat, SHA)) == BOUND_KEYS | {"data.sha256"}


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, 1]
    return f"{value}-other" if value is not None else 7


@pytest.mark.parametrize("key", sorted(BOUND_KEYS))
def test_a_rerun_that_changes_a_binding_key_is_refused_naming_it(default_flat, key, tmp_path):
    identity = claim.identity_from_flat(default_flat, SHA)
    claim.bind(tmp_path, identity, 5, "")
    other = claim.identity_from_flat({**default_flat, key: _changed(default_flat[key])}, SHA)
    assert claim.fingerprint(other) != claim.fingerprint(identity)
    with pytest.raises(claim.RunConflict, match=rf"another config \({key}: .* -> .*\)"):
        claim.judge(tmp_path, other, 5, "trial 3")


@pytest.mark.parametrize("key", sorted(FREE_KEYS - {"train.epochs"}))
def test_a_rerun_that_changes_a_free_key_continues(default_flat, key, tmp_path):
    identity = claim.identity_from_flat(default_flat, SHA)
    claim.bind(tmp_path, identity, 5, "")
    moved = claim.identity_from_flat({**default_flat, key: _changed(default_flat[key])}, SHA)
    assert moved == identity
    assert claim.judge(tmp_path, moved, 5, "") == claim.Verdict("continue")


def test_the_data_binds_the_directory(default_flat):
    one, other = claim.identity_from_flat(default_flat, "a" * 64), claim.identity_from_flat(default_flat, "b" * 64)
    assert one["data.sha256"] == "a" * 64
    assert claim.fingerprint(one) != claim.fingerprint(other)
    assert len(claim.fingerprint(one)) == 16 and int(claim.fingerprint(one), 16) >= 0


def test_differences_name_each_changed_key_and_unset_ones():
    assert claim.differences({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == [
        "b: 2 -> 5", "c: 3 -> '(unset)'", "d: '(unset)' -> 4",
    ]
    assert claim.differences({"a": 1}, {"a": 1}) == []


def finished_run(run_dir: Path, identity: dict[str, Any], epochs: int) -> None:
    """A directory bound to ``identity`` whose run finished ``epochs`` epochs."""
    claim.bind(run_dir, identity, epochs, "")
    history = [{"epoch": e, "loss": 0.5 / e, "accuracy": 0.8} for e in range(1, epochs + 1)]
    rundir.write_metrics(run_dir, {"test_accuracy": 0.9, "epochs_completed": epochs, "history": history})


@pytest.mark.parametrize("asked, verdict", [(3, "done"), (4, "continue"), (9, "continue")])
def test_equal_epochs_are_done_more_continue_the_finished_run(tmp_path, asked, verdict):
    identity = {"train.seed": 0, "data.sha256": SHA}
    finished_run(tmp_path, identity, 3)
    assert claim.judge(tmp_path, identity, asked, "") == claim.Verdict(verdict, 3)


@pytest.mark.parametrize("asked", [1, 2])
def test_fewer_epochs_than_finished_are_refused(tmp_path, asked):
    identity = {"train.seed": 0, "data.sha256": SHA}
    finished_run(tmp_path, identity, 3)
    with pytest.raises(claim.RunConflict, match=rf"^trial 7: {tmp_path} has finished 3 epoch\(s\); train.epochs={asked} asks for fewer"):
        claim.judge(tmp_path, identity, asked, "trial 7")


def test_a_run_without_final_metrics_continues_from_nothing_finished(tmp_path):
    identity = {"train.seed": 0, "data.sha256": SHA}
    claim.bind(tmp_path, identity, 2, "")
    assert claim.judge(tmp_path, identity, 1, "") == claim.Verdict("continue", 0)
    (tmp_path / rundir.METRICS_FILE).write_text("{not json")  # rewritten when the run finishes again
    assert claim.judge(tmp_path, identity, 1, "") == claim.Verdict("continue", 0)


@pytest.mark.parametrize("leftover", [rundir.METRICS_FILE, rundir.PROGRESS_FILE, str(Path(rundir.CHECKPOINT_DIR) / rundir.checkpoint_name(1, 0))])
def test_results_without_an_identity_are_refused(tmp_path, leftover):
    (tmp_path / leftover).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / leftover).write_text("{}")
    with pytest.raises(claim.RunConflict, match=f"^x: {tmp_path} holds results but no {rundir.IDENTITY_FILE}"):
        claim.judge(tmp_path, {"data.sha256": SHA}, 1, "x")


def test_a_directory_with_nothing_of_a_run_is_new(tmp_path):
    (tmp_path / rundir.CHECKPOINT_DIR).mkdir()
    (tmp_path / rundir.CHECKPOINT_DIR / "notes.txt").write_text("not a checkpoint")
    (tmp_path / rundir.LOG_FILE).write_text("")
    assert claim.judge(tmp_path, {"data.sha256": SHA}, 1, "") == claim.Verdict("new")
    assert claim.judge(tmp_path / "absent", {"data.sha256": SHA}, 1, "") == claim.Verdict("new")


def test_a_damaged_identity_is_refused_without_a_label_prefix(tmp_path):
    (tmp_path / rundir.IDENTITY_FILE).write_text("[1, 2]")
    with pytest.raises(claim.RunConflict, match=f"^{tmp_path / rundir.IDENTITY_FILE} holds a JSON list.*use a new one"):
        claim.judge(tmp_path, {"data.sha256": SHA}, 1, "")


def test_bind_makes_a_new_directory_the_runs_and_leaves_a_done_one_as_it_was(tmp_path):
    identity = {"train.seed": 0, "data.sha256": SHA}
    (tmp_path / rundir.HYDRA_PENDING_DIR).mkdir()
    (tmp_path / rundir.HYDRA_PENDING_DIR / rundir.CONFIG_FILE).write_text("attempt 1")
    (tmp_path / f".{rundir.METRICS_FILE}.x1.tmp").write_text("half")
    (tmp_path / rundir.CHECKPOINT_DIR).mkdir()
    (tmp_path / rundir.CHECKPOINT_DIR / ".ckpt.x2.tmp").write_text("half")
    rundir.write_failure(tmp_path, RuntimeError("earlier attempt"))
    assert claim.bind(tmp_path, identity, 2, "") == claim.Verdict("new")
    recorded = rundir.read_identity(tmp_path)
    assert recorded["config"] == identity and recorded["fingerprint"] == claim.fingerprint(identity)
    assert (tmp_path / rundir.HYDRA_DIR / rundir.CONFIG_FILE).read_text() == "attempt 1"
    assert not (tmp_path / rundir.HYDRA_PENDING_DIR).exists()
    assert not (tmp_path / rundir.FAILURE_FILE).exists()
    assert not (tmp_path / f".{rundir.METRICS_FILE}.x1.tmp").exists() and not (tmp_path / rundir.CHECKPOINT_DIR / ".ckpt.x2.tmp").exists()

    history = [{"epoch": e, "loss": 0.1, "accuracy": 0.9} for e in (1, 2)]
    rundir.write_metrics(tmp_path, {"test_accuracy": 0.9, "history": history})
    (tmp_path / rundir.HYDRA_PENDING_DIR).mkdir()
    (tmp_path / rundir.HYDRA_PENDING_DIR / rundir.CONFIG_FILE).write_text("attempt 2")
    rundir.write_failure(tmp_path, RuntimeError("failed after its metrics"))
    assert claim.bind(tmp_path, identity, 2, "") == claim.Verdict("done", 2)
    assert (tmp_path / rundir.HYDRA_DIR / rundir.CONFIG_FILE).read_text() == "attempt 1"  # a done run changes nothing
    assert not (tmp_path / rundir.HYDRA_PENDING_DIR).exists()
    assert (tmp_path / rundir.METRICS_FILE).is_file() and (tmp_path / rundir.FAILURE_FILE).is_file()


def test_bind_of_more_epochs_retracts_the_final_metrics_until_it_finishes_again(tmp_path):
    identity = {"train.seed": 0, "data.sha256": SHA}
    finished_run(tmp_path, identity, 2)
    assert claim.bind(tmp_path, identity, 3, "") == claim.Verdict("continue", 2)
    assert not (tmp_path / rundir.METRICS_FILE).exists()
    assert claim.bind(tmp_path, identity, 3, "") == claim.Verdict("continue", 0)


@pytest.mark.parametrize("claimed", ["no", "finished", "bound", "damaged", "results"])
def test_a_run_that_failed_before_its_claim_keeps_hydras_record_only_where_nobody_claimed(tmp_path, claimed):
    if claimed == "finished":
        finished_run(tmp_path, {"data.sha256": SHA}, 1)
    elif claimed == "bound":  # claimed, nothing trained yet
        claim.bind(tmp_path, {"data.sha256": SHA}, 1, "")
    elif claimed == "damaged":
        (tmp_path / rundir.IDENTITY_FILE).write_text("{")
    elif claimed == "results":  # results of an unknown config
        rundir.write_progress(tmp_path, 0, 1, [])
    (tmp_path / rundir.HYDRA_PENDING_DIR).mkdir()
    (tmp_path / rundir.HYDRA_PENDING_DIR / rundir.HYDRA_OVERRIDES.name).write_text("- train.seed=1\n")
    claim.settle_unclaimed(tmp_path)
    assert not (tmp_path / rundir.HYDRA_PENDING_DIR).exists()
    assert (tmp_path / rundir.HYDRA_OVERRIDES).is_file() is (claimed == "no")


# --- claim: who writes it ------------------------------------------------------------------------


def test_a_live_process_is_alive_only_with_its_own_start_time(sleeper):
    me = claim.Holder.this_process()
    holder = holder_of(sleeper)
    assert claim.alive(holder, me) is True
    assert claim.alive(dataclasses.replace(holder, pid_start=None), me) is True  # an old record: pid only
    assert claim.alive(dataclasses.replace(holder, pid_start=str(int(holder.pid_start) + 1)), me) is False  # reused pid
    assert claim.alive(dataclasses.replace(holder, host="another-node"), me) is None


def test_asking_whether_a_process_lives_sends_it_no_signal():
    """kill(pid, 0) asks; any other signal would reach the writer. Blocked, a signal would stay pending: none is."""
    import signal

    proc = subprocess.Popen(["sleep", "600"], preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals)))
    try:
        until(lambda: claim.process_start(proc.pid), "the sleeper to start")
        assert claim.alive(holder_of(proc), claim.Holder.this_process()) is True
        status = Path(f"/proc/{proc.pid}/status").read_text()
        pending = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines() if line[:6] in ("SigPnd", "ShdPnd")}
        assert pending == {"SigPnd": 0, "ShdPnd": 0}
    finally:
        proc.kill()
        proc.wait()


def test_pid_1_is_a_process_like_any_other():
    """A job that is its container's first process has pid 1: it can be asked about (only 0 and below cannot)."""
    me = claim.Holder.this_process()
    assert claim.alive(claim.Holder(host=me.host, pid=1, pid_start=claim.process_start(1)), me) is True


def test_a_process_gone_between_the_ask_and_the_read_of_its_start_is_dead(sleeper, monkeypatch):
    me, holder = claim.Holder.this_process(), holder_of(sleeper)
    monkeypatch.setattr(claim, "_proc_stat", lambda pid: None)  # /proc/PID/stat gone after kill(pid, 0) found it
    assert claim.alive(holder, me) is False
    assert claim.alive(dataclasses.replace(holder, pid_start=None), me) is True  # an old record: pid only


def test_an_ended_process_is_dead(ended_pid):
    pid, start = ended_pid
    me = claim.Holder.this_process()
    assert claim.alive(claim.Holder(host=me.host, pid=pid, pid_start=start), me) is False
    assert claim.alive(claim.Holder(host=me.host, pid=pid), me) is False


def test_a_process_that_ended_but_was_not_reaped_is_dead():
    proc = subprocess.Popen(["sleep", "0"])
    try:
        until(lambda: (Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"), "a zombie")
        me = claim.Holder.this_process()
        assert claim.alive(claim.Holder(host=me.host, pid=proc.pid), me) is False
    finally:
        proc.wait()


def test_this_process_as_a_holder_names_its_job_and_its_user(monkeypatch):
    import getpass

    me = claim.Holder.this_process(slurm_job_id="77", job_label="70_7")
    assert (me.slurm_job_id, me.job_label, me.user) == ("77", "70_7", getpass.getuser())
    assert me.describe() == f"Slurm job 70_7 (pid {os.getpid()} on {socket.gethostname()}, user {getpass.getuser()})"

    def no_name() -> str:
        raise KeyError("getpwuid(): uid not found")  # a uid without a passwd entry, as in some containers

    monkeypatch.setattr(getpass, "getuser", no_name)
    assert claim.Holder.this_process().user == str(os.getuid())


def test_a_process_whose_name_holds_a_parenthesis_is_read_right(tmp_path):
    """/proc/PID/stat puts the command name in parentheses and the name may hold ')': the fields follow the last one."""
    import shutil

    program = tmp_path / "a) b"
    shutil.copy("/bin/sleep", program)
    proc = subprocess.Popen([str(program), "0"])
    try:
        until(lambda: os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT), "it to end, not reaped")
        assert claim._proc_stat(proc.pid)[0] == "Z"
        me = claim.Holder.this_process()
        assert claim.alive(claim.Holder(host=me.host, pid=proc.pid), me) is False
    finally:
        proc.wait()


def test_this_process_is_not_a_writer_to_wait_for_but_another_thread_start_is():
    me = claim.Holder.this_process()
    assert me.pid == os.getpid() and me.host == socket.gethostname() and me.pid_start == claim.process_start(os.getpid())
    assert claim.alive(dataclasses.replace(me), me) is False
    assert claim.alive(dataclasses.replace(me, pid_start=None), me) is True  # same pid, start unknown: asked, it lives


@pytest.mark.parametrize("answer", [True, False, None])
def test_a_slurm_holder_is_judged_by_slurms_answer(answer):
    asked: list[str] = []

    def slurm_alive(job_id: str) -> Optional[bool]:
        asked.append(job_id)
        return answer

    me = claim.Holder.this_process()
    holder = claim.Holder(host="", pid=-1, slurm_job_id="4242_3")
    assert claim.alive(holder, me, slurm_alive) is answer and asked == ["4242_3"]
    # The same job, requeued: the run it left is gone, whatever Slurm says of the job.
    assert claim.alive(holder, dataclasses.replace(me, slurm_job_id="4242_3"), slurm_alive) is False
    assert asked == ["4242_3"]


def test_a_job_record_names_its_process_or_its_slurm_job(sleeper):
    local = rundir.JobRecord(cluster="local", job_id=str(sleeper.pid), run_dir="r", host="n1", pid_start="99")
    assert claim.job_holder(local) == claim.Holder(host="n1", pid=sleeper.pid, pid_start="99")
    older = rundir.JobRecord(cluster="local", job_id=str(sleeper.pid), run_dir="r")
    assert claim.job_holder(older) == claim.Holder(host=socket.gethostname(), pid=sleeper.pid)
    assert claim.job_holder(rundir.JobRecord(cluster="local", job_id="n1-77", run_dir="r")).pid == -1
    assert claim.job_holder(rundir.JobRecord(cluster="slurm", job_id="12_3", run_dir="r")) == claim.Holder(
        host="", pid=-1, slurm_job_id="12_3")


def write_lease_of(run_dir: Path, holder: claim.Holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_lease(run_dir, dataclasses.asdict(holder))


def test_check_lease_refuses_a_live_writer_and_one_that_cannot_be_asked(tmp_path, sleeper, ended_pid, caplog):
    me = claim.Holder.this_process()
    claim.check_lease(tmp_path, me, "")  # no lease
    write_lease_of(tmp_path, claim.Holder(host=me.host, pid=ended_pid[0], pid_start=ended_pid[1]))
    claim.check_lease(tmp_path, me, "")  # its writer has ended: taken over
    live = dataclasses.replace(holder_of(sleeper), user="ann")
    write_lease_of(tmp_path, live)
    with pytest.raises(claim.RunConflict) as refused:
        claim.check_lease(tmp_path, me, "trial 2")
    assert str(refused.value) == (f"trial 2: {tmp_path} is being written by a process (pid {sleeper.pid} on {me.host}, user "
                                  "ann), which is still alive; wait for it to end (or cancel it) before starting another "
                                  "run in this directory")
    write_lease_of(tmp_path, dataclasses.replace(live, host="node9"))
    lease_file = tmp_path / rundir.LEASE_FILE
    with pytest.raises(claim.RunConflict, match=rf"^trial 2: {lease_file} names a process \(pid {sleeper.pid} on node9, user ann\) "
                                                rf"as the writer of this run, and it cannot be told from here whether it still "
                                                rf"runs; if it is gone, remove {lease_file} and try again$"):
        claim.check_lease(tmp_path, me, "trial 2")
    write_lease_of(tmp_path, claim.Holder(host="", pid=1, slurm_job_id="55", job_label="50_5"))
    with pytest.raises(claim.RunConflict, match=r"written by Slurm job 50_5 \(pid 1 on , user \?\), which is still alive"):
        claim.check_lease(tmp_path, me, "", lambda job_id: job_id == "55")
    claim.check_lease(tmp_path, me, "", lambda job_id: False)
    (tmp_path / rundir.LEASE_FILE).write_text("{")
    with caplog.at_level(logging.WARNING, logger="mnist_hpc.claim"):
        claim.check_lease(tmp_path, me, "")  # a damaged lease names no writer: stale
    [warned] = [r.getMessage() for r in caplog.records if r.name == "mnist_hpc.claim"]
    assert warned.startswith(f"{tmp_path / rundir.LEASE_FILE} is not valid JSON") and warned.endswith("; treating the lease as stale")


def test_the_lease_is_held_for_the_run_and_given_back_only_if_still_ours(tmp_path, sleeper):
    me = claim.Holder.this_process()
    with claim.lease(tmp_path, me, ""):
        assert rundir.read_lease(tmp_path)["holder"] == dataclasses.asdict(me)
    assert not (tmp_path / rundir.LEASE_FILE).exists()
    with claim.lease(tmp_path, me, ""):
        write_lease_of(tmp_path, holder_of(sleeper))  # taken over meanwhile (we were thought gone)
    assert rundir.read_lease(tmp_path)["holder"]["pid"] == sleeper.pid
    with pytest.raises(claim.RunConflict, match="still alive"):
        with claim.lease(tmp_path, me, ""):
            pytest.fail("a second live writer got the lease")


# --- preflight: the login side of the same promises ----------------------------------------------


def planned(compose, num: int, run_dir: Path, *overrides: str):
    from mnist_hpc.login.launcher.compose import PlannedJob

    typed = to_typed(compose(list(overrides)))
    return PlannedJob(num, list(overrides), typed, run_dir, None, flat_config(typed))  # type: ignore[arg-type]


@pytest.mark.parametrize("split, n", [(0.0, 600), (0.1, 540)])
def test_a_batch_of_every_training_sample_is_allowed_one_more_is_refused(compose, tmp_path, split, n):
    from mnist_hpc.login.launcher.preflight import check_batch_size

    manifest = {"shapes": {"x_train": [600, 28, 28]}}
    ok = planned(compose, 0, tmp_path, f"train.batch_size={n}", f"data.validation_split={split}")
    assert check_batch_size(ok, manifest) is None and ok.train_samples == n
    over = planned(compose, 4, tmp_path, f"train.batch_size={n + 1}", f"data.validation_split={split}")
    assert check_batch_size(over, manifest) == (
        f"trial 4: train.batch_size={n + 1} exceeds the {n} training samples; use at most {n}")
    assert check_batch_size(over, {"shapes": {}}) is None  # a manifest without shapes cannot tell


def local_record(run_dir: Path, pid: int, start: Optional[str], host: Optional[str] = None, ended: bool = False):
    folder = run_dir / ".submitit"
    folder.mkdir(parents=True, exist_ok=True)
    if ended:
        rundir.submitit_result_file(folder, str(pid)).write_bytes(b"")
    return rundir.JobRecord(cluster="local", job_id=str(pid), run_dir=str(run_dir), host=host or socket.gethostname(),
                            pid_start=start, submitit_folder=str(folder))


def never_asked(job_id: str) -> Optional[bool]:
    raise AssertionError(f"Slurm was asked about {job_id}")


def test_a_local_job_that_has_not_ended_still_owns_its_trial(compose, tmp_path, sleeper, ended_pid):
    from mnist_hpc.login.launcher.preflight import recorded_job_alive

    me = claim.Holder.this_process()
    job = planned(compose, 3, tmp_path / "3")
    start = claim.process_start(sleeper.pid)
    live = local_record(job.run_dir, sleeper.pid, start)
    assert recorded_job_alive(job, me, never_asked, live) == f"trial 3: its earlier job {sleeper.pid} (local) has not ended"
    # On another host it cannot be asked: taken to live.
    assert recorded_job_alive(job, me, never_asked, local_record(job.run_dir, sleeper.pid, start, host="node9")) is not None
    # Its result file says its Python process ended (the pid may live on in its shell).
    assert recorded_job_alive(job, me, never_asked, local_record(job.run_dir, sleeper.pid, start, ended=True)) is None
    assert recorded_job_alive(job, me, never_asked, local_record(job.run_dir, *ended_pid)) is None
    assert recorded_job_alive(job, me, never_asked, None) is None


@pytest.mark.parametrize("answer, owned", [(True, True), (False, False), (None, False)])
def test_a_slurm_job_owns_its_trial_while_slurm_says_it_lives(compose, tmp_path, answer, owned):
    from mnist_hpc.login.launcher.preflight import recorded_job_alive

    job = planned(compose, 5, tmp_path / "5")
    record = rundir.JobRecord(cluster="slurm", job_id="900_5", run_dir=str(job.run_dir))
    message = recorded_job_alive(job, claim.Holder.this_process(), {"900_5": answer}.__getitem__, record)
    assert message == ("trial 5: its earlier job 900_5 is still queued or running" if owned else None)


def test_a_live_lease_owns_the_trial_whatever_its_job_record(compose, tmp_path, sleeper):
    from mnist_hpc.login.launcher.preflight import recorded_job_alive

    job = planned(compose, 1, tmp_path / "1")
    write_lease_of(job.run_dir, holder_of(sleeper))
    message = recorded_job_alive(job, claim.Holder.this_process(), never_asked, None)
    assert message is not None and message.startswith(f"trial 1: {job.run_dir} is being written by a process (pid {sleeper.pid}")


def test_the_slurm_jobs_that_trials_name_are_asked_of_squeue_once(compose, tmp_path, monkeypatch, ended_pid):
    """recorded_owners: every Slurm job a job.json or a lease names, in one squeue call; a job that call did not
    answer for is asked alone; local records and damaged files ask Slurm nothing."""
    from mnist_hpc import slurm
    from mnist_hpc.login.launcher.preflight import recorded_owners

    jobs = [planned(compose, n, tmp_path / str(n)) for n in range(5)]
    rundir.write_job(jobs[0].run_dir, rundir.JobRecord(cluster="slurm", job_id="900_0", run_dir=str(jobs[0].run_dir)))
    write_lease_of(jobs[1].run_dir, claim.Holder(host="n1", pid=1, slurm_job_id="901"))
    rundir.write_job(jobs[2].run_dir, local_record(jobs[2].run_dir, *ended_pid))
    write_lease_of(jobs[3].run_dir, claim.Holder(host="n1", pid=1, slurm_job_id="903"))
    jobs[4].run_dir.mkdir()
    (jobs[4].run_dir / rundir.JOB_FILE).write_text("{")
    (jobs[4].run_dir / rundir.LEASE_FILE).write_text("{")
    asked: list[Any] = []
    monkeypatch.setattr(slurm, "jobs_alive", lambda ids: asked.append(sorted(ids)) or {"900_0": True, "901": True})
    monkeypatch.setattr(slurm, "job_alive", lambda job_id: asked.append(job_id) or False)
    owners = recorded_owners(jobs)
    assert asked == [["900_0", "901", "903"], "903"]
    assert sorted(owners) == [0, 1]
    assert owners[0] == "trial 0: its earlier job 900_0 is still queued or running"
    assert owners[1].startswith(f"trial 1: {jobs[1].run_dir} is being written by Slurm job 901 ")
    asked.clear()
    assert recorded_owners(jobs[2:3]) == {} and asked == []  # nothing named: squeue is not asked


def test_preflight_refuses_another_config_fewer_epochs_and_live_owners_naming_each_trial(compose, tmp_path, sleeper):
    """The login node's refusals, before anything is queued: nothing of the queue is asked (no Slurm record)."""
    from mnist_hpc.login.launcher.preflight import PreflightError, preflight

    cache = tmp_path / "cache"
    fill_cache(cache)
    sweep = tmp_path / "sweep"
    base = [f"data.cache_dir={cache}", "train.epochs=2"]
    jobs = [planned(compose, n, sweep / str(n), *base, f"train.seed={n}") for n in range(5)]
    sha = json.loads((cache / "mnist.npz.manifest.json").read_text())["sha256"]
    preflight(sweep, jobs)  # all new
    assert [j.verdict for j in jobs] == [claim.Verdict("new")] * 5
    assert jobs[0].fingerprint == claim.fingerprint(claim.identity_from_flat(jobs[0].flat, sha))
    assert jobs[0].train_samples == 600
    # Trial 1's directory holds another seed's run; trial 2 finished 3 epochs; trial 3's job lives;
    # trial 4 finished its 2 epochs (done: not queued again, so its live lease is not asked).
    claim.bind(jobs[1].run_dir, claim.identity_from_flat({**jobs[1].flat, "train.seed": 9}, sha), 2, "")
    finished_run(jobs[2].run_dir, claim.identity_from_flat(jobs[2].flat, sha), 3)
    rundir.write_job(jobs[3].run_dir, local_record(jobs[3].run_dir, sleeper.pid, claim.process_start(sleeper.pid)))
    finished_run(jobs[4].run_dir, claim.identity_from_flat(jobs[4].flat, sha), 2)
    write_lease_of(jobs[4].run_dir, holder_of(sleeper))
    with pytest.raises(PreflightError) as refused:
        preflight(sweep, jobs)
    lines = str(refused.value).splitlines()
    assert lines[0] == "nothing was queued:"
    assert lines[1].startswith("  trial 1: ") and "train.seed: 9 -> 1" in lines[1]
    assert lines[2].startswith("  trial 2: ") and "has finished 3 epoch(s); train.epochs=2 asks for fewer" in lines[2]
    assert lines[3] == (f"  trial 3: its earlier job {sleeper.pid} (local) has not ended; wait for it to end "
                        "(or scancel it) before submitting this trial again")
    assert len(lines) == 4 and jobs[4].verdict == claim.Verdict("done", 2)


# --- dataset: labels and splits -----------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_label_9_is_a_digit_10_is_refused(split):
    arrays = synthetic_mnist(n_train=20, n_test=20)
    arrays[f"y_{split}"][3] = NUM_CLASSES - 1
    assert validate_arrays(arrays, "f.npz")["y_train"] == [20]
    arrays[f"y_{split}"][3] = NUM_CLASSES
    with pytest.raises(DatasetError, match=f"^f.npz: y_{split} holds label 10; labels must lie in 0-9$"):
        validate_arrays(arrays, "f.npz")
    short = {**arrays, f"y_{split}": arrays[f"y_{split}"][:-1]}
    with pytest.raises(DatasetError, match=f"^f.npz: x_{split} has 20 images but y_{split} has 19 labels$"):
        validate_arrays(short, "f.npz")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(DatasetError, match="holds label 10"):
        load_arrays(buf.getvalue(), "f.npz")


@pytest.mark.parametrize("n, split, cut", [(10, 0.1, 9), (10, 0.0, 10), (3, 0.5, 2), (7, 0.99, 1)])
def test_the_validation_split_follows_keras(n, split, cut):
    assert split_index(n, split) == cut


@pytest.mark.parametrize("n, split, ok", [(10, 0.1, True), (10, 0.9, True), (10, 0.0, False), (10, 0.95, True), (10, 1.0, False),
                                          (2, 0.5, True), (1, 0.5, False)])
def test_a_validation_split_must_leave_both_parts(n, split, ok):
    if ok:
        assert validation_cut(n, split) == split_index(n, split)
    else:
        with pytest.raises(DatasetError, match=f"data.validation_split={split} leaves {split_index(n, split)} of {n} training"):
            validation_cut(n, split)


# --- a run's state from its files and its scheduler ----------------------------------------------

ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING")
ENDED_NOT_COMPLETED = sorted(rundir.ENDED_STATES - {"COMPLETED"})
METRICS = {"test_accuracy": 0.9, "history": [{"epoch": 1, "loss": 0.1, "accuracy": 0.9}]}


def run_files(cluster: str = "slurm", packed: bool = False, finished: bool = False, failure: bool = False,
              progress: bool = False, job: bool = True) -> rundir.RunFiles:
    record = rundir.JobRecord(cluster=cluster, job_id="77", run_dir="r", packed_slot=1 if packed else None)
    return rundir.RunFiles(
        Path("r"), job=record if job else None, metrics=METRICS if finished else None,
        progress=rundir.Progress(1, 2, METRICS["history"]) if progress else None,
        failure="ValueError: boom" if failure else None,
    )


def test_the_ended_states_are_slurms():
    assert rundir.ENDED_STATES == {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
                                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.mark.parametrize("state", ENDED_NOT_COMPLETED + list(ACTIVE))
def test_a_finished_run_shows_its_jobs_state_unless_the_job_completed(state):
    """metrics.json is written before the job ends: a job that then failed, timed out or ran out of
    memory is shown so, and one still ending is shown as it is."""
    assert rundir.run_state(run_files(finished=True), state) == state
    assert rundir.run_state(run_files(finished=True), "COMPLETED") == "COMPLETED"
    assert rundir.run_state(run_files(finished=True), None) == "COMPLETED"
    assert rundir.run_state(run_files(finished=True), None, process_ended=True) == "COMPLETED"


@pytest.mark.parametrize("state", sorted(rundir.ENDED_STATES) + list(ACTIVE) + [None])
def test_a_packed_trial_is_told_by_its_own_files_whatever_its_tasks_state(state):
    assert rundir.run_state(run_files(packed=True, finished=True), state) == "COMPLETED"
    assert rundir.run_state(run_files(packed=True, failure=True), state) == "FAILED"
    assert rundir.run_state(run_files(packed=True, finished=True, failure=True), state) == "FAILED"


@pytest.mark.parametrize("state", sorted(rundir.ENDED_STATES) + [None])
def test_a_failure_of_an_ended_job_is_failed(state):
    assert rundir.run_state(run_files(failure=True), state) == "FAILED"
    assert rundir.run_state(run_files(failure=True, finished=True), state) == "FAILED"


@pytest.mark.parametrize("state", ACTIVE)
def test_a_failure_beside_a_new_attempt_that_runs_is_that_attempts_state(state):
    assert rundir.run_state(run_files(failure=True), state) == state


def test_an_unfinished_run_whose_job_completed_or_whose_process_ended_failed():
    assert rundir.run_state(run_files(), "COMPLETED") == "FAILED"
    assert rundir.run_state(run_files(cluster="local"), None, process_ended=True) == "FAILED"
    assert rundir.run_state(run_files(job=False), None, process_ended=True) == "FAILED"


@pytest.mark.parametrize("state", ENDED_NOT_COMPLETED + list(ACTIVE))
def test_an_unfinished_run_shows_its_jobs_state(state):
    assert rundir.run_state(run_files(), state) == state
    assert rundir.run_state(run_files(cluster="local", progress=True), state) == state


def test_without_a_scheduler_a_local_run_is_running_once_it_has_progress():
    assert rundir.run_state(run_files(cluster="local", progress=True), None) == "RUNNING"
    assert rundir.run_state(run_files(cluster="local"), None) == "PENDING"
    assert rundir.run_state(run_files(progress=True), None) == "UNKNOWN"
    assert rundir.run_state(run_files(job=False, progress=True), None) == "UNKNOWN"


def test_a_runs_epochs_and_history_come_from_its_metrics_else_its_progress():
    two = [{"epoch": 1, "loss": 0.2, "accuracy": 0.8}, {"epoch": 2, "loss": 0.1, "accuracy": 0.9}]
    run = rundir.RunFiles(Path("r"), metrics={"test_accuracy": 0.9, "history": two}, progress=rundir.Progress(1, 3, two[:1]))
    assert run.finished and run.epochs == (2, 3) and run.history == two
    run.failure = "x"
    assert not run.finished
    assert rundir.RunFiles(Path("r"), metrics={"test_accuracy": 0.9, "history": two}).epochs == (2, 2)
    progress_only = rundir.RunFiles(Path("r"), progress=rundir.Progress(1, 3, two[:1]))
    assert progress_only.epochs == (1, 3) and progress_only.history == two[:1] and not progress_only.finished
    assert rundir.RunFiles(Path("r")).epochs == (None, None) and rundir.RunFiles(Path("r")).history == []


# --- the ranking ---------------------------------------------------------------------------------


def ranked_trial(number: int, best: Optional[float], final: Optional[float], test: float = 0.9,
                 finished: bool = True) -> Trial:
    history = [{"epoch": 1, "loss": 0.1, "accuracy": 0.9}]
    metrics: dict[str, Any] = {"test_accuracy": test, "history": history, "best_val_accuracy": best, "val_accuracy": final}
    files = rundir.RunFiles(Path(str(number)), metrics=metrics if finished else None)
    files.job = rundir.JobRecord(cluster="local", job_id="1", run_dir=str(number), trial=number)
    return Trial(run_dir=Path(str(number)), files=files)


def test_trials_are_ranked_by_their_best_epoch_not_their_last():
    peaked = ranked_trial(0, best=0.97, final=0.90, test=0.95)
    steady = ranked_trial(1, best=0.95, final=0.95, test=0.99)
    for order in ([peaked, steady], [steady, peaked]):
        chosen = best_trial(order)
        assert chosen.trial is peaked and chosen.metric == "val_accuracy" and chosen.ranked == 2
        assert chosen.warning == "" and chosen.note == ""


def test_a_tie_goes_to_the_first_trial_given():
    one, two = ranked_trial(1, 0.95, 0.95), ranked_trial(2, 0.95, 0.90)
    assert best_trial([one, two]).trial is one and best_trial([two, one]).trial is two


def test_unfinished_trials_and_trials_without_the_metric_are_left_out_and_counted():
    finished_without_val = ranked_trial(0, None, None, test=0.999)
    unfinished = ranked_trial(1, 0.999, 0.999, finished=False)
    ranked = ranked_trial(2, 0.5, 0.5, test=0.1)
    chosen = best_trial([finished_without_val, unfinished, ranked])
    assert chosen.trial is ranked and chosen.ranked == 1
    assert chosen.note == "1 unfinished trial(s) not ranked; 1 finished trial(s) without val_accuracy not ranked"
    assert chosen.warning == ""


def test_without_any_validation_the_test_set_ranks_and_the_report_says_why():
    low, high = ranked_trial(0, None, None, test=0.91), ranked_trial(1, None, None, test=0.92)
    chosen = best_trial([low, high, ranked_trial(2, 0.99, 0.99, finished=False)])
    assert chosen.trial is high and chosen.metric == "test_accuracy" and chosen.ranked == 2
    assert chosen.warning == (
        "ranked by TEST accuracy because no finished trial has validation data. Choosing a model by its test accuracy "
        "is not model selection: the test set then no longer gives an unbiased estimate of the chosen model. Hold out "
        "validation data (e.g. data.validation_split=0.1) to select on it.")
    asked = best_trial([ranked_trial(0, 0.99, 0.99, test=0.5), high], metric="test_accuracy")
    assert asked.trial is high and asked.warning == (
        "ranked by TEST accuracy as asked (--metric test_accuracy). Choosing a model by its test accuracy is not model "
        "selection: the test set then no longer gives an unbiased estimate of the chosen model. Rank by val_accuracy "
        "(the default) to select a model.")
    nothing = best_trial([ranked_trial(0, 0.9, 0.9, finished=False)])
    assert nothing.trial is None and nothing.metric == "val_accuracy" and nothing.warning == "" and nothing.ranked == 0
    with pytest.raises(ValueError, match="unknown metric 'loss'; choose one of val_accuracy, test_accuracy"):
        best_trial([], metric="loss")


def overridden(number: int, overrides: list[str], identity: Optional[dict[str, Any]] = None) -> Trial:
    files = rundir.RunFiles(Path(str(number)), overrides=overrides, identity=identity)
    return Trial(run_dir=Path(str(number)), files=files)


def test_shared_overrides_are_the_first_trials_that_no_trial_changes():
    one = overridden(0, ["a=1", "c=5", "b=2"])
    two = overridden(1, ["c=5", "a=1", "b=3"])
    assert shared_overrides([one, two]) == ["a=1", "c=5"] and shared_overrides([two, one]) == ["c=5", "a=1"]
    assert shared_overrides([]) == [] and shared_overrides([one]) == ["a=1", "c=5", "b=2"]


def test_identity_values_are_spelled_as_overrides_spell_them():
    values = {"s": "abc", "f": 0.001, "b": True, "n": None, "i": 512}
    assert trial_params(overridden(0, ["f=1e-3"], values)) == {"f": "1e-3", "s": "abc", "b": "true", "n": "null", "i": "512"}


# --- checkpoints ---------------------------------------------------------------------------------


def state_of(epoch: int, batch: int) -> checkpoint.TrainState:
    history = [{"epoch": e, "loss": 0.1} for e in range(1, epoch + 1)]
    return checkpoint.TrainState(epoch=epoch, batch=batch, history=history)


def groups(n: int = 11) -> dict[str, list[np.ndarray]]:
    return {"model": [np.full((2,), i, dtype=np.float32) for i in range(n)],
            "optimizer": [np.array(7, dtype=np.int64)], "metrics": [np.array([1.5, 2.5])]}


def test_checkpoints_are_listed_furthest_along_first_and_two_are_kept(tmp_path):
    assert rundir.list_checkpoints(tmp_path) == []
    for epoch, batch in [(1, 0), (0, 40), (2, 0), (1, 30)]:
        checkpoint.write(tmp_path, state_of(epoch, batch), groups(), "fp")
    names = [p.name for p in rundir.list_checkpoints(tmp_path)]
    assert names == [rundir.checkpoint_name(2, 0), rundir.checkpoint_name(1, 30)]
    (tmp_path / rundir.CHECKPOINT_DIR / "ckpt-e1-b1.npz").write_bytes(b"")  # not a checkpoint's name
    (tmp_path / rundir.CHECKPOINT_DIR / f"{rundir.checkpoint_name(9, 0)}.tmp").write_bytes(b"")
    assert [p.name for p in rundir.list_checkpoints(tmp_path)] == names


def test_a_checkpoint_reads_back_what_was_written(tmp_path):
    path = checkpoint.write(tmp_path, state_of(3, 12), groups(), "abc")
    assert path == rundir.checkpoint_path(tmp_path, 3, 12)
    state = checkpoint.read(path)
    assert (state.epoch, state.batch, state.fingerprint, state.path) == (3, 12, "abc", path)
    assert state.history == state_of(3, 12).history
    assert [float(v[0]) for v in state.model_values] == [float(i) for i in range(11)]  # in order past 10
    assert [int(v) for v in state.optimizer_values] == [7] and state.metric_values[0].tolist() == [1.5, 2.5]


def header_file(tmp_path: Path, header: Any, name: str = rundir.checkpoint_name(1, 0)) -> Path:
    path = tmp_path / rundir.CHECKPOINT_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    return path


GOOD_HEADER = {"format": 1, "epoch": 1, "batch": 0, "history": [], "fingerprint": "fp"}


@pytest.mark.parametrize("header, message", [
    ([1], "its header is a JSON list, not an object"),
    ({**GOOD_HEADER, "format": 2}, "unknown checkpoint format 2"),
    ({**GOOD_HEADER, "epoch": True}, "its header's 'epoch' is True, expected int"),
    ({**GOOD_HEADER, "batch": "0"}, "its header's 'batch' is '0', expected int"),
    ({**GOOD_HEADER, "history": {}}, "its header's 'history' is {}, expected list"),
    ({k: v for k, v in GOOD_HEADER.items() if k != "fingerprint"}, "its header's 'fingerprint' is None, expected str"),
])
def test_a_checkpoint_header_out_of_shape_is_refused(tmp_path, header, message):
    path = header_file(tmp_path, header)
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        checkpoint.read(path)
    assert checkpoint.read(header_file(tmp_path, GOOD_HEADER)).epoch == 1


def test_a_checkpoint_without_a_header_or_not_an_archive_is_refused(tmp_path):
    (tmp_path / "a.npz").parent.mkdir(exist_ok=True)
    np.savez(tmp_path / "a.npz", weights=np.zeros(2))
    with pytest.raises(ValueError, match="^no header$"):
        checkpoint.read(tmp_path / "a.npz")
    np.save(tmp_path / "b.npy", np.zeros(2))
    with pytest.raises(ValueError, match=r"^it is a bare \.npy array, not a checkpoint archive$"):
        checkpoint.read(tmp_path / "b.npy")


def test_an_old_checkpoint_gone_before_it_is_dropped_is_no_error(tmp_path, monkeypatch):
    """Dropping all but the newest two tolerates one that went meanwhile (deleted by hand, say): the new one stays written."""
    listed = rundir.list_checkpoints

    def listed_then_gone(run_dir: Path) -> list[Path]:
        found = listed(run_dir)
        for path in found[checkpoint.KEEP:]:
            path.unlink()
        return found

    checkpoint.write(tmp_path, state_of(1, 0), groups(), "fp")
    checkpoint.write(tmp_path, state_of(2, 0), groups(), "fp")
    monkeypatch.setattr(rundir, "list_checkpoints", listed_then_gone)
    assert checkpoint.write(tmp_path, state_of(3, 0), groups(), "fp") == rundir.checkpoint_path(tmp_path, 3, 0)
    assert [p.name for p in listed(tmp_path)] == [rundir.checkpoint_name(3, 0), rundir.checkpoint_name(2, 0)]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    assert checkpoint.load_latest(tmp_path, "fp") is None
    checkpoint.write(tmp_path, state_of(1, 0), groups(), "fp")
    newest = checkpoint.write(tmp_path, state_of(2, 0), groups(), "fp")
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="mnist_hpc.compute.checkpoint"):
        assert checkpoint.load_latest(tmp_path, "fp").epoch == 1
    assert f"checkpoint {newest.name} is unreadable" in caplog.text
    rundir.checkpoint_path(tmp_path, 1, 0).write_bytes(b"PK\x03\x04")
    with pytest.raises(checkpoint.CheckpointError, match=rf"^no readable checkpoint in .*{rundir.checkpoint_name(2, 0)}: .*; "
                                                         rf"{rundir.checkpoint_name(1, 0)}: .*delete that directory"):
        checkpoint.load_latest(tmp_path, "fp")


def test_a_checkpoint_of_another_config_is_refused_not_skipped(tmp_path):
    checkpoint.write(tmp_path, state_of(1, 0), groups(), "mine")
    checkpoint.write(tmp_path, state_of(2, 0), groups(), "other")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load_latest(tmp_path, "mine")
    bound = ", ".join(k for k, facts in KEYS.items() if facts.trajectory)
    assert "train.batch_size, " in bound and "train.epochs" not in bound
    assert str(refused.value) == (
        f"{rundir.checkpoint_path(tmp_path, 2, 0)} was written by a run with a different config (one of {bound}, or the "
        "data); refusing to resume it. Use a new run directory, or delete "
        f"{tmp_path / rundir.CHECKPOINT_DIR} to start this one over.")
    assert checkpoint.load_latest(tmp_path, "other").epoch == 2


def test_the_checkpoint_fingerprint_is_what_fixes_the_trajectory(compose):
    base = to_typed(compose([]))
    fp = checkpoint.fingerprint(base, SHA)
    assert len(fp) == 16
    assert checkpoint.fingerprint(to_typed(compose(["train.epochs=9", "data.cache_dir=/x"])), SHA) == fp
    for change in (["train.batch_size=64"], ["train.seed=1"], ["data.validation_split=0.1"], ["model.dropout=0.2"],
                   ["optimizer.learning_rate=0.01"]):
        assert checkpoint.fingerprint(to_typed(compose(change)), SHA) != fp, change
    assert checkpoint.fingerprint(base, "e" * 64) != fp


@dataclasses.dataclass
class FakeVariable:
    """What checkpoint.restore uses of a Keras variable."""

    shape: tuple[int, ...]
    path: str = "dense/kernel"
    value: Optional[np.ndarray] = None

    def assign(self, value: np.ndarray) -> None:
        self.value = value


class FakeOptimizer:
    def __init__(self, variables: list[FakeVariable]) -> None:
        self.variables, self.built_for = variables, None

    def build(self, variables: list[FakeVariable]) -> None:
        self.built_for = variables


class FakeModel:
    def __init__(self, shapes: list[tuple[int, ...]], optimizer_shapes: list[tuple[int, ...]]) -> None:
        self.variables = [FakeVariable(s) for s in shapes]
        self.trainable_variables = self.variables[:1]
        self.optimizer = FakeOptimizer([FakeVariable(s, "iterations") for s in optimizer_shapes])
        self.metrics_variables = [FakeVariable(()), FakeVariable(())]


def test_restore_puts_every_value_in_its_variable_or_names_the_mismatch(tmp_path):
    path = tmp_path / "ckpt.npz"
    state = checkpoint.TrainState(model_values=[np.ones((2, 3)), np.zeros(3)], optimizer_values=[np.array(4)],
                                  metric_values=[np.array(1.0), np.array(2.0)], path=path)
    model = FakeModel([(2, 3), (3,)], [()])
    checkpoint.restore(model, state)
    assert [v.value is s for v, s in zip(model.variables, state.model_values)] == [True, True]
    assert model.optimizer.built_for == model.trainable_variables and model.optimizer.variables[0].value == 4
    checkpoint.restore_metrics(model, state)
    assert [float(v.value) for v in model.metrics_variables] == [1.0, 2.0]
    with pytest.raises(checkpoint.CheckpointError, match=f"^{path} holds 2 model variables, this run has 3$"):
        checkpoint.restore(FakeModel([(2, 3), (3,), (1,)], [()]), state)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds a model variable of shape \(3,\) where this run has \(4,\) "
                                                         rf"\(dense/kernel\); delete {tmp_path} to start the run over"):
        checkpoint.restore(FakeModel([(2, 3), (4,)], [()]), state)
    with pytest.raises(checkpoint.CheckpointError, match="holds 1 optimizer variables, this run has 2"):
        checkpoint.restore(FakeModel([(2, 3), (3,)], [(), ()]), state)


# --- preflight: launcher options that cannot work together --------------------------------------

SWEEP = Path("/sweep")  # where the options' submitit_folder points (options.typed)


def test_launcher_options_that_contradict_each_other_are_refused():
    from mnist_hpc.login.launcher.options import typed
    from mnist_hpc.login.launcher.preflight import PreflightError, check_launcher

    check_launcher(typed({}, "slurm", SWEEP), "slurm")
    check_launcher(typed({"gpus_per_node": 4, "tasks_per_node": 2, "gpu_request": "gpus_per_task"}, "slurm", SWEEP), "slurm")
    check_launcher(typed({"gpus_per_node": 4, "tasks_per_node": 3, "gpu_request": "gpus_per_node"}, "slurm", SWEEP), "slurm")
    check_launcher(typed({"gpus_per_node": 4, "tasks_per_node": 3}, "local", SWEEP), "local")  # no gpu_request: per node
    with pytest.raises(PreflightError) as refused:
        check_launcher(typed({"gpus_per_node": 4, "tasks_per_node": 3, "gpu_request": "gpus_per_task"}, "slurm", SWEEP), "slurm")
    assert str(refused.value) == (
        "nothing was queued: hydra.launcher.gpu_request=gpus_per_task splits gpus_per_node=4 over tasks_per_node=3, "
        "which does not divide it; make tasks_per_node a divisor of gpus_per_node (one task per GPU is what a "
        "multi-worker run wants)")
    check_launcher(typed({"use_srun": False}, "slurm", SWEEP), "slurm")
    for shape in ({"tasks_per_node": 2}, {"nodes": 2}):
        with pytest.raises(PreflightError) as refused:
            check_launcher(typed({"use_srun": False, **shape}, "slurm", SWEEP), "slurm")
        assert str(refused.value) == (
            "nothing was queued: hydra.launcher.use_srun=false starts one process, but tasks_per_node or nodes asks "
            "for several; keep use_srun=true for multi-task jobs")
    with pytest.raises(PreflightError, match="^nothing was queued: hydra.launcher.trials_per_task='0'"):
        check_launcher(typed({"trials_per_task": 0}, "slurm", SWEEP), "slurm")


@pytest.mark.parametrize("cluster", ["slurm", "local"])
def test_launcher_sizes_below_what_slurm_takes_as_a_size_are_refused(cluster):
    """--time=0 is no limit and --mem=0 a whole node to Slurm: refused with the least that works (issue 23)."""
    from mnist_hpc.login.launcher.options import typed
    from mnist_hpc.login.launcher.preflight import PreflightError, check_launcher

    least = {"timeout_min": 1, "cpus_per_task": 1, "tasks_per_node": 1, "nodes": 1, "mem_gb": 0.001, "gpus_per_node": 0}
    if cluster == "slurm":
        least["signal_delay_s"] = 59  # the warning comes before a 1-minute limit ends (check_slurm_options)
    check_launcher(typed(least, cluster, SWEEP), cluster)
    for option, value, shown in (("timeout_min", 0, "0"), ("timeout_min", -5, "-5"), ("cpus_per_task", 0, "0"),
                                 ("tasks_per_node", 0, "0"), ("nodes", 0, "0"), ("mem_gb", 0.0009, "0.0009"),
                                 ("gpus_per_node", -1, "-1")):
        with pytest.raises(PreflightError, match=rf"^nothing was queued: hydra.launcher.{option}={shown} is less than "):
            check_launcher(typed({**least, option: value}, cluster, SWEEP), cluster)


@pytest.mark.parametrize("cluster", ["slurm", "local"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_launcher_size_that_is_no_number_is_refused(cluster, value):
    from mnist_hpc.login.launcher.options import typed
    from mnist_hpc.login.launcher.preflight import PreflightError, check_launcher

    with pytest.raises(PreflightError) as refused:
        check_launcher(typed({"mem_gb": value}, cluster, SWEEP), cluster)
    assert str(refused.value) == f"nothing was queued: hydra.launcher.mem_gb={value} is not a size; ask for a number, at least 0.001"


def test_check_launcher_checks_the_slurm_options_too():
    """The warning signal past the time limit is refused on the way every launch takes (check_launcher), with a
    suggestion that fits the limit; an sbatch option's value may hold any printable text."""
    from mnist_hpc.login.launcher.options import typed
    from mnist_hpc.login.launcher.preflight import PreflightError, check_launcher

    check_launcher(typed({"timeout_min": 4, "signal_delay_s": 239, "additional_parameters": {"constraint": "XEON"}},
                         "slurm", SWEEP), "slurm")
    with pytest.raises(PreflightError) as refused:
        check_launcher(typed({"timeout_min": 4, "signal_delay_s": 240}, "slurm", SWEEP), "slurm")
    assert str(refused.value) == (
        "nothing was queued: hydra.launcher.signal_delay_s=240 asks for the warning signal that many seconds before the "
        "end, but timeout_min=4 gives the job 240 s: it would be told to stop as it starts, and requeue again and again; "
        "use a smaller signal_delay_s (e.g. 60) or a larger timeout_min")


def test_several_tasks_train_one_run_or_are_refused_per_trial(compose, tmp_path):
    from mnist_hpc.login.launcher.options import typed
    from mnist_hpc.login.launcher.preflight import PreflightError, check_tasks

    jobs = [planned(compose, 0, tmp_path / "0", "train.batch_size=2"), planned(compose, 1, tmp_path / "1", "train=lesson"),
            planned(compose, 2, tmp_path / "2", "train.distribution=none"), planned(compose, 3, tmp_path / "3")]
    check_tasks(typed({"nodes": 1, "tasks_per_node": 1}, "local", SWEEP), "local", jobs)  # one task: nothing to check
    two = {"nodes": 1, "tasks_per_node": 2}
    check_tasks(typed(two, "slurm", SWEEP), "slurm", [jobs[0], jobs[3]])  # a batch of 2 for 2 workers is enough
    with pytest.raises(PreflightError) as refused:
        check_tasks(typed({"nodes": 3, "tasks_per_node": 1}, "slurm", SWEEP), "slurm", jobs)
    assert str(refused.value).splitlines() == [
        "nothing was queued (hydra.launcher.nodes=3 x tasks_per_node=1 = 3 tasks):",
        "  trial 0: train.batch_size=2 is smaller than the 3 workers",
        "  trial 1: train.execution=keras_fit (train=lesson) cannot train across 3 tasks (Keras 3's fit does not support "
        "MultiWorkerMirroredStrategy, keras #20585); use train.execution=compiled_loop",
        "  trial 2: train.distribution=none would train 3 independent copies into one run directory; use "
        "train.distribution=multi_worker (or auto, the default) for one training across the tasks, or ask for one task "
        "(hydra.launcher.tasks_per_node=1 and nodes=1)",
    ]
    shape = "hydra.launcher.nodes=1 x tasks_per_node=2 = 2 tasks"
    with pytest.raises(PreflightError) as refused:
        check_tasks(typed(two, "local", SWEEP), "local", [jobs[3]])
    assert str(refused.value) == (
        f"nothing was queued: {shape}, but the local launcher starts one process per job; use hydra/launcher=slurm for "
        "a multi-worker training, or one task (tasks_per_node=1, nodes=1)")
    with pytest.raises(PreflightError) as refused:
        check_tasks(typed({**two, "trials_per_task": 2}, "slurm", SWEEP), "slurm", [jobs[3]])
    assert str(refused.value) == (f"nothing was queued: {shape} train one run together, so their trials cannot be packed "
                                  "(hydra.launcher.trials_per_task); set trials_per_task=1")
    check_tasks(typed({**two, "trials_per_task": 1}, "slurm", SWEEP), "slurm", [jobs[3]])
    with pytest.raises(PreflightError) as refused:
        check_tasks(typed({**two, "gpus_per_node": 2}, "slurm", SWEEP), "slurm", [jobs[3]])
    assert str(refused.value) == (
        f"nothing was queued: {shape} on nodes with 2 GPUs would each see every GPU of their node; set "
        "hydra.launcher.gpu_request=gpus_per_task (each task its own GPUs), or tasks_per_node=1 (one task per node uses "
        "all of its GPUs)")
    check_tasks(typed({**two, "gpus_per_node": 2, "gpu_request": "gpus_per_task"}, "slurm", SWEEP), "slurm", [jobs[3]])
    check_tasks(typed({"nodes": 2, "tasks_per_node": 1, "gpus_per_node": 2}, "slurm", SWEEP), "slurm", [jobs[3]])  # one task per node: all its GPUs


@pytest.mark.parametrize("count, shown", [(12, 12), (13, 12)])
def test_a_refusal_names_twelve_trials_and_counts_the_rest(tmp_path, count, shown):
    from mnist_hpc.login.launcher.preflight import PreflightError, check_trial_dirs

    class Job:
        def __init__(self, num: int) -> None:
            self.num, self.run_dir = num, tmp_path.parent / f"elsewhere-{num}"

    with pytest.raises(PreflightError) as refused:
        check_trial_dirs(tmp_path, [Job(n) for n in range(count)])
    lines = str(refused.value).splitlines()
    assert lines[0] == "nothing was queued:" and all(f"trial {n} would write" in lines[n + 1] for n in range(shown))
    assert lines[shown + 1:] == ([f"  ... and {count - shown} more"] if count > shown else [])
    check_trial_dirs(tmp_path, [])


def test_an_output_directory_that_cannot_be_written_is_refused(tmp_path):
    from mnist_hpc.login.launcher.preflight import PreflightError, check_writable

    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(PreflightError) as refused:
        check_writable(tmp_path / "file" / "x")
    assert str(refused.value) == (f"nothing was queued: cannot write to the output directory {tmp_path / 'file' / 'x'} (Not a "
                                  "directory); set paths.output_root to a writable location (e.g. on $SCRATCH)")


def test_a_missing_or_damaged_cache_is_refused_before_queueing(compose, tmp_path):
    from mnist_hpc.login.launcher.preflight import PreflightError, check_cache

    cache = tmp_path / "cache"
    with pytest.raises(PreflightError, match=f"^nothing was queued: no cached MNIST at {cache / 'mnist.npz'}"):
        check_cache(to_typed(compose([f"data.cache_dir={cache}"])))
    fill_cache(cache)
    manifest = check_cache(to_typed(compose([f"data.cache_dir={cache}"])))
    assert manifest["shapes"]["x_train"] == [600, 28, 28]
    (cache / "mnist.npz.manifest.json").write_text("{}")
    with pytest.raises(PreflightError, match="^nothing was queued: the manifest .* has format None"):
        check_cache(to_typed(compose([f"data.cache_dir={cache}"])))


# --- dataset: the bounds checked before anything is inflated ------------------------------------


def npy(shape: tuple[int, ...], descr: str = "|u1", version: int = 1, header_len: Optional[int] = None,
        body: Optional[bytes] = None) -> bytes:
    """A ``.npy`` stream of format ``version`` whose header (padded to ``header_len``) claims ``shape``."""
    from mnist_hpc.dataset import _dtype

    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    prefix = 8 + (2 if version == 1 else 4)
    length = header_len if header_len is not None else len(text) + 1 + (-(prefix + len(text) + 1)) % 64
    text += b" " * (length - len(text) - 1) + b"\n"
    size = _dtype(descr)[1] or 1
    data = body if body is not None else bytes(int(np.prod(shape)) * size)
    return b"\x93NUMPY" + bytes([version, 0]) + length.to_bytes(prefix - 8, "little") + text + data


def zipped(members: dict[str, bytes]) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def mnist_members(n: int = 3) -> dict[str, bytes]:
    return {"x_train.npy": npy((n, 28, 28)), "y_train.npy": npy((n,)), "x_test.npy": npy((n, 28, 28)), "y_test.npy": npy((n,))}


def test_numpys_simple_dtypes_are_named_as_numpy_does():
    from mnist_hpc.dataset import _dtype

    assert [_dtype(d) for d in ("|u1", "<i8", "<f4", "|b1", ">u2")] == [
        ("uint8", 1), ("int64", 8), ("float32", 4), ("bool", 1), ("uint16", 2)]
    assert _dtype("<U5") == ("<U5", None) and _dtype("|V") == ("|V", None) and _dtype([("a", "<i4")]) == ("[('a', '<i4')]", None)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_each_npy_format_version_is_read(version):
    from mnist_hpc.dataset import read_npz_layout

    layout = read_npz_layout(zipped({**mnist_members(), "y_test.npy": npy((3,), version=version)}), "f.npz")
    assert layout["y_test"] == ((3,), "uint8") and layout["x_train"] == ((3, 28, 28), "uint8")


def test_an_npy_header_of_numpys_limit_is_read_one_byte_more_is_refused():
    from mnist_hpc.dataset import MAX_NPY_HEADER_BYTES, read_npz_layout

    at_limit = npy((3,), version=2, header_len=MAX_NPY_HEADER_BYTES)
    assert read_npz_layout(zipped({"y.npy": at_limit}), "f.npz") == {"y": ((3,), "uint8")}
    with pytest.raises(DatasetError, match=f"^f.npz: member y.npy has a .npy header of {MAX_NPY_HEADER_BYTES + 1} bytes"):
        read_npz_layout(zipped({"y.npy": npy((3,), version=2, header_len=MAX_NPY_HEADER_BYTES + 1)}), "f.npz")


@pytest.mark.parametrize("version, width", [(1, 2), (2, 4), (3, 4)])
def test_an_npy_header_length_is_read_unsigned(version, width):
    """The largest length the field can hold is refused as that many bytes (a signed read would take it as negative)."""
    from mnist_hpc.dataset import read_npz_layout

    largest = (1 << (8 * width)) - 1
    text = repr({"descr": "|u1", "fortran_order": False, "shape": (3,)}).encode() + b"\n"
    stream = b"\x93NUMPY" + bytes([version, 0]) + largest.to_bytes(width, "little") + text + bytes(3)
    with pytest.raises(DatasetError, match=rf"^f.npz: member y.npy has a .npy header of {largest} bytes \(numpy allows 10000\)$"):
        read_npz_layout(zipped({"y.npy": stream}), "f.npz")


@pytest.mark.parametrize("header", [b"[1, 2]", b"'x'", b"{'descr': '|u1', 'shape': [3]}", b"{'descr': '|u1', 'shape': (-1,)}",
                                    b"{'descr': '|u1', 'shape': (True,)}", b"{'shape': (3,)}"])
def test_an_npy_header_that_is_no_dict_with_a_shape_and_a_descr_is_malformed(header):
    from mnist_hpc.dataset import read_npz_layout

    stream = b"\x93NUMPY\x01\x00" + (len(header) + 1).to_bytes(2, "little") + header + b"\n" + bytes(3)
    with pytest.raises(DatasetError, match=r"^f.npz: member y.npy has a malformed \.npy header$"):
        read_npz_layout(zipped({"y.npy": stream}), "f.npz")


def test_a_member_of_the_npz_byte_bound_passes_the_bound_one_byte_more_is_refused():
    """No member may claim more bytes than an MNIST npz holds, whatever its name and item size (an unknown dtype
    counts one byte an item); at the bound the claim goes on to be checked against the zip directory."""
    from mnist_hpc.dataset import MAX_NPZ_BYTES, read_npz_layout

    def refusal(member: bytes) -> str:
        with pytest.raises(DatasetError) as refused:
            read_npz_layout(zipped({"e.npy": member}), "f.npz")
        return str(refused.value)

    bomb = "MNIST-like data holds at most 300000 images per split (another dataset, or a decompression bomb)"
    assert refusal(npy((MAX_NPZ_BYTES,), body=b"")).startswith(f"f.npz: e declares shape ({MAX_NPZ_BYTES},) (")
    assert refusal(npy((MAX_NPZ_BYTES + 1,), body=b"")) == f"f.npz: e claims shape ({MAX_NPZ_BYTES + 1},); {bomb}"
    assert refusal(npy((MAX_NPZ_BYTES // 8 + 1,), descr="<f8", body=b"")) == f"f.npz: e claims shape ({MAX_NPZ_BYTES // 8 + 1},); {bomb}"
    assert read_npz_layout(zipped({"e.npy": npy((MAX_NPZ_BYTES,), descr="<U5", body=b"")}), "f.npz") == {
        "e": ((MAX_NPZ_BYTES,), "<U5")}
    member = npy((3,), descr="<f8", body=bytes(10))
    header = len(member) - 10
    assert refusal(member) == (f"f.npz: e declares shape (3,) ({header + 24} bytes) but the zip directory records "
                               f"{header + 10} bytes (damaged or forged archive)")


def test_a_zip_that_cannot_be_read_is_named_with_the_zip_librarys_reason():
    from mnist_hpc.dataset import read_npz_layout

    with pytest.raises(DatasetError) as refused:
        read_npz_layout(b"PK\x03\x04nope", "f.npz")
    assert str(refused.value) == "f.npz is not a readable npz archive (damaged or truncated zip: File is not a zip file)"



def test_a_member_that_runs_past_the_end_of_the_archive_is_named_by_the_error_without_a_message():
    """zipfile raises a bare EOFError when a member's recorded size runs past the archive's end: its name stands in."""
    import struct
    import zipfile

    from mnist_hpc.dataset import read_npz_layout

    body = b"\x93NUMPY\x01\x00" + (9000).to_bytes(2, "little") + b"{"  # a header longer than what is left
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("y.npy", body)
    data = bytearray(buffer.getvalue())
    for signature, at in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):  # local header, central directory: sizes
        start = data.index(signature) + at
        data[start:start + 8] = struct.pack("<II", len(body) + 100_000, len(body) + 100_000)
    with pytest.raises(DatasetError) as refused:
        read_npz_layout(bytes(data), "f.npz")
    assert str(refused.value) == "f.npz is not a readable npz archive (damaged or truncated zip: EOFError)"


def test_a_layout_read_from_a_path_names_that_path(tmp_path):
    from mnist_hpc.dataset import read_npz_layout

    path = tmp_path / "x.npz"
    path.write_bytes(zipped(mnist_members(2)))
    assert read_npz_layout(path)["x_train"] == ((2, 28, 28), "uint8")
    path.write_text("not a zip\n")
    with pytest.raises(DatasetError, match=f"^{path} is not a readable npz archive: it is a text file$"):
        read_npz_layout(path)


@pytest.mark.parametrize("version, encoding", [(1, "latin1"), (2, "latin1"), (3, "utf-8")])
def test_an_npy_header_is_decoded_as_its_format_version_says(version, encoding):
    """Formats 1 and 2 are latin-1, 3 is UTF-8 (numpy's format.py): a non-ASCII descr is named as numpy would read it."""
    from mnist_hpc.dataset import read_npz_layout

    text = repr({"descr": "|\u00e91", "fortran_order": False, "shape": (3,)}).encode(encoding) + b"\n"
    width = 2 if version == 1 else 4
    stream = b"\x93NUMPY" + bytes([version, 0]) + len(text).to_bytes(width, "little") + text + bytes(3)
    assert read_npz_layout(zipped({"y.npy": stream}), "f.npz") == {"y": ((3,), "|\u00e91")}


@pytest.mark.parametrize("stream, why", [(b"\x93NUMPY\x04\x00", "is not a .npy array"), (b"\x93NUM", "is not a .npy array"),
                                         (b"PK\x03\x04nope", "is not a .npy array"), (b"\x93NUMPY\x01", "is not a .npy array")])
def test_a_member_that_is_no_npy_is_refused(stream, why):
    from mnist_hpc.dataset import read_npz_layout

    with pytest.raises(DatasetError, match=f"^f.npz: member y.npy {why}$"):
        read_npz_layout(zipped({"y.npy": stream}), "f.npz")


def test_sixteen_members_are_read_seventeen_refused():
    from mnist_hpc.dataset import MAX_MEMBERS, read_npz_layout

    extra = {f"e{i}.npy": npy((1,)) for i in range(MAX_MEMBERS - 4)}
    assert len(read_npz_layout(zipped({**mnist_members(), **extra}), "f.npz")) == MAX_MEMBERS
    with pytest.raises(DatasetError, match=f"^f.npz holds {MAX_MEMBERS + 1} members; an MNIST npz holds 4$"):
        read_npz_layout(zipped({**mnist_members(), **extra, "one-more.npy": npy((1,))}), "f.npz")


def test_a_split_of_max_images_is_read_one_more_is_refused_from_its_header():
    from mnist_hpc.dataset import MAX_IMAGES, read_npz_layout

    assert read_npz_layout(zipped({"y_train.npy": npy((MAX_IMAGES,))}), "f.npz") == {"y_train": ((MAX_IMAGES,), "uint8")}
    with pytest.raises(DatasetError, match=rf"^f.npz: y_train claims shape \({MAX_IMAGES + 1},\); MNIST-like data holds at most"):
        read_npz_layout(zipped({"y_train.npy": npy((MAX_IMAGES + 1,), body=b"")}), "f.npz")
    # Any other member is bounded by its bytes, not its count.
    assert read_npz_layout(zipped({"extra.npy": npy((MAX_IMAGES + 1,))}), "f.npz")["extra"][0] == (MAX_IMAGES + 1,)


@pytest.mark.parametrize("members, message", [
    ({k: v for k, v in mnist_members().items() if k != "y_test.npy"}, r"lacks the key\(s\) \['y_test'\]"),
    ({**mnist_members(), "y_train.npy": npy((3,), "<i8")}, "y_train has dtype int64, expected uint8"),
    ({**mnist_members(), "x_test.npy": npy((3, 28, 27))}, r"x_test has shape \(3, 28, 27\), expected \(N, 28, 28\)"),
    ({**mnist_members(), "x_test.npy": npy((3, 784))}, r"x_test has shape \(3, 784\), expected \(N, 28, 28\)"),
    ({**mnist_members(), "y_train.npy": npy((3, 1))}, r"y_train has shape \(3, 1\), expected \(N,\)"),
    ({**mnist_members(), "y_test.npy": npy((4,))}, "x_test has 3 images but y_test has 4 labels"),
    ({**mnist_members(0), "x_test.npy": npy((1, 28, 28)), "y_test.npy": npy((1,))}, "x_train is empty"),
    ({**mnist_members(), "x_test.npy": npy((0, 28, 28)), "y_test.npy": npy((0,))}, "x_test is empty"),
])
def test_a_layout_that_is_not_mnists_is_refused_naming_what(members, message):
    from mnist_hpc.dataset import _validate_layout, read_npz_layout

    with pytest.raises(DatasetError, match=f"^f.npz: {message}|^f.npz {message}"):
        _validate_layout(read_npz_layout(zipped(members), "f.npz"), "f.npz")


def test_a_layout_of_one_image_per_split_is_mnists():
    from mnist_hpc.dataset import _validate_layout, read_npz_layout

    assert _validate_layout(read_npz_layout(zipped(mnist_members(1)), "f.npz"), "f.npz") == {
        "x_train": [1, 28, 28], "y_train": [1], "x_test": [1, 28, 28], "y_test": [1]}


@pytest.mark.parametrize("head, what", [
    (b"", "it is empty"), (b"\x93NUMPY\x01\x00", "it is a bare .npy array"), (b"\x80\x04\x95", "it is a Python pickle"),
    (b"\x80\x02", "it is a Python pickle"), (b"\x80\x01", "it is not a zip archive"), (b"\x1f\x8b\x08", "it is gzip-compressed"),
    (b"\x00\x00\x08\x03", "it is a single IDX file"), (b"<!DOCTYPE html><p>", "it looks like an HTML page"),
    (b"x" * 600 + b"<html>", "it is a text file"), (b"plain\ttext\r\n", "it is a text file"), (b"text\x7f", "it is not a zip archive"),
    (b"\x80\x03}q", "it is a Python pickle"), (b"\x80\x05\x95", "it is a Python pickle"), (b"\x80\x06", "it is not a zip archive"),
    (b"<html><body>", "it looks like an HTML page"), (b"a b\nc", "it is a text file"), (b"\x1ftext", "it is not a zip archive"),
    (b"x" * 507 + b"<html>", "it looks like an HTML page"), (b"x" * 508 + b"<html>", "it is a text file"),
    (b"x" * 512 + b"\x00", "it is a text file"), (b"x" * 511 + b"\x00", "it is not a zip archive"),
])
def test_a_file_that_is_not_an_npz_is_described(head, what):
    from mnist_hpc.dataset import describe_bytes

    assert describe_bytes(head).startswith(what)


@pytest.mark.parametrize("head, said", [
    (b"\x93NUMPY\x01\x00", "it is a bare .npy array (one array), not a zip of the four MNIST arrays"),
    (b"\x80\x04\x95", "it is a Python pickle (not loaded: unpickling can run code)"),
    (b"\x1f\x8b\x08", "it is gzip-compressed (gunzip it; IDX files are passed as their directory)"),
    (b"\x00\x00\x08\x03", "it is a single IDX file (pass the directory holding all four)"),
    (b"<html>", "it looks like an HTML page, e.g. an error page from a proxy"),
])
def test_what_a_file_that_is_not_an_npz_is_says_what_to_do(head, said):
    """The description's advice, word for word: the names a user searches for (MNIST, IDX) keep their spelling."""
    from mnist_hpc.dataset import describe_bytes

    assert describe_bytes(head) == said


# --- the cache's manifest and names --------------------------------------------------------------


def good_manifest() -> dict[str, Any]:
    return {"format": 2, "sha256": "a" * 64, "size": 100, "source": "/data/mnist.npz", "source_kind": "npz",
            "shapes": {"x_train": [1, 28, 28], "y_train": [1], "x_test": [1, 28, 28], "y_test": [1]}}


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"size": 1}, None),
    ({"size": "max"}, None),
    ({"size": 0}, "has no valid size"),
    ({"size": "max+1"}, "has no valid size"),
    ({"size": 100.0}, "has no valid size"),
    ({"size": True}, "has no valid size"),
    ({"format": 1}, "has format 1, not 2 (written by another mnist-hpc version)"),
    ({"sha256": "A" * 64}, "has no valid sha256"),
    ({"sha256": "a" * 63}, "has no valid sha256"),
    ({"sha256": 5}, "has no valid sha256"),
    ({"source": "a\nb"}, "has no valid source"),
    ({"source": 3}, "has no valid source"),
    ({"source_kind": "idx"}, None),
    ({"source_kind": "download"}, None),
    ({"source_kind": "copy"}, "has no valid source"),
    ({"shapes": {"x_train": [1, 28, 28]}}, "has no valid shapes"),
    ({"shapes": {"x_train": [-1], "y_train": [1], "x_test": [1], "y_test": [1]}}, "has no valid shapes"),
    ({"shapes": {"x_train": [1.0], "y_train": [1], "x_test": [1], "y_test": [1]}}, "has no valid shapes"),
    ({"shapes": {"x_train": (1,), "y_train": [1], "x_test": [1], "y_test": [1]}}, "has no valid shapes"),
    ({"shapes": {"x_train": [0], "y_train": [1], "x_test": [1], "y_test": [1]}}, None),
])
def test_a_manifest_field_at_its_bounds(change, problem):
    from mnist_hpc.cache import _manifest_problem
    from mnist_hpc.dataset import MAX_NPZ_BYTES

    sizes = {"max": MAX_NPZ_BYTES, "max+1": MAX_NPZ_BYTES + 1}
    manifest = {**good_manifest(), **{k: sizes.get(v, v) if k == "size" else v for k, v in change.items()}}
    assert _manifest_problem(manifest) == problem


@pytest.mark.parametrize("value, kind", [([], "a list"), ("x", "a string"), (True, "a boolean"), (None, "null"), (3, "a number")])
def test_a_manifest_that_is_no_object_says_what_it_holds(value, kind):
    from mnist_hpc.cache import _manifest_problem

    assert _manifest_problem(value) == f"holds {kind}, not a JSON object"


@pytest.mark.parametrize("name, ok", [("mnist.npz", True), ("fashion.npz", True), ("a..b", True), ("", False), (".", False),
                                      ("..", False), ("a/b", False), ("a\\b", False), ("a\0b", False), (".hidden", False),
                                      ("x.manifest.json", False), ("x.manifest.jsonl", True)])
def test_a_cache_file_name_is_a_plain_name(name, ok):
    from mnist_hpc.cache import filename_problem

    assert (filename_problem(name) is None) is ok


@pytest.mark.parametrize("name, problem", [
    ("", "give a file name such as mnist.npz"), (".", "give a file name such as mnist.npz"),
    ("..", "give a file name such as mnist.npz"),
    ("a/b", "must be a plain file name inside data.cache_dir (no '/'); put directories in data.cache_dir"),
    (".hidden", "names starting with '.' are reserved for the cache's own files; use e.g. mnist.npz"),
    ("x.manifest.json", "names ending in .manifest.json are reserved for manifests; use e.g. mnist.npz"),
])
def test_a_cache_file_name_that_cannot_be_says_what_to_give(name, problem):
    from mnist_hpc.cache import filename_problem

    assert filename_problem(name) == problem


def test_the_command_that_fills_or_repairs_a_cache_names_its_source(tmp_path):
    from mnist_hpc.cache import prefetch_command
    from mnist_hpc.cache import KERAS_MNIST_URL

    npz = tmp_path / "mnist.npz"
    assert prefetch_command(npz) == f"mnist-hpc-prefetch data.cache_dir={tmp_path}"
    assert prefetch_command(npz, force=True) == f"mnist-hpc-prefetch data.cache_dir={tmp_path} --force"
    assert prefetch_command(tmp_path / "f.npz") == f"mnist-hpc-prefetch data.cache_dir={tmp_path} data.filename=f.npz"
    imported = {**good_manifest(), "source": "/data/my file.npz"}
    assert prefetch_command(npz, imported) == f"mnist-hpc-prefetch data.cache_dir={tmp_path} --from '/data/my file.npz' --force"
    assert prefetch_command(npz, {**imported, "source_kind": "idx"}).endswith("--from '/data/my file.npz' --force")
    mirror = {**good_manifest(), "source_kind": "download", "source": "http://127.0.0.1/m.npz"}
    assert prefetch_command(npz, mirror) == (f"mnist-hpc-prefetch data.cache_dir={tmp_path} --url http://127.0.0.1/m.npz "
                                             f"--sha256 {'a' * 64} --force")
    assert prefetch_command(npz, {**mirror, "source": KERAS_MNIST_URL}) == f"mnist-hpc-prefetch data.cache_dir={tmp_path} --force"


# --- the search directory's files ----------------------------------------------------------------


def spec_values(**change: Any) -> dict[str, Any]:
    return {"study_name": "s", "direction": "maximize", "n_trials": 4, "params": {"a": "interval(0, 1)"}, "fixed": [],
            "enqueue": [], "heartbeat_s": 1.0, "stale_after_s": 30.0, "workers": 2, "identity": {}, **change}


@pytest.mark.parametrize("change", [{"n_trials": 1}, {"workers": 1}, {"direction": "minimize"}, {"heartbeat_s": 1e-9},
                                    {"stale_after_s": 1}, {"pruner": None}, {"pruner": {"_target_": "p"}},
                                    {"identity": {"data.sha256": "0" * 64}}, {"identity": {"data.sha256": "0123456789abcdef" * 4}},
                                    {"identity": {"data.sha256": None}},
                                    {"params": {}}, {"fixed": ["a=1"]}, {"enqueue": [{}]}])
def test_a_search_json_at_the_edge_of_its_ranges_is_read(change):
    from mnist_hpc.search import spec_problem

    assert spec_problem(spec_values(**change)) is None


@pytest.mark.parametrize("change, problem", [
    ({"n_trials": 0}, "field 'n_trials' must be at least 1"),
    ({"workers": 0}, "field 'workers' must be at least 1"),
    ({"heartbeat_s": 0.0}, "field 'heartbeat_s' must be a positive number of seconds"),
    ({"heartbeat_s": float("inf")}, "field 'heartbeat_s' must be a positive number of seconds"),
    ({"stale_after_s": float("nan")}, "field 'stale_after_s' must be a positive number of seconds"),
    ({"study_name": ""}, "field 'study_name' is empty"),
    ({"direction": "Maximize"}, "field 'direction' must be maximize or minimize"),
    ({"params": {"a": 1}}, "field 'params' must map names to sweep expressions (strings)"),
    ({"fixed": [1]}, "field 'fixed' must be a list of overrides (strings)"),
    ({"enqueue": [[]]}, "field 'enqueue' must be a list of parameter sets"),
    ({"identity": {"data.sha256": "0" * 63}}, "field 'identity' holds a data.sha256 that is not a sha256"),
    ({"identity": {"data.sha256": 5}}, "field 'identity' holds a data.sha256 that is not a sha256"),
    ({"identity": {"data.sha256": "A" * 64}}, "field 'identity' holds a data.sha256 that is not a sha256"),
    ({"workers": True}, "field 'workers' is True, expected int"),
    ({"pruner": []}, "field 'pruner' is [], expected dict or null"),
    ({"pruner": {"": None}}, "field 'pruner' must be null or name its class in _target_"),
    ({"pruner": {"_target_": ""}}, "field 'pruner' must be null or name its class in _target_"),
    ({"pruner": {"_target_": 3}}, "field 'pruner' must be null or name its class in _target_"),
    ({"heartbeat_s": "1"}, "field 'heartbeat_s' is '1', expected int or float"),
    ({"point_identities": {"a=1": []}}, "field 'point_identities' must map labels to identities (objects)"),
    ({"point_identities": {"a=1": {}, "b=2": 3}}, "field 'point_identities' must map labels to identities (objects)"),
])
def test_a_search_json_past_its_ranges_is_refused_naming_the_field(change, problem):
    from mnist_hpc.search import spec_problem

    assert spec_problem(spec_values(**change)) == problem
    for key in ("study_name", "direction", "n_trials", "params", "fixed", "enqueue"):
        assert spec_problem({k: v for k, v in spec_values().items() if k != key}) == f"field {key!r} is missing"


def test_a_search_json_without_its_optional_fields_is_read():
    """Files written before workers, heartbeat_s, stale_after_s, identity and point_identities existed."""
    from mnist_hpc.search import spec_problem

    required = ("study_name", "direction", "n_trials", "params", "fixed", "enqueue")
    assert spec_problem({k: v for k, v in spec_values().items() if k in required}) is None
    assert spec_problem(spec_values(point_identities={"a=1": {"train.seed": 0}})) is None


def beat_values(**change: Any) -> dict[str, Any]:
    return {"job_id": "1_0", "cluster": "slurm", "host": "n1", "pid": 42, "pid_start": "99", "trial": 3, "state": "running",
            "trials_run": [0, 1], "message": "", "log": "", **change}


@pytest.mark.parametrize("change", [{"pid": 0}, {"pid": 2**31 - 1}, {"trial": 0}, {"trial": 2**31 - 1}, {"trial": None},
                                    {"trials_run": [0, 2**31 - 1]}, {"job_id": "j" * 200}, {"cluster": ""},
                                    {"cluster": "local"}, {"pid_start": None}, {"pid_start": "0"},
                                    *({"state": s} for s in ("queued", "running", "done", "stopped", "requeued"))])
def test_a_heartbeat_at_the_edge_of_its_ranges_is_read(change):
    from mnist_hpc.search import beat_problem

    assert beat_problem(beat_values(**change)) is None
    assert beat_problem({"job_id": "1"}) is None  # every other field has a default


@pytest.mark.parametrize("change, problem", [
    ({"pid": 2**31}, "field 'pid' must be a process id"), ({"pid": -1}, "field 'pid' must be a process id"),
    ({"pid": False}, "field 'pid' must be a process id"),
    ({"trial": 2**31}, "field 'trial' must be a trial number (a whole number >= 0)"),
    ({"trials_run": [2**31]}, "field 'trials_run' must list trial numbers"),
    ({"trials_run": [True]}, "field 'trials_run' must list trial numbers"),
    ({"trials_run": 5}, "field 'trials_run' must list trial numbers"), ({"trials_run": {}}, "field 'trials_run' must list trial numbers"),
    ({"job_id": "j" * 201}, "it has no job_id"), ({"job_id": ""}, "it has no job_id"),
    ({"pid_start": "-1"}, "field 'pid_start' must be a number of clock ticks"),
    ({"cluster": "pbs"}, "field 'cluster' must be slurm or local"),
    ({"state": "dead"}, "field 'state' must be one of queued, running, done, stopped, requeued"),
    ({"log": 3}, "field 'log' is 3, expected a string"),
])
def test_a_heartbeat_past_its_ranges_is_refused_naming_the_field(change, problem):
    from mnist_hpc.search import beat_problem

    assert beat_problem(beat_values(**change)) == problem
    assert beat_problem([beat_values()]) == "it holds a JSON list, expected an object"


@pytest.mark.parametrize("key", ["job_id", "cluster", "host", "started", "beat", "state", "message", "log"])
def test_a_heartbeats_text_field_that_is_no_string_is_refused_naming_it(key):
    from mnist_hpc.search import beat_problem

    assert beat_problem(beat_values(**{key: 3})) == f"field {key!r} is 3, expected a string"


def test_a_worker_is_known_by_its_process_only_where_the_beat_names_one():
    from mnist_hpc.search import WorkerBeat

    assert WorkerBeat(job_id="7", host="n1", pid=5, pid_start="9").holder() == claim.Holder(host="n1", pid=5, pid_start="9")
    assert WorkerBeat(job_id="7", host="n1", pid=2**31 - 1).holder().pid == 2**31 - 1
    assert WorkerBeat(job_id="7", host="n1", pid=1).holder().pid == 1
    assert WorkerBeat(job_id="7", host="n1", pid=2**31).holder() is None  # no process id (kill(2) could not ask)
    assert WorkerBeat(job_id="7", host="n1", pid=0).holder() is None  # a Slurm worker not started: no process yet
    assert WorkerBeat(job_id="7", host="", pid=5).holder() is None
    assert WorkerBeat(job_id="123456789", cluster="local", host="n1").holder().pid == 123456789
    assert WorkerBeat(job_id="1234567890", cluster="local", host="n1").holder() is None
    assert WorkerBeat(job_id="12", cluster="slurm", host="n1").holder() is None


@pytest.mark.parametrize("record, problem", [
    ({"op_code": 4, "worker_id": "w", "study_id": 0, "datetime_start": "t"}, None),
    ({"op_code": 9, "worker_id": "w", "trial_id": 0, "system_attr": {}}, None),
    ({"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}, None),
    ({"op_code": 10, "worker_id": "w"}, "op_code 10 is not one of Optuna's"),
    ({"op_code": -1, "worker_id": "w"}, "op_code -1 is not one of Optuna's"),
    ({"op_code": True, "worker_id": "w"}, "op_code True is not one of Optuna's"),
    ({"op_code": 1, "worker_id": 3, "study_id": 0}, "it has no worker_id"),
    ({"op_code": 6, "worker_id": "w", "trial_id": 1, "state": 1}, "its operation 6 lacks values"),
    ({"op_code": 5, "worker_id": "w", "trial_id": 1}, "its operation 5 lacks param_name, param_value_internal, distribution"),
    ({"op_code": 1, "worker_id": "w", "study_id": -1}, "its study_id is -1, not a whole number >= 0"),
    ({"op_code": 8, "worker_id": "w", "trial_id": 1.0, "user_attr": {}}, "its trial_id is 1.0, not a whole number >= 0"),
    ([1], "a JSON list, not a record"),
])
def test_a_journal_line_is_a_record_optuna_writes_or_says_why_not(record, problem):
    from mnist_hpc.search import record_problem

    assert record_problem(record) == problem


def test_trial_directories_are_whole_ascii_numbers_of_up_to_nine_digits(tmp_path):
    from mnist_hpc.search import number_ranges, trial_numbers

    for name in ("0", "10", "2", "999999999", "1000000000", "03x", "²", "report"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file")
    assert trial_numbers(tmp_path) == [0, 2, 10, 999999999]
    assert trial_numbers(tmp_path / "absent") == []
    assert number_ranges([5, 0, 1, 2, 3, 8, 9, 3]) == "0-3, 5, 8-9"
    assert number_ranges([4]) == "4" and number_ranges([]) == ""


def test_a_trial_names_another_only_by_a_whole_number_in_range():
    from types import SimpleNamespace

    from mnist_hpc.search import RETRY_OF_ATTR, trial_number_attr

    def trial(value: Any) -> Any:
        return SimpleNamespace(user_attrs={RETRY_OF_ATTR: value})

    assert [trial_number_attr(trial(v), RETRY_OF_ATTR) for v in (0, 5, 2**31 - 1, 2**31, -1, True, 1.0, "3", None)] == [
        0, 5, 2**31 - 1, None, None, None, None, None, None]
    assert trial_number_attr(SimpleNamespace(user_attrs={}), RETRY_OF_ATTR) is None


def test_finished_trials_count_toward_the_budget_an_interrupted_one_does_not():
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from mnist_hpc.search import INTERRUPTED_ATTR, counts_toward_budget

    def trial(state: TrialState, **attrs: Any) -> Any:
        return SimpleNamespace(state=state, user_attrs=attrs)

    assert counts_toward_budget(trial(TrialState.COMPLETE)) and counts_toward_budget(trial(TrialState.PRUNED))
    assert counts_toward_budget(trial(TrialState.FAIL))
    assert not counts_toward_budget(trial(TrialState.FAIL, **{INTERRUPTED_ATTR: "its worker died"}))
    assert not counts_toward_budget(trial(TrialState.RUNNING)) and not counts_toward_budget(trial(TrialState.WAITING))


def test_a_trials_overrides_are_the_fixed_ones_then_its_parameters():
    from mnist_hpc.search import SearchSpec, trial_overrides

    spec = SearchSpec(study_name="s", direction="maximize", n_trials=1, params={}, fixed=["train.epochs=2", "a=b"])
    assert trial_overrides(spec, {"optimizer.learning_rate": 0.01, "train.seed": 3}) == [
        "train.epochs=2", "a=b", "optimizer.learning_rate=0.01", "train.seed=3"]


@pytest.mark.parametrize("tail, torn", [(b"", False), (b'{"op_code": 1, "worker_id": "w", "study_id": 0}\n', False),
                                        (b'{"op_code": 1, "worker_id": "w", "st', True), (b"garbage\n", True),
                                        (b"\n", True)])
def test_a_torn_last_line_is_found_from_the_end_of_a_long_journal(tmp_path, tail, torn):
    from mnist_hpc.search import torn_tail

    first = json.dumps({"op_code": 2, "worker_id": "w", "study_id": 0, "user_attr": {"pad": "x" * 9000}}).encode() + b"\n"
    path = tmp_path / "study.journal"
    path.write_bytes(first + tail)
    found = torn_tail(path)
    assert (found is not None) is torn
    if torn:
        assert found[0] == len(first)
    path.write_bytes(b'{"op_code": 1, "worker_id": "w", "st')  # one line only, torn
    assert torn_tail(path)[0] == 0
    path.write_bytes(b"")
    assert torn_tail(path) is None and torn_tail(tmp_path / "absent") is None


def test_status_of_a_search_whose_pruner_names_no_class_is_a_note_not_a_traceback(tmp_path):
    """Found by the property test of test_search_readers while mutmut ran it: ``"pruner": {"": null}``
    passed the reader and status then raised KeyError('_target_')."""
    from mnist_hpc.login import study

    (tmp_path / "search.json").write_text(json.dumps(spec_values(pruner={"": None})))
    view = study.read_study(tmp_path, with_slurm=False)
    assert view.spec is None and "field 'pruner' must be null or name its class in _target_" in view.notes[0]
    assert study.format_status(view).startswith(f"search {tmp_path}: no readable search.json")


# --- more of what the fast tier missed (survivors of scripts/mutation.sh) ------------------------


def test_launcher_options_left_out_take_their_defaults():
    """The schema fills every option in (options.typed, once per launch); a caller that gives fewer
    gets the dataclass's defaults, and a value of the wrong type is refused there."""
    from mnist_hpc.config import ConfigError
    from mnist_hpc.login.launcher.options import typed
    from mnist_hpc.login.launcher.preflight import PreflightError, check_launcher, check_tasks

    def slurm(**options):
        return typed(options, "slurm", SWEEP)

    def local(**options):
        return typed(options, "local", SWEEP)

    check_launcher(slurm(gpu_request="gpus_per_task", tasks_per_node=2), "slurm")  # no GPUs: nothing to split
    check_launcher(slurm(gpu_request="gpus_per_task", gpus_per_node=3), "slurm")  # one task takes all 3
    with pytest.raises(PreflightError, match="does not divide it"):
        check_launcher(slurm(gpu_request="gpus_per_task", gpus_per_node=3, tasks_per_node=2), "slurm")
    check_tasks(local(), "local", [])
    check_tasks(local(tasks_per_node=1), "local", [])
    check_tasks(local(nodes=1), "local", [])
    with pytest.raises(PreflightError, match=r"hydra.launcher.nodes=1 x tasks_per_node=2 = 2 tasks, but the local launcher"):
        check_tasks(local(tasks_per_node=2), "local", [])
    with pytest.raises(PreflightError, match=r"hydra.launcher.nodes=2 x tasks_per_node=1 = 2 tasks, but the local launcher"):
        check_tasks(local(nodes=2), "local", [])
    check_tasks(slurm(tasks_per_node=2), "slurm", [])  # no GPUs to share
    # The defaults are the dataclass's, the same for every reader (packing once fell back to 1 CPU, the dataclass says 2).
    assert (slurm().cpus_per_task, local().cpus_per_task, slurm().timeout_min, slurm().trials_per_task) == (2, 2, 60, "auto")
    assert slurm().submitit_folder == "/sweep/.submitit/%A"
    with pytest.raises(ConfigError, match=r"^invalid launcher option hydra.launcher.gpus_per_node: .*'None'.*'int'$"):
        slurm(gpus_per_node=None)
    with pytest.raises(ConfigError, match=r"^unknown launcher option hydra.launcher.partition; the local launcher's options "
                                          r"are: submitit_folder, .*, name \(docs/configuration.md\)"):
        local(partition="big")  # a Slurm option: the local launcher has none


def test_each_trial_is_checked_against_its_own_cache(compose, tmp_path):
    from mnist_hpc.login.launcher.preflight import PreflightError, preflight

    fill_cache(tmp_path / "a")
    jobs = [planned(compose, 0, tmp_path / "s" / "0", f"data.cache_dir={tmp_path / 'a'}"),
            planned(compose, 1, tmp_path / "s" / "1", f"data.cache_dir={tmp_path / 'b'}")]
    with pytest.raises(PreflightError, match=f"no cached MNIST at {tmp_path / 'b' / 'mnist.npz'}"):
        preflight(tmp_path / "s", jobs)


def test_every_trial_is_checked_after_one_is_refused(compose, tmp_path):
    from mnist_hpc.login.launcher.preflight import PreflightError, preflight

    cache = tmp_path / "cache"
    fill_cache(cache)
    jobs = [planned(compose, 0, tmp_path / "s" / "0", f"data.cache_dir={cache}", "train.batch_size=601"),
            planned(compose, 1, tmp_path / "s" / "1", f"data.cache_dir={cache}", "train.epochs=1")]
    finished_run(jobs[1].run_dir, claim.identity_from_flat(jobs[1].flat, json.loads(
        (cache / "mnist.npz.manifest.json").read_text())["sha256"]), 2)
    with pytest.raises(PreflightError) as refused:
        preflight(tmp_path / "s", jobs)
    lines = str(refused.value).splitlines()
    assert lines[1] == "  trial 0: train.batch_size=601 exceeds the 600 training samples; use at most 600"
    assert lines[2].startswith("  trial 1: ") and "asks for fewer" in lines[2] and len(lines) == 3


def test_the_slurm_jobs_of_every_trial_are_asked_about_in_one_call(compose, tmp_path, monkeypatch):
    """recorded_owners: job.json and lease naming Slurm jobs, answered by one squeue call (a stand-in
    here); a job not in the answers (a lease taken meanwhile) is asked about on its own."""
    from mnist_hpc import slurm
    from mnist_hpc.login.launcher.preflight import recorded_owners

    calls: list[Any] = []
    monkeypatch.setattr(slurm, "jobs_alive", lambda ids: calls.append(list(ids)) or {"101": True, "102": False, "103": True})
    monkeypatch.setattr(slurm, "job_alive", lambda job_id: calls.append(job_id) or job_id == "104")
    jobs = [planned(compose, n, tmp_path / str(n)) for n in range(6)]
    rundir.write_job(jobs[0].run_dir, rundir.JobRecord(cluster="slurm", job_id="101", run_dir=str(jobs[0].run_dir)))
    rundir.write_job(jobs[1].run_dir, rundir.JobRecord(cluster="slurm", job_id="102", run_dir=str(jobs[1].run_dir)))
    write_lease_of(jobs[2].run_dir, claim.Holder(host="", pid=1, slurm_job_id="103"))
    write_lease_of(jobs[3].run_dir, claim.Holder(host="", pid=1, slurm_job_id="103"))
    (jobs[3].run_dir / rundir.JOB_FILE).write_text("{")  # damaged: its lease still counts
    jobs[4].run_dir.mkdir()
    (jobs[4].run_dir / rundir.LEASE_FILE).write_text("[]")  # damaged: treated as stale
    owners = recorded_owners(jobs)
    assert calls[0] == ["101", "102", "103", "103"]
    assert sorted(owners) == [0, 2, 3] and owners[0] == "trial 0: its earlier job 101 is still queued or running"
    assert "written by Slurm job 103" in owners[2] and "written by Slurm job 103" in owners[3]
    # A lease whose job the one call did not name: asked on its own.
    write_lease_of(jobs[5].run_dir, claim.Holder(host="", pid=1, slurm_job_id="104"))
    calls.clear()
    reads: list[Path] = []
    real_read_lease = rundir.read_lease
    monkeypatch.setattr(rundir, "read_lease", lambda d: None if reads.append(d) or len(reads) == 1 else real_read_lease(d))
    assert "written by Slurm job 104" in recorded_owners([jobs[5]])[5]
    assert calls == ["104"]
    calls.clear()
    assert recorded_owners([jobs[4]]) == {} and calls == []  # nothing named: no Slurm call at all


def test_read_npz_reads_a_file_and_names_it(tmp_path):
    from mnist_hpc.dataset import read_npz

    arrays = synthetic_mnist(n_train=20, n_test=10)
    path = tmp_path / "f.npz"
    np.savez(path, **arrays)
    got = read_npz(path)
    assert sorted(got) == ["x_test", "x_train", "y_test", "y_train"] and np.array_equal(got["y_train"], arrays["y_train"])
    arrays["y_test"][0] = 10
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=f"^{path}: y_test holds label 10"):
        read_npz(path)


def test_a_cache_file_that_cannot_be_read_says_why_and_what_its_owner_can_run(tmp_path):
    import errno

    from mnist_hpc.cache import _cannot_read

    path = tmp_path / "my cache" / "m.npz"
    assert _cannot_read(path, OSError(errno.EACCES, "Permission denied")) == (
        f"cannot read {path}: Permission denied (its owner can run `chmod g+r '{path}'`)")
    assert _cannot_read(path, OSError(errno.EIO, "Input/output error")) == f"cannot read {path}: Input/output error"
    assert _cannot_read(path, OSError("no errno")) == f"cannot read {path}: no errno"


def test_a_process_inflates_a_verified_object_once_and_checks_it_every_time(tmp_path):
    from mnist_hpc import cache
    from mnist_hpc.config import DataConfig

    fill_cache(tmp_path / "c")
    cfg = DataConfig(cache_dir=str(tmp_path / "c"))
    first, manifest = cache.read_verified(cfg)
    second, _ = cache.read_verified(cfg)
    assert second is not first and all(second[k] is first[k] for k in first)  # the same arrays, a new dict
    assert not first["x_train"].flags.writeable
    manifest_file = tmp_path / "c" / "mnist.npz.manifest.json"
    forged = {**json.loads(manifest_file.read_text()), "shapes": {**manifest["shapes"], "y_test": [199]}}
    manifest_file.write_text(json.dumps(forged))
    with pytest.raises(cache.CacheCorruptError, match=f"^{tmp_path / 'c' / 'mnist.npz'} holds arrays of shapes .* run "
                                                      r"`mnist-hpc-prefetch data.cache_dir="):
        cache.read_verified(cfg)


def test_a_checkpoint_holding_a_pickle_is_refused(tmp_path):
    path = rundir.checkpoint_path(tmp_path, 1, 0)
    path.parent.mkdir()
    np.savez(path, header=np.frombuffer(json.dumps(GOOD_HEADER).encode(), dtype=np.uint8),
             **{"model/0000": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        checkpoint.read(path)


def test_a_checkpoint_is_written_where_no_run_directory_exists_yet(tmp_path):
    path = checkpoint.write(tmp_path / "new" / "run", state_of(1, 0), groups(1), "fp")
    assert checkpoint.read(path).epoch == 1


def test_a_model_is_checkpointed_with_its_optimizer_and_mid_epoch_its_metrics(tmp_path):
    class Var(FakeVariable):
        def numpy(self) -> np.ndarray:
            return np.full(self.shape, len(self.path), dtype=np.float32)

    model = FakeModel([(2,), (3,)], [()])
    model.variables = [Var((2,), "ab"), Var((3,), "abc")]
    model.optimizer.variables = [Var((), "a")]
    model.metrics_variables = [Var((), "abcd")]
    state = checkpoint.read(checkpoint.save(tmp_path, state_of(1, 5), model, "fp", with_metrics=True))
    assert [v.tolist() for v in state.model_values] == [[2.0, 2.0], [3.0, 3.0, 3.0]]
    assert [float(v) for v in state.optimizer_values] == [1.0] and [float(v) for v in state.metric_values] == [4.0]
    assert (state.epoch, state.batch, state.fingerprint) == (1, 5, "fp")
    between = checkpoint.read(checkpoint.save(tmp_path, state_of(2, 0), model, "fp", with_metrics=False))
    assert between.metric_values == [] and len(between.model_values) == 2


def test_checkpoint_messages_name_the_file_and_the_error(tmp_path, caplog):
    state = checkpoint.TrainState(model_values=[np.zeros(3)], optimizer_values=[np.array(1)], path=None)
    with pytest.raises(checkpoint.CheckpointError, match=r"^None holds a model variable of shape \(3,\) where this run has "
                                                         r"\(4,\) \(dense/kernel\); delete the checkpoints to start the run over$"):
        checkpoint.restore(FakeModel([(4,)], [()]), state)
    state.path = tmp_path / "ckpt.npz"
    with pytest.raises(checkpoint.CheckpointError, match=f"^{state.path} holds 1 optimizer variables, this run has 2$"):
        checkpoint.restore(FakeModel([(3,)], [(), ()]), state)
    checkpoint.write(tmp_path, state_of(1, 0), groups(), "fp")
    newest = checkpoint.write(tmp_path, state_of(2, 0), groups(), "fp")
    newest.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="mnist_hpc.compute.checkpoint"):
        checkpoint.load_latest(tmp_path, "fp")
    assert f"checkpoint {newest.name} is unreadable (" in caplog.text and "not a zip" not in caplog.text
    assert caplog.records[-1].getMessage().endswith("); falling back to the previous one")
    assert caplog.records[-1].args[1] is not None


def test_a_continued_search_names_each_change_of_its_identity():
    from mnist_hpc.search import SearchSpec

    old = SearchSpec(study_name="s", direction="maximize", n_trials=4, params={"a": "interval(0, 1)"}, fixed=["x=1"],
                     identity={"train.seed": 0, "data.sha256": "a" * 64})
    assert old.differences(old) == []
    same = dataclasses.replace(old, n_trials=9, fixed=["x=2"], workers=5)  # not identity: may change
    assert same.differences(old) == []
    new = dataclasses.replace(old, study_name="t", direction="minimize", params={"a": "interval(0, 2)"},
                              identity={"train.seed": 1, "data.sha256": "a" * 64, "model.dropout": 0.1})
    assert new.differences(old) == [
        "study_name: 's' -> 't'", "direction: 'maximize' -> 'minimize'",
        "params: {'a': 'interval(0, 1)'} -> {'a': 'interval(0, 2)'}",
        "model.dropout: '(unset)' -> 0.1", "train.seed: 0 -> 1",
    ]
    assert old.data_sha256 == "a" * 64 and dataclasses.replace(old, identity={}).data_sha256 is None
    assert dataclasses.replace(old, identity={"data.sha256": 5}).data_sha256 is None


def journal_study(tmp_path: Path, trials: int, name: str = "s") -> Path:
    import optuna
    from optuna.distributions import FloatDistribution

    from mnist_hpc import search as sd

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    study = optuna.create_study(storage=sd.open_storage(search_dir), study_name=name, direction="maximize")
    for _ in range(trials):
        study.tell(study.ask({"x": FloatDistribution(0.0, 1.0)}), 0.5)
    return search_dir


@pytest.mark.parametrize("state, what", [("missing", "does not exist"), ("empty", "holds no record"),
                                         ("other", "holds no trial of a study named 's'"), ("two", "knows trials 0-1 only")])
def test_trial_directories_the_journal_does_not_know_are_named_with_what_it_holds(tmp_path, state, what):
    from mnist_hpc import search as sd

    search_dir = journal_study(tmp_path, 2, name="other" if state == "other" else "s")
    journal = sd.journal_path(search_dir)
    if state == "missing":
        journal.unlink()
    elif state == "empty":
        journal.write_bytes(b"")
    for n in range(4):
        (search_dir / str(n)).mkdir()
    orphans = "2-3" if state == "two" else "0-3"
    with pytest.raises(sd.JournalError) as refused:
        sd.check_journal(search_dir, "s")
    assert str(refused.value) == (
        f"{journal} {what}, but {search_dir} holds directories of trials {orphans}: the study's record of them is lost, "
        "and a new one would collide with them. Restore the journal (a study.journal.torn-* copy beside it, or a "
        f"backup), or use a new hydra.sweep.dir; mnist-hpc-status {search_dir} still shows each trial's own results")


def test_a_search_json_that_is_no_object_is_refused_naming_what_it_is(tmp_path):
    from mnist_hpc import search as sd

    (tmp_path / "search.json").write_text("[1]")
    with pytest.raises(sd.SearchFileError) as refused:
        sd.read_spec(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'search.json'} holds a JSON list, expected an object"


def test_the_copy_kept_before_a_cut_is_named_by_the_utc_time(tmp_path, monkeypatch):
    import time
    from types import SimpleNamespace

    from mnist_hpc import search as sd

    journal = tmp_path / "study.journal"
    journal.write_bytes(b"whole\n")
    monkeypatch.setattr(sd, "time", SimpleNamespace(strftime=time.strftime, gmtime=lambda: time.gmtime(365 * 86400)))
    copy = sd._keep_copy(journal)
    assert re.fullmatch(r"study\.journal\.torn-19710101T000000Z-[0-9a-f]{8}", copy.name) and copy.read_bytes() == b"whole\n"


def test_check_journal_returns_the_studys_trials_and_no_cut_for_a_whole_journal(tmp_path):
    from mnist_hpc import search as sd

    search_dir = journal_study(tmp_path, 3)
    assert sd.check_journal(search_dir, "another").trials == []
    for n in range(3):
        (search_dir / str(n)).mkdir()
    check = sd.check_journal(search_dir, "s")
    assert [t.number for t in check.trials] == [0, 1, 2] and check.cut is None and check.note() is None
    assert sd.check_journal(tmp_path / "search", "s").scan is not None
    (tmp_path / "fresh").mkdir()
    fresh = sd.check_journal(tmp_path / "fresh", "s")
    assert fresh.scan is None and fresh.trials == [] and fresh.cut is None


def test_a_last_record_optuna_cannot_apply_is_cut_though_it_looks_whole(tmp_path, caplog):
    """The replay found it torn, the cheap tail check would not: the cut follows what the check found."""
    from mnist_hpc import search as sd

    search_dir = journal_study(tmp_path, 1)
    journal = sd.journal_path(search_dir)
    whole = journal.read_bytes()
    bad = json.dumps({"op_code": 0, "worker_id": "w", "study_name": "t", "directions": [99]}).encode() + b"\n"
    journal.write_bytes(whole + bad)
    assert sd.torn_tail(journal) is None
    scan = sd.read_journal(journal)
    assert scan.describe_torn() == (f"the last line of {journal} (line {len(scan.records) + 1}, from byte {len(whole)}) "
                                    f"is {scan.torn}") and len(scan.records) == whole.count(b"\n")
    with caplog.at_level(logging.WARNING, logger="mnist_hpc.search"):
        check = sd.check_journal(search_dir, "s")
    assert [r.getMessage() for r in caplog.records] == [check.cut.describe()]
    assert check.cut.path == journal and check.cut.why == scan.torn
    assert re.fullmatch(r"study\.journal\.torn-\d{8}T\d{6}Z-[0-9a-f]{8}", check.cut.copy.name)
    assert check.cut is not None and check.cut.end == len(whole) and check.cut.why.startswith("no record Optuna wrote: ")
    assert check.note() == check.cut.describe() and "was no record Optuna wrote: a record Optuna cannot apply" in check.note()
    assert journal.read_bytes() == whole and check.cut.copy.read_bytes() == whole + bad


# Compatibility of what is written to disk: a directory bound, or a checkpoint written, by this
# version must be recognised by the next. The values are those of this version; a change to what
# is hashed (or how) must be deliberate, and then these values change with it.
def test_the_identity_fingerprint_is_stable_across_versions():
    from pathlib import PurePosixPath

    identity = {"b": 1, "a": [1, 2], "p": PurePosixPath("/x")}  # a value JSON has no type for: hashed as text
    assert claim.fingerprint(identity) == claim.fingerprint(dict(reversed(identity.items()))) == "e5a08479b834dfe7"


def test_the_checkpoint_fingerprint_of_the_default_config_is_stable_across_versions(compose):
    assert checkpoint.fingerprint(to_typed(compose([])), SHA) == "796cb8e589203ee9"


def test_a_labelled_refusal_starts_with_its_label(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / rundir.IDENTITY_FILE).write_text("{")
    with pytest.raises(claim.RunConflict, match=f"^trial 4: {tmp_path / 'bad' / rundir.IDENTITY_FILE} is not valid JSON"):
        claim.judge(tmp_path / "bad", {"data.sha256": SHA}, 1, "trial 4")
    claim.bind(tmp_path / "other", {"train.seed": 1, "data.sha256": SHA}, 1, "")
    with pytest.raises(claim.RunConflict, match=f"^trial 5: {tmp_path / 'other'} holds a run of another config"):
        claim.bind(tmp_path / "other", {"train.seed": 2, "data.sha256": SHA}, 1, "trial 5")


def test_bind_says_which_half_written_files_it_removed(tmp_path, caplog):
    (tmp_path / f".{rundir.PROGRESS_FILE}.abc.tmp").write_text("half")
    with caplog.at_level(logging.INFO, logger="mnist_hpc.claim"):
        claim.bind(tmp_path, {"data.sha256": SHA}, 1, "")
    assert [r.getMessage() for r in caplog.records] == [
        f"removed .{rundir.PROGRESS_FILE}.abc.tmp, left half-written by a writer that is gone"]


def earlier_run(directory: Path) -> Path:
    """A directory that an earlier launch made a run's (one of rundir.RUN_MARKERS in it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / rundir.IDENTITY_FILE).write_text("{}")
    return directory


def test_a_run_directory_inside_another_is_found_but_not_a_runs_own_entries_nor_hidden_ones(tmp_path):
    assert claim.nesting_problem(tmp_path / "absent", "hydra.run.dir") is None
    run = earlier_run(tmp_path / "run")
    earlier_run(run / rundir.CHECKPOINT_DIR)  # a run's own entry, whatever it holds
    earlier_run(run / ".submitit" / "x")  # hidden: submitit's folder, temporaries
    assert claim.nesting_problem(run, "hydra.run.dir") is None
    inner = earlier_run(run / "a" / "b")
    assert claim.nesting_problem(run, "hydra.run.dir") == (
        f"{run} holds the run directory {inner} of an earlier launch; choose another hydra.run.dir")
    other = tmp_path / "other"
    deeper = earlier_run(other / "a" / rundir.CHECKPOINT_DIR)  # a run's own entries are skipped only at the top
    assert claim.nesting_problem(other, "hydra.run.dir") == (
        f"{other} holds the run directory {deeper} of an earlier launch; choose another hydra.run.dir")


def test_a_sweep_that_is_or_lies_in_an_earlier_run_and_a_trial_around_one_are_refused(tmp_path):
    run = earlier_run(tmp_path / "run")
    assert claim.trial_dir_problems(run, [(0, run / "0")]) == [
        f"the sweep directory {run} is the run directory of an earlier launch; choose another hydra.sweep.dir"]
    assert claim.trial_dir_problems(run / "sweep", [(0, run / "sweep" / "0")]) == [
        f"{run / 'sweep'} lies inside the run directory {run} of an earlier launch; choose another hydra.sweep.dir"]
    sweep = tmp_path / "sweep"
    earlier_run(sweep / "old" / "0")  # a sweep may hold an earlier launch's trials, beside the new ones
    assert claim.trial_dir_problems(sweep, [(0, sweep / "new" / "0")]) == []
    assert claim.trial_dir_problems(sweep, [(3, sweep / "old")]) == [
        f"trial 3 would write {sweep / 'old'}, which holds the run directory {sweep / 'old' / '0'} of an earlier launch; "
        "choose a hydra.sweep.subdir that keeps trials apart, or another hydra.sweep.dir"]
    assert claim.trial_dir_problems(sweep, [(4, sweep / "old" / "0" / "a"), (5, sweep / "5")]) == [
        f"trial 4 would write {sweep / 'old' / '0' / 'a'}, inside the run directory {sweep / 'old' / '0'} of an earlier "
        "launch; choose a hydra.sweep.subdir that keeps trials apart, or another hydra.sweep.dir"]


def test_each_trial_directory_problem_says_what_to_set_and_none_hides_the_next(tmp_path):
    sweep = tmp_path / "sweep"
    out = tmp_path / "out"
    assert claim.trial_dir_problems(sweep, [(0, sweep), (1, out), (2, sweep / "x"), (3, sweep / "x"), (4, sweep / ".."),
                                            (5, sweep / "y"), (6, sweep / "y" / "z")]) == [
        f"trial 0 would write the sweep directory {sweep} itself; hydra.sweep.subdir must name a directory inside it "
        "(e.g. ${hydra.job.num})",
        f"trial 1 would write {out}, outside the sweep directory {sweep}; hydra.sweep.subdir must name a directory "
        "inside it (no absolute path, no '..')",
        f"trials 2 and 3 would both write {sweep / 'x'}; hydra.sweep.subdir must give every trial a directory of its own "
        "(include ${hydra.job.num}, or every swept key)",
        f"trial 4 would write {tmp_path}, outside the sweep directory {sweep}; hydra.sweep.subdir must name a directory "
        "inside it (no absolute path, no '..')",
        f"trial 6 would write {sweep / 'y' / 'z'}, inside trial 5's directory {sweep / 'y'}; hydra.sweep.subdir must keep "
        "trials apart",
    ]


def test_a_trial_directory_name_too_long_for_the_filesystem_is_named(tmp_path):
    long = tmp_path / ("x" * 256)
    problem, after = claim.trial_dir_problems(tmp_path, [(7, long), (8, tmp_path / "8"), (9, tmp_path)])
    assert after.startswith("trial 9 would write the sweep directory")  # the next trials are still checked
    assert problem == (f"trial 7: {str(long)[:200]}: its part {'x' * 40!r}... is 256 bytes long, and a file name holds at most 255: "
                       "choose a shorter hydra.sweep.dir or hydra.sweep.subdir")


def test_a_sweep_directory_holding_a_search_is_refused(tmp_path):
    from mnist_hpc.login.launcher.preflight import PreflightError, check_trial_dirs
    from mnist_hpc.search import SPEC_FILE

    (tmp_path / SPEC_FILE).write_text("{}")
    with pytest.raises(PreflightError) as refused:
        check_trial_dirs(tmp_path, [])
    assert str(refused.value) == (
        f"nothing was queued: {tmp_path} holds an asynchronous search ({SPEC_FILE}), whose study knows its own trials; "
        "submit this sweep into another hydra.sweep.dir (or continue the search with hparams_search=optuna)")


def test_a_trial_in_a_directory_of_the_sweeps_own_does_not_hide_the_next_trials_problem(tmp_path):
    problems = claim.trial_dir_problems(tmp_path, [(0, tmp_path / "report"), (1, tmp_path.parent / "out"),
                                                   (2, tmp_path / ".submitit" / "x")])
    assert [p.split(" would write")[0] for p in problems] == ["trial 0", "trial 1", "trial 2"]
    assert "'report' is the sweep directory's own; choose another hydra.sweep.subdir" in problems[0]


def test_the_ask_lock_is_a_file_of_the_search_directory(tmp_path):
    from mnist_hpc import search as sd

    with sd.ask_lock(tmp_path):
        assert os.path.islink(tmp_path / sd.ASK_LOCK)
    assert not os.path.lexists(tmp_path / sd.ASK_LOCK)


def test_a_heartbeat_file_is_named_after_its_job_with_safe_characters(tmp_path):
    from mnist_hpc import search as sd

    assert sd.beat_path(tmp_path, "Job-1_2.x/../y z") == tmp_path / "workers" / "Job-1_2.x_.._y_z.json"


def test_a_search_json_records_when_it_was_first_written_and_last_updated(tmp_path):
    from mnist_hpc import search as sd

    spec = sd.SearchSpec(study_name="s", direction="maximize", n_trials=2, params={"a": "interval(0, 1)"})
    sd.write_spec(tmp_path, spec)
    first = sd.read_spec(tmp_path)
    assert first == spec and first.created == first.updated != "" and "T" in first.created
    spec.created = "2020-01-01T00:00:00+00:00"
    sd.write_spec(tmp_path, spec)
    again = sd.read_spec(tmp_path)
    assert again.created == "2020-01-01T00:00:00+00:00" and again.updated == first.updated or again.updated > first.updated


def test_a_checked_copy_of_a_journal_is_read_only(tmp_path):
    from mnist_hpc import search as sd

    search_dir = journal_study(tmp_path, 1)
    storage = sd.read_journal(sd.journal_path(search_dir)).storage()
    with pytest.raises(sd.JournalError, match="^a checked copy of a journal is read-only$"):
        storage.set_trial_user_attr(0, "x", 1)


def test_hydra_sweep_syntax_maps_to_optunas_without_a_warning():
    import warnings

    from optuna.distributions import CategoricalDistribution, IntDistribution

    from mnist_hpc.search import parse_params

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        space, fixed = parse_params({"a": "range(0, 10, 4)", "fixed": "relu", "b": "range(0, 9, 2)", "c": "1,2"})
    assert space == {"a": IntDistribution(0, 8, step=4), "b": IntDistribution(0, 8, step=2),
                     "c": CategoricalDistribution([1, 2])}
    assert fixed == ["fixed=relu"]


@pytest.mark.parametrize("trials, shown", [(12, 12), (13, 12)])
def test_preflight_names_twelve_refused_trials_in_trial_order_and_counts_the_rest(compose, tmp_path, trials, shown):
    from mnist_hpc.login.launcher.preflight import PreflightError, preflight

    cache = tmp_path / "cache"
    fill_cache(cache)
    jobs = [planned(compose, n, tmp_path / "s" / str(n), f"data.cache_dir={cache}", "train.batch_size=601")
            for n in range(trials)]
    with pytest.raises(PreflightError) as refused:
        preflight(tmp_path / "s", jobs)
    lines = str(refused.value).splitlines()[1:]
    assert [line.split(":")[0] for line in lines[:shown]] == [f"  trial {n}" for n in range(shown)]
    assert lines[shown:] == (["  ... and 1 more"] if trials > shown else [])


def test_preflight_sorts_refusals_by_trial_number_not_by_text(compose, tmp_path, sleeper):
    from mnist_hpc.login.launcher.preflight import PreflightError, preflight

    cache = tmp_path / "cache"
    fill_cache(cache)
    jobs = [planned(compose, n, tmp_path / "s" / str(n), f"data.cache_dir={cache}") for n in range(11)]
    jobs[10] = planned(compose, 10, tmp_path / "s" / "10", f"data.cache_dir={cache}", "train.batch_size=601")
    rundir.write_job(jobs[2].run_dir, local_record(jobs[2].run_dir, sleeper.pid, claim.process_start(sleeper.pid)))
    with pytest.raises(PreflightError) as refused:
        preflight(tmp_path / "s", jobs)
    assert [line.split(":")[0] for line in str(refused.value).splitlines()[1:]] == ["  trial 2", "  trial 10"]


def test_a_lease_naming_a_slurm_job_is_judged_by_the_preflights_answers(compose, tmp_path, monkeypatch):
    from mnist_hpc import slurm
    from mnist_hpc.login.launcher.preflight import recorded_job_alive

    monkeypatch.setattr(slurm, "job_alive", lambda job_id: pytest.fail(f"squeue was asked about {job_id} on its own"))
    job = planned(compose, 6, tmp_path / "6")
    write_lease_of(job.run_dir, claim.Holder(host="", pid=1, slurm_job_id="55"))
    me = claim.Holder.this_process()
    assert "written by Slurm job 55" in recorded_job_alive(job, me, {"55": True}.__getitem__, None)
    assert recorded_job_alive(job, me, {"55": False}.__getitem__, None) is None


def test_the_journals_lock_keeps_its_grace_period(tmp_path):
    from mnist_hpc import search as sd

    lock = sd.JournalLock(tmp_path / "study.journal", grace_s=5.0)
    assert lock.grace_s == 5.0 and lock.path == str(tmp_path / "study.journal.lock") and lock.journal == tmp_path / "study.journal"
    assert sd.JournalLock(tmp_path / "study.journal").grace_s == sd.LOCK_GRACE_S


# --- the I1 gate's messages, whole (each names the directory, what is wrong and what to do) ---------


def test_a_layout_problem_is_refused_with_every_problem_and_the_fix(tmp_path):
    (tmp_path / rundir.METRICS_FILE).mkdir()
    (tmp_path / rundir.PROGRESS_FILE).mkdir()
    problems = rundir.layout_problems(tmp_path)
    assert len(problems) == 2
    with pytest.raises(claim.RunConflict) as info:
        claim.judge(tmp_path, {"data.sha256": SHA}, 1, "trial 2")
    assert str(info.value) == f"trial 2: {problems[0]}; {problems[1]}, then run again"


def test_results_without_an_identity_are_refused_with_the_whole_message(tmp_path):
    (tmp_path / rundir.PROGRESS_FILE).write_text("{}")
    with pytest.raises(claim.RunConflict) as info:
        claim.judge(tmp_path, {"data.sha256": SHA}, 1, "trial 1")
    assert str(info.value) == (
        f"trial 1: {tmp_path} holds results but no {rundir.IDENTITY_FILE} (written by an older mnist-hpc?), "
        "so it is not known which config they belong to; use a new directory")


def test_another_config_is_refused_naming_each_change_and_both_ways_out(tmp_path):
    claim.bind(tmp_path, {"train.seed": 0, "data.sha256": SHA}, 1, "")
    with pytest.raises(claim.RunConflict) as info:
        claim.judge(tmp_path, {"train.seed": 1, "model.hidden_units": 64, "data.sha256": SHA}, 1, "trial 4")
    assert str(info.value) == (
        f"trial 4: {tmp_path} holds a run of another config (model.hidden_units: '(unset)' -> 64; train.seed: 0 -> 1). "
        "Its results would be relabelled; use a new directory (e.g. another hydra.sweep.dir or hydra.run.dir), "
        "or submit the same overrides as before to continue it")


def test_a_fingerprint_that_differs_with_the_same_keys_is_still_another_config(tmp_path):
    identity = {"train.seed": 0, "data.sha256": SHA}
    rundir.write_identity(tmp_path, identity, "0" * 16)  # written by a release that hashed differently
    with pytest.raises(claim.RunConflict, match=r"holds a run of another config \(fingerprint differs\)\. Its"):
        claim.judge(tmp_path, identity, 1, "")


# --- which results a directory shows as its job's (rundir.state, in-process) -----------------------


def bound_run(run_dir: Path, *, bound: Optional[str] = "f" * 16, job_fp: Optional[str] = "f" * 16,
              metrics_fp: Optional[str] = "f" * 16, planned: int = 3, done: int = 3) -> None:
    """A trial directory with job.json, progress.json, metrics.json and identity.json, their fingerprints as given."""
    history = [{"epoch": e, "loss": 0.5 / e, "accuracy": 0.8} for e in range(1, done + 1)]
    rundir.write_job(run_dir, rundir.JobRecord(cluster="local", job_id="77", run_dir=str(run_dir), overrides=["train.seed=0"],
                                               trial=0, fingerprint=job_fp))
    rundir.write_progress(run_dir, min(done, planned), planned, history[:planned])
    metrics = {"test_accuracy": 0.9, "epochs_completed": done, "history": history}
    if metrics_fp is not None:
        metrics["fingerprint"] = metrics_fp
    rundir.write_metrics(run_dir, metrics)
    if bound is not None:
        rundir.write_identity(run_dir, {"train.seed": 0, "data.sha256": SHA}, bound)


def test_results_of_the_bound_config_are_shown_with_its_identity(tmp_path):
    bound_run(tmp_path)
    run = rundir.read_run(tmp_path)
    assert run.notes == []
    assert run.metrics is not None and run.progress is not None and run.finished
    assert run.identity == {"train.seed": 0, "data.sha256": SHA}


@pytest.mark.parametrize("job_fp, metrics_fp", [(None, None), (None, "f" * 16), ("f" * 16, None)])
def test_a_record_without_a_fingerprint_never_hides_bound_results(tmp_path, job_fp, metrics_fp):
    bound_run(tmp_path, job_fp=job_fp, metrics_fp=metrics_fp)
    run = rundir.read_run(tmp_path)
    assert (run.notes, run.metrics is not None, run.progress is not None) == ([], True, True)
    assert run.identity == {"train.seed": 0, "data.sha256": SHA}


def test_an_unbound_directory_shows_its_results_without_an_identity(tmp_path):
    bound_run(tmp_path, bound=None)
    run = rundir.read_run(tmp_path)
    assert (run.notes, run.metrics is not None, run.identity) == ([], True, None)


def test_a_job_queued_for_another_config_shows_none_of_the_directorys_results(tmp_path):
    bound_run(tmp_path, job_fp="1" * 16)
    run = rundir.read_run(tmp_path)
    assert (run.metrics, run.progress, run.identity) == (None, None, None)
    assert run.notes == [
        f"{tmp_path / rundir.JOB_FILE} was queued for another config (fingerprint {'1' * 16}) than the one whose results "
        f"this directory holds ({'f' * 16}, {rundir.IDENTITY_FILE}); its results are not shown as this trial's"]


def test_metrics_of_another_config_are_dropped_and_the_progress_kept(tmp_path):
    bound_run(tmp_path, metrics_fp="2" * 16)
    run = rundir.read_run(tmp_path)
    assert run.metrics is None and run.progress is not None and not run.finished
    assert run.identity == {"train.seed": 0, "data.sha256": SHA}
    assert run.notes == [
        f"{tmp_path / rundir.METRICS_FILE} comes from another config (fingerprint {'2' * 16}) than the one this "
        f"directory is bound to ({'f' * 16}, {rundir.IDENTITY_FILE}); ignored"]


@pytest.mark.parametrize("planned, done, kept", [(3, 3, True), (3, 4, False), (4, 3, True)])
def test_metrics_with_more_epochs_than_planned_are_dropped(tmp_path, planned, done, kept):
    bound_run(tmp_path, planned=planned, done=done)
    run = rundir.read_run(tmp_path)
    assert (run.metrics is not None) == kept and run.progress is not None
    if not kept:
        assert run.notes == [f"{tmp_path / rundir.METRICS_FILE} holds {done} epochs, more than the {planned} its "
                             "progress.json planned; ignored"]


@pytest.mark.parametrize("present", ["metrics", "progress", "both", "neither"])
def test_a_damaged_identity_hides_whatever_results_there_are(tmp_path, present):
    bound_run(tmp_path)
    if present in ("progress", "neither"):
        (tmp_path / rundir.METRICS_FILE).unlink()
    if present in ("metrics", "neither"):
        (tmp_path / rundir.PROGRESS_FILE).unlink()
    (tmp_path / rundir.IDENTITY_FILE).write_text("[1]")
    run = rundir.read_run(tmp_path)
    assert (run.metrics, run.progress, run.identity) == (None, None, None)
    if present == "neither":
        assert run.notes == []
    else:
        [note] = run.notes
        assert note.startswith(f"{tmp_path / rundir.IDENTITY_FILE} holds a JSON list") and note.endswith(
            "; its results are not shown, since it cannot be told which config made them")


def test_an_override_is_split_at_its_first_equals_sign_and_its_prefix_dropped():
    assert parse_override("data.path=a=b") == ("data.path", "a=b")
    assert parse_override("+hydra.launcher.additional_parameters.hold=true") == ("hydra.launcher.additional_parameters.hold", "true")
    assert parse_override("~train.seed") == ("train.seed", None)
    assert parse_override("Xray=1") == ("Xray", "1") and parse_override("a= 1") == ("a", " 1")


def test_a_long_identity_value_is_cut_only_past_16_characters():
    trials = [overridden(i, [], {"data.sha256": v}) for i, v in enumerate(["a" * 16, "b" * 17])]
    swept = swept_params(trials)
    assert shown_settings(trials[0], swept) == ["data.sha256=" + "a" * 16]
    assert shown_settings(trials[1], swept) == ["data.sha256=" + "b" * 12 + "…"]


def test_long_values_that_cutting_would_make_alike_are_shown_whole():
    units = ["[1024, 1024, 512]", "[1024, 1024, 256]"]  # 17 characters, alike in their first 12
    trials = [overridden(i, [], {"model.hidden_units": v}) for i, v in enumerate(units)]
    swept = swept_params(trials)
    assert [shown_settings(t, swept) for t in trials] == [[f"model.hidden_units={v}"] for v in units]
    # A value missing from one trial's identity does not count as a value cutting must keep apart.
    trials.append(overridden(2, [], {}))
    assert shown_settings(trials[0], swept_params(trials)) == [f"model.hidden_units={units[0]}"]


def test_an_unknown_metric_names_the_ones_there_are():
    with pytest.raises(ValueError) as info:
        metric_value(ranked_trial(0, 0.9, 0.9), "loss")
    assert str(info.value) == "unknown metric 'loss'; choose one of val_accuracy, test_accuracy"


def test_bound_results_of_a_run_that_was_never_queued_are_shown(tmp_path):
    bound_run(tmp_path)
    (tmp_path / rundir.JOB_FILE).unlink()  # an in-process run: no job.json
    run = rundir.read_run(tmp_path)
    assert (run.notes, run.metrics is not None, run.identity is not None) == ([], True, True)


def test_a_run_directory_that_cannot_be_listed_is_read_as_holding_nothing(tmp_path):
    run = rundir.read_run(tmp_path / "gone")  # removed between finding it and reading it
    assert (run.job, run.metrics, run.progress, run.identity, run.overrides, run.notes) == (None, None, None, None, [], [])


def test_a_damaged_job_record_or_overrides_file_is_a_note_naming_it(tmp_path):
    (tmp_path / rundir.JOB_FILE).write_text("{not json")
    (tmp_path / rundir.HYDRA_DIR).mkdir()
    (tmp_path / rundir.HYDRA_OVERRIDES).write_text("a: [")
    run = rundir.read_run(tmp_path)
    assert len(run.notes) == 2 and all(n.endswith("; ignored") for n in run.notes), run.notes
    assert run.notes[0].startswith(str(tmp_path / rundir.JOB_FILE)) and run.notes[1].startswith(
        str(tmp_path / rundir.HYDRA_OVERRIDES))
    assert run.job is None and run.overrides == []
